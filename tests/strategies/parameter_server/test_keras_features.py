"""Keras 3 features under tfpar.ParameterServerStrategy (issue #14).

Two coordinator subprocesses, each on its own LocalCluster (connecting cannot
be undone), each checking many features, since each costs seconds of start-up:

- optimizers and inputs: gradient accumulation (consistent under the update
  lock), `mixed_float16`, `keras.utils.PyDataset` (plain, threads,
  processes) and Python generators, and fits that failed for three different
  reasons, each followed by a fit on the same strategy;
- the rest of Keras's `fit`: `sample_weight`, `class_weight` and a
  multi-input multi-output model with `loss_weights` (against single-process
  Keras, run sequentially), validation with `EarlyStopping`,
  `BackupAndRestore` after an interruption, `ModelCheckpoint`, a subclassed
  model with its own `train_step`, `.keras` save and load.
"""

import numpy as np
import pytest

from tests._subprocess import run_python, tagged_json

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]


def falling(losses):
    """Finite, and at the end under half the first epoch's."""
    return bool(np.all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0])


def script(code, out):
    """`code` with `OUT_DIR` set to the folder `out`."""
    return code.replace("OUT_DIR", repr(str(out)))


COMMON = """
import json, os, sys, time, numpy as np, tensorflow as tf, keras, tfpar

out = OUT_DIR
rng = np.random.default_rng(0)
x = rng.normal(size=(256, 8)).astype("float32")
y = (x @ rng.normal(size=(8, 1)) + 0.1).astype("float32")
results = {}

def build(optimizer=None, **compile_args):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(1)])
    model.compile(optimizer=optimizer or keras.optimizers.Adam(0.02), loss="mse",
                  **compile_args)
    return model
"""

