"""Wrap, never patch: tfpar leaves TensorFlow and Keras as it found them.

A fresh interpreter snapshots every function and class attribute of the
loaded `tensorflow` and `keras` modules, and the loggers TensorFlow writes
to, after a stock `MirroredStrategy` fit (which fills TensorFlow's own lazy
caches). It snapshots again after `import tfpar`, and again after a `fit`
under each tfpar strategy with the strategy deleted: a `MirroredStrategy` and
a `PipelineStrategy` on two logical CPUs, and a `ParameterServerStrategy`
with a step deadline on a `LocalCluster`. Nothing may have changed.

A `MultiWorkerMirroredStrategy` must exist before TensorFlow runs an op, so
it has its own interpreter (one worker, from `TF_CONFIG`): snapshots before
and after its construction, then after a `fit` without a strategy (the
lazy caches) and after a `fit` under it with the strategy deleted.
"""

import json

import pytest

from tests._subprocess import free_ports, run_python, tagged_json

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

HELPERS = r"""
import gc, inspect, json, logging, sys, types
import numpy as np
import tensorflow as tf
import keras

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

_KINDS = (types.FunctionType, types.BuiltinFunctionType, type, staticmethod,
          classmethod, property, types.MethodType)

def snapshot():
    seen = {}
    for name, module in list(sys.modules.items()):
        if module is None or not name.split(".")[0] in ("tensorflow", "keras"):
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, _KINDS):
                seen[f"{name}.{attr}"] = id(value)
            if isinstance(value, type) and value.__module__ == name:
                for cattr, cvalue in list(vars(value).items()):
                    if isinstance(cvalue, _KINDS):
                        seen[f"{name}.{attr}.{cattr}"] = id(cvalue)
    for logger in (tf.get_logger(), logging.getLogger("absl"), logging.getLogger()):
        for kind in ("filters", "handlers"):
            seen[f"logger:{logger.name}:{kind}"] = [
                f"{type(x).__qualname__}@{id(x)}" for x in getattr(logger, kind)]
    return seen

def changed(before, after):
    return sorted(f"{k}: {before[k]} -> {after.get(k)}" if k.startswith("logger:")
                  else k for k in before if before[k] != after.get(k))

x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
y = x.sum(axis=1, keepdims=True)

def train(strategy, epochs=1):
    # Builds, fits, evaluates and predicts under `strategy`, keeping nothing.
    with strategy.scope():
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
        m.compile(optimizer="adam", loss="mse")
    m.fit(x, y, batch_size=16, epochs=epochs, verbose=0)
    m.evaluate(x, y, verbose=0)
    m.predict(x, verbose=0)

"""

SCRIPT = (
    HELPERS
    + r"""
train(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
# TensorFlow logs through absl when a process connects to a cluster, and
# absl's first log call configures the root logger: TensorFlow's doing, so
# it happens here, before the first snapshot.
from absl import logging as absl_logging
absl_logging.info("warm-up")
gc.collect()

report = {}
base = snapshot()
import tfpar
report["import"] = changed(base, snapshot())

for name in ("MirroredStrategy", "PipelineStrategy"):
    train(getattr(tfpar, name)(["/cpu:0", "/cpu:1"]))
    gc.collect()
    report[name] = changed(base, snapshot())

with tfpar.LocalCluster(num_workers=2, num_ps=1, pin_cores=False) as cluster:
    train(tfpar.ParameterServerStrategy(cluster.cluster_resolver, step_deadline=60),
          epochs=2)
    gc.collect()
report["ParameterServerStrategy"] = changed(base, snapshot())
report["tracked"] = len(base)
print("REPORT " + json.dumps(report))
"""
)


def test_tensorflow_and_keras_are_unchanged_by_import_and_by_every_strategy():
    proc = run_python(SCRIPT, timeout=280)
    report = tagged_json(proc.stdout, "REPORT")
    assert report.pop("tracked") > 10_000  # the snapshot sees TensorFlow and Keras
    assert report == {
        "import": [],
        "MirroredStrategy": [],
        "PipelineStrategy": [],
        "ParameterServerStrategy": [],
    }


MULTI_WORKER_SCRIPT = (
    HELPERS
    + r"""
import tfpar
report = {}
base = snapshot()
strategy = tfpar.MultiWorkerMirroredStrategy()
report["construction"] = changed(base, snapshot())

train(tf.distribute.get_strategy())
from absl import logging as absl_logging
absl_logging.info("warm-up")
gc.collect()
base = snapshot()
train(strategy, epochs=2)
del strategy
gc.collect()
report["MultiWorkerMirroredStrategy"] = changed(base, snapshot())
report["tracked"] = len(base)
print("REPORT " + json.dumps(report))
"""
)


def test_tensorflow_and_keras_are_unchanged_by_the_multi_worker_strategy():
    (port,) = free_ports(1)
    tf_config = {
        "cluster": {"worker": [f"127.0.0.1:{port}"]},
        "task": {"type": "worker", "index": 0},
    }
    proc = run_python(
        MULTI_WORKER_SCRIPT, timeout=280, env={"TF_CONFIG": json.dumps(tf_config)}
    )
    report = tagged_json(proc.stdout, "REPORT")
    assert report.pop("tracked") > 10_000
    assert report == {"construction": [], "MultiWorkerMirroredStrategy": []}
