"""Digit classification with tfpar.MultiWorkerMirroredStrategy, one process per worker.

Every worker runs this same script; `tfpar launch` starts them on this
machine with the `TF_CONFIG` of each (on several machines, set `TF_CONFIG`
yourself, see docs/multi_worker.md). The data are scikit-learn's handwritten
digits, which ship inside the package (`pip install "tfpar[examples]"`), or,
with `--synthetic`, random 8x8 images of 10 classes, each a noisy copy of its
class's pattern. Worker 0 (the chief) writes the TensorBoard logs and the
saved model; the other workers write theirs to a temporary folder, as
TensorFlow's convention asks, since every worker must run the same
callbacks.

    tfpar launch --workers 2 -- python examples/multi_worker.py --epochs 3
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tfpar

# First, before any TensorFlow op: collectives are configured at start-up.
strategy = tfpar.MultiWorkerMirroredStrategy()

import keras  # noqa: E402
from digits import load_digits  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument("--logdir", default="runs/multi_worker")
    parser.add_argument("--synthetic", action="store_true", help="random images")
    args = parser.parse_args()

    resolver = strategy.cluster_resolver
    chief = resolver.task_type == "worker" and resolver.task_id == 0
    out = args.logdir if chief else tempfile.mkdtemp(prefix="tfpar-worker-")

    x, y = load_digits(args.synthetic)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((8, 8, 1)),
                keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
                keras.layers.Flatten(),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(10),
            ]
        )
        model.compile(
            optimizer=keras.optimizers.Adam(1e-2),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    history = model.fit(
        x[:1536],
        y[:1536],
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(x[1536:], y[1536:]),
        callbacks=[keras.callbacks.TensorBoard(out)],
        verbose=2 if chief else 0,
    )
    model.save(os.path.join(out, "digits.keras"))
    stats = strategy.communication_stats()
    print(
        f"worker {resolver.task_id} of {strategy.num_replicas_in_sync} replicas: "
        f"val_accuracy {history.history['val_accuracy'][-1]:.3f}, "
        f"all-reduce {stats.comm_seconds / max(stats.steps, 1) * 1e3:.2f} ms/step "
        f"over {stats.steps} steps"
    )


if __name__ == "__main__":
    main()
