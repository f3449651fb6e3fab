"""Measured per-device busy time, parsed from profiler traces off the training thread.

The profiler records every op a step runs, with its duration, but on CPU it
records the thread, not the logical device: `/device:CPU:0` and
`/device:CPU:1` share one thread pool. The device comes from the placed
partition graphs (`placement.OpDevices`). A device's busy time in a window is
the union of the intervals its ops ran, clipped to the window, so overlapping
ops are not counted twice and the utilization (busy time over wall time) stays
within [0, 100] % by construction.

A device with ops placed on it, none of which appears in the trace, is not
idle but unseen: its ops ran in another process (a cluster worker, which this
process's profiler does not trace), or their names could not be matched to
the placed graph. Its utilization is unknown, and no sample is made for it. A
device with no op placed on it is idle: 0 % is a measurement there.

Waiting is not work: receives and collective ops, whose recorded duration is
mostly waiting for a peer, are left out here and reported by
`CommunicationTime` instead. Ops on tf.data threads are left out too: they
prepare the next batch, they are not the step.

Stopping a session exports its trace (tens of ms) and parsing it takes
longer: `TraceParser` does both on one background thread, so the training
thread never waits for either.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping

from tfpar._compat import callbacks as _compat
from tfpar.callbacks.placement import OpDevices
from tfpar.callbacks.profiler_window import StepProfiler
from tfpar.callbacks.sources import Sample
from tfpar.callbacks.summaries import device_label

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
        Busy seconds per canonical device name, for each device at least one
        of whose ops appears in the trace (`0.0` when they all ran outside
        the window). A device none of whose ops appears is absent: its busy
        time is unknown, not zero.

    Example:

    ```python
    with open(trace_path, "rb") as f:
        busy = busy_seconds(f.read(), placed, start_ns=t0, end_ns=t1)
    utilization = 100 * busy["/device:CPU:1"] / ((t1 - t0) / 1e9)
    ```
    """
    space = _compat.xspace(xspace)
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
                # Seen even if it ran outside the window: idle then, not unknown.
                spans = intervals.setdefault(device, [])
                begin = base + line.timestamp_ns + event.offset_ps // 1000
                end = begin + event.duration_ps // 1000
                begin, end = max(begin, start_ns), min(end, end_ns)
                if end > begin:
                    spans.append((begin, end))
    return {dev: _union_ns(spans) / 1e9 for dev, spans in intervals.items()}


def _session_start_ns(space: object) -> int:
    """Returns the wall-clock start of the session the trace's times count from.

    Exported traces hold times relative to the session start, which the
    "Task Environment" plane records as `profile_start_time`.
    """
    return _session_times(space).get("profile_start_time", 0)


def traced_span_ns(xspace: bytes) -> tuple[int, int] | None:
    """Returns when a trace's session started and stopped.

    Args:
        xspace: A serialized `XSpace` (the profiler's `.xplane.pb` file).

    Returns:
        `(start, stop)` in wall-clock nanoseconds (`time.time_ns()`), as the
        "Task Environment" plane records them (`profile_start_time`,
        `profile_stop_time`), or `None` if the trace does not record both.

    Example:

    ```python
    start, stop = traced_span_ns(xspace)
    busy = busy_seconds(xspace, placed, start_ns=start, end_ns=stop)
    ```
    """
    times = _session_times(_compat.xspace(xspace))
    start, stop = times.get("profile_start_time"), times.get("profile_stop_time")
    return (start, stop) if start and stop and stop > start else None


def _session_times(space: object) -> dict[str, int]:
    """The integer stats of the trace's planes (the session's times), by name."""
    times: dict[str, int] = {}
    for plane in getattr(space, "planes", ()):
        names = {k: v.name for k, v in plane.stat_metadata.items()}
        for stat in plane.stats:
            name = names.get(stat.metadata_id)
            if name is not None and name not in times:
                times[name] = int(stat.uint64_value or stat.int64_value)
    return times


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


