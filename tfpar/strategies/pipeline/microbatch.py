"""Splitting a batch into micro-batches and joining the results back.

A batch of B examples becomes M micro-batches whose sizes differ by at most
one: the first `B % M` micro-batches get `B // M + 1` examples, the others
`B // M`. A batch that does not divide evenly (the last batch of an epoch, say)
is therefore handled, not rejected; each micro-batch's mean loss is weighted by
its share of the batch, `n_j / B`, so the sum equals the whole batch's mean loss
(a loss reduced otherwise is weighted as its reduction asks, `loss_weights`).

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
from tfpar.strategies.pipeline.layer_graph import nested_layers


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


# How a compiled loss's reduction weights each micro-batch's loss in the
# batch's: by its share of the examples, by 1 (a sum), or by its share of
# the sample weights.
_WEIGHTING = {
    "sum_over_batch_size": "examples",
    "mean": "examples",
    "sum": "one",
    "mean_with_sample_weight": "sample_weights",
}


def loss_weighting(model: keras.Model) -> str:
    """How each micro-batch's loss weighs in the batch's, from the compiled losses.

    Keras reduces each output's loss over the batch as its `reduction` says;
    the pipeline computes the loss per micro-batch, so the whole batch's loss
    is a weighted sum: by the micro-batch's share of the examples for a mean
    (`"sum_over_batch_size"`, the default, and `"mean"`), by 1 for
    `"sum"`, and by its share of the sample weights for
    `"mean_with_sample_weight"` (by its share of the examples without them).

    Args:
        model: The compiled model.

    Returns:
        `"examples"`, `"one"` or `"sample_weights"`.

    Raises:
        ValueError: For a loss without reduction (`reduction=None` or
            `"none"`: per-example losses), or compiled losses whose
            reductions weigh micro-batches differently (each named).

    Example:

    ```python
    model.compile(optimizer="sgd", loss=keras.losses.MeanSquaredError(reduction="sum"))
    loss_weighting(model)  # "one"
    ```
    """
    reductions = [
        (_loss_name(loss), getattr(loss, "reduction", "sum_over_batch_size"))
        for loss in tree.flatten(model.loss)
        if loss is not None
    ]
    unreduced = [(n, r) for n, r in reductions if r not in _WEIGHTING]
    if unreduced:
        raise ValueError(
            "PipelineStrategy computes the loss per micro-batch and needs each "
            "compiled loss reduced to a scalar. Received the loss(es) "
            f"{unreduced} (name, reduction): use a reduction among "
            f"{sorted(_WEIGHTING)}."
        )
    weightings = {_WEIGHTING[r] for _, r in reductions} or {"examples"}
    if len(weightings) > 1:
        raise ValueError(
            "PipelineStrategy weighs each micro-batch's loss by how the loss "
            "reduces over the batch, which must be the same for every compiled "
            f"loss. Received {reductions} (name, reduction): use one reduction "
            "for all, or the same kind ('sum_over_batch_size' and 'mean' "
            "weigh alike)."
        )
    return weightings.pop()


def loss_weights(
    weighting: str, sizes: tf.Tensor, sample_weights: list[Any]
) -> tf.Tensor:
    """Each micro-batch's weight in the batch's loss (see `loss_weighting`).

    Args:
        weighting: What `loss_weighting` returned.
        sizes: The micro-batch sizes, as `split` returned them.
        sample_weights: Per micro-batch, its sample weights (or `None`).

    Returns:
        A float32 vector of M weights.

    Raises:
        ValueError: For `"sample_weights"` with a structure of sample weights
            (one per output): Keras divides each output's loss by its own.

    Example:

    ```python
    parts, sizes = split(x, 3)  # a batch of 10: sizes [4, 3, 3]
    loss_weights("examples", sizes, [None] * 3)  # [0.4, 0.3, 0.3]
    loss_weights("one", sizes, [None] * 3)  # [1.0, 1.0, 1.0]
    ```
    """
    m = len(sample_weights)
    if weighting == "one":
        return tf.ones([m], tf.float32)
    if weighting == "sample_weights" and sample_weights[0] is not None:
        if len(tree.flatten(sample_weights[0])) > 1:
            raise ValueError(
                "PipelineStrategy cannot weigh micro-batches for a loss with "
                "reduction='mean_with_sample_weight' given sample weights per "
                "output (Keras divides each output's loss by its own weights' "
                "sum). Pass one sample weight array, or another reduction."
            )
        sums = tf.stack([tf.reduce_sum(tf.cast(w, tf.float32)) for w in sample_weights])
        return sums / tf.reduce_sum(sums)
    return shares(sizes)


def shares(sizes: tf.Tensor) -> tf.Tensor:
    """Each micro-batch's share of the batch's examples, `n_j / B`.

    Args:
        sizes: The micro-batch sizes, as `split` returned them.

    Returns:
        A float32 vector of M shares summing to 1.

    Example:

    ```python
    shares(tf.constant([4, 3, 3]))  # [0.4, 0.3, 0.3]
    ```
    """
    return tf.cast(sizes, tf.float32) / tf.cast(tf.reduce_sum(sizes), tf.float32)


def _loss_name(loss: Any) -> str:
    return loss if isinstance(loss, str) else getattr(loss, "name", repr(loss))
