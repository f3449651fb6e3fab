"""Host variables holding `MeasuredAllReduce`'s cumulative counters.

The reductions' Python runs only while a step is traced, so every count is an
`assign_add` op in the step's graph. The variables are created eagerly,
outside any strategy scope and outside Keras's tracking, so they never appear
in a saved model or a checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from tfpar.stats import CommunicationStats, DeviceCommunication

# Slots of a counter vector; float64 holds integers exactly up to 2**53.
STEPS, SECONDS, CALLS, LOGICAL, MOVED, SKIPPED = range(6)
# A replica's own vector adds its device seconds, bytes sent and busy time.
_DEVICE_SECONDS, _DEVICE_BYTES, _DEVICE_BUSY = 6, 7, 8


class AllReduceCounters:
    """Cumulative all-reduce counters: per batch reduction and per device.

    Batch reductions (one op sees every replica) add to shared variables.
    Replica-context reductions (each replica traced on its own, inside a
    `tf.cond` with gradient accumulation) add to one variable per replica:
    ops of two replicas touching one variable would be ordered one after the
    other by automatic control dependencies, and a collective waiting for the
    other replica would then never complete.

    Waits at the synchronization are counted for every replica of the group,
    this process's and other workers', in one vector per local replica.

    Args:
        devices: The replica devices, in replica order.
        group_devices: Every replica of the reduction group, in slot order.
            Defaults to `devices`.
    """

    def __init__(
        self, devices: Sequence[str], group_devices: Sequence[str] | None = None
    ) -> None:
        self._devices = tuple(devices)
        self._group = tuple(group_devices or devices)
        n, g = len(self._devices), len(self._group)
        with tf.init_scope(), tf.device("/device:CPU:0"):
            self._totals = _variable(6, "tfpar_allreduce")
            self._seconds = _variable(n, "tfpar_allreduce_devices")
            self._bytes = _variable(n, "tfpar_allreduce_device_bytes")
            self._replicas = [
                _variable(9, f"tfpar_allreduce_replica_{i}") for i in range(n)
            ]
            # Per group replica: seconds waited, then synchronizations at
            # which it was the slowest.
            self._sync = [
                _variable(2 * g, f"tfpar_allreduce_sync_{i}") for i in range(n)
            ]

    def add_batch(
        self, totals: Sequence[Any], seconds: Any | None, sent: Sequence[float]
    ) -> None:
        """Adds one batch reduction (graph ops).

        The 6 totals always; each device's seconds and bytes sent when
        `seconds` (one value per device) is known.
        """
        with tf.device("/device:CPU:0"):
            self._totals.assign_add(tf.cast(tf.stack(totals), tf.float64))
            if seconds is not None:
                self._seconds.assign_add(seconds)
                self._bytes.assign_add(tf.constant(sent, tf.float64))

    def add_skipped(self, skipped: Any) -> None:
        """Counts a skipped step only (graph op), when nothing is measured."""
        with tf.device("/device:CPU:0"):
            self._totals.assign_add(
                tf.one_hot(SKIPPED, 6, on_value=skipped, dtype=tf.float64)
            )

    def add_replica(
        self,
        replica_id: int,
        totals: Sequence[Any] | None,
        seconds: Any = 0.0,
        sent: float = 0.0,
    ) -> None:
        """Adds one replica's share of a replica-context reduction (graph ops).

        Replica 0 adds the 6 totals; every replica its own seconds and bytes.
        """
        values = list(totals) if replica_id == 0 and totals else [0.0] * 6
        with tf.device("/device:CPU:0"):
            self._replicas[replica_id].assign_add(
                tf.cast(tf.stack([*values, seconds, sent, 0.0]), tf.float64)
            )

    def add_busy(self, replica_id: int, seconds: Any) -> None:
        """Adds one step's busy time of local `replica_id` (graph op)."""
        with tf.device("/device:CPU:0"):
            self._replicas[replica_id].assign_add(
                tf.one_hot(
                    _DEVICE_BUSY,
                    9,
                    on_value=tf.cast(seconds, tf.float64),
                    dtype=tf.float64,
                )
            )

    def add_waits(self, replica_id: int, waits: Any, slowest: Any) -> None:
        """Adds one synchronization's waits, per group replica (graph ops).

        Added to local `replica_id`'s own vector: in a replica context each
        replica is traced on its own, and only one of them adds.
        """
        with tf.device("/device:CPU:0"):
            self._sync[replica_id].assign_add(tf.concat([waits, slowest], 0))

    def stats(self) -> CommunicationStats:
        """Returns the counters (one host read of each variable)."""
        replicas = np.stack([r.numpy() for r in self._replicas])
        c = self._totals.numpy() + replicas[:, :6].sum(axis=0)
        seconds = self._seconds.numpy() + replicas[:, _DEVICE_SECONDS]
        sent = self._bytes.numpy() + replicas[:, _DEVICE_BYTES]
        busy = replicas[:, _DEVICE_BUSY]
        sync = np.stack([v.numpy() for v in self._sync]).sum(axis=0)
        g = len(self._group)
        local = {
            d: (float(s), int(b), float(u))
            for d, s, b, u in zip(self._devices, seconds, sent, busy, strict=True)
        }
        devices = []
        for k, device in enumerate(self._group):
            own_seconds, own_bytes, own_busy = local.get(device, (0.0, 0, 0.0))
            devices.append(
                DeviceCommunication(
                    device=device,
                    busy_seconds=own_busy,
                    comm_seconds=own_seconds,
                    bytes_sent=own_bytes,
                    wait_seconds=float(sync[k]),
                    slowest_steps=int(sync[g + k]),
                    in_process=device in local,
                )
            )
        return CommunicationStats(
            kind="allreduce",
            steps=int(c[STEPS]),
            comm_seconds=float(c[SECONDS]),
            calls=int(c[CALLS]),
            bytes_logical=int(c[LOGICAL]),
            bytes_moved=int(c[MOVED]),
            devices=tuple(devices),
            counters=(
                "busy_seconds",
                "comm_seconds",
                "bytes_sent",
                "wait_seconds",
                "slowest_steps",
            ),
            modelled=("bytes_sent",),
        )

    def skipped_steps(self) -> int:
        """Returns how many steps were skipped."""
        return int(self._totals.numpy()[SKIPPED] + self._replicas[0].numpy()[SKIPPED])


def _variable(size: int, name: str) -> tf.Variable:
    return tf.Variable(tf.zeros([size], tf.float64), trainable=False, name=name)
