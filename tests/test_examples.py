"""The quickstart (`make demo`) runs to the end and leaves logs TensorBoard reads."""

import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing import event_accumulator

import examples.quickstart as quickstart

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)
def test_quickstart_runs_and_writes_event_files(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "quickstart.py"),
            "--epochs",
            "1",
            "--logdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert proc.stdout.rstrip().endswith(f"tensorboard --logdir {tmp_path}")
    runs = sorted(p.name for p in tmp_path.iterdir())
    assert runs == sorted(quickstart.STRATEGIES)
    tags = {
        run: set(
            event_accumulator.EventAccumulator(
                str(tmp_path / run / "train"),
                size_guidance={event_accumulator.TENSORS: 0},
            )
            .Reload()
            .Tags()["tensors"]
        )
        for run in runs
    }
    for run, run_tags in tags.items():
        # Keras's own scalars and tfpar's sit side by side in one run.
        assert {"epoch_loss", "comm/step_time_ms", "host/rss_mib"} <= run_tags, run
        # Only tfpar strategies have communication counters.
        assert ("comm/time_ms" in run_tags) == (run != "stock_mirrored"), run
    # Both simulated devices of the local strategies show their utilization.
    for run in ("stock_mirrored", "mirrored", "pipeline"):
        assert {"device/CPU:0/utilization", "device/CPU:1/utilization"} <= tags[run]
