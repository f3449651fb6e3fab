"""The tf.data options of the datasets the multi-worker strategy distributes.

Measured under `tfpar.MultiWorkerMirroredStrategy` (2 worker processes
pinned one core each, TensorFlow 2.21, `benchmarks/multi_worker.py`): each
time an iterator over a distributed dataset is destroyed (at the end of
every epoch of a Keras `fit` over arrays, at the end of every `fit`), the
destruction waits for tf.data's autotuning thread to wake from its sleep,
which grows to 10 seconds; the stack shows `MultiDeviceIterator`'s buffer
destroying its host iterator, which waits in `Model::OptimizeLoop`. Six
epochs of 8 steps of an MLP took 24 s instead of 4 s, and a `fit` of 24
steps 5 to 20 s instead of 5, which is why the stock strategy under tf-keras
2 measures bimodal. Without that thread (`tf.data.Options().autotune.enabled
= False`) no destruction waits; parallelism asked for with
`tf.data.AUTOTUNE` then stays at tf.data's default (the number of cores, at
most 16) and `prefetch(tf.data.AUTOTUNE)` still grows its buffer with
tf.data's own prefetch autotuner, which needs no thread.
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
    """
    if dataset.options().autotune.enabled is not None:
        return dataset
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)