OPTIMIZERS_AND_INPUTS = (
    COMMON
    + """
LR = 0.25

def constant_gradient_model(optimizer):
    # The loss is the mean prediction of x = 1: every step's gradient is 1 for
    # each weight, whatever the weights, so the result is known exactly.
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=optimizer, loss=lambda _, pred: keras.ops.mean(pred))
    return model

class Batches(keras.utils.PyDataset):
    def __init__(self, log, **kwargs):
        super().__init__(**kwargs)
        self.log = log
    def __len__(self):
        return 8
    def __getitem__(self, index):
        with open(self.log, "a") as f:  # appended from threads and processes
            f.write(f"{index}\\n")
        return x[index * 32:(index + 1) * 32], y[index * 32:(index + 1) * 32]

def read_log(path):
    with open(path) as f:
        return sorted(int(line) for line in f)

with tfpar.LocalCluster(num_workers=2, num_ps=1, pin_cores=False) as cluster:
    strategy = tfpar.ParameterServerStrategy(cluster.cluster_resolver, step_deadline=30)

    # Gradient accumulation, asynchronous: 40 steps over both workers make
    # exactly 20 updates of LR each, if every accumulate-or-apply is atomic.
    ones = tf.data.Dataset.from_tensors((np.ones((8, 4), "float32"),
                                         np.zeros((8, 1), "float32"))).repeat()
    with strategy.scope():
        model = constant_gradient_model(
            keras.optimizers.SGD(LR, gradient_accumulation_steps=2))
    before = [np.zeros_like(w) for w in model.get_weights()]  # exact arithmetic
    model.set_weights(before)
    model.fit(ones, epochs=2, steps_per_epoch=20, verbose=0)
    results["accumulation_moved"] = [float(x) for x in np.unique(np.concatenate(
        [(b - a).ravel() for a, b in zip(model.get_weights(), before)]))]
    results["accumulation_updates"] = int(model.optimizer.iterations.numpy())
    results["accumulators"] = float(max(np.abs(v.numpy()).max()
        for v in model.optimizer.variables if "accumulator" in v.name))
    results["accumulation_workers"] = [r.steps for r in strategy.runtime.tracker.records]
    with strategy.scope():
        model = build(keras.optimizers.Adam(0.02, gradient_accumulation_steps=2))
    results["accumulation_adam"] = model.fit(x, y, batch_size=16, epochs=4,
                                             verbose=0).history["loss"]

    # mixed_float16: float16 compute, float32 variables, a LossScaleOptimizer.
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        with strategy.scope():
            model = build()
        results["mixed_loss"] = model.fit(x, y, batch_size=32, epochs=4,
                                          verbose=0).history["loss"]
        results["mixed"] = [type(model.optimizer).__name__,
                            model.layers[0].compute_dtype, model.weights[0].dtype]
    finally:
        keras.mixed_precision.set_global_policy("float32")

    # PyDataset (plain, threads, processes) and generators: read here, every
    # element sent once, in Keras's epochs.
    for name, kwargs in [("plain", {}), ("threads", {"workers": 2}),
                         ("processes", {"workers": 2, "use_multiprocessing": True})]:
        log = os.path.join(out, f"{name}.log")
        with strategy.scope():
            model = build()
        losses = model.fit(Batches(log, **kwargs), epochs=3, verbose=0).history["loss"]
        results[f"pydataset_{name}"] = {
            "loss": losses, "iterations": int(model.optimizer.iterations.numpy()),
            "count": float(model.metrics[0].count.numpy()), "log": read_log(log)}

    yielded = []
    def batches(count):
        for i in range(count):
            yielded.append(i)
            yield x[i % 8 * 32:(i % 8 + 1) * 32], y[i % 8 * 32:(i % 8 + 1) * 32]
    with strategy.scope():
        model = build()
    # steps_per_epoch: epochs continue the generator where the last stopped.
    losses = model.fit(batches(24), steps_per_epoch=8, epochs=3, verbose=0).history["loss"]
    results["generator"] = {"loss": losses, "yielded": list(yielded),
                             "iterations": int(model.optimizer.iterations.numpy())}
    yielded.clear()
    with strategy.scope():
        model = build()
    # Without steps_per_epoch: the epoch ends with the generator.
    model.fit(batches(5), epochs=1, verbose=0)
    results["generator_to_the_end"] = {
        "yielded": list(yielded), "iterations": int(model.optimizer.iterations.numpy())}

    # Failed fits, each followed by a fit on the same strategy.
    class Fails(keras.Model):
        def __init__(self, error):
            super().__init__()
            self.dense = keras.layers.Dense(1)
            self.error = error
        def call(self, inputs):
            return self.dense(inputs)
        def train_step(self, data):
            if self.error == "python":
                raise ValueError("boom while tracing")
            tf.debugging.assert_less(tf.reduce_sum(data[0]), -1e9, message="boom on a worker")
            return super().train_step(data)

    class StopAtBatch(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 3:
                raise KeyboardInterrupt  # while later steps are in flight

    def fit_after_failure(fit):
        try:
            fit()
        except BaseException as err:
            failed = f"{type(err).__name__}: {err}"[:200]
        else:
            failed = None
        start = time.monotonic()
        with strategy.scope():
            model = build()
        losses = model.fit(x, y, batch_size=32, epochs=2, verbose=0).history["loss"]
        return {"failed": failed, "then": losses, "seconds": time.monotonic() - start,
                 "iterations": int(model.optimizer.iterations.numpy())}

    recoveries = {}
    for error in ("python", "worker"):
        def fit_failing(error=error):
            with strategy.scope():
                model = Fails(error)
                model.compile("sgd", "mse")
            model.fit(x, y, batch_size=32, epochs=1, verbose=0)
        recoveries[error] = fit_after_failure(fit_failing)
    def fit_interrupted():
        with strategy.scope():
            model = build()
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[StopAtBatch()])
    recoveries["interrupted"] = fit_after_failure(fit_interrupted)
    results["recoveries"] = recoveries

print("RESULTS " + json.dumps(results))
"""
)


def test_accumulation_mixed_precision_python_inputs_and_failed_fits(tmp_path):
    proc = run_python(script(OPTIMIZERS_AND_INPUTS, tmp_path), timeout=280)
    r = tagged_json(proc.stdout, "RESULTS")

    # 40 steps, 20 updates of exactly LR = 0.25 per weight, on both workers;
    # the accumulators are empty after an even number of steps.
    assert r["accumulation_moved"] == [5.0]
    assert r["accumulation_updates"] == 20
    assert r["accumulators"] == 0.0
    assert all(steps > 0 for steps in r["accumulation_workers"])
    assert falling(r["accumulation_adam"]), r["accumulation_adam"]

    assert falling(r["mixed_loss"]), r["mixed_loss"]
    assert r["mixed"] == ["LossScaleOptimizer", "float16", "float32"]

    for name in ("plain", "threads", "processes"):
        run = r[f"pydataset_{name}"]
        assert falling(run["loss"]), (name, run["loss"])
        assert run["iterations"] == 3 * 8, name
        assert run["count"] == 8 * 32, name  # the last epoch's samples, each once
        # Each batch read at least once per epoch (Keras may read one more
        # to build the model).
        assert set(run["log"]) == set(range(8)), name
        assert all(run["log"].count(i) >= 3 for i in range(8)), (name, run["log"])

    generator = r["generator"]
    assert generator["yielded"] == list(range(24))
    assert generator["iterations"] == 24
    assert falling(generator["loss"]), generator["loss"]
    assert r["generator_to_the_end"] == {"yielded": [0, 1, 2, 3, 4], "iterations": 5}

    recoveries = r["recoveries"]
    assert recoveries["python"]["failed"] == "ValueError: boom while tracing"
    assert recoveries["worker"]["failed"].startswith("ClusterTaskError: ")
    assert "boom on a worker" in recoveries["worker"]["failed"]
    assert recoveries["interrupted"]["failed"] == "KeyboardInterrupt: "
    for name, run in recoveries.items():
        # The next fit runs its own 16 steps at once, no deadline reached.
        assert run["iterations"] == 16, name
        assert run["seconds"] < 20, (name, run["seconds"])
        assert run["then"][-1] < run["then"][0], name


