"""tfpar: multi-device training for Keras 3 on TensorFlow.

Strategies that wrap ordinary Keras models (mirrored, parameter-server,
pipeline), callbacks that show per-device utilization and communication time in
TensorBoard, and two CPU-only test beds: simulated logical devices and a local
cluster of pinned processes.
"""

from tfpar import callbacks
from tfpar._version import __version__
from tfpar.cluster import LocalCluster
from tfpar.devices import default_devices, simulate_devices
from tfpar.stats import CommunicationStats, DeviceCommunication
from tfpar.strategies.mirrored.strategy import MirroredStrategy
from tfpar.strategies.parameter_server.strategy import ParameterServerStrategy
from tfpar.strategies.pipeline.strategy import PipelineStrategy

__all__ = [
    "CommunicationStats",
    "DeviceCommunication",
    "LocalCluster",
    "MirroredStrategy",
    "ParameterServerStrategy",
    "PipelineStrategy",
    "__version__",
    "callbacks",
    "default_devices",
    "simulate_devices",
]
