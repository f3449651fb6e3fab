"""tfpar.MultiWorkerMirroredStrategy: Keras 3 fit across real worker processes.

Each test starts two worker processes on loopback, each with its own
`TF_CONFIG`, as `tfpar launch` does. Every worker also trains a reference
model without any strategy on the global batch, in the same process, so the
comparison needs no file exchange; the test then checks that the workers
agree with each other exactly. Bad-input tests run in the test process.
"""

import json

import numpy as np
import pytest
import tensorflow as tf

import tfpar
from tests._subprocess import run_workers, tagged_json
from tfpar._datasets import without_autotune_thread

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

FIT = """
import sys, numpy as np, tfpar
SIMULATED = __SIMULATED__
if SIMULATED:
    tfpar.simulate_devices(SIMULATED)
strategy = tfpar.MultiWorkerMirroredStrategy(__OPTIONS__)
import keras, tensorflow as tf

rng = np.random.default_rng(0)
x = rng.normal(size=(512, 8)).astype("float32")
y = (x @ rng.normal(size=(8, 1)) + 0.1).astype("float32")
results = {"replicas": strategy.num_replicas_in_sync}
# One replica on the worker's CPU reads through one plain iterator.
from tfpar._compat.datasets import reads_in_place
batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(64)
results["in_place"] = reads_in_place(strategy.experimental_distribute_dataset(batches))

def build(optimizer):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"),
                              keras.layers.Dense(1)])
    model.compile(optimizer=optimizer, loss="mse", metrics=["mae"])
    return model

optimizers = {"sgd_momentum": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
              "adam": lambda: keras.optimizers.Adam(0.01)}
for name, make in optimizers.items():
    reference = build(make())
    reference.fit(x, y, batch_size=64, epochs=2, shuffle=False, verbose=0)
    with strategy.scope():
        model = build(make())
    before = strategy.communication_stats()
    history = model.fit(x, y, batch_size=64, epochs=2, shuffle=False, verbose=0).history
    counted = strategy.communication_stats().since(before)
    results[name] = {
        "loss": history["loss"],
        "weights": [w.tolist() for w in model.get_weights()],
        "diff": max(float(np.abs(a - b).max())
                    for a, b in zip(model.get_weights(), reference.get_weights())),
        "iterations": int(model.optimizer.iterations.numpy()),
        "steps": counted.steps,
        "bytes_logical": counted.bytes_logical,
        "bytes_moved": counted.bytes_moved,
        "parameter_bytes": sum(w.size * 4 for w in model.get_weights()),
        "sync_devices": [d.device for d in counted.devices],
        "in_process": [d.in_process for d in counted.devices],
        "slowest": [d.slowest_steps for d in counted.devices],
        "waits": [d.wait_seconds for d in counted.devices],
    }
    if name == "adam":
        results["eval"] = model.evaluate(x, y, batch_size=64, verbose=0)
        results["ref_eval"] = reference.evaluate(x, y, batch_size=64, verbose=0)
        results["pred_diff"] = float(np.abs(
            model.predict(x, batch_size=64, verbose=0)
            - reference.predict(x, batch_size=64, verbose=0)).max())
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(64)
        results["dataset_loss"] = model.fit(dataset, epochs=1, verbose=0).history["loss"]
        # A global batch the replicas cannot share is refused before a step.
        refused = []
        batched_63 = tf.data.Dataset.from_tensor_slices((x, y)).batch(63)
        for fit_63 in (lambda: model.fit(x, y, batch_size=63, verbose=0),
                       lambda: model.fit(batched_63, verbose=0)):
            try:
                fit_63()
            except ValueError as error:
                refused.append(str(error))
        results["refused"] = refused
        results["steps_after_refusal"] = int(model.optimizer.iterations.numpy())
        # evaluate weighs each replica's loss by its batch: any batch works.
        results["eval_63"] = model.evaluate(x, y, batch_size=63, verbose=0)
        results["eval_64"] = model.evaluate(x, y, batch_size=64, verbose=0)
print("RESULTS " + json.dumps(results), flush=True)
""".replace("import sys,", "import json, sys,")


def run_fit(options: str = "", simulated: int = 0) -> list[dict]:
    code = FIT.replace("__OPTIONS__", options).replace("__SIMULATED__", str(simulated))
    return [tagged_json(p.stdout, "RESULTS") for p in run_workers(code, 2)]


