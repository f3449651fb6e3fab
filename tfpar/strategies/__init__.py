"""tfpar's distribution strategies, one subpackage per family.

- `mirrored`: synchronous data parallel, in one client or across processes.
- `parameter_server`: asynchronous training on parameter servers.
- `pipeline`: the model cut into stages, micro-batches flowing through them.

The families share only `tfpar.devices`, `tfpar.stats` and `tfpar.errors`;
none imports another. Each is imported on first use of one of its names
(`tfpar/_lazy.py`), so one whose private internals an upgrade broke leaves
the others working.
"""

from typing import TYPE_CHECKING, Any

from tfpar import _lazy
from tfpar.errors import ClusterTaskError, StepDeadlineExceededError

if TYPE_CHECKING:
    from tfpar.strategies.mirrored import (
        AllReduceOptions,
        MeasuredAllReduce,
        MirroredStrategy,
        MultiWorkerMirroredStrategy,
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

_MIRRORED = "tfpar.strategies.mirrored"
_PARAMETER_SERVER = "tfpar.strategies.parameter_server"
_PIPELINE = "tfpar.strategies.pipeline"
_MODULES = {
    "AllReduceOptions": _MIRRORED,
    "MeasuredAllReduce": _MIRRORED,
    "MirroredStrategy": _MIRRORED,
    "MultiWorkerMirroredStrategy": _MIRRORED,
    "ParameterServerOptions": _PARAMETER_SERVER,
    "ParameterServerStrategy": _PARAMETER_SERVER,
    "Action": _PIPELINE,
    "Partition": _PIPELINE,
    "PipelineOptions": _PIPELINE,
    "PipelineStrategy": _PIPELINE,
    "Schedule": _PIPELINE,
    "Stage": _PIPELINE,
    "get_schedule": _PIPELINE,
}


def __getattr__(name: str) -> Any:
    return _lazy.load(__name__, name, _MODULES)


__all__ = [
    "Action",
    "AllReduceOptions",
    "ClusterTaskError",
    "MeasuredAllReduce",
    "MirroredStrategy",
    "MultiWorkerMirroredStrategy",
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
