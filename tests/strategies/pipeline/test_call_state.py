"""What a chunk call adds and updates: added losses summed as Keras does,
state assigned where it belongs, and any other update refused."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.strategies.pipeline._fitting import DEVICES, data
from tfpar import PipelineStrategy
from tfpar.strategies.pipeline.call_state import apply_updates, sum_added_losses


def test_added_losses_are_summed_in_float32_as_keras_aggregates_them() -> None:
    losses = [
        tf.constant([1.5, 2.5], tf.float16),
        tf.constant(3, tf.int32),
        tf.constant([[0.25]], tf.float32),
    ]
    total = sum_added_losses(losses)
    assert total.dtype == tf.float32
    assert float(total) == 7.25


class CountsCalls(keras.layers.Layer):
    """Counts its calls in its own variable."""

    def build(self, input_shape):  # type: ignore[no-untyped-def]
        self.calls = self.add_weight(shape=(), initializer="zeros", trainable=False)

    def call(self, h):  # type: ignore[no-untyped-def]
        self.calls.assign(self.calls + 1.0)
        return h


def test_a_layers_own_state_is_assigned_only_where_asked() -> None:
    layer = CountsCalls()
    chunk = keras.Sequential([keras.Input((2,)), layer])
    for layer_state, expected in [(False, 0.0), (True, 1.0)]:
        scope = keras.StatelessScope(collect_losses=True)
        initial = dict(scope.state_mapping)
        with scope:
            chunk(np.ones((1, 2), "float32"))
        apply_updates(scope, initial, chunk, chunk, layer_state=layer_state)
        assert float(layer.calls.value) == expected


def test_a_layer_assigning_another_stages_variable_is_refused() -> None:
    elsewhere = keras.Variable(0.0, trainable=False)

    class WritesElsewhere(keras.layers.Layer):
        def call(self, h):  # type: ignore[no-untyped-def]
            elsewhere.assign(elsewhere + 1.0)
            return h

    strategy = PipelineStrategy(DEVICES, num_microbatches=2, partition=["out"])
    with strategy.scope():
        model = keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(8, name="d0"),
                WritesElsewhere(name="writes"),
                keras.layers.Dense(2, name="out"),
            ]
        )
        model.compile(optimizer="sgd", loss="mse")
    x, y = data()
    with pytest.raises(ValueError, match="neither one of the chunk's nor a metric's"):
        model.fit(x, y, batch_size=10, epochs=1, verbose=0)
