"""The callbacks' cost end to end under each strategy (`callbacks.py`'s section).

`benchmarks/callbacks.py --section strategies` runs this. Each strategy runs
in its own child process (a 2-worker job for the multi-worker strategy),
because TensorFlow configures devices and clusters once per process:

- `none`: one device, no strategy.
- `mirrored`: `tfpar.MirroredStrategy` on 2 simulated CPUs.
- `pipeline`: `tfpar.PipelineStrategy` on 2 simulated CPUs, 2 micro-batches,
  the model cut before its second hidden layer.
- `parameter_server`: `tfpar.ParameterServerStrategy` on a
  `tfpar.LocalCluster` of 2 workers and 1 parameter server, not pinned.
- `multi_worker`: `tfpar.MultiWorkerMirroredStrategy`, 2 worker processes
  started by `tfpar launch --pin-cores` (one core and one intra-op thread
  each, as in `benchmarks/multi_worker.py`). Both workers run the same fits
  in the same order (each `fit` is collective); worker 0 reports.

In each, one model (the medium MLP, its global batch chosen per strategy
for steps of roughly 10 ms, `BATCHES`; the measured step is reported) trains
in rounds of two `fit` calls of the same length, in alternating order: "off"
(no tfpar callback) and "both" (`DeviceUtilization` and `CommunicationTime`
at their defaults). The callbacks sample right after a `fit`'s first step,
then every 10 s: a `fit` of 5 s (the default) samples once, twice as often
as a long `fit`, so the measured cost is an upper bound of the steady
state. (Their end-of-training writes fall after the last timed step.)
The step time is that of `callbacks.StepTimer`: the mean interval between
batch ends, step 0 left out. Under the parameter-server strategy a batch end
only schedules a step, so the time is the coordinator's throughput
(`callbacks.ThroughputTimer`): from the first batch end until every
scheduled step has run, per step.
A round's cost is "both" minus "off", in ms per step and in % of "off".

With `--noise-floor`, each round also times a second `fit` without
callbacks ("again", in the same rotation): "again" minus "off" is what the
machine alone makes of two identical fits. Its median and the median's 95 %
confidence interval are printed beside the cost's, so a run shows whether its
rounds could resolve a cost of 1 % at all.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import math
import os
import signal
import statistics
import subprocess
import sys
from typing import Any

STRATEGIES = ("none", "mirrored", "pipeline", "parameter_server", "multi_worker")
# The global batch of the medium MLP (`callbacks.MODELS`) under each strategy,
# for steps of about `STEP_MS` on the 2-core development machine.
BATCHES = {
    "none": 1024,
    "mirrored": 640,
    "pipeline": 704,
    "parameter_server": 96,  # the step's dispatch dominates
    "multi_worker": 192,
}
STEP_MS = 10.0  # sets the steps of a `fit` of given seconds
PIPELINE_CUT = ["hidden_1"]  # the first layer of stage 1
SETUP_SECONDS = 240  # a child's start, cluster, traces and warm-up, at most
SCRIPT = os.path.abspath(__file__)


# ---------------------------------------------------------------- children


def _strategy(kind: str, stack: contextlib.ExitStack) -> Any:
    """Creates `kind`'s strategy, before TensorFlow runs any op."""
    import tfpar

    if kind == "multi_worker":
        return tfpar.MultiWorkerMirroredStrategy()
    if kind == "parameter_server":
        cluster = stack.enter_context(
            tfpar.LocalCluster(num_workers=2, num_ps=1, pin_cores=False)
        )
        return tfpar.ParameterServerStrategy(cluster.cluster_resolver)
    if kind == "none":
        return None
    tfpar.simulate_devices(2)
    if kind == "mirrored":
        return tfpar.MirroredStrategy()
    return tfpar.PipelineStrategy(num_microbatches=2, partition=PIPELINE_CUT)


