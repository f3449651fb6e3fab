"""Pipeline parallelism: `tfpar.PipelineStrategy` and its parts.

- `strategy`: the strategy and `PipelineOptions`.
- `partition`: what runs where, the model cut into stages.
- `cost`: per-layer cost estimates the partition balances.
- `schedules`: in what order, each device's list of actions.
- `microbatch`: how a batch is split and joined.
- `engine`: one training step, the schedule turned into a dataflow graph.
- `trace`: in-graph timestamps and byte counters of each stage.
- `memory`: what each stage's activations take, counted and modelled.
- `host_input`: the batches, read on the host through one plain iterator.
"""

from tfpar.strategies.pipeline.memory import StageMemory
from tfpar.strategies.pipeline.partition import Partition, Stage
from tfpar.strategies.pipeline.schedules import Action, Schedule, get_schedule
from tfpar.strategies.pipeline.strategy import PipelineOptions, PipelineStrategy

__all__ = [
    "Action",
    "Partition",
    "PipelineOptions",
    "PipelineStrategy",
    "Schedule",
    "Stage",
    "StageMemory",
    "get_schedule",
]