def test_two_workers_hold_the_weights_of_one_process_on_the_global_batch():
    first, second = run_fit()
    assert first["replicas"] == second["replicas"] == 2
    assert first["in_place"] and second["in_place"]
    for name in ("sgd_momentum", "adam"):
        a, b = first[name], second[name]
        # Every worker applied the same updates: identical weights.
        assert a["weights"] == b["weights"], name
        assert a["loss"] == b["loss"], name
        # ... equal to one process training on the global batch of 64.
        assert a["diff"] < 2e-6, (name, a["diff"])  # seen: 3.6e-7, 8.9e-8
        assert a["iterations"] == 2 * 512 // 64
        # One all-reduce per step, of every parameter's gradient.
        assert a["steps"] == a["iterations"]
        assert a["bytes_logical"] == a["iterations"] * a["parameter_bytes"]
        assert a["bytes_moved"] == a["bytes_logical"]
        # Both workers know every replica's interval, from one exchange: the
        # same waits, the same slowest replica at each synchronization (every
        # one but the strategy's first, which has no interval yet).
        assert (
            a["sync_devices"]
            == b["sync_devices"]
            == [f"/job:worker/replica:0/task:{i}/device:CPU:0" for i in (0, 1)]
        )
        assert (a["in_process"], b["in_process"]) == ([True, False], [False, True])
        assert a["slowest"] == b["slowest"]
        assert a["waits"] == b["waits"]
        first_fit = name == "sgd_momentum"
        assert sum(a["slowest"]) == a["steps"] - first_fit
        assert min(a["waits"]) >= 0 and max(a["waits"]) > 0
    # evaluate and predict see every sample, on every worker.
    assert first["eval"] == pytest.approx(first["ref_eval"], rel=1e-5)
    assert first["eval"] == second["eval"]
    assert first["pred_diff"] < 1e-5
    # tf.data input trains too (the same data, its global batch of 64).
    assert first["dataset_loss"] == second["dataset_loss"]
    assert np.isfinite(first["dataset_loss"]).all()
    # A global batch of 63 over 2 replicas: refused, arrays and tf.data alike,
    # before any step ran (the count is that of the fits before).
    assert len(first["refused"]) == 2
    for message in first["refused"]:
        assert "global batch size 63 does not divide over the 2 replicas" in message
        assert "batch_size=62 or 64" in message
    assert first["steps_after_refusal"] == 2 * 512 // 64 + 512 // 64
    assert first["eval_63"] == pytest.approx(first["eval_64"], rel=1e-5)


def test_two_workers_of_two_simulated_devices_compress_and_still_match():
    first, second = run_fit('compression="bf16", bucket_bytes=1024', simulated=2)
    assert first["replicas"] == second["replicas"] == 4
    # Two devices per worker: copied to each through TensorFlow's iterator.
    assert not first["in_place"] and not second["in_place"]
    for name in ("sgd_momentum", "adam"):
        a, b = first[name], second[name]
        assert a["weights"] == b["weights"], name
        # bf16 gradients: close to the float32 reference, not equal.
        assert 0 < a["diff"] < 2e-2, (name, a["diff"])
        assert a["bytes_moved"] * 2 == a["bytes_logical"]
        # Intervals travel in bf16 with the gradients: still one slowest
        # replica of the 4 per synchronization, the same on both workers.
        assert len(a["sync_devices"]) == 4
        assert a["slowest"] == b["slowest"]
        assert sum(a["slowest"]) == a["steps"] - (name == "sgd_momentum")


def _tf_config(cluster, task_type="worker", index=0):
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


@pytest.mark.parametrize(
    ("tf_config", "error", "match"),
    [
        (
            _tf_config({"chief": ["127.0.0.1:2222"]}, "chief"),
            ValueError,
            r"has no 'worker' job.*Received jobs: \['chief'\]",
        ),
        (
            _tf_config({"worker": ["127.0.0.1:2222"]}, index=1),
            ValueError,
            r"index=1 \(job 'worker' has tasks 0 to 0\)",
        ),
        (
            _tf_config({"worker": ["127.0.0.1:2222"], "ps": ["127.0.0.1:2223"]}, "ps"),
            ValueError,
            r"task \('ps', index 0, from TF_CONFIG\) is not a training task",
        ),
        ("", ValueError, "TF_CONFIG is not set"),
    ],
)
def test_bad_clusters_fail_before_anything_starts(monkeypatch, tf_config, error, match):
    monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(error, match=match):
        tfpar.MultiWorkerMirroredStrategy()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"all_reduce": "collective"}, ValueError, r"`all_reduce` must be one of"),
        ({"all_reduce": 1}, TypeError, r"all_reduce=1 of type int"),
        ({"compression": "int8"}, ValueError, r"compression='int8'"),
        ({"bucket_bytes": 0}, ValueError, r"bucket_bytes=0"),
        ({"on_nonfinite": "ignore"}, ValueError, r"on_nonfinite='ignore'"),
        ({"timeout": 0}, ValueError, r"timeout=0"),
        ({"timeout": "60"}, TypeError, r"timeout='60'"),
        ({"cluster_resolver": "TF_CONFIG"}, TypeError, r"cluster_resolver='TF_CONFIG'"),
    ],
)
def test_bad_options_fail_in_the_constructor(monkeypatch, kwargs, error, match):
    monkeypatch.setenv("TF_CONFIG", _tf_config({"worker": ["127.0.0.1:2222"]}))
    with pytest.raises(error, match=match):
        tfpar.MultiWorkerMirroredStrategy(**kwargs)


def test_created_after_tensorflow_started_says_what_to_do(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", _tf_config({"worker": ["127.0.0.1:2222"]}))
    tf.constant(1.0) + 1.0  # this process's runtime runs
    with pytest.raises(ValueError, match="must be created before TensorFlow runs"):
        tfpar.MultiWorkerMirroredStrategy()


def test_is_the_stock_class():
    assert issubclass(
        tfpar.MultiWorkerMirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy
    )


def test_the_autotune_thread_is_off_unless_the_dataset_sets_it():
    dataset = tf.data.Dataset.range(8).batch(4)
    assert without_autotune_thread(dataset).options().autotune.enabled is False
    for choice in (True, False):
        options = tf.data.Options()
        options.autotune.enabled = choice
        chosen = dataset.with_options(options)
        assert without_autotune_thread(chosen) is chosen
