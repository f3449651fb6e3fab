"""Synchronous data parallel in one client: `tfpar.MirroredStrategy` and its parts.

- `strategy`: the strategy, a subclass of `tf.distribute.MirroredStrategy`.
- `multi_worker`: `MultiWorkerMirroredStrategy`, the same across processes,
  a subclass of `tf.distribute.MultiWorkerMirroredStrategy`.
- `keras_reduce`: how both answer Keras 3's own `Strategy.reduce` calls.
- `options`: `AllReduceOptions`, the validated all-reduce choices.
- `all_reduce`: `MeasuredAllReduce`, the `tf.distribute.CrossDeviceOps`
  that receives Keras's gradient all-reduce: its one reduction path.
- `codec`: how gradients travel (compression casts, packing into buckets).
- `nonfinite`: `on_nonfinite`, decided on the reduced gradients.
- `measurement`: what one reduction measured (timestamps, bytes, routing).
- `counters`: the in-graph variables that accumulate the measurements.
"""

from tfpar.strategies.mirrored.all_reduce import MeasuredAllReduce
from tfpar.strategies.mirrored.multi_worker import MultiWorkerMirroredStrategy
from tfpar.strategies.mirrored.options import AllReduceOptions
from tfpar.strategies.mirrored.strategy import MirroredStrategy

__all__ = [
    "AllReduceOptions",
    "MeasuredAllReduce",
    "MirroredStrategy",
    "MultiWorkerMirroredStrategy",
]
