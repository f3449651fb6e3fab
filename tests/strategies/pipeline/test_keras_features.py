"""PipelineStrategy with everyday Keras features, against training without one.

Each case trains the same model, seed and data twice, on 2 stages (the two
simulated CPUs of `tests/conftest.py`) and without any strategy, then
compares the per-epoch losses and metrics, the weights, the optimizer's
variables, `evaluate`, and `predict` against calling the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import tree

from tests import _models as models
from tests.strategies.pipeline._fitting import (
    assert_same_inference,
    assert_same_training,
    train,
)
from tfpar import PipelineStrategy

DEVICES = ["/device:CPU:0", "/device:CPU:1"]
# float32: the same ops, micro-batch gradients summed in another order.
RTOL, ATOL = 1e-5, 1e-6
# mixed_float16: activations and their gradients are float16 (unit roundoff
# 2**-11 = 4.9e-4) and are rounded per micro-batch, and TensorFlow fuses
# float16 ops differently on two devices, so results differ from the
# reference by about one float16 rounding (at most 1e-4 seen here, for
# losses and weights alike); 1e-3 allows two.
MIXED_RTOL, MIXED_ATOL = 1e-3, 1e-3
N, BATCH = 40, 10


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _x(shape: tuple[int, ...] = (6,)) -> np.ndarray:
    return _rng().normal(size=(N, *shape)).astype("float32")


def _y(width: int = 2) -> np.ndarray:
    return np.random.default_rng(1).normal(size=(N, width)).astype("float32")


def _labels(classes: int = 3) -> np.ndarray:
    return np.random.default_rng(1).integers(0, classes, size=(N,))


def mlp(outputs: int = 2) -> keras.Model:
    keras.utils.set_random_seed(7)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="tanh", name="d0"),
            keras.layers.Dense(8, activation="tanh", name="d1"),
            keras.layers.Dense(outputs, name="out"),
        ]
    )


def normalized_mlp() -> keras.Model:
    keras.utils.set_random_seed(7)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, name="d0"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.Activation("tanh"),
            keras.layers.Dropout(0.3, name="drop0"),
            keras.layers.Dense(8, activation="tanh", name="d1"),
            keras.layers.Dropout(0.3, name="drop1"),
            keras.layers.Dense(2, name="out"),
        ]
    )


def two_in_two_out() -> keras.Model:
    keras.utils.set_random_seed(7)
    a, b = keras.Input((6,), name="a"), keras.Input((4,), name="b")
    h = keras.layers.Concatenate(name="cat")(
        [keras.layers.Dense(8, name="da")(a), keras.layers.Dense(8, name="db")(b)]
    )
    h = keras.layers.Dense(8, activation="tanh", name="d1")(h)
    h = keras.layers.Dense(8, activation="tanh", name="d2")(h)
    outputs = {
        "value": keras.layers.Dense(2, name="value")(h),
        "flag": keras.layers.Dense(1, activation="sigmoid", name="flag")(h),
    }
    return keras.Model({"a": a, "b": b}, outputs)


def cnn() -> keras.Model:
    keras.utils.set_random_seed(7)
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c0"),
            keras.layers.MaxPooling2D(name="pool"),
            keras.layers.Conv2D(4, 3, activation="relu", name="c1"),
            keras.layers.GlobalAveragePooling2D(name="gap"),
            keras.layers.Dense(3, name="out"),
        ]
    )


def recurrent(mask_zero: bool) -> Callable[[], keras.Model]:
    def build() -> keras.Model:
        keras.utils.set_random_seed(7)
        return keras.Sequential(
            [
                keras.Input((7,), dtype="int32"),
                keras.layers.Embedding(20, 8, mask_zero=mask_zero, name="emb"),
                keras.layers.LSTM(8, name="lstm"),
                keras.layers.Dense(2, name="out"),
            ]
        )

    return build


def tokens() -> np.ndarray:
    ids = _rng().integers(1, 20, size=(N, 7))
    ids[::2, 5:] = 0  # padding, masked when mask_zero=True
    return ids


def adam(**kwargs: Any) -> Callable[[], dict[str, Any]]:
    return lambda: {"optimizer": keras.optimizers.Adam(0.01), "loss": "mse", **kwargs}


def sparse_ce(**kwargs: Any) -> Callable[[], dict[str, Any]]:
    return lambda: {
        "optimizer": keras.optimizers.Adam(0.01),
        "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        "metrics": ["accuracy"],
        **kwargs,
    }


@dataclasses.dataclass(frozen=True)
class Case:
    """One Keras feature: a model, how it is compiled and fed, and the cut.

    `accumulate`: the reference trains the micro-batches one by one with
    Keras's gradient accumulation (SGD, M steps per update) instead of whole
    batches: what batch statistics and per-micro-batch dropout masks equal.
    """

    build: Callable[[], keras.Model]
    compile: Callable[[], dict[str, Any]]
    data: Callable[[], dict[str, Any]]
    cut: str
    num_microbatches: int = 2
    schedule: str = "1f1b"
    policy: str = "float32"
    accumulate: bool = False
    warns: str | None = None
    check: Callable[[keras.Model], None] | None = None


CASES = {
    "tf_data": Case(
        mlp,
        adam(metrics=["mae"]),
        lambda: {"x": tf.data.Dataset.from_tensor_slices((_x(), _y())).batch(BATCH)},
        cut="d1",
    ),
    "dict_inputs_two_outputs_loss_weights": Case(
        two_in_two_out,
        lambda: {
            "optimizer": keras.optimizers.Adam(0.01),
            "loss": {"value": "mse", "flag": "binary_crossentropy"},
            "loss_weights": {"value": 1.0, "flag": 0.5},
            "metrics": {"value": ["mae"], "flag": ["accuracy"]},
        },
        lambda: {
            "x": {"a": _x(), "b": _x((4,))},
            "y": {"value": _y(), "flag": (_labels(2)[:, None]).astype("float32")},
        },
        cut="d2",
    ),
    "gradient_accumulation_steps": Case(
        mlp,
        lambda: {
            "optimizer": keras.optimizers.Adam(0.01, gradient_accumulation_steps=2),
            "loss": "mse",
        },
        lambda: {"x": _x(), "y": _y()},
        cut="d1",
    ),
    "sample_weight": Case(
        mlp,
        adam(weighted_metrics=["mae"]),
        lambda: {"x": _x(), "y": _y(), "sample_weight": _rng().uniform(size=(N,))},
        cut="d1",
        num_microbatches=3,  # micro-batches of 4, 3 and 3
    ),
    "class_weight": Case(
        lambda: mlp(3),
        sparse_ce(),
        lambda: {"x": _x(), "y": _labels(), "class_weight": {0: 1.0, 1: 2.0, 2: 0.5}},
        cut="d1",
    ),
    "steps_per_execution": Case(
        mlp, adam(steps_per_execution=2), lambda: {"x": _x(), "y": _y()}, cut="d1"
    ),
    "batch_normalization_dropout": Case(
        normalized_mlp,
        lambda: {"optimizer": keras.optimizers.SGD(0.05), "loss": "mse"},
        lambda: {"x": _x(), "y": _y()},
        cut="d1",
        accumulate=True,
        warns="BatchNormalization layer",
    ),
    "cnn": Case(
        cnn, sparse_ce(), lambda: {"x": _x((8, 8, 1)), "y": _labels()}, cut="c1"
    ),
    "embedding_lstm": Case(
        recurrent(mask_zero=False),
        adam(),
        lambda: {"x": tokens(), "y": _y()},
        cut="lstm",
    ),
    # The mask cannot cross a stage boundary: the cut falls after the LSTM.
    "embedding_lstm_masked": Case(
        recurrent(mask_zero=True), adam(), lambda: {"x": tokens(), "y": _y()}, cut="out"
    ),
    "mixed_float16": Case(
        mlp, adam(), lambda: {"x": _x(), "y": _y()}, cut="d1", policy="mixed_float16"
    ),
    "mixed_float16_gpipe": Case(
        mlp,
        adam(),
        lambda: {"x": _x(), "y": _y()},
        cut="d1",
        num_microbatches=4,  # 3, 3, 2 and 2: float16 sums of unequal parts
        schedule="gpipe",
        policy="mixed_float16",
    ),
    # The first steps overflow in float16: the loss scale halves and those
    # updates are skipped, on both sides alike.
    "mixed_float16_overflow": Case(
        mlp,
        lambda: {
            "optimizer": keras.optimizers.LossScaleOptimizer(
                keras.optimizers.Adam(0.01), initial_scale=2.0**22
            ),
            "loss": "mse",
        },
        lambda: {"x": _x(), "y": _y()},
        cut="d1",
        policy="mixed_float16",
        check=lambda model: np.testing.assert_array_less(
            model.optimizer.dynamic_scale, 2.0**22
        ),
    ),
}


def fit(case: Case, strategy: PipelineStrategy | None) -> tuple[keras.Model, dict]:
    data = case.data()
    kwargs = {} if isinstance(data["x"], tf.data.Dataset) else {"batch_size": BATCH}
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        model = case.build()
        settings = case.compile()
        if case.accumulate and strategy is None:
            m = case.num_microbatches
            optimizer = settings["optimizer"]
            settings["optimizer"] = type(optimizer).from_config(
                {**optimizer.get_config(), "gradient_accumulation_steps": m}
            )
            kwargs["batch_size"] = BATCH // m
        model.compile(**settings)
    history = model.fit(**data, **kwargs, epochs=2, shuffle=False, verbose=0)
    return model, history.history


def inference_data(case: Case) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """Keyword arguments of `evaluate` and `predict`, and the inputs as arrays."""
    data = {k: v for k, v in case.data().items() if k != "class_weight"}
    if isinstance(data["x"], tf.data.Dataset):
        inputs = np.concatenate([x for x, _ in data["x"].as_numpy_iterator()])
        return data, {"x": data["x"]}, inputs
    return (
        {**data, "batch_size": BATCH},
        {"x": data["x"], "batch_size": BATCH},
        data["x"],
    )


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_feature_trains_as_without_a_strategy(case: Case) -> None:
    rtol, atol = (
        (MIXED_RTOL, MIXED_ATOL) if case.policy == "mixed_float16" else (RTOL, ATOL)
    )
    strategy = PipelineStrategy(
        DEVICES,
        num_microbatches=case.num_microbatches,
        schedule=case.schedule,
        partition=[case.cut],
    )
    keras.mixed_precision.set_global_policy(case.policy)
    try:
        reference, expected = fit(case, None)
        if case.warns:
            with pytest.warns(UserWarning, match=case.warns):
                model, history = fit(case, strategy)
        else:
            model, history = fit(case, strategy)
        evaluate, predict, inputs = inference_data(case)
        scores = model.evaluate(**evaluate, verbose=0)
        expected_scores = reference.evaluate(**evaluate, verbose=0)
        predicted = model.predict(**predict, verbose=0)
        called = model(inputs, training=False)
    finally:
        keras.mixed_precision.set_global_policy("float32")

    assert history.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(history[key], expected[key], rtol, err_msg=key)
    assert history["loss"][-1] < history["loss"][0], history["loss"]
    for got, want in zip(model.weights, reference.weights, strict=True):
        np.testing.assert_allclose(got, want, rtol, atol, err_msg=got.path)
    if not case.accumulate:  # else the reference's optimizer is another one
        for got, want in zip(
            model.optimizer.variables, reference.optimizer.variables, strict=True
        ):
            np.testing.assert_allclose(got, want, rtol, atol, err_msg=got.path)
    np.testing.assert_allclose(scores, expected_scores, rtol, atol)
    tree.map_structure(
        lambda p, c: np.testing.assert_allclose(p, c, rtol, atol), predicted, called
    )
    if case.check is not None:
        case.check(model)


def _batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
    x, y = _x(), _y()
    for start in range(0, N, BATCH):
        yield x[start : start + BATCH], y[start : start + BATCH]


def _forever() -> Iterator[tuple[np.ndarray, np.ndarray]]:
    while True:
        yield from _batches()


class _Batches(keras.utils.PyDataset):
    """The data as a `keras.utils.PyDataset`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.x, self.y = _x(), _y()

    def __len__(self) -> int:
        return N // BATCH

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        part = slice(index * BATCH, (index + 1) * BATCH)
        return self.x[part], self.y[part]


