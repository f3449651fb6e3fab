"""Which Keras model called into a strategy: Keras's call chain, and why.

Used by `tfpar/strategies/parameter_server/strategy.py` and
`tfpar/strategies/mirrored/multi_worker.py`. Keras 3's `fit`, `evaluate` and
`predict` never tell the strategy which model they run; their only call into
it before the first step is `strategy.experimental_distribute_dataset`, from
the constructor of their `TFEpochIterator`. The parameter-server strategy
needs that model (to give it coordinator-aware step functions) and the epoch
iterator (for the epoch length); the multi-worker strategy needs the model
(to make its step functions name a lost worker). Both are found from the
caller frames: the frame layout is Keras's private detail.

`called_from_keras_symbolic_build` recognizes the calls Keras's model build
makes only to learn shapes (`tfpar/_keras_build.py`, `keras_reduce.py`).
`forks_data_workers` tells it that Keras would fork processes to read a
`keras.utils.PyDataset`, which it refuses (see its `fit`). `global_batch_size`
tells the multi-worker strategy the batch Keras will
feed, so that a batch the replicas cannot share evenly is refused before
training: Keras's epoch iterator keeps its data adapter (whose `batch_size`
is documented on Keras's `DataAdapter`) as an attribute, and for a
`tf.data` dataset batched without `drop_remainder` only TensorFlow's own
`compute_batch_size` (what its rebatching reads, not public) knows the size.
"""

from __future__ import annotations

import inspect
import sys
import types
from typing import Any, NamedTuple

import keras
import tensorflow as tf
from tensorflow.python.data.experimental.ops import distribute as _data_distribute

# Keras's call chain is Trainer.fit/evaluate/predict -> TFEpochIterator.__init__
# -> strategy.experimental_distribute_dataset: two frames; a few more are
# searched so that a subclass overriding one of them still works.
_MAX_FRAMES = 6

# The Keras methods that create epoch iterators.
KERAS_ENTRY_POINTS = ("fit", "evaluate", "predict")


class KerasCaller(NamedTuple):
    """The Keras call that is distributing a dataset through a strategy."""

    model: keras.Model
    """The model whose method runs."""
    epoch_iterator: Any
    """Keras's epoch iterator over the data given to that method."""
    method: str
    """`"fit"`, `"evaluate"` or `"predict"`."""


def find_keras_caller(strategy: object) -> KerasCaller | None:
    """Returns the Keras call that is distributing a dataset through `strategy`.

    Args:
        strategy: The strategy whose method is running.

    Returns:
        A `KerasCaller` when a Keras `fit`, `evaluate` or `predict` of a
        model built under `strategy` is on the stack, else `None` (a custom
        training loop: stock behaviour applies).
    """
    frame = inspect.currentframe()
    epoch_iterator = None
    try:
        for _ in range(_MAX_FRAMES):
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            if epoch_iterator is None and hasattr(owner, "num_batches"):
                epoch_iterator = owner
            if (
                isinstance(owner, keras.Model)
                and frame.f_code.co_name in KERAS_ENTRY_POINTS
                and getattr(owner, "distribute_strategy", None) is strategy
            ):
                return KerasCaller(owner, epoch_iterator, frame.f_code.co_name)
            frame = frame.f_back
        return None
    finally:
        del frame  # frames hold references to every local: break the cycle


def called_from_keras_symbolic_build() -> bool:
    """Whether Keras's model build (`_maybe_symbolic_build`) called the caller.

    Why: under a strategy, Keras's `TensorFlowTrainer._maybe_symbolic_build`
    opens an iterator over the distributed dataset and averages its first
    batch (`strategy.reduce`) only to learn shapes; only the caller's frames
    tell those calls from training's or from user code's.
    """
    frame: types.FrameType | None = sys._getframe(1)
    # The caller -> a tfpar override or Keras's epoch generator -> Keras:
    # with slack.
    for _ in range(6):
        if frame is None:
            return False
        if frame.f_code.co_name == "_maybe_symbolic_build" and "keras" in (
            frame.f_code.co_filename
        ):
            return True
        frame = frame.f_back
    return False


def forks_data_workers(epoch_iterator: Any) -> bool:
    """Whether Keras's epoch iterator reads a `PyDataset` in forked processes.

    Why: the `PyDataset` is only on Keras's data adapter (`py_dataset`, not
    public); its `workers` and `use_multiprocessing` are public. Keras forks
    its data workers when `use_multiprocessing` is set and `workers > 0`.

    Args:
        epoch_iterator: Keras's epoch iterator (from `KerasCaller`), or `None`.
    """
    adapter = getattr(epoch_iterator, "data_adapter", None)
    dataset = getattr(adapter, "py_dataset", None)
    return (
        isinstance(dataset, keras.utils.PyDataset)
        and bool(dataset.use_multiprocessing)
        and dataset.workers > 0
    )


def global_batch_size(epoch_iterator: Any, dataset: tf.data.Dataset) -> int | None:
    """Returns the batch size of the batches Keras feeds, if known before training.

    Args:
        epoch_iterator: Keras's epoch iterator (from `KerasCaller`).
        dataset: The dataset it gives the strategy to distribute.

    Returns:
        The batch size of every full batch (the last one of an epoch may be
        smaller), or `None` when it is known only from the data (a
        generator, a `keras.utils.PyDataset`, a dataset mapped after
        batching).
    """
    adapter = getattr(epoch_iterator, "data_adapter", None)
    size = getattr(adapter, "batch_size", None)
    if size is not None:
        return int(size)
    size = int(_data_distribute.compute_batch_size(dataset))
    return size if size > 0 else None
