"""Tests for tfpar.PipelineStrategy under real `model.fit`, evaluate and predict."""

import collections
import re
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests._models import mlp
from tests._subprocess import run_python, tagged_json
from tests.strategies.pipeline._fitting import (
    DEVICES,
    assert_same_inference,
    assert_same_training,
    assert_same_weights,
    data,
    train,
)
from tfpar import CommunicationStats, PipelineStrategy


def residual() -> keras.Model:
    keras.utils.set_random_seed(7)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="tanh", name="d0")(inputs)
    branch = keras.layers.Dense(8, activation="tanh", name="branch")(h)
    h = keras.layers.Add(name="add")([h, branch])
    h = keras.layers.Dense(8, activation="tanh", name="d1")(h)
    return keras.Model(inputs, keras.layers.Dense(2, name="out")(h))


@pytest.mark.parametrize(
    ("schedule", "recompute"), [("gpipe", False), ("1f1b", False), ("1f1b", True)]
)
def test_fit_matches_single_device(schedule: str, recompute: bool) -> None:
    # Batch 10 into 4 micro-batches of 3, 3, 2, 2: the remainder is handled.
    reference = train(None, mlp, batch_size=10, epochs=2)
    strategy = PipelineStrategy(
        DEVICES,
        num_microbatches=4,
        schedule=schedule,
        partition=["d2"],
        recompute=recompute,
    )
    model = train(strategy, mlp, batch_size=10, epochs=2)
    assert_same_training(reference, model)


def test_residual_block_inside_a_stage_and_evaluate_predict() -> None:
    reference = train(None, residual, batch_size=8, epochs=1)
    strategy = PipelineStrategy(
        DEVICES, num_microbatches=2, schedule="gpipe", partition=["d1"]
    )
    model = train(strategy, residual, batch_size=8, epochs=1)
    assert_same_weights(reference, model)
    assert_same_inference(model, reference, batch_size=8)


def test_variables_and_ops_live_on_their_stage() -> None:
    strategy = PipelineStrategy(DEVICES, num_microbatches=2, partition=["d2"])
    with strategy.scope():
        model = mlp()
        model.compile(optimizer="adam", loss="mse")
    # Partitioning before fit (to inspect it) places the variables before the
    # optimizer creates its slots.
    assert strategy.partition_model(model).cut_points == ["d2"]
    x, y = data()
    model.fit(x, y, batch_size=8, verbose=0)
    device = {w.path: w.value.device.split("device:")[-1] for w in model.weights}
    assert device == {
        **{
            f"{model.name}/d{i}/{k}": "CPU:0"
            for i in range(2)
            for k in ("kernel", "bias")
        },
        **{
            f"{model.name}/{n}/{k}": "CPU:1"
            for n in ("d2", "out")
            for k in ("kernel", "bias")
        },
    }
    slots = {
        v.name: v.value.device.split("device:")[-1]
        for v in model.optimizer.variables
        if v.name.endswith(("momentum", "velocity"))
    }
    assert len(slots) == 16
    assert all(
        (dev == "CPU:1") == ("_d2_" in n or "_out_" in n) for n, dev in slots.items()
    )

    @tf.function
    def step(x: tf.Tensor, y: tf.Tensor) -> dict:
        return strategy.run(model.train_step, args=((x, y),))

    graph = step.get_concrete_function(
        tf.TensorSpec([8, 6]), tf.TensorSpec([8, 2])
    ).graph
    layer_of = re.compile(r"/(d\d|out)(_\d+)?/")
    placed = collections.Counter(
        (
            match.group(1) if (match := layer_of.search(op.name)) else op.name,
            op.device.split("device:")[-1],
        )
        for op in graph.get_operations()
        if op.type == "MatMul"
    )
    # Forward and backward MatMuls of every layer run on its stage's device
    # only: 2 micro-batches x (1 forward + 2 backward), minus the input
    # gradient of the first layer, which nothing needs.
    assert placed == {
        ("d0", "CPU:0"): 4,
        ("d1", "CPU:0"): 6,
        ("d2", "CPU:1"): 6,
        ("out", "CPU:1"): 6,
    }


