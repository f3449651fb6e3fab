"""A killed parameter server: a clear error, nothing left behind, exact resume.

Two coordinator subprocesses (a process connected to a cluster that died
cannot join another): the first kills the PS in the middle of `fit` with
`BackupAndRestore`; the second starts a new cluster and reruns the same fit,
which resumes at the last backed-up epoch.
"""

import pytest

from tests._subprocess import alive, run_python, tagged_json

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

SCRIPT = """
import json, os, sys, time, numpy as np, tensorflow as tf, keras, tfpar
from tfpar import ParameterServerStrategy
from tfpar.errors import ClusterTaskError

backup, kill = {backup!r}, {kill}
results = {{}}
rng = np.random.default_rng(0)
x = rng.normal(size=(256, 4)).astype("float32")
y = x.sum(axis=1, keepdims=True).astype("float32")
with tfpar.LocalCluster(num_workers=2, num_ps=1, pin_cores=False) as cluster:
    pids = [cluster.pid(j, i) for j, i in [("worker", 0), ("worker", 1), ("ps", 0)]]
    strategy = ParameterServerStrategy(cluster.cluster_resolver, step_deadline=30)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(32).repeat()
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
    class KillPS(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
        def on_train_batch_end(self, batch, logs=None):
            if kill and self.epoch == 2 and batch == 5 and "killed" not in results:
                cluster.kill("ps", 0)
                results["killed"] = time.monotonic()
    try:
        model.fit(dataset, epochs=4, steps_per_epoch=20, verbose=0,
                  callbacks=[keras.callbacks.BackupAndRestore(backup), KillPS()])
        results["iterations"] = int(model.optimizer.iterations.numpy())
    except ClusterTaskError as err:
        results["error"] = str(err)
        results["task"] = err.task
        results["seconds"] = time.monotonic() - results["killed"]
results["pids"] = pids
print("RESULTS " + json.dumps(results), flush=True)
"""


def results(proc):
    return tagged_json(proc.stdout, "RESULTS")


def test_killed_ps_is_named_and_training_resumes_from_the_backup(tmp_path):
    backup = str(tmp_path / "backup")
    first = results(run_python(SCRIPT.format(backup=backup, kill=True), timeout=150))
    assert first["task"] == "/job:ps/replica:0/task:0", first
    assert "/job:ps/replica:0/task:0 (127.0.0.1:" in first["error"]
    assert "BackupAndRestore" in first["error"]
    assert first["seconds"] < 5.0, first
    # The coordinator process exited normally (run_python checks the exit
    # code) and left no server process behind.
    assert not any(alive(pid) for pid in first["pids"])
    assert "Graph execution error" not in first["error"]

    second = results(run_python(SCRIPT.format(backup=backup, kill=False), timeout=150))
    # Epochs 0 and 1 were backed up; epochs 2 and 3 ran again: 4 x 20 steps.
    assert second["iterations"] == 4 * 20, second
