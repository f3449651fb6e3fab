"""The engine of `PipelineStrategy`: builds pipelined steps and counts stage time.

`PipelineEngine` builds, inside Keras's own `tf.function`, one pipelined train,
test or predict step of a model from its partition (`partition.py`) and a
schedule (`schedules.py`): the batch is split into micro-batches
(`microbatch.py`), the forward and backward pass of every (stage, micro-batch)
pair is created under `tf.device` of its stage in the schedule's order, and the
actions of each stage are chained with control dependencies. `StepTrace`
(`trace.py`) records the step's timestamps and byte counts on each stage's device and
`StageCounters` accumulates them into per-stage busy time, exposed
communication time (waiting for a neighbour's tensor), bubble, bytes sent and
peak micro-batches in flight.
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
        stages: One functional sub-model per stage.
        partition: The partition table.
        schedule: The schedule training steps follow.
        recompute: Whether backward passes recompute the stage's forward.
        counters: Where training steps accumulate their timings.
        clocks: One `UnorderedClock` per stage, created on its device.
    """

    def __init__(
        self,
        *,
        model: keras.Model,
        stages: list[keras.Model],
        partition: Partition,
        schedule: Schedule,
        recompute: bool,
        counters: StageCounters,
        clocks: list[UnorderedClock],
    ) -> None:
        self.model = model
        self.stages = stages
        self.partition = partition
        self.schedule = schedule
        self.recompute = recompute
        self.counters = counters
        self.clocks = clocks
        self.devices = [stage.device for stage in partition.stages]
        # Seed-generator states per stage, and their values when each (stage,
        # micro-batch) forward began: a recomputed forward reads those values,
        # so Dropout draws the same mask twice.
        self._seed_states = [compat.seed_states(stage) for stage in stages]
        self._seeds: dict[tuple[int, int], list[tf.Tensor]] = {}

    def step(self, kind: str, data: Any) -> Any:
        """Builds the step of `kind` (`"train"`, `"test"` or `"predict"`)."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        m = self.schedule.num_microbatches
        # Split where the pieces are used, so that each tensor crosses to a
        # stage once per step, not once per micro-batch.
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
        for device, stage in zip(self.devices, self.stages, strict=True):
            with tf.device(device):
                h = stage(tree.map_structure(tf.identity, h), training=False)
        return h

    def _train_step(
        self, x: Any, y: Any, sample_weight: Any, parts: list[Any], sizes: tf.Tensor
    ) -> Any:
        model = self.model
        num_stages = len(self.stages)
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
        grads: dict[int, list[Any]] = {i: [] for i in range(len(weights))}
        last: list[tf.Tensor | None] = [None] * num_stages
        trace = StepTrace(num_stages, len(parts))

        def loss_of(j: int, y_pred: Any) -> tf.Tensor:
            # Micro-batch j's share of the whole batch's mean loss, then the
            # optimizer's loss scaling (if any): the tensor to differentiate.
            x_j, y_j, w_j = parts[j]
            loss = model.compute_loss(
                x=x_j, y=y_j, y_pred=y_pred, sample_weight=w_j, training=True
            )
            losses[j] = loss * tf.cast(fraction[j], loss.dtype)
            return losses[j] if optimizer is None else optimizer.scale_loss(losses[j])

        for action in self.schedule.order():
            s, j = action.stage, action.microbatch
            with tf.device(self.devices[s]):
                incoming = self._incoming(action, parts, outputs, grads_out)
                received = tree.map_structure(tf.identity, incoming)
                with tf.control_dependencies(tree.flatten(received)):
                    arrived = self.clocks[s]()
                deps = [arrived] + ([last[s]] if last[s] is not None else [])
                with tf.control_dependencies(deps):
                    start = self.clocks[s]()
                with tf.control_dependencies([start]):
                    if action.kind == BACKWARD:
                        done = self._backward(
                            action,
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
                        inputs[(s, j)] = received
                        done = self._forward(
                            action, received, outputs, tapes, targets, loss_of
                        )
                with tf.control_dependencies(done):
                    end = self.clocks[s]()
                sent = self._sent(action, outputs, grads_out)
                trace.busy[s].append(end - start)
                trace.done[s][action.kind][j] = end
                trace.ready[s][action.kind][j] = self._ready(action, end, sent)
                trace.arrived[s][action.kind][j] = arrived
                trace.free[s][action.kind][j] = (
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
                [outputs[(num_stages - 1, j)] for j in range(len(parts))]
            )
        self._track_loss(loss, x)
        gradients = [_sum_gradients(grads[i]) for i in range(len(weights))]
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
        action: Action,
        outputs: dict[tuple[int, int], Any],
        grads_out: dict[tuple[int, int], Any],
    ) -> list[Any]:
        # The tensors an action sends to a neighbouring stage: a forward's
        # activations to the next stage, a backward's input gradients to the
        # previous one.
        s, j = action.stage, action.microbatch
        if action.kind == BACKWARD:
            if s == 0:
                return []
            return [g for g in tree.flatten(grads_out[(s - 1, j)]) if g is not None]
        return tree.flatten(outputs[(s, j)]) if s < len(self.stages) - 1 else []

    def _ready(self, action: Action, end: tf.Tensor, sent: list[Any]) -> tf.Tensor:
        # When the input gradient a backward sends on was ready; otherwise
        # what an action sends is ready when it ends.
        if action.kind != BACKWARD or action.stage == 0:
            return end
        with tf.control_dependencies(sent):
            return self.clocks[action.stage]()

    def _incoming(
        self,
        action: Action,
        parts: list[Any],
        outputs: dict[tuple[int, int], Any],
        grads_out: dict[tuple[int, int], Any],
    ) -> Any:
        s, j = action.stage, action.microbatch
        if action.kind == BACKWARD:
            return grads_out.get((s, j), [])
        return parts[j][0] if s == 0 else outputs[(s - 1, j)]

    def _forward(
        self,
        action: Action,
        h: Any,
        outputs: dict[tuple[int, int], Any],
        tapes: dict[tuple[int, int], tf.GradientTape],
        targets: dict[int, tf.Tensor],
        loss_of: Any,
    ) -> list[tf.Tensor]:
        s, j = action.stage, action.microbatch
        is_last = s == len(self.stages) - 1
        if self.recompute:  # the backward pass recomputes the loss as well
            # Read before the forward advances the state (automatic control
            # dependencies keep program order on the same variable).
            self._seeds[(s, j)] = [
                tf.identity(backing_variable(v)) for v in self._seed_states[s]
            ]
            out = self.stages[s](h, training=True)
        else:
            tape = tf.GradientTape()
            with tape:
                if s > 0:
                    tape.watch(h)
                out = self.stages[s](h, training=True)
                if is_last:
                    targets[j] = loss_of(j, out)
            tapes[(s, j)] = tape
        outputs[(s, j)] = out
        return tree.flatten(out) + ([targets[j]] if j in targets and is_last else [])

    def _backward(
        self,
        action: Action,
        upstream: Any,
        inputs: dict[tuple[int, int], Any],
        outputs: dict[tuple[int, int], Any],
        tapes: dict[tuple[int, int], tf.GradientTape],
        targets: dict[int, tf.Tensor],
        loss_of: Any,
        weights: list[Any],
        grads: dict[int, list[Any]],
        grads_out: dict[tuple[int, int], Any],
    ) -> list[tf.Tensor]:
        s, j = action.stage, action.microbatch
        is_last = s == len(self.stages) - 1
        h = inputs[(s, j)]
        if self.recompute:
            # Replays the forward without applying its state updates a second
            # time (BatchNormalization statistics, seed generators), from the
            # seed states the original forward started with.
            seeds = zip(self._seed_states[s], self._seeds.pop((s, j)), strict=True)
            tape = tf.GradientTape()
            with keras.StatelessScope(state_mapping=list(seeds)), tape:
                if s > 0:
                    tape.watch(h)
                out = self.stages[s](h, training=True)
                target = loss_of(j, out) if is_last else out
        else:
            tape = tapes.pop((s, j))
            target = targets[j] if is_last else outputs[(s, j)]
        flat_h = tree.flatten(h) if s > 0 else []  # no gradient for the data
        result = tape.gradient(
            target,
            flat_h + weights,
            output_gradients=None if is_last else upstream,
        )
        if s > 0:
            grads_out[(s - 1, j)] = tree.pack_sequence_as(h, result[: len(flat_h)])
        done = [g for g in result[: len(flat_h)] if g is not None]
        for i, g in enumerate(result[len(flat_h) :]):
            if g is not None:
                grads[i].append(g)
                done.append(g.values if isinstance(g, tf.IndexedSlices) else g)
        return done

    def _track_loss(self, loss: tf.Tensor, x: Any) -> None:
        tracker = compat.loss_tracker(self.model)
        if tracker is not None:
            first = next(t for t in tree.flatten(x) if t is not None)
            tracker.update_state(loss, sample_weight=tf.shape(first)[0])

    def _accumulate(self, trace: StepTrace) -> None:
        counters = self.counters
        num_stages, m = len(self.stages), self.schedule.num_microbatches
        summaries = []
        for s, device in enumerate(self.devices):
            with tf.device(device):
                summaries.append(trace.summary(s))
        with tf.device(counters.busy.device):
            rows = tf.stack(summaries)
            busy = rows[:, 0]
            begin = tf.reduce_min(rows[:, 1])
            span = tf.reduce_max(rows[:, 2]) - begin
            done_f, done_b, arrived_f, arrived_b, ready_f, ready_b, free_f, free_b = (
                rows[:, 4 + i * m : 4 + (i + 1) * m] for i in range(8)
            )
            # A stage is free for its first action from the step's start.
            free_f, free_b = tf.maximum(free_f, begin), tf.maximum(free_b, begin)
            # Exposed communication, on the receiving stage: a forward on
            # stage s > 0 waits for stage s - 1's activations, a backward on
            # stage s < K - 1 for stage s + 1's input gradient. The stage
            # waited from when it was free and the tensor was ready on the
            # sender until the tensor arrived; a tensor that arrived before
            # that made nobody wait, so max(0, .) is the definition, not a
            # clamp of a timing error.
            zero = tf.zeros([1], tf.float64)
            forward = _exposed(arrived_f[1:], ready_f[:-1], free_f[1:])
            backward = _exposed(arrived_b[:-1], ready_b[1:], free_b[:-1])
            comm = tf.concat([zero, forward], 0) + tf.concat([backward, zero], 0)
            counters.busy.assign_add(busy)
            # The bubble: waiting for a neighbour still computing, or for the
            # schedule. Each exposed wait lies between the stage's previous
            # action and the start of the action that waited, so busy and
            # exposed time never overlap and the bubble is never negative.
            counters.idle.assign_add(span - busy - comm)
            counters.comm.assign_add(comm)
            counters.bytes.assign_add(tf.cast(rows[:, 3], tf.int64))
            counters.steps.assign_add(1)
            counters.calls.assign_add(2 * m * (num_stages - 1))
            # Micro-batches in flight on a stage when its forward j ends: those
            # whose forward has ended and whose backward has not.
            at = done_f[:, :, None]
            live = (done_f[:, None, :] <= at) & (done_b[:, None, :] > at)
            in_flight = tf.reduce_sum(tf.cast(live, tf.int64), axis=2)
            counters.peak.assign(tf.maximum(counters.peak, tf.reduce_max(in_flight, 1)))


def _exposed(arrived: tf.Tensor, ready: tf.Tensor, free: tf.Tensor) -> tf.Tensor:
    """Per stage, the seconds spent waiting for tensors already produced."""
    return tf.reduce_sum(tf.maximum(arrived - tf.maximum(ready, free), 0.0), axis=1)


def _num_bytes(tensors: list[Any]) -> tf.Tensor:
    # An `IndexedSlices` gradient travels as its component tensors.
    flat = tf.nest.flatten(tensors, expand_composites=True)
    return tf.add_n([tf.cast(tf.size(t), tf.int64) * t.dtype.size for t in flat])


def _sum_gradients(parts: list[Any]) -> Any:
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    if any(isinstance(g, tf.IndexedSlices) for g in parts):
        slices = [
            g if isinstance(g, tf.IndexedSlices) else _to_slices(g) for g in parts
        ]
        return tf.IndexedSlices(
            tf.concat([g.values for g in slices], 0),
            tf.concat([g.indices for g in slices], 0),
            slices[0].dense_shape,
        )
    with tf.device(parts[0].device):
        return tf.add_n(parts)


def _to_slices(g: tf.Tensor) -> tf.IndexedSlices:
    rows = tf.shape(g, out_type=tf.int64)[0]
    return tf.IndexedSlices(g, tf.range(rows), tf.shape(g, out_type=tf.int64))
