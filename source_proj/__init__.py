"""source-proj: training data attribution with SOURCE (segmented stationary unrolling) in a
random-projection engine.

Score convention everywhere: ``score(q, z) = −Δf(q, z)``; positive means training example ``z``
helps query ``q`` (removing ``z`` would lower the measurement).
"""

__version__ = "0.1.0"

from .errors import NumericalError, SourceProjError, StoreError, TaskError, TrajectoryError
from .factored import FactoredProjector
from .fastjl import FastJLProjector
from .featurize import FeaturizeArguments, ProjectionArguments, featurize
from .fit import FitArguments, fit
from .pipeline import attribute
from .projection import IdentityProjector, Projector, RademacherProjector
from .query import Attributor, QueryResult
from .segments import Segment, make_segments
from .store import Store
from .task import ClassificationTask, ParameterSelection, RegressionTask, Task
from .trajectory import Trajectory, TrajectoryRecorder

__all__ = [
    "Attributor",
    "ClassificationTask",
    "FactoredProjector",
    "FastJLProjector",
    "FeaturizeArguments",
    "FitArguments",
    "IdentityProjector",
    "NumericalError",
    "ParameterSelection",
    "ProjectionArguments",
    "Projector",
    "QueryResult",
    "RademacherProjector",
    "RegressionTask",
    "Segment",
    "SourceProjError",
    "Store",
    "StoreError",
    "Task",
    "TaskError",
    "Trajectory",
    "TrajectoryError",
    "TrajectoryRecorder",
    "__version__",
    "attribute",
    "featurize",
    "fit",
    "make_segments",
]
