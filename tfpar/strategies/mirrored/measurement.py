"""What `MeasuredAllReduce` measures of one reduction: time and bytes.

That Python runs only while a step is traced, so every time is a host
timestamp op under control dependencies (`tfpar._clocks`), taken when a
replica's inputs, then its outputs, all exist. Bytes are known at trace time; bytes
sent per device follow from the algorithm's routing, not from observation.
The cumulative totals live in `counters.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from tfpar.devices import canonical_device


@dataclasses.dataclass(frozen=True)
class Reduction:
    """One reduction as measured, in graph tensors and trace-time counts.

    Attributes:
        starts: Per replica seen, the host time its inputs all existed
            (empty when not measured).
        ends: Per replica seen, the host time its outputs all existed.
        calls: Tensors handed to the algorithm.
        logical_bytes: One replica's bytes before compression.
        moved_bytes: One replica's bytes as handed to the algorithm.
        skipped: A float64 scalar, 1.0 if `on_nonfinite="skip"` zeroed it.
    """

    starts: list[Any]
    ends: list[Any]
    calls: int
    logical_bytes: int
    moved_bytes: int
    skipped: Any

    def totals(self, seconds: Any) -> list[Any]:
        """The counter slots of `counters.py` for a reduction of `seconds`."""
        return [
            1.0,
            seconds,
            self.calls,
            self.logical_bytes,
            self.moved_bytes,
            self.skipped,
        ]


def ring_bytes_sent(num_replicas: int, moved: int) -> float:
    """Bytes each device sends in a ring all-reduce of `moved` bytes each."""
    return 2.0 * (num_replicas - 1) / num_replicas * moved


def routing_known(algorithm: tf.distribute.CrossDeviceOps, *, collective: bool) -> bool:
    """Whether `bytes_sent` knows how `algorithm` routes its bytes."""
    return collective or isinstance(
        algorithm, (tf.distribute.ReductionToOneDevice, tf.distribute.NcclAllReduce)
    )


def bytes_sent(
    algorithm: tf.distribute.CrossDeviceOps,
    devices: Sequence[str],
    moved: int,
    *,
    collective: bool,
    group_size: int | None = None,
) -> list[float]:
    """Bytes each replica sends in one all-reduce of `moved` bytes each.

    Known from the algorithm's routing, not observed: a ring (TensorFlow's
    collective all-reduce, NCCL) sends 2(n-1)/n of the buffer from every
    device; reduction to one device sends the whole buffer from every other
    replica and n-1 copies of the result from the destination (a destination
    that is not a replica is not counted). Other algorithms (hierarchical
    copy, user-given ones): 0, routing unknown.

    Args:
        algorithm: The `CrossDeviceOps` that moves the bytes.
        devices: The replica devices, in replica order.
        moved: One replica's bytes handed to the algorithm.
        collective: Whether `algorithm` may be TensorFlow's collective
            all-reduce, whose class is private.
        group_size: The ring's size when it spans other processes' replicas
            too (default: `len(devices)`).
    """
    n = len(devices)
    if isinstance(algorithm, tf.distribute.ReductionToOneDevice):
        target = algorithm.reduce_to_device
        names = [canonical_device(d) for d in devices]
        index = 0 if target is None else _find(canonical_device(target), names)
        return [float((n - 1) * moved if i == index else moved) for i in range(n)]
    if routing_known(algorithm, collective=collective):
        return [ring_bytes_sent(group_size or n, moved)] * n
    return [0.0] * n


def _find(name: str, names: list[str]) -> int | None:
    return names.index(name) if name in names else None
