"""Keras's model build under the mirrored strategies: shapes only, no data read.

Under a strategy, Keras 3's `fit` and `evaluate` start with
`TensorFlowTrainer._maybe_symbolic_build`, which opens an iterator over the
distributed dataset and takes its first batch only to learn the shapes of
the model's inputs; without a strategy Keras reads nothing before training.
For data that does not start over with each iterator, that read changes
what training sees: a Python generator gives that iterator its next
batches, and tf.data prefetches several, so training skipped 4 of 16
batches of a generator (first-epoch loss 0.784 against 0.775 without a
strategy, the same under the stock `tf.distribute.MirroredStrategy`); a
`keras.utils.PyDataset` shuffled by `fit` drew one more permutation from
Python's `random`, and one read by `workers` (threads or processes)
trained on other batches too (tested).

For Keras's `fit` and `evaluate`, the strategies hand Keras a distributed
dataset whose iterator, opened by that build, yields the dataset's element
spec (batch dimension unknown, as a `keras.Input` has it) instead of a
batch: the build gets its shapes, and training reads the data exactly as
without a strategy. Any other iterator is the stock one.

Not covered: a generator given as `validation_data` with
`validation_steps`. Keras opens a new iterator for each validation and
drops the batches the previous one prefetched; the strategy's per-device
prefetching drops more of them than one device does, so from the second
epoch on validation sees other batches (training is unaffected).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import tensorflow as tf

from tfpar._compat import keras_callers
from tfpar._compat import mirrored as compat


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
    from tfpar.strategies.mirrored.keras_build import ShapesForKerasBuild

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
        if compat.called_from_keras_symbolic_build():
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
    strategy: tf.distribute.Strategy, distributed: Any, dataset: tf.data.Dataset
) -> Any:
    """Returns `distributed` as Keras's `fit` or `evaluate` should get it.

    Args:
        strategy: The strategy whose `experimental_distribute_dataset` runs.
        distributed: What the stock method returned for `dataset`.
        dataset: The dataset it distributes.

    Returns:
        A `ShapesForKerasBuild` when Keras's `fit` or `evaluate` of a model
        built under `strategy` is distributing `dataset`, else `distributed`.
    """
    caller = keras_callers.find_keras_caller(strategy)
    if caller is None or caller.method == "predict":
        return distributed
    return ShapesForKerasBuild(distributed, dataset.element_spec)


def _batch_shaped(spec: Any) -> Any:
    """A batch's shape and dtype, batch size unknown; `None` for absent values."""
    if isinstance(spec, tf.OptionalSpec):
        return None  # Keras turns an empty Optional into None before the step.
    shape = tf.TensorShape(spec.shape)
    if shape.rank:
        shape = tf.TensorShape([None]).concatenate(shape[1:])
    return tf.TensorSpec(shape, spec.dtype)
