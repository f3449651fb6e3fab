"""Internals of the callbacks (`tfpar/_compat/callbacks.py`).

Each test fails loudly when an upgrade removes or changes what this area
relies on; `tfpar/_compat/callbacks.py` says why each internal is needed.
Runs on the two simulated CPUs of `tests/conftest.py`.
"""

import tensorflow as tf

from tfpar._compat import callbacks as _compat
from tfpar.callbacks.profiling import OpDevices


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
