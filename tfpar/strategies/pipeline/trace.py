"""What `PipelineEngine` measures in each step: traces and counters.

`StepTrace` collects one step's timestamps (taken by `tfpar._clocks`
clocks on each stage's device) and byte counts per stage, the timestamps of
each action kept per model chunk (a stage holds several with the interleaved
schedule), and `StageCounters` holds the cumulative per-device totals that
`PipelineStrategy.communication_stats()` and `peak_in_flight()` read;
`StageCounters.add_step` turns a step's traces into busy time, exposed
communication, bubble, bytes and peak micro-batches in flight. With
stage replicas there is one `StepTrace` per replica group and one counter per
(stage, replica) device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from tfpar.strategies.pipeline.schedules import Schedule

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
        # Training steps `on_nonfinite="skip"` zeroed.
        self.skipped = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.calls = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.peak = tf.Variable(
            tf.zeros([num_devices], tf.int64), trainable=False, name="pipeline_peak"
        )
        # With replicas: each replica's wait at its stage's reduction for the
        # last replica, and the steps at which it was the one waited for.
        self.wait = tf.Variable(zeros, trainable=False, name="pipeline_wait")
        self.slowest = tf.Variable(
            tf.zeros([num_devices], tf.int64), trainable=False, name="pipeline_slowest"
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
                "wait",
                "slowest",
            )
        }

    def add_step(
        self,
        traces: list[StepTrace],
        *,
        schedule: Schedule,
        group_schedules: Sequence[Schedule],
        replicas: Sequence[Sequence[str]],
    ) -> None:
        """Adds one step's traces, one per replica group, inside the step.

        Args:
            traces: Replica group r's `StepTrace`, for each r.
            schedule: The schedule of the whole pipeline (all M micro-batches).
            group_schedules: Replica group r's schedule, for each r.
            replicas: Per stage, its replicas' devices.

        Example:

        ```python
        # At the end of a traced train step, after the last action:
        counters.add_step(traces, schedule=schedule,
                          group_schedules=group_schedules, replicas=replicas)
        ```
        """
        counters = self
        k, v = schedule.num_stages, schedule.chunks_per_device
        big_r = len(replicas[0])
        groups = []
        for r, trace in enumerate(traces):
            summaries = []
            for s in range(k):
                with tf.device(replicas[s][r]):  # chunk s is stage s's first
                    summaries.append(trace.summary(s))
            groups.append(summaries)
        with tf.device(counters.busy.device):
            rows = [tf.stack(summaries) for summaries in groups]

            def per_device(column: int) -> tf.Tensor:
                return tf.stack([g[:, column] for g in rows], axis=1)  # [K, R]

            ends, reduce_bytes = per_device(2), per_device(4)
            reduce_a, reduce_b = per_device(5), per_device(6)
            begin = tf.reduce_min(per_device(1))
            # The step ends when the last stage's gradient totals exist (with
            # replicas) or the last action ends.
            end = tf.maximum(tf.reduce_max(ends), tf.reduce_max(reduce_a[:, 0]))
            span = end - begin
            comm, peak = zip(
                *(
                    _group_counters(g, begin, k, v, s.num_microbatches)
                    for g, s in zip(rows, group_schedules, strict=True)
                ),
                strict=True,
            )
            comm = tf.stack(comm, axis=1)
            busy = per_device(0)
            if big_r > 1:
                # Replica 0: from the last replica's gradients being ready to
                # the stage's totals existing. Replica r > 0: its copy of the
                # weights arriving after its first action's input (or the
                # step's start). Both outside the actions and their waits
                # for a neighbour, so the bubble stays disjoint.
                gather = tf.maximum(
                    reduce_a[:, :1] - tf.reduce_max(ends, 1)[:, None], 0
                )
                broadcast = tf.maximum(
                    reduce_a[:, 1:] - tf.maximum(reduce_b[:, 1:], begin), 0.0
                )
                reduce = tf.concat([gather, broadcast], 1)
                wait, slowest = _waits(ends, busy)
                counters.wait.assign_add(tf.reshape(wait, [k * big_r]))
                counters.slowest.assign_add(tf.reshape(slowest, [k * big_r]))
            else:
                reduce = tf.zeros_like(busy)

            def flat(t: tf.Tensor) -> tf.Tensor:
                return tf.reshape(t, [k * big_r])  # device s R + r

            counters.busy.assign_add(flat(busy))
            # The bubble: waiting for a neighbour still computing, or for the
            # schedule. Each exposed wait lies between the stage's previous
            # action and the start of the action that waited, so busy and
            # exposed time never overlap and the bubble is never negative.
            counters.idle.assign_add(flat(span - busy - comm - reduce))
            counters.comm.assign_add(flat(comm))
            counters.reduce.assign_add(flat(reduce))
            counters.bytes.assign_add(tf.cast(flat(per_device(3)), tf.int64))
            counters.reduce_bytes.assign_add(tf.cast(flat(reduce_bytes), tf.int64))
            counters.steps.assign_add(1)
            m = schedule.num_microbatches
            counters.calls.assign_add(2 * m * (k * v - 1) + 2 * k * (big_r - 1))
            peak = flat(tf.stack(peak, axis=1))
            counters.peak.assign(tf.maximum(counters.peak, peak))


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


def _group_counters(
    rows: tf.Tensor, begin: tf.Tensor, k: int, v: int, m: int
) -> tuple[tf.Tensor, tf.Tensor]:
    """One replica group's exposed communication and peak in flight, per stage."""
    # [stage, record, stage's chunk, micro-batch], then, for the timestamps
    # of receiving and sending, per record the model's chunks in order:
    # chunk v of stage s is chunk v * K + s.
    records = tf.reshape(rows[:, SUMMARY_SCALARS:], [k, 8, v, m])
    per_chunk = tf.reshape(tf.transpose(records, [1, 2, 0, 3]), [8, v * k, m])
    arrived_f, arrived_b, ready_f, ready_b, free_f, free_b = tf.unstack(per_chunk[2:])
    # A stage is free for its first action from the step's start.
    free_f, free_b = tf.maximum(free_f, begin), tf.maximum(free_b, begin)
    # Exposed communication, on the receiving chunk's stage: a forward on
    # chunk c > 0 waits for chunk c - 1's activations, a backward on chunk
    # c < K V - 1 for chunk c + 1's input gradient (always on another
    # device). The stage waited from when it was free and the tensor was
    # ready on the sender until the tensor arrived; a tensor that arrived
    # before that made nobody wait, so max(0, .) is the definition, not a
    # clamp of a timing error.
    zero = tf.zeros([1], tf.float64)
    forward = _exposed(arrived_f[1:], ready_f[:-1], free_f[1:])
    backward = _exposed(arrived_b[:-1], ready_b[1:], free_b[:-1])
    comm = tf.concat([zero, forward], 0) + tf.concat([backward, zero], 0)
    comm = tf.reduce_sum(tf.reshape(comm, [v, k]), axis=0)  # per stage
    # (Chunk, micro-batch) pairs in flight on a stage when one of its
    # forwards ends: those whose forward has ended and whose backward has not.
    forward_done = tf.reshape(records[:, 0], [k, v * m])
    backward_done = tf.reshape(records[:, 1], [k, v * m])
    at = forward_done[:, :, None]
    live = (forward_done[:, None, :] <= at) & (backward_done[:, None, :] > at)
    in_flight = tf.reduce_sum(tf.cast(live, tf.int64), axis=2)
    return comm, tf.reduce_max(in_flight, 1)


