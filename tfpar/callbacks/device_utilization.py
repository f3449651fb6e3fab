"""`DeviceUtilization`: per-device busy time and memory, and host counters, in TensorBoard.

The callback validates its arguments and wires the parts together, each in a
module of its own: `ProfilerWindows` (`profiler_window.py`) decides when
windows open and close, `GraphPlacement` (`placement.py`) learns which device
each op ran on, `TraceParser` (`profiling.py`) turns traces into utilization
off the training thread, and `SourceGroup` (`source_group.py`) reads the
counters.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import keras
import tensorflow as tf

from tfpar._validation import check_instance, check_int, check_sequence, value_error
from tfpar.callbacks.cadence import Cadence, optimizer_step, steps_per_call
from tfpar.callbacks.definitions import describe
from tfpar.callbacks.in_graph_busy import InGraphBusy
from tfpar.callbacks.placement import GraphPlacement, OpDevices, strategy_devices
from tfpar.callbacks.profiler_window import ProfilerWindows
from tfpar.callbacks.profiling import TraceParser
from tfpar.callbacks.remote_windows import RemoteWindows
from tfpar.callbacks.source_group import SourceGroup
from tfpar.callbacks.summaries import (
    ScalarWriter,
    check_log_dir,
    custom_scalars_layout,
    device_label,
)
from tfpar.devices import process_task, resolve_devices

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
    windows that collide with it are skipped, with one warning. Utilization
    is sampled: each point covers the `window_steps` steps traced when the
    sample came due.

    Devices whose ops run where this process's profiler cannot see them
    (cluster workers it drives: the stages of a `PipelineStrategy`, the
    replicas of a `tfpar.MirroredStrategy` over `tfpar.LocalCluster`
    workers, the workers of a `tfpar.ParameterServerStrategy`), and every
    device under a multi-worker strategy (where TensorFlow's profiler aborted
    a worker, so no window is traced), take their utilization from the tfpar
    strategy's in-graph busy time, under the same tag; its TensorBoard
    description says so. Tasks whose busy time no strategy measures (the
    parameter servers of a `tfpar.ParameterServerStrategy`) are traced
    through their own profiler service when its address is known (every
    `tfpar.LocalCluster` task runs one; on other clusters start each task
    with `tfpar server --profiler-port PORT` and pass `profiler_addresses`):
    a window of `remote_window_ms` in the task's process, on a background
    thread. A device none of whose placed ops appears in this process's
    trace, and which neither the strategy measures nor a profiler service
    traces, has no utilization point: its utilization is unknown, not 0 %. The callback
    warns once per device, naming it and why, and once per `fit` writes a
    text summary saying "unknown", and why, at the device's
    `device/<device>/utilization` tag. A device with no op of the train step
    placed on it is idle: its 0 % is measured.

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
        profiler_addresses: The TensorFlow profiler service (`"host:port"`)
            of cluster tasks, by task name (`"/job:ps/replica:0/task:0"`),
            added to those the strategy's cluster resolver carries (a
            `tfpar.LocalCluster`'s does). Defaults to `None`.
        remote_window_ms: Length of each window traced through a task's
            profiler service, in milliseconds. Defaults to `500`.

    Raises:
        ValueError: For an unwritable `log_dir`, a cadence or window that is
            not positive, an unknown metric, a bad step range, or a
            profiler address that is not a task name mapped to `"host:port"`.
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
        profiler_addresses: Mapping[str, str] | None = None,
        remote_window_ms: int = 500,
    ) -> None:
        super().__init__()
        self.log_dir = check_log_dir(log_dir)
        self.cadence = Cadence(every_steps=every_steps, every_seconds=every_seconds)
        self.window_steps: int = check_int("window_steps", window_steps, minimum=1)
        self.metrics = _check_metrics(metrics)
        self.devices = None if devices is None else resolve_devices(devices)
        self.profile_steps = _check_step_range(profile_steps)
        self.profiler_addresses = _check_addresses(profiler_addresses)
        self.remote_window_ms: int = check_int(
            "remote_window_ms", remote_window_ms, minimum=1
        )
        self._placement = GraphPlacement()
        self._said_unseen: set[str] = set()  # devices warned about, once each
        self._sources = SourceGroup(on_error=self._fail)
        self._reset(trace=False)

    def _reset(self, *, trace: bool) -> None:
        """Makes the parts of one `fit` (its counter sources aside)."""
        self._writer = ScalarWriter(self.log_dir, describe=self._describe)
        self._failed: set[str] = set()
        self._windows = ProfilerWindows(
            self.cadence,
            self.window_steps,
            self.profile_steps,
            f"{self.log_dir}/train",
            trace=trace,
            on_close=self._sample,
            # The kept capture has priority: background parsing finishes first.
            before_capture=lambda: self._parser.wait(),
        )
        self._parser = TraceParser(
            self._windows.sampler,
            on_error=lambda err: self._fail("profiler trace", err),
        )
        self._step = 0
        self._first_step = 0
        self._per_call = 1
        self._epoch_steps: float = math.inf
        self._op_devices = OpDevices({})
        self._reported: list[str] = []
        self._fallback: str | None = None
        self._task: str | None = None
        self._unseen_written: set[str] = set()  # a text summary once per fit
        self._in_graph: InGraphBusy | None = None
        self._remote: RemoteWindows | None = None
        self._tracing = False  # whether profiler windows measure this process
        self._untraced_why = ""

    def set_model(self, model: keras.Model) -> None:
        """Notes whether `fit` is about to build a new train function."""
        super().set_model(model)
        self._placement.note_model(model)

    def on_train_begin(self, logs: dict | None = None) -> None:
        """Resolves devices, starts the host and NVML pollers and graph collection."""
        # Keras skips on_train_end when fit() raises: release what it left.
        self._sources.close()
        self._windows.close()
        if self._remote is not None:
            self._remote.close()
        strategy = self.model.distribute_strategy
        # Under a parameter-server strategy every step runs on remote workers,
        # which this process's profiler does not see: no windows to trace.
        # Under a multi-worker strategy, stopping the profiler while steps run
        # aborted the process ("double free or corruption", TensorFlow 2.21):
        # no windows either; the strategy's in-graph busy time, if it has it.
        trace = "utilization" in self.metrics and not isinstance(
            strategy, tf.distribute.ParameterServerStrategy
        )
        task = process_task(strategy)
        untraceable = trace and task is not None
        trace = trace and not untraceable
        self._reset(trace=trace)
        self._task = task
        self._tracing = trace
        computing = strategy_devices(strategy)
        self._reported = list(self.devices or computing)
        # Ops missing from the placement run on the one device, unless that is
        # another process's: then this process's own ops are not its work.
        one = len(computing) == 1 and self._own(computing[0])
        self._fallback = computing[0] if one else None
        self._first_step = optimizer_step(self.model)
        # What the per-step hooks compare against, read once per fit.
        self._per_call = steps_per_call(self.model)
        self._epoch_steps = (self.params or {}).get("steps") or math.inf
        self._sources = SourceGroup.for_metrics(
            self.metrics, self._reported, on_error=self._fail
        )
        stats = getattr(strategy, "communication_stats", None)
        if "utilization" in self.metrics and callable(stats):
            try:
                self._in_graph = InGraphBusy.covering(stats, self._measured_in_graph)
            except Exception as err:  # never break training over a measurement
                self._fail("the strategy's busy counters", err)
        if "utilization" in self.metrics:
            self._remote = self._remote_windows(strategy)
        # Why a device neither traced nor measured in-graph is unknown.
        self._untraced_why = (
            "TensorFlow's profiler aborted workers of a multi-worker job, so no "
            "window is traced here, and the strategy measures no busy time of "
            "it (a tfpar strategy with measure=True does)"
            if untraceable
            else "its ops run in another process, and the strategy measures no "
            "busy time of it"
        )
        if trace:
            multi_device = self._fallback is None or self.devices is not None
            known = self._placement.start(self.model, rebuild=multi_device)
            if known is not None:  # the same train function as last fit()
                self._use_placement(known)
        self._writer.add_layout(custom_scalars_layout())

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        """Starts a profiler window (for utilization or a kept capture) when due."""
        if self._in_graph is not None:
            self._in_graph.begin_step()
        self._windows.begin_step(self._step)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        """Closes a window when its last step ends, then samples and writes."""
        self._step += self._per_call
        if self._in_graph is not None:
            self._in_graph.end_step()
        learned = self._placement.finish(self.model)
        if learned is not None:
            self._use_placement(learned)
        self._windows.end_step(self._step, last_of_epoch=batch + 1 >= self._epoch_steps)

    def on_train_end(self, logs: dict | None = None) -> None:
        """Stops every window and thread and writes what is left."""
        self._placement.cancel()
        self._windows.finish(self._step)
        self._parser.shutdown()
        if self._remote is not None:
            self._remote.close()
        self._write_parsed()
        self._writer.close()
        self._sources.close()
        self._windows.close()

    def _use_placement(self, placement: OpDevices) -> None:
        self._op_devices = placement
        if self.devices is None:
            # Remote devices too: they are reported unknown, not left out.
            placed = sorted(placement.placed)
            self._reported += [d for d in placed if d not in self._reported]

    def _remote_windows(self, strategy: tf.distribute.Strategy) -> RemoteWindows | None:
        """Windows for the devices of other processes that nothing else measures,
        whose task's profiler service is known."""
        resolver = getattr(strategy, "cluster_resolver", None)
        addresses = dict(getattr(resolver, "profiler_addresses", None) or {})
        addresses.update(self.profiler_addresses)
        covered = self._in_graph.devices if self._in_graph is not None else ()
        traced = {
            device: addresses[task]
            for device in self._reported
            if device not in covered
            and not self._own(device)
            and (task := device.split("/device:")[0]) in addresses
        }
        if not traced:
            return None
        return RemoteWindows(
            traced,
            self.remote_window_ms,
            on_error=lambda device, err: self._fail(
                f"{device_label(device)}'s profiler service", err
            ),
        )

    def _measured_in_graph(self, device: str) -> bool:
        """Whether to take `device`'s utilization from the strategy's counters:
        another process's device, which this process's profiler cannot see,
        or any device when the profiler traces nothing here."""
        wanted = self.devices is None or device in self.devices
        return wanted and (not self._own(device) or not self._tracing)

    def _describe(self, tag: str) -> str:
        """A tag's definition, by where its device's utilization comes from."""
        if self._remote is not None and any(
            tag == f"device/{device_label(d)}/utilization" for d in self._remote.devices
        ):
            return describe(tag, "remote_profiler")
        source = self._in_graph
        in_graph = source.devices if source is not None else ()
        if any(tag == f"device/{device_label(d)}/utilization" for d in in_graph):
            assert source is not None
            return describe(tag, "in_graph_async" if source.per_wall else "in_graph")
        return describe(tag, "nvml" if "/GPU:" in tag else "profiler")

    def _own(self, device: str) -> bool:
        """Whether `device` is this process's, so its profiler sees its ops."""
        return "/job:" not in device or (
            self._task is not None and device.startswith(f"{self._task}/")
        )

    def _sample(self, steps_done: int, traced: tuple[int, int] | None) -> None:
        """Called by `ProfilerWindows` when a window closes."""
        step = self._first_step + steps_done
        if traced is not None:
            # This process's GPUs are measured by NVML (`SourceGroup`).
            # Devices the strategy measures in its graph are read below.
            in_graph = self._in_graph.devices if self._in_graph is not None else ()
            devices = [
                d
                for d in self._reported
                if ("GPU" not in d or not self._own(d)) and d not in in_graph
            ]
            # Stopping exports the trace (tens of ms): the parser thread does
            # it, and the parsing, off the training thread.
            self._parser.submit(step, traced, devices, self._op_devices, self._fallback)
        for sample in self._sources.read():
            self._writer.add(step, sample.tag, sample.value)
        if self._in_graph is not None:
            try:
                for sample in self._in_graph.read():
                    self._writer.add(step, sample.tag, sample.value)
            except Exception as err:  # never break training over a measurement
                self._fail("the strategy's busy counters", err)
        if self._remote is not None:
            self._remote.request(step)
        if not self._tracing and "utilization" in self.metrics:
            covered = [
                *(self._in_graph.devices if self._in_graph is not None else ()),
                *(self._remote.devices if self._remote is not None else ()),
            ]
            for device in self._reported:
                if device not in covered:
                    self._say_unknown(step, device, self._untraced_why)
        self._write_parsed()
        self._writer.flush()

    def _write_parsed(self) -> None:
        if self._remote is not None:
            for step, sample in self._remote.collect():
                self._writer.add(step, sample.tag, sample.value)
        for window in self._parser.collect():
            for sample in window.samples:
                self._writer.add(window.step, sample.tag, sample.value)
            for device, ops in window.unseen.items():
                self._say_unseen(window.step, device, ops)

    def _say_unseen(self, step: int, device: str, ops: int) -> None:
        """Says why a traced window did not see `device`'s ops."""
        if not self._own(device):
            why = "they run in another process"
        elif ops:
            why = "their names in the trace could not be matched to the placed graph"
        else:  # the one device, placement not collected: the trace has no op
            why = "the profiler recorded no op event"
        placed = f"{ops} ops are placed there, none" if ops else "no op of the step"
        reason = f"{placed} appeared in this process's profiler trace ({why})"
        self._say_unknown(step, device, reason)

    def _say_unknown(self, step: int, device: str, reason: str) -> None:
        """Warns once, and notes once per fit, that a device's utilization is unknown."""
        label = device_label(device)
        if device not in self._said_unseen:
            self._said_unseen.add(device)
            logger.warning(
                "tfpar DeviceUtilization: %s: %s; its utilization is unknown and "
                "not logged. This is logged once.",
                label,
                reason,
            )
        if device not in self._unseen_written:
            self._unseen_written.add(device)
            self._writer.add_text(
                step,
                f"device/{label}/utilization",
                f"unknown: {reason}. No utilization of {label} is logged.",
            )

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
    names = check_sequence(
        "metrics", metrics, str, f"a list or tuple of names from {list(METRICS)}"
    )
    if not names or not set(names) <= set(METRICS):
        raise value_error(
            "metrics", list(metrics), f"a non-empty subset of {list(METRICS)}"
        )
    return names


