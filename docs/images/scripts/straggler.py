"""The multi-worker job of docs/callbacks.md's pictures; run by `tfpar launch`.

Usage: tfpar launch --workers 2 --pin-cores -- python straggler.py LOG_DIR
(with another process loading worker 1's core, see docs/callbacks.md).
"""

import json
import os
import sys

import tfpar

# The strategy comes first: collective ops are configured at start-up.
strategy = tfpar.MultiWorkerMirroredStrategy()

import keras  # noqa: E402
import numpy as np  # noqa: E402

task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
log_dir = os.path.join(sys.argv[1], f"worker{task}")
x = np.random.default_rng(0).normal(size=(1024 * 40, 256)).astype("float32")
with strategy.scope():
    model = keras.Sequential(
        [keras.Input((256,))]
        + [keras.layers.Dense(512, activation="relu") for _ in range(3)]
        + [keras.layers.Dense(1)]
    )
    model.compile(optimizer="sgd", loss="mse")
model.fit(
    x,
    x[:, :1],
    batch_size=1024,
    epochs=8,
    verbose=0,
    callbacks=[
        keras.callbacks.TensorBoard(log_dir),
        tfpar.callbacks.CommunicationTime(log_dir, every_seconds=1.0),
    ],
)
