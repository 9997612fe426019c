"""source-proj: training data attribution with SOURCE (segmented stationary unrolling) in a
projection engine (onto each layer's Kronecker-factor eigenvectors by default, or random).

Score convention everywhere: ``score(q, z) = −Δf(q, z)``; positive means training example ``z`` raised
query ``q``'s measurement (removing ``z`` would lower it): it helped ``q`` where the measurement is a margin
(classification) and harmed it where it is a loss or an error (language modelling, seq2seq, regression; the task's
``positive_helps`` is False there). Query results carry that meaning (``QueryResult.positive_helps``).
"""

__version__ = "0.1.0"

from source_proj.errors import NumericalError, SourceProjError, StoreError, TaskError, TrajectoryError
from source_proj.featurize.arguments import FeaturizeArguments, ProjectionArguments
from source_proj.featurize.capture import CaptureArguments, GradientCapture, IndexedDataset
from source_proj.featurize.featurize import featurize
from source_proj.methods.baselines import BASELINES, BaselineArguments, fit_baseline
from source_proj.methods.fit import FitArguments, fit
from source_proj.pipeline import attribute
from source_proj.projection.base import IdentityProjector, Projector, RademacherProjector
from source_proj.projection.eigen import EigenBasis, EigenProjector
from source_proj.projection.factored import FactoredProjector
from source_proj.projection.fastjl import FastJLProjector
from source_proj.query.attributor import Attributor, QueryResult
from source_proj.query.ensemble import Ensemble
from source_proj.query.per_token import TokenScores, single_token_query, token_scores
from source_proj.query.topk import IVFArguments
from source_proj.store.durable import atomic_write_bytes
from source_proj.store.locking import StoreLock
from source_proj.store.store import Store
from source_proj.store.verify import VerifyReport, verify_store
from source_proj.store.writing import store_lock
from source_proj.tasks.data import CollatedDataset
from source_proj.tasks.draws import FisherDraws
from source_proj.tasks.task import (
    ClassificationTask,
    MultiLabelClassificationTask,
    ParameterSelection,
    RegressionTask,
    Task,
)
from source_proj.tasks.text import (
    LanguageModelingTask,
    ModuleSelection,
    Seq2SeqTask,
    SequenceClassificationTask,
    TextDataset,
    TokenClassificationTask,
)
from source_proj.trajectory.autosegment import TrajectoryView
from source_proj.trajectory.recorder import Trajectory, TrajectoryRecorder
from source_proj.trajectory.segments import Segment, SegmentationArguments, make_segments

__all__ = [
    "BASELINES",
    "Attributor",
    "BaselineArguments",
    "CaptureArguments",
    "ClassificationTask",
    "CollatedDataset",
    "EigenBasis",
    "EigenProjector",
    "Ensemble",
    "FactoredProjector",
    "FastJLProjector",
    "FeaturizeArguments",
    "FisherDraws",
    "FitArguments",
    "GradientCapture",
    "IVFArguments",
    "IdentityProjector",
    "IndexedDataset",
    "LanguageModelingTask",
    "ModuleSelection",
    "MultiLabelClassificationTask",
    "NumericalError",
    "ParameterSelection",
    "ProjectionArguments",
    "Projector",
    "QueryResult",
    "RademacherProjector",
    "RegressionTask",
    "Segment",
    "SegmentationArguments",
    "Seq2SeqTask",
    "SequenceClassificationTask",
    "SourceProjError",
    "Store",
    "StoreError",
    "StoreLock",
    "Task",
    "TaskError",
    "TextDataset",
    "TokenClassificationTask",
    "TokenScores",
    "Trajectory",
    "TrajectoryError",
    "TrajectoryRecorder",
    "TrajectoryView",
    "VerifyReport",
    "__version__",
    "atomic_write_bytes",
    "attribute",
    "featurize",
    "fit",
    "fit_baseline",
    "make_segments",
    "single_token_query",
    "store_lock",
    "token_scores",
    "verify_store",
]
