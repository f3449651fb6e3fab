"""`DeviceUtilization`: per-device busy time and memory, and host counters, in TensorBoard."""

from __future__ import annotations

import concurrent.futures
import logging
import math
import time
from collections.abc import Callable, Sequence

import keras
import tensorflow as tf

from tfpar._compat import callbacks as _compat
from tfpar.callbacks.cadence import (
    Cadence,
    Trigger,
    check_int,
    optimizer_step,
    steps_per_call,
)
from tfpar.callbacks.profiling import OpDevices, StepProfiler, busy_seconds
from tfpar.callbacks.sources import (
    HostSource,
    NvmlSource,
    Sample,
    Source,
    TensorFlowMemorySource,
)
from tfpar.callbacks.summaries import (
    ScalarWriter,
    check_log_dir,
    custom_scalars_layout,
    device_label,
)
from tfpar.devices import canonical_device, default_devices, resolve_devices

logger = logging.getLogger("tfpar")

METRICS = ("utilization", "memory", "host")


class DeviceUtilization(keras.callbacks.Callback):
    """Logs per-device utilization and memory, and host counters, to TensorBoard.

    For each device the model's strategy uses (and each device the train step
    placed ops on), and for the host, it logs on a cadence:

    - `device/<device>/utilization`: % of wall time the device was busy.
      CPU devices (logical ones included): measured op time from a short
      TensorFlow profiler window of `window_steps` steps, ops attributed to
      devices through the train function's placed graph. GPUs: NVML.
    - `device/<device>/memory_mib`, `device/<device>/peak_memory_mib`:
      TensorFlow's allocator for GPUs. CPUs share the host allocator, which
      keeps no statistics: see `host/rss_mib`.
    - `host/cpu_utilization` (% of the cores this process may use),
      `host/rss_mib`, `host/peak_rss_mib`: psutil and `getrusage`, read on a
      background thread.

    Scalars go to `<log_dir>/train` at the optimizer's step, beside Keras's
    `TensorBoard` callback, with a custom-scalars layout showing every device
    in one chart per metric. Optionally, `profile_steps` keeps a full profiler
    trace of a step range for TensorBoard's profile plugin.

    Works under any strategy, stock ones included, and with none. A failing
    counter is logged once and skipped; training never stops because of this
    callback. Only one profiler session can run per process: when another
    holds it (e.g. Keras's `TensorBoard(profile_batch=...)`), utilization
    windows that collide with it are skipped, with one warning. Remote devices
    (cluster workers) are not traced by this process's profiler; their
    utilization is not logged (under a parameter-server strategy no window
    is traced at all). Utilization is sampled: each point covers the
    `window_steps` steps traced when the sample came due.

    Args:
        log_dir: Folder for the event files, the same as Keras's `TensorBoard`
            callback's `log_dir`. Created if missing; must be writable.
        devices: Device names to report, or `None` (default) for the devices
            of the model's strategy plus those the train step placed ops on.
        every_steps: Sample every this many steps; `None` (default) samples
            on time only.
        every_seconds: Sample every this many seconds; `None` samples on
            steps only. Defaults to `10.0`.
        window_steps: Steps each utilization window traces. Defaults to `2`.
        metrics: Which groups to log, from `"utilization"`, `"memory"`,
            `"host"`. Defaults to all three.
        profile_steps: `(first, last)` step numbers (0-based, counted from the
            start of `fit`) of a trace kept under `<log_dir>/train/plugins/
            profile` for the profile plugin, or `None` (default).

    Raises:
        ValueError: For an unwritable `log_dir`, a cadence or window that is
            not positive, an unknown metric or a bad step range.
        TypeError: For arguments of the wrong type.

    Example:

    ```python
    model.fit(
        x, y, epochs=2,
        callbacks=[
            keras.callbacks.TensorBoard("runs/x"),
            DeviceUtilization("runs/x", every_steps=100),
        ],
    )
    ```
    """

    def __init__(
        self,
        log_dir: str,
        *,
        devices: Sequence[str] | None = None,
        every_steps: int | None = None,
        every_seconds: float | None = 10.0,
        window_steps: int = 2,
        metrics: Sequence[str] = METRICS,
        profile_steps: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.log_dir = check_log_dir(log_dir)
        self.cadence = Cadence(every_steps=every_steps, every_seconds=every_seconds)
        check_int("window_steps", window_steps, minimum=1)
        self.window_steps = window_steps
        self.metrics = _check_metrics(metrics)
        self.devices = None if devices is None else resolve_devices(devices)
        self.profile_steps = _check_step_range(profile_steps)
        self._fresh_function = True
        self._placement: tuple[object, OpDevices] | None = None
        self._reset()

    def _reset(self) -> None:
        self._writer = ScalarWriter(self.log_dir)
        self._trigger = Trigger(self.cadence)
        self._sources: list[Source] = []
        self._failed: set[str] = set()
        self._step = 0
        self._first_step = 0
        self._per_call = 1
        self._trace = False
        self._epoch_steps: float = math.inf
        first, last = self.profile_steps or (-1, math.inf)
        self._capture_first: int = first
        self._capture_last: float = last
        self._collecting_graphs = False
        self._op_devices = OpDevices({})
        self._reported: list[str] = []
        self._fallback: str | None = None
        self._window: tuple[int, int] | None = None  # (end step, start ns)
        self._sampler = StepProfiler(None)
        self._capture = StepProfiler(f"{self.log_dir}/train")
        self._parser = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="tfpar-trace-parser"
        )
        self._parsed: list[concurrent.futures.Future[tuple[int, list[Sample]]]] = []

    def on_train_begin(self, logs: dict | None = None) -> None:
        """Resolves devices, starts the host and NVML pollers and graph collection."""
        # Keras skips on_train_end when fit() raises: release what it left.
        for source in self._sources:
            source.close()
        self._sampler.close()
        self._capture.close()
        self._reset()
        strategy_devices = _strategy_devices(self.model.distribute_strategy)
        self._reported = list(self.devices or strategy_devices)
        self._fallback = strategy_devices[0] if len(strategy_devices) == 1 else None
        self._first_step = optimizer_step(self.model)
        # What the per-step hooks compare against, read once per fit.
        self._per_call = steps_per_call(self.model)
        self._epoch_steps = (self.params or {}).get("steps") or math.inf
        gpus = [d for d in self._reported if "GPU" in d]
        if "host" in self.metrics:
            self._open(HostSource.name, HostSource)
        if "memory" in self.metrics and gpus:
            self._open(
                TensorFlowMemorySource.name, lambda: TensorFlowMemorySource(gpus)
            )
        if "utilization" in self.metrics and gpus:
            self._open(NvmlSource.name, lambda: NvmlSource(gpus))
        # Under a parameter-server strategy every step runs on remote workers,
        # which this process's profiler does not see: no windows to trace.
        self._trace = "utilization" in self.metrics and not isinstance(
            self.model.distribute_strategy, tf.distribute.ParameterServerStrategy
        )
        if self._trace:
            self._find_placement()
        self._writer.add_layout(custom_scalars_layout())

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        """Starts a profiler window (for utilization or a kept capture) when due."""
        # Runs every step: between samples, two integer compares and a clock read.
        if self._step == self._capture_first:
            self._start_window(self._capture)
        if self._window is None and self._trigger.due(self._step):
            if self._trace:
                self._start_window(self._sampler)
            if self._window is None:  # no trace (not asked for, or profiler busy)
                self._window = (self._step + self.window_steps, 0)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        """Closes a window when its last step ends, then samples and writes."""
        self._step += self._per_call
        if self._collecting_graphs:
            self._collecting_graphs = False
            placement = OpDevices.from_run_metadata(_compat.stop_graph_collection())
            self._placement = (self.model.train_function, placement)
            self._use_placement(placement)
        # A window also ends with the epoch: what follows (validation, the
        # next epoch's iterator) is not training.
        if self._window is not None and (
            self._step >= self._window[0] or batch + 1 >= self._epoch_steps
        ):
            self._end_window()
        if self._step > self._capture_last:
            self._capture_last = math.inf
            self._capture.stop()

    def set_model(self, model: keras.Model) -> None:
        """Notes whether `fit` is about to build a new train function."""
        super().set_model(model)
        # Keras calls set_model before make_train_function: a None here means
        # this fit() traces and instantiates a fresh function, whose placement
        # graph collection will see.
        self._fresh_function = getattr(model, "train_function", None) is None

    def _find_placement(self) -> None:
        """Learns where the train function's ops run, at the least cost."""
        function = self.model.train_function
        if self._placement is not None and self._placement[0] is function:
            self._use_placement(self._placement[1])  # same function as last fit()
            return
        _compat.start_graph_collection()
        self._collecting_graphs = True
        multi_device = self._fallback is None or self.devices is not None
        if not self._fresh_function and multi_device:
            # Placement is recorded only when a function is instantiated, and
            # this one was instantiated before the callback saw it: rebuild it
            # (one extra trace, once per model and callback).
            self.model.make_train_function(force=True)

    def _use_placement(self, placement: OpDevices) -> None:
        self._op_devices = placement
        if self.devices is None:
            placed = sorted(set(placement.devices.values()))
            local = [d for d in placed if "/job:" not in d]
            self._reported += [d for d in local if d not in self._reported]

    def on_train_end(self, logs: dict | None = None) -> None:
        """Stops every window and thread and writes what is left."""
        if self._collecting_graphs:
            self._collecting_graphs = False
            _compat.stop_graph_collection()
        if self._window is not None:
            self._end_window()
        self._capture.stop()
        self._parser.shutdown(wait=True)
        self._collect_parsed()
        self._writer.close()
        for source in self._sources:
            source.close()
        self._sampler.close()
        self._capture.close()

    def _start_window(self, profiler: StepProfiler) -> None:
        if profiler is self._capture:
            # The kept capture has priority: finish background work, drop an
            # open utilization window.
            concurrent.futures.wait(self._parsed)
            if self._window is not None:
                self._sampler.stop()
                self._window = None
        # The previous window may still be stopping on the parser thread
        # (exporting takes tens of ms); only windows closer than that wait.
        self._sampler.wait_idle()
        if self._sampler.running or self._capture.running or not profiler.start():
            return
        if profiler is self._sampler:
            self._window = (self._step + self.window_steps, time.time_ns())

    def _end_window(self) -> None:
        assert self._window is not None
        start_ns = self._window[1]
        self._window = None
        step = self._first_step + self._step
        end_ns = time.time_ns()
        if start_ns:
            devices = [d for d in self._reported if "GPU" not in d and "/job:" not in d]
            # Stopping exports the trace (tens of ms): do it, and the parsing,
            # off the training thread. Events after end_ns are clipped away.
            self._parsed.append(
                self._parser.submit(
                    self._utilization, step, (start_ns, end_ns), devices
                )
            )
        for source in self._sources:
            self._read(source, step)
        self._collect_parsed()
        self._writer.flush()

    def _utilization(
        self, step: int, window: tuple[int, int], devices: list[str]
    ) -> tuple[int, list[Sample]]:
        """Runs on the parser thread: stops the profiler, turns the trace into samples."""
        path = self._sampler.stop()
        if path is None:
            return step, []
        start_ns, end_ns = window
        try:
            with open(path, "rb") as f:
                busy = busy_seconds(
                    f.read(),
                    self._op_devices,
                    start_ns=start_ns,
                    end_ns=end_ns,
                    fallback_device=self._fallback,
                )
        finally:
            self._sampler.discard(path)
        wall = (end_ns - start_ns) / 1e9
        samples = [
            Sample(
                f"device/{device_label(d)}/utilization",
                min(100.0, 100.0 * busy.get(d, 0.0) / wall),
            )
            for d in devices
        ]
        return step, samples

    def _collect_parsed(self) -> None:
        done = [f for f in self._parsed if f.done()]
        self._parsed = [f for f in self._parsed if not f.done()]
        for future in done:
            try:
                step, samples = future.result()
            except Exception as err:  # never break training over a measurement
                self._fail("profiler trace", err)
                continue
            for sample in samples:
                self._writer.add(step, sample.tag, sample.value)

    def _open(self, name: str, make: Callable[[], Source]) -> None:
        try:
            self._sources.append(make())
        except Exception as err:
            self._fail(name, err)

    def _read(self, source: Source, step: int) -> None:
        try:
            samples = source.read()
        except Exception as err:
            self._fail(source.name, err)
            return
        for sample in samples:
            self._writer.add(step, sample.tag, sample.value)

    def _fail(self, name: str, err: BaseException) -> None:
        if name not in self._failed:
            self._failed.add(name)
            logger.warning(
                "tfpar DeviceUtilization: reading %s failed (%s: %s); skipping it. "
                "Training continues; this is logged once.",
                name,
                type(err).__name__,
                err,
            )


