"""Pipeline x data parallel: `PipelineStrategy` with several replicas per stage.

The test process has two logical CPUs (`tests/conftest.py`): one stage with
two replicas runs here; two stages with two replicas each run in a child
process with four, and on four `LocalCluster` workers.
"""

import collections
import contextlib
import re
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests._models import mlp
from tests._subprocess import run_python, tagged_json
from tests.strategies.pipeline._fitting import (
    RTOL,
    assert_same_inference,
    assert_same_weights,
    data,
    train,
)
from tfpar import PipelineStrategy
from tfpar.callbacks.communication_time import step_samples

CPU0, CPU1 = "/device:CPU:0", "/device:CPU:1"


def test_one_stage_two_replicas_matches_single_device() -> None:
    # M=3 on R=2: replica 0 runs micro-batches 0 and 2, replica 1 runs 1.
    reference = train(None, mlp, batch_size=10, epochs=2)
    strategy = PipelineStrategy(
        [[CPU0, CPU1]], num_microbatches=3, schedule="gpipe", partition="params"
    )
    model = train(strategy, mlp, batch_size=10, epochs=2)
    assert_same_weights(reference, model)
    np.testing.assert_allclose(
        model.history_.history["loss"], reference.history_.history["loss"], rtol=RTOL
    )
    assert_same_inference(model, reference, batch_size=10)
    # The variables stay on replica 0, which the optimizer updates.
    assert all(w.value.device.endswith("CPU:0") for w in model.weights)
    stats = strategy.communication_stats()
    assert [d.device for d in stats.devices] == [CPU0, CPU1]
    assert "reduce_bytes_sent" in stats.counters
    # 8 steps; 6*8+8 + 2*(8*8+8) + 8*2+2 = 218 float32 weights: replica 0
    # sends its copy of them, replica 1 its summed gradients; no stage
    # boundary, so no activations.
    params = 4 * sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert params == 4 * 218
    assert [d.reduce_bytes_sent for d in stats.devices] == [8 * params] * 2
    assert [d.bytes_sent for d in stats.devices] == [0, 0]
    assert stats.calls == 8 * 2  # one copy and one gradient transfer per step
    assert all(d.idle_seconds >= 0 and d.reduce_seconds >= 0 for d in stats.devices)
    assert stats.since(stats).devices[1].reduce_bytes_sent == 0
    # CommunicationTime logs the reduction under its own names.
    tags = {sample.tag for sample in step_samples(1.0, 8, stats)}
    assert {
        f"comm/device/CPU:{r}/{name}"
        for r in range(2)
        for name in ("reduce_ms", "reduce_bytes_per_step", "bytes_sent_per_step")
    } <= tags


def two_replicas(**options: Any) -> PipelineStrategy:
    """One stage with two replicas, M=2, GPipe, and `options`."""
    return PipelineStrategy(
        [[CPU0, CPU1]],
        num_microbatches=2,
        schedule="gpipe",
        partition="params",
        **options,
    )


@pytest.mark.parametrize(
    ("compression", "bucket_bytes"), [("bf16", None), ("fp16", 64), (None, 1 << 20)]
)
def test_replica_gradients_travel_compressed_or_packed(
    compression: str | None, bucket_bytes: int | None
) -> None:
    reference = train(None, mlp, batch_size=10, epochs=2)
    strategy = two_replicas(compression=compression, bucket_bytes=bucket_bytes)
    model = train(strategy, mlp, batch_size=10, epochs=2)
    # 8 steps of the 218 weights (see above): replica 0's copies stay float32,
    # replica 1's gradient sums travel in 2 bytes each when compressed.
    sent = [d.reduce_bytes_sent for d in strategy.communication_stats().devices]
    assert sent == [8 * 4 * 218, 8 * (2 if compression else 4) * 218]
    if compression is None:
        assert_same_weights(reference, model)  # packing is exact
        return
    # Rounded to 8 (bf16) or 11 (fp16) significant bits: close, not equal.
    differences = [
        np.abs(a.numpy() - b.numpy()).max()
        for a, b in zip(model.weights, reference.weights, strict=True)
    ]
    assert 1e-6 < max(differences) < 2e-3, differences


