"""Building a projector from its kind, and rebuilding a store's projector from its metadata."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from source_proj.errors import StoreError, TaskError
from source_proj.projection.base import IdentityProjector, Projector, RademacherProjector
from source_proj.projection.eigen import EigenBasis, EigenProjector
from source_proj.projection.factored import FactoredProjector
from source_proj.projection.fastjl import FastJLProjector, fast_jl_available
from source_proj.projection.layers import FactoredLayer, factorable_layers

PROJECTION_KINDS = ("rademacher", "identity", "factored", "eigen", "fast_jl")
"""Every projector kind ``make_projector`` builds (and ``ProjectionArguments.kind`` accepts)."""


def make_projector(
    kind: str,
    shapes: Sequence[tuple[str, Sequence[int]]],
    dim: int | None,
    seed: int,
    *,
    model: nn.Module | None = None,
    feature_tiles: int | None = None,
    module_dims: Mapping[str, int] | None = None,
    adam_rank: int = 1,
    basis: EigenBasis | None = None,
) -> Projector:
    """Build a projector from its kind (one of ``PROJECTION_KINDS``, or ``"auto"``).

    ``"auto"`` is ``"fast_jl"`` where a CUDA GPU and fast_jl are present (and k is a multiple of
    512), else ``"rademacher"``; the store records the kind actually used. ``"factored"`` needs the
    ``model`` (its layers) and takes ``module_dims`` and ``adam_rank`` (see ``FactoredProjector``);
    ``feature_tiles`` rebuilds a recorded ``"fast_jl"`` projection. ``"eigen"`` needs the model and its
    ``basis`` (featurize estimates it from the run, ``featurize/basis.py``) and takes ``adam_rank``.
    """
    # module_dims and adam_rank on a kind that takes neither: refused by ProjectionArguments (a store holds them only
    # for the kinds that take them)
    if kind == "identity":
        return IdentityProjector(shapes)
    if dim is None:
        raise TaskError(f"The {kind!r} projection needs a dimension; pass `dim` (e.g. 1024).")
    if kind == "auto":
        kind = "fast_jl" if fast_jl_available() and dim % 512 == 0 and seed < 2**32 else "rademacher"
    if kind == "rademacher":
        return RademacherProjector(shapes, dim, seed)
    if kind == "fast_jl":
        return FastJLProjector(shapes, dim, seed, feature_tiles=feature_tiles)
    if kind == "factored":
        if model is None:
            raise TaskError("The 'factored' projection is built from the model's layers; pass the model.")
        layers, _ = factorable_layers(model, [name for name, _ in shapes])
        return FactoredProjector(shapes, layers, dim, seed, module_dims=module_dims, adam_rank=adam_rank)
    if kind == "eigen":
        if model is None or basis is None:
            raise TaskError("The 'eigen' projection is built from the model's layers and its basis; pass both.")
        layers, _ = factorable_layers(model, [name for name, _ in shapes])
        return EigenProjector(shapes, layers, dim, basis, seed, adam_rank=adam_rank)
    raise TaskError(f"Unknown projection kind {kind!r}; use one of {', '.join(PROJECTION_KINDS)} or 'auto'.")


def projector_from_meta(meta: dict[str, Any], model: nn.Module | None = None, store: Any = None) -> Projector:
    """Rebuild the store's projection from its metadata.

    A ``factored`` projection is rebuilt from the layers of ``model`` (whose hooks it needs to
    project new gradients); without a model, from the recorded layers (enough for its matrix and for
    projecting materialised gradients, e.g. to verify a store). An ``eigen`` projection also reads its
    basis from ``store``.
    """
    desc = meta["projection"]
    shapes = [(name, tuple(shape)) for name, shape in meta["params"]]
    dim, seed = desc.get("shared_dim", desc.get("dim")), desc.get("seed", 0)
    module_dims, adam_rank = dict(desc.get("module_dims") or []), desc.get("adam_rank", 1)
    projector: Projector
    if desc["kind"] == "eigen":
        if store is None:
            raise StoreError("An 'eigen' projection is rebuilt from its store's basis; pass the store.")
        basis = EigenBasis.read(store, desc["basis"])
        layers = [FactoredLayer.from_description(layer, model) for layer in desc["layers"]]
        projector = EigenProjector(shapes, layers, desc["k"], basis, seed, adam_rank=adam_rank)
    elif desc["kind"] == "factored" and model is None:
        layers = [FactoredLayer.from_description(layer) for layer in desc["layers"]]
        projector = FactoredProjector(shapes, layers, dim, seed, module_dims=module_dims, adam_rank=adam_rank)
    else:
        projector = make_projector(
            desc["kind"],
            shapes,
            dim,
            seed,
            model=model,
            feature_tiles=desc.get("feature_tiles"),
            module_dims=module_dims,
            adam_rank=adam_rank,
        )
    if projector.describe() != desc:
        raise StoreError(
            f"The store's projection {desc} cannot be rebuilt by this library version (got {projector.describe()}); "
            "re-create the store with featurize --force."
        )
    return projector
