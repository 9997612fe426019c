"""source-proj: training data attribution with SOURCE (segmented stationary unrolling) in a
random-projection engine.

Score convention everywhere: ``score(q, z) = −Δf(q, z)``; positive means training example ``z``
helps query ``q`` (removing ``z`` would lower the measurement).
"""

__version__ = "0.1.0"

from .errors import NumericalError, SourceProjError, StoreError, TaskError, TrajectoryError  # noqa: E402
from .featurize import FeaturizeArguments, ProjectionArguments, featurize  # noqa: E402
from .fit import FitArguments, fit  # noqa: E402
from .pipeline import attribute  # noqa: E402
from .projection import IdentityProjector, Projector, RademacherProjector  # noqa: E402
from .query import Attributor, QueryResult  # noqa: E402
from .segments import Segment, make_segments  # noqa: E402
from .store import Store  # noqa: E402
from .task import ClassificationTask, ParameterSelection, RegressionTask, Task  # noqa: E402
from .trajectory import Trajectory, TrajectoryRecorder  # noqa: E402

__all__ = [
    "Attributor", "ClassificationTask", "FeaturizeArguments", "FitArguments", "IdentityProjector",
    "NumericalError", "ParameterSelection", "ProjectionArguments", "Projector", "QueryResult",
    "RademacherProjector", "RegressionTask", "Segment", "SourceProjError", "Store", "StoreError",
    "Task", "TaskError", "Trajectory", "TrajectoryError", "TrajectoryRecorder", "__version__",
    "attribute", "featurize", "fit", "make_segments",
]