def child(kind: str, rounds: int, steps: int, noise_floor: bool) -> dict[str, Any]:
    """Times off and both callbacks in alternating rounds under `kind`, and,
    with `noise_floor`, a second fit without callbacks in each round."""
    with contextlib.ExitStack() as stack:
        strategy = _strategy(kind, stack)
        import callbacks  # TensorFlow and Keras, after the strategy

        features, width, depth, _ = callbacks.MODELS["medium"]
        shape = (features, width, depth, BATCHES[kind])
        scope = strategy.scope() if strategy else contextlib.nullcontext()
        with scope:
            model, data = callbacks.build_model(*shape)
        model.fit(x=data, steps_per_epoch=3, verbose=0)  # trace once
        throughput = kind == "parameter_server"
        timer = callbacks.ThroughputTimer() if throughput else callbacks.StepTimer()
        # `every_steps` is for the per-source configurations: "both" keeps
        # the callbacks' defaults.
        configs = ("off", "both", "again") if noise_floor else ("off", "both")
        result = callbacks.rounds_ms(
            model, data, configs, rounds, steps, every_steps=1, timer=timer
        )
        task = strategy.cluster_resolver.task_id if kind == "multi_worker" else 0
    return {
        "strategy": kind,
        "task": task,
        "model": dict(zip(("features", "width", "depth", "batch"), shape, strict=True)),
        "timing": "throughput" if throughput else "batch ends",
        "steps_per_fit": steps,
        "rounds": rounds,
        **result,
    }


# ------------------------------------------------------------------ driver


def run_part(
    kind: str,
    rounds: int,
    steps: int,
    timeout: float,
    out: str | None,
    noise_floor: bool,
) -> dict[str, Any]:
    """Runs `kind` in its child process(es); returns its result or its failure.

    The child runs in its own session; on timeout (or an interrupt here)
    that whole session is killed. Workers and servers it started die with it
    (`tfpar launch` and `LocalCluster` give them a parent-death signal).
    """
    command = [sys.executable, SCRIPT, kind, str(rounds), str(steps)]
    command += ["noise-floor"] if noise_floor else []
    if kind == "multi_worker":
        launch = [sys.executable, "-m", "tfpar", "launch", "--workers", "2"]
        command = [*launch, "--pin-cores", "--", *command]
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    error = None
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        error = f"timed out after {timeout:.0f} s"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
    found = [
        json.loads(line.split("RESULT ", 1)[1])
        for line in stdout.splitlines()
        if "RESULT " in line
    ]
    mine = [r for r in found if r["task"] == 0]
    if error is None and (proc.returncode != 0 or not mine):
        error = f"exit status {proc.returncode}"
    if error is None:
        return mine[0]
    print(f"\n{kind} failed ({error}); the end of its stderr:", file=sys.stderr)
    print(stderr[-3000:], file=sys.stderr)
    failure = {"strategy": kind, "error": error, "stderr_tail": stderr[-3000:]}
    if out:
        failure["stderr_file"] = f"{out}.{kind}.stderr"
        with open(failure["stderr_file"], "w") as f:
            f.write(stderr)
    return failure


def run_strategies(
    kinds: list[str],
    rounds: int,
    fit_seconds: float,
    out: str | None,
    noise_floor: bool = False,
) -> list[dict[str, Any]]:
    """Runs every strategy's part in turn; a failed part does not stop the rest."""
    results = []
    fits = 3 if noise_floor else 2
    for kind in kinds:
        steps = max(10, round(1000.0 * fit_seconds / STEP_MS))
        timeout = SETUP_SECONDS + 3 * (rounds + 1) * fits * fit_seconds
        print(f"{kind}: {rounds} rounds of {fits} fits of {steps} steps", flush=True)
        results.append(run_part(kind, rounds, steps, timeout, out, noise_floor))
    return results


