"""A readable summary of what a store holds and how far each step got."""

from __future__ import annotations

from typing import Any

import numpy as np

from source_proj.store.store import Store, ckpt_key, key_step


def store_summary(store: Store) -> dict[str, Any]:
    """What produced the store, its progress, and its fitted methods (JSON-serialisable)."""
    meta = store.meta
    traj = meta["trajectory"]
    captured = meta.get("capture") is not None
    if captured:
        names = store.progress_arrays("capture/grads/")
    else:
        names = [f"grads/{s['name']}/{ckpt_key(step)}" for step in traj["checkpoints"] for s in traj["stages"]]
    chunks_done = chunks_total = 0
    for name in names:
        if store.has(name):
            arr = store.array(name)
            total = -(-arr.shape[0] // arr.chunks[0])
            chunks_total += total
            chunks_done += total - len(store.pending_chunks(name))
    methods = {}
    for name, method in (meta.get("methods") or {}).items():
        methods[name] = {
            "kind": method["kind"],
            "complete": method["complete"],
            "stages": method["stages"],
            "settings": _settings(method),
            "segments": [
                {**s, "time": s["mean_lr"] * (s["end_step"] - s["start_step"]), "averages": own}
                for s, own in zip(method.get("segments", []), segment_points(method), strict=True)
            ],
        }
    segmentation = (meta.get("segmentation") or {}).get("arguments")
    products = meta.get("products") or {}
    return {
        "path": store.path,
        "library_version": meta["library_version"],
        "parameters": int(sum(np.prod(shape) for _, shape in meta["params"])),
        "parameter_tensors": len(meta["params"]),
        "projection": meta["projection"],
        "basis_arguments": meta.get("basis_arguments"),  # the eigen basis's arguments as given (featurize records them)
        "task": meta["task"]["name"],
        "features": ("captured during training" if captured else "featurized from checkpoints")
        + ("" if meta.get("captured", True) else " (capture unfinished)")
        + _end_passes(meta),
        "growth": meta.get("growth", []),
        "trajectory": {
            "path": traj["path"],
            "fingerprint": (traj["fingerprint"] or "(unfinished)")[:16],
            "stages": [{k: s[k] for k in ("name", "start_step", "end_step", "dataset_size")} for s in traj["stages"]],
            "checkpoints": traj["checkpoints"],
        },
        "fisher": meta["featurize"]["fisher"] + _fisher_share(meta),
        "segmentation": segmentation or None,
        "segment_means": bool(products.get("segment_means")),
        "checkpoint_features": bool(products.get("checkpoints", True)),
        "featurized_chunks": f"{chunks_done}/{chunks_total}",
        "spec": meta.get("spec"),
        "methods": methods,
    }


def segment_points(method: dict[str, Any]) -> list[list[tuple[int, float]] | None]:
    """Per segment of a fitted SOURCE ``method`` (its description in the store's metadata), the checkpoints its
    features average as ``(step, weight)``: the gradients' (SOURCE, ``points``; a segment's closing checkpoint too
    where it averages its steps) or the parameters' (Fast-SOURCE, ``means``). ``None`` for a segment of a method
    fitted before the weights were recorded (the plain mean of its own checkpoints) and of the baselines."""
    segments = method.get("segments", [])
    if method.get("means"):
        return [[(int(step), float(weight)) for step, weight in own] for own in method["means"]]
    if method.get("points"):
        return [[(key_step(key), float(weight)) for key, weight in own] for own in method["points"]]
    return [None] * len(segments)


def _settings(method: dict[str, Any]) -> dict[str, Any]:
    """What a fitted method was fitted with beyond its segments: SOURCE's curvature, damping factor (λ = weight
    decay + factor × mean eigenvalue) and segment average (``FitArguments.average``; a method fitted before it was
    recorded took the plain mean of the checkpoints), a baseline's arguments as given."""
    if method["kind"] in ("source", "fast-source"):
        settings = {"curvature": method.get("curvature"), "damping_factor": method.get("damping_factor")}
        legacy = "points" not in method and "features" not in method
        average = method.get("average") or ("checkpoints" if legacy else None)
        return {**settings, "average": average} if average else settings
    arguments = method.get("arguments") or {}
    fields = _BASELINE_SETTINGS.get(method["kind"], ())
    return {k: arguments[k] for k in fields if arguments.get(k) is not None}


_BASELINE_SETTINGS = {
    "if": ("damping_factor", "damping", "rcond", "curvature_stages"),
    "trak": ("trak_dim", "rcond", "curvature_stages"),
}
"""The arguments of ``BaselineArguments`` each baseline reads (the others read none)."""


def _fisher_share(meta: dict[str, Any]) -> str:
    """``", of about 2048 examples a stage"`` where featurize took the Fisher of a share (``fisher_examples``)."""
    examples = meta["featurize"].get("fisher_examples")
    return "" if examples is None else f", of about {examples} examples a stage (whole batches of each row chunk)"


def _end_passes(meta: dict[str, Any]) -> str:
    """``", end pass at main step 12, …"``: where a captured store's end passes took their gradients (each closes
    the window it is kept with, ``CaptureArguments.end_pass``); a finished capture that took none by default says
    so; otherwise empty."""
    steps = meta["trajectory"]["checkpoints"]
    where = []
    for key in meta.get("capture_ends") or []:
        stage, _, start = key.rpartition("/")
        after = [c for c in steps if c > int(start)]
        where.append(f"{stage} step {after[0] if after else start}")
    if where:
        return f", end pass at {', '.join(where)}"
    if (meta.get("capture") or {}).get("end_pass") == "auto" and meta.get("captured"):
        return ", no end pass (end_pass='auto' takes it where datasets= holds the stage's examples)"
    return ""
