"""Cuts anywhere under real `fit`: several tensors crossing a stage boundary.

A cut inside a residual block, a second input and an early output carried
across a cut, integer token ids passed on, a tensor skipping over a middle
stage (three stages, in a child process): the weights after `fit` match
training without a strategy, and the bytes each stage sent match the
shapes of what crosses (activations forward, gradients of the
floating-point ones back, every example once per cut).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import pytest

from tests._subprocess import run_python, tagged_json
from tfpar import PipelineStrategy
from tfpar.strategies.pipeline.partition import partition_model

DEVICES = ["/device:CPU:0", "/device:CPU:1"]
# Same ops in a different summation order (micro-batch gradients are summed
# per stage): float32 rounding only.
RTOL, ATOL = 1e-5, 1e-6
# 4 steps of batch 10, in micro-batches of 3, 3, 2 and 2 examples.
N, BATCH, M = 40, 10, 4
SCHEDULES = ["gpipe", "1f1b"]


def residual() -> keras.Model:
    """`d0` skips over `branch` to the Add: cut before `add`, both cross."""
    keras.utils.set_random_seed(7)
    inputs = keras.Input((6,), name="x")
    h = keras.layers.Dense(8, activation="tanh", name="d0")(inputs)
    branch = keras.layers.Dense(8, activation="tanh", name="branch")(h)
    h = keras.layers.Add(name="add")([h, branch])
    h = keras.layers.Dense(8, activation="tanh", name="d1")(h)
    return keras.Model(inputs, keras.layers.Dense(2, name="out")(h))


def block() -> keras.Model:
    """A residual block holding nearly all the work, `b2` and `b3` alike.

    The balanced cuts lie inside the block; the single-tensor cuts (before
    `b1`, before `out`) leave both heavy layers on one stage.
    """
    keras.utils.set_random_seed(7)
    inputs = keras.Input((6,), name="x")
    d0 = keras.layers.Dense(8, activation="tanh", name="d0")(inputs)
    h = keras.layers.Dense(256, activation="tanh", name="b1")(d0)
    h = keras.layers.Dense(256, activation="tanh", name="b2")(h)
    h = keras.layers.Dense(256, activation="tanh", name="b3")(h)
    h = keras.layers.Dense(8, name="b4")(h)
    h = keras.layers.Add(name="add")([d0, h])
    return keras.Model(inputs, keras.layers.Dense(2, name="out")(h))


def two_in_two_out() -> keras.Model:
    """`x2` is first used after `cat`'s cut, `aux` (an output) before it."""
    keras.utils.set_random_seed(7)
    x1, x2 = keras.Input((6,), name="x1"), keras.Input((3,), name="x2")
    h = keras.layers.Dense(8, activation="tanh", name="h")(x1)
    aux = keras.layers.Dense(1, name="aux")(h)
    g = keras.layers.Dense(4, activation="tanh", name="g")(h)
    main = keras.layers.Dense(2, name="main")(
        keras.layers.Concatenate(name="cat")([g, aux, x2])
    )
    return keras.Model({"x1": x1, "x2": x2}, {"main": main, "aux": aux})


def with_token_ids() -> keras.Model:
    """Integer ids embedded after the cut before `emb`: they cross as int32."""
    keras.utils.set_random_seed(7)
    x, ids = keras.Input((6,), name="x"), keras.Input((3,), dtype="int32", name="ids")
    h = keras.layers.Dense(8, activation="tanh", name="d0")(x)
    h = keras.layers.Dense(8, activation="tanh", name="d1")(h)
    e = keras.layers.Flatten(name="flat")(
        keras.layers.Embedding(10, 2, name="emb")(ids)
    )
    h = keras.layers.Concatenate(name="cat")([h, e])
    return keras.Model([x, ids], keras.layers.Dense(2, name="out")(h))


