"""Benchmark of tfpar.MirroredStrategy on simulated CPU devices.

Everything runs in one process, side by side, in alternating rounds (so drift
in machine load hits every variant alike); each table cell is the median over
rounds. Sections:

1. overhead: steps/s of tfpar.MirroredStrategy (measurements on) over stock
   `tf.distribute.MirroredStrategy`, same model and data, under `fit`
   (target >= 0.97), and the ratio of process CPU time per step, which a
   machine shared with other jobs distorts much less.
2. scaling: steps/s of 2 replicas over 1 device on a compute-bound MLP, under
   `fit` and in a hand-written `strategy.run` loop.
3. per-step cost: ms per step on a tiny model, 1 device vs stock vs tfpar.
4. all-reduce bus bandwidth over message sizes (1 KB to 64 MB).
5. per-epoch cost: seconds per `fit` epoch of two tiny steps.
6. cluster scaling: steps/s under `fit` of tfpar.MirroredStrategy with one
   replica per pinned worker process of a `tfpar.LocalCluster` (2 workers over
   1 worker, same model and global batch; target >= 1.3). Runs last, since
   connecting to a cluster changes the process's devices for good.

Usage: `python benchmarks/mirrored.py [--quick] [--cluster-only] [--out FILE.json]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tfpar

tfpar.simulate_devices(2)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfpar.strategies.mirrored.strategy import MirroredStrategy  # noqa: E402

DEVICES = ["/device:CPU:0", "/device:CPU:1"]
# CPU seconds per step of every `fit_runner` run, keyed by the runner's id.
CPU_PER_STEP: dict[int, list[float]] = {}


def _mlp(width: int, depth: int, inputs: int = 256) -> keras.Model:
    keras.utils.set_random_seed(0)
    layers = [keras.Input((inputs,))]
    layers += [keras.layers.Dense(width, activation="relu") for _ in range(depth)]
    model = keras.Sequential([*layers, keras.layers.Dense(10)])
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


class _StepTimer(keras.callbacks.Callback):
    """Times the steady state of one epoch: batches after `skip`, to the last.

    Records wall-clock steps/s and process CPU seconds per step; on a shared
    machine the CPU time is the steadier of the two.
    """

    def __init__(self, skip: int) -> None:
        super().__init__()
        self.skip = skip
        self.steps_per_second = 0.0
        self.cpu_per_step = 0.0

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        if batch == self.skip:
            self._start = time.perf_counter()
            self._cpu = _cpu_seconds()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if batch >= self.skip:
            steps = batch - self.skip + 1
            self.steps_per_second = steps / (time.perf_counter() - self._start)
            self.cpu_per_step = (_cpu_seconds() - self._cpu) / steps


def fit_runner(
    strategy: tf.distribute.Strategy | None,
    width: int,
    depth: int,
    batch: int,
    steps: int,
) -> Callable[[], float]:
    """Builds a model under `strategy`; returns a function timing one epoch."""
    rng = np.random.default_rng(0)
    x = rng.random((batch * steps, 256), dtype=np.float32)
    y = rng.integers(0, 10, batch * steps)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).prefetch(2)
    if strategy is None:
        model = _mlp(width, depth)
    else:
        with strategy.scope():
            model = _mlp(width, depth)
    model.fit(dataset, epochs=1, verbose=0)  # trace and warm up
    timer = _StepTimer(skip=min(3, steps // 3))

    def run() -> float:
        model.fit(dataset, epochs=1, verbose=0, callbacks=[timer])
        CPU_PER_STEP.setdefault(id(run), []).append(timer.cpu_per_step)
        return timer.steps_per_second

    return run


def loop_runner(
    strategy: tf.distribute.Strategy, width: int, depth: int, batch: int, steps: int
) -> Callable[[], float]:
    """A hand-written `strategy.run` loop over the same model and data."""
    rng = np.random.default_rng(0)
    x = rng.random((batch * steps, 256), dtype=np.float32)
    y = rng.integers(0, 10, batch * steps)
    with strategy.scope():
        model = _mlp(width, depth)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="sum"
    )
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).prefetch(2)
    )

    @tf.function
    def step(iterator: tf.distribute.DistributedIterator) -> tf.Tensor:
        def replica(xb: tf.Tensor, yb: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape() as tape:
                loss = loss_fn(yb, model(xb, training=True)) / batch
            grads = tape.gradient(loss, model.trainable_variables)
            model.optimizer.apply_gradients(
                zip(grads, model.trainable_variables, strict=True)
            )
            return loss

        return strategy.reduce(
            "SUM", strategy.run(replica, args=next(iterator)), axis=None
        )

    def run() -> float:
        iterator = iter(dataset)
        skip = min(3, steps // 3)
        for _ in range(skip):
            step(iterator)
        start = time.perf_counter()
        for _ in range(steps - skip):
            loss = step(iterator)
        loss.numpy()
        return (steps - skip) / (time.perf_counter() - start)

    run()  # trace
    return run


def alternate(
    runners: dict[str, Callable[[], float]], rounds: int
) -> dict[str, list[float]]:
    """Runs every runner once per round, in turn; returns all samples."""
    samples: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            samples[name].append(run())
    return samples


def ratio(samples: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of the per-round ratio `num / den`."""
    return statistics.median(
        a / b for a, b in zip(samples[num], samples[den], strict=True)
    )


