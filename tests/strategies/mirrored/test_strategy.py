"""tfpar.MirroredStrategy under real Keras `fit`, against stock and one device.

Every test runs on the two simulated CPUs of `tests/conftest.py`.
"""

from __future__ import annotations

import contextlib
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests._subprocess import run_python, tagged_json
from tfpar import MirroredStrategy

DEVICES = ["/device:CPU:0", "/device:CPU:1"]


def _data(n: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype("float32")
    y = (x[:, :3].sum(axis=1, keepdims=True) > 0).astype("float32") + x[:, 3:4]
    return x, y.astype("float32")


def _model(
    strategy: tf.distribute.Strategy | None, optimizer: str = "adam"
) -> keras.Model:
    keras.utils.set_random_seed(1)
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        model = keras.Sequential(
            [
                keras.Input((8,)),
                keras.layers.Dense(16, activation="relu"),
                keras.layers.Dense(1),
            ]
        )
        model.compile(optimizer=optimizer, loss="mse", metrics=["mae"])
    # Same initial weights everywhere, whatever each scope did to the RNG.
    model.set_weights([w.copy() for w in _INIT])
    return model


keras.utils.set_random_seed(1)
_INIT = keras.Sequential(
    [
        keras.Input((8,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(1),
    ]
).get_weights()


def _fit(
    strategy: tf.distribute.Strategy | None, optimizer: str = "adam", **kw: object
) -> list[np.ndarray]:
    x, y = _data(70)  # the last batch of each epoch is partial: 6 = 3 + 3
    model = _model(strategy, optimizer)
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, **kw)
    return model.get_weights()


def test_is_a_stock_mirrored_strategy() -> None:
    strategy = MirroredStrategy()
    assert isinstance(strategy, tf.distribute.MirroredStrategy)
    assert isinstance(strategy, tf.distribute.Strategy)
    assert strategy.num_replicas_in_sync == 2
    assert strategy.extended.worker_devices == tuple(
        f"/job:localhost/replica:0/task:0/device:CPU:{i}" for i in range(2)
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"devices": ["/gpu:7"]}, ValueError, ["devices", "/gpu:7", "Available"]),
        ({"devices": "/cpu:0"}, TypeError, ["devices", "'/cpu:0'", "list"]),
        ({"devices": ["/cpu:0", "/cpu:0"]}, ValueError, ["devices", "duplicates"]),
        ({"devices": []}, ValueError, ["devices=[]"]),
        ({"all_reduce": "ring"}, ValueError, ["all_reduce='ring'", "'nccl'"]),
        ({"compression": "int8"}, ValueError, ["compression='int8'", "'bf16'"]),
        ({"bucket_bytes": 0}, ValueError, ["bucket_bytes=0", ">= 1"]),
        ({"bucket_bytes": 1.5}, TypeError, ["bucket_bytes=1.5", "int"]),
        ({"on_nonfinite": "ignore"}, ValueError, ["on_nonfinite='ignore'", "'skip'"]),
        ({"all_reduce": "nccl"}, ValueError, ["all_reduce='nccl'", "GPU", "CPU:0"]),
        (
            {
                "cross_device_ops": tf.distribute.ReductionToOneDevice(),
                "all_reduce": "collective",
            },
            ValueError,
            ["cross_device_ops", "all_reduce='collective'"],
        ),
        ({"cross_device_ops": "nccl"}, TypeError, ["cross_device_ops='nccl'"]),
    ],
)
def test_bad_arguments_fail_in_the_constructor(
    kwargs: dict[str, object], error: type[Exception], words: list[str]
) -> None:
    with pytest.raises(error) as info:
        MirroredStrategy(**kwargs)  # type: ignore[arg-type]
    for word in words:
        assert word in str(info.value)


