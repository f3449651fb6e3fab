"""Activation memory of a pipeline: what each stage keeps, counted and modelled.

Pipelines exist because a stage keeps, for every micro-batch in flight (from
its forward pass to its backward pass), the tensors its backward pass reads:
GPipe keeps all M micro-batches, 1F1B at most K - s on stage s, and
`recompute=True` keeps only each micro-batch's input and rebuilds the rest
during its backward pass.

`count_held_tensors` counts those tensors for one micro-batch of one model
chunk: it traces the chunk's forward pass under a `tf.GradientTape` and its
backward pass in one `tf.function` graph (never run), and sums the sizes of the
tensors computed from the chunk's input by forward ops and read by backward
ops. TensorFlow's dataflow executor frees a tensor once its last reader ran,
so these are the forward's tensors that live until the backward pass (as
traced with static shapes; a process's allocator agrees for `Dense` stages,
`tests/strategies/pipeline/test_memory.py`).
`stage_memory` combines the counts with the schedule into per-stage records
(`PipelineStrategy.activation_memory()`): the bytes kept per micro-batch
(counted), the micro-batches held (measured and planned), the modelled peak,
and the device allocator's own peak where it has one (measured).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf
from keras import tree

from tfpar._validation import check_int
from tfpar.strategies.pipeline.microbatch import microbatch_sizes
from tfpar.strategies.pipeline.schedules import FORWARD, Schedule

# Tensors whose size says nothing about the memory behind them.
_UNSIZED = (tf.variant, tf.resource, tf.string)


@dataclasses.dataclass(frozen=True)
class HeldTensors:
    """Bytes one micro-batch keeps on one model chunk for the backward pass.

    Counted from a traced graph: a value is `None` when a tensor's size is
    not known from the trace (a dimension other than the batch is unknown,
    or the tensor is a variant, such as a loop's accumulator of activations).

    Attributes:
        input_bytes: The chunk's input(s) for one micro-batch.
        input_read: Whether the backward pass reads the input (a `Dense`
            layer's weight gradient does).
        activation_bytes: Tensors computed from the input by the forward pass
            and read by the backward pass, without the input itself.
    """

    input_bytes: int | None
    input_read: bool
    activation_bytes: int | None


@dataclasses.dataclass(frozen=True)
class StageMemory:
    """Activation memory of one pipeline stage (one device).

    Attributes:
        stage: Stage index, from 0.
        device: Canonical name of the stage's device.
        microbatch_size: Examples in the largest micro-batch,
            `ceil(batch_size / M)`: the one the counts are for.
        input_bytes: Counted: the stage's input per micro-batch (summed over
            its chunks). Stage 0's input is a slice of the batch, which lives
            for the whole step whatever the schedule, so it is never part of
            `bytes_per_microbatch`.
        activation_bytes: Counted: per micro-batch, the tensors the stage's
            forward passes compute from their input and its backward passes
            read (summed over its chunks); with `recompute=True`, what a
            backward pass rebuilds.
        bytes_per_microbatch: Counted: what one micro-batch keeps on the
            stage from its forward pass to its backward pass. Without
            recompute, `activation_bytes` plus, past the first stage, the
            received input when the backward pass reads it; with recompute,
            the received input only (0 on stage 0).
        held_microbatches: Measured: the most micro-batches the stage held at
            once in the training steps so far (`peak_in_flight()`), `None`
            before the first training step.
        planned_microbatches: The schedule's count,
            `schedule.peak_in_flight(stage)`: M for GPipe, K - s for 1F1B.
        peak_activation_bytes: Modelled: the most bytes the stage keeps at
            once, replaying its planned actions (which its device runs in
            that order): every micro-batch in flight keeps its
            `bytes_per_microbatch`, and with recompute a backward pass adds
            the activations it rebuilds. For GPipe and 1F1B without recompute
            that is `bytes_per_microbatch * planned_microbatches`; with
            recompute, `input_bytes * planned_microbatches +
            activation_bytes` past the first stage. Gradients and other
            temporaries of the running pass are not included.
        measured_peak_bytes: Measured: the device allocator's peak bytes in
            use minus its bytes in use now, since the allocator's statistics
            were last reset (`tf.config.experimental.reset_memory_stats`) or
            the process started: activations, gradients and temporaries
            above the resting level of weights and optimizer state. `None`
            where the device has no allocator of its own; see
            `measured_note`.
        measured_note: Where `measured_peak_bytes` comes from, or why it is
            `None`.
    """

    stage: int
    device: str
    microbatch_size: int
    input_bytes: int | None
    activation_bytes: int | None
    bytes_per_microbatch: int | None
    held_microbatches: int | None
    planned_microbatches: int
    peak_activation_bytes: int | None
    measured_peak_bytes: int | None
    measured_note: str


def count_held_tensors(
    chunk: keras.Model, microbatch_size: int, *, input_gradient: bool
) -> HeldTensors:
    """Counts the bytes one micro-batch keeps on `chunk` for its backward pass.

    Traces, without running them, the chunk's forward pass under a
    `tf.GradientTape` (in a `keras.StatelessScope`, so no layer keeps a
    traced tensor) and the backward pass the pipeline runs: gradients for
    the trainable weights and, with `input_gradient`, for the input, given
    a gradient for every output. The shapes are static, with
    `microbatch_size` rows.

    Args:
        chunk: A functional model, a stage's (or chunk's) sub-model.
        microbatch_size: Rows of the micro-batch, an int >= 1.
        input_gradient: Whether the backward pass computes the input's
            gradient (every stage but the first).

    Returns:
        A `HeldTensors`.

    Example:

    ```python
    held = count_held_tensors(stage, 64, input_gradient=True)
    held.activation_bytes  # for Dense(256, activation="relu") layers: 64 * 256 * 4 each
    ```
    """
    check_int("microbatch_size", microbatch_size, minimum=1)

    def spec(t: Any) -> tf.TensorSpec:
        return tf.TensorSpec((microbatch_size, *t.shape[1:]), t.dtype)

    inputs = tree.map_structure(spec, chunk.input)
    forward_ops: list[int] = []

    def passes(x: Any, upstream: Any) -> list[Any]:
        sources = tree.flatten(x) if input_gradient else []
        with keras.StatelessScope(), tf.GradientTape() as tape:
            tape.watch(sources)
            out = chunk(x, training=True)
        forward_ops.append(len(tree.flatten(out)[0].graph.get_operations()))
        return tape.gradient(
            out, sources + list(chunk.trainable_variables), output_gradients=upstream
        )

    traced = tf.function(passes, autograph=False).get_concrete_function(
        inputs, tree.map_structure(spec, chunk.output)
    )
    graph = traced.graph
    operations = graph.get_operations()
    forward, backward = operations[: forward_ops[0]], operations[forward_ops[0] :]
    # The arguments' placeholders come first; the captured weights follow.
    roots = {t.op for t in graph.inputs[: len(tree.flatten(inputs))]}
    computed = set(roots)
    for op in forward:  # in creation order, so inputs come before readers
        if any(t.op in computed for t in op.inputs):
            computed.add(op)
    held = {t.ref(): t for op in backward for t in op.inputs if t.op in computed}
    return HeldTensors(
        input_bytes=_total(_bytes(t) for t in tree.flatten(inputs)),
        input_read=any(t.op in roots for t in held.values()),
        activation_bytes=_total(_bytes(t) for t in held.values() if t.op not in roots),
    )


def stage_memory(
    *,
    chunks: Sequence[keras.Model],
    devices: Sequence[str],
    schedule: Schedule,
    recompute: bool,
    batch_size: int,
    held_microbatches: Sequence[int] | None,
    replica_schedule: Schedule | None = None,
) -> list[StageMemory]:
    """Returns the `StageMemory` of every stage of a partitioned model.

    Args:
        chunks: The model's chunks (one per stage, or V per stage with the
            interleaved schedule), in model order.
        devices: One device per stage (its replica 0).
        schedule: The schedule of a step's M micro-batches, which sets the
            micro-batch size.
        recompute: Whether backward passes recompute their forward pass.
        batch_size: Examples per training batch, an int >= M.
        held_microbatches: Measured micro-batches in flight per stage, or
            `None` before the first training step.
        replica_schedule: The schedule replica 0 of each stage runs: with R
            replicas per stage, replica group 0's, over its ceil(M / R)
            micro-batches (the most of any group). Defaults to `schedule`.

    Returns:
        One `StageMemory` per stage.

    Raises:
        TypeError: If `batch_size` is not an int.
        ValueError: If `batch_size` is smaller than M.
    """
    check_int("batch_size", batch_size, minimum=1)
    rows = microbatch_sizes(batch_size, schedule.num_microbatches)[0]
    plan = replica_schedule or schedule
    counts = [
        count_held_tensors(chunk, rows, input_gradient=c > 0)
        for c, chunk in enumerate(chunks)
    ]
    kept = [_kept(c, held, recompute) for c, held in enumerate(counts)]
    records = []
    rebuilt = [held.activation_bytes if recompute else 0 for held in counts]
    for s, device in enumerate(devices):
        own = sorted({plan.chunk_index(a) for a in plan.stage_actions(s)})
        measured, note = _allocator_peak(device)
        records.append(
            StageMemory(
                stage=s,
                device=device,
                microbatch_size=rows,
                input_bytes=_total(counts[c].input_bytes for c in own),
                activation_bytes=_total(counts[c].activation_bytes for c in own),
                bytes_per_microbatch=_total(kept[c] for c in own),
                held_microbatches=(
                    None if held_microbatches is None else held_microbatches[s]
                ),
                planned_microbatches=plan.peak_in_flight(s),
                peak_activation_bytes=_replay(plan, s, kept, rebuilt),
                measured_peak_bytes=measured,
                measured_note=note,
            )
        )
    return records


def _replay(
    schedule: Schedule,
    stage: int,
    kept: list[int | None],
    rebuilt: list[int | None],
) -> int | None:
    """The most bytes `stage` keeps at once, running its actions in plan order."""
    live: dict[tuple[int, int], int | None] = {}
    peak: int | None = 0
    for action in schedule.stage_actions(stage):
        c = schedule.chunk_index(action)
        if action.kind == FORWARD:
            live[(c, action.microbatch)] = kept[c]
            now = _total(live.values())
        else:  # the micro-batch's kept tensors, and what a recompute rebuilds
            now = _total([*live.values(), rebuilt[c]])
            del live[(c, action.microbatch)]
        peak = None if peak is None or now is None else max(peak, now)
    return peak


def _kept(c: int, held: HeldTensors, recompute: bool) -> int | None:
    # Chunk 0's input is a slice of the batch, alive for the whole step.
    received = held.input_bytes if c > 0 else 0
    if recompute:
        return received
    return _total([held.activation_bytes, received if held.input_read else 0])


def _allocator_peak(device: str) -> tuple[int | None, str]:
    spec = tf.DeviceSpec.from_string(device)
    if spec.job is not None:  # canonical names keep the job of remote devices only
        return None, "remote device: its allocator is read in its own process"
    if spec.device_type != "GPU":
        return None, (
            "CPU devices share the host process's allocator (logical CPUs and "
            "the input pipeline alike): measure the process instead"
        )
    try:
        info = tf.config.experimental.get_memory_info(f"GPU:{spec.device_index}")
    except ValueError:
        return None, "the device reports no memory statistics"
    return int(info["peak"] - info["current"]), "allocator peak above current use"


def _bytes(t: Any) -> int | None:
    if t.dtype in _UNSIZED or not t.shape.is_fully_defined():
        return None
    return int(t.shape.num_elements()) * t.dtype.size


def _total(values: Any) -> int | None:
    values = list(values)
    return None if any(v is None for v in values) else sum(values)