@pytest.mark.parametrize(
    ("data", "fit_kwargs"),
    [
        (_batches, {}),
        (_forever, {"steps_per_epoch": 3}),
        (_Batches, {"shuffle": False}),
        (_Batches, {"shuffle": True}),
        (lambda: _Batches(workers=2), {"shuffle": False}),
        (lambda: _Batches(workers=2, use_multiprocessing=True), {"shuffle": True}),
    ],
    ids=[
        "generator",
        "generator_steps_per_epoch",
        "py_dataset",
        "py_dataset_fit_shuffles",
        "py_dataset_2_threads",
        "py_dataset_2_processes",
    ],
)
def test_data_read_once_trains_as_without_a_strategy(
    data: Callable[[], Any], fit_kwargs: dict[str, Any]
) -> None:
    # Keras's model build must not read a batch: that batch, or a draw of
    # Python's random, would be missing from training.
    runs = []
    for strategy in (PipelineStrategy(DEVICES, partition=["d1"]), None):
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            model = mlp()
            model.compile(**adam()())
        keras.utils.set_random_seed(2)  # shuffling draws from Python's random
        history = model.fit(data(), epochs=2, verbose=0, **fit_kwargs).history
        runs.append((history["loss"], model.get_weights()))
    (losses, weights), (expected_losses, expected_weights) = runs
    np.testing.assert_allclose(losses, expected_losses, RTOL)
    for got, want in zip(weights, expected_weights, strict=True):
        np.testing.assert_allclose(got, want, RTOL, ATOL)


