"""Stragglers: the replica the others wait for, named from the wait counters.

The end-to-end tests make a real straggler: two worker processes, each
pinned to its own core, and a busy process sharing worker 1's core, so
worker 1 computes at about half speed. Once as the two workers of a
`tfpar.MultiWorkerMirroredStrategy` (each sees the other's interval through
the all-reduce), once as the replicas of a single-client
`tfpar.MirroredStrategy` over `tfpar.LocalCluster` workers (one process sees
both).
"""

import json
import os
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests._subprocess import kill_all, run_python, run_workers, tagged_json
from tfpar.callbacks.stragglers import StragglerDetector
from tfpar.stats import CommunicationStats, DeviceCommunication

A = "/job:worker/replica:0/task:0/device:CPU:0"
B = "/job:worker/replica:0/task:1/device:CPU:0"


def _sample(slowest_a: int, slowest_b: int, wait_a: float, wait_b: float):
    return CommunicationStats(
        kind="allreduce",
        steps=slowest_a + slowest_b,
        devices=(
            DeviceCommunication(A, wait_seconds=wait_a, slowest_steps=slowest_a),
            DeviceCommunication(B, wait_seconds=wait_b, slowest_steps=slowest_b),
        ),
        counters=("wait_seconds", "slowest_steps"),
    )


def test_a_replica_slowest_sample_after_sample_is_named_once():
    detector = StragglerDetector()
    # B slowest at 9 of 10 synchronizations, A waited 40 ms per step of 100.
    persistent = _sample(1, 9, wait_a=0.4, wait_b=0.001)
    assert detector.update(persistent, step_ms=100.0) is None  # one sample
    found = detector.update(persistent, step_ms=100.0)
    assert found is not None and found.device == B
    assert found.slowest_share == pytest.approx(0.9)
    assert found.others_wait_ms == pytest.approx(40.0)
    assert "worker:1/CPU:0 is a straggler" in found.message()
    assert detector.update(persistent, step_ms=100.0) is None  # named once
    detector.reset()
    detector.update(persistent, step_ms=100.0)
    assert detector.update(persistent, step_ms=100.0) is not None  # a new fit


def test_a_pipeline_replica_group_is_waited_for_by_the_other_groups_only():
    # Two stages x two replicas, groups 0 and 1. Group 1's stage 1 device is
    # slowest at all 10 steps; group 0's two devices waited 0.6 s (60 ms a
    # step), group 1's stage 0 device, late with it, waited 0.
    devices = [
        DeviceCommunication(
            f"/device:CPU:{i}", wait_seconds=w, slowest_steps=n, replica_group=g
        )
        for i, (w, n, g) in enumerate(
            [(0.6, 0, 0), (0.0, 0, 1), (0.6, 0, 0), (0.0, 10, 1)]
        )
    ]
    delta = CommunicationStats(kind="pipeline", steps=10, devices=tuple(devices))
    detector = StragglerDetector()
    detector.update(delta, step_ms=100.0)
    found = detector.update(delta, step_ms=100.0)
    assert found is not None and found.device == "/device:CPU:3"
    # The mean over the other group's two devices, not over all three others
    # (40 ms).
    assert found.others_wait_ms == pytest.approx(60.0)


@pytest.mark.parametrize(
    "samples",
    [
        # Identical replicas taking turns: nobody is persistently slowest.
        [(5, 5, 0.02, 0.02), (6, 4, 0.03, 0.02)],
        # Always slowest, but the others barely wait (1 ms of 100).
        [(0, 10, 0.01, 0.0), (0, 10, 0.01, 0.0)],
        # Slowest in one sample, then not: the run is broken.
        [(0, 10, 0.4, 0.0), (5, 5, 0.02, 0.02), (0, 10, 0.4, 0.0)],
        # Too few synchronizations to judge.
        [(0, 3, 0.1, 0.0), (0, 3, 0.1, 0.0)],
    ],
    ids=["turns", "no_margin", "broken_run", "few_steps"],
)
def test_no_straggler_without_a_persistent_margin(samples):
    detector = StragglerDetector()
    assert all(detector.update(_sample(*s), step_ms=100.0) is None for s in samples)


@pytest.mark.parametrize(
    "thresholds",
    [
        {"margin": 0.5},  # the others wait 40% of the step, not 50%
        {"share": 0.95},  # slowest at 90% of the synchronizations, not 95%
        {"samples": 3},  # two samples in a row, not three
        {"min_steps": 11},  # 10 synchronizations per sample: not judged
    ],
    ids=["margin", "share", "samples", "min_steps"],
)
def test_stricter_thresholds_do_not_name_what_the_defaults_name(thresholds):
    # B slowest at 9 of 10 synchronizations, A waited 40 ms per step of 100.
    persistent = [_sample(1, 9, wait_a=0.4, wait_b=0.001)] * 2
    default = StragglerDetector()
    assert [default.update(s, step_ms=100.0) for s in persistent][-1] is not None
    strict = StragglerDetector(**thresholds)
    assert all(strict.update(s, step_ms=100.0) is None for s in persistent)


