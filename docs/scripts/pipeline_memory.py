"""Measures the activation memory of GPipe, 1F1B and recompute for docs/pipeline.md.

    python docs/scripts/pipeline_memory.py [--width 64] [--rows 2048]

Two logical CPU devices in this process; an MLP of eight Dense(width, relu)
layers and a Dense(1) head, cut before `d4`, micro-batches of `rows` rows,
M = 4, 8 and 16. For each configuration: one training step to trace, then three
steps, each between `tf.config.experimental.reset_memory_stats("CPU:0")` and
reading the allocator's peak (the logical CPUs share one allocator, so this is
the process's peak above what was in use before the step; the batch is
allocated before). Prints a Markdown table: per stage, the micro-batches held
(measured / planned) and the modelled peak (`activation_memory()`), their sum,
and the measured peak (median of the three steps).
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tfpar

tfpar.simulate_devices(2)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

MIB = 2**20
CONFIGS = [("gpipe", False), ("1f1b", False), ("1f1b", True)]


def mlp(width: int) -> keras.Model:
    keras.utils.set_random_seed(0)
    layers = [
        keras.layers.Dense(width, activation="relu", name=f"d{i}") for i in range(8)
    ]
    return keras.Sequential(
        [keras.Input((width,)), *layers, keras.layers.Dense(1, name="out")]
    )


def measure(schedule: str, recompute: bool, m: int, width: int, rows: int) -> str:
    strategy = tfpar.PipelineStrategy(
        num_microbatches=m, schedule=schedule, partition=["d4"], recompute=recompute
    )
    with strategy.scope():
        model = mlp(width)
        model.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(m * rows, width)).astype("float32"))
    y = tf.constant(rng.normal(size=(m * rows, 1)).astype("float32"))
    model.train_on_batch(x, y)
    peaks = []
    for _ in range(3):
        tf.config.experimental.reset_memory_stats("CPU:0")
        before = tf.config.experimental.get_memory_info("CPU:0")["current"]
        model.train_on_batch(x, y)
        peaks.append(tf.config.experimental.get_memory_info("CPU:0")["peak"] - before)
    stages = strategy.activation_memory(model, batch_size=m * rows)
    held = " / ".join(
        f"{r.held_microbatches} ({r.planned_microbatches})" for r in stages
    )
    modelled = [r.peak_activation_bytes or 0 for r in stages]
    name = schedule + (" + recompute" if recompute else "")
    return (
        f"| {name} | {m} | {held} | "
        + " / ".join(f"{b / MIB:.2f}" for b in modelled)
        + f" | {sum(modelled) / MIB:.2f} | {np.median(peaks) / MIB:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--rows", type=int, default=2048)
    args = parser.parse_args()
    strategy = tfpar.PipelineStrategy(num_microbatches=4, partition=["d4"])
    with strategy.scope():
        model = mlp(args.width)
    for r in strategy.activation_memory(model, batch_size=4 * args.rows):
        print(
            f"stage {r.stage}: input {r.input_bytes} B, activations "
            f"{r.activation_bytes} B, kept per micro-batch "
            f"{r.bytes_per_microbatch} B; {r.measured_note}"
        )
    print(
        "| schedule | M | held per stage, measured (planned) | modelled peak per "
        "stage, MiB | modelled sum, MiB | measured process peak, MiB |"
    )
    print("|---|---|---|---|---|---|")
    for schedule, recompute in CONFIGS:
        for m in (4, 8, 16):
            print(measure(schedule, recompute, m, args.width, args.rows), flush=True)


if __name__ == "__main__":
    main()
