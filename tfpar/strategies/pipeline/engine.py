"""The engine of `PipelineStrategy`: builds pipelined steps and counts stage time.

`PipelineEngine` builds, inside Keras's own `tf.function`, one pipelined train,
test or predict step of a model from its partition (`partition.py`) and a
schedule (`schedules.py`): the batch is split into micro-batches
(`microbatch.py`), the forward and backward pass of every (chunk, micro-batch)
pair is created under `tf.device` of its chunk in the schedule's order, and the
actions of each stage (device) are chained with control dependencies. A chunk
is a stage's piece of the model: one per stage, or V per stage with the
interleaved schedule. `StepTrace` (`trace.py`) records the step's timestamps
and byte counts on each stage's device and `StageCounters` accumulates them
into per-stage busy time, exposed communication time (waiting for a
neighbouring chunk's tensor), bubble, bytes sent and peak micro-batches in
flight.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf
from keras import tree

from tfpar._clocks import UnorderedClock
from tfpar._compat import pipeline as compat
from tfpar._variables import backing_variable
from tfpar.strategies.pipeline import microbatch
from tfpar.strategies.pipeline.partition import Partition
from tfpar.strategies.pipeline.schedules import BACKWARD, Action, Schedule
from tfpar.strategies.pipeline.trace import StageCounters, StepTrace


class PipelineEngine:
    """Builds one pipelined train, test or predict step of a partitioned model.

    Args:
        model: The whole model (for its loss, metrics and optimizer).
        chunks: One functional sub-model per chunk, in model order (one per
            stage unless the schedule is interleaved).
        partition: The partition table, one row per chunk.
        schedule: The schedule training steps follow.
        recompute: Whether backward passes recompute the chunk's forward.
        counters: Where training steps accumulate their timings.
        clocks: One `UnorderedClock` per stage, created on its device.
    """

    def __init__(
        self,
        *,
        model: keras.Model,
        chunks: list[keras.Model],
        partition: Partition,
        schedule: Schedule,
        recompute: bool,
        counters: StageCounters,
        clocks: list[UnorderedClock],
    ) -> None:
        self.model = model
        self.chunks = chunks
        self.partition = partition
        self.schedule = schedule
        self.recompute = recompute
        self.counters = counters
        self.clocks = clocks
        self.devices = [row.device for row in partition.stages]  # per chunk
        # Seed-generator states per chunk, and their values when each (chunk,
        # micro-batch) forward began: a recomputed forward reads those values,
        # so Dropout draws the same mask twice.
        self._seed_states = [compat.seed_states(chunk) for chunk in chunks]
        self._seeds: dict[tuple[int, int], list[tf.Tensor]] = {}

    def step(self, kind: str, data: Any) -> Any:
        """Builds the step of `kind` (`"train"`, `"test"` or `"predict"`)."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        m = self.schedule.num_microbatches
        # Split where the pieces are used (the first and last chunks' devices),
        # so that each tensor crosses to a stage once per step, not once per
        # micro-batch.
        with tf.device(self.devices[0]):
            inputs, sizes = microbatch.split(x, m)
        targets: list[Any] = [(y, sample_weight)] * m
        if any(t is not None for t in tree.flatten((y, sample_weight))):
            # The inputs' split checks the batch size; a second check here
            # would be chained to the first by tf.function (both are
            # stateful), making the last stage wait for the first at every
            # step. The loss weights use these sizes, which live here.
            with tf.device(self.devices[-1]):
                targets, sizes = microbatch.split((y, sample_weight), m, check=False)
        parts = [(inputs[j], *targets[j]) for j in range(m)]
        if kind == "train":
            return self._train_step(x, y, sample_weight, parts, sizes)
        with tf.device(self.devices[-1]):
            y_pred = microbatch.concat([self._forward_only(p[0]) for p in parts])
        if kind == "predict":
            return y_pred
        model = self.model
        loss = model.compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=False
        )
        self._track_loss(loss, x)
        return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _forward_only(self, x: Any) -> Any:
        h = x
        for device, chunk in zip(self.devices, self.chunks, strict=True):
            with tf.device(device):
                h = chunk(tree.map_structure(tf.identity, h), training=False)
        return h

    def _train_step(
        self, x: Any, y: Any, sample_weight: Any, parts: list[Any], sizes: tf.Tensor
    ) -> Any:
        model = self.model
        schedule = self.schedule
        weights = list(model.trainable_weights)
        with tf.device(self.devices[-1]):
            fraction = tf.cast(sizes, tf.float32) / tf.cast(
                tf.reduce_sum(sizes), tf.float32
            )
        inputs: dict[tuple[int, int], Any] = {}
        outputs: dict[tuple[int, int], Any] = {}
        tapes: dict[tuple[int, int], tf.GradientTape] = {}
        losses: dict[int, tf.Tensor] = {}
        targets: dict[int, tf.Tensor] = {}
        optimizer = model.optimizer
        grads_out: dict[tuple[int, int], Any] = {}
        # Per weight, the sum of its gradients over the micro-batches so far.
        grads: dict[int, Any] = {}
        # Per stage (device): the end of its latest action, which its next
        # action waits for, whichever chunk either runs.
        last: list[tf.Tensor | None] = [None] * schedule.num_stages
        trace = StepTrace(schedule.num_stages, schedule.num_chunks, len(parts))

        def loss_of(j: int, y_pred: Any) -> tf.Tensor:
            # Micro-batch j's share of the whole batch's mean loss, then the
            # optimizer's loss scaling (if any): the tensor to differentiate.
            x_j, y_j, w_j = parts[j]
            loss = model.compute_loss(
                x=x_j, y=y_j, y_pred=y_pred, sample_weight=w_j, training=True
            )
            losses[j] = loss * tf.cast(fraction[j], loss.dtype)
            return losses[j] if optimizer is None else optimizer.scale_loss(losses[j])

        for action in schedule.order():
            s, j = action.stage, action.microbatch
            c = schedule.chunk_index(action)
            with tf.device(self.devices[c]):
                incoming = self._incoming(c, action, parts, outputs, grads_out)
                received = tree.map_structure(_identity, incoming)
                with tf.control_dependencies(_present(received)):
                    arrived = self.clocks[s]()
                deps = [arrived] + ([last[s]] if last[s] is not None else [])
                with tf.control_dependencies(deps):
                    start = self.clocks[s]()
                with tf.control_dependencies([start]):
                    if action.kind == BACKWARD:
                        done = self._backward(
                            c,
                            j,
                            received,
                            inputs,
                            outputs,
                            tapes,
                            targets,
                            loss_of,
                            weights,
                            grads,
                            grads_out,
                        )
                    else:
                        inputs[(c, j)] = received
                        done = self._forward(
                            c, j, received, outputs, tapes, targets, loss_of
                        )
                with tf.control_dependencies(done):
                    end = self.clocks[s]()
                sent = self._sent(c, action, outputs, grads_out)
                trace.busy[s].append(end - start)
                trace.done[c][action.kind][j] = end
                trace.ready[c][action.kind][j] = self._ready(c, action, end, sent)
                trace.arrived[c][action.kind][j] = arrived
                trace.free[c][action.kind][j] = (
                    last[s]
                    if last[s] is not None
                    else tf.constant(float("-inf"), tf.float64)
                )
                if sent:
                    trace.sent[s].append(_num_bytes(sent))
            last[s] = end
            trace.starts[s].append(start)
            trace.ends[s].append(end)

        with tf.device(self.devices[-1]):
            loss = tf.add_n([losses[j] for j in sorted(losses)])
            y_pred = microbatch.concat(
                [outputs[(len(self.chunks) - 1, j)] for j in range(len(parts))]
            )
        self._track_loss(loss, x)
        gradients = [grads.get(i) for i in range(len(weights))]
        if model.optimizer is not None:
            # As the one replica, so that Keras's LossScaleOptimizer (mixed
            # precision) accepts the call; its all-reduce is the identity and
            # each update still runs beside its variable (`update_variable`).
            with compat.OneReplicaContext(tf.distribute.get_strategy()):
                model.optimizer.apply_gradients(zip(gradients, weights, strict=False))
        self._accumulate(trace)
        return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _sent(
        self,
        c: int,
        action: Action,
        outputs: dict[tuple[int, int], Any],
        grads_out: dict[tuple[int, int], Any],
    ) -> list[Any]:
        # The tensors an action on chunk c sends to a neighbouring chunk (on
        # another device): a forward's activations to chunk c + 1, a
        # backward's input gradients to chunk c - 1.
        j = action.microbatch
        if action.kind == BACKWARD:
            if c == 0:
                return []
            return [g for g in tree.flatten(grads_out[(c - 1, j)]) if g is not None]
        return tree.flatten(outputs[(c, j)]) if c < len(self.chunks) - 1 else []

    def _ready(
        self, c: int, action: Action, end: tf.Tensor, sent: list[Any]
    ) -> tf.Tensor:
        # When the input gradient a backward sends on was ready; otherwise
        # what an action sends is ready when it ends.
        if action.kind != BACKWARD or c == 0:
            return end
        with tf.control_dependencies(sent):
            return self.clocks[action.stage]()

    def _incoming(
        self,
        c: int,
        action: Action,
        parts: list[Any],
        outputs: dict[tuple[int, int], Any],
        grads_out: dict[tuple[int, int], Any],
    ) -> Any:
        j = action.microbatch
        if action.kind == BACKWARD:
            return grads_out.get((c, j), [])
        return parts[j][0] if c == 0 else outputs[(c - 1, j)]

    def _forward(
        self,
        c: int,
        j: int,
        h: Any,
        outputs: dict[tuple[int, int], Any],
        tapes: dict[tuple[int, int], tf.GradientTape],
        targets: dict[int, tf.Tensor],
        loss_of: Any,
    ) -> list[tf.Tensor]:
        is_last = c == len(self.chunks) - 1
        if self.recompute:  # the backward pass recomputes the loss as well
            # Read before the forward advances the state (automatic control
            # dependencies keep program order on the same variable).
            self._seeds[(c, j)] = [
                tf.identity(backing_variable(v)) for v in self._seed_states[c]
            ]
            out = self.chunks[c](h, training=True)
        else:
            tape = tf.GradientTape()
            with tape:
                if c > 0:
                    tape.watch(_floating(h))
                out = self.chunks[c](h, training=True)
                if is_last:
                    targets[j] = loss_of(j, out)
            tapes[(c, j)] = tape
        outputs[(c, j)] = out
        return tree.flatten(out) + ([targets[j]] if j in targets and is_last else [])

    def _backward(
        self,
        c: int,
        j: int,
        upstream: Any,
        inputs: dict[tuple[int, int], Any],
        outputs: dict[tuple[int, int], Any],
        tapes: dict[tuple[int, int], tf.GradientTape],
        targets: dict[int, tf.Tensor],
        loss_of: Any,
        weights: list[Any],
        grads: dict[int, Any],
        grads_out: dict[tuple[int, int], Any],
    ) -> list[tf.Tensor]:
        is_last = c == len(self.chunks) - 1
        h = inputs[(c, j)]
        if self.recompute:
            # Replays the forward without applying its state updates a second
            # time (BatchNormalization statistics, seed generators), from the
            # seed states the original forward started with.
            seeds = zip(self._seed_states[c], self._seeds.pop((c, j)), strict=True)
            tape = tf.GradientTape()
            with keras.StatelessScope(state_mapping=list(seeds)), tape:
                if c > 0:
                    tape.watch(_floating(h))
                out = self.chunks[c](h, training=True)
                target = loss_of(j, out) if is_last else out
        else:
            tape = tapes.pop((c, j))
            target = targets[j] if is_last else outputs[(c, j)]
        flat_h = tree.flatten(h) if c > 0 else []  # no gradient for the data
        if not is_last:
            # Only outputs a gradient came back for: none comes for an
            # integer tensor (token ids passed on), or one used without one.
            kept = [
                (t, g)
                for t, g in zip(
                    tree.flatten(target), tree.flatten(upstream), strict=True
                )
                if g is not None
            ]
            target, upstream = [t for t, _ in kept], [g for _, g in kept]
        result = tape.gradient(
            target,
            flat_h + weights,
            output_gradients=None if is_last else upstream,
        )
        if c > 0:
            grads_out[(c - 1, j)] = tree.pack_sequence_as(h, result[: len(flat_h)])
        done = [g for g in result[: len(flat_h)] if g is not None]
        for i, g in enumerate(result[len(flat_h) :]):
            if g is not None:
                # A running sum on this stage's device, which the action's
                # end waits for: the stage holds one micro-batch's weight
                # gradients, not M. With the next add as the sum's only
                # consumer, every micro-batch's gradients were kept to the
                # step's end (1F1B's process peak grew 2 MiB per micro-batch,
                # eight 256x256 kernels: docs/pipeline.md, "Memory"), as if
                # the adds had been fused into one AddN.
                grads[i] = total = _add_gradient(grads.get(i), g)
                done.append(
                    total.values if isinstance(total, tf.IndexedSlices) else total
                )
        return done

    def _track_loss(self, loss: tf.Tensor, x: Any) -> None:
        tracker = compat.loss_tracker(self.model)
        if tracker is not None:
            first = next(t for t in tree.flatten(x) if t is not None)
            tracker.update_state(loss, sample_weight=tf.shape(first)[0])

    def _accumulate(self, trace: StepTrace) -> None:
        counters = self.counters
        schedule = self.schedule
        k, v = schedule.num_stages, schedule.chunks_per_device
        m = schedule.num_microbatches
        summaries = []
        for s in range(k):
            with tf.device(self.devices[s]):  # chunk s is stage s's first
                summaries.append(trace.summary(s))
        with tf.device(counters.busy.device):
            rows = tf.stack(summaries)
            busy = rows[:, 0]
            begin = tf.reduce_min(rows[:, 1])
            span = tf.reduce_max(rows[:, 2]) - begin
            # [stage, record, stage's chunk, micro-batch], then, for the
            # timestamps of receiving and sending, per record the model's
            # chunks in order: chunk v of stage s is chunk v * K + s.
            records = tf.reshape(rows[:, 4:], [k, 8, v, m])
            per_chunk = tf.reshape(tf.transpose(records, [1, 2, 0, 3]), [8, v * k, m])
            arrived_f, arrived_b, ready_f, ready_b, free_f, free_b = tf.unstack(
                per_chunk[2:]
            )
            # A stage is free for its first action from the step's start.
            free_f, free_b = tf.maximum(free_f, begin), tf.maximum(free_b, begin)
            # Exposed communication, on the receiving chunk's stage: a forward
            # on chunk c > 0 waits for chunk c - 1's activations, a backward
            # on chunk c < K V - 1 for chunk c + 1's input gradient (always
            # on another device). The stage waited from when it was free and
            # the tensor was ready on the sender until the tensor arrived; a
            # tensor that arrived before that made nobody wait, so max(0, .)
            # is the definition, not a clamp of a timing error.
            zero = tf.zeros([1], tf.float64)
            forward = _exposed(arrived_f[1:], ready_f[:-1], free_f[1:])
            backward = _exposed(arrived_b[:-1], ready_b[1:], free_b[:-1])
            comm = tf.concat([zero, forward], 0) + tf.concat([backward, zero], 0)
            comm = tf.reduce_sum(tf.reshape(comm, [v, k]), axis=0)  # per stage
            counters.busy.assign_add(busy)
            # The bubble: waiting for a neighbour still computing, or for the
            # schedule. Each exposed wait lies between the stage's previous
            # action and the start of the action that waited, so busy and
            # exposed time never overlap and the bubble is never negative.
            counters.idle.assign_add(span - busy - comm)
            counters.comm.assign_add(comm)
            counters.bytes.assign_add(tf.cast(rows[:, 3], tf.int64))
            counters.steps.assign_add(1)
            counters.calls.assign_add(2 * m * (k * v - 1))
            # (Chunk, micro-batch) pairs in flight on a stage when one of its
            # forwards ends: those whose forward has ended and whose backward
            # has not.
            forward_done = tf.reshape(records[:, 0], [k, v * m])
            backward_done = tf.reshape(records[:, 1], [k, v * m])
            at = forward_done[:, :, None]
            live = (forward_done[:, None, :] <= at) & (backward_done[:, None, :] > at)
            in_flight = tf.reduce_sum(tf.cast(live, tf.int64), axis=2)
            counters.peak.assign(tf.maximum(counters.peak, tf.reduce_max(in_flight, 1)))


