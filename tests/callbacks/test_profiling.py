"""Tests for tfpar.callbacks.profiling: measured busy time per device, parsed off-thread."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.callbacks._tb import read_scalars
from tfpar._compat import callbacks as _compat
from tfpar.callbacks.device_utilization import DeviceUtilization
from tfpar.callbacks.placement import OpDevices
from tfpar.callbacks.profiling import ParsedWindow, TraceParser, busy_seconds
from tfpar.callbacks.sources import Sample

MS = 1_000_000  # ns


def _xspace(start_ns: int, lines: dict[str, list[tuple[str, int, int]]]) -> bytes:
    """Builds a trace: per line, (event name, begin ns, duration ns) after start."""
    space = _compat.xspace()
    host = space.planes.add(name="/host:CPU")
    ids: dict[str, int] = {}
    for line_id, (line_name, events) in enumerate(lines.items()):
        line = host.lines.add(id=line_id, name=line_name, timestamp_ns=0)
        for name, begin, duration in events:
            if name not in ids:
                ids[name] = len(ids) + 1
                host.event_metadata[ids[name]].id = ids[name]
                host.event_metadata[ids[name]].name = name
            line.events.add(
                metadata_id=ids[name],
                offset_ps=begin * 1000,
                duration_ps=duration * 1000,
            )
    env = space.planes.add(name="Task Environment")
    env.stat_metadata[1].id = 1
    env.stat_metadata[1].name = "profile_start_time"
    env.stats.add(metadata_id=1, uint64_value=start_ns)
    return space.SerializeToString()


def test_busy_time_is_the_union_of_op_intervals_per_device() -> None:
    start = 10**18
    trace = _xspace(
        start,
        {
            "tf_Compute/1": [
                ("a/MatMul:MatMul", 0, 4 * MS),  # CPU:0, 0-4 ms
                ("b/MatMul:MatMul", 10 * MS, 2 * MS),  # CPU:1, 10-12 ms
                ("ExecutorState::Process", 0, 20 * MS),  # not an op
                ("r/Recv:_Recv", 0, 20 * MS),  # waiting, not work
            ],
            "tf_Compute/2": [
                ("c/Add:AddV2", 2 * MS, 4 * MS),  # CPU:0, 2-6 ms, overlaps a
                ("unknown/Op:Mul", 0, 1 * MS),  # no device known
            ],
            "tf_data_iterator/3": [("a/MatMul:MatMul", 0, 20 * MS)],  # input pipeline
        },
    )
    ops = OpDevices(
        {
            "a/MatMul": "/device:CPU:0",
            "c/Add": "/device:CPU:0",
            "b/MatMul": "/device:CPU:1",
            "r/Recv": "/device:CPU:1",
        }
    )
    busy = busy_seconds(trace, ops, start_ns=start, end_ns=start + 20 * MS)
    assert busy == {
        "/device:CPU:0": pytest.approx(0.006),
        "/device:CPU:1": pytest.approx(0.002),
    }
    # The window clips: only 3-11 ms counts.
    clipped = busy_seconds(trace, ops, start_ns=start + 3 * MS, end_ns=start + 11 * MS)
    assert clipped == {
        "/device:CPU:0": pytest.approx(0.003),
        "/device:CPU:1": pytest.approx(0.001),
    }
    # Devices whose ops all ran outside the window were seen: idle, not absent.
    late = busy_seconds(trace, ops, start_ns=start + 13 * MS, end_ns=start + 20 * MS)
    assert late == {"/device:CPU:0": 0.0, "/device:CPU:1": 0.0}
    # With one device, unknown ops belong to it.
    single = busy_seconds(
        trace,
        OpDevices({}),
        start_ns=start,
        end_ns=start + 20 * MS,
        fallback_device="/device:CPU:0",
    )
    assert single == {"/device:CPU:0": pytest.approx(0.008)}  # 0-6 and 10-12 ms


class FakeProfiler:
    """Stands in for `StepProfiler`: "stops" by handing over a prepared trace."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.discarded: list[str] = []

    def stop(self) -> str | None:
        path, self.path = self.path, None
        return path

    def discard(self, path: str) -> None:
        self.discarded.append(path)


WORKER = "/job:worker/replica:0/task:1/device:CPU:0"


