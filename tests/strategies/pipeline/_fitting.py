"""Fitting a model with and without a `PipelineStrategy`, and comparing them.

Shared by the pipeline's tests: the same data, the same compile, and the
tolerances of float32 results that differ only in summation order.
"""

import contextlib
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

DEVICES = ["/device:CPU:0", "/device:CPU:1"]
# Same ops in a different summation order (micro-batch gradients are summed
# per stage): float32 rounding only.
RTOL, ATOL = 1e-5, 1e-6


def data(n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """`n` rows of 6 normal features and 2 normal targets, seed 0."""
    rng = np.random.default_rng(0)
    return (
        rng.normal(size=(n, 6)).astype("float32"),
        rng.normal(size=(n, 2)).astype("float32"),
    )


def train(
    strategy: tf.distribute.Strategy | None,
    build: Callable[[], keras.Model],
    **fit: int,
) -> keras.Model:
    """Builds and compiles (Adam, MSE, MAE) under `strategy`, fits on `data()`.

    The `fit` history is kept as `model.history_`.
    """
    x, y = data()
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        model = build()
        model.compile(
            optimizer=keras.optimizers.Adam(0.01), loss="mse", metrics=["mae"]
        )
    model.history_ = model.fit(x, y, shuffle=False, verbose=0, **fit)
    return model


def assert_same_weights(a: keras.Model, b: keras.Model) -> None:
    """Asserts equal weights up to float32 rounding."""
    for wa, wb in zip(a.weights, b.weights, strict=True):
        np.testing.assert_allclose(
            wa.numpy(), wb.numpy(), rtol=RTOL, atol=ATOL, err_msg=wa.path
        )


def assert_same_training(reference: keras.Model, model: keras.Model) -> None:
    """Asserts equal weights and `fit` histories (loss and metrics)."""
    assert_same_weights(reference, model)
    for key, expected in reference.history_.history.items():
        np.testing.assert_allclose(
            model.history_.history[key], expected, rtol=RTOL, err_msg=key
        )


def assert_same_inference(
    model: keras.Model, reference: keras.Model, batch_size: int
) -> None:
    """Asserts that `evaluate` and `predict` on `data()` agree."""
    x, y = data()
    np.testing.assert_allclose(
        model.evaluate(x, y, batch_size=batch_size, verbose=0),
        reference.evaluate(x, y, batch_size=batch_size, verbose=0),
        rtol=RTOL,
    )
    np.testing.assert_allclose(
        model.predict(x, batch_size=batch_size, verbose=0),
        reference.predict(x, batch_size=batch_size, verbose=0),
        rtol=RTOL,
        atol=ATOL,
    )
