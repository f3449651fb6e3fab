"""The Keras features of the compatibility matrix: one small training run each.

Each feature trains a small seeded model under the strategy as a user would
write it, and returns a `Run`: the per-epoch losses, the same training without
any strategy (for synchronous strategies, whose losses must match it), and
checks of its own (resumed epochs, loaded weights, predictions). A feature
runs in whichever process holds the strategy: the test process for the
mirrored and pipeline strategies, the coordinator or a worker subprocess for
the others (`tests/compatibility/group.py`), so nothing here may depend on
pytest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

EXAMPLES = 256
BATCH = 32
EPOCHS = 2


@dataclasses.dataclass
class Context:
    """Where a feature runs: the strategy, and a folder of its own for files."""

    strategy: tf.distribute.Strategy
    synchronous: bool
    workdir: str


@dataclasses.dataclass
class Run:
    """What a feature observed: losses, the reference's, and its own checks."""

    losses: list[float]
    reference: list[float] | None = None
    checks: dict[str, str | None] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Feature:
    """One row of the matrix.

    `keyword` must appear in a refusal's message (with the strategy's class
    name). `rtol` bounds the losses' distance from training without a
    strategy; `why_rtol` says why a feature needs more than float rounding.
    """

    name: str
    title: str
    keyword: str
    run: Callable[[Context], Run]
    rtol: float = 1e-4
    why_rtol: str = ""


class Interrupted(Exception):
    """Raised by `InterruptAt` to stop a fit as a crash would."""


class InterruptAt(keras.callbacks.Callback):
    """Stops training with `Interrupted` when epoch `epoch` begins."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        if epoch == self.epoch:
            raise Interrupted(f"interrupted at epoch {epoch}")


class _Progress(keras.callbacks.Callback):
    """Counts the batches a fit finished and the epochs it began."""

    def __init__(self) -> None:
        super().__init__()
        self.batches = 0
        self.epochs: list[int] = []

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.epochs.append(epoch)

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.batches += 1


def fit(model: keras.Model, *args: Any, **kwargs: Any) -> tuple[Any, list[int]]:
    """`model.fit`, quiet; returns the history and the epochs it ran.

    An error leaving `fit` carries `batches_before_error`, the number of
    training steps that had finished: a refusal must come before the first
    (while the step is traced at the latest).
    """
    progress = _Progress()
    kwargs["callbacks"] = [*kwargs.get("callbacks", []), progress]
    kwargs.setdefault("shuffle", False)
    try:
        history = model.fit(*args, verbose=0, **kwargs)
    except Exception as error:
        error.batches_before_error = progress.batches  # type: ignore[attr-defined]
        raise
    return history, progress.epochs


# Data: seeded, identical in every process.


def regression() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(EXAMPLES, 6)).astype("float32")
    y = np.tanh(x @ rng.normal(size=(6, 2))).astype("float32")
    return x, y


def classification() -> tuple[np.ndarray, np.ndarray]:
    x, y = regression()
    return x, (y[:, 0] > 0.3).astype("int32")


def mlp(outputs: int = 2, *extra: keras.layers.Layer) -> keras.Model:
    keras.utils.set_random_seed(7)
    return keras.Sequential(
        [keras.Input((6,))]
        + [keras.layers.Dense(8, activation="tanh", name=f"d{i}") for i in range(3)]
        + list(extra)
        + [keras.layers.Dense(outputs, name="out")],
        name="mlp",
    )


def compiled(model: keras.Model, **kwargs: Any) -> keras.Model:
    kwargs.setdefault("optimizer", keras.optimizers.SGD(0.1))
    kwargs.setdefault("loss", "mse")
    model.compile(**kwargs)
    return model


def losses_of(history: Any) -> list[float]:
    return [float(v) for v in history.history["loss"]]


def train_both(
    ctx: Context,
    build: Callable[[], keras.Model],
    train: Callable[[keras.Model], Any],
) -> tuple[keras.Model, Run]:
    """Trains `build()` under the strategy, and without one if synchronous.

    `train` returns the history. Returns the strategy's model and a `Run`
    with both losses.
    """
    with ctx.strategy.scope():
        model = build()
    run = Run(losses_of(train(model)))
    if ctx.synchronous:
        run.reference = losses_of(train(build()))
    return model, run


def same_weights(a: keras.Model, b: keras.Model, atol: float = 1e-5) -> str | None:
    """None if the weights agree within `atol`, else the largest difference."""
    diff = max(
        float(np.abs(np.asarray(u) - np.asarray(v)).max())
        for u, v in zip(a.get_weights(), b.get_weights(), strict=True)
    )
    return None if diff <= atol else f"weights differ by {diff:.3g} (atol {atol})"


def close(actual: Any, expected: Any, atol: float, what: str) -> str | None:
    """None if `actual` matches `expected` within `atol`, else what differs."""
    diff = float(np.abs(np.asarray(actual) - np.asarray(expected)).max())
    return None if diff <= atol else f"{what} differ by {diff:.3g} (atol {atol})"


# The features, in the order of the table.


def on_arrays(build: Callable[[], keras.Model]) -> Callable[[Context], Run]:
    """A feature that fits `build()`, a compiled model, on the regression arrays."""

    def run(ctx: Context) -> Run:
        x, y = regression()
        return train_both(
            ctx, build, lambda m: fit(m, x, y, batch_size=BATCH, epochs=EPOCHS)[0]
        )[1]

    return run


numpy_arrays = on_arrays(lambda: compiled(mlp()))
steps_per_execution = on_arrays(lambda: compiled(mlp(), steps_per_execution=4))
gradient_accumulation = on_arrays(
    lambda: compiled(
        mlp(), optimizer=keras.optimizers.SGD(0.2, gradient_accumulation_steps=2)
    )
)
batch_norm = on_arrays(
    lambda: compiled(
        mlp(2, keras.layers.BatchNormalization(synchronized=True, name="bn"))
    )
)
dropout = on_arrays(lambda: compiled(mlp(2, keras.layers.Dropout(0.2, name="dropout"))))


def tf_data(ctx: Context) -> Run:
    x, y = regression()

    def train(model: keras.Model) -> Any:
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
        return fit(model, dataset, epochs=EPOCHS)[0]

    return train_both(ctx, lambda: compiled(mlp()), train)[1]


class Batches(keras.utils.PyDataset):
    """A `PyDataset` of the regression data in batches of `BATCH`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.x, self.y = regression()

    def __len__(self) -> int:
        return math.ceil(len(self.x) / BATCH)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        part = slice(index * BATCH, (index + 1) * BATCH)
        return self.x[part], self.y[part]


