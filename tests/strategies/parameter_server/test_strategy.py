"""tfpar.ParameterServerStrategy: Keras 3 fit/evaluate/predict on a real cluster.

Connecting a process to a cluster cannot be undone, so every test that
connects runs the coordinator in a subprocess that starts its own
LocalCluster; each such subprocess checks several things, since each costs
several seconds of TensorFlow start-up per task. Bad-input tests fail before
any connection, so they run in the test process.
"""

import json
import os
import re
import socket
import time

import numpy as np
import pytest
import tensorflow as tf

from tests._subprocess import run_python, tagged_json
from tfpar import ParameterServerStrategy
from tfpar.server import SECURITY_WARNING

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]


def resolver(cluster):
    return tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(cluster), rpc_layer="grpc"
    )


def closed_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()  # nobody listens there now
    return ports


GOOD = {"worker": ["127.0.0.1:2222"], "ps": ["127.0.0.1:2223"]}


@pytest.mark.parametrize(
    ("tf_config", "message"),
    [
        ("{not json", r"TF_CONFIG is not valid JSON"),
        (
            json.dumps({"cluster": GOOD, "task": {"type": "chief"}}),
            r"task type is not a job",
        ),
        (
            # The ps job is what is missing, not the chief's.
            json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "chief"}}),
            r"needs a 'ps' job in its cluster \(the parameter servers, which hold "
            r"the variables\), but TF_CONFIG's cluster has no 'ps' job: its jobs "
            r"are \['worker'\]\. Add the addresses of the ps tasks",
        ),
        (
            json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "ps"}}),
            r"needs a 'ps' job in its cluster",
        ),
        (
            json.dumps({"cluster": {"ps": ["p:1"]}, "task": {"type": "worker"}}),
            r"needs a 'worker' job in its cluster \(the workers, which run the "
            r"training steps\), but TF_CONFIG's cluster has no 'worker' job: its "
            r"jobs are \['ps'\]",
        ),
        (
            json.dumps({"cluster": GOOD, "task": {"type": "worker", "index": 3}}),
            r"index=3 \(job 'worker' has tasks 0 to 0\)",
        ),
        (
            json.dumps({"cluster": {"worker": ["h"], "ps": ["p:1"]}, "task": {}}),
            r"'h' of job 'worker' has no port",
        ),
        (
            json.dumps(
                {
                    "cluster": {"worker": ["0.0.0.0:1"], "chief": ["c:2"]},
                    "task": {"type": "chief", "index": 0},
                }
            ),
            r"names every network interface",
        ),
        (
            json.dumps(
                {
                    "cluster": {"worker": ["w:1"], "chief": ["c:2"]},
                    "task": {"type": "chief", "index": 0},
                }
            ),
            r"needs a 'ps' job in its cluster",
        ),
        (
            json.dumps(
                {
                    "cluster": {"ps": ["p:1"], "chief": ["c:2"]},
                    "task": {"type": "chief", "index": 0},
                }
            ),
            r"needs a 'worker' job in its cluster",
        ),
    ],
)
def test_bad_tf_config_fails_before_any_connection(monkeypatch, tf_config, message):
    monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(ValueError, match=message):
        ParameterServerStrategy()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"cluster_resolver": GOOD},
            TypeError,
            r"`cluster_resolver` must be a tf.distribute.cluster_resolver."
            r"ClusterResolver or None\. Received: cluster_resolver=\{.* of type dict",
        ),
        (
            {"variable_partitioner": 3},
            TypeError,
            r"`variable_partitioner` must be a partitioner .* or None\. "
            r"Received: variable_partitioner=3 of type int",
        ),
        (
            {"connect_timeout": 0},
            ValueError,
            r"`connect_timeout` must be a number of seconds > 0\. "
            r"Received: connect_timeout=0\.",
        ),
        (
            {"connect_timeout": "5"},
            TypeError,
            r"`connect_timeout` must be a number of seconds\. "
            r"Received: connect_timeout='5' of type str",
        ),
        (
            {"connect_timeout": True},
            TypeError,
            r"Received: connect_timeout=True of type bool",
        ),
        (
            {"step_deadline": -1.0},
            ValueError,
            r"`step_deadline` must be a number of seconds > 0\. "
            r"Received: step_deadline=-1\.0\.",
        ),
        (
            {"step_deadline": float("inf")},
            ValueError,
            r"`step_deadline` must be a finite number of seconds",
        ),
        (
            {"max_in_flight": 0},
            ValueError,
            r"`max_in_flight` must be an int >= 1\. Received: max_in_flight=0\.",
        ),
        (
            {"max_in_flight": 2.0},
            TypeError,
            r"`max_in_flight` must be an int or None\. "
            r"Received: max_in_flight=2\.0 of type float",
        ),
    ],
)
def test_bad_arguments_fail_before_any_connection(kwargs, error, message):
    kwargs.setdefault("cluster_resolver", resolver(GOOD))
    with pytest.raises(error, match=message):
        ParameterServerStrategy(**kwargs)


