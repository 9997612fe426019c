"""The eigenbasis projection: each layer's gradient projected onto the leading eigenvectors of its
Kronecker factors, estimated from the run's checkpoints (LoGra's PCA projection).

A random projection's error on an inner product is ≈ ‖x‖‖y‖/√k whatever the gradients look like
(``factored.py``). Per-example gradients of a layer are far from isotropic: G = Σ_t δ_t ā_tᵀ lives
mostly in the span of the leading eigenvectors of its two Kronecker factors

    A = E[ā ā ᵀ]   (the layer's inputs, a constant 1 appended for a bias)
    B = E[δ δᵀ]    (the output gradients of the Fisher's sampled-label losses)

so projecting with the orthonormal rows P_out = U_Bᵀ (``k_out × d_out``) and P_in = U_Aᵀ (``k_in ×
d_in'``) of those eigenvectors keeps almost all of every gradient in k_out·k_in numbers and adds no
noise: ⟨Px, Py⟩ = ⟨Πx, Πy⟩ with Π the orthogonal projection onto the kept directions, whose only
error is the gradients' part outside them. SOURCE's projected Gauss–Newton is then a Galerkin
approximation of the full-space one, and issue 12's ablations (BENCHMARKS.md) show it beating both
the dense Rademacher projection at four times the k and the full-space Kronecker curvature.

**Estimation.** One sampled-label Fisher pass (``FactorCollector``) over at most ``examples``
training examples of each stage (as few as give every layer ``basis_layer_positions`` positions:
``featurize/basis.py``), at every checkpoint featurize visits; each checkpoint's A and B are
normalised (per position, per example) and the checkpoints are averaged, so a basis covers every
stage's directions. On Adam and AdamW stages the factors are those of the preconditioned gradients
D^{-1/2} ⊙ G, with D^{-1/2} in its rank-one row × column form (A ∘ c cᵀ, B ∘ r rᵀ), where a saved optimizer
state gives D (``featurize/basis.py``); the basis is a choice of subspace, and the preconditioned gradients
are projected onto it exactly. In-run capture estimates a basis per window (``featurize/capture.py``).

**Allocation.** The k numbers are shared out between the layers greedily: each step adds the row or
column (one more eigenvector of B or of A in some layer) that captures the most of the Kronecker
Fisher's trace per number added, tr(B_k_out)·tr(A_k_in) being what a block of k_out × k_in keeps. Layers
the Kronecker factors do not cover (embeddings, tied weights, sides above ``MAX_FACTOR_SIDE``) and
parameters no layer factors (norms) share a random block of ``shared_dim(dim)`` coordinates first, as
in the ``factored`` projection.

**Decomposition.** A factor up to ``PARTIAL_ABOVE`` (2,048) wide is decomposed whole. A wider one (GPT-2
small's 3,072, a 1B Llama's 8,192) gives only its leading eigenpairs (``leading_eigh``: block subspace iteration),
64 at first, twice as many for any factor whose side the allocation took every one of, until none does; the
greedy allocation then never looked past what was decomposed, so it is the one the whole spectrum gives, up to
the iteration's tolerance (eigenvalues to 10⁻⁶ of the largest; the kept vectors hold the exact ones' share of
the trace to 10⁻⁶). A float64 decomposition of a factor thousands wide takes seconds to minutes on a CPU, and a
1B Llama has 48 that are 8,192 wide in a basis; in-run capture takes a basis at every window.

The store keeps the basis (``projection/basis/<layer>/out|in``); queries and fits rebuild the
projection from it and check it against the digest in the store's metadata.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from source_proj.errors import StoreError, TaskError
from source_proj.projection.factored import FactoredProjector, _Block
from source_proj.projection.layers import FactoredLayer

BASIS_PREFIX = "projection/basis"
PARTIAL_ABOVE = 2048
"""Factors wider than this are decomposed for their leading eigenpairs only (``leading_eigh``)."""
FIRST_MODES = 64
"""The leading eigenpairs a wide factor gives first; doubled where the allocation takes every one of them."""


def shared_dim(dim: int) -> int:
    """The random block's k when something shares it: the largest power of two ≤ max(dim / 4, 4)."""
    return 1 << int(math.log2(max(dim // 4, 4)))


def allocate(a_values: Sequence[np.ndarray], b_values: Sequence[np.ndarray], dim: int) -> list[tuple[int, int]]:
    """``(k_out, k_in)`` per layer, Σ k_out·k_in ≤ dim, greedily maximising Σ tr(B_k_out)·tr(A_k_in).

    ``a_values`` / ``b_values``: each layer's factor eigenvalues in descending order. Every layer keeps
    at least its leading direction on each side."""
    if dim < len(a_values):
        raise TaskError(
            f"The eigen projection needs k ≥ the number of layers it projects ({len(a_values)}), not {dim}."
        )
    cum_a = [np.concatenate([[0.0], np.cumsum(np.clip(v, 0, None))]) for v in a_values]
    cum_b = [np.concatenate([[0.0], np.cumsum(np.clip(v, 0, None))]) for v in b_values]
    alloc = [[1, 1] for _ in a_values]
    used = len(alloc)
    while True:
        best: tuple[float, int, int, int] | None = None
        for i, (ko, ki) in enumerate(alloc):
            kept = cum_b[i][ko] * cum_a[i][ki]
            for nko, nki in ((ko + 1, ki), (ko, ki + 1)):
                if nko >= len(cum_b[i]) or nki >= len(cum_a[i]):
                    continue
                cost = nko * nki - ko * ki
                if used + cost > dim:
                    continue
                gain = (cum_b[i][nko] * cum_a[i][nki] - kept) / cost
                if best is None or gain > best[0]:
                    best = (gain, i, nko, nki)
        if best is None:
            return [(ko, ki) for ko, ki in alloc]
        _, i, nko, nki = best
        used += nko * nki - alloc[i][0] * alloc[i][1]
        alloc[i] = [nko, nki]


@dataclass
class EigenBasis:
    """Per basis layer (by module name) the orthonormal rows ``out [k_out, d_out]`` and ``inp [k_in, d_in']``.

    Attributes:
        modules: the modules with a basis, in layer order.
        out, inp: float32 rows of the kept eigenvectors of B and A.
        checkpoints: the steps whose factors were averaged.
        examples: examples per stage and checkpoint that were used (at most).
        captured: the share of the Kronecker Fisher's trace the blocks keep (over the basis layers).
        inputs: a digest of what the basis was estimated from (run, data, k, seed, examples, positions): a
            store whose basis has the same inputs is resumed with it rather than estimated again.
        positions: the most positions per example its factors took, where some example had more (``None``:
            every position; recorded only where sampling took place, so a basis of a model with fewer positions
            per example, such as an MLP's one, is described as it was before positions could be sampled).
    """

    modules: list[str]
    out: list[Tensor]
    inp: list[Tensor]
    checkpoints: list[int]
    examples: int
    captured: float
    inputs: str = ""
    positions: int | None = None

    @classmethod
    def from_factors(
        cls,
        modules: Sequence[str],
        a: Sequence[np.ndarray],
        b: Sequence[np.ndarray],
        dim: int,
        checkpoints: Sequence[int],
        examples: int,
        inputs: str = "",
        device: torch.device | str = "cpu",
        positions: int | None = None,
    ) -> EigenBasis:
        """Eigendecompose each layer's averaged A and B (on ``device``: see ``eigh``) and keep the allocated
        leading eigenvectors."""
        factors = [m for pair in zip(a, b, strict=True) for m in pair]  # A₀, B₀, A₁, B₁, …
        decomposed = [_leading(m, FIRST_MODES, device) for m in factors]
        while True:
            blocks = allocate([d[0] for d in decomposed[0::2]], [d[0] for d in decomposed[1::2]], dim)
            taken = [count for ko, ki in blocks for count in (ki, ko)]
            short = [i for i, (values, _) in enumerate(decomposed)
                     if taken[i] >= len(values) < factors[i].shape[0]]  # fmt: skip
            if not short:
                break
            for i in short:  # the allocation might have taken more of these than were decomposed
                decomposed[i] = _leading(factors[i], 2 * len(decomposed[i][0]), device)
        out, inp, kept, total = [], [], 0.0, 0.0
        for i, (ko, ki) in enumerate(blocks):
            (la, qa), (lb, qb) = decomposed[2 * i], decomposed[2 * i + 1]
            la, lb = np.clip(la, 0, None), np.clip(lb, 0, None)
            kept += lb[:ko].sum() * la[:ki].sum()
            total += _trace(lb, b[i]) * _trace(la, a[i])
            out.append(_rows(qb[:, :ko]))
            inp.append(_rows(qa[:, :ki]))
        captured = float(kept / total) if total > 0 else 1.0
        return cls(list(modules), out, inp, list(checkpoints), examples, captured, inputs, positions)

    @property
    def blocks(self) -> list[tuple[int, int]]:
        return [(int(o.shape[0]), int(i.shape[0])) for o, i in zip(self.out, self.inp, strict=True)]

    @property
    def dim(self) -> int:
        return sum(ko * ki for ko, ki in self.blocks)

    def digest(self) -> str:
        """A hash of the basis values (the store's metadata records it; a rebuilt basis must match)."""
        h = hashlib.sha256()
        for m in (*self.out, *self.inp):
            h.update(np.ascontiguousarray(m.numpy(), dtype=np.float32).tobytes())
        return h.hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        return {
            "modules": self.modules,
            "blocks": [list(b) for b in self.blocks],
            "checkpoints": self.checkpoints,
            "examples": self.examples,
            "captured": round(self.captured, 6),
            "inputs": self.inputs,
            "digest": self.digest(),
            **({} if self.positions is None else {"positions": self.positions}),
        }

    def arrays(self) -> Iterable[tuple[str, np.ndarray]]:
        """``(store array name, values)`` of every matrix."""
        for i, (o, a) in enumerate(zip(self.out, self.inp, strict=True)):
            yield f"{BASIS_PREFIX}/{i}/out", o.numpy()
            yield f"{BASIS_PREFIX}/{i}/in", a.numpy()

    def packed(self) -> tuple[np.ndarray, list[list[int]]]:
        """Every matrix in one float32 vector (per layer its out, then its in rows) and their shapes: one array
        in a store instead of two per layer (in-run capture keeps a basis per window)."""
        matrices = [m for pair in zip(self.out, self.inp, strict=True) for m in pair]
        values = np.concatenate([m.numpy().ravel() for m in matrices]).astype(np.float32)
        return values, [list(m.shape) for m in matrices]

    @classmethod
    def unpack(cls, values: np.ndarray, desc: Mapping[str, Any], where: str) -> EigenBasis:
        """The basis ``packed`` wrote (``desc``: its ``describe()`` with ``"shapes"``), checked against its digest."""
        sizes = [int(np.prod(shape)) for shape in desc["shapes"]]
        if len(values) != sum(sizes):
            raise StoreError(f"The eigen basis at {where} holds {len(values)} numbers, not {sum(sizes)}; recapture.")
        parts = np.split(np.asarray(values, dtype=np.float32), np.cumsum(sizes)[:-1])
        matrices = [torch.from_numpy(p.reshape(shape).copy()) for p, shape in zip(parts, desc["shapes"], strict=True)]
        basis = cls(list(desc["modules"]), matrices[0::2], matrices[1::2], list(desc["checkpoints"]),
                    int(desc["examples"]), float(desc["captured"]), str(desc.get("inputs", "")),
                    desc.get("positions"))  # fmt: skip
        if basis.digest() != desc["digest"]:
            raise StoreError(f"The eigen basis at {where} does not match its recorded digest; recapture the run.")
        return basis

    @classmethod
    def read(cls, store: Any, desc: Mapping[str, Any]) -> EigenBasis:
        """The basis a store recorded (``desc`` = its projection's ``"basis"`` entry), checked against its digest."""
        out, inp = [], []
        for i in range(len(desc["modules"])):
            names = (f"{BASIS_PREFIX}/{i}/out", f"{BASIS_PREFIX}/{i}/in")
            if not all(store.is_complete(n) for n in names):
                raise StoreError(
                    f"The store at {store.path} has no eigen projection basis for layer {desc['modules'][i]!r} (an "
                    "interrupted featurize): run featurize again to finish it."
                )
            out.append(torch.from_numpy(np.asarray(store.read(names[0]), dtype=np.float32)))
            inp.append(torch.from_numpy(np.asarray(store.read(names[1]), dtype=np.float32)))
        basis = cls(list(desc["modules"]), out, inp, list(desc["checkpoints"]), int(desc["examples"]),
                    float(desc["captured"]), str(desc.get("inputs", "")),
                    desc.get("positions"))  # fmt: skip
        if basis.digest() != desc["digest"]:
            raise StoreError(
                f"The eigen projection basis in the store at {store.path} does not match its metadata (digest "
                f"{basis.digest()}, recorded {desc['digest']}); featurize it again with --force."
            )
        return basis


def eigh(matrix: np.ndarray, device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Ascending eigenvalues and the eigenvectors (columns) of a symmetric float64 matrix (symmetrised first):
    NumPy on the CPU, torch on an accelerator, where a factor thousands wide (an LLM layer's) takes a fraction
    of the seconds a CPU takes; in-run capture decomposes every layer's factors at every window."""
    sym = (matrix + matrix.T) / 2
    if torch.device(device).type == "cpu":
        return np.linalg.eigh(sym)
    return _torch_eigh(sym, device)


def _torch_eigh(sym: np.ndarray, device: torch.device | str) -> tuple[np.ndarray, np.ndarray]:
    values, vectors = torch.linalg.eigh(torch.from_numpy(np.ascontiguousarray(sym)).to(device, torch.float64))
    return values.cpu().numpy(), vectors.cpu().numpy()


def leading_eigh(
    matrix: np.ndarray,
    count: int,
    device: torch.device | str = "cpu",
    *,
    iterations: int = 300,
    tolerance: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` largest eigenvalues (descending) and their eigenvectors (columns) of a symmetric positive
    semi-definite float64 matrix, by block subspace iteration on ``device``: 2·count vectors from a seeded Gaussian
    start, multiplied by the matrix and re-orthonormalised until no leading Ritz value moves by more than
    ``tolerance`` times the largest in a round (``iterations`` at most); the pairs returned are the Ritz pairs of
    the last basis. A round costs about 4·d²·count flops, a whole decomposition about 9·d³: with a decaying
    spectrum a dozen rounds do, with a flat one (a random network's inputs) a few dozen, where the vectors matter
    least (any of a cluster of near-equal eigenvalues keeps as much of the trace). Where 2·count reaches the side
    the whole decomposition is taken."""
    side = matrix.shape[0]
    width = min(side, 2 * count)
    if width >= side:
        values, vectors = eigh(matrix, device)
        return values[::-1][:count].copy(), vectors[:, ::-1][:, :count].copy()
    sym = torch.from_numpy(np.ascontiguousarray((matrix + matrix.T) / 2)).to(device, torch.float64)
    start = torch.randn(side, width, generator=torch.Generator().manual_seed(side), dtype=torch.float64)
    basis = torch.linalg.qr(sym @ start.to(device))[0]
    previous = None
    for round_ in range(iterations):
        image = sym @ basis
        values, rotation = torch.linalg.eigh((basis.T @ image + image.T @ basis) / 2)  # Rayleigh–Ritz, ascending
        top = values.flip(0)[:count]
        scale = float(top.abs().max())
        settled = previous is not None and float((top - previous).abs().max()) <= tolerance * scale
        if scale == 0.0 or settled or round_ == iterations - 1:
            break
        previous = top
        basis = torch.linalg.qr(image)[0]
    vectors = basis @ rotation.flip(1)[:, :count]
    return top.cpu().numpy(), vectors.cpu().numpy()


def _leading(matrix: np.ndarray, count: int, device: torch.device | str) -> tuple[np.ndarray, np.ndarray]:
    """A factor's eigenvalues (descending) and eigenvectors: all of them up to ``PARTIAL_ABOVE`` wide, else the
    leading ``count`` (``leading_eigh``)."""
    if matrix.shape[0] <= PARTIAL_ABOVE:
        values, vectors = eigh(matrix, device)
        return values[::-1], vectors[:, ::-1]
    return leading_eigh(matrix, count, device)


def _trace(values: np.ndarray, matrix: np.ndarray) -> float:
    """A factor's trace: the sum of its (clipped) eigenvalues where all were decomposed, else of its diagonal."""
    if len(values) == matrix.shape[0]:
        return float(values.sum())
    return max(float(np.trace(matrix)), float(values.sum()))


def change_basis(features: Tensor, src: EigenBasis, dst: EigenBasis, shared: int) -> Tensor:
    """Features ``[n, ≥ shared + src.dim]`` laid out by ``src`` re-expressed in ``dst``'s layout ``[n, shared +
    dst.dim]``: per layer U_dst U_srcᵀ (P_src G P_srcᵀ) V_src V_dstᵀ = P_dst Π_src G Π_src P_dstᵀ, with Π_src the
    orthogonal projection onto ``src``'s kept directions; the first ``shared`` coordinates (the random block, the
    same in both) are kept. Exact when ``src`` keeps all of G (in-run capture, ``featurize/capture.py``)."""
    if src.modules != dst.modules:
        raise StoreError(f"Two eigen bases of different layers ({src.modules} and {dst.modules}) cannot be mapped.")
    n = features.shape[0]
    parts, at = [features[:, :shared]], shared
    for j, ((so, si), (do, di)) in enumerate(zip(src.blocks, dst.blocks, strict=True)):
        block = features[:, at : at + so * si].reshape(n, so, si)
        left = dst.out[j].to(features) @ src.out[j].to(features).T  # [do, so]
        right = dst.inp[j].to(features) @ src.inp[j].to(features).T  # [di, si]
        parts.append((left @ block @ right.T).reshape(n, do * di))
        at += so * si
    return torch.cat(parts, dim=1)


def _rows(columns: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(columns.T, dtype=np.float32))


class EigenProjector(FactoredProjector):
    """The factored projection with each Kronecker layer's eigenbasis (``basis``) as its factors, in a block
    of its own; the layers without a basis and the unfactored parameters share a random block first.

    Args:
        shapes: ``(name, shape)`` of every projected parameter, as for :class:`FactoredProjector`.
        layers: the factorable layers (``factorable_layers``); those named by ``basis`` get its factors.
        dim: k, the total dimension (random shared block + every basis block).
        basis: the per-layer bases (its ``dim`` is what the blocks use).
        seed: the seed of the random shared block.
        adam_rank: as for :class:`FactoredProjector`.
    """

    def __init__(
        self,
        shapes: Sequence[tuple[str, Sequence[int]]],
        layers: Sequence[FactoredLayer],
        dim: int,
        basis: EigenBasis,
        seed: int = 0,
        *,
        adam_rank: int = 1,
    ) -> None:
        by_module = {layer.module: i for i, layer in enumerate(layers)}
        missing = [m for m in basis.modules if m not in by_module]
        if missing:
            raise TaskError(f"The eigen projection's basis names layers the model does not have: {missing}.")
        self.basis = basis
        self.total_dim = dim
        self._basis_index = {by_module[m]: j for j, m in enumerate(basis.modules)}
        shares = len(self._basis_index) < len(layers) or _has_rest(shapes, layers)
        shared = shared_dim(dim) if shares else 4  # 4: a placeholder, nothing uses it
        super().__init__(shapes, layers, shared, seed, adam_rank=adam_rank)
        if self.dim > dim:
            raise TaskError(f"The eigen projection's blocks take {self.dim} coordinates, more than k = {dim}.")

    def _layout(self, has_rest: bool) -> tuple[list[_Block], int]:
        shares = has_rest or len(self._basis_index) < len(self.layers)
        offset = self.shared_dim if shares else 0
        blocks = []
        for index in range(len(self.layers)):
            j = self._basis_index.get(index)
            if j is None:
                blocks.append(_Block(0, self.k_out, self.k_in))
                continue
            k_out, k_in = self.basis.blocks[j]
            blocks.append(_Block(offset, k_out, k_in))
            offset += k_out * k_in
        return blocks, offset

    def factors(self, index: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        j = self._basis_index.get(index)
        if j is None:
            return super().factors(index, device)
        key = (index, str(device))
        if key not in self._factors:
            self._factors[key] = (self.basis.out[j].to(device), self.basis.inp[j].to(device))
        return self._factors[key]

    def describe(self) -> dict[str, Any]:
        desc = super().describe()
        desc |= {"kind": "eigen", "dim": self.dim, "k": self.total_dim, "basis": self.basis.describe()}
        desc.pop("factors")
        return desc


def _has_rest(shapes: Sequence[tuple[str, Sequence[int]]], layers: Sequence[FactoredLayer]) -> bool:
    factored = {layer.weight for layer in layers} | {layer.bias for layer in layers if layer.bias}
    return any(name not in factored for name, _ in shapes)


def basis_budget(dim: int, shares: bool) -> int:
    """The k left to the basis blocks once the shared random block (if anything shares it) is taken."""
    budget = dim - (shared_dim(dim) if shares else 0)
    if budget < 1:
        raise TaskError(f"k = {dim} is too small for the eigen projection of this model; use k ≥ 64.")
    return budget


__all__ = [
    "EigenBasis",
    "EigenProjector",
    "allocate",
    "basis_budget",
    "change_basis",
    "leading_eigh",
    "shared_dim",
]
