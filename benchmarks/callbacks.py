"""Cost of tfpar's callbacks, per source and in total, in ms per training step.

Configurations run in one process on the same compiled model, in rotating
order round after round, so drift in machine load hits all alike. Each round
is one `fit` call; the step time is the mean interval between consecutive
batch ends, so every callback hook is inside it, and the first (tracing) step
is left out. Two models: a tiny one (about 1.5 ms steps) and a medium one
(about 10 ms steps). A cost is the median over rounds of the difference to
the same round's run without tfpar callbacks ("off"), with the spread (min,
max) of those differences.

Per source (short rounds, each source sampling every `--every-steps` steps,
default 25, instead of every 10 s, so that its cost rises far above the
noise; that cost times the steps between samples is the cost of one sample):

- `host`: `DeviceUtilization(metrics=("host",))`: the psutil polling thread
  and each sample's batched summary write.
- `profiler`: `DeviceUtilization(metrics=("utilization",))`: the bounded
  profiler windows (the traced steps, the export and the parsing).
- `comm`: `CommunicationTime`: the step clock and each sample's write.
- `hooks`: the per-step Python work of both callbacks between samples,
  timed directly by calling the hooks in a loop (far below the noise of a
  step time).
- `counters`: one read of `tfpar.MirroredStrategy`'s communication counters,
  timed directly; `CommunicationTime` reads them once per sample.

TensorFlow memory info and NVML are read only for GPUs and are not exercised
on a CPU-only machine.

Totals (long rounds, about 6 s): both callbacks at their default settings
("both"), measured against "off", and derived: hooks plus every source's
sample cost times one sample per 10 s. Every round is a new `fit`, which
samples after its first step: the measured total includes that one extra
sample per round, and so is a little higher than the steady state of a long
`fit`.

These two sections (`--section models`) run on no strategy, so
`CommunicationTime` reads no counters there. The third, end to end under
each strategy (`--section strategies`, `callbacks_strategies.py`), measures
"both" against "off" under no strategy, `tfpar.MirroredStrategy` and
`tfpar.PipelineStrategy` on 2 simulated CPUs, `tfpar.ParameterServerStrategy`
on a local cluster of 2 workers and 1 PS, and
`tfpar.MultiWorkerMirroredStrategy` with 2 worker processes: each in its own
child process (or 2-worker job), with steps of about 10 ms, in alternating
rounds of two `fit` calls of 5 s (`--fit-seconds`), 20 rounds
(`--strategy-rounds`). A child that fails or outlasts its time limit is
killed with everything it started, reported with the end of its stderr (the
whole of it in `{--out}.{strategy}.stderr`), and the others still run. With
`--noise-floor`, each round also times a second `fit` without callbacks:
what two identical fits differ by on this machine, printed beside the cost.
By default (`--section all`) all three sections run, the strategies last.

Usage:

    python benchmarks/callbacks.py --out callbacks.json   # all, about 25 minutes
    python benchmarks/callbacks.py --section models       # about 6 minutes
    python benchmarks/callbacks.py --section strategies --out strategies.json
    python benchmarks/callbacks.py --section strategies --noise-floor
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
from callbacks_strategies import STRATEGIES, report_strategies, run_strategies

import tfpar
from tfpar.callbacks.cadence import Cadence
from tfpar.callbacks.communication_time import CommunicationTime
from tfpar.callbacks.device_utilization import DeviceUtilization

MODELS = {
    # name: (features, hidden width, hidden layers, batch size)
    "tiny": (32, 64, 1, 32),
    "medium": (256, 512, 2, 96),
}
SOURCES = ("host", "profiler", "comm")
NEVER = Cadence(every_steps=None, every_seconds=1e9, warmup_steps=2**62)
DEFAULT_SECONDS = 10.0  # the callbacks' default every_seconds


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


class ThroughputTimer(StepTimer):
    """Wall time per step up to the end of the epoch, for asynchronous steps.

    Under a parameter-server strategy a batch end on the coordinator means a
    step was scheduled, not run; Keras waits for every scheduled step before
    `on_epoch_end`. The time from the first batch end to the epoch's end,
    over the steps after the first, is the coordinator's throughput. Put it
    first in the callback list, so that others' epoch-end work is outside.
    """

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.ends[-1] = time.perf_counter()  # the last step ended by now


def build(name: str) -> tuple[keras.Model, tf.data.Dataset]:
    return build_model(*MODELS[name])


def build_model(
    features: int, width: int, depth: int, batch: int
) -> tuple[keras.Model, tf.data.Dataset]:
    """An MLP with layers `hidden_0`, ... and `output`, compiled, and its data."""
    layers = [keras.Input((features,))]
    layers += [
        keras.layers.Dense(width, activation="relu", name=f"hidden_{i}")
        for i in range(depth)
    ]
    model = keras.Sequential([*layers, keras.layers.Dense(1, name="output")])
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch * 64, features)).astype("float32")
    y = rng.standard_normal((batch * 64, 1)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).repeat()
    return model, data.prefetch(2)


def make_callbacks(
    config: str, log_dir: str, every_steps: int
) -> list[keras.callbacks.Callback]:
    """Builds the tfpar callbacks of one configuration."""
    every = {"every_steps": every_steps, "every_seconds": None}
    if config == "host":
        return [DeviceUtilization(log_dir, metrics=("host",), **every)]
    if config == "profiler":
        return [DeviceUtilization(log_dir, metrics=("utilization",), **every)]
    if config == "comm":
        return [CommunicationTime(log_dir, **every)]
    if config == "both":
        return [DeviceUtilization(log_dir), CommunicationTime(log_dir)]
    return []  # "off", and "again" (a second run without callbacks)


def rounds_ms(
    model: keras.Model,
    data: tf.data.Dataset,
    configs: tuple[str, ...],
    rounds: int,
    steps: int,
    every_steps: int,
    timer: StepTimer | None = None,
) -> dict[str, dict]:
    """Times `rounds` rotations of `configs`; returns each one's cost against "off".

    With two configurations the rotation alternates their order.
    """
    log_dir = tempfile.mkdtemp(prefix="tfpar-bench-")
    callbacks = {
        c: make_callbacks(c, os.path.join(log_dir, c), every_steps) for c in configs
    }
    timer = timer or StepTimer()
    times: dict[str, list[float]] = {c: [] for c in configs}
    fit = {"x": data, "steps_per_epoch": steps, "verbose": 0}
    try:
        for config in configs:  # one untimed fit each: first-use costs
            model.fit(epochs=1, callbacks=[timer, *callbacks[config]], **fit)
        for r in range(rounds):
            shift = r % len(configs)
            for config in configs[shift:] + configs[:shift]:
                model.fit(epochs=1, callbacks=[timer, *callbacks[config]], **fit)
                times[config].append(timer.step_ms())
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    result = {"off": {"step_ms": statistics.median(times["off"]), "rounds_ms": []}}
    result["off"]["rounds_ms"] = times["off"]
    for config in configs[1:]:
        pairs = list(zip(times[config], times["off"], strict=True))
        diffs = [on - off for on, off in pairs]
        percents = [100.0 * (on - off) / off for on, off in pairs]
        result[config] = {
            "step_ms": statistics.median(times[config]),
            "cost_ms": statistics.median(diffs),
            "min_ms": min(diffs),
            "max_ms": max(diffs),
            "cost_percent": statistics.median(percents),
            "min_percent": min(percents),
            "max_percent": max(percents),
            "rounds_ms": times[config],
        }
    return result


def hooks_us(model: keras.Model, calls: int = 100_000) -> float:
    """Times both callbacks' per-step hooks between samples, in us per step."""
    log_dir = tempfile.mkdtemp(prefix="tfpar-bench-")
    callbacks = [
        DeviceUtilization(log_dir, metrics=("utilization",)),
        CommunicationTime(log_dir),
    ]
    for callback in callbacks:
        callback.cadence = NEVER  # frozen option, replaced whole
        callback.set_model(model)
        callback.set_params({"epochs": 1, "steps": calls, "verbose": 0})
        callback.on_train_begin()
    start = time.perf_counter()
    for batch in range(calls):
        for callback in callbacks:
            callback.on_train_batch_begin(batch)
        for callback in callbacks:
            callback.on_train_batch_end(batch, {})
    elapsed = time.perf_counter() - start
    for callback in callbacks:
        callback.on_train_end()
    shutil.rmtree(log_dir, ignore_errors=True)
    return 1e6 * elapsed / calls