FIT = """
import json, logging, os
task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
os.sched_setaffinity(0, {task})  # before TensorFlow starts its threads
import tfpar
strategy = tfpar.MultiWorkerMirroredStrategy()
import keras, numpy as np

warnings = []
handler = logging.Handler()
handler.emit = lambda record: warnings.append(record.getMessage())
logging.getLogger("tfpar").addHandler(handler)
log_dir = os.path.join(__ROOT__, f"worker{task}")
x = np.random.default_rng(0).normal(size=(1024 * 8, 256)).astype("float32")
with strategy.scope():
    model = keras.Sequential([keras.Input((256,))]
                             + [keras.layers.Dense(512, activation="relu") for _ in range(3)]
                             + [keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
model.fit(x, x[:, :1], batch_size=1024, epochs=6, verbose=0, callbacks=[
    tfpar.callbacks.CommunicationTime(log_dir, every_steps=8, every_seconds=None)])
print("RESULT " + json.dumps({"task": task, "warnings": warnings}), flush=True)
"""


def _events(run_dir):
    events = EventAccumulator(str(run_dir / "train"), size_guidance={"tensors": 0})
    events.Reload()
    return {tag: events.Tensors(tag) for tag in events.Tags()["tensors"]}


@pytest.fixture
def core_1_loaded():
    """A busy process on core 1, where worker 1 is pinned, for the test's length."""
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two cores to pin the workers to")
    busy = subprocess.Popen(
        [sys.executable, "-c", "import os\nos.sched_setaffinity(0, {1})\nwhile 1: pass"]
    )
    try:
        yield
    finally:
        kill_all([busy])


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_a_worker_sharing_its_core_is_named_and_the_other_waits_for_it(
    tmp_path, core_1_loaded
):
    code = FIT.replace("__ROOT__", json.dumps(str(tmp_path)))
    results = [tagged_json(p.stdout, "RESULT") for p in run_workers(code, 2)]
    slow = "worker:1/CPU:0"
    for result in results:
        # Both workers know both intervals, so both name the same straggler.
        named = [w for w in result["warnings"] if "is a straggler" in w]
        assert len(named) == 1, result["warnings"]
        assert named[0].startswith(f"tfpar CommunicationTime: {slow} is a straggler")
    events = _events(tmp_path / "worker0")
    text = events["comm/straggler"][0].tensor_proto.string_val[0].decode()
    assert text.startswith(f"{slow} is a straggler")

    def mean(tag):
        values = [e.tensor_proto.float_val[0] for e in events[tag]]
        return sum(values) / len(values)

    # The fast worker waits for the slow one, not the other way round.
    fast_wait = mean("comm/device/worker:0/CPU:0/wait_ms")
    slow_wait = mean("comm/device/worker:1/CPU:0/wait_ms")
    assert fast_wait > 5 * slow_wait, (fast_wait, slow_wait)
    assert mean(f"comm/device/{slow}/slowest_fraction") > 0.9


SINGLE_CLIENT = """
import json, logging, tfpar, keras, numpy as np

warnings = []
handler = logging.Handler()
handler.emit = lambda record: warnings.append(record.getMessage())
logging.getLogger("tfpar").addHandler(handler)
x = np.random.default_rng(0).normal(size=(1024 * 8, 256)).astype("float32")
with tfpar.LocalCluster(num_workers=2, pin_cores=True) as cluster:
    strategy = tfpar.MirroredStrategy(cluster.connect())
    with strategy.scope():
        model = keras.Sequential([keras.Input((256,))]
                                 + [keras.layers.Dense(512, activation="relu")
                                    for _ in range(3)]
                                 + [keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
    model.fit(x, x[:, :1], batch_size=1024, epochs=6, verbose=0, callbacks=[
        tfpar.callbacks.CommunicationTime(__LOG_DIR__, every_steps=8,
                                          every_seconds=None)])
print("RESULT " + json.dumps(warnings), flush=True)
"""


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_a_cluster_worker_of_a_single_client_strategy_is_named(tmp_path, core_1_loaded):
    code = SINGLE_CLIENT.replace("__LOG_DIR__", json.dumps(str(tmp_path)))
    warnings = tagged_json(run_python(code, timeout=200).stdout, "RESULT")
    named = [w for w in warnings if "is a straggler" in w]
    assert len(named) == 1, warnings
    assert named[0].startswith("tfpar CommunicationTime: worker:1/CPU:0 is a straggler")
