"""Tests for tfpar.callbacks.sources: host, TensorFlow memory and NVML counters."""

import logging
import resource
import threading
import time
import types

import numpy as np
import psutil
import pytest

from tfpar._compat import callbacks as _compat
from tfpar.callbacks.sources import HostSource, NvmlSource, TensorFlowMemorySource


def test_host_source_agrees_with_psutil_and_polls_off_thread() -> None:
    source = HostSource(interval=0.05)
    try:
        assert any(t.name == "tfpar-host-counters" for t in threading.enumerate())
        ballast = np.ones(64 * 1024 * 1024 // 8)  # +64 MiB resident
        end = time.monotonic() + 0.3
        while time.monotonic() < end:  # keep one core busy
            ballast.sum()
        samples = {s.tag: s.value for s in source.read()}
        rss = psutil.Process().memory_info().rss / 2**20
        assert samples["host/rss_mib"] == pytest.approx(rss, rel=0.1)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        assert samples["host/peak_rss_mib"] == pytest.approx(
            max(peak, samples["host/rss_mib"]), rel=0.05
        )
        assert 0.0 < samples["host/cpu_utilization"] <= 100.0
        del ballast
    finally:
        source.close()
    assert not any(t.name == "tfpar-host-counters" for t in threading.enumerate())


def test_cpu_memory_info_is_unavailable_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # For CPU:0 TensorFlow raises on some machines and answers
    # {'current': 0, 'peak': 0} on others; neither is a measurement, so tfpar
    # reports none, whichever TensorFlow does here, and says why once.
    devices = [
        "/device:CPU:0",
        "/device:CPU:1",
        "/job:worker/replica:0/task:0/device:CPU:0",
    ]
    with caplog.at_level(logging.INFO, logger="tfpar"):
        source = TensorFlowMemorySource(devices)
        samples = source.read() + source.read()
    assert samples == []
    notes = [r.getMessage() for r in caplog.records if r.name == "tfpar"]
    assert len(notes) == 1, notes
    assert "CPU:0, CPU:1, worker:0/CPU:0" in notes[0]
    assert "host/rss_mib" in notes[0]


def test_nvml_without_a_driver_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="NVML is not available"):
        NvmlSource(["/device:GPU:0"])


def test_nvml_matches_gpus_by_bus_id_not_index(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeNvml(types.SimpleNamespace):
        NVMLError = RuntimeError

    handles = {"0000:00:05.0": "second-physical-gpu"}
    fake = FakeNvml(
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetHandleByPciBusId_v2=handles.__getitem__,
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=70),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=3 * 2**20),
    )
    # With CUDA_VISIBLE_DEVICES=1, TensorFlow's GPU:0 is NVML's device 1.
    monkeypatch.setattr(
        _compat, "gpu_bus_ids", lambda: {"/device:GPU:0": "0000:00:05.0"}
    )
    source = NvmlSource(["/device:GPU:0"], interval=0.01, nvml=fake)
    try:
        time.sleep(0.1)
        samples = {s.tag: s.value for s in source.read()}
    finally:
        source.close()
    assert samples == {
        "device/GPU:0/utilization": 70.0,
        "device/GPU:0/nvml_memory_mib": 3.0,
    }
