"""tfpar.MultiWorkerMirroredStrategy when a worker is lost mid-fit.

Two real worker processes train with Keras `fit`; worker 1 SIGKILLs or
SIGSTOPs itself at a chosen step (it writes the time first), and worker 0
must leave `fit` with `tfpar.ClusterTaskError` naming task 1 and its address
within the detection bound (TensorFlow's coordination service's heartbeat
timeout, about 10 s), never hang. Then `keras.callbacks.BackupAndRestore`
(each worker with its own directory: Keras 3's callback writes from every
worker) resumes a killed run at the interrupted epoch. Every process is
SIGKILLed in `finally`.
"""

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests._subprocess import kill_all, start_workers, tagged_json

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(90)]

# Detection is TensorFlow's heartbeat timeout (10 s, measured 8.5 to 10.3 s);
# the bound leaves room for a loaded 2-core machine.
DETECTION_BOUND = 30.0
EPOCHS, STEPS = 4, 8

WORKER = """
import json, os, signal, sys, time, numpy as np, tfpar
strategy = tfpar.MultiWorkerMirroredStrategy()
import keras
task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
rng = np.random.default_rng(0)
x = rng.normal(size=(__SAMPLES__, 8)).astype("float32")
y = (x @ rng.normal(size=(8, 1))).astype("float32")
with strategy.scope():
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.02), loss="mse")
VICTIM_EPOCH = int(os.environ.get("VICTIM_EPOCH", "-1"))
epochs_begun, losses = [], {}

class Fault(keras.callbacks.Callback):
    epoch = 0
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        epochs_begun.append(epoch)
    def on_epoch_end(self, epoch, logs=None):
        losses[epoch] = float(logs["loss"])
        print("EPOCH " + json.dumps([epoch, losses[epoch]]), flush=True)
    def on_train_batch_end(self, batch, logs=None):
        if task == 1 and self.epoch == VICTIM_EPOCH and batch == 2:
            with open(os.environ["STAMP"], "w") as f:
                f.write(repr(time.time()))
            sig = signal.SIGSTOP if os.environ["FAULT"] == "stop" else signal.SIGKILL
            os.kill(os.getpid(), sig)

callbacks = [Fault()]
if os.environ.get("BACKUP"):
    callbacks.insert(0, keras.callbacks.BackupAndRestore(os.environ["BACKUP"]))
result = {"epochs_begun": epochs_begun, "losses": losses}
try:
    model.fit(x, y, batch_size=16, epochs=__EPOCHS__, shuffle=False, verbose=0,
              callbacks=callbacks)
except Exception as error:
    result.update(time=time.time(), type=type(error).__name__,
                  module=type(error).__module__, task=getattr(error, "task", None),
                  message=str(error))
result["iterations"] = int(model.optimizer.iterations.numpy())
print("RESULT " + json.dumps(result), flush=True)
"""


def _code(epochs: int = 50) -> str:
    return WORKER.replace("__SAMPLES__", str(STEPS * 16)).replace(
        "__EPOCHS__", str(epochs)
    )


def _result(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{out}\n{err[-4000:]}"
    return tagged_json(out, "RESULT")


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_a_lost_worker_ends_the_other_with_an_error_naming_it(
    tmp_path: Path, fault: str
) -> None:
    stamp = tmp_path / "stamp"
    env = {"FAULT": fault, "STAMP": str(stamp), "VICTIM_EPOCH": "1"}
    procs, cluster = start_workers(_code(), 2, env=env)
    try:
        survivor = _result(procs[0], timeout=75)
        detected = survivor["time"] - float(stamp.read_text())
    finally:
        kill_all(procs)  # the stopped worker too: SIGKILL ends it
    assert survivor["module"] == "tfpar.errors", survivor
    assert survivor["type"] == "ClusterTaskError"
    assert survivor["task"] == "/job:worker/replica:0/task:1"
    message = survivor["message"]
    assert f"/job:worker/replica:0/task:1 ({cluster['worker'][1]})" in message
    assert "Restart every worker" in message and "BackupAndRestore" in message
    assert 0 < detected < DETECTION_BOUND, detected  # seen: 8.5 to 10.3 s
    print(f"worker 1 {fault}: named by worker 0 after {detected:.1f} s")  # -s shows


def test_backup_and_restore_resumes_a_killed_run_at_the_interrupted_epoch(
    tmp_path: Path,
) -> None:
    # Keras 3's BackupAndRestore saves from every worker: one directory each.
    dirs = [{"BACKUP": str(tmp_path / f"backup{i}")} for i in range(2)]
    stamp = tmp_path / "stamp"
    env = {"FAULT": "kill", "STAMP": str(stamp), "VICTIM_EPOCH": "2"}
    procs, _ = start_workers(_code(EPOCHS), 2, env=env, worker_env=dirs)
    try:
        interrupted = _result(procs[0], timeout=60)
    finally:
        kill_all(procs)
    assert interrupted["type"] == "ClusterTaskError", interrupted
    assert sorted(interrupted["losses"]) == ["0", "1"]  # epochs 0 and 1 finished

    procs, _ = start_workers(_code(EPOCHS), 2, worker_env=dirs)
    try:
        resumed = [_result(p, timeout=60) for p in procs]
    finally:
        kill_all(procs)
    for run in resumed:
        assert "type" not in run, run
        assert run["epochs_begun"] == [2, 3]  # resumed at the interrupted epoch
        # The step count of an uninterrupted run of EPOCHS x STEPS.
        assert run["iterations"] == EPOCHS * STEPS
    first, second = resumed
    assert first["losses"] == second["losses"]
    # The loss continues from the last finished epoch, not from the start.
    last, start = interrupted["losses"]["1"], interrupted["losses"]["0"]
    resumed_loss = first["losses"]["2"]
    assert resumed_loss < last < start
    assert resumed_loss > 0.5 * last, (start, last, resumed_loss)
