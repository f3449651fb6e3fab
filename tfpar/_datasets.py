"""The datasets tfpar's strategies distribute: without tf.data autotuning.

Measured in TensorFlow 2.21: destroying a tf.data iterator whose autotuning
thread (`Model::OptimizeLoop`) is asleep can wait for that sleep to end,
although the iterator's destructor cancels the thread; the sleep doubles as
the iterator lives, up to 10 s. Keras destroys the distributed dataset's
iterator at every epoch's end, so each epoch boundary can lose seconds, on
each worker at a different moment. A native stack (gdb) shows the main thread
in `RootDataset::Iterator::~Iterator` waiting for that thread.

A distributed dataset has two such iterators per worker: the one over the
dataset itself, and one per replica device that TensorFlow builds over a
dataset of its own to copy elements to the device. The strategies turn
autotuning off on both (`DistributesWithoutAutotuning`; measured before a
CPU worker's one replica read through the first alone, below):

- 2 `tfpar.MultiWorkerMirroredStrategy` workers pinned one core each, MLP
  128-1024-1024-2, global batch 8192, 3 epochs of 8 steps after a warm-up:
  7.8 to 11.2 s with the device iterators autotuning, 5.45 and 5.5 s
  without (epoch boundaries 0.8 to 2.4 s, then 0.05 s; one-off scripts);
- the same strategy with autotuning on for the dataset itself too: 6
  epochs of 8 steps at batch 2048 took 24.8 s, 5.5 s without;
- on 2 simulated CPUs in one process pinned to one core, 4 epochs of 8
  steps at batch 4096: epoch boundaries of 0.9 to 3.5 s under
  `tfpar.MirroredStrategy` and 3.5 to 3.6 s under `tfpar.PipelineStrategy`
  (M=4) with autotuning (one-off scripts, one run each);
  `benchmarks/epoch_boundaries.py` measures them without, beside the stock
  strategy.

A worker whose one replica is on its host, where the batches are made (a
CPU worker of the multi-worker strategy, and `PipelineStrategy`), has
nothing to copy: it reads through the first iterator alone.

With autotuning off, values left to `tf.data.AUTOTUNE` are tf.data's
defaults, not tuned; a dataset whose options set `autotune.enabled` keeps
that choice for its own iterator.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from tfpar import _keras_build
from tfpar._compat import datasets as compat
from tfpar._compat import keras_callers
from tfpar._validation import check_instance


def without_autotune_thread(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Returns `dataset` with tf.data's autotuning thread off, unless set.

    A dataset whose options set `autotune.enabled` (to `True` or `False`)
    is returned unchanged: the user's choice stands.

    Args:
        dataset: The dataset to distribute.

    Returns:
        `dataset`, or `dataset.with_options(...)` with `autotune.enabled`
        set to `False`.

    Example:

    ```python
    dataset = tf.data.Dataset.range(8).batch(4)
    without_autotune_thread(dataset).options().autotune.enabled  # False
    ```
    """
    if dataset.options().autotune.enabled is not None:
        return dataset
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


class DistributesWithoutAutotuning:
    """Gives a `tf.distribute.Strategy` subclass datasets that do not autotune.

    Listed before the stock strategy class among the bases, its
    `experimental_distribute_dataset` wraps the stock one.

    Example:

    ```python
    class MirroredStrategy(DistributesWithoutAutotuning, tf.distribute.MirroredStrategy):
        ...
    ```
    """

    def experimental_distribute_dataset(
        self,
        dataset: tf.data.Dataset,
        options: tf.distribute.InputOptions | None = None,
    ) -> Any:
        """Distributes `dataset`, as the stock method does, without autotuning.

        tf.data's autotuning is turned off for `dataset` unless its options
        set `autotune.enabled`, and always for the iterators that copy its
        elements to the replica devices: destroying an iterator (Keras does
        at every epoch's end) can wait for that thread to wake, up to 10 s
        (`docs/mirrored.md` has the measurements). Batches that Keras's
        `fit`, `evaluate` or `predict` reads from Python (a generator, a
        `keras.utils.PyDataset`) are copied first, so that training cannot
        write into the user's arrays; for `fit` and `evaluate`, Keras's model
        build then reads only shapes from the result, not a batch, so that
        such data trains on the same batches as without a strategy
        (`tfpar/_keras_build.py`).

        Args:
            dataset: A `tf.data.Dataset`.
            options: `tf.distribute.InputOptions` or `None`.

        Returns:
            The distributed dataset.

        Raises:
            TypeError: If `dataset` is not a `tf.data.Dataset` (the stock
                method fails with an `AttributeError` deep inside).

        Example:

        ```python
        dataset = tf.data.Dataset.range(8).batch(4)
        for batch in strategy.experimental_distribute_dataset(dataset):
            strategy.run(step, args=(batch,))
        ```
        """
        check_instance("dataset", dataset, tf.data.Dataset, "a tf.data.Dataset")
        caller = keras_callers.find_keras_caller(self)
        dataset = _keras_build.copied_from_python(caller, dataset)
        distributed = self._distribute_without_autotune(
            without_autotune_thread(dataset), options
        )
        return _keras_build.for_keras(caller, distributed, dataset)

    def _distribute_without_autotune(
        self,
        dataset: tf.data.Dataset,
        options: tf.distribute.InputOptions | None,
    ) -> Any:
        """Distributes `dataset` as the stock strategy does, without autotuning.

        Override to distribute otherwise; `dataset` comes with its autotuning
        thread already off (unless its options set it) and Python-fed
        batches copied.

        Args:
            dataset: A `tf.data.Dataset`.
            options: `tf.distribute.InputOptions` or `None`.

        Returns:
            The stock distributed dataset, whose per-device iterators do not
            autotune; where its one replica device is the host that makes
            the batches (a CPU worker), it reads through one plain tf.data
            iterator instead, with nothing to copy.
        """
        distributed = super().experimental_distribute_dataset(  # type: ignore[misc]
            dataset, options
        )
        return compat.without_device_autotune(distributed)
