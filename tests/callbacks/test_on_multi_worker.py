"""The callbacks on every worker of a tfpar.MultiWorkerMirroredStrategy job.

Two worker processes on loopback each run `fit` with `DeviceUtilization` and
`CommunicationTime`, writing into their own subfolder of one log folder (the
way TensorBoard shows them side by side, as runs). The test reads the event
files back in this process.
"""

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests._subprocess import run_workers, tagged_json

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

FIT = """
import json, logging, os, tfpar
strategy = tfpar.MultiWorkerMirroredStrategy()
import keras, numpy as np

task = strategy.cluster_resolver.task_id
log_dir = os.path.join(__ROOT__, f"worker{task}")
warnings = []
handler = logging.Handler()
handler.emit = lambda record: warnings.append(record.getMessage())
logging.getLogger("tfpar").addHandler(handler)

x = np.random.default_rng(0).normal(size=(1024, 32)).astype("float32")
with strategy.scope():
    model = keras.Sequential([keras.Input((32,)), keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
callbacks = [
    tfpar.callbacks.DeviceUtilization(log_dir, every_steps=4, every_seconds=None),
    tfpar.callbacks.CommunicationTime(log_dir, every_steps=4),
]
model.fit(x, x[:, :1], batch_size=64, epochs=2, verbose=0, callbacks=callbacks)
model.fit(x, x[:, :1], batch_size=64, epochs=1, verbose=0, callbacks=callbacks)
print("RESULT " + json.dumps({
    "task": task,
    "warnings": warnings,
    "names_lost_workers": type(model.train_function).__name__ == "_NamingLostTasks",
    "parameters": int(sum(w.size for w in model.get_weights())),
}), flush=True)
"""


def _scalars(run_dir) -> dict[str, list[float]]:
    events = EventAccumulator(str(run_dir / "train"), size_guidance={"tensors": 0})
    events.Reload()
    return {
        tag: [float(e.tensor_proto.float_val[0]) for e in events.Tensors(tag)]
        for tag in events.Tags()["tensors"]
        if tag != "custom_scalars__config__"
    }


def test_each_worker_logs_its_own_counters_under_its_task_name(tmp_path):
    code = FIT.replace("__ROOT__", json.dumps(str(tmp_path)))
    results = [tagged_json(p.stdout, "RESULT") for p in run_workers(code, 2)]
    for result in results:
        task = result["task"]
        scalars = _scalars(tmp_path / f"worker{task}")
        # Communication under the worker's own device name; of the other
        # worker's replica, only what the exchange tells: its wait.
        assert f"comm/device/worker:{task}/CPU:0/comm_ms" in scalars
        assert {tag for tag in scalars if f"worker:{1 - task}" in tag} == {
            f"comm/device/worker:{1 - task}/CPU:0/wait_ms",
            f"comm/device/worker:{1 - task}/CPU:0/slowest_fraction",
        }
        # Every step all-reduces every float32 gradient once: the counted
        # bytes are the parameters' size (an analytic count).
        assert set(scalars["comm/bytes_per_step"]) == {4 * result["parameters"]}
        assert "host/rss_mib" in scalars
        # Utilization of the worker's own replica, from the strategy's
        # in-graph busy time (no profiler window under this strategy), after
        # each fit's first step; none for the other worker's replica.
        own = scalars[f"device/worker:{task}/CPU:0/utilization"]
        assert len(own) >= 3 and all(0 < v <= 100 for v in own), own
        assert [t for t in scalars if t.endswith("/utilization")] == [
            f"device/worker:{task}/CPU:0/utilization"
        ]
        assert not [w for w in result["warnings"] if "not measured" in w]
        # The callbacks leave the strategy's step function in place.
        assert result["names_lost_workers"]