def data(build: Callable[[], keras.Model]) -> tuple[Any, Any]:
    """Inputs and targets of `N` examples for the model `build` makes."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 6)).astype("float32")
    y = rng.normal(size=(N, 2)).astype("float32")
    if build is two_in_two_out:
        x2 = rng.normal(size=(N, 3)).astype("float32")
        aux = rng.normal(size=(N, 1)).astype("float32")
        return {"x1": x, "x2": x2}, {"main": y, "aux": aux}
    if build is with_token_ids:
        return [x, rng.integers(0, 10, size=(N, 3)).astype("int32")], y
    return x, y


def train(
    strategy: PipelineStrategy | None, build: Callable[[], keras.Model]
) -> keras.Model:
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        model = build()
        loss = {"main": "mse", "aux": "mse"} if build is two_in_two_out else "mse"
        # Adam divides by the gradients' root mean square, which magnifies the
        # rounding of the wide block's near-zero gradients beyond RTOL.
        optimizer = (
            keras.optimizers.SGD(0.05)
            if build is block
            else keras.optimizers.Adam(0.01)
        )
        model.compile(optimizer=optimizer, loss=loss)
    x, y = data(build)
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    return model


@functools.cache
def reference(build: Callable[[], keras.Model]) -> keras.Model:
    """The model `build` makes, trained without a strategy (once per module)."""
    return train(None, build)


def assert_same_weights(a: keras.Model, b: keras.Model) -> None:
    for wa, wb in zip(a.weights, b.weights, strict=True):
        np.testing.assert_allclose(
            wa.numpy(), wb.numpy(), rtol=RTOL, atol=ATOL, err_msg=wa.path
        )


def bytes_sent(strategy: PipelineStrategy) -> list[int]:
    return [d.bytes_sent for d in strategy.communication_stats().devices]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_cut_inside_a_residual_block(schedule: str) -> None:
    strategy = PipelineStrategy(
        DEVICES, num_microbatches=M, schedule=schedule, partition=["add"]
    )
    model = train(strategy, residual)
    assert_same_weights(reference(residual), model)
    table = strategy.partition_model(model)
    assert table.stages[1].receives == ("d0", "branch")
    assert table.stages[1].bytes_per_example == 2 * 8 * 4
    # Both 8-wide float32 tensors forward, both gradients back.
    assert bytes_sent(strategy) == [N * 2 * 8 * 4, N * 2 * 8 * 4]


def test_auto_cuts_inside_a_block_when_that_balances() -> None:
    # Measured, a cut inside the block balances far better than a
    # single-tensor cut. With recompute, backward passes replay the forward
    # of a stage that receives two tensors.
    strategy = PipelineStrategy(
        DEVICES, num_microbatches=M, schedule="1f1b", recompute=True
    )
    model = train(strategy, block)
    table = strategy.partition_model(model)
    assert table.cost_source == "measured"
    # Timing such small layers varies by tens of percent on a busy machine:
    # the cut may move within the block (before b3 by counted FLOPs), but
    # the skip connection crosses beside the block's activation.
    assert table.cut_points[0] in ("b2", "b3", "b4"), table
    receives = table.stages[1].receives
    assert len(receives) == 2 and receives[0] == "d0", table
    assert_same_weights(reference(block), model)
    # Both float32 tensors forward and their gradients back.
    assert bytes_sent(strategy) == [N * table.stages[1].bytes_per_example] * 2


def test_flops_cuts_the_block_between_its_heavy_layers() -> None:
    table, _ = partition_model(block(), DEVICES, "flops")
    assert table.cut_points == ["b3"]
    assert table.stages[1].receives == ("d0", "b2")
    assert table.stages[1].bytes_per_example == (8 + 256) * 4


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_second_input_and_early_output_cross_the_cut(schedule: str) -> None:
    strategy = PipelineStrategy(
        DEVICES, num_microbatches=M, schedule=schedule, partition=["cat"]
    )
    model = train(strategy, two_in_two_out)
    expected = reference(two_in_two_out)
    assert_same_weights(expected, model)
    assert strategy.partition_model(model).stages[1].receives == ("x2", "aux", "g")
    # x2 (3 wide), aux (1) and g (4) forward, their gradients back (the
    # input's too: the engine sends a gradient for every float tensor).
    assert bytes_sent(strategy) == [N * 8 * 4, N * 8 * 4]
    x, _ = data(two_in_two_out)
    got = model.predict(x, batch_size=BATCH, verbose=0)
    want = expected.predict(x, batch_size=BATCH, verbose=0)
    assert set(got) == {"main", "aux"}
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("schedule", "recompute"), [("gpipe", False), ("1f1b", True)])
def test_integer_ids_cross_without_a_gradient(schedule: str, recompute: bool) -> None:
    strategy = PipelineStrategy(
        DEVICES,
        num_microbatches=M,
        schedule=schedule,
        partition=["emb"],
        recompute=recompute,
    )
    model = train(strategy, with_token_ids)
    assert_same_weights(reference(with_token_ids), model)
    assert strategy.partition_model(model).stages[1].receives == ("ids", "d0")
    # Forward: 3 int32 ids and 8 floats; back: the floats' gradient only.
    assert bytes_sent(strategy) == [N * (3 + 8) * 4, N * 8 * 4]


def test_a_tensor_skips_over_the_middle_stage() -> None:
    # Three stages need three devices: a child process (tests/conftest.py
    # simulates two). `a` is computed in stage 0 and added in stage 2, so
    # stage 1 receives it and passes it on.
    proc = run_python(
        f"""
        import contextlib
        import json
        import tfpar
        tfpar.simulate_devices(3)
        import keras, numpy as np

        def build():
            keras.utils.set_random_seed(7)
            inputs = keras.Input((6,))
            a = keras.layers.Dense(8, activation="tanh", name="a")(inputs)
            b = keras.layers.Dense(5, activation="tanh", name="b")(a)
            c = keras.layers.Dense(8, activation="tanh", name="c")(b)
            h = keras.layers.Add(name="add")([a, c])
            return keras.Model(inputs, keras.layers.Dense(2, name="out")(h))

        rng = np.random.default_rng(0)
        x = rng.normal(size=({N}, 6)).astype("float32")
        y = rng.normal(size=({N}, 2)).astype("float32")

        def train(strategy):
            with strategy.scope() if strategy else contextlib.nullcontext():
                model = build()
                model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
            model.fit(x, y, batch_size={BATCH}, shuffle=False, verbose=0)
            return model

        reference = train(None)
        results = {{}}
        for schedule in {SCHEDULES!r}:
            strategy = tfpar.PipelineStrategy(
                ["/device:CPU:0", "/device:CPU:1", "/device:CPU:2"],
                num_microbatches={M},
                schedule=schedule,
                partition=["b", "c"],
            )
            model = train(strategy)
            for wa, wb in zip(reference.weights, model.weights, strict=True):
                np.testing.assert_allclose(
                    wa.numpy(), wb.numpy(), rtol={RTOL}, atol={ATOL}, err_msg=wa.path
                )
            results[schedule] = {{
                "receives": [s.receives for s in strategy.partition_model(model).stages],
                "sent": [d.bytes_sent for d in strategy.communication_stats().devices],
            }}
        print("RESULTS " + json.dumps(results))
        """,
        timeout=300,
    )
    results = tagged_json(proc.stdout, "RESULTS")
    for schedule in SCHEDULES:
        assert results[schedule]["receives"] == [[], ["a"], ["a", "b"]]
        # Stage 0 sends a (8 wide); stage 1 sends a and b (8 + 5) forward
        # and a's gradient back; stage 2 sends the gradients of a and b.
        assert results[schedule]["sent"] == [
            N * 8 * 4,
            N * (8 + 5 + 8) * 4,
            N * (8 + 5) * 4,
        ], schedule