@pytest.mark.parametrize("missing", ["ps", "worker"])
def test_a_cluster_spec_without_a_required_job_says_which_and_what_it_has(missing):
    spec = {job: tasks for job, tasks in GOOD.items() if job != missing}
    spec["chief"] = ["127.0.0.1:2224"]
    with pytest.raises(ValueError) as info:
        ParameterServerStrategy(resolver(spec))
    message = str(info.value)
    assert f"needs a {missing!r} job in its cluster" in message
    assert "the cluster resolver's cluster spec has no" in message
    assert f"its jobs are {sorted(spec)}" in message
    assert f'"{missing}": ["host:port", ...]' in message


def test_unreachable_tasks_fail_within_the_connect_timeout_naming_each():
    worker, ps = closed_ports(2)
    spec = {"worker": [f"127.0.0.1:{worker}"], "ps": [f"127.0.0.1:{ps}"]}
    start = time.monotonic()
    with pytest.raises(ConnectionError) as info:
        ParameterServerStrategy(resolver(spec), connect_timeout=0.5)
    assert time.monotonic() - start < 3.0
    message = str(info.value)
    assert f"/job:worker/replica:0/task:0 at 127.0.0.1:{worker}" in message
    assert f"/job:ps/replica:0/task:0 at 127.0.0.1:{ps}" in message
    assert "connect_timeout=0.5s" in message


# One coordinator process checks fit (numpy and tf.data, epochs,
# steps_per_epoch, validation_data), exactness against single-process Keras,
# evaluate, predict, callbacks, metrics over all workers, per-worker step
# counts, communication stats and saving. The reference results are computed
# before connecting: a process's existing variables are unusable once it joins
# a cluster.
FIT_SCRIPT = """
import json, os, sys, numpy as np, tensorflow as tf, keras, tfpar
from tfpar import ParameterServerStrategy

out = sys.argv[-1] if len(sys.argv) > 1 else {out!r}
rng = np.random.default_rng(0)
x = rng.normal(size=(256, 8)).astype("float32")
y = (x @ rng.normal(size=(8, 1)) + 0.1).astype("float32")
xv, yv = x[:64], y[:64]

def build(steps_per_execution=1):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse", metrics=["mae"],
                  steps_per_execution=steps_per_execution)
    return model

# Reference: one process, no strategy. steps_per_execution = the epoch makes
# the cluster run each epoch as one function on one worker: sequential, so
# the result must match exactly.
ref = build(steps_per_execution=8)
init = ref.get_weights()
ref_history = ref.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0).history
ref_weights = ref.get_weights()
ref_eval = ref.evaluate(xv, yv, batch_size=16, verbose=0)
ref_pred = ref.predict(x[:50], batch_size=16, verbose=0)
results = {{}}

# What tfpar once replaced for the whole process: unchanged after a run.
from tensorflow.python.eager import context
def process_state():
    return [context.executor_scope, context.Context.add_c_function,
            context.Context.add_function_def, list(tf.get_logger().filters)]
before = process_state()

with tfpar.LocalCluster(num_workers=2, num_ps=2, pin_cores=False) as cluster:
    strategy = ParameterServerStrategy(cluster.cluster_resolver, step_deadline=60)
    results["isinstance"] = isinstance(strategy, tf.distribute.Strategy)
    with strategy.scope():
        model = build(steps_per_execution=8)
    model.set_weights(init)
    results["devices"] = sorted({{v.value.device for v in model.weights}})
    history = model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0).history
    results["history"] = history["loss"]
    results["ref_history"] = ref_history["loss"]
    results["weights_diff"] = max(float(np.abs(a - b).max())
                                  for a, b in zip(ref_weights, model.get_weights()))
    results["eval"] = model.evaluate(xv, yv, batch_size=16, verbose=0)
    results["ref_eval"] = ref_eval
    results["pred_diff"] = float(np.abs(model.predict(x[:50], batch_size=16, verbose=0) - ref_pred).max())

    # Asynchronous training: one step per scheduled function, tf.data input,
    # steps_per_epoch, validation data and callbacks.
    with strategy.scope():
        model = build()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(256, seed=0).batch(32).repeat()
    seen = []
    class Count(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(batch)
    callbacks = [Count(),
                 keras.callbacks.ModelCheckpoint(os.path.join(out, "best.keras")),
                 keras.callbacks.BackupAndRestore(os.path.join(out, "backup"))]
    history = model.fit(dataset, epochs=3, steps_per_epoch=10, validation_data=(xv, yv),
                        callbacks=callbacks, verbose=0).history
    results["async_history"] = history
    results["batches_seen"] = len(seen)
    results["iterations"] = int(model.optimizer.iterations.numpy())
    results["val_again"] = model.evaluate(xv, yv, batch_size=32, verbose=0, return_dict=True)
    records = strategy.runtime.tracker.records
    results["worker_steps"] = [r.steps for r in records]
    # The loss metric's count lives on a PS: after an epoch without
    # validation it holds every sample of every worker.
    model.fit(dataset, epochs=1, steps_per_epoch=10, verbose=0)
    results["loss_count"] = float(model.metrics[0].count.numpy())
    results["iterations_after"] = int(model.optimizer.iterations.numpy())
    stats = strategy.communication_stats()
    results["stats"] = [stats.kind, stats.steps, stats.calls, len(stats.devices),
                        all(d.busy_seconds > 0 for d in stats.devices)]
    results["progress_logs"] = sorted(history)
    model.save(os.path.join(out, "model.keras"))
    np.save(os.path.join(out, "pred.npy"), model.predict(x[:20], verbose=0))

    # Models not built under the strategy keep Keras's own functions.
    plain = build()
    plain.fit(x, y, batch_size=32, epochs=1, verbose=0)
    results["plain"] = plain.train_function.__qualname__
    del strategy, model
    results["process_state_unchanged"] = process_state() == before

print("RESULTS " + json.dumps(results))
"""


