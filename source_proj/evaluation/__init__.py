"""Counterfactual evaluation of attribution scores: LDS, subset removal, further training.

Everything takes score matrices ``[Q, N]`` in the project's convention (score = −Δf, positive = z raised
the query's measurement: helped it for a margin, harmed it for a loss) and a user-supplied training function
``retrain(keep, seed) -> [Q]`` (see retrain.py; or a batched one training many copies of a small model at once,
see batched.py), so any fitted method (SOURCE, a baseline, an ensemble, Fast-SOURCE) is evaluated the same way.
"""

from source_proj.evaluation.batched import BatchedRetrain, BatchedSGD, SGDStage
from source_proj.evaluation.further_training import (
    Agreement,
    FurtherTraining,
    FurtherTrainingArguments,
    agreement,
    further_training_ground_truth,
)
from source_proj.evaluation.lds import (
    Comparison,
    Counterfactuals,
    Difference,
    LDSArguments,
    compare,
    format_comparison,
    format_table,
    lds,
    lds_difference,
    lds_ground_truth,
    paired_comparison,
    plot_lds,
    query_interval,
    sample_subsets,
    split_half_reliability,
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
from source_proj.evaluation.report import lds_report
from source_proj.evaluation.retrain import (
    BatchedRetrainFunction,
    Job,
    RetrainCache,
    RetrainFunction,
    keep_from_mask,
    run_retrains,
)

__all__ = [
    "Agreement",
    "BatchedRetrain",
    "BatchedRetrainFunction",
    "BatchedSGD",
    "Comparison",
    "Correlation",
    "Counterfactuals",
    "Difference",
    "FurtherTraining",
    "FurtherTrainingArguments",
    "Job",
    "LDSArguments",
    "RemovalArguments",
    "RemovalResult",
    "RetrainCache",
    "RetrainFunction",
    "SGDStage",
    "agreement",
    "bootstrap_ci",
    "compare",
    "correlate",
    "cosine",
    "format_comparison",
    "format_table",
    "further_training_ground_truth",
    "group_predictions",
    "keep_from_mask",
    "lds",
    "lds_difference",
    "lds_ground_truth",
    "lds_report",
    "paired_comparison",
    "plot_lds",
    "plot_removal",
    "query_interval",
    "rank",
    "run_retrains",
    "sample_subsets",
    "spearman",
    "split_half_reliability",
    "subset_removal",
]