def py_dataset(**options: Any) -> Callable[[Context], Run]:
    def run(ctx: Context) -> Run:
        return train_both(
            ctx,
            lambda: compiled(mlp()),
            lambda m: fit(m, Batches(**options), epochs=EPOCHS)[0],
        )[1]

    return run


def generator(ctx: Context) -> Run:
    x, y = regression()

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        while True:
            for start in range(0, EXAMPLES, BATCH):
                yield x[start : start + BATCH], y[start : start + BATCH]

    steps = EXAMPLES // BATCH
    return train_both(
        ctx,
        lambda: compiled(mlp()),
        lambda m: fit(m, batches(), steps_per_epoch=steps, epochs=EPOCHS)[0],
    )[1]


def validation_early_stopping(ctx: Context) -> Run:
    x, y = regression()
    runs: list[list[int]] = []

    def train(model: keras.Model) -> Any:
        # Stops once validation loss improves by less than 0.02 (epoch 3 here).
        stop = keras.callbacks.EarlyStopping(
            monitor="val_loss", min_delta=0.02, patience=1
        )
        history, epochs = fit(
            model,
            x[:192],
            y[:192],
            batch_size=BATCH,
            epochs=8,
            validation_data=(x[192:], y[192:]),
            callbacks=[stop],
        )
        runs.append(epochs)
        return history

    _, run = train_both(ctx, lambda: compiled(mlp()), train)
    if len(runs[0]) == 8:
        run.checks["stopped"] = "EarlyStopping never stopped the run"
    elif ctx.synchronous and runs[0] != runs[1]:
        run.checks["stopped"] = f"ran epochs {runs[0]}, without a strategy {runs[1]}"
    return run