@pytest.mark.parametrize(
    ("compression", "bucket_bytes", "dtype"),
    [
        (None, None, "float32"),
        (None, 1 << 20, "float32"),
        ("bf16", 1 << 20, "bfloat16"),
    ],
)
def test_replica_gradients_cross_as_one_tensor_per_bucket(
    compression: str | None, bucket_bytes: int | None, dtype: str
) -> None:
    # Read from the step's graph, not from tfpar's counters: the tensors
    # made on replica 1 that replica 0 reads, besides its loss (a scalar)
    # and its predictions (5 rows of 2 per micro-batch of 10 split in 2).
    strategy = two_replicas(compression=compression, bucket_bytes=bucket_bytes)
    model = train(strategy, mlp, batch_size=10, epochs=1)  # builds the optimizer

    @tf.function
    def step(x: tf.Tensor, y: tf.Tensor) -> None:
        strategy.run(model.train_step, args=((x, y),))

    graph = step.get_concrete_function(
        tf.TensorSpec((10, 6)), tf.TensorSpec((10, 2))
    ).graph
    crossing = [
        t
        for op in graph.get_operations()
        if op.device.endswith(CPU0)
        for t in op.inputs
        if t.op.device.endswith(CPU1)
        and t.dtype in (tf.float32, tf.bfloat16)
        and t.shape.rank
        and t.shape.as_list() != [5, 2]
    ]
    sizes = [w.shape for w in model.trainable_weights]
    if bucket_bytes is None:  # one tensor per weight's gradient
        expected = sorted(list(shape) for shape in sizes)
    else:  # the 218 gradients (6*8+8 + 2*(8*8+8) + 8*2+2) fit one bucket
        expected = [[sum(int(np.prod(shape)) for shape in sizes)]]
        assert expected == [[218]]
    assert sorted(t.shape.as_list() for t in crossing) == expected
    assert {t.dtype.name for t in crossing} == {dtype}


def embedded() -> keras.Model:
    keras.utils.set_random_seed(7)
    inputs = keras.Input((3,), dtype="int32")
    h = keras.layers.Embedding(10, 4, name="embed")(inputs)
    h = keras.layers.Flatten(name="flat")(h)
    return keras.Model(inputs, keras.layers.Dense(2, name="out")(h))


@pytest.mark.parametrize("compression", [None, "bf16"])
def test_sparse_gradients_travel_as_slices_beside_packed_ones(
    compression: str | None,
) -> None:
    # The Embedding's gradient is `IndexedSlices`: its own bucket, never cast.
    rng = np.random.default_rng(0)
    x = rng.integers(0, 10, size=(40, 3)).astype("int32")
    y = rng.normal(size=(40, 2)).astype("float32")
    strategy = PipelineStrategy(
        [[CPU0, CPU1]],
        num_microbatches=2,
        partition="params",
        compression=compression,
        bucket_bytes=1 << 20,
    )
    models = []
    for scope in (strategy.scope(), contextlib.nullcontext()):
        with scope:
            model = embedded()
            model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        model.fit(x, y, batch_size=10, epochs=2, shuffle=False, verbose=0)
        models.append(model)
    if compression is None:
        assert_same_weights(models[1], models[0])
    for a, b in zip(models[0].weights, models[1].weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=2e-3, err_msg=a.path)


def regularized() -> keras.Model:
    """`mlp` with an L2 penalty on the first stage's kernel."""
    return mlp("d0", kernel_regularizer=keras.regularizers.L2(0.1))


def dropout_capture() -> keras.Model:
    """Identity Dense layers around a Dropout: the output is the mask times 2."""
    keras.utils.set_random_seed(7)
    return keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(
                16, kernel_initializer="identity", use_bias=False, name="d0"
            ),
            keras.layers.Dropout(0.5, name="drop"),
            keras.layers.Dense(
                16, kernel_initializer="identity", use_bias=False, name="out"
            ),
        ]
    )


class Capture(keras.metrics.Metric):
    """Keeps the last batch's predictions (the pipeline's training outputs)."""

    def __init__(self) -> None:
        super().__init__(name="capture")
        self.value = self.add_variable((4, 16), initializer="zeros", name="value")

    def update_state(self, y_true, y_pred, sample_weight=None):  # type: ignore[no-untyped-def]
        self.value.assign(y_pred)

    def result(self):  # type: ignore[no-untyped-def]
        return 0.0