def counters_read_us(reads: int = 200) -> float:
    """Returns the time of one `communication_stats()` read, in microseconds."""
    strategy = tfpar.MirroredStrategy(["/cpu:0"])
    strategy.communication_stats()
    start = time.perf_counter()
    for _ in range(reads):
        strategy.communication_stats()
    return 1e6 * (time.perf_counter() - start) / reads


def measure(
    name: str, rounds: int, steps: tuple[int, int], every_steps: int, counters: float
) -> dict:
    """Measures every source and the totals on one model."""
    model, data = build(name)
    model.fit(x=data, steps_per_epoch=3, verbose=0)  # trace once
    sources = rounds_ms(model, data, ("off", *SOURCES), rounds, steps[0], every_steps)
    totals = rounds_ms(model, data, ("off", "both"), rounds, steps[1], every_steps)
    off_ms = totals["off"]["step_ms"]
    samples_per_step = off_ms / (DEFAULT_SECONDS * 1000.0)
    hooks = hooks_us(model) / 1000.0
    derived = hooks + counters / 1000.0 * samples_per_step
    for source in SOURCES:
        cost = sources[source]
        cost["per_sample_ms"] = cost["cost_ms"] * every_steps
        cost["at_default_ms"] = cost["per_sample_ms"] * samples_per_step
        derived += max(0.0, cost["at_default_ms"])
    both = totals["both"]
    return {
        "model": name,
        "every_steps": every_steps,
        "rounds": rounds,
        "source_round_steps": steps[0],
        "total_round_steps": steps[1],
        "off_ms": off_ms,
        "sources": sources,
        "hooks_ms": hooks,
        "counters_read_ms": counters / 1000.0,
        "totals": totals,
        "default_derived_ms": derived,
        "default_derived_percent": 100.0 * derived / off_ms,
        "default_measured_ms": both["cost_ms"],
        "default_measured_percent": 100.0 * both["cost_ms"] / off_ms,
    }