def test_default_is_bit_identical_to_stock_under_fit() -> None:
    stock = _fit(tf.distribute.MirroredStrategy(DEVICES))
    ours = _fit(MirroredStrategy())
    # Same algorithm, same ops: the weights must be equal bit for bit.
    for a, b in zip(stock, ours, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bucket_bytes": 256},
        {"all_reduce": "reduce_to_one_device"},
        {"all_reduce": "hierarchical_copy", "bucket_bytes": 1 << 20},
    ],
    ids=["buckets", "one_device", "hierarchical"],
)
def test_matches_single_device_on_the_global_batch(kwargs: dict[str, object]) -> None:
    single = _fit(None, optimizer="sgd")
    ours = _fit(MirroredStrategy(**kwargs), optimizer="sgd")  # type: ignore[arg-type]
    # Two replicas each average half the batch, then sum/2: only rounding differs.
    for a, b in zip(single, ours, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bucket_bytes", [None, 64])
def test_buckets_reduce_while_the_backward_pass_runs(bucket_bytes: int | None) -> None:
    strategy = MirroredStrategy(bucket_bytes=bucket_bytes)
    model = _model(strategy, optimizer="sgd")
    x, y = _data(16)
    model.fit(x, y, batch_size=16, verbose=0)  # builds the optimizer and metrics

    @tf.function
    def step(x: tf.Tensor, y: tf.Tensor) -> None:
        strategy.run(model.train_step, args=((x, y),))

    graph = step.get_concrete_function(
        tf.TensorSpec((8, 8)), tf.TensorSpec((8, 1))
    ).graph

    def weight_gradients(shape: list[int]) -> set[str]:
        # A Dense kernel's gradient: inputs transposed times output gradients.
        return {
            op.name
            for op in graph.get_operations()
            if op.type == "MatMul"
            and op.get_attr("transpose_a")
            and op.outputs[0].shape.as_list() == shape
        }

    first, last = weight_gradients([8, 16]), weight_gradients([16, 1])
    assert len(first) == len(last) == len(DEVICES)  # one per replica
    needs = [
        _ancestors(op)
        for op in graph.get_operations()
        if op.type == "CollectiveReduceV2"
    ]
    assert needs
    # The last layer's gradients are computed first in the backward pass.
    early = [a for a in needs if a & last and not a & first]
    if bucket_bytes is None:
        # TensorFlow's collective concatenates one call's tensors: every
        # reduction waits for the first layer's gradient, the last computed.
        assert not early
    else:
        assert len(early) >= len(DEVICES)


def _ancestors(op: tf.Operation) -> set[str]:
    """Names of every op `op` depends on, through data and control edges."""
    seen: set[str] = set()
    stack = [op]
    while stack:
        current = stack.pop()
        for parent in [t.op for t in current.inputs] + list(current.control_inputs):
            if parent.name not in seen:
                seen.add(parent.name)
                stack.append(parent)
    return seen


def test_communication_stats_count_exactly() -> None:
    strategy = MirroredStrategy(compression="bf16")
    x, y = _data()
    model = _model(strategy)
    start = strategy.communication_stats()
    began = time.perf_counter()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, validation_data=(x, y))
    fit_seconds = time.perf_counter() - began
    stats = strategy.communication_stats().since(start)
    params = sum(w.size for w in model.get_weights())
    steps = 64 // 16
    assert stats.kind == "allreduce"
    assert stats.steps == steps  # validation does not reduce gradients
    assert stats.calls == steps * 4  # four gradient tensors, no bucketing
    assert stats.bytes_logical == steps * params * 4
    assert stats.bytes_moved == steps * params * 2  # bf16 halves the bytes
    assert 0 < stats.comm_seconds < 5
    assert [d.device for d in stats.devices] == DEVICES
    assert all(d.comm_seconds >= 0 for d in stats.devices)
    # A ring sends 2(n-1)/n of the (compressed) buffer from every device: a
    # model of the routing, not an observation, and the stats say so.
    assert [d.bytes_sent for d in stats.devices] == [stats.bytes_moved] * 2
    assert stats.modelled == ("bytes_sent",)
    # One replica is the slowest at each synchronization but the strategy's
    # first (no interval yet); the others waited for it, none a negative time.
    assert sum(d.slowest_steps for d in stats.devices) == steps - 1
    # Each replica was busy (inputs to gradients) in every step, for less
    # than the whole fit.
    assert all(0 < d.busy_seconds < fit_seconds for d in stats.devices)
    assert all(d.wait_seconds >= 0 for d in stats.devices)
    assert max(d.wait_seconds for d in stats.devices) > 0

    bucketed = MirroredStrategy(bucket_bytes=1 << 20)
    _model(bucketed).fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert bucketed.communication_stats().calls == 64 // 16  # one bucket per step

    # Reduction to one device: each other replica sends its buffer there and
    # the destination sends the sum back to each of them.
    one = MirroredStrategy(
        cross_device_ops=tf.distribute.ReductionToOneDevice("/device:CPU:1")
    )
    _model(one).fit(x, y, batch_size=16, epochs=1, verbose=0)
    moved = one.communication_stats().bytes_moved
    assert [d.bytes_sent for d in one.communication_stats().devices] == [moved] * 2
    hierarchical = MirroredStrategy(all_reduce="hierarchical_copy")
    _model(hierarchical).fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert [d.bytes_sent for d in hierarchical.communication_stats().devices] == [
        0,
        0,
    ]  # routing not known

    off = MirroredStrategy(measure=False)
    _model(off).fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert off.communication_stats().steps == 0