@pytest.mark.parametrize("recompute", [False, True])
def test_each_replica_draws_its_own_dropout_masks(recompute: bool) -> None:
    strategy = PipelineStrategy(
        [[CPU0, CPU1]], num_microbatches=2, partition="params", recompute=recompute
    )
    with strategy.scope():
        model = dropout_capture()
        capture = Capture()
        model.compile(
            optimizer=keras.optimizers.SGD(0.0), loss="mse", metrics=[capture]
        )
    x = np.ones((4, 16), "float32")
    masks = []
    for _ in range(2):
        model.fit(x, x, batch_size=4, epochs=1, shuffle=False, verbose=0)
        masks.append(capture.value.numpy())
    for mask in masks:
        assert set(np.unique(mask)) <= {0.0, 2.0}
        # Replica 0 ran rows 0-1, replica 1 rows 2-3: not the same mask.
        assert not np.array_equal(mask[:2], mask[2:])
    # Nor the previous step's masks: each replica's stream moves on.
    assert not np.array_equal(masks[0][2:], masks[1][2:])
    assert not np.array_equal(masks[0][:2], masks[1][:2])


@pytest.mark.parametrize(
    ("devices", "error", "match"),
    [
        ([[CPU0, CPU1], [CPU0]], ValueError, r"same number of replicas.*\[2, 1\]"),
        ([[CPU0], []], ValueError, "same number of replicas"),
        ([[CPU0, CPU1], [CPU1, CPU0]], ValueError, "more than once"),
        ([CPU0, [CPU1]], TypeError, "not a mix"),
        ([[CPU0, "/device:CPU:7"]], ValueError, "do not exist"),
    ],
)
def test_bad_replica_devices_are_refused(
    devices: list, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        PipelineStrategy(devices, num_microbatches=2)


def test_fewer_microbatches_than_replicas_is_refused() -> None:
    with pytest.raises(ValueError, match=r"at least the number of replicas.*=1"):
        PipelineStrategy([[CPU0, CPU1]], num_microbatches=1)


def test_batch_normalization_with_replicas_is_refused() -> None:
    strategy = PipelineStrategy([[CPU0, CPU1]], num_microbatches=2, partition="params")
    with strategy.scope():
        model = keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(8, name="d0"),
                keras.layers.BatchNormalization(name="bn"),
                keras.layers.Dense(2, name="out"),
            ]
        )
        model.compile(optimizer="sgd", loss="mse")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"\['bn'\]"):
        strategy.partition_model(model)