def report(results: list[dict]) -> None:
    for r in results:
        src = r["sources"]
        print(
            f"\n{r['model']}: {r['off_ms']:.3f} ms/step without callbacks; "
            f"{r['rounds']} rounds; sources sample every {r['every_steps']} steps"
        )
        print(
            f"  {'source':9} {'cost ms/step':>12} {'spread':>18} "
            f"{'ms/sample':>10} {'at 10 s cadence':>16}"
        )
        for source in SOURCES:
            c = src[source]
            spread = f"[{c['min_ms']:+.3f}, {c['max_ms']:+.3f}]"
            print(
                f"  {source:9} {c['cost_ms']:+12.4f} {spread:>18} "
                f"{c['per_sample_ms']:10.2f} {c['at_default_ms']:+16.4f}"
            )
        print(f"  {'hooks':9} {r['hooks_ms']:+12.4f} {'(timed directly)':>18}")
        print(
            f"  {'counters':9} {'':>12} {'(timed directly)':>18} "
            f"{r['counters_read_ms']:10.2f}"
        )
        both = r["totals"]["both"]
        print(
            f"  total at defaults: derived {r['default_derived_ms']:+.4f} ms/step "
            f"({r['default_derived_percent']:+.2f}%); measured "
            f"{both['cost_ms']:+.4f} ms/step ({r['default_measured_percent']:+.2f}%)"
            f", spread [{both['min_ms']:+.3f}, {both['max_ms']:+.3f}], over "
            f"{r['total_round_steps']}-step rounds"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (smoke test)")
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument(
        "--section",
        choices=("models", "strategies", "all"),
        default="all",
        help="per source and totals on each model, end to end under each "
        "strategy, or both (the default)",
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds per model")
    parser.add_argument(
        "--models", default=",".join(MODELS), help="comma-separated model names"
    )
    parser.add_argument(
        "--every-steps",
        type=int,
        default=25,
        help="steps between samples of the per-source configurations",
    )
    parser.add_argument(
        "--strategies",
        default=",".join(STRATEGIES),
        help="comma-separated strategies of the strategies section",
    )
    parser.add_argument(
        "--strategy-rounds",
        type=int,
        default=None,
        help="rounds per strategy (default 20; 2 with --quick)",
    )
    parser.add_argument(
        "--noise-floor",
        action="store_true",
        help="under each strategy, also time a second fit without callbacks "
        "per round (the machine's own scatter; 1.5x the time)",
    )
    parser.add_argument(
        "--fit-seconds",
        type=float,
        default=None,
        help="seconds of one fit under a strategy (default 5; 1 with --quick)",
    )
    args = parser.parse_args()
    models = args.models.split(",")
    if set(models) - set(MODELS):
        parser.error(f"unknown --models {models}; valid: {list(MODELS)}")
    strategies = args.strategies.split(",")
    if set(strategies) - set(STRATEGIES):
        parser.error(f"unknown --strategies {strategies}; valid: {list(STRATEGIES)}")
    output: dict = {"quick": args.quick}
    if args.section in ("models", "all"):
        output["results"] = run_models(args, models)
    if args.section in ("strategies", "all"):
        rounds = args.strategy_rounds or (2 if args.quick else 20)
        fit_seconds = args.fit_seconds or (1.0 if args.quick else 5.0)
        if rounds < 1 or fit_seconds <= 0:
            parser.error("--strategy-rounds and --fit-seconds must be positive")
        output["strategies"] = run_strategies(
            strategies, rounds, fit_seconds, args.out, args.noise_floor
        )
        report_strategies(output["strategies"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(output, f, indent=2)


def run_models(args: argparse.Namespace, models: list[str]) -> list[dict]:
    """The per-source and total sections, in this process, on each model."""
    rounds = args.rounds or (3 if args.quick else 8)
    # (steps per source round, steps per total round): about 1.5 s and 6 s.
    steps = {
        "tiny": (300, 600) if args.quick else (1000, 4000),
        "medium": (60, 120) if args.quick else (180, 700),
    }
    counters = counters_read_us()
    results = [measure(m, rounds, steps[m], args.every_steps, counters) for m in models]
    report(results)
    return results


if __name__ == "__main__":
    main()