def test_compression_reaches_the_same_accuracy() -> None:
    # 10 classes, each a noisy copy of its pattern of 64 features.
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, size=1797).astype("int32")
    x = rng.uniform(size=(10, 64))[y] + rng.normal(scale=0.6, size=(1797, 64))
    x = x.astype("float32")
    accuracy = {}
    for compression in (None, "fp16", "bf16"):
        strategy = MirroredStrategy(compression=compression)
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = keras.Sequential(
                [
                    keras.Input((64,)),
                    keras.layers.Dense(32, activation="relu"),
                    keras.layers.Dense(10),
                ]
            )
            model.compile(
                optimizer=keras.optimizers.Adam(0.01),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"],
            )
        # One long epoch: each extra epoch costs a new distributed iterator.
        train = tf.data.Dataset.from_tensor_slices((x[:1400], y[:1400]))
        model.fit(train.batch(50).repeat(3), epochs=1, shuffle=False, verbose=0)
        accuracy[compression] = model.evaluate(x[1400:], y[1400:], verbose=0)[1]
    assert accuracy[None] > 0.8  # the task is learnt (chance is 0.1)
    # Stated margin: compressed gradients lose at most 3 points of accuracy.
    assert accuracy["fp16"] >= accuracy[None] - 0.03, accuracy
    assert accuracy["bf16"] >= accuracy[None] - 0.03, accuracy


def test_uneven_first_batch_trains_and_user_reduce_says_why() -> None:
    x, y = _data(10)
    strategy = MirroredStrategy()
    model = _model(strategy)
    # 5 samples over 2 replicas: 3 and 2 (stock Keras dies with an AddN error).
    history = model.fit(x, y, batch_size=5, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert strategy.communication_stats().steps == 4
    uneven = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.ones([3 - ctx.replica_id_in_sync_group])
    )
    with pytest.raises(ValueError, match="one shape"):
        strategy.reduce("MEAN", uneven, axis=None)


@pytest.mark.parametrize("measure", [True, False])
def test_on_nonfinite_skip_keeps_weights_finite_and_counts(measure: bool) -> None:
    x, y = _data()
    x[20] = np.nan  # second batch of 16
    strategy = MirroredStrategy(on_nonfinite="skip", measure=measure)
    model = _model(strategy, optimizer="sgd")
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert strategy.skipped_steps() == 1
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_on_nonfinite_raise_stops_fit_naming_the_replicas() -> None:
    x, y = _data()
    x[20] = np.inf  # replica 0's half of the second batch
    model = _model(MirroredStrategy(on_nonfinite="raise"), optimizer="sgd")
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="on_nonfinite=raise"
    ) as info:
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    culprits = str(info.value).split("not finite:")[1].split("\n")[0]
    assert "/device:CPU:0" in culprits and "CPU:1" not in culprits, culprits


