"""What `PipelineEngine` measures in each step: traces and counters.

`StepTrace` collects one step's timestamps (taken by `tfpar._clocks`
clocks on each stage's device) and byte counts per stage, the timestamps of
each action kept per model chunk (a stage holds several with the interleaved
schedule), and `StageCounters` holds the cumulative per-device totals that
`PipelineStrategy.communication_stats()` and `peak_in_flight()` read. With
stage replicas there is one `StepTrace` per replica group and one counter per
(stage, replica) device.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

# Scalars at the head of `StepTrace.summary`, before the per-action records.
SUMMARY_SCALARS = 7


class StageCounters:
    """Cumulative per-device counters in host variables, updated inside each step.

    One entry per device, stage-major: stage s's replica r is entry `s R + r`
    (entry s without replicas). The variables belong to the strategy, never to
    the model, so they appear in no saved model or checkpoint. Reading them is
    one small device-to-host copy.
    """

    def __init__(self, num_devices: int) -> None:
        zeros = tf.zeros([num_devices], tf.float64)
        # The gradient reduction among a stage's replicas: exposed seconds
        # and bytes sent (`PipelineStrategy.communication_stats`).
        self.reduce = tf.Variable(zeros, trainable=False, name="pipeline_reduce")
        self.reduce_bytes = tf.Variable(
            tf.zeros([num_devices], tf.int64),
            trainable=False,
            name="pipeline_reduce_bytes",
        )
        self.busy = tf.Variable(zeros, trainable=False, name="pipeline_busy")
        self.idle = tf.Variable(zeros, trainable=False, name="pipeline_idle")
        self.comm = tf.Variable(zeros, trainable=False, name="pipeline_comm")
        self.bytes = tf.Variable(
            tf.zeros([num_devices], tf.int64), trainable=False, name="pipeline_bytes"
        )
        self.steps = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.calls = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.peak = tf.Variable(
            tf.zeros([num_devices], tf.int64), trainable=False, name="pipeline_peak"
        )

    def read(self) -> dict[str, Any]:
        """Returns the counters as numpy values."""
        return {
            name: getattr(self, name).numpy()
            for name in (
                "busy",
                "idle",
                "comm",
                "bytes",
                "reduce",
                "reduce_bytes",
                "steps",
                "calls",
                "peak",
            )
        }


class StepTrace:
    """Timestamps and byte counts of one step, kept on each stage's device.

    Everything a stage records stays on its device until the end of the step,
    when it travels to the host as one vector: the counters add one small
    transfer per stage and step, not one per timestamp.
    """

    def __init__(self, num_stages: int, num_chunks: int, num_microbatches: int) -> None:
        self.num_stages = num_stages
        self.busy: list[list[tf.Tensor]] = [[] for _ in range(num_stages)]
        self.starts: list[list[tf.Tensor]] = [[] for _ in range(num_stages)]
        self.ends: list[list[tf.Tensor]] = [[] for _ in range(num_stages)]
        self.sent: list[list[tf.Tensor]] = [[] for _ in range(num_stages)]
        # [chunk][kind][microbatch]: when an action finished, when its input
        # arrived, when the tensor it sends on was ready (which can be before
        # it finished: a backward sends its input gradient before its weight
        # gradients are done), and when the stage came free for it (the end
        # of its stage's previous action; -inf for the stage's first, whose
        # free time is the step's start, known only once every stage has
        # reported).
        self.done, self.arrived, self.ready, self.free = (
            _per_action(num_chunks, num_microbatches) for _ in range(4)
        )
        # Per stage, for the reduction among replicas: [bytes sent, a, b],
        # with a when replica 0 had the totals (or replica r > 0 its weight
        # copies) and b when replica r > 0's first action had its input.
        self.reduce: list[list[Any]] = [
            [0.0, float("-inf"), float("-inf")] for _ in range(num_stages)
        ]

    def summary(self, stage: int) -> tf.Tensor:
        """Packs the stage's record into one float64 vector (on its device):

        [busy, first start, last end, bytes sent, reduction bytes sent,
        reduction a, reduction b (see `reduce`), done F, done B, arrived F,
        arrived B, ready F, ready B, free F, free B], the last eight with one
        entry per (chunk of the stage, micro-batch), chunk-major: chunk v of
        stage s is the model's chunk `v * K + s`.
        """
        scalars = [
            tf.add_n(self.busy[stage]),
            tf.reduce_min(tf.stack(self.starts[stage])),
            tf.reduce_max(tf.stack(self.ends[stage])),
            tf.cast(_total(self.sent[stage], tf.int64), tf.float64),
        ] + [tf.cast(value, tf.float64) for value in self.reduce[stage]]
        records = (self.done, self.arrived, self.ready, self.free)
        chunks = range(stage, len(self.done), self.num_stages)
        vectors = [
            tf.stack(record[chunk][kind])
            for record in records
            for kind in "FB"
            for chunk in chunks
        ]
        return tf.concat([tf.stack(scalars), *vectors], axis=0)


def _per_action(num_chunks: int, num_microbatches: int) -> list[dict[str, list[Any]]]:
    return [{k: [None] * num_microbatches for k in "FB"} for _ in range(num_chunks)]


def _total(values: list[tf.Tensor], dtype: tf.DType) -> tf.Tensor:
    return tf.add_n(values) if values else tf.constant(0, dtype)