FIT_FEATURES = (
    COMMON
    + """
xb = rng.normal(size=(256, 4)).astype("float32")
labels = (x[:, 0] > 0.8).astype("int32")  # imbalanced: about 1 in 5
classes = rng.integers(0, 3, size=(256,))

def weighted():
    return build(steps_per_execution=8, weighted_metrics=["mae"])

def classifier():
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(keras.optimizers.Adam(0.05), "sparse_categorical_crossentropy",
                  metrics=["accuracy"], steps_per_execution=8)
    return model

def multi_io():
    keras.utils.set_random_seed(1)
    a = keras.Input((8,), name="a")
    b = keras.Input((4,), name="b")
    h = keras.layers.Dense(16, activation="relu")(keras.layers.Concatenate()([a, b]))
    outputs = {"reg": keras.layers.Dense(1, name="reg")(h),
               "cls": keras.layers.Dense(3, activation="softmax", name="cls")(h)}
    model = keras.Model({"a": a, "b": b}, outputs)
    model.compile(keras.optimizers.Adam(0.02),
                  loss={"reg": "mse", "cls": "sparse_categorical_crossentropy"},
                  loss_weights={"reg": 1.0, "cls": 0.5}, metrics={"cls": ["accuracy"]},
                  steps_per_execution=8)
    return model

class OwnStep(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(16, activation="relu")
        self.out = keras.layers.Dense(1)
        self.loss_mean = keras.metrics.Mean(name="loss")
    def call(self, inputs):
        return self.out(self.hidden(inputs))
    def train_step(self, data):
        inputs, targets = data
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.abs(self(inputs, training=True) - targets))
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(grads, self.trainable_variables)
        self.loss_mean.update_state(loss)
        return {"loss": self.loss_mean.result()}
    @property
    def metrics(self):
        return [self.loss_mean]

def own_step():
    keras.utils.set_random_seed(1)
    model = OwnStep()
    model.compile(keras.optimizers.Adam(0.02), steps_per_execution=8)
    model(x[:1])
    return model

CASES = {
    "sample_weight": (weighted, lambda: ((x, y), {"sample_weight": np.abs(x[:, 1])})),
    "class_weight": (classifier, lambda: ((x, labels), {"class_weight": {0: 1.0, 1: 4.0}})),
    "multi_io": (multi_io, lambda: (({"a": x, "b": xb}, {"reg": y, "cls": classes}), {})),
    "own_train_step": (own_step, lambda: ((x, y), {})),
}

def run(case, init=None):
    make, data = CASES[case]
    model = make()
    if init is not None:
        model.set_weights(init)
    args, kwargs = data()
    history = model.fit(*args, batch_size=32, epochs=2, shuffle=False, verbose=0, **kwargs)
    return model, history.history

# Single-process references, before this process joins the cluster (its
# variables would be unusable after).
references = {}
for case in CASES:
    model = CASES[case][0]()
    init = model.get_weights()
    model, history = run(case, init)
    references[case] = (init, history, model.get_weights())

with tfpar.LocalCluster(num_workers=2, num_ps=1, pin_cores=False) as cluster:
    strategy = tfpar.ParameterServerStrategy(cluster.cluster_resolver, step_deadline=30)

    # One scheduled function per epoch: sequential, so exactly Keras's numbers.
    for case, (init, ref_history, ref_weights) in references.items():
        with strategy.scope():
            model, history = run(case, init)
        results[case] = {
            "history": history, "ref_history": ref_history,
            "weights_diff": max(float(np.abs(a - b).max())
                                for a, b in zip(model.get_weights(), ref_weights))}
        if case == "multi_io":
            model.save(os.path.join(out, "multi_io.keras"))
            predicted = model.predict({"a": x[:16], "b": xb[:16]}, verbose=0)
            np.savez(os.path.join(out, "multi_io.npz"), **predicted)

    # Validation and EarlyStopping, asynchronous: no val_loss improves by 100,
    # so training stops after epoch 2 with epoch 1's weights restored.
    with strategy.scope():
        model = build()
    stop = keras.callbacks.EarlyStopping(patience=1, min_delta=100, restore_best_weights=True)
    history = model.fit(x, y, batch_size=32, epochs=20, validation_data=(x[:64], y[:64]),
                        callbacks=[stop], verbose=0).history
    results["early_stopping"] = {
        "epochs": len(history["loss"]), "val_loss": history["val_loss"],
        "after": model.evaluate(x[:64], y[:64], verbose=0)}

    # BackupAndRestore: interrupted after epoch 2 of 4, resumed by a new model
    # at epoch 3 with the optimizer's state; ModelCheckpoint saves each epoch.
    backup = os.path.join(out, "backup")
    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("interrupted")
    with strategy.scope():
        model = build()
    try:
        model.fit(x, y, batch_size=32, epochs=4, verbose=0,
                  callbacks=[keras.callbacks.BackupAndRestore(backup), Interrupt()])
    except RuntimeError:
        pass
    begun = []
    class Begun(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            begun.append(epoch)
    with strategy.scope():
        model = build()
    checkpoint = keras.callbacks.ModelCheckpoint(os.path.join(out, "epoch{epoch}.keras"))
    history = model.fit(x, y, batch_size=32, epochs=4, verbose=0,
                        callbacks=[keras.callbacks.BackupAndRestore(backup), Begun(), checkpoint])
    np.save(os.path.join(out, "final.npy"), model.predict(x[:16], verbose=0))
    results["backup"] = {"begun": begun, "loss": history.history["loss"],
                          "iterations": int(model.optimizer.iterations.numpy()),
                          "files": sorted(f for f in os.listdir(out) if f.startswith("epoch"))}

    # A .keras file loads under the strategy (variables on the PS) and trains on.
    with strategy.scope():
        loaded = keras.models.load_model(os.path.join(out, "epoch4.keras"))
    results["loaded"] = {
        "diff": float(np.abs(loaded.predict(x[:16], verbose=0)
                             - np.load(os.path.join(out, "final.npy"))).max()),
        "devices": sorted({v.value.device for v in loaded.weights}),
        "loss": loaded.fit(x, y, batch_size=32, epochs=2, verbose=0).history["loss"]}

print("RESULTS " + json.dumps(results))
"""
)

