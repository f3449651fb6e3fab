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
flight. Each chunk call runs in a `keras.StatelessScope` that collects the
losses its layers add (activity regularizers, `add_loss`): the chunk's own
backward differentiates them, so they train on any stage.

With R replicas per stage (`replicas.py`), replica group r runs micro-batches
j with `j % R == r` in its own schedule; replicas r > 0 run each chunk on a
copy of its variables read at the step's start (`keras.StatelessScope`, own
seed states), and after the last backward their summed weight gradients are
added to replica 0's beside the variables (`_reduce`), measured apart; they
travel through the mirrored strategies' `Codec` (compression, buckets).
`on_nonfinite` is decided on the gradients about to be applied, one verdict
for every stage (`_check_finite`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf
from keras import tree

from tfpar._clocks import UnorderedClock
from tfpar._compat import pipeline as compat
from tfpar._variables import backing_variable
from tfpar.strategies.mirrored.codec import Codec
from tfpar.strategies.mirrored.nonfinite import NonFinitePolicy
from tfpar.strategies.pipeline import microbatch
from tfpar.strategies.pipeline.call_state import apply_updates, sum_added_losses
from tfpar.strategies.pipeline.partition import Partition
from tfpar.strategies.pipeline.replicas import SEED_OFFSET
from tfpar.strategies.pipeline.schedules import (
    BACKWARD,
    Action,
    Schedule,
    get_schedule,
)
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
        clocks: Per stage, one `UnorderedClock` per replica, created on its
            device.
        replicas: Per stage, its replicas' devices, replica 0 (where the
            stage's variables live) first. Defaults to `None`: one replica,
            the chunk's device.
        codec: How replicas r > 0 send their gradient sums to replica 0
            (compression, buckets). Defaults to `None`: as they are.
        nonfinite: The `on_nonfinite` policy, one device per stage (its
            replica 0). Defaults to `None`: no check.
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
        clocks: list[list[UnorderedClock]],
        replicas: Sequence[Sequence[str]] | None = None,
        codec: Codec | None = None,
        nonfinite: NonFinitePolicy | None = None,
    ) -> None:
        self.model = model
        self.chunks = chunks
        self.partition = partition
        self.schedule = schedule
        self.recompute = recompute
        self.counters = counters
        self.clocks = clocks
        self.devices = [row.device for row in partition.stages]  # per chunk
        k = schedule.num_stages
        self.replicas = [list(r) for r in replicas or [[d] for d in self.devices[:k]]]
        self.num_replicas = len(self.replicas[0])
        self.codec = codec or Codec(None, None)
        self.nonfinite = nonfinite
        # Replica group r runs micro-batches r, r + R, ...: its own schedule.
        m, big_r = schedule.num_microbatches, self.num_replicas
        self.group_schedules = [
            schedule
            if big_r == 1
            else get_schedule(
                schedule.name,
                num_stages=k,
                num_microbatches=len(range(r, m, big_r)),
                chunks_per_device=schedule.chunks_per_device,
            )
            for r in range(big_r)
        ]
        # Seed-generator states per chunk, and their values when each (chunk,
        # micro-batch) forward began: a recomputed forward reads those values,
        # so Dropout draws the same mask twice.
        self._seed_states = [compat.seed_states(chunk) for chunk in chunks]
        self._seeds: dict[tuple[int, int], list[tf.Tensor]] = {}
        # Per replica r > 0: the step's copies of every chunk's variables,
        # each on the replica's device of its chunk (as (variable, copy) and
        # by trainable-weight index), and per (chunk, r) its seed states so
        # far. A chunk's layers read its copies; the loss's regularization
        # terms (on the last chunk) read the other chunks' copies.
        self._snapshots: dict[int, tuple[list[Any], dict[int, Any]]] = {}
        self._carried: dict[tuple[int, int], list[tf.Tensor]] = {}
        self._copies: dict[tuple[int, int], list[tf.Tensor]] = {}
        # Per (chunk, micro-batch) of the step being traced, the sum of the
        # losses the chunk's layers added in their call (chunks before the
        # last), and each micro-batch's share of the batch.
        self._added: dict[tuple[int, int], tf.Tensor] = {}
        self._fraction: tf.Tensor | None = None
        # Every scope's collected losses, kept for the step being built: Keras
        # matches a layer's losses in a scope by `id`, which a freed tensor's
        # successor could otherwise take.
        self._held_losses: list[list[Any]] = []

    def device(self, c: int, r: int) -> str:
        """The device of replica `r` of chunk `c`."""
        return self.replicas[c % len(self.replicas)][r]

    def step(self, kind: str, data: Any) -> Any:
        """Builds the step of `kind` (`"train"`, `"test"` or `"predict"`)."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        m = self.schedule.num_microbatches
        self._held_losses = []
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
        if self.num_replicas > 1:
            self._snapshot(list(self.model.trainable_weights))
        with tf.device(self.devices[-1]):
            passes = [
                self._forward_only(p[0], j % self.num_replicas)
                for j, p in enumerate(parts)
            ]
            y_pred = microbatch.concat([out for out, _ in passes])
        if kind == "predict":
            return y_pred
        model = self.model
        loss = model.compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=False
        )
        if any(sums for _, sums in passes):
            # The losses layers added in their calls, each micro-batch's
            # weighted by its share of the batch: Keras's whole-batch value.
            with tf.device(self.devices[-1]):
                fraction = microbatch.shares(sizes)
                added = [
                    total * fraction[j]
                    for j, (_, sums) in enumerate(passes)
                    for total in sums
                ]
                loss = loss + tf.cast(tf.add_n(added), loss.dtype)
        self._track_loss(loss, x)
        return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _forward_only(self, x: Any, r: int) -> tuple[Any, list[tf.Tensor]]:
        """One micro-batch through every chunk; returns its output and the
        losses its layers added in their calls, one sum per chunk that added
        any."""
        h, added = x, []
        for c, chunk in enumerate(self.chunks):
            with tf.device(self.device(c, r)):
                scope = self._scope(c, r, None)
                initial = dict(scope.state_mapping)
                with scope:
                    h = chunk(tree.map_structure(tf.identity, h), training=False)
                    if scope.losses:
                        added.append(sum_added_losses(scope.losses))
                apply_updates(scope, initial, chunk, self.model, layer_state=r == 0)
        return h, added

    def _snapshot(self, weights: list[Any]) -> dict[tuple[int, int], list[tf.Tensor]]:
        """Copies each chunk's variables to its replicas r > 0: the broadcast.

        Returns, per (stage, replica r > 0), the copies it received.
        """
        self._snapshots.clear()
        self._carried.clear()
        index = {id(w): i for i, w in enumerate(weights)}
        copies: dict[tuple[int, int], list[tf.Tensor]] = {}
        for c, chunk in enumerate(self.chunks):
            seeds = {id(v) for v in self._seed_states[c]}
            for r in range(1, self.num_replicas):
                with tf.device(self.device(c, r)):
                    mapping, watched = [], {}
                    for v in chunk.variables:
                        if id(v) in seeds:
                            continue
                        value = tf.identity(v.value)
                        mapping.append((v, value))
                        if id(v) in index:
                            watched[index[id(v)]] = value
                    # Replica r draws from its own seeds, never replica 0's.
                    carried = [
                        tf.identity(v.value)
                        + tf.constant([r * SEED_OFFSET, 0], v.value.dtype)
                        for v in self._seed_states[c]
                    ]
                all_mapping, all_watched = self._snapshots.setdefault(r, ([], {}))
                all_mapping.extend(mapping)
                all_watched.update(watched)
                self._carried[(c, r)] = carried
                key = (c % len(self.replicas), r)
                copies.setdefault(key, []).extend([t for _, t in mapping] + carried)
        return copies

    def _scope(
        self, c: int, r: int, seeds: list[tf.Tensor] | None
    ) -> keras.StatelessScope:
        """The scope every call of chunk `c` on replica `r` runs in.

        It collects the losses layers add in their call (activity
        regularizers, `add_loss`), which the chunk's own backward pass then
        differentiates, and holds the state updates: replica 0's forward
        applies them after the call (`call_state.apply_updates`); replica r > 0 runs
        on its snapshot and carries only its seed states; a recomputed
        forward replays from the seeds it is given and discards them.
        """
        if r > 0:
            mapping = list(self._snapshots[r][0])
            if seeds is None:
                seeds = self._carried[(c, r)]
        elif c == len(self.chunks) - 1:
            # Inside a StatelessScope, Keras reads a weight's regularization
            # penalty (in the loss) from the mapping only: the variables
            # themselves, read here, under the caller's tape.
            mapping = [
                (w, w)
                for w in self.model.trainable_weights
                if getattr(w, "regularizer", None) is not None
            ]
        else:
            mapping = []
        if seeds is not None:
            mapping += list(zip(self._seed_states[c], seeds, strict=True))
        scope = keras.StatelessScope(state_mapping=mapping, collect_losses=True)
        self._held_losses.append(scope.losses)
        return scope

    def _train_step(
        self, x: Any, y: Any, sample_weight: Any, parts: list[Any], sizes: tf.Tensor
    ) -> Any:
        model = self.model
        schedule = self.schedule
        k, big_r = schedule.num_stages, self.num_replicas
        weights = list(model.trainable_weights)
        with tf.device(self.devices[-1]):
            fraction = microbatch.shares(sizes)
            # Each micro-batch's weight in the batch's loss, as the compiled
            # losses reduce over the batch.
            weight = microbatch.loss_weights(
                microbatch.loss_weighting(model), sizes, [p[2] for p in parts]
            )
        inputs: dict[tuple[int, int], Any] = {}
        outputs: dict[tuple[int, int], Any] = {}
        tapes: dict[tuple[int, int], tf.GradientTape] = {}
        losses: dict[int, tf.Tensor] = {}
        targets: dict[int, tf.Tensor] = {}
        optimizer = model.optimizer
        if self.nonfinite is not None and isinstance(
            optimizer, keras.optimizers.LossScaleOptimizer
        ):
            raise ValueError(
                "PipelineStrategy(on_nonfinite=...) cannot be combined with a "
                "LossScaleOptimizer (mixed precision), which skips the steps "
                "whose scaled gradients overflow and lowers its loss scale; "
                "a check before it would hide the overflow from it. Received: "
                f"on_nonfinite={self.nonfinite.policy!r} and optimizer="
                f"{type(optimizer).__name__} (pass on_nonfinite=None)."
            )
        grads_out: dict[tuple[int, int], Any] = {}
        # Per replica group, per weight, the sum of its gradients over the
        # group's micro-batches so far.
        grads: list[dict[int, Any]] = [{} for _ in range(big_r)]
        self._copies = self._snapshot(weights) if big_r > 1 else {}
        arrivals = {}
        for (s, r), tensors in self._copies.items():
            with tf.device(self.replicas[s][r]), tf.control_dependencies(tensors):
                arrivals[(s, r)] = self.clocks[s][r]()
        traces = []

        def loss_of(j: int, y_pred: Any) -> tf.Tensor:
            # Micro-batch j's part of the whole batch's loss, then the
            # optimizer's loss scaling (if any): the tensor to differentiate.
            x_j, y_j, w_j = parts[j]
            loss = model.compute_loss(
                x=x_j, y=y_j, y_pred=y_pred, sample_weight=w_j, training=True
            )
            losses[j] = loss * tf.cast(weight[j], loss.dtype)
            return losses[j] if optimizer is None else optimizer.scale_loss(losses[j])

        # The losses layers of chunks before the last added in their calls,
        # per (chunk, micro-batch): `_forward` and `_backward` fill and read it.
        self._added = {}
        self._fraction = fraction

        for r, group in enumerate(self.group_schedules):
            # Per stage (device): the end of its latest action, which its next
            # action waits for, whichever chunk either runs.
            last: list[tf.Tensor | None] = [None] * k
            trace = StepTrace(k, schedule.num_chunks, group.num_microbatches)
            traces.append(trace)
            for local in group.order():
                s, i = local.stage, local.microbatch
                # The group's i-th micro-batch is the batch's (i R + r)-th.
                action = dataclasses.replace(local, microbatch=i * big_r + r)
                j = action.microbatch
                c = group.chunk_index(local)
                clock = self.clocks[s][r]
                with tf.device(self.device(c, r)):
                    incoming = self._incoming(c, action, parts, outputs, grads_out)
                    received = tree.map_structure(_identity, incoming)
                    with tf.control_dependencies(_present(received)):
                        arrived = clock()
                    deps = [arrived] + ([last[s]] if last[s] is not None else [])
                    if last[s] is None and (s, r) in arrivals:
                        # The replica's first action also waits for its copy
                        # of the stage's weights.
                        deps.append(arrivals[(s, r)])
                        trace.reduce[s][1] = arrivals[(s, r)]
                        trace.reduce[s][2] = arrived
                    with tf.control_dependencies(deps):
                        start = clock()
                    with tf.control_dependencies([start]):
                        if action.kind == BACKWARD:
                            done = self._backward(
                                c,
                                r,
                                j,
                                received,
                                inputs,
                                outputs,
                                tapes,
                                targets,
                                loss_of,
                                weights,
                                grads[r],
                                grads_out,
                            )
                        else:
                            inputs[(c, j)] = received
                            done = self._forward(
                                c, r, j, received, outputs, tapes, targets, loss_of
                            )
                    with tf.control_dependencies(done):
                        end = clock()
                    sent = self._sent(c, action, outputs, grads_out)
                    trace.busy[s].append(end - start)
                    trace.done[c][action.kind][i] = end
                    trace.ready[c][action.kind][i] = self._ready(
                        c, action, end, sent, clock
                    )
                    trace.arrived[c][action.kind][i] = arrived
                    trace.free[c][action.kind][i] = (
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
            loss = tf.add_n(
                [losses[j] for j in sorted(losses)]
                + [
                    tf.cast(added * fraction[j], losses[j].dtype)
                    for (_, j), added in sorted(self._added.items())
                ]
            )
            y_pred = microbatch.concat(
                [outputs[(len(self.chunks) - 1, j)] for j in range(len(parts))]
            )
        self._track_loss(loss, x)
        if big_r > 1:
            gradients = self._reduce(weights, grads, traces)
        else:
            gradients = [grads[0].get(i) for i in range(len(weights))]
        gradients = self._check_finite(weights, gradients)
        if model.optimizer is not None:
            # As the one replica, so that Keras's LossScaleOptimizer (mixed
            # precision) accepts the call; its all-reduce is the identity and
            # each update still runs beside its variable (`update_variable`).
            with compat.OneReplicaContext(tf.distribute.get_strategy()):
                model.optimizer.apply_gradients(zip(gradients, weights, strict=False))
        self.counters.add_step(
            traces,
            schedule=self.schedule,
            group_schedules=self.group_schedules,
            replicas=self.replicas,
        )
        return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _stage_of(self, weights: list[Any]) -> dict[int, int]:
        """The stage holding each trainable weight, by index in `weights`."""
        k = len(self.replicas)
        index = {id(w): i for i, w in enumerate(weights)}
        stage_of: dict[int, int] = {}
        for c, chunk in enumerate(self.chunks):
            for w in chunk.trainable_weights:
                stage_of.setdefault(index[id(w)], c % k)
        return stage_of

    def _reduce(
        self, weights: list[Any], grads: list[dict[int, Any]], traces: list[StepTrace]
    ) -> list[Any]:
        """Sums every replica's weight gradients on the stage's replica 0.

        Each replica r > 0 encodes its sums on its device (`codec`: cast down
        and packed into buckets if asked), sends them to replica 0, where
        they are decoded and added to replica 0's own. Records, per stage,
        the bytes each replica r > 0 sent (its encoded sums), the bytes
        replica 0 sent (the step's weight copies) and when the stage's
        totals existed on replica 0.
        """
        k, big_r = len(self.replicas), self.num_replicas
        stage_of = self._stage_of(weights)
        totals: list[Any] = [None] * len(weights)
        for s in range(k):
            mine = [i for i in range(len(weights)) if stage_of.get(i, 0) == s]
            copies = [t for r in range(1, big_r) for t in self._copies.get((s, r), [])]
            if copies:
                with tf.device(self.replicas[s][0]):
                    traces[0].reduce[s][0] = _num_bytes(copies)
            received: list[dict[int, Any]] = [grads[0]]
            for r in range(1, big_r):
                present = [i for i in mine if grads[r].get(i) is not None]
                if not present:
                    received.append({})
                    continue
                with tf.device(self.replicas[s][r]):
                    encoded = self.codec.encode([grads[r][i] for i in present])
                    traces[r].reduce[s][0] = _num_bytes(encoded.packed)
                with tf.device(self.replicas[s][0]):
                    # The transfer: each encoded bucket, read on replica 0.
                    moved = [tf.identity(p) for p in encoded.packed]
                    received.append(
                        dict(zip(present, encoded.decode(moved), strict=True))
                    )
            with tf.device(self.replicas[s][0]):
                for i in mine:
                    for sums in received:
                        if sums.get(i) is not None:
                            totals[i] = _add_gradient(totals[i], sums[i])
                present = [
                    t.values if isinstance(t, tf.IndexedSlices) else t
                    for t in (totals[i] for i in mine)
                    if t is not None
                ]
                if present:
                    with tf.control_dependencies(present):
                        traces[0].reduce[s][1] = self.clocks[s][0]()
        return totals

    def _check_finite(self, weights: list[Any], gradients: list[Any]) -> list[Any]:
        """Applies `on_nonfinite` to the step's gradients, every stage's together.

        Each stage's gradients are tested on its replica 0, one verdict
        decides for all; a skipped step is counted in `counters.skipped`.
        """
        if self.nonfinite is None:
            return gradients
        stage_of = self._stage_of(weights)
        groups = [
            [
                i
                for i, g in enumerate(gradients)
                if g is not None and stage_of.get(i, 0) == s
            ]
            for s in range(len(self.replicas))
        ]
        checked, skipped = self.nonfinite.apply_across(
            [[gradients[i] for i in group] for group in groups],
            verdict_device=self.devices[-1],
        )
        out = list(gradients)
        for group, tensors in zip(groups, checked, strict=True):
            for i, t in zip(group, tensors, strict=True):
                out[i] = t
        with tf.device(self.counters.skipped.device):
            self.counters.skipped.assign_add(tf.cast(skipped, tf.int64))
        return out

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
        self,
        c: int,
        action: Action,
        end: tf.Tensor,
        sent: list[Any],
        clock: UnorderedClock,
    ) -> tf.Tensor:
        # When the input gradient a backward sends on was ready; otherwise
        # what an action sends is ready when it ends.
        if action.kind != BACKWARD or c == 0:
            return end
        with tf.control_dependencies(sent):
            return clock()

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
        r: int,
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
            self._seeds[(c, j)] = (
                [tf.identity(backing_variable(v)) for v in self._seed_states[c]]
                if r == 0
                else self._carried[(c, r)]
            )
        # Replica 0 updates the real state; replica r > 0 carries its own.
        scope = self._scope(c, r, None)
        initial = dict(scope.state_mapping)
        if self.recompute:
            with scope:
                out = self.chunks[c](h, training=True)
                added = sum_added_losses(scope.losses) if scope.losses else None
        else:
            tape = tf.GradientTape()
            with scope, tape:
                if c > 0:
                    tape.watch(_floating(h))
                if r > 0:
                    tape.watch(list(self._snapshots[r][1].values()))
                out = self.chunks[c](h, training=True)
                if is_last:
                    # The model's loss includes what the chunk's layers added.
                    targets[j] = loss_of(j, out)
                added = sum_added_losses(scope.losses) if scope.losses else None
            tapes[(c, j)] = tape
        apply_updates(scope, initial, self.chunks[c], self.model, layer_state=r == 0)
        if r > 0:
            self._carried[(c, r)] = [
                scope.get_current_value(v) for v in self._seed_states[c]
            ]
        outputs[(c, j)] = out
        done = tree.flatten(out) + ([targets[j]] if j in targets and is_last else [])
        if added is not None and not is_last:
            # Differentiated by this chunk's backward, counted in the loss.
            self._added[(c, j)] = added
            done.append(added)
        return done

    def _backward(
        self,
        c: int,
        r: int,
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
        # Replica r > 0 differentiates with respect to its copies.
        copies = self._snapshots[r][1] if r > 0 else {}
        if self.recompute:
            # Replays the forward without applying its state updates a second
            # time (BatchNormalization statistics, seed generators), from the
            # seed states the original forward started with.
            tape = tf.GradientTape()
            scope = self._scope(c, r, self._seeds.pop((c, j)))
            initial = dict(scope.state_mapping)
            # The scope inside the tape: its mapping's reads are recorded.
            with tape, scope:
                if c > 0:
                    tape.watch(_floating(h))
                tape.watch(list(copies.values()))
                out = self.chunks[c](h, training=True)
                target = loss_of(j, out) if is_last else out
                added = sum_added_losses(scope.losses) if scope.losses else None
            # The loss's metrics; the layers' state was updated by the forward.
            apply_updates(scope, initial, self.chunks[c], self.model, layer_state=False)
        else:
            tape = tapes.pop((c, j))
            target = targets[j] if is_last else outputs[(c, j)]
            added = self._added.get((c, j))
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
            if added is not None:
                # The losses this chunk's layers added, weighted as the
                # model's loss is: the micro-batch's share, then loss scaling.
                target.append(added)
                upstream.append(self._loss_weight(j))
        sources = [copies.get(i, w) for i, w in enumerate(weights)]
        result = tape.gradient(
            target,
            flat_h + sources,
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

    def _loss_weight(self, j: int) -> tf.Tensor:
        """The gradient of the step's objective with respect to an added loss
        of micro-batch `j`: its share of the batch, times the loss scale."""
        if self._fraction is None:
            raise RuntimeError("PipelineEngine: an added loss outside a train step.")
        optimizer = self.model.optimizer
        weight = self._fraction[j]
        return weight if optimizer is None else optimizer.scale_loss(weight)

    def _track_loss(self, loss: tf.Tensor, x: Any) -> None:
        tracker = compat.loss_tracker(self.model)
        if tracker is not None:
            first = next(t for t in tree.flatten(x) if t is not None)
            tracker.update_state(loss, sample_weight=tf.shape(first)[0])


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
