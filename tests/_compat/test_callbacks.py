"""Internals of the callbacks (`tfpar/_compat/callbacks.py`).

Each test fails loudly when an upgrade removes or changes what this area
relies on; `tfpar/_compat/callbacks.py` says why each internal is needed.
Runs on the two simulated CPUs of `tests/conftest.py`.
"""

import pathlib

import tensorflow as tf

from tfpar._compat import callbacks as _compat
from tfpar.callbacks.placement import OpDevices


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


def test_compat_xspace_reads_the_traces_tf_profiler_writes(
    tmp_path: pathlib.Path,
) -> None:
    # Fails loudly if TensorFlow moves the private XPlane proto, or its traces
    # stop naming op events "<op name>:<op type>" or recording when the
    # session started (what busy_seconds relies on).
    @tf.function
    def f(x: tf.Tensor) -> tf.Tensor:
        return tf.linalg.matmul(x, x, name="traced_matmul")

    f(tf.ones((64, 64)))
    tf.profiler.experimental.start(str(tmp_path))
    f(tf.ones((64, 64)))
    tf.profiler.experimental.stop()
    (trace,) = tmp_path.glob("plugins/profile/*/*.xplane.pb")
    space = _compat.xspace(trace.read_bytes())
    names = {m.name for p in space.planes for m in p.event_metadata.values()}
    # The type may be a oneDNN rewrite (_MklMatMul), the name is ours.
    assert any(n.startswith("traced_matmul:") for n in names), names
    stats = {m.name for p in space.planes for m in p.stat_metadata.values()}
    assert "profile_start_time" in stats
    assert _compat.xspace().planes == []


def test_compat_gpu_bus_ids_lists_local_devices() -> None:
    # Fails loudly if TensorFlow drops device_lib; the test CPUs have no bus id.
    assert _compat.gpu_bus_ids() == {}
