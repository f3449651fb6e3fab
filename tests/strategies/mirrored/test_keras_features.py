"""Keras features under tfpar's mirrored strategies, against no strategy at all.

Each test trains the same model from the same weights on the same data, once
without any strategy and once under the strategy, and compares per-epoch
losses and final weights: `steps_per_execution`, and data that Keras reads
once (Python generators, `keras.utils.PyDataset`). The in-process tests run
on the two simulated CPUs of `tests/conftest.py`; the multi-worker test
starts two worker processes.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests._subprocess import run_workers, tagged_json
from tfpar import MirroredStrategy

DEVICES = ["/device:CPU:0", "/device:CPU:1"]
# Two replicas each average half the batch: only rounding differs.
RTOL, ATOL = 1e-5, 1e-6

_RNG = np.random.default_rng(0)
X = _RNG.normal(size=(128, 8)).astype("float32")
Y = (X @ _RNG.normal(size=(8, 1)) + 0.1).astype("float32")


def _layers() -> list[keras.layers.Layer]:
    return [
        keras.Input((8,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(1),
    ]


keras.utils.set_random_seed(1)
_INIT = keras.Sequential(_layers()).get_weights()


def _adam() -> keras.optimizers.Optimizer:
    return keras.optimizers.Adam(0.01)


def _model(
    strategy: tf.distribute.Strategy | None,
    *,
    steps_per_execution: int = 1,
    optimizer: Callable[[], keras.optimizers.Optimizer] = _adam,
) -> keras.Model:
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        model = keras.Sequential(_layers())
        model.compile(
            optimizer=optimizer(),
            loss="mse",
            metrics=["mae"],
            steps_per_execution=steps_per_execution,
        )
    # Same initial weights everywhere, whatever each scope did to the RNG.
    model.set_weights([w.copy() for w in _INIT])
    return model


def _assert_same_training(
    reference: tuple[dict[str, list[float]], list[np.ndarray]],
    ours: tuple[dict[str, list[float]], list[np.ndarray]],
) -> None:
    (history, weights), (our_history, our_weights) = reference, ours
    assert sorted(our_history) == sorted(history)
    for key, losses in history.items():
        np.testing.assert_allclose(our_history[key], losses, rtol=RTOL, err_msg=key)
    for a, b in zip(weights, our_weights, strict=True):
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL)


def _fit(
    strategy: tf.distribute.Strategy | None,
    data: Callable[[], tuple[Any, ...]],
    *,
    steps_per_execution: int = 1,
    optimizer: Callable[[], keras.optimizers.Optimizer] | None = None,
    **fit_kwargs: Any,
) -> tuple[dict[str, list[float]], list[np.ndarray]]:
    model = _model(
        strategy,
        steps_per_execution=steps_per_execution,
        optimizer=optimizer or _adam,
    )
    keras.utils.set_random_seed(2)  # shuffling draws from Python's random
    history = model.fit(*data(), epochs=2, verbose=0, **fit_kwargs).history
    return history, model.get_weights()


# --- steps_per_execution ---------------------------------------------------


@pytest.mark.parametrize(
    "optimizer",
    [_adam, lambda: keras.optimizers.SGD(0.05, gradient_accumulation_steps=2)],
    ids=["adam", "accumulating"],
)
def test_steps_per_execution_trains_as_without_a_strategy(
    optimizer: Callable[[], keras.optimizers.Optimizer],
) -> None:
    # 70 samples in batches of 16: 5 steps, 4 then 1 per execution, and a
    # last batch of 6 split 3 + 3.
    def data() -> tuple[Any, ...]:
        return (X[:70], Y[:70])

    kwargs = dict(
        batch_size=16,
        shuffle=False,
        validation_data=(X[70:], Y[70:]),
        steps_per_execution=4,
        optimizer=optimizer,
    )
    reference = _fit(None, data, **kwargs)  # type: ignore[arg-type]
    ours = _fit(MirroredStrategy(), data, **kwargs)  # type: ignore[arg-type]
    _assert_same_training(reference, ours)


def test_evaluate_and_predict_with_steps_per_execution() -> None:
    single = _model(None, steps_per_execution=4)
    ours = _model(MirroredStrategy(), steps_per_execution=4)
    # 5 batches of 16 and one of 8: 4 then 2 per execution.
    x, y = X[:88], Y[:88]
    np.testing.assert_allclose(
        ours.evaluate(x, y, batch_size=16, verbose=0),
        single.evaluate(x, y, batch_size=16, verbose=0),
        rtol=RTOL,
    )
    np.testing.assert_allclose(
        ours.predict(x, batch_size=16, verbose=0),
        single.predict(x, batch_size=16, verbose=0),
        rtol=RTOL,
        atol=ATOL,
    )


def test_stock_strategy_fails_with_steps_per_execution() -> None:
    # Pins why tfpar keys these collectives itself: when this starts to
    # pass, TensorFlow feeds call-time captures inside control flow.
    model = _model(tf.distribute.MirroredStrategy(DEVICES), steps_per_execution=4)
    with pytest.raises(tf.errors.InvalidArgumentError, match="Placeholder"):
        model.fit(X[:64], Y[:64], batch_size=16, verbose=0)


# --- Data that Keras reads once ---------------------------------------------


def _batches(size: int = 16) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every batch of the data, once."""
    for start in range(0, len(X), size):
        yield X[start : start + size], Y[start : start + size]


