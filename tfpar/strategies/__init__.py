"""tfpar's distribution strategies, one subpackage per family.

- `mirrored`: synchronous data parallel in one client.
- `parameter_server`: asynchronous training on parameter servers.
- `pipeline`: the model cut into stages, micro-batches flowing through them.

The families share only `tfpar.devices`, `tfpar.stats` and `tfpar.errors`;
none imports another.
"""

from tfpar.errors import ClusterTaskError, StepDeadlineExceededError
from tfpar.strategies.mirrored import (
    AllReduceOptions,
    MeasuredAllReduce,
    MirroredStrategy,
)
from tfpar.strategies.parameter_server import (
    ParameterServerOptions,
    ParameterServerStrategy,
)
from tfpar.strategies.pipeline import (
    Action,
    Partition,
    PipelineOptions,
    PipelineStrategy,
    Schedule,
    Stage,
    get_schedule,
)

__all__ = [
    "Action",
    "AllReduceOptions",
    "ClusterTaskError",
    "MeasuredAllReduce",
    "MirroredStrategy",
    "ParameterServerOptions",
    "ParameterServerStrategy",
    "Partition",
    "PipelineOptions",
    "PipelineStrategy",
    "Schedule",
    "Stage",
    "StepDeadlineExceededError",
    "get_schedule",
]
