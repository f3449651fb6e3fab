"""Cost of tfpar's callbacks: step time with DeviceUtilization + CommunicationTime on and off.

Both configurations run in one process on the same compiled model, in
alternating rounds (off/on, then on/off, ...), so drift in machine load hits
both alike. Each round is one `fit` call; the step time is the mean interval
between consecutive batch ends, so every callback hook is inside it, and the
first (tracing) step is left out. Two models: a tiny one (about 1 ms steps)
and a medium one (about 10 ms steps). The callbacks run at their default
settings unless `--every-steps` is given.

Usage:

    python benchmarks/callbacks.py --quick --out /tmp/callbacks.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from tfpar.callbacks.communication_time import CommunicationTime
from tfpar.callbacks.device_utilization import DeviceUtilization

MODELS = {
    # name: (features, hidden width, hidden layers, batch size)
    "tiny": (32, 64, 1, 32),
    "medium": (256, 512, 2, 96),
}


class StepTimer(keras.callbacks.Callback):
    """Records the time of every batch end."""

    def __init__(self) -> None:
        super().__init__()
        self.ends: list[float] = []

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.ends = []

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.ends.append(time.perf_counter())

    def step_ms(self) -> float:
        # Intervals from the end of step 0 (tracing) onward.
        return 1000.0 * (self.ends[-1] - self.ends[0]) / (len(self.ends) - 1)


def build(name: str) -> tuple[keras.Model, tf.data.Dataset]:
    features, width, depth, batch = MODELS[name]
    layers = [keras.Input((features,))]
    layers += [keras.layers.Dense(width, activation="relu") for _ in range(depth)]
    model = keras.Sequential([*layers, keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch * 64, features)).astype("float32")
    y = rng.standard_normal((batch * 64, 1)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).repeat()
    return model, data.prefetch(2)


def measure(name: str, rounds: int, steps: int, every_steps: int | None) -> dict:
    model, data = build(name)
    log_dir = tempfile.mkdtemp(prefix="tfpar-bench-")
    cadence = {} if every_steps is None else {"every_steps": every_steps}
    callbacks = [
        DeviceUtilization(log_dir, **cadence),
        CommunicationTime(log_dir, **cadence),
    ]
    timer = StepTimer()
    times: dict[str, list[float]] = {"off": [], "on": []}
    fit = {"x": data, "steps_per_epoch": steps, "verbose": 0, "shuffle": False}
    model.fit(epochs=1, callbacks=[timer], **fit)  # trace once, outside the rounds
    try:
        for r in range(rounds):
            order = ["off", "on"] if r % 2 == 0 else ["on", "off"]
            for config in order:
                extra = callbacks if config == "on" else []
                model.fit(epochs=1, callbacks=[timer, *extra], **fit)
                times[config].append(timer.step_ms())
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    return {
        "model": name,
        "steps_per_round": steps,
        "rounds": rounds,
        "off_ms": off,
        "on_ms": on,
        "cost_ms": on - off,
        "cost_percent": 100.0 * (on - off) / off,
        "ratio_on_off": on / off,
        "off_rounds_ms": times["off"],
        "on_rounds_ms": times["on"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (smoke test)")
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per model")
    parser.add_argument(
        "--every-steps",
        type=int,
        default=None,
        help="callback cadence in steps (default: the callbacks' own)",
    )
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 8)
    steps = {"tiny": 300 if args.quick else 3000, "medium": 60 if args.quick else 1200}
    results = [measure(name, rounds, steps[name], args.every_steps) for name in MODELS]
    print(
        f"{'model':8} {'off ms/step':>12} {'on ms/step':>11} {'cost ms':>8} "
        f"{'cost %':>7} {'on/off':>7}"
    )
    for r in results:
        print(
            f"{r['model']:8} {r['off_ms']:12.3f} {r['on_ms']:11.3f} "
            f"{r['cost_ms']:8.3f} {r['cost_percent']:7.2f} {r['ratio_on_off']:7.3f}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"quick": args.quick, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
