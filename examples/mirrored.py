"""Image classification with tfpar.MirroredStrategy.

Trains a small convolutional network on scikit-learn's handwritten digits
(8x8 images that ship inside the package, no download; `pip install
"tfpar[examples]"`) or, with `--synthetic`, on random 8x8 images of 10
classes, each a noisy copy of its class's pattern. Runs on every GPU when there are
some, else on `--devices` simulated CPU devices (default 2). After each epoch
it prints what the gradient all-reduce cost, read from
`strategy.communication_stats()`.

    python examples/mirrored.py --epochs 5 --compression bf16
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import tensorflow as tf
from digits import load_digits

import tfpar
from tfpar import MirroredStrategy


def load_data(synthetic: bool) -> tuple[tuple, tuple, int]:
    """Returns `(x_train, y_train), (x_test, y_test), num_classes`."""
    x, y = load_digits(synthetic)
    return (x[:1500], y[:1500]), (x[1500:], y[1500:]), 10


def build_model(input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    """A small CNN: two conv blocks and a dense head."""
    return keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(num_classes),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", action="store_true", help="random 8x8 images")
    parser.add_argument(
        "--devices", type=int, default=2, help="simulated CPUs without GPUs"
    )
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
    parser.add_argument("--compression", choices=["fp16", "bf16"], default=None)
    parser.add_argument("--bucket-bytes", type=int, default=None)
    args = parser.parse_args()

    if not tf.config.list_physical_devices("GPU"):
        tfpar.simulate_devices(args.devices)
    strategy = MirroredStrategy(
        compression=args.compression,
        bucket_bytes=args.bucket_bytes,
        on_nonfinite="skip",
    )
    print(
        f"Replicas: {strategy.num_replicas_in_sync} on {strategy.extended.worker_devices}"
    )
    (x, y), (x_test, y_test), classes = load_data(args.synthetic)
    with strategy.scope():
        model = build_model(x.shape[1:], classes)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3 * strategy.num_replicas_in_sync),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )

    last = strategy.communication_stats()

    def report(epoch: int, logs: dict) -> None:
        nonlocal last
        now = strategy.communication_stats()
        d = now.since(last)
        last = now
        per_step = 1000 * d.comm_seconds / max(d.steps, 1)
        print(
            f"  epoch {epoch + 1}: all-reduce {per_step:.2f} ms/step over {d.calls} calls, "
            f"{d.bytes_moved / 2**20:.1f} MiB moved ({d.bytes_logical / 2**20:.1f} MiB "
            f"before compression), skipped steps so far: {strategy.skipped_steps()}"
        )

    model.fit(
        x,
        y,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(x_test, y_test),
        callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=report)],
        verbose=2,
    )
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"Test accuracy: {accuracy:.3f}")


if __name__ == "__main__":
    main()
