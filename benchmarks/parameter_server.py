"""Benchmark: tfpar.ParameterServerStrategy on a loopback cluster.

Measures training steps per second of the same Keras model
  * through Keras `fit` under tfpar (one step per dispatch, and packed with
    `steps_per_execution`),
  * through TensorFlow's stock custom loop (`ClusterCoordinator.schedule` by
    hand, the reference for dispatch overhead),
  * in one process without any strategy,
  * with 2 workers against 1,
and the cost of one dispatch (an empty scheduled function).

A process can join only one cluster, so each cluster size runs in its own
child process; inside a child, the variants run side by side in alternating
rounds (medians reported). Prints a table of ratios and writes JSON.

Setup (also written to the JSON): a loopback `tfpar.LocalCluster` with 1 PS
and 1 or 2 workers, each task pinned round robin to one core of this
process's affinity with one intra-op thread (on 2 cores: worker 0 and the PS
share core 0, worker 1 has core 1; with 1 worker the PS has core 1); the
coordinator is not pinned. A 256-512-512-10 MLP, batch 64, SGD: every step
reads its 0.4 M weights from the PS and sends their gradients back. Every
variant does one step per dispatch except `fit_packed8`
(`steps_per_execution=8`). Each timing is one `fit` of `--steps` steps (its
per-call costs included), so short timings understate steady-state speed:
`--quick` uses 64 steps and 3 rounds.

    python benchmarks/parameter_server.py --quick --out ps.json
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import time
from typing import Any

from _child import child_result

CHILD = "--child"


def build_model(steps_per_execution: int = 1) -> Any:
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((256,)),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=steps_per_execution,
    )
    return model


def run_child(num_workers: int, steps: int, rounds: int) -> dict[str, list[float]]:
    """Runs in a child process: one cluster, variants in alternating rounds."""
    import numpy as np
    import tensorflow as tf

    import tfpar
    from tfpar import ParameterServerStrategy

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64 * 16, 256)).astype("float32")
    y = rng.integers(0, 10, size=(64 * 16,)).astype("int32")
    results: dict[str, list[float]] = {}
    with tfpar.LocalCluster(num_workers=num_workers, num_ps=1) as c:
        strategy = ParameterServerStrategy(c.cluster_resolver)
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(64).repeat()
        with strategy.scope():
            fit_model = build_model()
            packed_model = build_model(steps_per_execution=8)
            loop_model = build_model()
        local_model = build_model()
        coordinator = strategy.coordinator

        @tf.function
        def loop_step(iterator: Any) -> Any:
            return strategy.run(loop_model.train_step, args=(next(iterator),))

        @tf.function
        def empty() -> Any:
            return tf.constant(0)

        per_worker = iter(
            coordinator.create_per_worker_dataset(
                strategy.experimental_distribute_dataset(dataset)
            )
        )

        def timed(run: Any) -> float:
            start = time.perf_counter()
            run()
            return steps / (time.perf_counter() - start)

        def fit(model: Any) -> None:
            model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0)

        def loop() -> None:
            for _ in range(steps):
                coordinator.schedule(loop_step, args=(per_worker,))
            coordinator.join()

        def dispatch() -> None:
            for _ in range(steps):
                coordinator.schedule(empty)
            coordinator.join()

        variants = {
            "fit": lambda: fit(fit_model),
            "fit_packed8": lambda: fit(packed_model),
            "stock_loop": loop,
            "single_process": lambda: fit(local_model),
            "dispatch": dispatch,
        }
        if num_workers == 1:
            variants = {"fit": variants["fit"]}
        for run in variants.values():  # warm-up: tracing, dataset creation
            run()
        for _ in range(rounds):
            for name, run in variants.items():
                results.setdefault(name, []).append(timed(run))
    return results


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--out", default="parameter_server_benchmark.json")
    parser.add_argument("--steps", type=int, default=None, help="steps per timing")
    parser.add_argument("--rounds", type=int, default=None)
    args, rest = parser.parse_known_args()
    steps = args.steps or (64 if args.quick else 200)
    rounds = args.rounds or (3 if args.quick else 5)
    if CHILD in rest:
        workers = int(rest[rest.index(CHILD) + 1])
        # A crash in TensorFlow's native code then leaves the Python stacks.
        faulthandler.enable()
        print(json.dumps(run_child(workers, steps, rounds)))
        return 0

    measured: dict[int, dict[str, list[float]]] = {}
    for workers in (2, 1):
        command = [sys.executable, __file__, "--steps", str(steps)]
        command += ["--rounds", str(rounds), CHILD, str(workers)]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        measured[workers] = child_result(
            command, name=f"workers{workers}", out=args.out, env=env, timeout=1800
        )

    two = {name: median(v) for name, v in measured[2].items()}
    one = median(measured[1]["fit"])
    report = {
        "setup": {
            "cores": len(os.sched_getaffinity(0)),
            "cluster": "loopback LocalCluster, 1 PS, 1 or 2 workers",
            "pinning": "each task one core round robin (1 intra-op thread); "
            "coordinator unpinned",
            "model": "MLP 256-512-512-10, batch 64, SGD",
            "steps_per_dispatch": "1, except fit_packed8 (steps_per_execution=8)",
        },
        "steps_per_timing": steps,
        "rounds": rounds,
        "steps_per_second": {**{f"2w_{k}": v for k, v in two.items()}, "1w_fit": one},
        "ratios": {
            "fit_vs_stock_loop": two["fit"] / two["stock_loop"],
            "fit_2_workers_vs_1": two["fit"] / one,
            "fit_vs_single_process": two["fit"] / two["single_process"],
            "packed8_vs_fit": two["fit_packed8"] / two["fit"],
        },
        "dispatch_ms": 1000.0 / two["dispatch"],
        "targets": {"fit_vs_stock_loop": 0.9, "fit_2_workers_vs_1": 1.2},
        "raw": {str(k): v for k, v in measured.items()},
    }
    print(f"{'measure':32s} {'value':>10s}")
    for name, value in report["steps_per_second"].items():
        print(f"{name + ' (steps/s)':32s} {value:10.1f}")
    for name, value in report["ratios"].items():
        target = report["targets"].get(name)
        note = f"  (target >= {target})" if target else ""
        print(f"{name:32s} {value:10.2f}{note}")
    print(f"{'dispatch cost (ms)':32s} {report['dispatch_ms']:10.2f}")
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