# Two stages of two replicas, on four logical CPUs of a child process.
_FOUR_DEVICES = """
import numpy as np, keras, tfpar
tfpar.simulate_devices(4)
from tests._models import mlp
from tests.strategies.pipeline._fitting import (
    assert_same_inference, assert_same_training, assert_same_weights, data, train,
    RTOL, ATOL)
from tfpar import PipelineStrategy

D = [f"/device:CPU:{i}" for i in range(4)]
x, y = data()
reference = train(None, mlp, batch_size=10, epochs=2)
cases = [("gpipe", 4, False, ["d2"]), ("1f1b", 3, False, ["d2"]),
         ("1f1b", 4, True, ["d2"]), ("interleaved", 4, False, ["d1", "d2", "out"])]
for schedule, m, recompute, partition in cases:
    strategy = PipelineStrategy([[D[0], D[1]], [D[2], D[3]]], num_microbatches=m,
                                schedule=schedule, partition=partition,
                                recompute=recompute)
    model = train(strategy, mlp, batch_size=10, epochs=2)
    assert_same_weights(reference, model)
    np.testing.assert_allclose(model.history_.history["loss"],
                               reference.history_.history["loss"], rtol=RTOL)
    np.testing.assert_allclose(model.evaluate(x, y, batch_size=10, verbose=0),
                               reference.evaluate(x, y, batch_size=10, verbose=0),
                               rtol=RTOL)
    np.testing.assert_allclose(model.predict(x, batch_size=10, verbose=0),
                               reference.predict(x, batch_size=10, verbose=0),
                               rtol=RTOL, atol=ATOL)
    stats = strategy.communication_stats()
    assert [d.device for d in stats.devices] == D, stats.devices
    assert stats.steps == 8
    # Stage 0 holds d0, d1 (6*8+8 + 8*8+8 = 128 weights), stage 1 d2, out
    # (8*8+8 + 8*2+2 = 90), float32, 8 steps: replica 0 sends the copy,
    # replica 1 the summed gradients.
    reduce = [d.reduce_bytes_sent for d in stats.devices]
    assert reduce == [8 * 4 * 128] * 2 + [8 * 4 * 90] * 2, reduce
    # Activations (and input gradients back) of width 8 cross each of the
    # K V - 1 boundaries once per example; micro-batches of 10 split as
    # [3, 3, 2, 2] or [4, 3, 3]: replica 0 runs 0, 2 (5 or 7 examples).
    # Each device sends 2 V - 1 of them per example: stage 0 no gradient
    # from chunk 0, stage 1 no activations from the last chunk.
    v = 2 if schedule == "interleaved" else 1
    rows = [5, 5] if m == 4 else [7, 3]
    sent = [8 * 8 * 4 * n * (2 * v - 1) for n in rows] * 2
    assert [d.bytes_sent for d in stats.devices] == sent, stats.devices
    assert stats.calls == 8 * (2 * m * (2 * v - 1) + 2 * 2)
    assert stats.bytes_moved == sum(sent) + sum(reduce)
    assert all(d.idle_seconds >= 0 and d.reduce_seconds >= 0 for d in stats.devices)
    assert any(d.reduce_seconds > 0 for d in stats.devices)
    assert len(strategy.peak_in_flight()) == 2
    # Replica 0 of each stage runs group 0's ceil(M / R) micro-batches: its
    # planned count is what it measurably held (GPipe: 2 of M=4, not 4).
    memory = strategy.activation_memory(model, batch_size=10)
    planned = [record.planned_microbatches for record in memory]
    assert planned == [record.held_microbatches for record in memory], memory
    if schedule == "gpipe":
        assert planned == [2, 2], planned
    # Variables on replica 0 of their stage.
    assert model.get_layer("d0").kernel.value.device.endswith("CPU:0")
    assert model.get_layer("out").kernel.value.device.endswith("CPU:2")

# The last stage's loss holds the first stage's penalty: its gradient on
# replica 1 reaches stage 0's totals too.
from tests.strategies.pipeline.test_replicas import regularized
reference = train(None, regularized, batch_size=10, epochs=2)
for recompute in (False, True):
    strategy = PipelineStrategy([[D[0], D[1]], [D[2], D[3]]], num_microbatches=3,
                                partition=["d2"], recompute=recompute)
    assert_same_weights(reference, train(strategy, regularized, batch_size=10, epochs=2))

# An activity regularizer on the first stage: every replica's micro-batches
# add their penalty, differentiated on the stage that computed it.
from tests.strategies.pipeline.test_replicas import activity_penalized
reference = train(None, activity_penalized, batch_size=10, epochs=2)
for recompute in (False, True):
    strategy = PipelineStrategy([[D[0], D[1]], [D[2], D[3]]], num_microbatches=3,
                                partition=["d2"], recompute=recompute)
    model = train(strategy, activity_penalized, batch_size=10, epochs=2)
    assert_same_training(reference, model)
    assert_same_inference(model, reference, batch_size=10)
print("OK")
"""


def test_two_stages_two_replicas_match_single_device_and_count() -> None:
    proc = run_python(_FOUR_DEVICES, timeout=300)
    assert "OK" in proc.stdout


# Stage 1's replica 1 (CPU:3) sleeps 30 ms in every forward; nothing else
# is slow. Its replica group ends last at both stages, and the others wait.
_ONE_SLOW_DEVICE = """
import json, logging, time
import keras, numpy as np, tensorflow as tf, tfpar
tfpar.simulate_devices(4)
from tfpar import PipelineStrategy

warnings = []
handler = logging.Handler()
handler.emit = lambda record: warnings.append(record.getMessage())
logging.getLogger("tfpar").addHandler(handler)


class SleepsOn(keras.layers.Layer):
    def __init__(self, device, **kwargs):
        super().__init__(**kwargs)
        self.device = device

    def call(self, x):
        if not tf.identity(x).device.endswith(self.device):
            return x
        slept = tf.py_function(lambda: time.sleep(0.03) or 0.0, [], tf.float32)
        with tf.control_dependencies([slept]):
            return tf.identity(x)


D = [f"/device:CPU:{i}" for i in range(4)]
strategy = PipelineStrategy([[D[0], D[1]], [D[2], D[3]]], num_microbatches=4,
                            partition=["d2"])
with strategy.scope():
    model = keras.Sequential([keras.Input((6,)),
                              keras.layers.Dense(8, activation="relu", name="d0"),
                              keras.layers.Dense(8, activation="relu", name="d1"),
                              keras.layers.Dense(8, activation="relu", name="d2"),
                              SleepsOn("CPU:3", name="slow"),
                              keras.layers.Dense(1, name="out")])
    model.compile(optimizer="sgd", loss="mse")
x = np.random.default_rng(0).normal(size=(80, 6)).astype("float32")
model.fit(x, x[:, :1], batch_size=10, epochs=3, verbose=0, callbacks=[
    tfpar.callbacks.CommunicationTime(__LOG_DIR__, every_steps=6,
                                      every_seconds=None)])
stats = strategy.communication_stats()
print("RESULT " + json.dumps({
    "warnings": warnings, "steps": stats.steps, "counters": stats.counters,
    "wait": [d.wait_seconds for d in stats.devices],
    "slowest": [d.slowest_steps for d in stats.devices]}), flush=True)
"""


