"""The tf.data options of the datasets the multi-worker strategy distributes.

Measured under `tfpar.MultiWorkerMirroredStrategy` (2 worker processes
pinned one core each, TensorFlow 2.21): each time an iterator over a
distributed dataset is destroyed (at the end of every epoch of a Keras `fit`
over arrays, at the end of every `fit`), the destruction waits for tf.data's
autotuning thread to wake from its sleep (waits of up to 10 s seen); a
native stack shows `MultiDeviceIterator`'s buffer destroying its host
iterator, which waits in `Model::OptimizeLoop`. Six epochs of 8 steps of an
MLP took 24.8 s, and 5.5 s with that thread off; a `fit` of 24 steps took
5.2 to 20.5 s. This is also why the stock strategy under tf-keras 2
measures bimodal (`benchmarks/multi_worker.py`). With the thread off
(`tf.data.Options().autotune.enabled = False`) no destruction waited;
values left to `tf.data.AUTOTUNE` are then tf.data's defaults, not tuned.
"""

from __future__ import annotations

import tensorflow as tf


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
