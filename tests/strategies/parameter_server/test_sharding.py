"""An Embedding sharded over 2 parameter servers: placement, training, saving.

One coordinator subprocess (connecting to a cluster cannot be undone)
computes a single-process reference first, then trains the same model, from
the same initial weights, with its variables sharded over 2 PS; a second
subprocess, where tfpar cannot be imported, loads what it saved.
"""

import numpy as np
import pytest

from tests._subprocess import run_python, tagged_json

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

SCRIPT = """
import json, os, numpy as np, tensorflow as tf, keras, tfpar

out = {out!r}
rng = np.random.default_rng(0)
ids = rng.integers(0, 1000, size=(256, 3)).astype("int32")
# A target the embedding can learn: a hidden value per row, summed.
y = rng.normal(size=1000).astype("float32")[ids].sum(axis=1, keepdims=True)

def build(steps_per_execution=8, learning_rate=0.001):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([
        keras.Input((3,), dtype="int32"), keras.layers.Embedding(1000, 8),
        keras.layers.Flatten(), keras.layers.Dense(4, activation="relu"),
        keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="mse",
                  steps_per_execution=steps_per_execution)
    return model

# Reference: one process. steps_per_execution = the epoch length runs each
# epoch as one function on one worker: sequential, so it must match.
ref = build()
init = ref.get_weights()
ref_history = ref.fit(ids, y, batch_size=32, epochs=2, shuffle=False, verbose=0).history
r = {{"ref_loss": ref_history["loss"], "ref_weights": [w.tolist() for w in ref.get_weights()]}}

def devices(variable):
    return [s.device for s in variable.value.variables]

with tfpar.LocalCluster(num_workers=2, num_ps=2, pin_cores=False) as cluster:
    # Two shards of every variable with at least two rows: the embedding
    # (sparse gradients) and the Dense kernels (dense gradients).
    partitioner = tf.distribute.experimental.partitioners.FixedShardsPartitioner(2)
    strategy = tfpar.ParameterServerStrategy(cluster.cluster_resolver, partitioner,
                                             step_deadline=60)
    with strategy.scope():
        model = build()
    model.set_weights(init)
    embedding = model.layers[0].embeddings
    r["embedding_devices"] = devices(embedding)
    r["shard_rows"] = [int(s.shape[0]) for s in embedding.value.variables]
    r["loss"] = model.fit(ids, y, batch_size=32, epochs=2, shuffle=False,
                          verbose=0).history["loss"]
    r["weights"] = [w.tolist() for w in model.get_weights()]
    r["slot_devices"] = sorted(
        d for v in model.optimizer.variables if "embeddings" in v.path
        for d in devices(v))

    # Asynchronous training on both workers, with Keras's backup callback.
    with strategy.scope():
        async_model = build(steps_per_execution=1, learning_rate=0.01)
    async_model.set_weights(init)
    before = async_model.evaluate(ids, y, batch_size=64, verbose=0)
    history = async_model.fit(
        ids, y, batch_size=32, epochs=6, verbose=0,
        callbacks=[keras.callbacks.BackupAndRestore(os.path.join(out, "backup"))])
    r["async_eval"] = [before, async_model.evaluate(ids, y, batch_size=64, verbose=0)]
    r["workers"] = [rec.steps for rec in strategy.runtime.tracker.records]
    async_model.save(os.path.join(out, "model.keras"))
    tf.train.Checkpoint(model=async_model).write(os.path.join(out, "ckpt"))
    np.save(os.path.join(out, "table.npy"), async_model.layers[0].get_weights()[0])
    np.save(os.path.join(out, "pred.npy"), async_model.predict(ids[:20], verbose=0))
print("RESULTS " + json.dumps(r))
"""

LOAD = """
import sys
sys.modules["tfpar"] = None
import json, os, numpy as np, tensorflow as tf, keras
out = {out!r}
ids = np.random.default_rng(0).integers(0, 1000, size=(256, 3)).astype("int32")
model = keras.models.load_model(os.path.join(out, "model.keras"))
table = np.load(os.path.join(out, "table.npy"))
r = {{"class": type(model.layers[0].embeddings.value).__name__,
      "table_diff": float(np.abs(model.layers[0].get_weights()[0] - table).max()),
      "pred_diff": float(np.abs(model.predict(ids[:20], verbose=0)
                                - np.load(os.path.join(out, "pred.npy"))).max())}}
# The TensorFlow checkpoint restores into an unsharded model too.
fresh = keras.models.clone_model(model)
fresh.build((None, 3))
tf.train.Checkpoint(model=fresh).read(os.path.join(out, "ckpt")).expect_partial()
r["ckpt_diff"] = float(np.abs(fresh.layers[0].get_weights()[0] - table).max())
print("RESULTS " + json.dumps(r))
"""


def results(proc):
    return tagged_json(proc.stdout, "RESULTS")


def test_embedding_sharded_over_two_ps_trains_saves_and_loads(tmp_path):
    r = results(run_python(SCRIPT.format(out=str(tmp_path)), timeout=200))
    ps = [f"/job:ps/replica:0/task:{i}/device:CPU:0" for i in (0, 1)]
    # The table really lives on both parameter servers, and so do Adam's
    # moments of it.
    assert sorted(r["embedding_devices"]) == ps
    assert r["shard_rows"] == [500, 500]
    assert r["slot_devices"] == sorted(ps * 2)
    # Same data, same initial weights, sequential schedule: the numbers of
    # one process, to float rounding.
    np.testing.assert_allclose(r["loss"], r["ref_loss"], rtol=1e-5)
    for got, want in zip(r["weights"], r["ref_weights"], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # Asynchronous training on both workers learns.
    assert all(steps > 0 for steps in r["workers"]), r["workers"]
    # (exact evaluations: before and after the fit)
    assert r["async_eval"][1] < 0.8 * r["async_eval"][0], r["async_eval"]

    loaded = results(run_python(LOAD.format(out=str(tmp_path)), timeout=120))
    assert loaded["class"] == "ResourceVariable"  # an ordinary, whole table
    assert loaded["table_diff"] == 0.0
    assert loaded["pred_diff"] < 1e-6
    assert loaded["ckpt_diff"] == 0.0