def test_trace_parser_turns_a_window_into_utilization_samples(tmp_path) -> None:
    start = 10**18
    trace = _xspace(
        start,
        {
            "tf_Compute/1": [("a/MatMul:MatMul", 0, 5 * MS)],
            # Overlaps a in a 5 ms window: their union is 100 %, a sum 200 %.
            "tf_Compute/2": [("c/Add:AddV2", 0, 5 * MS)],
        },
    )
    path = tmp_path / "window.xplane.pb"
    path.write_bytes(trace)
    profiler = FakeProfiler(str(path))
    errors: list[BaseException] = []
    parser = TraceParser(profiler, on_error=errors.append)
    # CPU:0 has no op placed on it: idle, 0 % measured. The worker's 14 ops
    # never show in this process's trace: unknown, no sample.
    ops = OpDevices(
        {"a/MatMul": "/device:CPU:1", "c/Add": "/device:CPU:1", "w/MatMul": WORKER},
        {"/device:CPU:1": 2, WORKER: 14},
    )
    devices = ["/device:CPU:0", "/device:CPU:1", WORKER]
    parser.submit(7, (start, start + 5 * MS), devices, ops, None)
    parser.wait()
    assert parser.collect() == [
        ParsedWindow(
            7,
            (
                Sample("device/CPU:0/utilization", 0.0),
                Sample("device/CPU:1/utilization", 100.0),
            ),
            {WORKER: 14},
        )
    ]
    assert parser.collect() == []  # each result once
    assert profiler.discarded == [str(path)] and not errors
    # The fallback device runs the step: no op in the trace is unknown, not 0.
    path.write_bytes(
        _xspace(start, {"tf_Compute/1": [("ExecutorState::Process", 0, MS)]})
    )
    profiler.path = str(path)
    parser.submit(
        8, (start, start + MS), ["/device:CPU:0"], OpDevices({}), "/device:CPU:0"
    )
    parser.wait()
    assert parser.collect() == [ParsedWindow(8, (), {"/device:CPU:0": 0})]
    # A trace that cannot be read is reported, not raised.
    profiler.path = str(tmp_path / "missing.xplane.pb")
    parser.submit(9, (start, start + MS), devices, ops, None)
    parser.shutdown()
    assert parser.collect() == []
    assert [type(e) for e in errors] == [FileNotFoundError]


class ForwardWork(keras.layers.Layer):
    """`repeats` matmuls on `device`, outside the gradient: known work per device."""

    def __init__(self, device: str, repeats: int, width: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.device, self.repeats, self.width = device, repeats, width

    def build(self, input_shape: tuple) -> None:
        self.w = self.add_weight(
            shape=(self.width, self.width), initializer="orthogonal", trainable=False
        )

    def call(self, x: tf.Tensor) -> tf.Tensor:
        with tf.device(self.device):
            h = tf.stop_gradient(tf.tile(x[:, :1], [1, self.width]))
            for _ in range(self.repeats):
                h = tf.tanh(tf.matmul(h, self.w))
            side = tf.reduce_mean(h)
        return x + 1e-9 * side


def test_hand_placed_3_to_1_work_shows_as_3_to_1_utilization(tmp_path: str) -> None:
    # Device 0 runs 3x the matmuls of device 1; the measured busy time must
    # say so. A made-up or evenly split number fails.
    width = 384
    x = np.random.default_rng(0).standard_normal((64 * 12, 8)).astype("float32")
    y = x[:, :1]
    model = keras.Sequential(
        [
            keras.Input((8,)),
            ForwardWork("/device:CPU:0", 9, width),
            ForwardWork("/device:CPU:1", 3, width),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer="sgd", loss="mse")
    log_dir = str(tmp_path)
    callback = DeviceUtilization(
        log_dir,
        every_steps=4,
        every_seconds=None,
        window_steps=3,
        metrics=["utilization"],
    )
    model.fit(x, y, batch_size=64, epochs=1, verbose=0, callbacks=[callback])
    scalars = read_scalars(os.path.join(log_dir, "train"))
    u0 = [v for _, v in scalars["device/CPU:0/utilization"]]
    u1 = [v for _, v in scalars["device/CPU:1/utilization"]]
    assert len(u0) == len(u1) >= 2
    assert all(0.0 <= v <= 100.0 for v in u0 + u1)
    ratio = sum(u0) / sum(u1)
    assert 2.0 <= ratio <= 4.5, (u0, u1)
