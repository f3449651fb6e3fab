"""`PipelineStrategy(on_nonfinite=...)`: one verdict per step for every stage.

The model's first stage takes `sqrt(|h|)` of its first layer's output, whose
gradient is infinite at 0: a batch of zeros (with the initial zero biases)
makes stage 0's weight gradients NaN while stage 1's stay finite, so the
step's verdict must come from a stage other than the one it also skips.
"""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.strategies.pipeline._fitting import DEVICES, assert_same_weights, data
from tfpar import PipelineStrategy


def rooted() -> keras.Model:
    keras.utils.set_random_seed(7)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, name="d0"),
            keras.layers.Lambda(
                lambda h: keras.ops.sqrt(keras.ops.abs(h)), name="root"
            ),
            keras.layers.Dense(8, activation="tanh", name="d1"),
            keras.layers.Dense(2, name="out"),
        ]
    )


def zeros_first() -> tuple[np.ndarray, np.ndarray]:
    x, y = data()
    x[:10] = 0.0  # the first batch of 10: stage 0's gradients are NaN
    return x, y


def fit(strategy: PipelineStrategy | None, x: np.ndarray, y: np.ndarray) -> keras.Model:
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        model = rooted()
        # Plain SGD: a skipped step (zero gradients) changes no weight.
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    model.fit(x, y, batch_size=10, shuffle=False, verbose=0)
    return model


def test_the_first_batch_makes_only_stage_0_nonfinite() -> None:
    # The premise of the tests below, measured without a strategy.
    x, y = zeros_first()
    model = rooted()
    with tf.GradientTape() as tape:
        loss = keras.ops.mean((model(x[:10]) - y[:10]) ** 2)
    grads = tape.gradient(loss, model.trainable_weights)
    finite = {
        "/".join(w.path.split("/")[-2:]): bool(np.isfinite(g).all())
        for w, g in zip(model.trainable_weights, grads, strict=True)
    }
    assert not finite["d0/kernel"], finite
    assert all(ok for path, ok in finite.items() if not path.startswith("d0/")), finite


def test_skip_leaves_every_stage_unchanged_by_that_step() -> None:
    x, y = zeros_first()
    strategy = PipelineStrategy(
        DEVICES, num_microbatches=2, partition=["d1"], on_nonfinite="skip"
    )
    model = fit(strategy, x, y)
    assert strategy.skipped_steps() == 1
    # The reference never saw the first batch: stage 1 (finite gradients)
    # skipped it too.
    assert_same_weights(fit(None, x[10:], y[10:]), model)


def test_raise_stops_fit_naming_the_stage() -> None:
    x, y = zeros_first()
    strategy = PipelineStrategy(
        DEVICES, num_microbatches=2, partition=["d1"], on_nonfinite="raise"
    )
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="on_nonfinite=raise"
    ) as info:
        fit(strategy, x, y)
    culprits = str(info.value).split("NaN or Inf on:")[1].split("\n")[0]
    assert "CPU:0" in culprits and "CPU:1" not in culprits, culprits
    # The strategy stays usable: finite batches train.
    model = fit(strategy, x[10:], y[10:])
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_a_loss_scale_optimizer_is_refused_by_name() -> None:
    strategy = PipelineStrategy(DEVICES, partition=["d1"], on_nonfinite="skip")
    with strategy.scope():
        model = rooted()
        model.compile(
            optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()),
            loss="mse",
        )
    x, y = data()
    with pytest.raises(ValueError, match=r"on_nonfinite='skip'.*LossScaleOptimizer"):
        model.fit(x, y, batch_size=10, verbose=0)