@pytest.mark.parametrize(
    ("schedule", "expected"), [("gpipe", [4, 4]), ("1f1b", [2, 1])]
)
def test_schedule_is_enforced_activations_in_flight(
    schedule: str, expected: list[int]
) -> None:
    # Measured from timestamps: control dependencies make every stage follow
    # the plan, so 1F1B keeps at most K - s micro-batches alive, GPipe all M.
    strategy = PipelineStrategy(
        DEVICES, num_microbatches=4, schedule=schedule, partition=["d2"]
    )
    assert strategy.peak_in_flight() == [0, 0]
    train(strategy, mlp, batch_size=8, epochs=1)
    assert strategy.peak_in_flight() == expected
    assert expected == [strategy.schedule.peak_in_flight(s) for s in range(2)]


def chain() -> keras.Model:
    """A 6-16-8-2 MLP, layers `d0`, `d1`, `out`: boundaries of width 16 and 8."""
    keras.utils.set_random_seed(7)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(16, activation="tanh", name="d0"),
            keras.layers.Dense(8, activation="tanh", name="d1"),
            keras.layers.Dense(2, name="out"),
        ]
    )


def test_bytes_count_activations_forward_and_gradients_back() -> None:
    strategy = PipelineStrategy(DEVICES, num_microbatches=4, partition=["d1"])
    model = train(strategy, chain, batch_size=8, epochs=1)
    before = strategy.communication_stats()
    x, y = data()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    stats = strategy.communication_stats().since(before)
    assert stats.steps == 5
    # 40 examples cross the 16-wide boundary as float32 activations forward
    # and as their gradients back.
    assert [d.bytes_sent for d in stats.devices] == [40 * 16 * 4, 40 * 16 * 4]
    assert stats.bytes_moved == stats.bytes_logical == 2 * 40 * 16 * 4
    assert stats.calls == 5 * 2 * 4 * 1  # steps x (F, B) x M x boundaries


def test_bytes_of_three_stages() -> None:
    proc = run_python(
        """
        import json
        import tfpar
        tfpar.simulate_devices(3)
        import keras, numpy as np

        strategy = tfpar.PipelineStrategy(
            ["/device:CPU:0", "/device:CPU:1", "/device:CPU:2"],
            num_microbatches=2,
            partition=["d1", "out"],
        )
        with strategy.scope():
            model = keras.Sequential([
                keras.Input((6,)),
                keras.layers.Dense(16, activation="tanh", name="d0"),
                keras.layers.Dense(8, activation="tanh", name="d1"),
                keras.layers.Dense(2, name="out"),
            ])
            model.compile(optimizer="sgd", loss="mse")
        rng = np.random.default_rng(0)
        x = rng.normal(size=(24, 6)).astype("float32")
        y = rng.normal(size=(24, 2)).astype("float32")
        before = strategy.communication_stats()
        model.fit(x, y, batch_size=6, verbose=0)
        stats = strategy.communication_stats().since(before)
        print("RESULTS " + json.dumps({
            "steps": stats.steps,
            "calls": stats.calls,
            "sent": [d.bytes_sent for d in stats.devices],
            "moved": stats.bytes_moved,
            "logical": stats.bytes_logical,
        }))
        """
    )
    r = tagged_json(proc.stdout, "RESULTS")
    assert r["steps"] == 4
    # 24 float32 examples per boundary and direction: stage 0 sends 16-wide
    # activations, stage 1 8-wide activations and 16-wide gradients, stage 2
    # 8-wide gradients.
    assert r["sent"] == [24 * 16 * 4, 24 * (8 + 16) * 4, 24 * 8 * 4]
    assert r["moved"] == r["logical"] == 2 * 24 * (16 + 8) * 4
    assert r["calls"] == 4 * 2 * 2 * 2  # steps x (F, B) x M x boundaries


def assert_stage_times_split_the_span(stats: CommunicationStats) -> float:
    """Checks that each stage's busy, exposed and bubble time split one span.

    The span is measured once per step for all stages, and no part has a
    clamp that would hide an overlap: a negative bubble fails. Returns the
    span.
    """
    spans = [d.busy_seconds + d.comm_seconds + d.idle_seconds for d in stats.devices]
    assert spans == pytest.approx([spans[0]] * len(spans), rel=1e-9, abs=1e-9)
    for d in stats.devices:
        assert d.busy_seconds > 0 and d.idle_seconds >= 0, d
    return spans[0]


