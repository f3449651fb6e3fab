"""Tests for tfpar.callbacks.summaries: tags, run folders, layout, a live TensorBoard."""

import gzip
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from typing import Any

import keras
import pytest
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.custom_scalar import layout_pb2

from tests.callbacks._tb import (
    LAYOUT_TAG,
    dataset,
    event_files,
    read_scalars,
    tiny_model,
)
from tfpar.callbacks.communication_time import CommunicationTime
from tfpar.callbacks.device_utilization import DeviceUtilization
from tfpar.callbacks.summaries import (
    ScalarWriter,
    check_log_dir,
    custom_scalars_layout,
    device_label,
)


def test_writer_is_lazy_batched_and_writes_to_train(tmp_path: str) -> None:
    writer = ScalarWriter(str(tmp_path))
    writer.flush()
    writer.close()
    assert event_files(str(tmp_path)) == []  # nothing written, no file
    writer = ScalarWriter(str(tmp_path))
    writer.add(3, "host/rss_mib", 10.5)
    writer.add(7, "host/rss_mib", 11.0)
    writer.add(7, "device/CPU:1/utilization", 42.0)
    assert event_files(str(tmp_path)) == []  # buffered until flush
    writer.add_layout(custom_scalars_layout())
    writer.close()
    files = event_files(str(tmp_path))
    assert len(files) == 1 and files[0].startswith("train" + os.sep)
    assert read_scalars(os.path.join(tmp_path, "train")) == {
        LAYOUT_TAG: [(0, 0.0)],
        "host/rss_mib": [(3, 10.5), (7, 11.0)],
        "device/CPU:1/utilization": [(7, 42.0)],
    }


def test_a_failing_write_is_logged_once_and_dropped(
    tmp_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A file where the run folder should be: every write fails, for real.
    (tmp_path / "train").write_text("not a folder")
    writer = ScalarWriter(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="tfpar"):
        for step in range(3):
            writer.add(step, "host/rss_mib", 1.0)
            writer.flush()  # returns at once: the write runs on another thread
        writer.close()
    failures = [r.message for r in caplog.records if "writing scalars" in r.message]
    assert len(failures) == 1 and "train" in failures[0], failures
    assert event_files(str(tmp_path)) == []


def test_writes_run_on_a_background_thread_that_close_joins(tmp_path: str) -> None:
    writer = ScalarWriter(str(tmp_path))
    writer.add(1, "host/rss_mib", 1.0)
    writer.flush()
    thread_names = {t.name for t in threading.enumerate()}
    assert any(n.startswith("tfpar-summary-writer") for n in thread_names)
    writer.close()
    assert read_scalars(os.path.join(tmp_path, "train")) == {"host/rss_mib": [(1, 1.0)]}
    assert not any(
        t.name.startswith("tfpar-summary-writer") for t in threading.enumerate()
    )


def test_layout_charts_match_every_device() -> None:
    summary = summary_pb2.Summary.FromString(custom_scalars_layout())
    layout = layout_pb2.Layout.FromString(summary.value[0].tensor.string_val[0])
    charts = {
        c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart
    }
    # Device memory is GPU-only: no empty charts for it on this CPU machine.
    assert "memory in use (MiB)" not in charts and "host memory (MiB)" in charts
    utilization = charts["utilization (%)"]
    for tag in ["device/CPU:0/utilization", "device/worker:1/CPU:0/utilization"]:
        assert any(re.search(p, tag) for p in utilization)
    assert not any(re.search(p, "device/CPU:0/memory_mib") for p in utilization)
    assert any(
        re.search(p, "comm/device/CPU:1/bubble_ms")
        for p in charts["idle or bubble time per device (ms/step)"]
    )


def test_device_labels() -> None:
    assert device_label("/device:CPU:1") == "CPU:1"
    assert device_label("/job:localhost/replica:0/task:0/device:GPU:0") == "GPU:0"
    assert device_label("/job:worker/replica:0/task:1/device:CPU:0") == "worker:1/CPU:0"


def test_bad_log_dir_is_refused(tmp_path: str) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=r"Received: log_dir=.*file/sub"):
        check_log_dir(str(blocker / "sub"))
    with pytest.raises(TypeError, match="log_dir=3"):
        check_log_dir(3)
    with pytest.raises(ValueError, match="non-empty"):
        check_log_dir("")


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        body = response.read()
        if response.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        return json.loads(body)


def test_live_tensorboard_serves_keras_and_tfpar_tags(tmp_path: str) -> None:
    log_dir = str(tmp_path / "logs")
    x, y = dataset(256)
    model = tiny_model()
    model.fit(
        x,
        y,
        batch_size=32,
        epochs=2,
        verbose=0,
        callbacks=[
            keras.callbacks.TensorBoard(log_dir),
            DeviceUtilization(
                log_dir, every_steps=3, every_seconds=None, profile_steps=(4, 5)
            ),
            CommunicationTime(log_dir, every_steps=3, every_seconds=None),
        ],
    )
    files = event_files(log_dir)
    # Keras's writer and one per tfpar callback, all in Keras's train run.
    assert len(files) == 3 and all(f.startswith("train" + os.sep) for f in files)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            log_dir,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--load_fast=false",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base = None
        deadline = time.monotonic() + 60
        while base is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            match = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
            base = match.group(1) if match else None
            assert line or proc.poll() is None, "tensorboard exited"
        assert base is not None, "tensorboard printed no URL"
        tags: dict = {}
        while time.monotonic() < deadline:
            tags = _get(base + "data/plugin/scalars/tags")
            if "comm/step_time_ms" in tags.get("train", {}):
                break
            time.sleep(1)
        assert set(tags) == {"train"}
        tfpar_tags = {t for t in tags["train"] if not t.startswith("epoch_")}
        assert tfpar_tags == {
            "device/CPU:0/utilization",
            "host/cpu_utilization",
            "host/rss_mib",
            "host/peak_rss_mib",
            "comm/step_time_ms",
        } or tfpar_tags == {
            "device/CPU:0/utilization",
            "host/rss_mib",
            "host/peak_rss_mib",
            "comm/step_time_ms",
        }  # host CPU needs one background poll (1 s) to have happened
        assert "epoch_loss" in tags["train"]  # Keras's own, in the same run
        query = urllib.parse.urlencode(
            {"run": "train", "tag": "device/CPU:0/utilization"}
        )
        points = _get(base + "data/plugin/scalars/scalars?" + query)
        steps = [p[1] for p in points]
        assert steps == sorted(steps) and len(steps) >= 3
        assert all(0.0 <= p[2] <= 100.0 for p in points)
        assert max(p[2] for p in points) > 1.0  # the device did work
        layout = _get(base + "data/plugin/custom_scalars/layout")
        titles = [c["title"] for c in layout["category"]]
        assert titles == ["tfpar: devices", "tfpar: communication"]
        # The kept trace of steps 4-5 opens in the profile plugin (installed
        # by `make test`: the `profile` extra), as a session of the train run.
        listing = _get(base + "data/plugins_listing")
        assert listing.get("profile", {}).get("enabled"), listing.get("profile")
        sessions = _get(base + "data/plugin/profile/runs")
        assert len(sessions) == 1 and sessions[0].startswith("train/"), sessions
    finally:
        proc.kill()
        proc.wait(timeout=30)
