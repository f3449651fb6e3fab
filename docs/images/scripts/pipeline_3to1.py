"""The pipeline job of docs/callbacks.md's pictures: a 3:1 split on two pinned workers.

Usage: python docs/images/scripts/pipeline_3to1.py LOG_DIR
"""

import sys

import keras
import numpy as np

import tfpar

log_dir = sys.argv[1]
x = np.random.default_rng(0).normal(size=(512 * 40, 64)).astype("float32")
with tfpar.LocalCluster(num_workers=2, pin_cores=True) as cluster:
    strategy = tfpar.PipelineStrategy(
        cluster.connect(), num_microbatches=4, partition=["cut"]
    )
    with strategy.scope():
        # Stage 0: 0.25 + 3 * 3 units of a 512x512 matmul (forward, weight
        # and input gradients); stage 1: 3.
        model = keras.Sequential(
            [keras.Input((64,))]
            + [keras.layers.Dense(512, activation="relu") for _ in range(4)]
            + [keras.layers.Dense(512, activation="relu", name="cut")]
            + [keras.layers.Dense(1)]
        )
        model.compile(optimizer="sgd", loss="mse")
    model.fit(
        x,
        x[:, :1],
        batch_size=512,
        epochs=8,
        verbose=2,
        callbacks=[
            keras.callbacks.TensorBoard(log_dir),
            tfpar.callbacks.DeviceUtilization(log_dir, every_seconds=1.0),
            tfpar.callbacks.CommunicationTime(log_dir, every_seconds=1.0),
        ],
    )