def test_communication_stats_per_stage() -> None:
    strategy = PipelineStrategy(DEVICES, num_microbatches=4, partition=["d2"])
    before = strategy.communication_stats()
    assert before.kind == "pipeline" and before.steps == 0
    start = time.time()
    train(strategy, mlp, batch_size=8, epochs=1)
    wall = time.time() - start
    stats = strategy.communication_stats().since(before)
    assert stats.steps == 5
    assert [d.device for d in stats.devices] == DEVICES
    span = assert_stage_times_split_the_span(stats)
    # The steps' spans lie inside the host's clock around `fit`.
    assert span < wall
    # The exposed communication of an average stage.
    assert stats.comm_seconds == pytest.approx(
        sum(d.comm_seconds for d in stats.devices) / 2
    )


def unbalanced() -> keras.Model:
    """Three 512-wide layers before the cut at `d3`, one after (and the head)."""
    keras.utils.set_random_seed(7)
    return keras.Sequential(
        [keras.Input((512,))]
        + [keras.layers.Dense(512, activation="relu", name=f"d{i}") for i in range(4)]
        + [keras.layers.Dense(1, name="out")]
    )


def test_the_lighter_stage_has_the_larger_bubble() -> None:
    # Stage 0 runs three 512-wide layers, stage 1 one (and the head), so
    # stage 1 spends the difference waiting for stage 0 to compute.
    strategy = PipelineStrategy(DEVICES, num_microbatches=4, partition=["d3"])
    with strategy.scope():
        model = unbalanced()
        model.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256 * 6, 512)).astype("float32")
    y = rng.normal(size=(256 * 6, 1)).astype("float32")
    model.fit(x[:256], y[:256], batch_size=256, verbose=0)  # traces the step
    before = strategy.communication_stats()
    model.fit(x, y, batch_size=256, verbose=0)
    stats = strategy.communication_stats().since(before)
    assert stats.steps == 6
    assert_stage_times_split_the_span(stats)
    heavy, light = stats.devices
    assert heavy.busy_seconds > light.busy_seconds, stats
    assert light.idle_seconds > heavy.idle_seconds, stats


def test_batch_normalization_trains_per_microbatch() -> None:
    def build() -> keras.Model:
        keras.utils.set_random_seed(3)
        return keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(16, name="d0"),
                keras.layers.BatchNormalization(name="bn"),
                keras.layers.Activation("relu"),
                keras.layers.Dense(2, name="out"),
            ]
        )

    models = train_with_and_without_recompute(build, cut="out", epochs=3)
    losses = models[True].history_.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    bn = models[True].get_layer("bn")
    assert bn.moving_mean.value.device.endswith("CPU:0")
    assert not np.allclose(bn.moving_mean.numpy(), 0.0)
    # Recomputing replays the forward without updating the moving statistics
    # a second time: everything, statistics included, matches no recompute.
    assert_same_weights(models[False], models[True])


def train_with_and_without_recompute(
    build: Callable[[], keras.Model], cut: str, epochs: int
) -> dict[bool, keras.Model]:
    """The same model trained on 2 stages cut at `cut`, by `recompute`."""
    models = {}
    for recompute in (False, True):
        strategy = PipelineStrategy(
            DEVICES, num_microbatches=2, partition=[cut], recompute=recompute
        )
        models[recompute] = train(strategy, build, batch_size=8, epochs=epochs)
    return models


def test_recompute_replays_the_same_dropout_masks() -> None:
    # Recomputed forwards read the seed state of the original forward, so the
    # masks, and therefore the gradients and weights, match no recompute.
    def build() -> keras.Model:
        keras.utils.set_random_seed(5)
        return keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(16, activation="relu", name="d0"),
                keras.layers.Dropout(0.5, name="drop0"),
                keras.layers.Dense(16, activation="relu", name="d1"),
                keras.layers.Dropout(0.5, name="drop1"),
                keras.layers.Dense(2, name="out"),
            ]
        )

    models = train_with_and_without_recompute(build, cut="d1", epochs=2)
    assert_same_weights(models[False], models[True])
    # The masks were drawn: the seed states advanced once per forward.
    state = models[True].get_layer("drop1").seed_generator.state.numpy()
    assert not np.array_equal(state, build().get_layer("drop1").seed_generator.state)


def test_exception_in_last_stage_reaches_fit_promptly() -> None:
    class Fail(keras.layers.Layer):
        def call(self, x: tf.Tensor) -> tf.Tensor:
            return tf.debugging.check_numerics(
                x, "non-finite activation in the last stage"
            )

    strategy = PipelineStrategy(DEVICES, num_microbatches=4)
    with strategy.scope():
        model = keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(8, name="a"),
                Fail(name="fail"),
                keras.layers.Dense(1),
            ]
        )
        model.compile(optimizer="sgd", loss="mse")
    x, y = data()
    x[20] = np.nan
    start = time.monotonic()
    with pytest.raises(tf.errors.InvalidArgumentError, match="last stage"):
        model.fit(x, y[:, :1], batch_size=8, verbose=0, shuffle=False)
    assert time.monotonic() - start < 60


