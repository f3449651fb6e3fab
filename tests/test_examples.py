"""The examples run to the end: the quickstart (`make demo`) leaves logs TensorBoard
reads; the parameter-server example shards, learns and saves a loadable model."""

import re
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


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_parameter_server_example_shards_learns_and_saves(tmp_path):
    saved = tmp_path / "recommender.keras"
    args = ["--epochs", "2", "--steps-per-epoch", "25", "--save", str(saved)]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "parameter_server.py"), *args],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    # The user embedding is split over both parameter servers.
    shards = [x for x in proc.stdout.splitlines() if x.startswith("user_embedding")]
    assert [s.rsplit("/job:", 1)[1] for s in shards] == [
        "ps/replica:0/task:0/device:CPU:0",
        "ps/replica:0/task:1/device:CPU:0",
    ], proc.stdout
    val_losses = [float(v) for v in re.findall(r"val_loss: ([0-9.]+)", proc.stdout)]
    assert len(val_losses) == 2 and val_losses[1] < val_losses[0], val_losses
    assert f"saved {saved} (loads without tfpar)" in proc.stdout
    load = (
        "import sys; sys.modules['tfpar'] = None; import keras, numpy as np; "
        f"m = keras.models.load_model({str(saved)!r}); "
        "p = m.predict({'user': np.arange(4, dtype='int32'), "
        "'item': np.arange(4, dtype='int32')}, verbose=0); "
        "assert p.shape == (4, 1) and np.isfinite(p).all(), p"
    )
    subprocess.run([sys.executable, "-c", load], check=True, timeout=120)
