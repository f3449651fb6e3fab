"""Bounded profiler windows: when `DeviceUtilization` traces, and the sessions it holds.

TensorFlow allows one profiler session per process, and a trace slows the
steps it covers. So the profiler only ever traces a bounded window of steps,
and gives way when another session (e.g. Keras's
`TensorBoard(profile_batch=...)`) holds it. `StepProfiler` starts and stops
one kind of session; `ProfilerWindows` decides, step by step, when the
utilization windows and the kept capture (`profile_steps`) open and close.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable

import tensorflow as tf

from tfpar.callbacks.cadence import Cadence, Trigger

logger = logging.getLogger("tfpar")


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


# What `ProfilerWindows` calls when a window closes: the steps completed in
# this fit, and the traced `(start_ns, end_ns)` wall-clock span, or `None`
# when the window was not traced (counters are still read).
OnClose = Callable[[int, tuple[int, int] | None], None]


class ProfilerWindows:
    """Opens and closes the profiler windows of one `fit`, step by step.

    A window opens when the cadence says a sample is due and lasts
    `window_steps` steps, or until the epoch ends: what follows (validation,
    the next epoch's iterator) is not training. It is traced by `sampler`
    when tracing is on and the profiler is free; otherwise it still closes on
    time, for the counters read then. The kept capture of `profile_steps`
    has priority: it drops an open utilization window.

    Args:
        cadence: When windows open.
        window_steps: Steps each window lasts, `>= 1`.
        profile_steps: `(first, last)` steps of the kept capture, or `None`.
        capture_dir: Where the kept capture goes.
        trace: Whether utilization windows are traced.
        on_close: Called when a window closes (see `OnClose`).
        before_capture: Called before the kept capture starts, to finish
            background work that would disturb it.

    Example:

    ```python
    windows = ProfilerWindows(Cadence(every_steps=10), 2, None, "runs/x/train",
                              trace=True, on_close=sample, before_capture=wait)
    windows.begin_step(steps_done)  # from on_train_batch_begin
    windows.end_step(steps_done, last_of_epoch=False)  # from on_train_batch_end
    ```
    """

    def __init__(
        self,
        cadence: Cadence,
        window_steps: int,
        profile_steps: tuple[int, int] | None,
        capture_dir: str,
        *,
        trace: bool,
        on_close: OnClose,
        before_capture: Callable[[], None],
    ) -> None:
        self._trigger = Trigger(cadence)
        self._window_steps = window_steps
        first, last = profile_steps or (-1, math.inf)
        self._capture_first: int = first
        self._capture_last: float = last
        self._trace = trace
        self._on_close = on_close
        self._before_capture = before_capture
        self._window: tuple[int, int] | None = None  # (end step, start ns)
        self.sampler = StepProfiler(None)
        self._capture = StepProfiler(capture_dir)

    def begin_step(self, step: int) -> None:
        """Opens a window (for utilization or the kept capture) when due.

        Args:
            step: Steps completed in this fit.
        """
        # Runs every step: between samples, two integer compares and a clock read.
        if step == self._capture_first:
            self._start(self._capture, step)
        if self._window is None and self._trigger.due(step):
            if self._trace:
                self._start(self.sampler, step)
            if self._window is None:  # no trace (not asked for, or profiler busy)
                self._window = (step + self._window_steps, 0)

    def end_step(self, step: int, *, last_of_epoch: bool) -> None:
        """Closes a window when its last step, or the epoch, ends.

        Args:
            step: Steps completed in this fit, this step included.
            last_of_epoch: Whether this was the epoch's last step.
        """
        if self._window is not None and (step >= self._window[0] or last_of_epoch):
            self._close(step)
        if step > self._capture_last:
            self._capture_last = math.inf
            self._capture.stop()

    def finish(self, step: int) -> None:
        """Closes an open window and stops the kept capture, at the end of `fit`."""
        if self._window is not None:
            self._close(step)
        self._capture.stop()

    def close(self) -> None:
        """Stops any session and deletes private traces."""
        self.sampler.close()
        self._capture.close()

    def _start(self, profiler: StepProfiler, step: int) -> None:
        if profiler is self._capture:
            self._before_capture()
            if self._window is not None:
                self.sampler.stop()
                self._window = None
        # The previous window may still be stopping on the parser thread
        # (exporting takes tens of ms); only windows closer than that wait.
        self.sampler.wait_idle()
        if self.sampler.running or self._capture.running or not profiler.start():
            return
        if profiler is self.sampler:
            self._window = (step + self._window_steps, time.time_ns())

    def _close(self, step: int) -> None:
        assert self._window is not None
        start_ns = self._window[1]
        self._window = None
        end_ns = time.time_ns()
        self._on_close(step, (start_ns, end_ns) if start_ns else None)