def sample_weight(ctx: Context) -> Run:
    x, y = regression()
    weights = np.linspace(0.2, 2.0, EXAMPLES).astype("float32")
    return train_both(
        ctx,
        lambda: compiled(mlp()),
        lambda m: fit(m, x, y, sample_weight=weights, batch_size=BATCH, epochs=EPOCHS)[
            0
        ],
    )[1]


def class_weight(ctx: Context) -> Run:
    x, y = classification()

    def build() -> keras.Model:
        return compiled(
            mlp(),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )

    return train_both(
        ctx,
        build,
        lambda m: fit(
            m, x, y, class_weight={0: 1.0, 1: 3.0}, batch_size=BATCH, epochs=EPOCHS
        )[0],
    )[1]


def mixed_float16(ctx: Context) -> Run:
    x, y = regression()
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        return train_both(
            ctx,
            lambda: compiled(mlp(), optimizer=keras.optimizers.Adam(0.01)),
            lambda m: fit(m, x, y, batch_size=BATCH, epochs=EPOCHS)[0],
        )[1]
    finally:
        keras.mixed_precision.set_global_policy(previous)


def multi_io() -> keras.Model:
    keras.utils.set_random_seed(7)
    a = keras.Input((6,), name="a")
    b = keras.Input((3,), name="b")
    h = keras.layers.Dense(8, activation="tanh", name="da")(a)
    g = keras.layers.Dense(8, activation="tanh", name="db")(b)
    h = keras.layers.Concatenate(name="join")([h, g])
    h = keras.layers.Dense(8, activation="tanh", name="d1")(h)
    h = keras.layers.Dense(8, activation="tanh", name="d2")(h)
    outputs = {
        "y1": keras.layers.Dense(2, name="y1")(h),
        "y2": keras.layers.Dense(1, name="y2")(h),
    }
    return keras.Model({"a": a, "b": b}, outputs)


def multi_input_output(ctx: Context) -> Run:
    x, y = regression()
    inputs = {"a": x, "b": x[:, :3] * 2.0}
    targets = {"y1": y, "y2": y[:, :1] - y[:, 1:]}

    def build() -> keras.Model:
        return compiled(
            multi_io(),
            loss={"y1": "mse", "y2": "mae"},
            loss_weights={"y1": 1.0, "y2": 0.5},
        )

    return train_both(
        ctx,
        build,
        lambda m: fit(m, inputs, targets, batch_size=BATCH, epochs=EPOCHS)[0],
    )[1]


def cnn(ctx: Context) -> Run:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(EXAMPLES, 8, 8, 1)).astype("float32")
    y = (x[:, :4].mean(axis=(1, 2, 3)) > 0).astype("int32")

    def build() -> keras.Model:
        keras.utils.set_random_seed(7)
        model = keras.Sequential(
            [
                keras.Input((8, 8, 1)),
                keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
                keras.layers.MaxPooling2D(name="pool"),
                keras.layers.Flatten(name="flat"),
                keras.layers.Dense(8, activation="relu", name="dense"),
                keras.layers.Dense(2, name="out"),
            ]
        )
        return compiled(
            model, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )

    return train_both(
        ctx, build, lambda m: fit(m, x, y, batch_size=BATCH, epochs=EPOCHS)[0]
    )[1]


def embedding_lstm(ctx: Context) -> Run:
    rng = np.random.default_rng(2)
    x = rng.integers(0, 20, size=(EXAMPLES, 10)).astype("int32")
    y = ((x < 10).mean(axis=1) > 0.5).astype("int32")

    def build() -> keras.Model:
        keras.utils.set_random_seed(7)
        model = keras.Sequential(
            [
                keras.Input((10,), dtype="int32"),
                keras.layers.Embedding(20, 8, name="embed"),
                keras.layers.LSTM(8, name="lstm"),
                keras.layers.Dense(2, name="out"),
            ]
        )
        return compiled(
            model,
            optimizer=keras.optimizers.Adam(0.01),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )

    return train_both(
        ctx, build, lambda m: fit(m, x, y, batch_size=BATCH, epochs=EPOCHS)[0]
    )[1]