def test_fit_evaluate_predict_callbacks_and_saving_on_a_local_cluster(tmp_path):
    proc = run_python(FIT_SCRIPT.format(out=str(tmp_path)), timeout=200)
    assert SECURITY_WARNING in proc.stderr
    # LocalCluster leaves the cluster before stopping it: no gRPC error per
    # deleted function at exit.
    assert "Failed to remove function remotely" not in proc.stderr
    assert "Connection refused" not in proc.stderr
    # tfpar's scheduled steps are scheduled: TensorFlow does not warn.
    assert "is invoked without using `ClusterCoordinator.schedule`" not in proc.stderr
    r = tagged_json(proc.stdout, "RESULTS")
    assert r["isinstance"]
    # Variables live on the parameter servers, round robin over both.
    assert r["devices"] == [
        "/job:ps/replica:0/task:0/device:CPU:0",
        "/job:ps/replica:0/task:1/device:CPU:0",
    ]
    # Sequential schedule: the same numbers as one process, to float rounding.
    np.testing.assert_allclose(r["history"], r["ref_history"], rtol=1e-5)
    assert r["weights_diff"] < 1e-5
    # Evaluation and prediction: each batch once, on a worker: exact.
    np.testing.assert_allclose(r["eval"], r["ref_eval"], rtol=1e-5)
    assert r["pred_diff"] < 1e-5

    # Asynchronous fit: every scheduled step ran, exactly once, on the workers.
    assert r["iterations"] == 30
    assert r["batches_seen"] == 30
    assert sum(r["worker_steps"]) >= 30 + 16  # plus the 16 steps above
    assert all(steps > 0 for steps in r["worker_steps"]), r["worker_steps"]
    history = r["async_history"]
    assert sorted(history) == ["loss", "mae", "val_loss", "val_mae"]
    assert history["loss"][-1] < history["loss"][0]
    # The last epoch's validation logs are the metrics on the PS after it.
    assert history["val_loss"][-1] == pytest.approx(r["val_again"]["loss"], rel=1e-5)
    assert r["loss_count"] == 10 * 32
    assert r["iterations_after"] == 40
    # 16 + 40 training steps; 2 + 30 + 10 train, 1 + 6 + 2 test, 1 predict functions.
    assert r["stats"] == ["parameter_server", 56, 52, 2, True]
    assert r["plain"].startswith("TensorFlowTrainer._make_function")
    assert r["process_state_unchanged"]
    assert (tmp_path / "best.keras").exists()
    assert not (tmp_path / "backup").exists() or not any(
        (tmp_path / "backup").iterdir()
    )  # BackupAndRestore deletes its backup after a completed fit

    # Saved models load and predict without tfpar.
    check = run_python(
        f"""
        import sys
        sys.modules["tfpar"] = None
        import numpy as np, keras
        model = keras.models.load_model({str(tmp_path / "model.keras")!r})
        x = np.random.default_rng(0).normal(size=(256, 8)).astype("float32")[:20]
        diff = np.abs(model.predict(x, verbose=0) - np.load({str(tmp_path / "pred.npy")!r})).max()
        print("DIFF", diff)
        """,
        timeout=120,
    )
    diff = float(re.search(r"DIFF (\S+)", check.stdout).group(1))
    assert diff < 1e-6
    assert os.path.exists(tmp_path / "model.keras")
