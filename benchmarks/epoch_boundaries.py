"""Benchmark: the time Keras's `fit` loses at epoch boundaries, per strategy.

Keras destroys the distributed dataset's iterator at every epoch's end, and
in TensorFlow 2.21 destroying an iterator can wait for tf.data's autotuning
thread to wake (`tfpar/_datasets.py`). This runs, side by side in
alternating order, the stock `tf.distribute.MirroredStrategy`,
`tfpar.MirroredStrategy` and `tfpar.PipelineStrategy` (M=4), which turn that
autotuning off, on 2 simulated CPUs, and one device without a strategy,
each in a fresh process pinned to one core with 1 intra-op thread: MLP
128-1024-1024-2, SGD, Keras `fit` over numpy arrays, a warm-up `fit` of one
epoch, then a timed `fit` of 4 epochs of 8 global batches of 4096.

Reported per variant over the series: the timed `fit`'s seconds, and the
epoch boundary (from `on_epoch_begin` to the first `on_train_batch_begin`)
of epochs 2 to 4, whose iterator replaces the previous epoch's.

    python benchmarks/epoch_boundaries.py --runs 5 --out epoch_boundaries_benchmark.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

EPOCHS = 4
STEPS_PER_EPOCH = 8
BATCH = 4096
VARIANTS = ("stock", "tfpar", "tfpar_pipeline", "one_device")


def child(variant: str) -> None:
    """Trains under `variant` and prints its timings as one JSON line."""
    os.sched_setaffinity(0, {0})
    import tfpar

    tfpar.simulate_devices(2)
    import keras
    import numpy as np
    import tensorflow as tf

    if variant == "tfpar":
        strategy = tfpar.MirroredStrategy()
    elif variant == "tfpar_pipeline":
        strategy = tfpar.PipelineStrategy(["/cpu:0", "/cpu:1"], num_microbatches=4)
    elif variant == "stock":
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    else:
        strategy = tf.distribute.get_strategy()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * STEPS_PER_EPOCH, 128)).astype("float32")
    y = rng.integers(0, 2, size=(BATCH * STEPS_PER_EPOCH,)).astype("int32")
    with strategy.scope():
        model = keras.Sequential(
            [
                keras.Input((128,)),
                keras.layers.Dense(1024, activation="relu"),
                keras.layers.Dense(1024, activation="relu"),
                keras.layers.Dense(2),
            ]
        )
        model.compile(
            optimizer="sgd",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    marks: list[tuple[str, float]] = []

    class Marks(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: object = None) -> None:
            marks.append(("epoch", time.perf_counter()))

        def on_train_batch_begin(self, batch: int, logs: object = None) -> None:
            marks.append(("batch", time.perf_counter()))

    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    start = time.perf_counter()
    model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, verbose=0, callbacks=[Marks()])
    seconds = time.perf_counter() - start
    boundaries = [
        after - at
        for (kind, at), (_, after) in itertools.pairwise(marks)
        if kind == "epoch"
    ][1:]
    print("RESULT " + json.dumps({"seconds": seconds, "boundaries": boundaries}))


def run_child(variant: str) -> dict:
    """Runs `variant` in a fresh pinned process; returns its timings.

    A child that dies (the pipeline's known segmentation fault, issue 15)
    is reported as `{"exit": status}` and the series goes on.
    """
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "TF_NUM_INTRAOP_THREADS": "1",
        "TF_NUM_INTEROP_THREADS": "2",
    }
    proc = subprocess.run(
        [sys.executable, __file__, "--child", variant],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(f"{variant} exited with {proc.returncode}\n")
        return {"exit": proc.returncode}
    return json.loads(lines[0].split(" ", 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs in the series")
    parser.add_argument("--out", default="epoch_boundaries_benchmark.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for run in range(args.runs):
        order = VARIANTS if run % 2 == 0 else VARIANTS[::-1]
        for name in order:
            results[name].append(run_child(name))
        print(
            f"run {run + 1}/{args.runs}: "
            + ", ".join(f"{n} {_seconds(results[n][-1])}" for n in order),
            flush=True,
        )
    print(
        f"\n{EPOCHS} epochs x {STEPS_PER_EPOCH} steps, batch {BATCH}, {args.runs} runs:"
    )
    for name in VARIANTS:
        done = [r for r in results[name] if "seconds" in r]
        died = len(results[name]) - len(done)
        if not done:
            print(f"  {name:14s} every run died")
            continue
        seconds = [r["seconds"] for r in done]
        boundaries = [b for r in done for b in r["boundaries"]]
        print(
            f"  {name:14s} fit s min {min(seconds):6.2f} median "
            f"{statistics.median(seconds):6.2f} max {max(seconds):6.2f}   "
            f"epoch boundary s min {min(boundaries):5.2f} median "
            f"{statistics.median(boundaries):5.2f} max {max(boundaries):5.2f}"
            + (f"   ({died} of {len(results[name])} runs died)" if died else "")
        )
    ratios = [
        s["seconds"] / t["seconds"]
        for s, t in zip(results["stock"], results["tfpar"], strict=True)
        if "seconds" in s and "seconds" in t
    ]
    print(
        f"  stock / tfpar fit time, run by run: min {min(ratios):.2f}x median "
        f"{statistics.median(ratios):.2f}x max {max(ratios):.2f}x"
    )
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


def _seconds(result: dict) -> str:
    if "seconds" in result:
        return f"{result['seconds']:.2f} s"
    return f"died ({result['exit']})"


if __name__ == "__main__":
    main()