def _check_addresses(addresses: Mapping[str, str] | None) -> dict[str, str]:
    if addresses is None:
        return {}
    check_instance(
        "profiler_addresses",
        addresses,
        Mapping,
        'a dict of task name to "host:port", or None',
    )
    allowed = 'task names ("/job:ps/replica:0/task:0") mapped to "host:port" strings'
    tasks = {}
    for task, address in addresses.items():
        name = _task_name(task)
        if name is None or not (
            isinstance(address, str) and address.rpartition(":")[2].isdigit()
        ):
            raise value_error("profiler_addresses", dict(addresses), allowed)
        tasks[name] = address
    return tasks


def _task_name(task: object) -> str | None:
    """`/job:ps/task:0` as TensorFlow names the task (`/job:ps/replica:0/task:0`),
    or `None` if `task` does not name one task."""
    if not isinstance(task, str):
        return None
    try:
        spec = tf.DeviceSpec.from_string(task)
    except ValueError:
        return None
    if spec.job is None or spec.task is None or spec.device_type is not None:
        return None
    return f"/job:{spec.job}/replica:{spec.replica or 0}/task:{spec.task}"


def _check_step_range(steps: tuple[int, int] | None) -> tuple[int, int] | None:
    if steps is None:
        return None
    check_instance(
        "profile_steps",
        steps,
        (tuple, list),
        "a (first, last) pair of step numbers or None",
    )
    allowed = "a (first, last) pair of step numbers with 0 <= first <= last"
    if len(steps) != 2:
        raise value_error("profile_steps", steps, allowed)
    first = check_int("profile_steps[0]", steps[0])
    last = check_int("profile_steps[1]", steps[1])
    if not 0 <= first <= last:
        raise value_error("profile_steps", steps, allowed)
    return (first, last)
