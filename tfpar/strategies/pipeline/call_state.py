"""What one call of a pipeline chunk adds and updates: losses and state.

Every call of a chunk runs in a `keras.StatelessScope` (`PipelineEngine`'s
`_scope`), which holds what the call changes instead of applying it: the
losses its layers add (`add_loss`, activity regularizers), which the chunk's
own backward pass differentiates, and the variables it assigns, which
`apply_updates` assigns afterwards where the call's state is the real one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf


def sum_added_losses(losses: Sequence[Any]) -> tf.Tensor:
    """The sum of the losses layers added in one call, as Keras adds them.

    Keras casts a non-float loss to `floatx()` and sums each one's elements
    (`Trainer._aggregate_additional_loss`); here every term is float32, the
    dtype of the model's loss under mixed precision too.

    Args:
        losses: The losses collected by a `keras.StatelessScope`.

    Returns:
        A float32 scalar.

    Example:

    ```python
    with keras.StatelessScope(collect_losses=True) as scope:
        chunk(h, training=True)
    added = sum_added_losses(scope.losses) if scope.losses else None
    ```
    """
    return tf.add_n([tf.reduce_sum(tf.cast(loss, tf.float32)) for loss in losses])


def apply_updates(
    scope: keras.StatelessScope,
    initial: dict[int, Any],
    chunk: keras.Model,
    model: keras.Model,
    *,
    layer_state: bool,
) -> None:
    """Assigns the state a chunk call updated in `scope`.

    The model's metrics (Keras's loss tracker of each output, updated by the
    last chunk's loss) are assigned from every call; the chunk's own layer
    state (`BatchNormalization` statistics, seed generators) only from
    replica 0's forward, where `layer_state` is `True`: a replica r > 0 runs
    on a snapshot, and a recomputed forward replays one that already ran.

    Args:
        scope: The scope the chunk was called in.
        initial: `scope.state_mapping` as it was before the call.
        chunk: The chunk.
        model: The whole model.
        layer_state: Whether the chunk's layer state is assigned too.

    Raises:
        ValueError: If the call updated any other variable.

    Example:

    ```python
    scope = keras.StatelessScope(collect_losses=True)
    initial = dict(scope.state_mapping)
    with scope:
        chunk(h, training=True)
    apply_updates(scope, initial, chunk, model, layer_state=True)
    ```
    """
    metrics = {id(v): v for v in model.metrics_variables}
    layers = {id(v): v for v in chunk.variables}
    for key, value in scope.state_mapping.items():
        if value is initial.get(key):
            continue
        if key in metrics:
            metrics[key].assign(value)
        elif key in layers:
            if layer_state:
                layers[key].assign(value)
        else:
            raise ValueError(
                f"PipelineStrategy: a layer of the chunk {chunk.name!r} assigned, "
                "in its call, a variable that is neither one of the chunk's nor "
                "a metric's; a stage may only update the state of its own layers."
            )