def backup_and_restore(ctx: Context) -> Run:
    """Interrupted at epoch 2 of 3, then resumed by a new model, as after a crash."""
    x, y = regression()
    backup = os.path.join(ctx.workdir, "backup")

    def build() -> keras.Model:
        return compiled(mlp())

    model, run = train_both(
        ctx, build, lambda m: fit(m, x, y, batch_size=BATCH, epochs=3)[0]
    )
    with ctx.strategy.scope():
        interrupted = build()
    try:
        fit(
            interrupted,
            x,
            y,
            batch_size=BATCH,
            epochs=3,
            callbacks=[keras.callbacks.BackupAndRestore(backup), InterruptAt(2)],
        )
        run.checks["interrupted"] = "the interruption did not stop fit"
    except Interrupted:
        pass
    with ctx.strategy.scope():
        resumed = build()
    _, epochs = fit(
        resumed,
        x,
        y,
        batch_size=BATCH,
        epochs=3,
        callbacks=[keras.callbacks.BackupAndRestore(backup)],
    )
    if epochs != [2]:
        run.checks["resumed"] = f"the resumed fit ran epochs {epochs}, not [2]"
    if ctx.synchronous:
        run.checks["weights"] = same_weights(resumed, model)
    return run


def model_checkpoint(ctx: Context) -> Run:
    x, y = regression()
    paths: list[str] = []

    def train(model: keras.Model) -> Any:
        paths.append(os.path.join(ctx.workdir, f"run{len(paths)}.weights.h5"))
        save = keras.callbacks.ModelCheckpoint(paths[-1], save_weights_only=True)
        return fit(model, x, y, batch_size=BATCH, epochs=EPOCHS, callbacks=[save])[0]

    model, run = train_both(ctx, lambda: compiled(mlp()), train)
    loaded = mlp()
    loaded.load_weights(paths[0])
    run.checks["loaded"] = same_weights(loaded, model, atol=0.0)
    return run


def evaluate_predict(ctx: Context) -> Run:
    x, y = regression()
    model, run = train_both(
        ctx,
        lambda: compiled(mlp(), metrics=["mae"]),
        lambda m: fit(m, x, y, batch_size=BATCH, epochs=EPOCHS)[0],
    )
    copy = compiled(mlp(), metrics=["mae"])
    copy.set_weights(model.get_weights())
    expected = copy.evaluate(x, y, batch_size=BATCH, verbose=0)
    actual = model.evaluate(x, y, batch_size=BATCH, verbose=0)
    run.checks["evaluate"] = close(actual, expected, 1e-5, "evaluate's results")
    predicted = model.predict(x, batch_size=BATCH, verbose=0)
    run.checks["predict"] = close(
        predicted, copy(x, training=False), 1e-5, "predictions"
    )
    return run


# A child that cannot import tfpar loads the model and predicts.
_LOAD_WITHOUT_TFPAR = """
import json, sys
sys.modules["tfpar"] = None
import numpy as np, keras
model = keras.models.load_model(sys.argv[1])
x = np.load(sys.argv[2])
print("PREDICTIONS", json.dumps(model.predict(x, verbose=0).tolist()))
"""


def save_load_without_tfpar(ctx: Context) -> Run:
    x, y = regression()
    model, run = train_both(
        ctx,
        lambda: compiled(mlp()),
        lambda m: fit(m, x, y, batch_size=BATCH, epochs=EPOCHS)[0],
    )
    path = os.path.join(ctx.workdir, "model.keras")
    model.save(path)
    inputs = os.path.join(ctx.workdir, "x.npy")
    np.save(inputs, x[:16])
    child = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_TFPAR, path, inputs],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_CONFIG": ""},
    )
    line = next(
        (s for s in child.stdout.splitlines() if s.startswith("PREDICTIONS ")), None
    )
    if line is None:
        run.checks["loaded"] = f"loading without tfpar failed: {child.stderr[-800:]}"
    else:
        loaded = json.loads(line.split(" ", 1)[1])
        run.checks["loaded"] = close(
            loaded, model.predict(x[:16], verbose=0), 1e-6, "predictions"
        )
    return run


