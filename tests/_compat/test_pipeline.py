"""Internals of `tfpar.PipelineStrategy` (`tfpar/_compat/pipeline.py`).

Each test fails loudly when an upgrade removes or changes what this area
relies on; `tfpar/_compat/pipeline.py` says why each internal is needed.
Runs on the two simulated CPUs of `tests/conftest.py`.
"""

from typing import Any

import keras
import tensorflow as tf

from tests._models import mlp
from tfpar._compat import pipeline as _compat


def test_compat_internals_exist() -> None:
    # Fails loudly when a TensorFlow or Keras upgrade removes what
    # tfpar/_compat/pipeline.py relies on.
    model = mlp()
    model.compile(optimizer="sgd", loss="mse")
    assert _compat.keras_step(model.train_step) == (model, "train")
    assert _compat.keras_step(model.test_step) == (model, "test")
    assert isinstance(_compat.loss_tracker(model), keras.metrics.Mean)
    variable = model.get_layer("d0").kernel
    assert isinstance(variable.value, tf.Variable) and hasattr(variable, "_value")
    unique_id = variable.value._unique_id
    _compat.move_variable(variable, "/device:CPU:1")
    assert (
        variable.value.device.endswith("CPU:1")
        and variable.value._unique_id == unique_id
    )
    dropout = keras.Sequential([keras.Input((4,)), keras.layers.Dropout(0.5)])
    assert _compat.seed_states(dropout) == [dropout.layers[0].seed_generator.state]


class _Recording(_compat.OneDeviceAdapter):
    """The stock one-device behaviour, recording which private hook ran."""

    def __init__(self, container: tf.distribute.Strategy) -> None:
        super().__init__(container, "/device:CPU:0")
        self.calls: list[str] = []

    def make_variable(self, next_creator: Any, **kwargs: Any) -> Any:
        self.calls.append("make_variable")
        return super().make_variable(next_creator, **kwargs)

    def run_replica_fn(self, fn: Any, args: Any, kwargs: Any) -> Any:
        self.calls.append("run_replica_fn")
        return super().run_replica_fn(fn, args, kwargs)

    def uses_merge_call(self) -> bool:
        self.calls.append("uses_merge_call")
        return False

    def update_variable(
        self, var: Any, fn: Any, args: Any, kwargs: Any, group: bool
    ) -> Any:
        self.calls.append("update_variable")
        return super().update_variable(var, fn, args, kwargs, group)


class _Strategy(tf.distribute.Strategy):
    def __init__(self) -> None:
        super().__init__(_Recording(self))


def test_tensorflow_calls_the_one_device_hooks() -> None:
    # OneDeviceAdapter: TensorFlow reaches each tfpar-named hook through its
    # private name, and the stock one-device defaults still work.
    strategy = _Strategy()
    calls = strategy.extended.calls
    with strategy.scope():
        variable = tf.Variable(1.0)
        assert calls == ["make_variable"]
        assert tf.__internal__.distribute.strategy_supports_no_merge_call()
        assert calls[-1] == "uses_merge_call"
    assert strategy.run(lambda: tf.constant(2.0)).numpy() == 2.0
    assert calls[-1] == "run_replica_fn"
    strategy.extended.update(variable, lambda v, x: v.assign_add(x), args=(2.0,))
    assert calls[-1] == "update_variable" and variable.numpy() == 3.0
    assert strategy.experimental_local_results(variable) == (variable,)


def test_one_replica_context_is_entered_and_leaves_values_alone() -> None:
    # OneReplicaContext: entering a ReplicaContext with `with` (what Keras's
    # LossScaleOptimizer requires), merge_call and updates from inside it.
    strategy = _Strategy()
    calls = strategy.extended.calls
    with strategy.scope():
        variable = tf.Variable(1.0)
        assert tf.distribute.in_cross_replica_context()
        context = _compat.OneReplicaContext(strategy)
        with context:
            assert tf.distribute.get_replica_context() is context
            assert not tf.distribute.in_cross_replica_context()
            value = tf.constant(2.0)
            assert context.all_reduce(tf.distribute.ReduceOp.SUM, [value])[0] is value
            strategy.extended.update(variable, lambda v, x: v.assign_add(x), (value,))
            merged = context.merge_call(
                lambda s: s is strategy and tf.distribute.in_cross_replica_context()
            )
        assert merged and tf.distribute.in_cross_replica_context()
    assert calls[-1] == "update_variable" and variable.numpy() == 3.0


def test_overridden_steps_are_recognized() -> None:
    class Custom(keras.Sequential):
        def train_step(self, data: Any) -> Any:
            return super().train_step(data)

    model = Custom([keras.Input((2,)), keras.layers.Dense(1)])
    assert _compat.overrides_step(model, "train")
    assert not _compat.overrides_step(model, "test")
    assert not _compat.overrides_step(mlp(), "predict")


def test_layer_calls_and_masks_are_read_from_keras_nodes() -> None:
    # layer_calls, keras_mask: every call of a shared layer, with its tensors,
    # and the mask an Embedding(mask_zero=True) attaches to its output.
    ids = keras.Input((4,), dtype="int32", name="ids")
    embedded = keras.layers.Embedding(5, 3, mask_zero=True, name="emb")(ids)
    shared = keras.layers.Dense(3, name="shared")
    first = shared(embedded)
    second = shared(keras.layers.Dense(3, name="mid")(first))
    calls = _compat.layer_calls([ids], [second])
    assert [(c.operation.name, c.node_index) for c in calls] == [
        ("emb", 0),
        ("shared", 0),
        ("mid", 0),
        ("shared", 1),
    ]
    assert calls[0].inputs == (ids,) and calls[0].outputs == (embedded,)
    assert calls[3].outputs == (second,)
    assert _compat.keras_mask(embedded) is not None
    assert _compat.keras_mask(ids) is None
