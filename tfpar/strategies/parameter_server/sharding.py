"""Keras 3 models whose large variables are sharded over parameter servers.

With a `variable_partitioner`, TensorFlow creates a large variable (say a
`keras.layers.Embedding` table) as a `ShardedVariable`: one `tf.Variable` per
shard, each on its own PS, rows split in order ("div" partitioning). Keras 3
wraps that object as if it were one `tf.Variable`, which covers reading,
assigning, `get_weights`, `set_weights` and saving (the shards are
concatenated into one array, so a saved model loads into an ordinary,
unsharded layer). `prepare_sharded_model` adds what training needs:

- gradients: `GradientTape` differentiates each shard and hands Keras's
  optimizer one gradient of the whole variable (`IndexedSlices` for an
  embedding lookup), and optimizer updates run on each shard's own PS
  (`tfpar/_compat/sharding.py`);
- lookups: an `Embedding` with a sharded table gathers only the rows it needs
  from each PS (`tf.nn.embedding_lookup` on the shards), instead of Keras's
  `ops.take`, which would first concatenate the whole table on the worker.
  Only public Keras attributes are read; the layer moves to a subclass listed
  in `tfpar._subclass.OBJECT_SWAPS` ("sharded_lookup").
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import keras
import tensorflow as tf

from tfpar._compat import sharding as _compat
from tfpar._subclass import use_overrides
from tfpar._variables import backing_variable


def prepare_sharded_model(model: keras.Model, variables: list[Any]) -> int:
    """Makes the sharded variables among `variables` of `model` trainable.

    Args:
        model: A Keras model built under the strategy.
        variables: Its Keras variables, with its metrics' and optimizer's.

    Returns:
        The number of sharded variables found.
    """
    sharded = [v for v in variables if _compat.is_sharded(v)]
    if not sharded:
        return 0
    for layer in _layers(model):
        if _has_sharded_table(layer):
            # Saved configs still name the stock class: loads without tfpar.
            use_overrides(
                layer, "sharded_lookup", {"call": _sharded_call}, _LOOKUP_CLASSES
            )
    return len(sharded)


def _has_sharded_table(layer: Any) -> bool:
    # A quantized or LoRA table is not one variable: Keras's lookup applies.
    return (
        isinstance(layer, keras.layers.Embedding)
        and layer.built
        and layer.quantization_mode is None
        and not layer.lora_enabled
        and _compat.is_sharded(layer.embeddings)
    )


def _layers(layer: Any) -> Iterator[Any]:
    """Every layer inside `layer` (nested models included), and itself."""
    yield layer
    for child in getattr(layer, "layers", ()):
        yield from _layers(child)


_LOOKUP_CLASSES: dict[type, type] = {}


def _sharded_call(self: Any, inputs: Any) -> Any:
    if self.quantization_mode is not None or self.lora_enabled:
        # The class made by `use_overrides` is `type(self)`: its parent's call.
        return super(type(self), self).call(inputs)
    if inputs.dtype not in (tf.int32, tf.int64):
        inputs = tf.cast(inputs, tf.int32)
    # Dispatches on the ShardedVariable: a gather on each shard's PS.
    outputs = tf.nn.embedding_lookup(backing_variable(self.embeddings), inputs)
    return tf.cast(outputs, self.compute_dtype)