class _Interrupt(keras.callbacks.Callback):
    """Stops training with an error in the middle of the second epoch."""

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.epoch == 1 and batch == 1:
            raise RuntimeError("interrupted")


def test_backup_and_restore_resumes_to_the_uninterrupted_weights(
    tmp_path: Path,
) -> None:
    reference, _ = fit(Case(mlp, adam(), lambda: {"x": _x(), "y": _y()}, "d1"), None)

    def resume(callbacks: list[keras.callbacks.Callback]) -> keras.Model:
        strategy = PipelineStrategy(DEVICES, num_microbatches=2, partition=["d1"])
        with strategy.scope():
            model = mlp()
            model.compile(**adam()())
        model.fit(
            _x(),
            _y(),
            batch_size=BATCH,
            epochs=2,
            shuffle=False,
            verbose=0,
            callbacks=callbacks,
        )
        return model

    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(RuntimeError, match="interrupted"):
        resume([backup, _Interrupt()])
    # A new process would build a new model and strategy: so does this.
    model = resume([keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))])
    for got, want in zip(model.weights, reference.weights, strict=True):
        np.testing.assert_allclose(got, want, RTOL, ATOL, err_msg=got.path)
    for got, want in zip(
        model.optimizer.variables, reference.optimizer.variables, strict=True
    ):
        np.testing.assert_allclose(got, want, RTOL, ATOL, err_msg=got.path)


