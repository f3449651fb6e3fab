"""Utilization of tasks in other processes, traced through their profiler service.

A task started by `tfpar server --profiler-port` (every `tfpar.LocalCluster`
task is) runs TensorFlow's profiler service. `RemoteWindows` asks it, on a
daemon thread of its own, for a trace of `window_ms` milliseconds
(`tf.profiler.experimental.client.trace`), and turns the trace into the
task's busy share: the union of the intervals its ops ran, receives, sends,
collectives and tf.data ops left out as for this process's own windows
(`profiling.py`), over the traced session (its start and stop as the
trace records them). Every op in the task's trace is the
task's, so a window without any op is a measured 0 %, not an unknown.

It serves the devices no strategy measures in its graph: the parameter-server
tasks of a `tfpar.ParameterServerStrategy`, whose reads and updates run in
their own processes. The trace runs in the task's process, which a worker
of a multi-worker job could not survive (`device_utilization.py`); the
parameter servers did in every run tried (docs/callbacks.md).
"""

from __future__ import annotations

import glob
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping

import tensorflow as tf

from tfpar.callbacks.placement import OpDevices
from tfpar.callbacks.profiling import busy_seconds, traced_span_ns
from tfpar.callbacks.sources import Sample
from tfpar.callbacks.summaries import device_label

# Seconds a window may take beyond its length (connecting, exporting,
# sending the trace back) before `close` stops waiting for it.
_GRACE_SECONDS = 20.0


class RemoteWindows:
    """Traces windows of tasks in other processes, one daemon thread per window.

    Args:
        addresses: The profiler service (`"host:port"`) of each device to
            trace, by canonical device name.
        window_ms: Length of each window, in milliseconds.
        on_error: Called with the device and the error when a window fails;
            the device's next window is still tried.

    Example:

    ```python
    windows = RemoteWindows(
        {"/job:ps/replica:0/task:0/device:CPU:0": "127.0.0.1:6009"},
        window_ms=500,
        on_error=lambda device, err: print(device, err),
    )
    windows.request(step=100)
    ...
    for step, sample in windows.collect():
        print(step, sample.tag, sample.value)  # device/ps:0/CPU:0/utilization
    ```
    """

    def __init__(
        self,
        addresses: Mapping[str, str],
        window_ms: int,
        on_error: Callable[[str, BaseException], None],
    ) -> None:
        self.addresses = dict(addresses)
        self.window_ms = window_ms
        self._on_error = on_error
        self._lock = threading.Lock()
        self._running: dict[str, threading.Thread] = {}
        self._done: list[tuple[int, Sample]] = []

    @property
    def devices(self) -> list[str]:
        """The devices this object traces."""
        return list(self.addresses)

    def request(self, step: int) -> None:
        """Starts a window on each device whose previous window has ended.

        Args:
            step: The step the window's sample is logged at.
        """
        for device, address in self.addresses.items():
            running = self._running.get(device)
            if running is not None and running.is_alive():
                continue
            thread = threading.Thread(
                target=self._trace,
                args=(device, address, step),
                name=f"tfpar-remote-window-{device_label(device)}",
                daemon=True,  # a task that never answers must not hold exit
            )
            self._running[device] = thread
            thread.start()

    def collect(self) -> list[tuple[int, Sample]]:
        """Returns the samples of the windows that ended since the last call."""
        with self._lock:
            done, self._done = self._done, []
        return done

    def close(self) -> None:
        """Waits for the running windows, each at most its length and a grace."""
        for thread in self._running.values():
            thread.join(self.window_ms / 1000 + _GRACE_SECONDS)
        self._running.clear()

    def _trace(self, device: str, address: str, step: int) -> None:
        folder = tempfile.mkdtemp(prefix="tfpar-remote-window-")
        try:
            tf.profiler.experimental.client.trace(
                f"grpc://{address}", folder, duration_ms=self.window_ms
            )
            traces = glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)
            if len(traces) != 1:
                raise RuntimeError(
                    f"the profiler service at {address} returned {len(traces)} "
                    "traces, expected 1"
                )
            with open(traces[0], "rb") as f:
                xspace = f.read()
            span = traced_span_ns(xspace)
            if span is None:
                raise RuntimeError(
                    f"the trace from the profiler service at {address} does not "
                    "say when it started and stopped"
                )
            start, stop = span
            # Every op in the task's trace runs on the task's device; the
            # union of its intervals, clipped to the session, is its busy time.
            busy = busy_seconds(
                xspace,
                OpDevices({}),
                start_ns=start,
                end_ns=stop,
                fallback_device=device,
            ).get(device, 0.0)
            value = 100 * busy / ((stop - start) / 1e9)
            sample = Sample(f"device/{device_label(device)}/utilization", value)
            with self._lock:
                self._done.append((step, sample))
        except Exception as err:  # a window is a measurement, never a failure of fit
            self._on_error(device, err)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