def bus_bandwidth(
    strategy: tf.distribute.Strategy, sizes: list[int], repeats: int
) -> dict[int, float]:
    """All-reduce bus bandwidth (GB/s) per message size in bytes.

    Bus bandwidth = bytes / time * 2 (n - 1) / n, NCCL's convention: what
    each link carries in a ring all-reduce, comparable across device counts.
    """
    n = strategy.num_replicas_in_sync
    result = {}
    for size in sizes:
        values = strategy.experimental_distribute_values_from_function(
            lambda ctx, size=size: tf.ones([size // 4], tf.float32)
        )

        @tf.function
        def reduce(
            v: tf.distribute.DistributedValues,
        ) -> tf.distribute.DistributedValues:
            return strategy.run(
                lambda t: tf.distribute.get_replica_context().all_reduce("SUM", [t])[0],
                args=(v,),
            )

        reduce(values)
        start = time.perf_counter()
        for _ in range(repeats):
            out = reduce(values)
        strategy.experimental_local_results(out)[0].numpy()
        seconds = (time.perf_counter() - start) / repeats
        result[size] = size / seconds * 2 * (n - 1) / n / 1e9
    return result


def epoch_cost(strategy: tf.distribute.Strategy | None, epochs: int) -> float:
    """Seconds per epoch of `fit` over 2 batches of a tiny model (steps ~ms)."""
    x = np.zeros((32, 256), np.float32)
    y = np.zeros(32, np.int64)
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        model = _mlp(8, 1)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    start = time.perf_counter()
    model.fit(x, y, batch_size=16, epochs=epochs, verbose=0)
    return (time.perf_counter() - start) / epochs


def cluster_scaling(
    batches: list[int], width: int, steps: int, rounds: int
) -> dict[str, dict[str, list[float]]]:
    """Steps/s under `fit`: 2 pinned cluster workers against 1, per global batch."""
    result = {}
    with tfpar.LocalCluster(num_workers=2, pin_cores=True) as cluster:
        devices = cluster.connect()
        for batch in batches:
            runners = {
                "1 worker": fit_runner(
                    MirroredStrategy(devices[:1]), width, 2, batch, steps
                ),
                "2 workers": fit_runner(
                    MirroredStrategy(devices), width, 2, batch, steps
                ),
            }
            result[f"global batch {batch}"] = alternate(runners, rounds)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (smoke test)")
    parser.add_argument(
        "--out", default="mirrored_benchmark.json", help="JSON output file"
    )
    parser.add_argument(
        "--cluster-only", action="store_true", help="only section 6 (cluster scaling)"
    )
    args = parser.parse_args()
    rounds = 2 if args.quick else 7
    steps = 12 if args.quick else 60
    report: dict[str, object] = {
        "quick": args.quick,
        "rounds": rounds,
        "devices": DEVICES,
    }
    if not args.cluster_only:
        local_sections(args.quick, rounds, steps, report)
    # 6: one replica per pinned worker process; last (connecting is for good).
    width = 1024
    scaling = cluster_scaling(
        [256, 1024], width, 10 if args.quick else 30, 3 if args.quick else 5
    )
    cluster_rows = [
        (f"{name}: 2 workers / 1 (target >= 1.3)", ratio(s, "2 workers", "1 worker"))
        for name, s in scaling.items()
    ]
    report["cluster_scaling"] = {
        "model": f"MLP 256-{width}-{width}-10 under fit, tfpar.MirroredStrategy, "
        "LocalCluster(pin_cores=True)",
        "steps_per_second": scaling,
        "ratios": dict(cluster_rows),
    }
    print(f"\n{'cluster workers, ratio of steps/s':46s} value")
    for name, value in cluster_rows:
        print(f"{name:46s} {value:5.2f}")
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {args.out}")


def local_sections(
    quick: bool, rounds: int, steps: int, report: dict[str, object]
) -> None:
    """Sections 1 to 5, on the two simulated devices; prints their tables."""
    stock = tf.distribute.MirroredStrategy(DEVICES)
    ours = MirroredStrategy(DEVICES)
    one = tf.distribute.OneDeviceStrategy(DEVICES[0])

    # 1 + 2: compute-bound MLP under fit, and in a hand-written loop.
    width = 512 if quick else 1024
    runners = {
        "1 device fit": fit_runner(None, width, 2, 256, steps),
        "stock fit": fit_runner(stock, width, 2, 256, steps),
        "tfpar fit": fit_runner(ours, width, 2, 256, steps),
        "1 device loop": loop_runner(one, width, 2, 256, steps),
        "stock loop": loop_runner(stock, width, 2, 256, steps),
    }
    fit = alternate(runners, rounds)
    cpu = {
        k: CPU_PER_STEP[id(runners[k])]
        for k in ("1 device fit", "stock fit", "tfpar fit")
    }
    rows = [
        ("tfpar / stock, fit (target >= 0.97)", ratio(fit, "tfpar fit", "stock fit")),
        ("stock 2 dev / 1 dev, fit", ratio(fit, "stock fit", "1 device fit")),
        (
            "tfpar 2 dev / 1 dev, fit (target >= 1.3)",
            ratio(fit, "tfpar fit", "1 device fit"),
        ),
        ("stock 2 dev / 1 dev, loop", ratio(fit, "stock loop", "1 device loop")),
        ("1 dev fit / 1 dev loop", ratio(fit, "1 device fit", "1 device loop")),
    ]
    cpu_rows = [
        ("tfpar / stock, fit (target <= 1.03)", ratio(cpu, "tfpar fit", "stock fit")),
        ("stock 2 dev / 1 dev, fit", ratio(cpu, "stock fit", "1 device fit")),
    ]
    report["compute_bound_cpu_seconds_per_step"] = {
        "samples": cpu,
        "ratios": dict(cpu_rows),
    }
    report["compute_bound"] = {
        "model": f"MLP 256-{width}-{width}-10, global batch 256",
        "steps_per_second": fit,
        "ratios": dict(rows),
    }

    # 3: fixed per-step cost on a tiny model.
    tiny = alternate(
        {
            "1 device": fit_runner(None, 8, 1, 16, steps * 2),
            "stock": fit_runner(stock, 8, 1, 16, steps * 2),
            "tfpar": fit_runner(ours, 8, 1, 16, steps * 2),
        },
        rounds,
    )
    ms = {k: 1000 / statistics.median(v) for k, v in tiny.items()}
    report["tiny_ms_per_step"] = ms

    # 4: bus bandwidth.
    sizes = [1 << 10, 1 << 16, 1 << 20, 1 << 24] + ([] if quick else [1 << 26])
    bandwidth = {
        "stock": bus_bandwidth(stock, sizes, 3 if quick else 20),
        "tfpar": bus_bandwidth(ours, sizes, 3 if quick else 20),
    }
    report["bus_bandwidth_gb_per_s"] = {
        k: {str(s): g for s, g in v.items()} for k, v in bandwidth.items()
    }

    # 5: per-epoch cost outside the steps.
    epochs = 3 if quick else 10
    report["epoch_seconds"] = {
        "1 device": epoch_cost(None, epochs),
        "stock": epoch_cost(stock, epochs),
        "tfpar": epoch_cost(ours, epochs),
    }

    print(
        f"\ntfpar.MirroredStrategy benchmark ({'quick' if quick else 'full'}, "
        f"{rounds} alternating rounds, median)"
    )
    print(f"{'ratio of steps/s':46s} value")
    for name, value in rows:
        print(f"{name:46s} {value:5.2f}")
    print(f"\n{'ratio of CPU seconds per step (steadier)':46s} value")
    for name, value in cpu_rows:
        print(f"{name:46s} {value:5.2f}")
    print(f"\n{'tiny model, ms per step':46s} value")
    for name, value in ms.items():
        print(f"{name:46s} {value:5.2f}")
    print(f"{'  stock adds':46s} {ms['stock'] - ms['1 device']:5.2f}")
    print(f"{'  tfpar adds over stock':46s} {ms['tfpar'] - ms['stock']:5.2f}")
    print(f"\n{'all-reduce bus bandwidth, GB/s':30s} {'stock':>8s} {'tfpar':>8s}")
    for size in sizes:
        print(
            f"{_human(size):30s} {bandwidth['stock'][size]:8.3f} {bandwidth['tfpar'][size]:8.3f}"
        )
    print(f"\n{'fit seconds per 2-step epoch, tiny model':46s} value")
    for name, value in report["epoch_seconds"].items():  # type: ignore[attr-defined]
        print(f"{name:46s} {value:5.2f}")


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size} {unit}"
        size //= 1024
    return f"{size} GB"


if __name__ == "__main__":
    main()