def report_strategies(results: list[dict[str, Any]]) -> None:
    """Prints one row per strategy: the off step, the cost and its spread."""
    print(
        "\nend to end under each strategy: both callbacks at their defaults "
        "against none, in alternating rounds; they sample after a fit's first "
        "step, then every 10 s"
    )
    print(
        f"  {'strategy':17} {'step ms':>8} {'cost ms/step':>12} {'min, max':>18} "
        f"{'cost %':>7} {'95% CI %':>16} {'min, max %':>16} {'mean % ± se':>13} "
        f"{'rounds':>6} {'fit s':>5}"
    )
    for r in results:
        if "error" in r:
            print(f"  {r['strategy']:17} failed: {r['error']}")
            continue
        b, off_ms = r["both"], r["off"]["step_ms"]
        mark = "*" if r["timing"] == "throughput" else ""
        b["median_ci_percent"] = list(_median_ci(_costs(r)))
        print(
            f"  {r['strategy'] + mark:17} {off_ms:8.2f} "
            f"{b['cost_ms']:+12.3f} {_span(b['min_ms'], b['max_ms'], 3):>18} "
            f"{b['cost_percent']:+7.2f} "
            f"{_span(*b['median_ci_percent'], 2):>16} "
            f"{_span(b['min_percent'], b['max_percent'], 2):>16} "
            f"{_mean_se(r)[0]:+6.2f} ± {_mean_se(r)[1]:4.2f} "
            f"{r['rounds']:6d} {r['steps_per_fit'] * off_ms / 1000.0:5.1f}"
        )
    floors = [r for r in results if "again" in r]
    if floors:
        print(
            "\n  noise floor: a second fit without callbacks against the first, "
            "in the same rounds"
        )
        print(f"  {'strategy':17} {'median %':>8} {'95% CI %':>16} {'min, max %':>16}")
    for r in floors:
        a = r["again"]
        a["median_ci_percent"] = list(_median_ci(_costs(r, "again")))
        print(
            f"  {r['strategy']:17} {a['cost_percent']:+8.2f} "
            f"{_span(*a['median_ci_percent'], 2):>16} "
            f"{_span(a['min_percent'], a['max_percent'], 2):>16}"
        )
    if any(r.get("timing") == "throughput" for r in results):
        print(
            "  * coordinator's wall time per step, from the first batch end until"
            " every scheduled step has run"
        )
    done = [r for r in results if "error" not in r]
    if not done:
        return
    complete = len(done) == len(results)
    # A few fits stalled by 5 to 20% on this shared machine dominate a mean;
    # the median cost's distribution-free 95% confidence interval decides.
    cis = [r["both"]["median_ci_percent"] for r in done]
    print(
        "  goal, a median cost of at most 1% under every strategy (the upper "
        "end of its 95% confidence interval, from the sign test): "
        + _verdict(complete, [hi for _, hi in cis], [lo for lo, _ in cis])
    )
    means = [_mean_se(r) for r in done]
    print(
        "  the same for the mean cost (mean + 2 standard errors): "
        + _verdict(
            complete, [m + 2 * se for m, se in means], [m - 2 * se for m, se in means]
        )
    )
    if floors:
        # Two fits without callbacks differ by nothing but the machine: an
        # interval of theirs reaching past 1% says these rounds are too few
        # (or the machine too noisy) to decide the goal either way.
        widest = max(
            max(abs(x) for x in r["again"]["median_ci_percent"]) for r in floors
        )
        print(
            "  the noise floor's 95% confidence intervals reach "
            f"{widest:.2f}% (at most 1% is needed to resolve the goal)"
        )


def _verdict(complete: bool, highs: list[float], lows: list[float]) -> str:
    """Met if every upper bound is at most 1%; not met if a lower one is above."""
    if complete and all(high <= 1.0 for high in highs):
        return "met"
    if any(low > 1.0 for low in lows):
        return "NOT met"
    return "not resolved: the rounds scatter more than the goal"


def _costs(result: dict[str, Any], config: str = "both") -> list[float]:
    """Each round's cost of `config`, in % of that round's step without
    callbacks."""
    return [
        100.0 * (on - off) / off
        for on, off in zip(
            result[config]["rounds_ms"], result["off"]["rounds_ms"], strict=True
        )
    ]


def _median_ci(costs: list[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval of the median (the sign test).

    The k-th smallest and k-th largest of n values bound the median with
    probability 1 - 2 P(Binomial(n, 1/2) < k); k is the largest that keeps
    this at least `level` (the whole range if none does, below 6 rounds).
    """
    ordered, n = sorted(costs), len(costs)
    k = 1
    while k < n // 2:
        tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
        if 1 - 2 * tail < level:
            break
        k += 1
    return ordered[k - 1], ordered[n - k]


def _mean_se(result: dict[str, Any]) -> tuple[float, float]:
    """The mean cost over rounds, in %, and its standard error."""
    costs = _costs(result)
    if len(costs) < 2:
        return statistics.fmean(costs), float("inf")
    return statistics.fmean(costs), statistics.stdev(costs) / len(costs) ** 0.5


def _span(low: float, high: float, digits: int) -> str:
    return f"[{low:+.{digits}f}, {high:+.{digits}f}]"


def main() -> None:
    kind, rounds, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    noise_floor = sys.argv[4:] == ["noise-floor"]
    # A crash in TensorFlow's native code then leaves the Python stacks.
    faulthandler.enable()
    print("RESULT " + json.dumps(child(kind, rounds, steps, noise_floor)), flush=True)


if __name__ == "__main__":
    main()
