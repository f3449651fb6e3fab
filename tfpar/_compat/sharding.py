"""Private TensorFlow internals for sharded variables under a parameter server.

A `variable_partitioner` makes TensorFlow create large variables as a
`ShardedVariable` (one `tf.Variable` per shard, spread over the PS tasks),
which Keras 3 then wraps as if it were one `tf.Variable`. Keras paths that
need what a `ShardedVariable` lacks, each with no public hook:

- `GradientTape.gradient(loss, keras_variable)` asks the variable for its
  one resource `handle`. `_ShardedGradient` (TensorFlow's composite-tensor
  gradient protocol, `composite_tensor_gradient`) lets the tape
  differentiate every shard and hands Keras one gradient of the whole
  variable.
- Saving converts variables with `np.asarray`, which needs `__array__`.
- The optimizer updates a variable through `strategy.extended.update`,
  whose parameter-server implementation (`_update`) colocates the update
  with the variable's one device; a sharded variable's shards update on
  their own PS each, so its update runs without that colocation.
- The optimizer creates its slots (Adam's moments) under
  `extended.colocate_vars_with(variable)`, which TensorFlow never
  partitions; for a sharded variable they are sharded like it instead.
All four are methods of tfpar subclasses: `TfparTrainableShardedVariable`
(of `ShardedVariable`) and `TfparShardedExtended` (of the strategy's
extended object, whose `_create_variable` gives every new sharded variable
that class); both are listed in `tfpar._subclass.OBJECT_SWAPS`. The private
TensorFlow names they use: `ShardedVariable` and `UpdateContext` (no public
export), `composite_tensor_gradient.CompositeTensorGradient`, and the
extended object's `_create_variable`, `_update`, `_select_single_value` and
`_local_results`.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.python.distribute.distribute_lib import UpdateContext
from tensorflow.python.distribute.sharded_variable import ShardedVariable
from tensorflow.python.framework import composite_tensor_gradient

from tfpar._compat.parameter_server import TfparParameterServerExtended
from tfpar._subclass import swap_class
from tfpar._variables import backing_variable


def is_sharded(variable: Any) -> bool:
    """Whether a Keras variable (or a `tf.Variable`) is a `ShardedVariable`."""
    return isinstance(backing_variable(variable), ShardedVariable)


def merge_shard_gradients(
    shape: tf.TensorShape, shard_rows: Sequence[int], grads: Sequence[Any]
) -> Any:
    """One gradient of a whole sharded variable from its shards' gradients.

    Sparse shard gradients (an embedding lookup's) stay sparse: one
    `IndexedSlices` whose row indices are shifted by each shard's first row.
    """
    if all(g is None for g in grads):
        return None
    offsets = list(itertools.accumulate([0, *shard_rows[:-1]]))
    if all(g is None or isinstance(g, tf.IndexedSlices) for g in grads):
        present = [(g, o) for g, o in zip(grads, offsets, strict=True) if g is not None]
        return tf.IndexedSlices(
            values=tf.concat([g.values for g, _ in present], axis=0),
            indices=tf.concat(
                [tf.cast(g.indices, tf.int64) + o for g, o in present], axis=0
            ),
            dense_shape=tf.constant(shape.as_list(), tf.int64),
        )
    dense = [
        tf.zeros([rows, *shape[1:]]) if g is None else tf.convert_to_tensor(g)
        for g, rows in zip(grads, shard_rows, strict=True)
    ]
    return tf.concat(dense, axis=0)


class _ShardedGradient(composite_tensor_gradient.CompositeTensorGradient):
    """Differentiates a sharded variable through each shard's handle."""

    def get_gradient_components(self, value: Any) -> Any:
        return [v.handle for v in value.variables]

    def replace_gradient_components(self, value: Any, component_grads: Any) -> Any:
        rows = [int(v.shape[0]) for v in value.variables]
        return merge_shard_gradients(value.shape, rows, component_grads)


class TfparTrainableShardedVariable(ShardedVariable):
    """A `ShardedVariable` that Keras can differentiate and save as one."""

    __composite_gradient__ = _ShardedGradient()

    @property
    def handle(self) -> Any:
        # The tape differentiates `keras_variable.handle`: this object, which
        # `__composite_gradient__` expands into the shards' handles.
        return self

    def __array__(self, dtype: Any = None) -> Any:
        return np.asarray(self.numpy(), dtype=dtype)

    # `tf.train.Checkpoint` of a Keras variable saves what these return: the
    # whole table under the variable's usual key, so a checkpoint restores
    # into an unsharded model (or another sharding) as well.
    def _serialize_to_tensors(self) -> dict[str, Any]:
        return {"VARIABLE_VALUE": tf.convert_to_tensor(self)}

    def _restore_from_tensors(self, restored_tensors: dict[str, Any]) -> Any:
        return self.assign(restored_tensors["VARIABLE_VALUE"])


class TfparShardedExtended(TfparParameterServerExtended):
    """tfpar's extended object, for a strategy with a `variable_partitioner`."""

    def _create_variable(self, next_creator: Any, **kwargs: Any) -> Any:
        variable = super()._create_variable(next_creator, **kwargs)
        if type(variable) is ShardedVariable:
            swap_class(
                variable, "trainable_sharded_variable", TfparTrainableShardedVariable
            )
        return variable

    def _update(self, var: Any, fn: Any, args: Any, kwargs: Any, group: bool) -> Any:
        if not isinstance(var, ShardedVariable):
            return super()._update(var, fn, args, kwargs, group)
        # Each shard's update is an op on that shard's PS (TensorFlow places
        # resource ops with their resource): no single device to colocate with.
        with UpdateContext(var.variables[0].device):
            result = fn(
                var,
                *self._select_single_value(args),
                **self._select_single_value(kwargs),
            )
        return result if group else tf.nest.map_structure(self._local_results, result)

    def colocate_vars_with(self, colocate_with_variable: Any) -> Any:
        if isinstance(colocate_with_variable, ShardedVariable):
            # Created without colocation, the variable (an optimizer slot of
            # the same shape) is partitioned like the one it would colocate
            # with.
            return contextlib.nullcontext()
        return super().colocate_vars_with(colocate_with_variable)


def support_sharded_variables(extended: tf.distribute.StrategyExtended) -> None:
    """Lets Keras 3 train, update and save the strategy's sharded variables.

    Must run before any variable is created under the strategy, on an
    extended object already moved by `use_tfpar_extended`.
    """
    swap_class(extended, "ps_extended", TfparShardedExtended)
