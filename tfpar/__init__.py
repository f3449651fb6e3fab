"""tfpar: multi-device training for Keras 3 on TensorFlow.

Strategies that wrap ordinary Keras models (mirrored, parameter-server,
pipeline), callbacks that show per-device utilization and communication time in
TensorBoard, and two CPU-only test beds: simulated logical devices and a local
cluster of pinned processes.

The strategies are imported on first use (`tfpar/_lazy.py`): each relies on
private TensorFlow internals, and one that an upgrade broke must not stop
`import tfpar` or the other strategies.
"""

from typing import TYPE_CHECKING, Any

from tfpar import _lazy, callbacks
from tfpar._version import __version__
from tfpar.cluster import LocalCluster
from tfpar.devices import default_devices, simulate_devices
from tfpar.errors import ClusterTaskError, StepDeadlineExceededError
from tfpar.stats import CommunicationStats, DeviceCommunication

if TYPE_CHECKING:
    from tfpar.strategies.mirrored import (
        MirroredStrategy,
        MultiWorkerMirroredStrategy,
    )
    from tfpar.strategies.parameter_server import ParameterServerStrategy
    from tfpar.strategies.pipeline import PipelineStrategy

_STRATEGIES = {
    "MirroredStrategy": "tfpar.strategies.mirrored",
    "MultiWorkerMirroredStrategy": "tfpar.strategies.mirrored",
    "ParameterServerStrategy": "tfpar.strategies.parameter_server",
    "PipelineStrategy": "tfpar.strategies.pipeline",
}


def __getattr__(name: str) -> Any:
    return _lazy.load(__name__, name, _STRATEGIES)


__all__ = [
    "ClusterTaskError",
    "CommunicationStats",
    "DeviceCommunication",
    "LocalCluster",
    "MirroredStrategy",
    "MultiWorkerMirroredStrategy",
    "ParameterServerStrategy",
    "PipelineStrategy",
    "StepDeadlineExceededError",
    "__version__",
    "callbacks",
    "default_devices",
    "simulate_devices",
]
