"""Who the others waited for: each replica's time from one synchronization to the next.

A replica is released by a gradient all-reduce when its results exist, and
arrives at the next one when its new gradients do. `Arrivals` measures that
interval per replica with host timestamps on the replica's own host, so it is
a duration: no clock has to agree with another machine's. Every replica
leaves a synchronization at about the same moment, so the slowest interval is
the replica the others waited for, and each replica's wait is the slowest
interval minus its own.

A reduction that sees every replica (a batch reduction in one process) has
every interval at hand. One that does not (a replica of another worker, or a
replica-context reduction) adds one slot per replica of the whole group to
the gradients' exchange: each replica writes its interval into its own slot,
so the sum holds all of them, without another collective (TensorFlow's
collective all-reduce concatenates all tensors of one reduction into one
buffer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from tfpar.strategies.mirrored.codec import is_dense_float


class Arrivals:
    """Per local replica, when the previous synchronization released it.

    Args:
        devices: This process's replica devices, in replica order.
        group_devices: Every replica of the reduction group, in slot order
            (`devices` among them). Defaults to `devices`.

    Example:

    ```python
    arrivals = Arrivals(["/device:CPU:0", "/device:CPU:1"])
    took = [arrivals.took(i, start) for i, start in enumerate(starts)]
    waits, slowest = arrivals.waits(tf.stack(took))
    ```
    """

    def __init__(
        self, devices: Sequence[str], group_devices: Sequence[str] | None = None
    ) -> None:
        self.group_devices = tuple(group_devices or devices)
        self.slots = [self.group_devices.index(d) for d in devices]
        with tf.init_scope(), tf.device("/device:CPU:0"):
            # -1: not released yet (the first reduction of the strategy).
            self._released = [
                tf.Variable(
                    tf.constant(-1.0, tf.float64),
                    trainable=False,
                    name=f"tfpar_released_{i}",
                )
                for i in range(len(devices))
            ]

    @property
    def group_size(self) -> int:
        """Replicas of the whole group."""
        return len(self.group_devices)

    def took(self, replica: int, arrived: Any) -> tf.Tensor:
        """Seconds from local `replica`'s release to `arrived`; 0 before any release."""
        with tf.device("/device:CPU:0"):
            released = self._released[replica].read_value()
            return tf.where(
                released < 0.0, tf.constant(0.0, tf.float64), arrived - released
            )

    def release(self, replica: int, at: Any) -> None:
        """Records when the current reduction released local `replica` (graph op)."""
        with tf.device("/device:CPU:0"):
            self._released[replica].assign(at)

    def slot_vector(self, replica: int, took: Any, like: Any) -> tf.Tensor:
        """Local `replica`'s interval in its own slot of a group-sized vector.

        Made in the dtype and on the device of `like`, a tensor of the
        replica's exchange, so it joins the same collective buffer.
        """
        dtype = like.dtype if is_dense_float(like) else tf.float32
        with tf.device(like.device):
            return tf.one_hot(
                self.slots[replica],
                self.group_size,
                on_value=tf.cast(took, dtype),
                dtype=dtype,
            )

    def waits(self, took: Any) -> tuple[tf.Tensor, tf.Tensor]:
        """Per group replica, its wait and whether it was the slowest.

        Args:
            took: Every group replica's interval, in slot order.

        Returns:
            Two float64 vectors: seconds each replica waited for the slowest,
            and 1.0 for the slowest replica. Both zero while any replica has
            no interval yet.
        """
        with tf.device("/device:CPU:0"):
            took = tf.cast(took, tf.float64)
            valid = tf.cast(tf.reduce_min(took) > 0.0, tf.float64)
            waits = (tf.reduce_max(took) - took) * valid
            slowest = tf.one_hot(tf.argmax(took), self.group_size, dtype=tf.float64)
            return waits, slowest * valid
