"""Measured per-device busy time from bounded TensorFlow profiler windows.

The profiler records every op a step runs, with its duration, but on CPU it
records the thread, not the logical device: `/device:CPU:0` and
`/device:CPU:1` share one thread pool. The device comes from the placed
partition graphs TensorFlow builds when it instantiates the train function
(`OpDevices`). A device's busy time in a window is the union of the intervals
its ops ran, so overlapping ops are not counted twice and the utilization
(busy time over wall time) stays within [0, 100] %.

Waiting is not work: receives and collective ops, whose recorded duration is
mostly waiting for a peer, are left out here and reported by
`CommunicationTime` instead. Ops on tf.data threads are left out too: they
prepare the next batch, they are not the step.

Profiling costs: TensorFlow allows one profiler session per process and a
trace slows the steps it covers, so `StepProfiler` only ever traces a bounded
window of steps and gives way when another session (e.g. Keras's
`TensorBoard(profile_batch=...)`) holds the profiler.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterable, Mapping

import tensorflow as tf
from tensorflow.core.protobuf import config_pb2

from tfpar.devices import canonical_device

logger = logging.getLogger("tfpar")

# Op types whose recorded duration is mostly waiting for another device.
WAIT_OP_TYPES = frozenset(
    {
        "_Recv",
        "_HostRecv",
        "_Send",
        "_HostSend",
        "Recv",
        "Send",
        "CollectiveReduce",
        "CollectiveReduceV2",
        "CollectiveReduceV3",
        "CollectiveGather",
        "CollectiveGatherV2",
        "CollectiveBcastRecv",
        "CollectiveBcastRecvV2",
        "CollectiveBcastSend",
        "CollectiveBcastSendV2",
        "CollectiveAllToAllV2",
        "CollectiveAllToAllV3",
        "NcclAllReduce",
    }
)
# An op event is named "<op name>:<op type>"; other events ("ExecutorState::
# Process", "EagerLocalExecute: AddN", ...) do not fit this pattern.
_OP_EVENT = re.compile(r"^([^\s:]+):([A-Za-z_][A-Za-z0-9_]*)$")
# Threads that run the input pipeline, not the step.
_DATA_LINE_PREFIX = "tf_data"


@dataclasses.dataclass(frozen=True)
class OpDevices:
    """Which device each op of the traced functions was placed on.

    Attributes:
        devices: Op name (as the profiler records it) to canonical device.

    Example:

    ```python
    _compat.start_graph_collection()
    model.fit(x, y, steps_per_epoch=1)
    placed = OpDevices.from_run_metadata(_compat.stop_graph_collection())
    ```
    """

    devices: Mapping[str, str]

    @classmethod
    def from_run_metadata(cls, metadata: config_pb2.RunMetadata) -> OpDevices:
        """Reads the placed partition graphs of every instantiated function.

        A name placed on several devices (e.g. a `Const` in many functions)
        is dropped: it cannot be attributed honestly.

        Args:
            metadata: What graph collection recorded (`_compat`).

        Returns:
            The op-to-device map.
        """
        seen: dict[str, str | None] = {}
        canonical: dict[str, str] = {}  # a few device strings, many nodes
        graphs = [g for f in metadata.function_graphs for g in f.partition_graphs]
        for graph in [*graphs, *metadata.partition_graphs]:
            for node in graph.node:
                if not node.device:
                    continue
                if node.device not in canonical:
                    canonical[node.device] = canonical_device(node.device)
                device = canonical[node.device]
                if seen.setdefault(node.name, device) != device:
                    seen[node.name] = None
        return cls({name: dev for name, dev in seen.items() if dev is not None})


def busy_seconds(
    xspace: bytes,
    op_devices: OpDevices,
    *,
    start_ns: int,
    end_ns: int,
    fallback_device: str | None = None,
) -> dict[str, float]:
    """Sums, per device, the time its ops ran inside `[start_ns, end_ns]`.

    Args:
        xspace: A serialized `XSpace` (the profiler's `.xplane.pb` file).
        op_devices: Where each op was placed.
        start_ns: Window start, wall-clock nanoseconds (`time.time_ns()`),
            the profiler's clock.
        end_ns: Window end, same clock.
        fallback_device: Device for ops missing from `op_devices` (right when
            the model runs on one device); `None` leaves them out.

    Returns:
        Busy seconds per canonical device name (devices with no op are absent).

    Example:

    ```python
    with open(trace_path, "rb") as f:
        busy = busy_seconds(f.read(), placed, start_ns=t0, end_ns=t1)
    utilization = 100 * busy["/device:CPU:1"] / ((t1 - t0) / 1e9)
    ```
    """
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    space.ParseFromString(xspace)
    base = _session_start_ns(space)
    intervals: dict[str, list[tuple[int, int]]] = {}
    for plane in space.planes:
        device_of = _event_devices(plane.event_metadata, op_devices, fallback_device)
        if not device_of:
            continue
        for line in plane.lines:
            if line.name.startswith(_DATA_LINE_PREFIX):
                continue
            for event in line.events:
                device = device_of.get(event.metadata_id)
                if device is None:
                    continue
                begin = base + line.timestamp_ns + event.offset_ps // 1000
                end = begin + event.duration_ps // 1000
                begin, end = max(begin, start_ns), min(end, end_ns)
                if end > begin:
                    intervals.setdefault(device, []).append((begin, end))
    return {dev: _union_ns(spans) / 1e9 for dev, spans in intervals.items()}


def _session_start_ns(space: object) -> int:
    """Returns the wall-clock start of the session the trace's times count from.

    Exported traces hold times relative to the session start, which the
    "Task Environment" plane records as `profile_start_time`.
    """
    for plane in getattr(space, "planes", ()):
        names = {k: v.name for k, v in plane.stat_metadata.items()}
        for stat in plane.stats:
            if names.get(stat.metadata_id) == "profile_start_time":
                return int(stat.uint64_value or stat.int64_value)
    return 0


def _event_devices(
    metadata: Mapping[int, object],
    op_devices: OpDevices,
    fallback_device: str | None,
) -> dict[int, str]:
    """Maps the profiler's event-metadata ids of op events to devices."""
    result: dict[int, str] = {}
    for metadata_id, meta in metadata.items():
        match = _OP_EVENT.match(getattr(meta, "name", ""))
        if match is None or match.group(2) in WAIT_OP_TYPES:
            continue
        device = op_devices.devices.get(match.group(1), fallback_device)
        if device is not None:
            result[metadata_id] = device
    return result


def _union_ns(spans: Iterable[tuple[int, int]]) -> int:
    total, current_end = 0, -1
    for begin, end in sorted(spans):
        if begin > current_end:
            total += end - begin
            current_end = end
        elif end > current_end:
            total += end - current_end
            current_end = end
    return total


class StepProfiler:
    """Starts and stops bounded profiler sessions, sharing the profiler politely.

    Args:
        trace_dir: Where traces go. `None` uses a private temporary folder
            that `close` deletes (traces taken only to measure busy time);
            a path keeps them for TensorBoard's profile plugin.

    Example:

    ```python
    profiler = StepProfiler(None)
    if profiler.start():
        ...  # run a few steps
        path = profiler.stop()
    profiler.close()
    ```
    """

    def __init__(self, trace_dir: str | None) -> None:
        self._keep = trace_dir is not None
        self._dir = trace_dir
        self._running = False
        self._idle = threading.Event()
        self._idle.set()
        self._warned = False

    @property
    def running(self) -> bool:
        """Whether this object's session is the one running."""
        return self._running

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Waits until a `stop` running on another thread has finished."""
        self._idle.wait(timeout)

    def start(self) -> bool:
        """Starts a session, unless another one holds the profiler.

        Returns:
            `True` if this object now owns a running session.
        """
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="tfpar-trace-")
        try:
            tf.profiler.experimental.start(self._dir)
        except tf.errors.AlreadyExistsError:
            if not self._warned:
                self._warned = True
                logger.warning(
                    "tfpar: the TensorFlow profiler is in use by another session "
                    "(only one per process, e.g. Keras's TensorBoard(profile_batch=...)); "
                    "skipping this measurement window and any that collide with it."
                )
            return False
        self._running = True
        self._idle.clear()
        return True

    def stop(self) -> str | None:
        """Stops this object's session and returns the trace file written.

        May run on another thread than `start`; `running` stays `True` until
        the trace is written, so no new session starts in between.

        Returns:
            The path of the new `.xplane.pb` file, or `None` if no session of
            this object was running or nothing was written.
        """
        if not self._running:
            return None
        assert self._dir is not None
        try:
            before = set(_traces(self._dir))
            tf.profiler.experimental.stop()
            new = sorted(set(_traces(self._dir)) - before, key=os.path.getmtime)
        finally:
            self._running = False
            self._idle.set()
        return new[-1] if new else None

    def discard(self, path: str) -> None:
        """Deletes a trace that was only needed for a measurement."""
        if not self._keep:
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)

    def close(self) -> None:
        """Stops a running session and deletes a private trace folder."""
        if self._running:
            self._running = False
            tf.profiler.experimental.stop(save=False)
            self._idle.set()
        if not self._keep and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def _traces(root: str) -> list[str]:
    return glob.glob(os.path.join(root, "plugins", "profile", "*", "*.xplane.pb"))
