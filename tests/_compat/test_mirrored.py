"""Internals of `tfpar.MirroredStrategy` (`tfpar/_compat/mirrored.py`).

Each test fails loudly when an upgrade removes or changes what this area
relies on; `tfpar/_compat/mirrored.py` says why each internal is needed.
Runs on the two simulated CPUs of `tests/conftest.py`.
"""

import inspect

import tensorflow as tf

from tfpar._compat import mirrored as _compat

DEVICES = ["/device:CPU:0", "/device:CPU:1"]


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


def test_mirrored_remote_devices_and_no_merge_call_internals_exist() -> None:
    # use_remote_devices and reduce_without_merge_call_in_nested_graphs.
    from tensorflow.python.distribute import mirrored_run, mirrored_strategy

    extended = mirrored_strategy.MirroredExtended
    for name in ("_initialize_strategy", "_use_merge_call", "_get_cross_device_ops"):
        assert callable(getattr(extended, name)), name
    stock = tf.distribute.MirroredStrategy(DEVICES)
    for name in ("_input_workers_devices", "_host_input_device", "_default_device"):
        assert hasattr(stock.extended, name), name
    thread = inspect.getsource(mirrored_run._MirroredReplicaThread)
    assert "self.graph = " in thread
    assert "not supported in eager mode" in inspect.getsource(extended.__init__)