class CustomStep(keras.Model):
    """A subclassed model with its own train_step: nothing to cut."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation="tanh")
        self.head = keras.layers.Dense(2)

    def call(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        return self.head(self.hidden(x))

    def train_step(self, data: Any) -> dict[str, Any]:
        x, y = data
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred)
        weights = self.trainable_weights
        self.optimizer.apply_gradients(
            zip(tape.gradient(loss, weights), weights, strict=True)
        )
        return self.compute_metrics(x, y, y_pred)


def test_subclassed_model_with_custom_train_step_runs_unsplit() -> None:
    # fit, then evaluate and predict (Keras's own steps, which a subclassed
    # model leaves nothing to cut for) all run unsplit, after one warning.
    def train(strategy: PipelineStrategy | None) -> tuple[keras.Model, dict]:
        with strategy.scope() if strategy else contextlib.nullcontext():
            keras.utils.set_random_seed(7)
            model = CustomStep()
            model.compile(**adam(metrics=["mae"])())
        history = model.fit(
            _x(), _y(), batch_size=BATCH, epochs=2, shuffle=False, verbose=0
        )
        return model, history.history

    reference, expected = train(None)
    with pytest.warns(UserWarning, match="'train_step' without pipelining"):
        model, history = train(PipelineStrategy(DEVICES, num_microbatches=2))
    for key in expected:
        np.testing.assert_allclose(history[key], expected[key], RTOL, err_msg=key)
    for got, want in zip(model.weights, reference.weights, strict=True):
        np.testing.assert_allclose(got, want, RTOL, ATOL)
    np.testing.assert_allclose(
        model.evaluate(_x(), _y(), batch_size=BATCH, verbose=0),
        reference.evaluate(_x(), _y(), batch_size=BATCH, verbose=0),
        RTOL,
    )
    np.testing.assert_allclose(
        model.predict(_x(), batch_size=BATCH, verbose=0), model(_x()), RTOL, ATOL
    )


def test_unsupported_models_are_refused_before_the_first_step() -> None:
    strategy = PipelineStrategy(DEVICES, num_microbatches=2, partition=["lstm"])
    with strategy.scope():
        model = recurrent(mask_zero=True)()
        model.compile(**adam()())
    with pytest.raises(ValueError, match=r"Keras mask.*partition=\['lstm'\]"):
        model.fit(tokens(), _y(), batch_size=BATCH, verbose=0)
    assert model.optimizer.iterations.numpy() == 0

    class Subclassed(CustomStep):
        train_step = keras.Model.train_step  # Keras's own: the pipeline's

    strategy = PipelineStrategy(DEVICES, num_microbatches=2)
    with strategy.scope():
        model = Subclassed()
        model.compile(**adam()())
    with pytest.raises(TypeError, match="subclassed model of type Subclassed"):
        model.fit(_x(), _y(), batch_size=BATCH, verbose=0)


def test_compile_outside_the_scope_behaves_as_under_the_stock_strategy() -> None:
    # The optimizer then holds the default strategy. The stock
    # MirroredStrategy trains such a model when the optimizer has no slots,
    # and refuses one with slots (Adam) when it creates them; so does the
    # pipeline, whose updates reach it through merge_call.
    x, y = _x(), _y()
    models = []
    for strategy in (None, PipelineStrategy(DEVICES, num_microbatches=2)):
        scope = strategy.scope() if strategy else contextlib.nullcontext()
        with scope:
            model = mlp()
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
        models.append(model)
    reference, model = models
    for got, want in zip(model.weights, reference.weights, strict=True):
        np.testing.assert_allclose(got, want, RTOL, ATOL, err_msg=got.path)
    for strategy in (
        tf.distribute.MirroredStrategy(DEVICES),
        PipelineStrategy(DEVICES, num_microbatches=2),
    ):
        with strategy.scope():
            model = mlp()
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        with pytest.raises(RuntimeError, match=r"Mixing different tf\.distribute"):
            model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)


@pytest.mark.parametrize(
    ("penalized", "partition", "schedule", "recompute"),
    [
        ("d1", ["d1"], "1f1b", False),  # on the last stage
        ("d0", ["d1"], "1f1b", False),  # before it
        ("d0", ["d1"], "1f1b", True),
        ("d1", ["out"], "gpipe", True),
        ("d2", ["d1", "d2", "out"], "interleaved", False),  # chunk 2 of 4
    ],
)
def test_a_loss_added_in_call_trains_on_any_stage(
    penalized: str, partition: list[str], schedule: str, recompute: bool
) -> None:
    # Each chunk's backward differentiates the losses its layers added for
    # that micro-batch, weighted by its share of the batch; `evaluate` adds
    # every micro-batch's, as Keras's loss over the whole batch does.
    build = functools.partial(
        models.mlp, penalized, activity_regularizer=keras.regularizers.L2(0.1)
    )
    reference = train(None, build, batch_size=BATCH, epochs=2)
    strategy = PipelineStrategy(
        DEVICES,
        num_microbatches=2,
        schedule=schedule,
        partition=partition,
        recompute=recompute,
    )
    model = train(strategy, build, batch_size=BATCH, epochs=2)
    assert_same_training(reference, model)
    assert_same_inference(model, reference, batch_size=BATCH)


@pytest.mark.parametrize(
    ("reduction", "weighted"),
    [("sum", False), ("sum", True), ("mean", False), ("mean_with_sample_weight", True)],
)
def test_each_loss_reduction_weighs_micro_batches_as_the_whole_batch(
    reduction: str, weighted: bool
) -> None:
    # Three uneven micro-batches (4, 3, 3) of a batch of 10: a summed loss
    # adds them, a mean weighs them by their examples, a mean over sample
    # weights by their weights (before 2026-12-06 every loss was weighted as
    # a mean, and reduction="sum" trained silently to other weights).
    x, y = _x(), _y()
    weights = np.linspace(0.2, 2.0, N).astype("float32") if weighted else None
    histories, models = [], []
    for strategy in (None, PipelineStrategy(DEVICES, num_microbatches=3)):
        with strategy.scope() if strategy else contextlib.nullcontext():
            model = mlp()
            model.compile(
                optimizer=keras.optimizers.SGD(0.01),
                loss=keras.losses.MeanSquaredError(reduction=reduction),
            )
        histories.append(
            model.fit(
                x,
                y,
                sample_weight=weights,
                batch_size=BATCH,
                epochs=2,
                shuffle=False,
                verbose=0,
            ).history["loss"]
        )
        models.append(model)
    np.testing.assert_allclose(histories[1], histories[0], rtol=1e-5)
    for got, want in zip(models[1].weights, models[0].weights, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=got.path)


@pytest.mark.parametrize(
    ("losses", "match"),
    [
        (
            keras.losses.MeanSquaredError(reduction=None),
            r"\('mean_squared_error', None\)",
        ),
        (
            {"a": keras.losses.MeanSquaredError(reduction="sum"), "b": "mse"},
            "must be the same for every compiled loss",
        ),
    ],
    ids=["unreduced", "mixed"],
)
def test_a_loss_the_micro_batches_cannot_weigh_is_refused_by_name(
    losses: object, match: str
) -> None:
    strategy = PipelineStrategy(DEVICES, num_microbatches=2, partition=["d1"])
    with strategy.scope():
        inputs = keras.Input((6,))
        h = keras.layers.Dense(8, name="d0")(inputs)
        h = keras.layers.Dense(8, name="d1")(h)
        outputs = {
            "a": keras.layers.Dense(2, name="a")(h),
            "b": keras.layers.Dense(2, name="b")(h),
        }
        model = keras.Model(
            inputs, outputs if isinstance(losses, dict) else outputs["a"]
        )
        model.compile(optimizer="sgd", loss=losses)
    y = {"a": _y(), "b": _y()} if isinstance(losses, dict) else _y()
    with pytest.raises(ValueError, match=match):
        model.fit(_x(), y, batch_size=BATCH, epochs=1, verbose=0)
