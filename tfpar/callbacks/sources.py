"""Counter sources: host CPU and RSS, TensorFlow memory info, NVML for GPUs.

Each source returns plain `Sample`s (a tag and a value) and knows nothing about
TensorBoard; `summaries.ScalarWriter` turns them into scalars. Sources whose
reads cost more than a few microseconds (psutil, NVML) read on their own
background thread and hand the training thread the latest values, so the
train loop never waits on `/proc` or the GPU driver.

Limits, said plainly: logical CPU devices share one allocator, and TensorFlow
keeps no allocator statistics for CPUs by default, so CPU memory is reported
for the host process (`host/rss_mib`), not per logical device. GPU utilization
from NVML is the driver's "a kernel was running" percentage for the whole GPU,
whatever process ran it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import tensorflow as tf

from tfpar._compat import callbacks as _compat
from tfpar.callbacks.summaries import device_label

logger = logging.getLogger("tfpar")

_MIB = 1024.0 * 1024.0


@dataclasses.dataclass(frozen=True)
class Sample:
    """One counter reading.

    Attributes:
        tag: The TensorBoard tag, e.g. `"host/rss_mib"`.
        value: The reading.

    Example:

    ```python
    Sample("host/rss_mib", 812.5)
    ```
    """

    tag: str
    value: float


class Source(Protocol):
    """What the callbacks need from a counter source."""

    name: str

    def read(self) -> list[Sample]:
        """Returns the current samples; may raise, the caller logs once."""
        ...

    def close(self) -> None:
        """Stops any thread and releases handles."""
        ...


class _Poller:
    """Calls `poll` every `interval` seconds on a daemon thread."""

    def __init__(self, name: str, poll: Callable[[], None], interval: float) -> None:
        self._poll = poll
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.error: BaseException | None = None
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._poll()
            except Exception as err:  # reported by read() on the training thread
                self.error = err

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class HostSource:
    """Host CPU utilization and resident memory of this process, via psutil.

    `host/cpu_utilization` is this process's CPU time over wall time divided
    by the number of cores it may run on (0 to 100 %), averaged since the
    previous read. `host/peak_rss_mib` is the kernel's high-water mark
    (`getrusage`), so short peaks between reads are not missed.

    Args:
        interval: Seconds between background polls. Defaults to `1.0`.

    Example:

    ```python
    source = HostSource()
    ...  # train
    print(source.read())  # [Sample('host/cpu_utilization', 48.7), ...]
    source.close()
    ```
    """

    name = "host (psutil)"

    def __init__(self, *, interval: float = 1.0) -> None:
        import psutil

        self._process = psutil.Process()
        self._cores = (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else (psutil.cpu_count() or 1)
        )
        # The first cpu_percent() call only primes the counter (returns 0.0).
        self._process.cpu_percent(None)
        self._lock = threading.Lock()
        self._cpu: list[float] = []
        self._rss = float(self._process.memory_info().rss)
        self._poller = _Poller("tfpar-host-counters", self._poll, interval)

    def _poll(self) -> None:
        cpu = self._process.cpu_percent(None) / self._cores
        rss = float(self._process.memory_info().rss)
        with self._lock:
            self._cpu.append(min(cpu, 100.0))
            self._rss = rss

    def read(self) -> list[Sample]:
        """Returns CPU utilization, RSS and peak RSS (MiB)."""
        if self._poller.error is not None:
            error, self._poller.error = self._poller.error, None
            raise error
        with self._lock:
            cpu, self._cpu = self._cpu, []
            rss = self._rss
        # ru_maxrss is in KiB on Linux.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
        samples = [
            Sample("host/rss_mib", rss / _MIB),
            Sample("host/peak_rss_mib", max(peak, rss) / _MIB),
        ]
        if cpu:
            samples.insert(0, Sample("host/cpu_utilization", sum(cpu) / len(cpu)))
        return samples

    def close(self) -> None:
        """Stops the polling thread."""
        self._poller.close()


class TensorFlowMemorySource:
    """Memory in use and peak memory per device, from TensorFlow's allocators.

    Uses `tf.config.experimental.get_memory_info`, exact per device on GPUs.
    CPU devices are never read: TensorFlow either raises (no allocator
    statistics) or, on some builds and machines, answers
    `{'current': 0, 'peak': 0}`, which is no measurement; and logical CPU
    devices share one allocator, so no number would be per device. They are
    skipped, with one warning when the source is created; the process's
    memory is `host/rss_mib` (`HostSource`).

    Args:
        devices: Canonical device names.

    Example:

    ```python
    TensorFlowMemorySource(["/device:GPU:0"]).read()
    # [Sample('device/GPU:0/memory_mib', ...), Sample('device/GPU:0/peak_memory_mib', ...)]
    ```
    """

    name = "TensorFlow memory info"

    def __init__(self, devices: Sequence[str]) -> None:
        # Decided by device type, not by all-zero answers: a GPU's allocator
        # truly reports 0 before its first allocation, so zero is a reading
        # there; on a CPU it never is.
        cpus = [d for d in devices if tf.DeviceSpec.from_string(d).device_type == "CPU"]
        self._devices = [d for d in devices if d not in cpus]
        if cpus:
            logger.warning(
                "tfpar: no per-device memory for %s: TensorFlow keeps no "
                "allocator statistics per CPU device (logical CPU devices "
                "share one allocator). See host/rss_mib for this process's "
                "memory.",
                ", ".join(device_label(d) for d in cpus),
            )

    def read(self) -> list[Sample]:
        """Returns `device/<d>/memory_mib` and `device/<d>/peak_memory_mib`."""
        samples = []
        for device in self._devices:
            label = device_label(device)
            info = tf.config.experimental.get_memory_info(label)
            samples.append(Sample(f"device/{label}/memory_mib", info["current"] / _MIB))
            samples.append(
                Sample(f"device/{label}/peak_memory_mib", info["peak"] / _MIB)
            )
        return samples

    def close(self) -> None:
        """Nothing to release."""


class NvmlSource:
    """GPU utilization and memory from NVML (`nvidia-ml-py`), polled off-thread.

    TensorFlow GPUs are matched to NVML devices by PCI bus id, not by index,
    because `CUDA_VISIBLE_DEVICES` renumbers the devices TensorFlow sees.

    Args:
        devices: Canonical names of local GPU devices.
        interval: Seconds between background polls. Defaults to `1.0`.
        nvml: The `pynvml` module (tests pass a fake). Defaults to importing it.

    Raises:
        RuntimeError: If NVML cannot be loaded or a GPU has no NVML match
            (the callback logs this once and goes on without NVML).

    Example:

    ```python
    source = NvmlSource(["/device:GPU:0"])
    print(source.read())  # [Sample('device/GPU:0/utilization', 87.0), ...]
    source.close()
    ```
    """

    name = "NVML"

    def __init__(
        self, devices: Sequence[str], *, interval: float = 1.0, nvml: Any = None
    ) -> None:
        if nvml is None:
            import pynvml

            nvml = pynvml
        self._nvml = nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as err:
            raise RuntimeError(f"NVML is not available ({err}).") from err
        bus_ids = _compat.gpu_bus_ids()
        self._handles = {}
        for device in devices:
            bus_id = bus_ids.get(device)
            if bus_id is None:
                raise RuntimeError(f"No PCI bus id known for {device}.")
            self._handles[device] = nvml.nvmlDeviceGetHandleByPciBusId_v2(bus_id)
        self._lock = threading.Lock()
        self._util: dict[str, list[float]] = {d: [] for d in self._handles}
        self._memory: dict[str, float] = {}
        self._poller = _Poller("tfpar-nvml", self._poll, interval)

    def _poll(self) -> None:
        for device, handle in self._handles.items():
            util = float(self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            used = float(self._nvml.nvmlDeviceGetMemoryInfo(handle).used)
            with self._lock:
                self._util[device].append(util)
                self._memory[device] = used

    def read(self) -> list[Sample]:
        """Returns `device/<d>/utilization` and `device/<d>/nvml_memory_mib`."""
        if self._poller.error is not None:
            error, self._poller.error = self._poller.error, None
            raise error
        samples = []
        with self._lock:
            for device, values in self._util.items():
                label = device_label(device)
                if values:
                    mean = sum(values) / len(values)
                    samples.append(Sample(f"device/{label}/utilization", mean))
                if device in self._memory:
                    mib = self._memory[device] / _MIB
                    samples.append(Sample(f"device/{label}/nvml_memory_mib", mib))
                self._util[device] = []
        return samples

    def close(self) -> None:
        """Stops polling and shuts NVML down."""
        self._poller.close()
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError:
            logger.debug("tfpar: nvmlShutdown failed", exc_info=True)