def _exposed(arrived: tf.Tensor, ready: tf.Tensor, free: tf.Tensor) -> tf.Tensor:
    """Per stage, the seconds spent waiting for tensors already produced."""
    return tf.reduce_sum(tf.maximum(arrived - tf.maximum(ready, free), 0.0), axis=1)


def _identity(t: Any) -> Any:
    # A gradient that did not come back (see `_backward`) stays None.
    return None if t is None else tf.identity(t)


def _present(h: Any) -> list[tf.Tensor]:
    return [t for t in tree.flatten(h) if t is not None]


def _floating(h: Any) -> list[tf.Tensor]:
    # What a tape can watch: integer tensors (token ids) have no gradient.
    return [t for t in tree.flatten(h) if t.dtype.is_floating]


def _num_bytes(tensors: list[Any]) -> tf.Tensor:
    # An `IndexedSlices` gradient travels as its component tensors.
    flat = tf.nest.flatten(tensors, expand_composites=True)
    return tf.add_n([tf.cast(tf.size(t), tf.int64) * t.dtype.size for t in flat])


def _add_gradient(total: Any, g: Any) -> Any:
    """Adds a micro-batch's gradient to the running total (`None` at first)."""
    if total is None:
        return g
    if isinstance(total, tf.IndexedSlices) or isinstance(g, tf.IndexedSlices):
        a, b = (
            t if isinstance(t, tf.IndexedSlices) else _to_slices(t) for t in (total, g)
        )
        return tf.IndexedSlices(
            tf.concat([a.values, b.values], 0),
            tf.concat([a.indices, b.indices], 0),
            a.dense_shape,
        )
    return total + g


def _to_slices(g: tf.Tensor) -> tf.IndexedSlices:
    rows = tf.shape(g, out_type=tf.int64)[0]
    return tf.IndexedSlices(g, tf.range(rows), tf.shape(g, out_type=tf.int64))
