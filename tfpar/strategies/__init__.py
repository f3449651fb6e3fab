"""tfpar's distribution strategies and their parts."""

from tfpar.strategies.allreduce import AllReduceOptions, MeasuredAllReduce
from tfpar.strategies.mirrored import MirroredStrategy
from tfpar.strategies.parameter_server import (
    ParameterServerOptions,
    ParameterServerStrategy,
)
from tfpar.strategies.partition import Partition, Stage
from tfpar.strategies.pipeline import PipelineOptions, PipelineStrategy
from tfpar.strategies.ps_watchdog import ClusterTaskError, StepDeadlineExceededError
from tfpar.strategies.schedules import Action, Schedule, get_schedule

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
