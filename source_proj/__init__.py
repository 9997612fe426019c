"""source-proj: training data attribution with SOURCE (segmented stationary unrolling) in a
random-projection engine.

Score convention everywhere: ``score(q, z) = −Δf(q, z)``; positive means training example ``z``
helps query ``q`` (removing ``z`` would lower the measurement).
"""

__version__ = "0.1.0"

from .autosegment import TrajectoryView
from .baselines import BASELINES, BaselineArguments, fit_baseline
from .durable import atomic_write_bytes
from .ensemble import Ensemble
from .errors import NumericalError, SourceProjError, StoreError, TaskError, TrajectoryError
from .factored import FactoredProjector
from .fastjl import FastJLProjector
from .featurize import FeaturizeArguments, ProjectionArguments, featurize
from .fit import FitArguments, fit
from .locking import StoreLock, store_lock
from .pipeline import attribute
from .projection import IdentityProjector, Projector, RademacherProjector
from .query import Attributor, QueryResult
from .segments import Segment, SegmentationArguments, make_segments
from .store import Store
from .task import ClassificationTask, ParameterSelection, RegressionTask, Task
from .text import LanguageModelingTask, ModuleSelection, SequenceClassificationTask, TextDataset
from .trajectory import Trajectory, TrajectoryRecorder
from .verify import VerifyReport, verify_store

__all__ = [
    "BASELINES",
    "Attributor",
    "BaselineArguments",
    "ClassificationTask",
    "Ensemble",
    "FactoredProjector",
    "FastJLProjector",
    "FeaturizeArguments",
    "FitArguments",
    "IdentityProjector",
    "LanguageModelingTask",
    "ModuleSelection",
    "NumericalError",
    "ParameterSelection",
    "ProjectionArguments",
    "Projector",
    "QueryResult",
    "RademacherProjector",
    "RegressionTask",
    "Segment",
    "SegmentationArguments",
    "SequenceClassificationTask",
    "SourceProjError",
    "Store",
    "StoreError",
    "StoreLock",
    "Task",
    "TaskError",
    "TextDataset",
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
    "store_lock",
    "verify_store",
]
