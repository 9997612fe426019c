"""The sampled Fisher's random draws, keyed on each example: [`FisherDraws`][].

A label drawn for the sampled Fisher is a function of the draws' ``key`` (the store's seed, the checkpoint and the
stage), the example's index in its stage's data and a counter within the example (a token's ordinal among the
loss-carrying ones, a label's column) only. So the batch size, the split of a stage over processes or row chunks,
the padding of a batch and a resumed run change no draw: one uniform per (key, example, counter) from a counter-based
hash (32-bit MurmurHash3 over their 32-bit words, two hashes to a float64 of 53 random bits), made with integer
tensor operations on the rows' device, the same numbers on a CPU and an accelerator.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

DRAWS_ID = "example-keyed-murmur3-v1"
"""How the sampled Fisher's labels are drawn, recorded in a store's ``meta["featurize"]["fisher_draws"]``: a store
whose labels were drawn otherwise (per batch, before it) is not resumed or grown with these draws."""

_MASK = 0xFFFFFFFF
_C1, _C2 = 0xCC9E2D51, 0x1B873593  # MurmurHash3's constants
_SECOND = 0x9E3779B9  # the second hash's seed, xored into the first's


@dataclass(frozen=True)
class FisherDraws:
    """Where one batch's sampled Fisher targets come from (``Task.fisher_targets``): uniforms keyed on each example.

    Args:
        key: a 64-bit key of what the batch is drawn at (``FisherDraws.key_of`` the store's seed, the checkpoint…).
        rows: the batch's examples' indices in their stage's data, int64 ``[B]``, on the device the draws are
            made on.
    """

    key: int
    rows: Tensor

    @staticmethod
    def key_of(words: Sequence[int]) -> int:
        """A 64-bit key from non-negative integers (numpy's ``SeedSequence`` of them)."""
        return int(np.random.SeedSequence(list(words)).generate_state(1, dtype=np.uint64)[0])

    @classmethod
    def of(cls, words: Sequence[int], rows: Tensor | Sequence[int], device: torch.device | str = "cpu") -> FisherDraws:
        """The draws of the examples ``rows`` at the key of ``words`` (``key_of``)."""
        return cls(cls.key_of(words), torch.as_tensor(rows, dtype=torch.long, device=device).reshape(-1))

    def uniform(self, counters: Tensor, stream: int = 0) -> Tensor:
        """A uniform in [0, 1) for every counter of every example, float64 ``counters.shape``, on the rows' device.

        ``counters``: non-negative int64 ``[B, ...]``, example i's draws numbered within it (a token's ordinal). The
        same (key, row, counter, stream) gives the same number in any batch."""
        counters = counters.to(device=self.rows.device, dtype=torch.long)
        rows = self.rows.reshape(-1, *([1] * (counters.dim() - 1))).expand_as(counters)
        words = [rows & _MASK, rows >> 32, counters & _MASK, counters >> 32, stream]
        high, low = _murmur([[self.key & _MASK, self.key >> 32], [(self.key & _MASK) ^ _SECOND, self.key >> 32]], words)
        return (high * 2**21 + (low >> 11)).double() / 2**53

    def per_example(self, count: int, stream: int = 0) -> Tensor:
        """``count`` uniforms of every example, float64 ``[B, count]`` (counters 0 … count − 1)."""
        counters = torch.arange(count, device=self.rows.device).expand(self.rows.shape[0], count)
        return self.uniform(counters, stream)

    def at(self, keep: Tensor, stream: int = 0) -> Tensor:
        """A uniform at every position ``keep`` (bool ``[B, P]``) marks, numbered by its ordinal among the example's
        marked positions (padding on either side changes no draw); 0 elsewhere. Float64 ``[B, P]``."""
        keep = keep.to(self.rows.device)
        ordinal = (keep.long().cumsum(-1) - 1).clamp_min(0)
        return torch.where(keep, self.uniform(ordinal, stream), 0.0)

    def normal(self, count: int) -> Tensor:
        """``count`` standard normal draws of every example, float64 ``[B, count]`` (Box–Muller of two streams)."""
        radius = torch.sqrt(-2.0 * torch.log1p(-self.per_example(count, stream=1)))
        return radius * torch.cos(2.0 * math.pi * self.per_example(count, stream=2))


def inverse_cdf(probs: Tensor, uniform: Tensor) -> Tensor:
    """The class of each row of ``probs`` ``[..., C]`` (non-negative, summing to about 1) that ``uniform`` ``[...]`` in
    [0, 1) picks by inverse CDF: the first c with u·Σp < Σ_{c'≤c} p_{c'}, in float64. Int64 ``[...]``."""
    cdf = probs.double().cumsum(-1)
    target = uniform.to(cdf) * cdf[..., -1]
    return torch.searchsorted(cdf, target.unsqueeze(-1), right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)


def _murmur(heads: Sequence[Sequence[int]], words: Sequence[Tensor | int]) -> Tensor:
    """32-bit MurmurHash3 (seed 0) of the words ``head + words`` for each head of ``heads``, int64
    ``[len(heads), *shape]``. ``heads``: 32-bit integers of equal count, hashed in Python once (not per element);
    ``words``: 32-bit values, int64 tensors of one shape ``shape`` (at least one) or integers, each scrambled once for
    every head."""
    like = next(word for word in words if isinstance(word, Tensor))
    states = [functools.reduce(_mix, head, 0) for head in heads]
    h = torch.tensor(states, dtype=torch.long, device=like.device).reshape(-1, *([1] * like.dim()))
    for word in words:
        h = _mix(h, word)
    h = h ^ (4 * (len(heads[0]) + len(words)))
    h = _mul(h ^ (h >> 16), 0x85EBCA6B)
    h = _mul(h ^ (h >> 13), 0xC2B2AE35)
    return h ^ (h >> 16)


def _mix(h: Tensor | int, word: Tensor | int) -> Tensor | int:
    """MurmurHash3's state ``h`` after one more 32-bit word (tensors or Python integers, broadcast)."""
    k = _mul(_rotl(_mul(word, _C1), 15), _C2)
    h = _rotl(h ^ k, 13)
    return (_mul(h, 5) + 0xE6546B64) & _MASK


def _mul(x: Tensor | int, c: int) -> Tensor | int:
    """x·c mod 2³² for 32-bit ``x`` in int64, in 16-bit halves of ``c``: no product overflows (on any device)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK


def _rotl(x: Tensor | int, r: int) -> Tensor | int:
    return ((x << r) & _MASK) | (x >> (32 - r))