def test_the_device_a_slow_replica_group_waits_for_is_named(tmp_path) -> None:
    code = _ONE_SLOW_DEVICE.replace("__LOG_DIR__", repr(str(tmp_path)))
    result = tagged_json(run_python(code, timeout=240).stdout, "RESULT")
    assert {"wait_seconds", "slowest_steps"} <= set(result["counters"])
    # Devices stage-major: CPU:0, CPU:1 (stage 0), CPU:2, CPU:3 (stage 1).
    # Only CPU:3 sleeps, though its group's stage 0 (CPU:1) ends late too.
    assert result["slowest"] == [0, 0, 0, result["steps"]], result
    wait = result["wait"]
    # Each step CPU:3 sleeps 2 x 30 ms (its group runs micro-batches 1, 3):
    # both group 0 devices wait most of that, group 1's do not wait.
    assert min(wait[0], wait[2]) > 0.03 * result["steps"], wait
    assert max(wait[1], wait[3]) < 0.2 * min(wait[0], wait[2]), wait
    named = [w for w in result["warnings"] if "is a straggler" in w]
    assert len(named) == 1, result["warnings"]
    assert named[0].startswith("tfpar CommunicationTime: CPU:3 is a straggler")
    # The other group waited for the 2 x 30 ms of sleep: its devices' wait,
    # not diluted by the late group's own devices (which waited for nobody).
    waited = re.search(r"waited ([0-9.]+) ms per step", named[0])
    assert waited and float(waited.group(1)) > 0.8 * 60, named[0]


def test_replicas_on_cluster_workers_match() -> None:
    # Stage s's replica r on worker 2 s + r of a LocalCluster, in a child
    # process: connecting changes this process's devices for good.
    proc = run_python(
        """
        import numpy as np, tfpar
        from tests._models import mlp
        from tests.strategies.pipeline._fitting import (
            assert_same_weights, train)
        from tfpar import PipelineStrategy

        reference = train(None, mlp, batch_size=8, epochs=1)
        with tfpar.LocalCluster(num_workers=4, pin_cores=False) as cluster:
            d = cluster.connect()
            strategy = PipelineStrategy([[d[0], d[1]], [d[2], d[3]]],
                                        num_microbatches=2, partition=["d2"])
            model = train(strategy, mlp, batch_size=8, epochs=1)
            assert_same_weights(reference, model)
            assert "task:0" in model.get_layer("d0").kernel.value.device
            assert "task:2" in model.get_layer("out").kernel.value.device
            stats = strategy.communication_stats()
            reduce = [x.reduce_bytes_sent for x in stats.devices]
            assert reduce == [5 * 4 * 128] * 2 + [5 * 4 * 90] * 2, reduce
        print("OK")
        """,
        timeout=240,
    )
    assert "OK" in proc.stdout


def test_replicas_are_not_ordered_against_each_other_by_control_edges() -> None:
    # As between stages (test_strategy.py): only data edges (the weight
    # copies, the gradient sums) may link the replicas, never a chain of
    # stateful ops that would serialize them.
    strategy = PipelineStrategy([[CPU0, CPU1]], num_microbatches=4, partition="params")
    with strategy.scope():
        model = dropout_capture()
        model.compile(optimizer="sgd", loss="mse")
    strategy.partition_model(model)
    model.optimizer.build(model.trainable_variables)
    step = tf.function(lambda x, y: strategy.run(model.train_step, args=((x, y),)))
    graph = step.get_concrete_function(
        tf.TensorSpec([8, 16], tf.float32), tf.TensorSpec([8, 16], tf.float32)
    ).graph
    devices = {CPU0, CPU1}
    crossing = collections.Counter(
        (source.type, op.type)
        for op in graph.get_operations()
        for source in op.control_inputs
        if {source.device, op.device} <= devices and source.device != op.device
    )
    assert {op.device for op in graph.get_operations()} >= devices
    assert not crossing, crossing