def _waits(ends: tf.Tensor, busy: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Who waited at each stage's reduction, and which device they waited for.

    A stage's reduction waits for its last replica's summed gradients, ready
    when that replica's last action ends. So each replica waits from its own
    last end to the stage's latest (`ends` and `busy` are `[K, R]`: per stage,
    per replica). A slow device makes its whole replica group late (earlier
    stages wait for its backwards, later ones for its forwards), so several
    stages' late replicas are one group's; of them, the device whose busy
    time most exceeds the mean of its stage's other replicas' made the group
    late, and it alone counts the step as the one waited for.

    Returns:
        The waits, `[K, R]` seconds, and a `[K, R]` int64 one-hot of the
        device waited for.
    """
    k, big_r = ends.shape[0], ends.shape[1]
    wait = tf.reduce_max(ends, 1, keepdims=True) - ends
    late = tf.one_hot(tf.argmax(ends, 1), big_r, dtype=busy.dtype)
    late_busy = tf.reduce_sum(busy * late, 1)
    others_busy = (tf.reduce_sum(busy, 1) - late_busy) / (big_r - 1)
    culprit = tf.one_hot(tf.argmax(late_busy - others_busy), k, dtype=busy.dtype)
    return wait, tf.cast(culprit[:, None] * late, tf.int64)


def _exposed(arrived: tf.Tensor, ready: tf.Tensor, free: tf.Tensor) -> tf.Tensor:
    """Per stage, the seconds spent waiting for tensors already produced."""
    return tf.reduce_sum(tf.maximum(arrived - tf.maximum(ready, free), 0.0), axis=1)