def test_loss_scaling_misses_one_replicas_overflow_which_skip_catches() -> None:
    # Keras 3.15's LossScaleOptimizer tests replica 0's own gradients before
    # the all-reduce ("each replica computed the same `finite` value"): when
    # only replica 1's half overflows, it applies the infinite sum. The stock
    # strategy is the reference; if Keras fixes this, docs/mirrored.md's
    # Faults section must say so. In a child: a collective that another
    # strategy of this process used first would abort the process's
    # collective executor, which every later test needs.
    result = run_python(
        """
        import json
        import tfpar
        tfpar.simulate_devices(2)
        import keras, numpy as np, tensorflow as tf

        x = np.ones((16, 8), "float32")
        x[8:] = 1e30  # replica 1's half of the one batch
        y = np.zeros((16, 1), "float32")
        results = {}
        for name, strategy in [
            ("stock", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])),
            ("skip", tfpar.MirroredStrategy(on_nonfinite="skip")),
        ]:
            keras.utils.set_random_seed(1)
            with strategy.scope():
                model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
                model.compile(
                    optimizer=keras.optimizers.LossScaleOptimizer(
                        keras.optimizers.SGD(1e-3), initial_scale=2.0
                    ),
                    loss="mse",
                )
            model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
            results[name] = {
                "finite": all(bool(np.isfinite(w).all()) for w in model.get_weights()),
                "skipped": getattr(strategy, "skipped_steps", lambda: None)(),
            }
        print("RESULT", json.dumps(results))
        """
    )
    results = tagged_json(result.stdout, "RESULT")
    assert results["stock"]["finite"] is False, results
    assert results["skip"] == {"finite": True, "skipped": 1}, results


