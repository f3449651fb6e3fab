"""Recommendation-style training on a parameter-server cluster with tfpar.

A two-tower-ish model: user and item embeddings (100k users: the large
variable that motivates parameter servers), their product and a small MLP
predict a rating. By default it starts a local cluster (2 workers, 2 PS)
and shards every variable of at least 256 KiB (the two embedding tables, and
Adam's moments of them) over the parameter servers; `--no-shard` keeps each
variable whole on one PS. With `--tf-config` it joins the cluster described by
`TF_CONFIG` as its coordinator (`"task": {"type": "chief", "index": 0}`), the
other tasks running `tfpar server`.

    python examples/parameter_server.py --epochs 2
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import keras
import numpy as np
import tensorflow as tf

import tfpar

NUM_USERS = 100_000
NUM_ITEMS = 5_000


def build_model() -> keras.Model:
    """Embeddings of user and item, their product, an MLP: a rating."""
    user = keras.Input((), dtype="int32", name="user")
    item = keras.Input((), dtype="int32", name="item")
    u = keras.layers.Embedding(NUM_USERS, 32, name="user_embedding")(user)
    i = keras.layers.Embedding(NUM_ITEMS, 32, name="item_embedding")(item)
    x = keras.layers.Concatenate()([u, i, u * i])
    x = keras.layers.Dense(64, activation="relu")(x)
    rating = keras.layers.Dense(1, name="rating")(x)
    return keras.Model({"user": user, "item": item}, rating)


def synthetic_ratings(
    count: int, seed: int = 0
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Ratings from hidden user and item biases, so there is something to learn.

    The biases are the same for every call (training and validation data
    share them); `seed` draws which users rate which items. As in real logs,
    a few users rate most: user ids follow a Zipf law.
    """
    hidden = np.random.default_rng(1234)
    user_bias = hidden.normal(size=NUM_USERS).astype("float32")
    item_bias = hidden.normal(size=NUM_ITEMS).astype("float32")
    rng = np.random.default_rng(seed)
    users = ((rng.zipf(1.3, count) - 1) % NUM_USERS).astype("int32")
    items = rng.integers(0, NUM_ITEMS, count).astype("int32")
    ratings = (user_bias[users] + item_bias[items])[:, None]
    return {"user": users, "item": items}, ratings


@contextlib.contextmanager
def cluster_resolver(
    use_tf_config: bool, workers: int, ps: int
) -> Iterator[tf.distribute.cluster_resolver.ClusterResolver | None]:
    """`None` (read TF_CONFIG) or the resolver of a fresh local cluster."""
    if use_tf_config:
        yield None
        return
    with tfpar.LocalCluster(num_workers=workers, num_ps=ps) as c:
        yield c.cluster_resolver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps-per-epoch", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--ps", type=int, default=2)
    parser.add_argument(
        "--tf-config", action="store_true", help="join TF_CONFIG's cluster"
    )
    parser.add_argument(
        "--no-shard", action="store_true", help="keep each variable on one PS"
    )
    parser.add_argument("--save", default="recommender.keras")
    args = parser.parse_args()

    with cluster_resolver(args.tf_config, args.workers, args.ps) as resolver:
        # Split variables of >= 256 KiB over (up to) every PS, by rows.
        partitioner = (
            None
            if args.no_shard
            else tf.distribute.experimental.partitioners.MinSizePartitioner(
                min_shard_bytes=256 << 10, max_shards=args.ps
            )
        )
        strategy = tfpar.ParameterServerStrategy(
            resolver, partitioner, step_deadline=120
        )
        # Data after the strategy: it connects this process to the cluster.
        features, ratings = synthetic_ratings(args.batch_size * args.steps_per_epoch)
        dataset = (
            tf.data.Dataset.from_tensor_slices((features, ratings))
            .shuffle(10_000, seed=0)
            .batch(args.batch_size)
            .repeat()
        )
        with strategy.scope():
            model = build_model()
            model.compile(
                optimizer=keras.optimizers.Adam(0.01), loss="mse", metrics=["mae"]
            )
        for variable in model.weights[:2]:
            value = variable.value
            parts = getattr(value, "variables", [value])  # a ShardedVariable's shards
            for part in parts:
                print(f"{variable.path:32s} rows {part.shape[0]:>6} on {part.device}")
        model.fit(
            dataset,
            epochs=args.epochs,
            steps_per_epoch=args.steps_per_epoch,
            validation_data=synthetic_ratings(2048, seed=1),
        )
        print(strategy.communication_stats())
        model.save(args.save)
        print(f"saved {args.save} (loads without tfpar)")


if __name__ == "__main__":
    main()
