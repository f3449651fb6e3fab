"""What `PipelineEngine` measures in each step: stage clocks, traces, counters.

`StageClock` takes timestamps on a stage's device, `StepTrace` collects one
step's timestamps and byte counts per stage, and `StageCounters` holds the
cumulative per-stage totals that `PipelineStrategy.communication_stats()` and
`peak_in_flight()` read.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf


class StageCounters:
    """Cumulative per-stage counters in host variables, updated inside each step.

    The variables belong to the strategy, never to the model, so they appear in
    no saved model or checkpoint. Reading them is one small device-to-host copy.
    """

    def __init__(self, num_stages: int) -> None:
        zeros = tf.zeros([num_stages], tf.float64)
        self.busy = tf.Variable(zeros, trainable=False, name="pipeline_busy")
        self.idle = tf.Variable(zeros, trainable=False, name="pipeline_idle")
        self.comm = tf.Variable(zeros, trainable=False, name="pipeline_comm")
        self.bytes = tf.Variable(
            tf.zeros([num_stages], tf.int64), trainable=False, name="pipeline_bytes"
        )
        self.steps = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.calls = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.peak = tf.Variable(
            tf.zeros([num_stages], tf.int64), trainable=False, name="pipeline_peak"
        )

    def read(self) -> dict[str, Any]:
        """Returns the counters as numpy values."""
        return {
            name: getattr(self, name).numpy()
            for name in ("busy", "idle", "comm", "bytes", "steps", "calls", "peak")
        }


class StageClock:
    """`tf.timestamp()` on one stage's device, left out of tf.function's
    program-order chain of stateful ops.

    tf.function's automatic control dependencies run every stateful op that
    takes no resource (`tf.timestamp()` is one) in program order, across
    devices: the stages' timestamps became one chain that made each worker
    wait for the other at every action (two workers ran 0.70x of one; 1.18x
    without the chain, `docs/pipeline.md`). An op that takes a resource is
    ordered only against writes to that resource, so each timestamp is taken
    in a small function reading a variable of the stage's own that nothing
    writes. Create it eagerly.

    Args:
        device: The stage's device.
    """

    def __init__(self, device: str) -> None:
        with tf.init_scope(), tf.device(device):
            self._anchor = tf.Variable(0.0, trainable=False, name="pipeline_clock")
        self._now = tf.function(self._timestamp, autograph=False)

    def _timestamp(self) -> tf.Tensor:
        return tf.timestamp() + tf.cast(0.0 * self._anchor, tf.float64)

    def __call__(self) -> tf.Tensor:
        """Returns the time in seconds, as `tf.timestamp()`."""
        return self._now()


class StepTrace:
    """Timestamps and byte counts of one step, kept on each stage's device.

    Everything a stage records stays on its device until the end of the step,
    when it travels to the host as one vector: the counters add one small
    transfer per stage and step, not one per timestamp.
    """

    def __init__(self, num_stages: int, num_microbatches: int) -> None:
        self.busy: list[list[tf.Tensor]] = [[] for _ in range(num_stages)]
        self.starts: list[list[tf.Tensor]] = [[] for _ in range(num_stages)]
        self.ends: list[list[tf.Tensor]] = [[] for _ in range(num_stages)]
        self.sent: list[list[tf.Tensor]] = [[] for _ in range(num_stages)]
        # [stage][kind][microbatch]: when an action finished, when its input
        # arrived, when the tensor it sends on was ready (which can be before
        # it finished: a backward sends its input gradient before its weight
        # gradients are done).
        self.done: list[dict[str, list[Any]]] = [
            {k: [None] * num_microbatches for k in "FB"} for _ in range(num_stages)
        ]
        self.arrived: list[dict[str, list[Any]]] = [
            {k: [None] * num_microbatches for k in "FB"} for _ in range(num_stages)
        ]
        self.ready: list[dict[str, list[Any]]] = [
            {k: [None] * num_microbatches for k in "FB"} for _ in range(num_stages)
        ]

    def summary(self, stage: int) -> tf.Tensor:
        """Packs the stage's record into one float64 vector (on its device):

        [busy, first start, last end, bytes sent, done F, done B, arrived F,
        arrived B, ready F, ready B], the last six with one entry per
        micro-batch.
        """
        scalars = [
            tf.add_n(self.busy[stage]),
            tf.reduce_min(tf.stack(self.starts[stage])),
            tf.reduce_max(tf.stack(self.ends[stage])),
            tf.cast(_total(self.sent[stage], tf.int64), tf.float64),
        ]
        vectors = [
            tf.stack(record[kind])
            for record in (self.done[stage], self.arrived[stage], self.ready[stage])
            for kind in "FB"
        ]
        return tf.concat([tf.stack(scalars), *vectors], axis=0)


def _total(values: list[tf.Tensor], dtype: tf.DType) -> tf.Tensor:
    return tf.add_n(values) if values else tf.constant(0, dtype)
