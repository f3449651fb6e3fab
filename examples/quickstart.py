"""tfpar quickstart: a small model trained on simulated devices, logged to TensorBoard.

Splits the host CPU into two logical devices, trains the same small classifier
under each strategy (the parameter-server one on a local cluster of pinned
processes), with Keras's own TensorBoard callback beside tfpar's
DeviceUtilization and CommunicationTime callbacks, and
prints the command that opens the logs.

Run: `make demo` (or `python examples/quickstart.py --logdir runs/quickstart`).
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

import tfpar

NUM_DEVICES = 2


def build_model():
    model = keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(64, activation="relu", name="hidden_1"),
            keras.layers.Dense(64, activation="relu", name="hidden_2"),
            keras.layers.Dense(3, name="logits"),
        ]
    )
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def synthetic_data(n=2048, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 16)).astype("float32")
    y = (x[:, :3].sum(axis=1) > 0).astype("int64") + (x[:, 3] > 1).astype("int64")
    return x, y


# One run folder per strategy; each entry builds its strategy once devices exist.
LOCAL_STRATEGIES = {
    "stock_mirrored": lambda: tf.distribute.MirroredStrategy(tfpar.default_devices()),
    "mirrored": lambda: tfpar.MirroredStrategy(),
    "pipeline": lambda: tfpar.PipelineStrategy(num_microbatches=4),
}
# Trained last, on a LocalCluster: connecting to a cluster lasts for the process.
STRATEGIES = [*LOCAL_STRATEGIES, "parameter_server"]


def train(name, strategy, x, y, args):
    keras.utils.set_random_seed(0)
    run = os.path.join(args.logdir, name)
    with strategy.scope():
        model = build_model()
    history = model.fit(
        x,
        y,
        batch_size=64,
        epochs=args.epochs,
        validation_split=0.1,
        verbose=2,
        callbacks=[
            keras.callbacks.TensorBoard(run),
            tfpar.callbacks.DeviceUtilization(run),
            tfpar.callbacks.CommunicationTime(run),
        ],
    )
    print(f"{name}: final accuracy {history.history['accuracy'][-1]:.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/quickstart")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    tfpar.simulate_devices(NUM_DEVICES)
    print(f"tfpar {tfpar.__version__}: training on {tfpar.default_devices()}")
    x, y = synthetic_data()
    for name, make_strategy in LOCAL_STRATEGIES.items():
        train(name, make_strategy(), x, y, args)
    print("parameter_server: starting a LocalCluster of 2 workers and 1 PS")
    with tfpar.LocalCluster(num_workers=2, num_ps=1) as cluster:
        strategy = tfpar.ParameterServerStrategy(cluster.cluster_resolver)
        train("parameter_server", strategy, x, y, args)
    print(f"\nOpen the logs with:\n  tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
