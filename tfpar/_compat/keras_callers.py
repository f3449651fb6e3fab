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
"""

from __future__ import annotations

import inspect
from typing import Any

import keras

# Keras's call chain is Trainer.fit/evaluate/predict -> TFEpochIterator.__init__
# -> strategy.experimental_distribute_dataset: two frames; a few more are
# searched so that a subclass overriding one of them still works.
_MAX_FRAMES = 6

# The Keras methods that create epoch iterators.
KERAS_ENTRY_POINTS = ("fit", "evaluate", "predict")


def find_keras_caller(strategy: object) -> tuple[keras.Model, Any] | None:
    """Returns the Keras model and epoch iterator that called into `strategy`.

    Args:
        strategy: The strategy whose method is running.

    Returns:
        `(model, epoch_iterator)` when a Keras `fit`, `evaluate` or `predict`
        of a model built under `strategy` is on the stack, else `None` (a
        custom training loop: stock behaviour applies).
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
                return owner, epoch_iterator
            frame = frame.f_back
        return None
    finally:
        del frame  # frames hold references to every local: break the cycle
