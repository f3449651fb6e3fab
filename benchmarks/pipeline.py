"""Benchmark: PipelineStrategy against the same micro-batches on one device.

Two parts, each in its own process (TensorFlow configures devices once):

- `logical`: 2 simulated CPUs in one process. They share one thread pool, so
  no speedup is possible; the honest question is whether the pipeline costs
  anything: K=2 stages against the same M micro-batches on one logical device
  (target >= 0.95).
- `cluster`: a `tfpar.LocalCluster` of 2 pinned worker processes. K=2 stages
  on two workers against the same micro-batches on one worker (target >= 0.85
  of the bound K*M/(M+K-1)), and against the unsplit batch on one worker.
- `hybrid` (not in `all`): a `LocalCluster` of 4 workers pinned two per core,
  K=2 stages x R=2 replicas (1F1B, GPipe, and 1F1B with the replicas'
  gradients sent in bf16, `compression="bf16"`) against K=2 x R=1 on the
  same model. The machine has 2 cores, so this is an overhead figure, not a
  speedup.

Configurations are timed side by side in alternating rounds, from the start
of each `fit`'s second call of the train function to the start of its last
(Keras's per-`fit` set-up, first call and tear-down excluded); the table shows
medians. Also reported: the stages' busy time per step, summed over stages
(what splitting the model adds to the work shows against one device; on
logical devices, which time-share, overlapping time counts twice), the
measured bubble (idle / (busy + idle) from
`communication_stats()`) next to the planned one, the time between steps
(`between`: a step's wall time less its span from the first action of any
stage to the last, when every stage waits for the coordinator; the
unsplit and one-device rows include their own such time; per round, the
counters read at the timed interval's two ends so that both count the same
steps, then the median over rounds), and the peak of
micro-batches in flight on a stage (measured with `peak_in_flight()`, and
planned), the bytes of the replicas' gradient reduction per step (`reduce
MB`, counted: `reduce_bytes_sent` summed over devices) for 1F1B, GPipe and interleaved 1F1B (2 chunks per device; its peak
counts (micro-batch, chunk) pairs, each half a stage's activations), and the
CPU time per step of this process (the
`fit` loop, input pipeline and, for the cluster, the coordinator, which shares
the machine's cores with the pinned workers).

The model is an MLP of Dense layers plus a head: `--model small` (8 layers
of width 256, batch 256; the default with `--quick`), `medium` (8 x 512,
batch 512), `deep` (16 x 512, batch 512; the default) or `large` (8 x 1024,
batch 512). `--steps-per-execution N` sets Keras's
`steps_per_execution` for every configuration alike.

`--runs N` repeats the whole benchmark N times, each part in a new process
(a new cluster), and ends with the series: per configuration the smallest,
median and largest ratio over the runs, and, for the cluster, whether 1F1B
reached the target and the interleaved schedule's measured bubble was below
1F1B's in every run (issue #15's goals).

Usage: python benchmarks/pipeline.py [--quick] [--part logical|cluster|hybrid|all]
[--model small|medium|deep|large] [--steps-per-execution N] [--runs N]
[--out FILE.json]
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import statistics
import sys
import time
from typing import Any

from _child import child_result


def build_model(width: int, depth: int) -> Any:
    import keras

    keras.utils.set_random_seed(0)
    layers = [keras.layers.Dense(width, activation="relu") for _ in range(depth)]
    return keras.Sequential([keras.Input((width,)), *layers, keras.layers.Dense(1)])


# Benchmark models: (width, depth, batch). The MLP has `depth` hidden Dense
# layers of `width` units plus a Dense(1) head.
MODELS = {
    "small": (256, 8, 256),
    "medium": (512, 8, 512),
    "deep": (512, 16, 512),
    "large": (1024, 8, 512),
}


def run_part(part: str, quick: bool, size: str, spe: int) -> dict[str, Any]:
    """Runs one part in this process and returns its results."""
    import numpy as np
    import tensorflow as tf

    import tfpar
    from tfpar import PipelineStrategy
    from tfpar.strategies.pipeline.schedules import get_schedule

    width, depth, batch = MODELS[size]
    steps, rounds, m, k = (17, 3, 8, 2) if quick else (21, 5, 8, 2)
    if size in ("deep", "large"):  # each step takes 2-4x longer: fewer of them
        steps //= 2
    steps = spe * max(3, -(-steps // spe))  # whole executions, 2 untimed
    cluster = None
    if part == "logical":
        devices = tfpar.simulate_devices(2)
    else:
        workers = 4 if part == "hybrid" else 2
        cluster = tfpar.LocalCluster(num_workers=workers, pin_cores=True).start()
        devices = cluster.connect()
    try:
        configs: list[tuple[str, Any, int, str]] = [
            ("pipeline K=2 1f1b", devices[:2], m, "1f1b"),
            ("pipeline K=2 gpipe", devices[:2], m, "gpipe"),
            ("pipeline K=2 interleaved V=2", devices[:2], m, "interleaved"),
            ("same micro-batches, 1 device", devices[:1], m, "gpipe"),
            ("unsplit batch, 1 device", devices[:1], 1, "gpipe"),
        ]
        if part == "hybrid":
            # Stage s on workers s and s + 2: four workers pinned to the
            # machine's two cores, two per core.
            hybrid = [[devices[0], devices[2]], [devices[1], devices[3]]]
            configs = [
                ("pipeline K=2 x R=2 1f1b", hybrid, m, "1f1b"),
                ("pipeline K=2 x R=2 gpipe", hybrid, m, "gpipe"),
                ("pipeline K=2 x R=2 1f1b bf16", hybrid, m, "1f1b"),
                *configs[:2],
                *configs[3:],
            ]
        rng = np.random.default_rng(0)
        x = rng.normal(size=(batch * steps, width)).astype("float32")
        y = rng.normal(size=(batch * steps, 1)).astype("float32")
        runs = []
        for name, devs, microbatches, schedule in configs:
            strategy = PipelineStrategy(
                devs,
                num_microbatches=microbatches,
                schedule=schedule,
                compression="bf16" if name.endswith("bf16") else None,
            )
            with strategy.scope():
                model = build_model(width, depth)
                model.compile(optimizer="sgd", loss="mse", steps_per_execution=spe)
            model.fit(x, y, batch_size=batch, epochs=1, verbose=0)  # trace, warm up
            runs.append(
                {"name": name, "model": model, "strategy": strategy, "t": [], "cpu": []}
            )
        # Per configuration and round, the counters over the timed steps.
        stats: dict[str, Any] = {}
        for _ in range(rounds):
            for run in runs:
                timer = _step_timer(run["strategy"].communication_stats, steps // spe)
                run["model"].fit(
                    x, y, batch_size=batch, epochs=1, verbose=0, callbacks=[timer]
                )
                wall, cpu_seconds = timer.per_step(spe)
                run["t"].append(wall)
                run["cpu"].append(cpu_seconds)
                stats.setdefault(run["name"], []).append(timer.counted())
        base = {r["name"]: statistics.median(r["t"]) for r in runs}
        cpu = {r["name"]: statistics.median(r["cpu"]) for r in runs}
        strategies = {r["name"]: r["strategy"] for r in runs}
        partitions = {
            r["name"]: r["strategy"].partition_model(r["model"]) for r in runs
        }
        one = base["same micro-batches, 1 device"]
        unsplit = base["unsplit batch, 1 device"]
        rows = []
        walls = {r["name"]: r["t"] for r in runs}
        for name, _, _, schedule in configs:
            busy = sum(d.busy_seconds for s in stats[name] for d in s.devices)
            idle = sum(d.idle_seconds for s in stats[name] for d in s.devices)
            span = sum(_span_seconds(s) for s in stats[name])
            measured_steps = sum(s.steps for s in stats[name])
            reduce_bytes = sum(
                d.reduce_bytes_sent for s in stats[name] for d in s.devices
            )
            # Per round, over the same timed steps: a step's span (one
            # stage's, all alike) and its wall time less that span.
            spans = [
                _span_seconds(s) / len(s.devices) / max(s.steps, 1) for s in stats[name]
            ]
            between = [t - sp for t, sp in zip(walls[name], spans, strict=True)]
            devs = _devs(configs, name)
            # With R replicas per stage, group 0 runs ceil(M / R) micro-batches.
            replicas = len(devs[0]) if isinstance(devs[0], list) else 1
            planned = get_schedule(
                schedule,
                num_stages=len(devs),
                num_microbatches=-(-_m(configs, name) // replicas),
            )
            rows.append(
                {
                    "config": name,
                    "step_ms": 1000 * base[name],
                    "host_cpu_ms": 1000 * cpu[name],
                    "speedup_vs_same_microbatches": one / base[name],
                    "speedup_vs_unsplit": unsplit / base[name],
                    "speedup_vs_k2_1f1b": base["pipeline K=2 1f1b"] / base[name],
                    "bubble_measured": idle / span if span else 0.0,
                    # Between steps: the step's wall time less the span from
                    # its first action to its last (all stages alike), where
                    # every device waits for the coordinator; medians over
                    # the rounds.
                    "span_ms": 1000 * statistics.median(spans),
                    "between_steps_ms": 1000 * statistics.median(between),
                    # Busy time summed over stages: compared across configs,
                    # it shows what splitting the model adds to the work.
                    "busy_ms_per_step": 1000 * busy / max(measured_steps, 1),
                    "reduce_mb_per_step": reduce_bytes / 1e6 / max(measured_steps, 1),
                    "bubble_planned": planned.bubble_fraction(),
                    "peak_in_flight_planned": planned.peak_in_flight(),
                    "peak_in_flight_measured": max(strategies[name].peak_in_flight()),
                    "partition": str(partitions[name]),
                }
            )
        bound = k * m / (m + k - 1)
        return {
            "part": part,
            "width": width,
            "depth": depth,
            "batch": batch,
            "num_microbatches": m,
            "stages": k,
            "steps_per_round": steps,
            "steps_per_execution": spe,
            "model": size,
            "rounds": rounds,
            "bound": bound,
            "target": 0.95 if part == "logical" else 0.85 * bound,
            "rows": rows,
            "tf_version": tf.__version__,
        }
    finally:
        if cluster is not None:
            cluster.stop()


def _span_seconds(delta: Any) -> float:
    """Busy, exposed communication, reduction and idle time over all devices:
    each device's share of the steps' spans, from first action to last."""
    return sum(
        d.busy_seconds + d.comm_seconds + d.reduce_seconds + d.idle_seconds
        for d in delta.devices
    )


def _step_timer(stats: Any, calls: int) -> Any:
    """A callback timing `fit`'s steady state: from the start of its second
    call of the train function to the start of its last (of `calls`), so that
    Keras's per-`fit` set-up (data adapter, iterator, first call) and
    tear-down are not counted. It marks batch *begins*: a callback with
    `on_train_batch_end` would make Keras convert every step's logs to
    numbers (a fetch from the last stage per step, which `fit` with
    `verbose=0` does not do). It reads the strategy's counters (`stats`)
    just before its first mark and just after its last, outside the timed
    interval, so that they count the same steps."""
    import keras

    class StepTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.marks: list[tuple[float, float]] = []
            self.window: list[Any] = []

        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            if len(self.marks) == 1:
                self.window.append(stats())
            self.marks.append((time.perf_counter(), time.process_time()))
            if len(self.marks) == calls:
                self.window.append(stats())

        def counted(self) -> Any:
            """The counters over the timed steps."""
            before, after = self.window
            return after.since(before)

        def per_step(self, steps_per_execution: int) -> tuple[float, float]:
            """Wall and CPU seconds per step, between the marks of the second
            and the last call."""
            (t0, c0), (t1, c1) = self.marks[1], self.marks[-1]
            steps = (len(self.marks) - 2) * steps_per_execution
            return (t1 - t0) / steps, (c1 - c0) / steps

    return StepTimer()


def _devs(configs: list[tuple[str, Any, int, str]], name: str) -> Any:
    return next(c[1] for c in configs if c[0] == name)


def _m(configs: list[tuple[str, Any, int, str]], name: str) -> int:
    return next(c[2] for c in configs if c[0] == name)


def print_table(result: dict[str, Any]) -> None:
    print(
        f"\n[{result['part']}] MLP {result['depth']}x{result['width']}, batch "
        f"{result['batch']}, M={result['num_microbatches']}, K={result['stages']}, "
        f"steps_per_execution={result['steps_per_execution']}; "
        f"bound K*M/(M+K-1)={result['bound']:.2f}, target >= {result['target']:.2f} "
        "(vs same micro-batches on 1 device)"
    )
    print(
        f"partition ({result['rows'][0]['config']}):\n{result['rows'][0]['partition']}"
    )
    header = f"{'config':32} {'step ms':>8} {'vs same M':>9} {'vs unsplit':>10} "
    header += f"{'busy ms':>8} {'bubble':>7} {'planned':>7} {'peak':>5} {'planned':>7} "
    header += f"{'host CPU':>8} {'between':>7} {'reduce MB':>9}"
    print(header)
    for row in result["rows"]:
        print(
            f"{row['config']:32} {row['step_ms']:8.1f} "
            f"{row['speedup_vs_same_microbatches']:9.2f} {row['speedup_vs_unsplit']:10.2f} "
            f"{row['busy_ms_per_step']:8.1f} "
            f"{row['bubble_measured']:7.2f} {row['bubble_planned']:7.2f} "
            f"{row['peak_in_flight_measured']:5d} {row['peak_in_flight_planned']:7d} "
            f"{row['host_cpu_ms']:8.1f} {row['between_steps_ms']:7.1f} "
            f"{row['reduce_mb_per_step']:9.2f}"
        )


def print_series(runs: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Prints and returns each part's series: ratios and bubbles run by run.

    For the cluster part, also whether issue #15's goals held in every run:
    1F1B at or above the target against the same micro-batches on one
    worker, and the interleaved schedule's measured bubble below 1F1B's.
    """
    summary: dict[str, Any] = {}
    for index, first in enumerate(runs[0]):
        part = first["part"]
        rows = [
            {row["config"]: row for row in results[index]["rows"]} for results in runs
        ]
        print(f"\n[{part}] series of {len(runs)} runs: ratio vs same micro-batches")
        configs: dict[str, Any] = {}
        for config in rows[0]:
            ratios = [r[config]["speedup_vs_same_microbatches"] for r in rows]
            bubbles = [r[config]["bubble_measured"] for r in rows]
            configs[config] = {"ratios": ratios, "bubbles": bubbles}
            print(
                f"  {config:32} min {min(ratios):.3f} median "
                f"{statistics.median(ratios):.3f} max {max(ratios):.3f}   "
                + " ".join(f"{x:.3f}" for x in ratios)
            )
        summary[part] = {"configs": configs}
        one_f, interleaved = "pipeline K=2 1f1b", "pipeline K=2 interleaved V=2"
        if part == "cluster" and one_f in configs and interleaved in configs:
            reached = sum(x >= first["target"] for x in configs[one_f]["ratios"])
            lower = sum(
                a < b
                for a, b in zip(
                    configs[interleaved]["bubbles"],
                    configs[one_f]["bubbles"],
                    strict=True,
                )
            )
            print(
                f"  1F1B >= {first['target']:.2f}: {reached} of {len(runs)} runs; "
                f"interleaved bubble below 1F1B's: {lower} of {len(runs)} runs"
            )
            summary[part]["1f1b_reached_target"] = reached
            summary[part]["interleaved_bubble_lower"] = lower
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument(
        "--part", choices=["logical", "cluster", "hybrid", "all"], default="all"
    )
    parser.add_argument(
        "--model",
        choices=sorted(MODELS),
        default=None,
        help="MLP size (default: small with --quick, else deep)",
    )
    parser.add_argument(
        "--steps-per-execution",
        type=int,
        default=1,
        help="Keras steps_per_execution, the same for every configuration",
    )
    parser.add_argument(
        "--runs", type=int, default=1, help="runs in the series (default: 1)"
    )
    parser.add_argument("--out", default="pipeline_benchmark.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = args.model or ("small" if args.quick else "deep")
    spe = args.steps_per_execution
    if spe < 1:
        parser.error(f"--steps-per-execution must be at least 1, got {spe}")
    if args.child:
        # A crash in TensorFlow's native code then leaves the Python stacks.
        faulthandler.enable()
        print(json.dumps(run_part(args.part, args.quick, size, spe)))
        return
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    parts = ["logical", "cluster"] if args.part == "all" else [args.part]
    runs = []
    for run in range(args.runs):
        results = []
        for part in parts:
            if args.runs > 1:
                print(f"\nrun {run + 1}/{args.runs}", end="")
            command = [sys.executable, __file__, "--child", "--part", part]
            command += ["--model", size, "--steps-per-execution", str(spe)]
            command += ["--quick"] if args.quick else []
            result = child_result(command, name=part, out=args.out)
            print_table(result)
            results.append(result)
        runs.append(results)
    output: Any = runs[0]
    if args.runs > 1:
        output = {"runs": runs, "series": print_series(runs)}
    with open(args.out, "w") as f:
        json.dump(output, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
