"""The Keras compatibility matrix: every feature under every tfpar strategy.

Each cell must work or be refused at once (see `cells.judge`), and agree with
docs/compatibility.md. The mirrored and pipeline strategies run in this
process on its 2 simulated devices, one strategy object for all their cells,
so a failed fit must leave it usable for the next cell. The parameter-server
and multi-worker strategies run every cell in one child (one cluster), whose
verdicts the first of their cells collects.

With `TFPAR_COMPAT_RESULTS` set, each verdict is appended to that file (JSON
lines) and the page is not checked: `docs/scripts/compatibility.py` does
this to regenerate the page.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

import pytest

import tfpar
from tests._subprocess import kill_all, start_workers
from tests.compatibility import table
from tests.compatibility.cells import CELL_TAG, STRATEGIES, SYNCHRONOUS, judge
from tests.compatibility.features import FEATURES, FEATURES_BY_NAME, Context

pytestmark = pytest.mark.timeout(600)

ROOT = pathlib.Path(__file__).parents[2]
CHILD_TIMEOUT = 420.0


def _in_process(name: str) -> Any:
    return {
        "mirrored": tfpar.MirroredStrategy,
        "pipeline": lambda: tfpar.PipelineStrategy(num_microbatches=4),
    }[name]()


def _parse(stdout: str) -> dict[str, dict[str, Any]]:
    verdicts = {}
    for line in stdout.splitlines():
        if line.startswith(f"{CELL_TAG} "):
            verdict = json.loads(line[len(CELL_TAG) + 1 :])
            verdicts[verdict.pop("feature")] = verdict
    return verdicts


def _run_children(name: str) -> tuple[list[dict[str, dict[str, Any]]], str]:
    """Every cell of `name` in its child (or its workers): verdicts and output."""
    code = f"from tests.compatibility.cells import main; main({name!r})"
    env = {"PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    count = 2 if name == "multi_worker" else 1
    if count > 1:
        procs, _ = start_workers(code, count, env=env)
    else:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, **env},
            )
        ]
    deadline = time.monotonic() + CHILD_TIMEOUT
    outputs = []
    try:
        for proc in procs:
            try:
                out, err = proc.communicate(
                    timeout=max(1.0, deadline - time.monotonic())
                )
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                err += f"\n(killed after {CHILD_TIMEOUT:.0f} s)"
            outputs.append((out, err, proc.returncode))
    finally:
        kill_all(procs)
    log = "\n".join(
        f"--- child {i} exited with {code}\n{err[-3000:]}"
        for i, (_, err, code) in enumerate(outputs)
    )
    return [_parse(out) for out, _, _ in outputs], log


@pytest.fixture(scope="module")
def strategies() -> dict[str, Any]:
    """Strategy objects and child verdicts, each made once, on first use."""
    return {}


def _verdict(name: str, feature: str, cache: dict[str, Any], tmp: str) -> Any:
    if name in SYNCHRONOUS and name != "multi_worker":
        if name not in cache:
            cache[name] = _in_process(name)
        ctx = Context(cache[name], True, tmp)
        return judge(FEATURES_BY_NAME[feature], name, ctx)
    if name not in cache:
        cache[name] = _run_children(name)
    per_child, log = cache[name]
    verdicts = [v.get(feature) for v in per_child]
    if any(v is None for v in verdicts):
        pytest.fail(f"the {name} child gave no verdict for {feature}:\n{log}")
    # Workers run the same program: their verdicts must agree.
    outcomes = {v["outcome"] for v in verdicts}
    assert len(outcomes) == 1, f"workers disagree: {verdicts}"
    return verdicts[0]


def _record(name: str, feature: str, verdict: dict[str, Any]) -> None:
    path = os.environ.get("TFPAR_COMPAT_RESULTS")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({"strategy": name, "feature": feature, **verdict}))
            out.write("\n")


@pytest.mark.parametrize("feature", [f.name for f in FEATURES])
@pytest.mark.parametrize(
    "name",
    [
        "mirrored",
        "pipeline",
        pytest.param("parameter_server", marks=pytest.mark.cluster),
        pytest.param("multi_worker", marks=pytest.mark.cluster),
    ],
)
def test_cell(name: str, feature: str, strategies: dict[str, Any], tmp_path) -> None:
    verdict = _verdict(name, feature, strategies, str(tmp_path))
    _record(name, feature, verdict)
    assert verdict["outcome"] in ("works", "refused"), (
        f"{STRATEGIES[name]} + {feature} fails: {verdict['detail']}\n"
        f"{verdict.get('stack', '')}"
    )
    if not os.environ.get("TFPAR_COMPAT_RESULTS"):
        page = table.PAGE.read_text() if table.PAGE.exists() else ""
        documented = table.documented(page).get((name, feature))
        assert documented == verdict["outcome"], (
            f"docs/compatibility.md says {documented!r} for {STRATEGIES[name]} + "
            f"{feature}, the matrix found {verdict['outcome']!r}: run "
            "docs/scripts/compatibility.py"
        )