def test_save_and_load_without_tfpar(tmp_path: Path) -> None:
    strategy = PipelineStrategy(DEVICES, num_microbatches=2, partition=["d2"])
    model = train(strategy, mlp, batch_size=8, epochs=1)
    path = tmp_path / "model.keras"
    model.save(path)
    x, _ = data()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", model.predict(x, verbose=0))
    run_python(
        f"""
        import sys
        sys.modules["tfpar"] = None  # tfpar cannot be imported
        import keras, numpy as np
        model = keras.saving.load_model({str(path)!r})
        got = model.predict(np.load({str(tmp_path / "x.npy")!r}), verbose=0)
        np.testing.assert_allclose(got, np.load({str(tmp_path / "expected.npy")!r}), rtol=1e-6)
        """
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_microbatches": 0}, ValueError, "num_microbatches=0"),
        (
            {"schedule": "zb"},
            ValueError,
            r"`schedule` must be one of 'gpipe', '1f1b', 'interleaved'\. Received: schedule='zb'\.",
        ),
        ({"partition": "even"}, ValueError, "partition='even'"),
        (
            {"partition": ["a", "b"]},
            ValueError,
            r"partition=\['a', 'b'\] with devices=",
        ),
        ({"partition": [3]}, TypeError, r"partition=\[3\]"),
        ({"recompute": "yes"}, TypeError, "recompute='yes'"),
        ({"devices": ["/device:CPU:7"]}, ValueError, "do not exist"),
        ({"devices": "/device:CPU:0"}, TypeError, "devices="),
        ({"compression": "int8"}, ValueError, r"'bf16'\. Received: compression='int8'"),
        (
            {"on_nonfinite": "ignore"},
            ValueError,
            r"'skip', 'raise'\. Received: on_nonfinite='ignore'",
        ),
        ({"bucket_bytes": 1.5}, TypeError, r"bucket_bytes=1\.5"),
        # Without replicas there is no gradient reduction to compress or pack.
        (
            {"compression": "bf16"},
            ValueError,
            r"one replica per stage.*Received: compression='bf16'",
        ),
        (
            {"bucket_bytes": 1024},
            ValueError,
            r"one replica per stage.*Received: bucket_bytes=1024",
        ),
    ],
)
def test_bad_arguments_fail_at_construction(
    kwargs: dict, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        PipelineStrategy(**{"devices": DEVICES, **kwargs})


def test_bad_model_fails_before_the_first_step() -> None:
    strategy = PipelineStrategy(DEVICES, partition=["missing"])
    with strategy.scope():
        model = mlp()
        model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(
        ValueError, match=r"'missing' is not a layer.*partition=\['missing'\]"
    ):
        strategy.partition_model(model)
    x, y = data()
    with pytest.raises(ValueError, match="'missing'"):
        model.fit(x, y, batch_size=8, verbose=0)


def test_jit_compile_is_refused() -> None:
    strategy = PipelineStrategy(DEVICES, partition=["d2"])
    with strategy.scope():
        model = mlp()
        model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    with pytest.raises(ValueError, match="jit_compile=True"):
        strategy.partition_model(model)


def test_batch_smaller_than_num_microbatches() -> None:
    strategy = PipelineStrategy(DEVICES, num_microbatches=4, partition=["d2"])
    with strategy.scope():
        model = mlp()
        model.compile(optimizer="sgd", loss="mse")
    x, y = data(10)
    # 10 examples in batches of 8: the last batch has 2 < 4 examples.
    with pytest.raises(tf.errors.InvalidArgumentError, match="num_microbatches=4"):
        model.fit(x, y, batch_size=8, verbose=0)


def test_overridden_train_step_runs_unsplit_with_a_warning() -> None:
    class Custom(keras.Sequential):
        def train_step(self, data):  # type: ignore[no-untyped-def]
            return super().train_step(data)

    def build() -> keras.Model:
        keras.utils.set_random_seed(7)
        return Custom([keras.Input((6,)), keras.layers.Dense(2, name="d0")])

    reference = train(None, build, batch_size=8, epochs=1)
    with pytest.warns(UserWarning, match="without pipelining"):
        model = train(PipelineStrategy(DEVICES), build, batch_size=8, epochs=1)
    assert_same_weights(reference, model)


def test_is_a_strategy_and_one_stage_is_plain_training() -> None:
    strategy = PipelineStrategy(["/device:CPU:0"], num_microbatches=1)
    assert isinstance(strategy, tf.distribute.Strategy)
    assert strategy.schedule.format() == "stage 0 | F0 B0\nplanned bubble 0.000"
    reference = train(None, mlp, batch_size=8, epochs=1)
    model = train(strategy, mlp, batch_size=8, epochs=1)
    assert_same_weights(reference, model)


def test_stages_on_cluster_workers_match_and_fail_cleanly() -> None:
    # Stages on two worker processes of a LocalCluster (in a child process:
    # connecting to a cluster changes this process's devices for good).
    run_python(
        """
        import time
        import keras, numpy as np, tensorflow as tf, tfpar
        from tfpar import PipelineStrategy

        def build(extra=()):
            keras.utils.set_random_seed(7)
            return keras.Sequential(
                [keras.Input((6,))]
                + [keras.layers.Dense(8, activation="tanh", name=f"d{i}") for i in range(3)]
                + list(extra) + [keras.layers.Dense(2, name="out")])

        rng = np.random.default_rng(0)
        x = rng.normal(size=(32, 6)).astype("float32")
        y = rng.normal(size=(32, 2)).astype("float32")
        reference = build()
        reference.compile(optimizer="sgd", loss="mse")
        reference.fit(x, y, batch_size=8, shuffle=False, verbose=0)

        class Fail(keras.layers.Layer):
            def call(self, h):
                return tf.debugging.check_numerics(h, "bad value in the last stage")

        with tfpar.LocalCluster(num_workers=2, pin_cores=False) as cluster:
            devices = cluster.connect()
            strategy = PipelineStrategy(devices, num_microbatches=2, partition=["d2"])
            with strategy.scope():
                model = build()
                model.compile(optimizer="sgd", loss="mse")
            model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
            for a, b in zip(reference.weights, model.weights, strict=True):
                np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
            assert "task:1" in model.get_layer("out").kernel.value.device
            assert "task:0" in model.get_layer("d0").kernel.value.device
            sent = [d.bytes_sent for d in strategy.communication_stats().devices]
            assert sent == [32 * 8 * 4, 32 * 8 * 4], sent  # activations, gradients

            strategy = PipelineStrategy(devices, num_microbatches=2, partition=["d2"])
            with strategy.scope():
                failing = build([Fail(name="fail")])
                failing.compile(optimizer="sgd", loss="mse")
            x[9] = np.nan
            start = time.monotonic()
            try:
                failing.fit(x, y, batch_size=8, shuffle=False, verbose=0)
            except tf.errors.InvalidArgumentError as err:
                assert "last stage" in str(err), err
            else:
                raise AssertionError("fit did not raise")
            assert time.monotonic() - start < 60
        print("OK")
        """,
        timeout=240,
    )


def test_stages_are_not_ordered_against_each_other_by_control_edges() -> None:
    # tf.function runs stateful ops without resources (tf.timestamp) in program
    # order across devices; the stages' timestamps must not form such a chain,
    # which made two workers slower than one. Data edges are the only links
    # between stages.
    strategy = PipelineStrategy(DEVICES, num_microbatches=4, partition=["d2"])
    with strategy.scope():
        model = mlp()
        model.compile(optimizer="sgd", loss="mse")
    strategy.partition_model(model)
    model.optimizer.build(model.trainable_variables)
    step = tf.function(lambda x, y: strategy.run(model.train_step, args=((x, y),)))
    graph = step.get_concrete_function(
        tf.TensorSpec([8, 6], tf.float32), tf.TensorSpec([8, 2], tf.float32)
    ).graph
    stage_of = {device: s for s, device in enumerate(DEVICES)}
    crossing = collections.Counter(
        (source.type, op.type)
        for op in graph.get_operations()
        for source in op.control_inputs
        if {source.device, op.device} <= stage_of.keys() and source.device != op.device
    )
    assert {op.device for op in graph.get_operations()} >= set(DEVICES)
    assert not crossing, crossing
    # Per (stage, micro-batch, forward or backward): arrived, start and end
    # timestamps; one more when stage 1's backward sends a gradient back.
    clocks = sum(op.type == "StatefulPartitionedCall" for op in graph.get_operations())
    assert clocks == 2 * 4 * 2 * 3 + 4