LOAD_WITHOUT_TFPAR = """
import sys
sys.modules["tfpar"] = None
import numpy as np, keras
rng = np.random.default_rng(0)
x = rng.normal(size=(256, 8)).astype("float32")
_ = rng.normal(size=(8, 1))
xb = rng.normal(size=(256, 4)).astype("float32")
multi = keras.models.load_model(OUT_DIR + "/multi_io.keras")
expected = np.load(OUT_DIR + "/multi_io.npz")
predicted = multi.predict({"a": x[:16], "b": xb[:16]}, verbose=0)
single = keras.models.load_model(OUT_DIR + "/epoch4.keras")
print("DIFF", max(max(float(np.abs(predicted[k] - expected[k]).max()) for k in expected),
                  float(np.abs(single.predict(x[:16], verbose=0)
                               - np.load(OUT_DIR + "/final.npy")).max())))
"""


def test_weights_validation_multi_io_checkpoints_custom_steps_and_saving(tmp_path):
    proc = run_python(script(FIT_FEATURES, tmp_path), timeout=280)
    r = tagged_json(proc.stdout, "RESULTS")

    # Sequential schedule: the same numbers as single-process Keras.
    for case in ("sample_weight", "class_weight", "multi_io", "own_train_step"):
        run = r[case]
        assert sorted(run["history"]) == sorted(run["ref_history"]), case
        for name, values in run["history"].items():
            np.testing.assert_allclose(
                values, run["ref_history"][name], rtol=1e-5, err_msg=f"{case} {name}"
            )
        assert run["weights_diff"] < 1e-5, case
    assert sorted(r["multi_io"]["history"]) == [
        "cls_accuracy",
        "cls_loss",
        "loss",
        "reg_loss",
    ]

    early = r["early_stopping"]
    assert early["epochs"] == 2
    assert early["after"] == pytest.approx(early["val_loss"][0], rel=1e-5)

    backup = r["backup"]
    assert backup["begun"] == [2, 3]
    assert backup["iterations"] == 4 * 8  # 2 epochs restored, 2 run
    assert backup["files"] == ["epoch3.keras", "epoch4.keras"]
    assert np.all(np.isfinite(backup["loss"]))

    loaded = r["loaded"]
    assert loaded["diff"] < 1e-6
    assert loaded["devices"] == ["/job:ps/replica:0/task:0/device:CPU:0"]
    assert loaded["loss"][-1] < loaded["loss"][0]

    check = run_python(script(LOAD_WITHOUT_TFPAR, tmp_path), timeout=120)
    assert float(check.stdout.split("DIFF ")[1].split()[0]) < 1e-6
