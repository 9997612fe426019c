"""Counterfactual evaluation of attribution scores: LDS, subset removal, further training.

Everything takes score matrices ``[Q, N]`` in the project's convention (score = −Δf, positive =
helpful) and a user-supplied training function ``retrain(keep, seed) -> [Q]`` (see retrain.py), so
any fitted method (SOURCE, a baseline, an ensemble, Fast-SOURCE) is evaluated the same way.
"""

from source_proj.evaluation.further_training import (
    Agreement,
    FurtherTraining,
    FurtherTrainingArguments,
    agreement,
    further_training_ground_truth,
)
from source_proj.evaluation.lds import (
    Counterfactuals,
    LDSArguments,
    compare,
    format_table,
    lds,
    lds_ground_truth,
    plot_lds,
    sample_subsets,
)
from source_proj.evaluation.metrics import (
    Correlation,
    bootstrap_ci,
    correlate,
    cosine,
    group_predictions,
    rank,
    spearman,
)
from source_proj.evaluation.removal import RemovalArguments, RemovalResult, plot_removal, subset_removal
from source_proj.evaluation.retrain import Job, RetrainCache, RetrainFunction, keep_from_mask, run_retrains

__all__ = [
    "Agreement",
    "Correlation",
    "Counterfactuals",
    "FurtherTraining",
    "FurtherTrainingArguments",
    "Job",
    "LDSArguments",
    "RemovalArguments",
    "RemovalResult",
    "RetrainCache",
    "RetrainFunction",
    "agreement",
    "bootstrap_ci",
    "compare",
    "correlate",
    "cosine",
    "format_table",
    "further_training_ground_truth",
    "group_predictions",
    "keep_from_mask",
    "lds",
    "lds_ground_truth",
    "plot_lds",
    "plot_removal",
    "rank",
    "run_retrains",
    "sample_subsets",
    "spearman",
    "subset_removal",
]