def test_custom_training_loop_with_strategy_run() -> None:
    strategy = MirroredStrategy()
    x, y = _data()
    model = _model(strategy, optimizer="sgd")
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    )

    @tf.function
    def step(xb: tf.Tensor, yb: tf.Tensor) -> tf.Tensor:
        def replica(xr: tf.Tensor, yr: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum((model(xr, training=True) - yr) ** 2) / 16.0
            grads = tape.gradient(loss, model.trainable_variables)
            model.optimizer.apply_gradients(
                zip(grads, model.trainable_variables, strict=True)
            )
            return loss

        return strategy.reduce("SUM", strategy.run(replica, args=(xb, yb)), axis=None)

    for xb, yb in dataset:
        step(xb, yb)
    single = _model(None, optimizer="sgd")
    single.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(single.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert strategy.communication_stats().steps == 4


def test_saved_model_and_checkpoint_never_need_tfpar(tmp_path: object) -> None:
    x, y = _data()
    model = _model(MirroredStrategy())
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    path = f"{tmp_path}/m.keras"
    model.save(path)
    np.save(f"{tmp_path}/x.npy", x)
    np.save(f"{tmp_path}/expected.npy", model.predict(x, verbose=0))
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    prefix = checkpoint.save(f"{tmp_path}/ckpt")
    keys = [name for name, _ in tf.train.list_variables(prefix)]
    assert not [k for k in keys if "tfpar" in k], keys
    run_python(
        f"""
        import sys
        sys.modules["tfpar"] = None  # any import of tfpar now fails
        import numpy as np, keras
        model = keras.models.load_model({path!r})
        got = model.predict(np.load("{tmp_path}/x.npy"), verbose=0)
        np.testing.assert_allclose(got, np.load("{tmp_path}/expected.npy"), rtol=1e-6)
        """
    )


def test_a_failing_replica_stops_fit_at_once_naming_it() -> None:
    class CheckFinite(keras.layers.Layer):
        def call(self, x: tf.Tensor) -> tf.Tensor:
            return tf.debugging.check_numerics(x, "input check")

    strategy = MirroredStrategy()
    with strategy.scope():
        model = keras.Sequential(
            [keras.Input((8,)), CheckFinite(), keras.layers.Dense(1)]
        )
        model.compile(optimizer="sgd", loss="mse")
    x, y = _data()
    x[28] = np.nan  # replica 1's half of the second batch
    # A hang would hit the pytest timeout; the collective must abort instead.
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=r"replica_1/.*CheckNumerics"
    ):
        model.fit(x, y, batch_size=16, shuffle=False, verbose=0)


def _train_with(
    strategy: tf.distribute.Strategy | None,
    policy: str = "float32",
    accumulate: int | None = None,
) -> list[np.ndarray]:
    x, y = _data()
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        keras.config.set_dtype_policy(policy)
        try:
            model = keras.Sequential(
                [keras.Input((8,)), keras.layers.Dense(16), keras.layers.Dense(1)]
            )
        finally:
            keras.config.set_dtype_policy("float32")
        model.compile(
            optimizer=keras.optimizers.SGD(
                0.05, gradient_accumulation_steps=accumulate
            ),
            loss="mse",
        )
    model.set_weights([w.copy() for w in _INIT])
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    return model.get_weights()


def test_mixed_precision_is_bit_identical_to_stock() -> None:
    ours = MirroredStrategy()
    stock = _train_with(tf.distribute.MirroredStrategy(DEVICES), "mixed_float16")
    for a, b in zip(stock, _train_with(ours, "mixed_float16"), strict=True):
        np.testing.assert_array_equal(a, b)
    assert ours.communication_stats().steps == 4


def test_gradient_accumulation_fails_under_stock() -> None:
    # Keras 3.15 reduces gradients inside a tf.cond, where the stock
    # MirroredStrategy's merge_call is not allowed. If this starts passing
    # after an upgrade, tfpar's no-merge_call path may no longer be needed.
    with pytest.raises(RuntimeError, match="merge_call"):
        _train_with(tf.distribute.MirroredStrategy(DEVICES), accumulate=2)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"bucket_bytes": 1 << 20, "compression": None}],
    ids=["default", "bucketed"],
)
def test_gradient_accumulation_matches_one_device(kwargs: dict[str, object]) -> None:
    strategy = MirroredStrategy(**kwargs)  # type: ignore[arg-type]
    reference = _train_with(None, accumulate=2)
    for a, b in zip(reference, _train_with(strategy, accumulate=2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    stats = strategy.communication_stats()
    # 4 batches, accumulated in pairs: 2 reductions, each counted once.
    assert stats.steps == 2, stats
    assert stats.calls == 2 * (1 if kwargs else 4), stats
    assert stats.bytes_logical == 2 * sum(w.size for w in reference) * 4, stats
    assert [d.bytes_sent for d in stats.devices] == [stats.bytes_moved] * 2


def test_backup_and_restore_resumes_to_the_uninterrupted_weights(
    tmp_path: object,
) -> None:
    class Interrupt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            if epoch == 1:
                raise RuntimeError("interrupted")

    x, y = _data()
    reference = _model(MirroredStrategy(), optimizer="sgd")
    reference.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    backup = keras.callbacks.BackupAndRestore(f"{tmp_path}/backup")
    model = _model(MirroredStrategy(), optimizer="sgd")
    with pytest.raises(RuntimeError, match="interrupted"):
        model.fit(
            x,
            y,
            batch_size=16,
            epochs=2,
            shuffle=False,
            verbose=0,
            callbacks=[backup, Interrupt()],
        )
    resumed = _model(MirroredStrategy(), optimizer="sgd")
    resumed.fit(
        x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[backup]
    )
    for a, b in zip(reference.get_weights(), resumed.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
