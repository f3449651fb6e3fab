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
autotuning off on both (`distribute_without_autotuning`):

- 2 `tfpar.MultiWorkerMirroredStrategy` workers pinned one core each, MLP
  128-1024-1024-2, global batch 8192, 3 epochs of 8 steps after a warm-up:
  7.8 to 11.2 s with the device iterators autotuning, 5.45 and 5.5 s
  without (epoch boundaries 0.8 to 2.4 s, then 0.05 s);
- the same strategy with autotuning on for the dataset itself too: 6
  epochs of 8 steps at batch 2048 took 24.8 s, 5.5 s without;
- on 2 simulated CPUs in one process pinned to one core, 4 epochs of 8
  steps at batch 4096: epoch boundaries of 0.9 to 3.5 s under
  `tfpar.MirroredStrategy` and 3.5 to 3.6 s under `tfpar.PipelineStrategy`
  (M=4) with autotuning; `benchmarks/epoch_boundaries.py` measures them
  without, beside the stock strategy.

With autotuning off, values left to `tf.data.AUTOTUNE` are tf.data's
defaults, not tuned; a dataset whose options set `autotune.enabled` keeps
that choice for its own iterator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

from tfpar._compat import datasets as compat


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


def distribute_without_autotuning(
    distribute: Callable[[tf.data.Dataset, Any], Any],
    dataset: tf.data.Dataset,
    options: tf.distribute.InputOptions | None,
) -> Any:
    """Distributes `dataset` with `distribute`, without autotuning threads.

    Args:
        distribute: A stock `experimental_distribute_dataset`.
        dataset: The dataset to distribute; `without_autotune_thread` applies.
        options: `tf.distribute.InputOptions` or `None`, passed on.

    Returns:
        The distributed dataset, whose iterators made in eager mode copy
        elements to the replica devices without autotuning.

    Example:

    ```python
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    distributed = distribute_without_autotuning(
        strategy.experimental_distribute_dataset,
        tf.data.Dataset.range(8).batch(4),
        None,
    )
    ```
    """
    distributed = distribute(without_autotune_thread(dataset), options)
    return compat.without_device_autotune(distributed)
