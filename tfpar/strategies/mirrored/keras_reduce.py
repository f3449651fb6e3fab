"""How the synchronous strategies answer Keras 3's own `strategy.reduce` calls.

Keras 3 calls `Strategy.reduce` in two places the stock strategies get wrong:

- `TensorFlowTrainer._maybe_symbolic_build` averages the first distributed
  batch over the replicas (`reduce("MEAN", batch, axis=None)`) only to learn
  its shapes. Over local replicas this fails with an AddN shape error when
  the batch does not split evenly (keras-team/keras issue 19246); under the
  stock `MultiWorkerMirroredStrategy` it always fails ("Attempt to convert a
  value (PerReplica...)", keras-team/keras issue 20585). The first local
  replica's batch has the shapes Keras needs.
- Under a multi-worker strategy, Keras's `reduce_per_replica` averages each
  scalar metric with `reduce("MEAN", value, axis=0)`, which fails on rank-0
  values ("Invalid reduction dimension 0"). A scalar has no axis 0: its mean
  over the replicas is the reduction with `axis=None`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

from tfpar._compat import keras_callers


def reduce_for_keras(
    stock_reduce: Callable[[Any, Any, Any], Any],
    reduce_op: Any,
    value: Any,
    axis: Any,
    num_replicas: int,
) -> Any:
    """`Strategy.reduce`, answering Keras's two calls that stock gets wrong.

    Args:
        stock_reduce: The stock strategy's `reduce(reduce_op, value, axis)`.
        reduce_op: A `tf.distribute.ReduceOp` or its name.
        value: The per-replica values (a nested structure).
        axis: `None`, or the axis to reduce within each replica's value.
        num_replicas: Replicas in sync, for the error message.

    Returns:
        The reduced value, as the stock strategy returns it.

    Raises:
        ValueError: If `axis=None` and the local replicas' values differ in
            shape (outside Keras's model build).
    """
    if axis is None and tf.executing_eagerly():
        if keras_callers.called_from_keras_symbolic_build():
            return tf.nest.map_structure(_first_replica, value)
        uneven = _uneven_shapes(value)
        if uneven:
            raise ValueError(
                "strategy.reduce() with axis=None needs every replica's value "
                f"to have one shape. Received: shapes {uneven} over "
                f"{num_replicas} replicas (a batch that does not split evenly? "
                "Reduce with axis=0, or use a batch size divisible by the number "
                "of replicas)."
            )
    if axis == 0 and _all_scalars(value):
        axis = None
    return stock_reduce(reduce_op, value, axis)


def _is_distributed(value: Any) -> bool:
    return isinstance(value, tf.distribute.DistributedValues)


def _first_replica(value: Any) -> Any:
    return value.values[0] if _is_distributed(value) else value


def _all_scalars(value: Any) -> bool:
    leaves = tf.nest.flatten(value)
    return bool(leaves) and all(
        len(getattr(_first_replica(leaf), "shape", ())) == 0 for leaf in leaves
    )


def _uneven_shapes(value: Any) -> list[tuple[tuple[int | None, ...], ...]]:
    """Lists per-replica shapes of the leaves whose replicas differ in shape."""
    found = []
    for leaf in tf.nest.flatten(value, expand_composites=False):
        if _is_distributed(leaf):
            shapes = tuple(tuple(v.shape) for v in leaf.values)
            if len(set(shapes)) > 1:
                found.append(shapes)
    return found