@pytest.mark.parametrize(
    ("devices", "partition"), [([CPU0, CPU1], ["d2"]), ([[CPU0, CPU1]], "params")]
)
def test_recompute_with_a_weight_regularizer_matches_single_device(
    devices: list, partition: object
) -> None:
    # The replayed loss reads every penalized weight, on replica 0 too.
    reference = train(None, regularized, batch_size=10, epochs=1)
    strategy = PipelineStrategy(
        devices, num_microbatches=2, partition=partition, recompute=True
    )
    assert_same_weights(
        reference, train(strategy, regularized, batch_size=10, epochs=1)
    )


def activity_penalized() -> keras.Model:
    """`mlp` with an L2 activity regularizer on the first stage's `d0`."""
    return mlp("d0", activity_regularizer=keras.regularizers.L2(0.1))


class AddsLoss(keras.layers.Layer):
    def call(self, h):  # type: ignore[no-untyped-def]
        # A mean over the examples, as Keras's activity regularizers are: a
        # micro-batch's counts with its share of the batch.
        self.add_loss(0.1 * keras.ops.mean(h * h))
        return h


def adds_loss() -> keras.Model:
    """`mlp` with a layer after `d0` adding a loss of `d0`'s output."""
    first, *rest = mlp().layers
    return keras.Sequential([keras.Input((6,)), first, AddsLoss(name="adds"), *rest])


@pytest.mark.parametrize("build", [activity_penalized, adds_loss])
def test_losses_added_in_a_call_train_on_every_replica(build: object) -> None:
    # Replica 1 runs in a keras.StatelessScope, which keeps such losses out
    # of the model's loss: the engine collects them and adds their gradient.
    reference = train(None, build, batch_size=10, epochs=2)
    strategy = PipelineStrategy([[CPU0, CPU1]], num_microbatches=3, partition="params")
    model = train(strategy, build, batch_size=10, epochs=2)
    assert_same_weights(reference, model)
    np.testing.assert_allclose(
        model.history_.history["loss"], reference.history_.history["loss"], rtol=RTOL
    )
    assert_same_inference(model, reference, batch_size=10)


def two_outputs() -> keras.Model:
    """A functional model with two outputs, each with its own loss."""
    keras.utils.set_random_seed(7)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="tanh", name="d0")(inputs)
    h = keras.layers.Dense(8, activation="tanh", name="d1")(h)
    outputs = {
        "a": keras.layers.Dense(2, name="a")(h),
        "b": keras.layers.Dense(1, name="b")(h),
    }
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="sgd", loss={"a": "mse", "b": "mae"})
    return model


@pytest.mark.parametrize(
    ("devices", "partition", "recompute"),
    [([[CPU0, CPU1]], "params", False), ([CPU0, CPU1], ["d1"], True)],
    ids=["replicas", "recompute"],
)
def test_each_outputs_loss_is_tracked_over_every_microbatch(
    devices: list, partition: object, recompute: bool
) -> None:
    # Keras updates each output's loss tracker in the loss, which a replica
    # r > 0 and a recomputed forward compute in a StatelessScope: the
    # trackers must count their micro-batches too (they logged replica 0's
    # only, and 0.0 with recompute, before 2026-12-06).
    x, _ = data()
    y = {"a": x[:, :2] * 0.5, "b": x[:, 2:3]}
    reference = two_outputs().fit(
        x, y, batch_size=10, epochs=2, shuffle=False, verbose=0
    )
    strategy = PipelineStrategy(
        devices, num_microbatches=2, partition=partition, recompute=recompute
    )
    with strategy.scope():
        model = two_outputs()
    history = model.fit(x, y, batch_size=10, epochs=2, shuffle=False, verbose=0)
    assert set(history.history) == {"loss", "a_loss", "b_loss"}
    for key, expected in reference.history.items():
        np.testing.assert_allclose(
            history.history[key], expected, rtol=RTOL, err_msg=key
        )
