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
        decomposed = []
        for a_i, b_i in zip(a, b, strict=True):
            la, qa = eigh(a_i, device)
            lb, qb = eigh(b_i, device)
            decomposed.append((la[::-1], qa[:, ::-1], lb[::-1], qb[:, ::-1]))
        blocks = allocate([d[0] for d in decomposed], [d[2] for d in decomposed], dim)
        out, inp, kept, total = [], [], 0.0, 0.0
        for (la, qa, lb, qb), (ko, ki) in zip(decomposed, blocks, strict=True):
            la, lb = np.clip(la, 0, None), np.clip(lb, 0, None)
            kept += lb[:ko].sum() * la[:ki].sum()
            total += lb.sum() * la.sum()
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


__all__ = ["EigenBasis", "EigenProjector", "allocate", "basis_budget", "change_basis", "shared_dim"]
