"""Every public argument object refuses a bad field when it is built, in one sentence naming the field, the value and
what is allowed (not later, in the run it configures, nor as a raw TypeError); so do the small evaluation helpers."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import source_proj as sp
import source_proj.evaluation as ev
from source_proj.errors import SourceProjError

WHOLE = "pass a whole number ≥ {}."
SEEDS = "pass a non-empty tuple of whole numbers ≥ 0."


def _refusal(build: Any, error: type[SourceProjError] = sp.TaskError) -> str:
    with pytest.raises(error) as err:
        build()
    return str(err.value)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"kind": "gauss"}, "ProjectionArguments.kind is 'gauss'; use one of rademacher, identity, factored, eigen, "
                            "fast_jl, auto."),
        ({"adam_rank": 0}, "ProjectionArguments.adam_rank is 0; " + WHOLE.format(1)),
        ({"dim": 64.0}, "ProjectionArguments.dim is 64.0; " + WHOLE.format(1)),
        ({"kind": "factored", "module_dims": {"fc*": 0}}, "ProjectionArguments.module_dims['fc*'] is 0; "
                                                          + WHOLE.format(1)),
        ({"kind": "factored", "module_dims": [("fc*", 8)]}, "ProjectionArguments.module_dims is [('fc*', 8)]; pass a "
                                                            "dict of module-name patterns to dimensions, e.g. "
                                                            "{'fc*': 64}."),
        ({"module_dims": {"fc*": 8}}, "ProjectionArguments.module_dims sets the 'factored' projection's per-layer "
                                      "blocks; kind='eigen' shares k between the layers itself, so drop it (or use "
                                      "kind='factored')."),
        ({"kind": "auto", "module_dims": {"fc*": 8}}, "ProjectionArguments.module_dims sets the 'factored' "
                                                      "projection's per-layer blocks; kind='auto' has no per-layer "
                                                      "blocks, so drop it (or use kind='factored')."),
        ({"kind": "rademacher", "adam_rank": 2}, "ProjectionArguments.adam_rank sets the rank of the per-layer "
                                                 "projections' Adam scaling; kind='rademacher' has no layers (the "
                                                 "dense one scales exactly), so drop it (or use kind='eigen')."),
        ({"kind": "rademacher", "basis_checkpoints": 2}, "ProjectionArguments.basis_checkpoints sets the eigen "
                                                         "projection's basis; kind='rademacher' has none, so drop it "
                                                         "(or use kind='eigen')."),
    ],
)
def test_projection_arguments_refuse_bad_fields(fields: dict, expected: str) -> None:
    assert _refusal(lambda: sp.ProjectionArguments(**fields)) == expected


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"fisher": "true"}, "FeaturizeArguments.fisher is 'true'; use one of sampled, exact, empirical."),
        ({"precision": "fp16"}, "FeaturizeArguments.precision is 'fp16'; use one of fp32, bf16."),
        ({"curvature": "ekfac"}, "FeaturizeArguments.curvature is 'ekfac'; use one of auto, kfac, projected, both."),
        ({"shard_chunks": 0}, "FeaturizeArguments.shard_chunks is 0; " + WHOLE.format(1)),
        ({"batch_size": True}, "FeaturizeArguments.batch_size is True; " + WHOLE.format(1)),
        ({"checkpoints": "no"}, "FeaturizeArguments.checkpoints is 'no'; use one of True, False."),
        ({"checkpoint_steps": (1.5,)}, "FeaturizeArguments.checkpoint_steps is (1.5,); " + SEEDS),
        ({"segmentation": "3"}, "The FeaturizeArguments.segmentation given is a str, not a SegmentationArguments; "
                                "pass SegmentationArguments.parse('3') or None."),
    ],
)
def test_featurize_arguments_refuse_bad_fields(fields: dict, expected: str) -> None:
    assert _refusal(lambda: sp.FeaturizeArguments(**fields)) == expected


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"per_stage": 0}, "SegmentationArguments.per_stage is 0; " + WHOLE.format(1)),
        ({"per_stage": 2.0}, "SegmentationArguments.per_stage is 2.0; " + WHOLE.format(1)),
        ({"auto": -1}, "SegmentationArguments.auto is -1; " + WHOLE.format(0)),
        ({"probe_rows": 0}, "SegmentationArguments.probe_rows is 0; " + WHOLE.format(1)),
        ({"boundaries": (1.5,)}, "SegmentationArguments.boundaries is (1.5,); " + SEEDS),
    ],
)
def test_segmentation_arguments_refuse_bad_fields(fields: dict, expected: str) -> None:
    assert _refusal(lambda: sp.SegmentationArguments(**fields), sp.TrajectoryError) == expected


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"seed": -1}, "IVFArguments.seed is -1; " + WHOLE.format(0)),
        ({"fp16": 1}, "IVFArguments.fp16 is 1; use one of True, False."),
    ],
)
def test_ivf_arguments_refuse_bad_fields(fields: dict, expected: str) -> None:
    assert _refusal(lambda: sp.IVFArguments(**fields)) == expected


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"segments_per_stage": 0}, "FitArguments.segments_per_stage is 0; " + WHOLE.format(1)),
        ({"auto_segments": -2}, "FitArguments.auto_segments is -2; " + WHOLE.format(0)),
        ({"curvature": "ekfac"}, "FitArguments.curvature is 'ekfac'; use one of kfac, projected."),
        ({"damping_factor": True}, "FitArguments.damping_factor is True; pass a finite number ≥ 0."),
        ({"stages": "main"}, "FitArguments.stages is 'main'; pass a non-empty tuple of names, e.g. ('main',)."),
        ({"fast": "yes"}, "FitArguments.fast is 'yes'; use one of True, False."),
        ({"boundaries": (-1,)}, "FitArguments.boundaries is (-1,); " + SEEDS),  # not SegmentationArguments', at fit
        ({"boundaries": ()}, "FitArguments.boundaries is (); " + SEEDS),
        ({"average": "mean"}, "FitArguments.average is 'mean'; use one of steps, checkpoints."),
        ({"fast": True, "average": "checkpoints"}, "FitArguments.average is 'checkpoints', which Fast-SOURCE does "
                                                   "not take: featurize computed its features at each segment's "
                                                   "step-averaged parameters; drop it, or fit SOURCE (without "
                                                   "fast=True)."),
        # two ways to segment: one silently won (auto over boundaries over segments_per_stage)
        (
            {"segments_per_stage": 2, "boundaries": (100,)},
            "FitArguments gives segments_per_stage and boundaries, each a way to segment the run; give one of them.",
        ),
        (
            {"boundaries": (100,), "auto_segments": 3},
            "FitArguments gives boundaries and auto_segments, each a way to segment the run; give one of them.",
        ),
    ],
)
def test_fit_arguments_refuse_bad_fields(fields: dict, expected: str) -> None:
    assert _refusal(lambda: sp.FitArguments(**fields)) == expected


def test_fit_arguments_take_any_iterable_of_boundary_steps() -> None:
    assert sp.FitArguments(boundaries=np.array([4, 8])).segmentation() == sp.SegmentationArguments(boundaries=(4, 8))
    assert sp.FitArguments(boundaries=[4]).segmentation() == sp.SegmentationArguments(boundaries=(4,))


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"kind": "datamodels"}, "BaselineArguments.kind is 'datamodels'; use one of trak, if, tracin, grad-dot, "
                                 "grad-cos, repsim."),
        ({"kind": "if", "damping_factor": -1.0}, "BaselineArguments.damping_factor is -1.0; pass a finite number ≥ 0."),
        ({"kind": "if", "damping": float("nan")}, "BaselineArguments.damping is nan; pass a finite number ≥ 0."),
        ({"kind": "trak", "trak_dim": 0}, "BaselineArguments.trak_dim is 0; " + WHOLE.format(1)),
        ({"kind": "trak", "rcond": 1.0}, "BaselineArguments.rcond is 1.0; pass a number in [0, 1)."),
        ({"kind": "trak", "curvature_stages": "main"}, "BaselineArguments.curvature_stages is 'main'; pass a non-empty "
                                                       "tuple of names, e.g. ('main',)."),
    ],
)
def test_baseline_arguments_refuse_bad_fields(fields: dict, expected: str) -> None:
    assert _refusal(lambda: sp.BaselineArguments(**fields)) == expected


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"fisher": "exact"}, "CaptureArguments.fisher is 'exact'; use one of sampled, empirical."),
        ({"buffer": "disk"}, "CaptureArguments.buffer is 'disk'; use one of device, cpu."),
        ({"end_pass": 1}, "CaptureArguments.end_pass is 1; use one of True, False, auto."),
        ({"reduction": "none"}, "CaptureArguments.reduction is 'none'; use one of mean."),
        ({"fisher_every": 0}, "CaptureArguments.fisher_every is 0; " + WHOLE.format(1)),
        ({"scale_every": 1.5}, "CaptureArguments.scale_every is 1.5; " + WHOLE.format(1)),
        ({"seed": -1}, "CaptureArguments.seed is -1; " + WHOLE.format(0)),
        ({"basis_batch": 0}, "CaptureArguments.basis_batch is 0; pass a whole number ≥ 1 or 'auto'."),
        ({"basis_share": 0.0}, "CaptureArguments.basis_share is 0.0; pass a finite number > 0."),
    ],
)
def test_capture_arguments_refuse_bad_fields(fields: dict, expected: str) -> None:
    assert _refusal(lambda: sp.CaptureArguments(**fields)) == expected


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"alpha": 0}, "LDSArguments.alpha is 0; pass a number in (0, 1)."),
        ({"alpha": 1.5}, "LDSArguments.alpha is 1.5; pass a number in (0, 1)."),
        ({"num_subsets": 2}, "LDSArguments.num_subsets is 2; " + WHOLE.format(3)),
        ({"repeats": 2.0}, "LDSArguments.repeats is 2.0; " + WHOLE.format(1)),
        ({"workers": 0}, "LDSArguments.workers is 0; " + WHOLE.format(1)),
        ({"resample": "rows"}, "LDSArguments.resample is 'rows'; use one of subsets, queries, both."),
        ({"resamples": 100.0}, "LDSArguments.resamples is 100.0; " + WHOLE.format(1)),
        ({"confidence": 1.0}, "LDSArguments.confidence is 1.0; pass a number in (0, 1)."),
    ],
)
def test_lds_arguments_refuse_bad_fields(fields: dict, expected: str) -> None:
    assert _refusal(lambda: ev.LDSArguments(**fields)) == expected


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"seeds": 5}, "FurtherTrainingArguments.seeds is 5; " + SEEDS),
        ({"seeds": (0, 1.5)}, "FurtherTrainingArguments.seeds is (0, 1.5); " + SEEDS),
        ({"threads_per_worker": 0}, "FurtherTrainingArguments.threads_per_worker is 0; " + WHOLE.format(1)),
        ({"resamples": 0}, "FurtherTrainingArguments.resamples is 0; " + WHOLE.format(1)),
    ],
)
def test_further_training_arguments_refuse_bad_fields(fields: dict, expected: str) -> None:
    assert _refusal(lambda: ev.FurtherTrainingArguments(**fields)) == expected


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"ks": (20, 10)}, "RemovalArguments.ks is (20, 10); pass a non-empty tuple of increasing whole numbers ≥ 1."),
        ({"ks": (0, 10)}, "RemovalArguments.ks is (0, 10); pass a non-empty tuple of increasing whole numbers ≥ 1."),
        ({"seeds": (True,)}, "RemovalArguments.seeds is (True,); " + SEEDS),
        ({"threshold": float("inf")}, "RemovalArguments.threshold is inf; pass a finite number."),
        ({"positive_helps": "yes"}, "RemovalArguments.positive_helps is 'yes'; use one of True, False."),
        ({"workers": -1}, "RemovalArguments.workers is -1; " + WHOLE.format(1)),
    ],
)
def test_removal_arguments_refuse_bad_fields(fields: dict, expected: str) -> None:
    assert _refusal(lambda: ev.RemovalArguments(**fields)) == expected


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda: ev.spearman(np.zeros((4, 2)), np.zeros((4, 3))),
         "The arrays compared have shapes (4, 2) and (4, 3); pass two arrays of one shape."),
        (lambda: ev.cosine(np.zeros(3), np.zeros(4)),
         "The arrays compared have shapes (3,) and (4,); pass two arrays of one shape."),
        (lambda: ev.sample_subsets(10.0, 5, 0.5), "num_rows is 10.0; " + WHOLE.format(1)),
        (lambda: ev.sample_subsets(10, 2, 0.5), "num_subsets is 2; " + WHOLE.format(3)),
        (lambda: ev.sample_subsets(10, 5, "0.5"), "alpha is '0.5'; pass a number in (0, 1)."),
        (lambda: ev.bootstrap_ci(lambda idx: idx.mean(axis=1), 5, resamples=10.0),
         "resamples is 10.0; " + WHOLE.format(1)),
        (lambda: ev.bootstrap_ci(lambda idx: idx.mean(axis=1), 5, seed=-1), "seed is -1; " + WHOLE.format(0)),
        (lambda: ev.rank(np.zeros(3), axis=1), "axis is 1; pass an axis of the 1-dimensional arrays, from -1 to 0."),
        (lambda: ev.spearman(np.zeros((2, 3)), np.zeros((2, 3)), axis=0.0),
         "axis is 0.0; pass an axis of the 2-dimensional arrays, from -2 to 1."),
        (lambda: ev.run_retrains(lambda keep, seed: np.zeros(2), [], None, workers=0),  # type: ignore[arg-type]
         "workers is 0; " + WHOLE.format(1)),
    ],
)
def test_evaluation_helpers_refuse_bad_values(call: Any, expected: str) -> None:
    assert _refusal(call) == expected


def test_valid_arguments_are_still_accepted() -> None:
    """The defaults, and the values documented as allowed at each field's edge, build."""
    sp.ProjectionArguments(kind="auto")
    sp.ProjectionArguments(kind="identity", dim=0)
    sp.ProjectionArguments(kind="factored", module_dims={"fc*": 8}, adam_rank=2)
    sp.ProjectionArguments(kind="eigen", adam_rank=2)
    sp.FeaturizeArguments(fisher="exact", curvature="both", precision="bf16", shard_chunks=1)
    sp.SegmentationArguments(auto=0)
    sp.IVFArguments(fp16=True, seed=0)
    sp.FitArguments(auto_segments=0, curvature="kfac", damping_factor=0)
    sp.BaselineArguments("if", damping=0.0, rcond=0.0)
    sp.CaptureArguments(end_pass=False, basis_batch=8, basis_share=None, buffer="cpu")
    ev.LDSArguments(alpha=0.25, num_subsets=3, repeats=1, resample="queries")
    ev.FurtherTrainingArguments(seeds=[0, 1])
    ev.RemovalArguments(ks=(1,), seeds=(0,), threshold=-1, positive_helps=False)
    assert ev.sample_subsets(np.int64(10), np.int64(3), 0.5).shape == (3, 10)
    assert ev.spearman(np.arange(4.0), np.arange(4)) == pytest.approx(1.0)