def _check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    if isinstance(metrics, str) or not isinstance(metrics, (list, tuple)):
        raise TypeError(
            f"`metrics` must be a list or tuple of names from {list(METRICS)}. "
            f"Received: metrics={metrics!r}."
        )
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(
            f"Unknown or missing metric names. Received: metrics={list(metrics)!r} "
            f"(must be a non-empty subset of {list(METRICS)})."
        )
    return tuple(metrics)


def _check_step_range(steps: tuple[int, int] | None) -> tuple[int, int] | None:
    if steps is None:
        return None
    ok = (
        isinstance(steps, (tuple, list))
        and len(steps) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) for s in steps)
    )
    if not ok or steps[0] < 0 or steps[1] < steps[0]:
        raise ValueError(
            f"`profile_steps` must be a (first, last) pair of step numbers with "
            f"0 <= first <= last. Received: profile_steps={steps!r}."
        )
    return (steps[0], steps[1])


def _strategy_devices(strategy: tf.distribute.Strategy) -> list[str]:
    """Lists the devices a strategy computes on, in order."""
    if isinstance(strategy, tf.distribute.ParameterServerStrategy):
        # The coordinator computes nothing: the workers do, in other processes
        # (their counters name them below; their utilization is not traced).
        devices = []
    else:
        devices = _local_devices(strategy)
    # A tfpar strategy also names its devices in its counters (for a pipeline:
    # one per stage, while its host side is a one-device strategy).
    stats = getattr(strategy, "communication_stats", None)
    if callable(stats):
        try:
            counted = [d.device for d in stats().devices]
        except Exception:  # the counters are CommunicationTime's business
            counted = []
        devices += [d for d in counted if d not in devices]
    return devices


def _local_devices(strategy: tf.distribute.Strategy) -> list[str]:
    try:
        return [canonical_device(d) for d in strategy.extended.worker_devices]
    except RuntimeError:
        # The default (no) strategy: TensorFlow places ops on the first GPU,
        # else on the first CPU.
        return default_devices()[:1]
