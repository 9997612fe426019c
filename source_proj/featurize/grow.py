"""Growing a store: a run that trained further (more checkpoints, a longer last stage, new stages — and
with them new training examples) is added to its existing store, computing only what is new.

A store may grow into a run whose first steps *are* the store's run: cut the new run after the
store's last step (``Trajectory.truncated``) and it has the store's fingerprint (learning rates,
stages, every checkpoint's sha256). Then featurize's plan (``plan.py``) finds the old work units
complete and computes the new ones only: the new checkpoints on their stages, and the new final
checkpoint on every stage. In-run capture grows its store the same way when its recorder resumes a
finished run (``capture.py``).

What a growth changes is recorded in the store's metadata (``meta["growth"]``: the checkpoints and
fingerprint before, the fitted methods dropped), so provenance names every run a store has held;
the work the store had finished before is trusted as it is (resuming writers re-check only the
chunks written since, see ``finished_before_growth``), and kept where featurize stopped on a gradient that was not
finite in the growth's work and the data were fixed only where that earlier work did not read them (a new stage's):
the growth alone starts afresh (``featurize._Featurize._after_stop``);
fitted methods depend on the whole trajectory (its segments, its final checkpoint), so they are
dropped and must be fitted again. A stage's own dataset cannot grow (the recorder fixes its size):
new examples enter through a new stage.
"""

from __future__ import annotations

from typing import Any

from source_proj.featurize.arguments import checkpoint_stages
from source_proj.featurize.windows import is_preconditioned_stage
from source_proj.store.store import Store, ckpt_key
from source_proj.trajectory.recorder import Trajectory


def growth_refusal(meta: dict[str, Any], trajectory: Trajectory) -> str | None:
    """Why the store described by ``meta`` cannot grow into ``trajectory`` (``None``: it can)."""
    if meta.get("segmentation"):
        return (
            f"its features were computed for the segmentation recorded with them ({_segmented_by(meta)}), which the "
            "longer run changes"
        )
    old = meta["trajectory"]
    steps = max(s["end_step"] for s in old["stages"])
    if trajectory.num_steps < steps:
        return f"the run has {trajectory.num_steps} steps, fewer than the store's {steps}"
    if trajectory.truncated(steps).fingerprint() != old["fingerprint"]:
        return (
            f"its first {steps} steps are not the store's run (other learning rates, stages, or checkpoint files)"
        )
    return None


def _segmented_by(meta: dict[str, Any]) -> str:
    """What tied a store's features to its recorded segmentation, in words (``plan.py``)."""
    if (meta.get("products") or {}).get("segment_means"):
        return "Fast-SOURCE's, at each segment's averaged parameters"
    if any(is_preconditioned_stage(stage) for stage in meta["trajectory"]["stages"]):
        return "scaled by each segment's preconditioner: an Adam stage, or parameter groups at different learning rates"
    return "the segments featurize was given"


def record_growth(store: Store, rewound_to: int | None = None) -> None:
    """Note the store's current run in its growth history and drop its fitted methods (before it grows);
    ``rewound_to``: the run was rewound to its checkpoint at that step (``TrajectoryRecorder.resume(at_step=)``), and
    the store kept only what came before it."""
    meta = store.meta
    methods = sorted(meta.get("methods") or {})
    history = meta.get("growth") or []
    if history and (history[-1]["fingerprint"], history[-1]["checkpoints"]) == (
        meta["trajectory"]["fingerprint"], meta["trajectory"]["checkpoints"]
    ):  # a growth noted, then cut short before the store took the grown run: this one goes on with it
        for method in methods:
            store.delete(f"methods/{method}")
        store.update_meta(methods={})
        return
    entry = {
        "checkpoints": meta["trajectory"]["checkpoints"],
        "fingerprint": meta["trajectory"]["fingerprint"],
        "dropped_methods": methods,
        "finished": bool(meta.get("featurized") or meta.get("captured")),
        **({} if rewound_to is None else {"rewound_to": rewound_to}),
    }
    for method in methods:
        store.delete(f"methods/{method}")
    store.update_meta(growth=[*meta.get("growth", []), entry], methods={})


def finished_before_growth(meta: dict[str, Any], trajectory: Trajectory) -> set[tuple[str, str]]:
    """``(stage, checkpoint key)`` of the work units the store had finished (and made durable) before its latest
    growth: writers resuming the growth do not re-check their chunks, so growing reads only what is new.
    ``trajectory`` is the grown run; its first steps are the store's old run, whose checkpoints were featurized
    on that run's stages (``checkpoint_stages``). A new stage that starts at the old final checkpoint needs that
    checkpoint on its own data too: that unit is new."""
    growth = meta.get("growth") or []
    if not growth or not growth[-1].get("finished"):
        return set()
    old = trajectory.truncated(max(growth[-1]["checkpoints"]))
    return {(stage, ckpt_key(c.step)) for c in old.checkpoints for stage in checkpoint_stages(old, c)}