class CustomTrainStep(keras.Model):
    """A functional model with its own `train_step`, as Keras's guide writes it.

    One change for distribution: Keras's `compute_loss` divides the loss by
    the number of replicas (so that summing gradients over replicas gives
    the mean), under any `tf.distribute` strategy; the guide's code would
    log that share, so the loss metric gets the whole.
    """

    def train_step(self, data: Any) -> dict[str, Any]:
        x, y = data
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(y=y, y_pred=y_pred)
        gradients = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)
        replicas = self.distribute_strategy.num_replicas_in_sync
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss * replicas)
            else:
                metric.update_state(y, y_pred)
        return {m.name: m.result() for m in self.metrics}


def custom_train_step(ctx: Context) -> Run:
    x, y = regression()

    def build() -> keras.Model:
        plain = mlp()
        return compiled(CustomTrainStep(plain.inputs, plain.outputs))

    return train_both(
        ctx, build, lambda m: fit(m, x, y, batch_size=BATCH, epochs=EPOCHS)[0]
    )[1]


FEATURES = (
    Feature("numpy", "NumPy arrays", "numpy", numpy_arrays),
    Feature("tf_data", "`tf.data.Dataset`", "Dataset", tf_data),
    Feature("py_dataset", "`keras.utils.PyDataset`", "PyDataset", py_dataset()),
    Feature(
        "py_dataset_threads",
        "`PyDataset(workers=2)`",
        "PyDataset",
        py_dataset(workers=2),
    ),
    Feature(
        "py_dataset_processes",
        "`PyDataset(workers=2, use_multiprocessing=True)`",
        "PyDataset",
        py_dataset(workers=2, use_multiprocessing=True),
    ),
    Feature("generator", "Python generator", "generator", generator),
    Feature(
        "validation_early_stopping",
        "`validation_data` + `EarlyStopping`",
        "validation",
        validation_early_stopping,
    ),
    Feature("sample_weight", "`sample_weight`", "sample_weight", sample_weight),
    Feature("class_weight", "`class_weight`", "class_weight", class_weight),
    Feature(
        "mixed_float16",
        "`mixed_float16` policy",
        "mixed_float16",
        mixed_float16,
        rtol=2e-2,
        why_rtol="float16 rounding",
    ),
    Feature(
        "multi_input_output",
        "dict inputs and outputs, per-output losses, `loss_weights`",
        "output",
        multi_input_output,
    ),
    Feature(
        "steps_per_execution",
        "`compile(steps_per_execution=4)`",
        "steps_per_execution",
        steps_per_execution,
    ),
    Feature(
        "gradient_accumulation",
        "optimizer `gradient_accumulation_steps=2`",
        "gradient_accumulation_steps",
        gradient_accumulation,
    ),
    Feature(
        "batch_norm",
        "`BatchNormalization(synchronized=True)`",
        "BatchNormalization",
        batch_norm,
    ),
    Feature(
        "dropout",
        "`Dropout`",
        "Dropout",
        dropout,
        rtol=0.1,
        why_rtol="each replica or micro-batch draws its own dropout masks",
    ),
    Feature("cnn", "CNN (`Conv2D`, `MaxPooling2D`)", "Conv2D", cnn),
    Feature("embedding_lstm", "`Embedding` + `LSTM`", "LSTM", embedding_lstm),
    Feature(
        "backup_and_restore",
        "`BackupAndRestore` resume after an interruption",
        "BackupAndRestore",
        backup_and_restore,
    ),
    Feature(
        "model_checkpoint", "`ModelCheckpoint`", "ModelCheckpoint", model_checkpoint
    ),
    Feature(
        "evaluate_predict", "`evaluate` and `predict`", "evaluate", evaluate_predict
    ),
    Feature(
        "save_load",
        "`.keras` save, load without tfpar",
        "save",
        save_load_without_tfpar,
    ),
    Feature(
        "custom_train_step",
        "subclassed model with its own `train_step`",
        "train_step",
        custom_train_step,
    ),
)
FEATURES_BY_NAME = {f.name: f for f in FEATURES}
