"""tfpar's distribution strategies and their parts."""

from tfpar.strategies.allreduce import AllReduceOptions, MeasuredAllReduce
from tfpar.strategies.mirrored import MirroredStrategy
from tfpar.strategies.partition import Partition, Stage
from tfpar.strategies.pipeline import PipelineOptions, PipelineStrategy
from tfpar.strategies.schedules import Action, Schedule, get_schedule

__all__ = [
    "Action",
    "AllReduceOptions",
    "MeasuredAllReduce",
    "MirroredStrategy",
    "Partition",
    "PipelineOptions",
    "PipelineStrategy",
    "Schedule",
    "Stage",
    "get_schedule",
]