def _forever() -> Iterator[tuple[np.ndarray, np.ndarray]]:
    while True:
        yield from _batches()


class _Batches(keras.utils.PyDataset):
    """The data as a `keras.utils.PyDataset`, shuffled at each epoch's end if asked."""

    def __init__(self, *, reshuffle: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reshuffle = reshuffle
        self.order = list(range(len(X) // 16))

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        start = self.order[index] * 16
        return X[start : start + 16], Y[start : start + 16]

    def on_epoch_end(self) -> None:
        if self.reshuffle:
            random.shuffle(self.order)


@pytest.mark.parametrize(
    ("data", "fit_kwargs"),
    [
        (lambda: (_batches(),), {}),
        (lambda: (_forever(),), {"steps_per_epoch": 5}),
        (lambda: (_Batches(),), {"shuffle": False}),
        (lambda: (_Batches(),), {"shuffle": True}),
        (lambda: (_Batches(reshuffle=True),), {"shuffle": False}),
        (lambda: (_Batches(workers=2),), {"shuffle": False}),
        (lambda: (_Batches(workers=2, use_multiprocessing=True),), {"shuffle": True}),
    ],
    ids=[
        "generator",
        "generator_steps_per_epoch",
        "py_dataset",
        "py_dataset_fit_shuffles",
        "py_dataset_shuffles_itself",
        "py_dataset_2_threads",
        "py_dataset_2_processes",
    ],
)
def test_data_read_once_trains_as_without_a_strategy(
    data: Callable[[], tuple[Any, ...]], fit_kwargs: dict[str, Any]
) -> None:
    # Under the strategy first: training must leave the data as it was.
    ours = _fit(MirroredStrategy(), data, **fit_kwargs)
    reference = _fit(None, data, **fit_kwargs)
    _assert_same_training(reference, ours)


def test_evaluate_on_a_generator_as_without_a_strategy() -> None:
    single = _model(None)
    ours = _model(MirroredStrategy())
    # Keras's build under a strategy used to take the first batches.
    np.testing.assert_allclose(
        ours.evaluate(_batches(), verbose=0),
        single.evaluate(_batches(), verbose=0),
        rtol=RTOL,
    )


def test_stock_strategy_skips_batches_of_a_generator() -> None:
    # Pins why tfpar hands Keras's model build shapes only: when this starts
    # to fail, Keras no longer reads a batch to build the model.
    reference, _ = _fit(None, lambda: (_batches(),))
    stock, _ = _fit(tf.distribute.MirroredStrategy(DEVICES), lambda: (_batches(),))
    assert not np.allclose(stock["loss"][0], reference["loss"][0], rtol=1e-3)


def _aligned(array: np.ndarray) -> np.ndarray:
    """A copy of `array` starting on a 64-byte boundary.

    TensorFlow takes a NumPy array's memory without copying only when it is
    so aligned; NumPy aligns on 16 bytes, so otherwise only some runs would.
    """
    buffer = np.empty(array.nbytes + 64, np.uint8)
    start = -buffer.ctypes.data % 64
    copy = buffer[start : start + array.nbytes].view(array.dtype)
    copy = copy.reshape(array.shape)
    copy[...] = array
    return copy


class SharesMemory(keras.Sequential):
    """Records, for each replica's step run eagerly, whether its data is `data`'s."""

    data: tuple[np.ndarray, ...] = ()
    shared: list[bool] = []

    def train_step(self, data: tuple[tf.Tensor, tf.Tensor]) -> Any:
        SharesMemory.shared.append(
            any(
                np.shares_memory(np.asarray(t), a)
                for t, a in zip(data, SharesMemory.data, strict=True)
            )
        )
        return super().train_step(data)


def _steps_sharing_memory(
    strategy: tf.distribute.Strategy,
) -> tuple[list[bool], np.ndarray]:
    """Which steps saw the memory of the arrays fed; the targets afterwards."""
    x, y = _aligned(X), _aligned(Y)
    with strategy.scope():
        model = SharesMemory(_layers())
        model.compile(optimizer="sgd", loss="mse", run_eagerly=True)
    SharesMemory.data, SharesMemory.shared = (x, y), []
    batches = ((x[i : i + 16], y[i : i + 16]) for i in range(0, len(x), 16))
    model.fit(batches, epochs=1, verbose=0)
    return SharesMemory.shared, y


def test_training_cannot_write_into_the_arrays_a_generator_yields() -> None:
    # Replicas' tensors sharing the targets' memory let `y_true - y_pred`
    # overwrite them; the next epoch trained on other data.
    shared, targets = _steps_sharing_memory(MirroredStrategy())
    assert len(shared) == 2 * len(X) // 16 and not any(shared)
    np.testing.assert_array_equal(targets, Y)


def test_stock_strategy_trains_on_the_arrays_a_generator_yields() -> None:
    # Pins why tfpar copies Python's batches: when this starts to fail,
    # TensorFlow no longer hands the replicas the generator's own memory.
    # No collectives: other stock strategies of this process share their keys.
    stock = tf.distribute.MirroredStrategy(
        DEVICES, cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
    shared, _ = _steps_sharing_memory(stock)
    assert shared and all(shared)


def test_a_dataset_distributed_for_a_custom_loop_is_the_stock_one() -> None:
    strategy = MirroredStrategy()
    dataset = tf.data.Dataset.from_tensor_slices((X, Y)).batch(16)
    distributed = strategy.experimental_distribute_dataset(dataset)
    assert type(distributed).__name__ != "ShapesForKerasBuild"
    first = next(iter(distributed))
    assert [v.shape for v in strategy.experimental_local_results(first[0])] == [
        (8, 8),
        (8, 8),
    ]


# --- Across worker processes ------------------------------------------------

WORKERS = """
import json, numpy as np, tfpar
strategy = tfpar.MultiWorkerMirroredStrategy()
import keras, tensorflow as tf

rng = np.random.default_rng(0)
x = rng.normal(size=(256, 8)).astype("float32")
y = (x @ rng.normal(size=(8, 1)) + 0.1).astype("float32")
keras.utils.set_random_seed(1)
layers = lambda: [keras.Input((8,)), keras.layers.Dense(16, activation="tanh"),
                  keras.layers.Dense(1)]
init = keras.Sequential(layers()).get_weights()

def build(steps_per_execution):
    model = keras.Sequential(layers())
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse",
                  steps_per_execution=steps_per_execution)
    model.set_weights(init)
    return model

def forever():
    while True:
        for start in range(0, 256, 32):
            yield x[start:start + 32], y[start:start + 32]

cases = {
    # 9 steps of 32: 4, 4 and 1 per execution.
    "steps_per_execution": (4, lambda: (x[:288], y[:288]), {"batch_size": 32}),
    "generator": (1, lambda: (forever(),), {"steps_per_epoch": 5}),
}
results = {}
for name, (steps_per_execution, data, kwargs) in cases.items():
    reference = build(steps_per_execution)
    expected = reference.fit(*data(), epochs=2, shuffle=False, verbose=0, **kwargs)
    with strategy.scope():
        model = build(steps_per_execution)
    history = model.fit(*data(), epochs=2, shuffle=False, verbose=0, **kwargs)
    results[name] = {
        "loss": history.history["loss"],
        "expected": expected.history["loss"],
        "diff": max(float(np.abs(a - b).max())
                    for a, b in zip(model.get_weights(), reference.get_weights())),
    }
    if steps_per_execution > 1:
        results["eval"] = [model.evaluate(x, y, batch_size=32, verbose=0),
                           reference.evaluate(x, y, batch_size=32, verbose=0)]
print("RESULTS " + json.dumps(results), flush=True)
"""


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_two_workers_train_as_one_process_without_a_strategy() -> None:
    first, second = (tagged_json(p.stdout, "RESULTS") for p in run_workers(WORKERS, 2))
    assert first == second  # both workers applied the same updates
    for name in ("steps_per_execution", "generator"):
        result = first[name]
        np.testing.assert_allclose(result["loss"], result["expected"], rtol=RTOL)
        assert result["diff"] < 1e-5, (name, result["diff"])
    np.testing.assert_allclose(*first["eval"], rtol=RTOL)
