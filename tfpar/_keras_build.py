"""Data Keras reads from Python, under tfpar's strategies: as without one.

Used by `tfpar.MirroredStrategy`, `tfpar.MultiWorkerMirroredStrategy` and
`tfpar.PipelineStrategy` for the datasets Keras's `fit`, `evaluate` and
`predict` distribute. Two things made such data train otherwise than
without a strategy, under the stock strategies too.

Keras's model build reads a batch. Under a strategy, Keras 3's `fit` and
`evaluate` start with `TensorFlowTrainer._maybe_symbolic_build`, which opens
an iterator over the distributed dataset and takes its first batch only to
learn the shapes of the model's inputs; without a strategy Keras reads
nothing before training. For data that does not start over with each
iterator, that read changes what training sees: a Python generator gives
that iterator its next batches, and tf.data prefetches several, so training
skipped 4 of 16 batches of a generator (first-epoch loss 0.784 against 0.775
without a strategy, the same under the stock `tf.distribute.MirroredStrategy`);
a `keras.utils.PyDataset` shuffled by `fit` drew one more permutation from
Python's `random`, and one read by `workers` (threads or processes) trained
on other batches too (tested). So the strategies hand Keras a distributed
dataset whose iterator, opened by that build, yields the dataset's element
spec (batch dimension unknown, as a `keras.Input` has it) instead of a
batch (`for_keras`): the build gets its shapes, and training reads the data
exactly as without a strategy. Any other iterator is the stock one.

Training wrote into the user's arrays. A batch that a generator or a
`PyDataset` yields as NumPy arrays starting on a 64-byte boundary enters
TensorFlow without a copy: the tensor shares the array's memory (often a
view of the user's whole data set; NumPy aligns on 16 bytes, so that held in
about one run in three here). Splitting that batch over the replicas makes
slices that share it too, and TensorFlow lets an op reuse the buffer of an
input that nothing else holds for its output: under `MirroredStrategy`
(stock too) the loss's `y_true - y_pred` overwrote the user's targets in
place (rows 16 to 31 of every 32, the second replica's half; `y` changed by
up to 1.02). The next epoch, or the next model trained on the same arrays,
saw other data; the first epoch never did. So the strategies copy such batches into memory of
TensorFlow's own before distributing them (`copied_from_python`), one
`memcpy` per batch, which the Python iteration of those batches dwarfs.

Not covered: a `tf.data.Dataset.from_generator` that the user builds and
passes to `fit`, or distributes in a custom loop, is not copied (the stock
behaviour, writes included). A generator given as `validation_data` with
`validation_steps`: Keras opens a new iterator for each validation and drops
the batches the previous one prefetched; the strategy's per-device
prefetching drops more of them than one device does, so from the second
epoch on validation sees other batches (training is unaffected).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import tensorflow as tf

from tfpar._compat import datasets as compat
from tfpar._compat import keras_callers


class ShapesForKerasBuild(tf.distribute.DistributedDataset):
    """A distributed dataset whose iterator for Keras's model build reads nothing.

    Delegates to the stock distributed dataset, except for the iterator that
    `TensorFlowTrainer._maybe_symbolic_build` opens, which yields one element
    of `tf.TensorSpec`s (and `None` for an absent value) shaped like a batch.

    Args:
        distributed: The stock distributed dataset.
        element_spec: The element spec of the dataset it distributes.

    Example:

    ```python
    import numpy as np
    import tensorflow as tf
    import tfpar
    from tfpar._keras_build import ShapesForKerasBuild

    tfpar.simulate_devices(2)
    strategy = tfpar.MirroredStrategy()
    dataset = tf.data.Dataset.from_tensor_slices(np.ones((8, 4))).batch(4)
    distributed = ShapesForKerasBuild(
        strategy.experimental_distribute_dataset(dataset), dataset.element_spec
    )
    for batch in distributed:  # the stock batches, 2 rows per replica
        strategy.run(tf.reduce_sum, args=(batch,))
    ```
    """

    def __init__(self, distributed: Any, element_spec: Any) -> None:
        self._distributed = distributed
        self._shapes = tf.nest.map_structure(_batch_shaped, element_spec)

    def __iter__(self) -> Iterator[Any]:
        if keras_callers.called_from_keras_symbolic_build():
            return iter((self._shapes,))
        return iter(self._distributed)

    @property
    def element_spec(self) -> Any:
        """The stock distributed dataset's element spec."""
        return self._distributed.element_spec

    def reduce(self, initial_state: Any, reduce_func: Callable[..., Any]) -> Any:
        """Reduces the elements, as the stock distributed dataset does."""
        return self._distributed.reduce(initial_state, reduce_func)


def for_keras(
    caller: keras_callers.KerasCaller | None,
    distributed: Any,
    dataset: tf.data.Dataset,
) -> Any:
    """Returns `distributed` as Keras's `fit` or `evaluate` should get it.

    Args:
        caller: The Keras call distributing `dataset` (`find_keras_caller`),
            or `None` for a custom training loop.
        distributed: What the stock method returned for `dataset`.
        dataset: The dataset it distributes.

    Returns:
        A `ShapesForKerasBuild` when `caller` is Keras's `fit` or `evaluate`,
        else `distributed`.
    """
    if caller is None or caller.method == "predict":
        return distributed
    return ShapesForKerasBuild(distributed, dataset.element_spec)


def copied_from_python(
    caller: keras_callers.KerasCaller | None, dataset: tf.data.Dataset
) -> tf.data.Dataset:
    """Returns `dataset`, copying its tensors if Keras made them from Python.

    Args:
        caller: The Keras call distributing `dataset` (`find_keras_caller`),
            or `None` for a custom training loop.
        dataset: The dataset about to be distributed.

    Returns:
        `dataset.map(...)` copying every tensor of each element into memory
        TensorFlow owns, when Keras's data adapter of `caller` yields
        Python's arrays (a generator, a `PyDataset`); else `dataset`.

    Example:

    ```python
    caller = keras_callers.find_keras_caller(strategy)
    dataset = copied_from_python(caller, dataset)
    ```
    """
    if caller is None or not compat.fed_from_python(caller.epoch_iterator):
        return dataset
    if isinstance(dataset.element_spec, tuple):
        # tf.data passes a tuple's parts as separate arguments.
        return dataset.map(lambda *parts: _copied(parts))
    return dataset.map(_copied)


def _copied(element: Any) -> Any:
    """`element` with each tensor's data copied (variants, e.g. Optionals, kept)."""

    def copy(tensor: tf.Tensor) -> tf.Tensor:
        if tensor.dtype == tf.variant:
            return tensor
        # tf.identity would hand on the same buffer; DeepCopy allocates.
        return tf.raw_ops.DeepCopy(x=tensor)

    return tf.nest.map_structure(copy, element, expand_composites=True)


def _batch_shaped(spec: Any) -> Any:
    """A batch's shape and dtype, batch size unknown; `None` for absent values."""
    if isinstance(spec, tf.OptionalSpec):
        return None  # Keras turns an empty Optional into None before the step.
    shape = tf.TensorShape(spec.shape)
    if shape.rank:
        shape = tf.TensorShape([None]).concatenate(shape[1:])
    return tf.TensorSpec(shape, spec.dtype)
