"""The private TensorFlow and Keras internals `tfpar/_compat.py` relies on.

Each test fails loudly when an upgrade removes what one area relies on; the
module docstring of `tfpar/_compat.py` says why each internal is needed.
Runs on the two simulated CPUs of `tests/conftest.py`.
"""

import keras
import tensorflow as tf

from tfpar import _compat
from tfpar.callbacks.profiling import OpDevices

DEVICES = ["/device:CPU:0", "/device:CPU:1"]


def mlp() -> keras.Model:
    keras.utils.set_random_seed(7)
    return keras.Sequential(
        [keras.Input((6,))]
        + [keras.layers.Dense(8, activation="tanh", name=f"d{i}") for i in range(3)]
        + [keras.layers.Dense(2, name="out")]
    )


# --- MirroredStrategy -------------------------------------------------------


def test_private_tensorflow_internals_exist() -> None:
    # Fails loudly when a TensorFlow or Keras upgrade removes what
    # MirroredStrategy's part of tfpar/_compat.py relies on.
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer
    from tensorflow.python.distribute import values

    assert hasattr(values, "PerReplica") and hasattr(values, "Mirrored")
    assert hasattr(TensorFlowTrainer, "_maybe_symbolic_build")
    assert tf.distribute.MirroredStrategy._collective_key_base == 0
    stock = tf.distribute.MirroredStrategy(DEVICES)
    assert isinstance(
        _compat.stock_default_cross_device_ops(stock.extended),
        tf.distribute.CrossDeviceOps,
    )


# --- PipelineStrategy -------------------------------------------------------


def test_compat_internals_exist() -> None:
    # Fails loudly when a TensorFlow or Keras upgrade removes what
    # PipelineStrategy's part of tfpar/_compat.py relies on.
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
    assert hasattr(_compat.OneDeviceExtended, "_call_for_each_replica")
    assert hasattr(_compat.OneDeviceExtended, "_update")


# --- Callbacks --------------------------------------------------------------


def test_compat_graph_collection_returns_placed_graphs() -> None:
    # Fails loudly if TensorFlow drops the private graph-collection API.
    @tf.function
    def f(x: tf.Tensor) -> tf.Tensor:
        with tf.device("/device:CPU:1"):
            y = tf.linalg.matmul(x, x, name="placed_on_one")
        return y + 1.0

    _compat.start_graph_collection()
    f(tf.ones((4, 4)))
    ops = OpDevices.from_run_metadata(_compat.stop_graph_collection())
    assert ops.devices["placed_on_one"] == "/device:CPU:1"