@dataclasses.dataclass(frozen=True)
class ParsedWindow:
    """What one utilization window measured.

    Attributes:
        step: The step its samples are logged at.
        samples: One `device/<device>/utilization` sample per measured device.
        unseen: The devices whose utilization is unknown, each with the number
            of op names placed on it (`0` for the fallback device when the
            placement is not known): ops run there, yet none appeared in the
            trace.

    Example:

    ```python
    ParsedWindow(7, (Sample("device/CPU:0/utilization", 41.5),),
                 {"/job:worker/replica:0/task:1/device:CPU:0": 196})
    ```
    """

    step: int
    samples: tuple[Sample, ...]
    unseen: Mapping[str, int]


class TraceParser:
    """Stops utilization windows and turns their traces into samples, off-thread.

    Each job stops the window's profiler session (which exports the trace),
    measures busy time per device, deletes the trace and makes one
    `device/<device>/utilization` sample per measured device; a device with
    ops placed on it but none in the trace is listed as unseen instead. Jobs
    run in order on one thread; `collect` hands finished ones to the training
    thread.

    Args:
        profiler: The profiler the utilization windows run in.
        on_error: Called, on the training thread, with a job's exception; a
            measurement never stops training.

    Example:

    ```python
    parser = TraceParser(windows.sampler, on_error=report)
    parser.submit(step, (start_ns, end_ns), ["/device:CPU:0"], placed, None)
    ...
    for window in parser.collect():
        for sample in window.samples:
            writer.add(window.step, sample.tag, sample.value)
    parser.shutdown()
    ```
    """

    def __init__(
        self, profiler: StepProfiler, *, on_error: Callable[[BaseException], None]
    ) -> None:
        self._profiler = profiler
        self._on_error = on_error
        self._pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="tfpar-trace-parser"
        )
        self._pending: list[concurrent.futures.Future[ParsedWindow]] = []

    def submit(
        self,
        step: int,
        window: tuple[int, int],
        devices: list[str],
        op_devices: OpDevices,
        fallback_device: str | None,
    ) -> None:
        """Queues the window that just closed.

        Args:
            step: The step its samples are logged at.
            window: Its `(start_ns, end_ns)` wall-clock span; trace events
                outside it are clipped away.
            devices: Devices to measure. One with no op placed on it gets
                0 %; one with ops placed on it but none in the trace is unseen.
            op_devices: Where each op was placed.
            fallback_device: Device for ops missing from `op_devices`; it
                runs the train step, so it is unseen when no op shows.
        """
        self._pending.append(
            self._pool.submit(
                self._utilization, step, window, devices, op_devices, fallback_device
            )
        )

    def wait(self) -> None:
        """Waits until every queued job has finished."""
        concurrent.futures.wait(self._pending)

    def collect(self) -> list[ParsedWindow]:
        """Returns the windows of finished jobs, each once, in order."""
        done = [f for f in self._pending if f.done()]
        self._pending = [f for f in self._pending if not f.done()]
        result = []
        for future in done:
            try:
                result.append(future.result())
            except Exception as err:  # never break training over a measurement
                self._on_error(err)
        return result

    def shutdown(self) -> None:
        """Waits for every queued job and stops the thread."""
        self._pool.shutdown(wait=True)

    def _utilization(
        self,
        step: int,
        window: tuple[int, int],
        devices: list[str],
        op_devices: OpDevices,
        fallback_device: str | None,
    ) -> ParsedWindow:
        """Runs on the parser thread: stops the profiler, turns the trace into samples."""
        path = self._profiler.stop()
        if path is None:
            return ParsedWindow(step, (), {})
        start_ns, end_ns = window
        try:
            with open(path, "rb") as f:
                busy = busy_seconds(
                    f.read(),
                    op_devices,
                    start_ns=start_ns,
                    end_ns=end_ns,
                    fallback_device=fallback_device,
                )
        finally:
            self._profiler.discard(path)
        wall = (end_ns - start_ns) / 1e9
        samples, unseen = [], {}
        for device in devices:
            tag = f"device/{device_label(device)}/utilization"
            if device in busy:
                samples.append(Sample(tag, 100.0 * busy[device] / wall))
            elif device in op_devices.placed or device == fallback_device:
                unseen[device] = op_devices.placed.get(device, 0)
            else:
                samples.append(Sample(tag, 0.0))  # nothing placed there: idle
        return ParsedWindow(step, tuple(samples), unseen)
