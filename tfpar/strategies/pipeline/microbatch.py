"""Splitting a batch into micro-batches and joining the results back.

A batch of B examples becomes M micro-batches whose sizes differ by at most
one: the first `B % M` micro-batches get `B // M + 1` examples, the others
`B // M`. A batch that does not divide evenly (the last batch of an epoch, say)
is therefore handled, not rejected; each micro-batch's mean loss is weighted by
its share of the batch, `n_j / B`, so the sum equals the whole batch's mean loss.

Every tensor of a nested structure (inputs, targets, sample weights) is split
along its first axis the same way. A batch smaller than M cannot give every
micro-batch an example; the step then fails with an error that says so.

Layers that compute statistics over the batch (`BatchNormalization`) see one
micro-batch at a time: `check_batch_statistics` says so once per model, and
refuses those asked to synchronize their statistics over the batch.
"""

from __future__ import annotations

import warnings
from typing import Any

import keras
import tensorflow as tf
from keras import tree

from tfpar._validation import check_int
from tfpar.strategies.pipeline.partition import nested_layers


def microbatch_sizes(batch_size: int, num_microbatches: int) -> list[int]:
    """Returns the micro-batch sizes for a batch of `batch_size` examples.

    Args:
        batch_size: Examples in the batch, an int >= `num_microbatches`.
        num_microbatches: Number of micro-batches M, an int >= 1.

    Returns:
        M sizes summing to `batch_size`, the larger ones first.

    Raises:
        TypeError: If `num_microbatches` is not an int.
        ValueError: If `num_microbatches < 1` or `batch_size < num_microbatches`.

    Example:

    ```python
    microbatch_sizes(10, 4)  # [3, 3, 2, 2]
    ```
    """
    validate_num_microbatches(num_microbatches)
    if batch_size < num_microbatches:
        raise ValueError(
            f"A batch of {batch_size} example(s) cannot be split into "
            f"num_microbatches={num_microbatches} non-empty micro-batches "
            "(use a batch size >= num_microbatches)."
        )
    base, extra = divmod(batch_size, num_microbatches)
    return [base + 1 if j < extra else base for j in range(num_microbatches)]


def validate_num_microbatches(num_microbatches: object) -> int:
    """Checks `num_microbatches` and returns it.

    Raises:
        TypeError: If it is not an int.
        ValueError: If it is smaller than 1.
    """
    return check_int("num_microbatches", num_microbatches, minimum=1)


def split(
    data: Any, num_microbatches: int, *, check: bool = True
) -> tuple[list[Any], tf.Tensor]:
    """Splits every tensor of `data` along axis 0 into micro-batches.

    Works in graph mode with a dynamic batch size. `None` leaves stay `None`.

    Args:
        data: A nested structure of tensors sharing their first dimension.
        num_microbatches: Number of micro-batches M, an int >= 1.
        check: Whether to check, when run, that the batch has at least M
            examples (otherwise the last micro-batches come out empty).
            Defaults to `True`; pass `False` for a second split of the same
            batch.

    Returns:
        A tuple `(parts, sizes)`: `parts` is a list of M structures like
        `data`, `sizes` an int32 tensor with the M micro-batch sizes.

    Raises:
        TypeError: If `num_microbatches` is not an int.
        ValueError: If `num_microbatches < 1` or `data` holds no tensor.
        tf.errors.InvalidArgumentError: When run, if the batch has fewer than
            M examples.
    """
    validate_num_microbatches(num_microbatches)
    leaves = [t for t in tree.flatten(data) if t is not None]
    if not leaves:
        raise ValueError(f"Cannot split a batch without tensors. Received: {data!r}.")
    batch = tf.shape(leaves[0], out_type=tf.int32)[0]
    checks = []
    if check:
        checks.append(
            tf.debugging.assert_greater_equal(
                batch,
                num_microbatches,
                message=(
                    f"PipelineStrategy(num_microbatches={num_microbatches}) cannot "
                    f"split a batch with fewer than {num_microbatches} examples into "
                    "non-empty micro-batches: use a batch size >= num_microbatches "
                    "(or drop the last, smaller batch)."
                ),
            )
        )
    with tf.control_dependencies(checks):
        base = batch // num_microbatches
        extra = batch % num_microbatches
    index = tf.range(num_microbatches, dtype=tf.int32)
    sizes = base + tf.cast(index < extra, tf.int32)

    flat = tree.flatten(data)
    pieces = [
        [None] * num_microbatches
        if t is None
        else tf.split(t, sizes, num=num_microbatches, axis=0)
        for t in flat
    ]
    parts = [
        tree.pack_sequence_as(data, [p[j] for p in pieces])
        for j in range(num_microbatches)
    ]
    return parts, sizes


def concat(parts: list[Any]) -> Any:
    """Joins micro-batch results back into one batch along axis 0.

    Args:
        parts: A list of structures of tensors, one per micro-batch.

    Returns:
        One structure like `parts[0]` with the tensors concatenated.
    """
    if len(parts) == 1:
        return parts[0]
    return tree.map_structure(lambda *ts: tf.concat(ts, axis=0), *parts)


def check_batch_statistics(model: keras.Model, num_microbatches: int) -> None:
    """Refuses or warns if `model` normalizes with batch statistics and M > 1.

    Such a layer normalizes each micro-batch with that micro-batch's mean and
    variance and updates its moving statistics once per micro-batch: training
    matches Keras's gradient accumulation over the micro-batches, not
    whole-batch training, which this warns about. A layer built with
    `synchronized=True` asks for statistics over the whole batch, which no
    stage has until every micro-batch went through it: that is refused.

    Args:
        model: The model being partitioned.
        num_microbatches: Micro-batches per batch.

    Raises:
        ValueError: If a `BatchNormalization` layer has `synchronized=True`.
    """
    if num_microbatches == 1:
        return
    layers = [
        layer
        for layer in nested_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    synchronized = [layer.name for layer in layers if layer.synchronized]
    if synchronized:
        raise ValueError(
            f"PipelineStrategy(num_microbatches={num_microbatches}) cannot "
            f"train the BatchNormalization layer(s) {synchronized} of model "
            f"{model.name!r}: synchronized=True asks for statistics over the "
            "whole batch, and a stage sees one micro-batch at a time. Pass "
            "synchronized=False (statistics per micro-batch), "
            "num_microbatches=1, or normalize per example "
            "(LayerNormalization, GroupNormalization)."
        )
    names = [layer.name for layer in layers]
    if names:
        warnings.warn(
            f"PipelineStrategy(num_microbatches={num_microbatches}): the "
            f"BatchNormalization layer(s) {names} of model {model.name!r} "
            "normalize each micro-batch with its own statistics and update "
            "their moving statistics once per micro-batch, as Keras's "
            "gradient accumulation over the micro-batches would, not as "
            "whole-batch training does. Pass num_microbatches=1 for "
            "whole-batch statistics, or normalize per example "
            "(LayerNormalization, GroupNormalization).",
            stacklevel=2,
        )
