"""The Keras compatibility matrix: every feature under every tfpar strategy.

Each cell must work or be refused at once (see `cells.judge`), and agree with
docs/compatibility.md. The mirrored and pipeline strategies run in this
process on its 2 simulated devices, one strategy object for all their cells,
so a failed fit must leave it usable for the next cell. The parameter-server
and multi-worker strategies run every cell in one child (one cluster), whose
verdicts the first of their cells collects; those children start with
the module's first cell and run beside the in-process cells.

With `TFPAR_COMPAT_RESULTS` set, each verdict is appended to that file (JSON
lines) and the page is not checked: `docs/scripts/compatibility.py` does
this to regenerate the page.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

import tfpar
from tests._subprocess import kill_all, popen_python, start_workers
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


@dataclasses.dataclass
class _Children:
    """The child processes of one strategy's cells, writing to files."""

    procs: list[subprocess.Popen[str]]
    outputs: list[tuple[pathlib.Path, pathlib.Path]]
    deadline: float


def _start_children(name: str, folder: pathlib.Path) -> _Children:
    """Starts every cell of `name` in its child (or its workers), at once.

    Their output goes to files, not pipes, so a child never blocks on a full
    pipe while the in-process cells run beside it.
    """
    code = f"from tests.compatibility.cells import main; main({name!r})"
    env = {"PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    deadline = time.monotonic() + CHILD_TIMEOUT
    if name == "multi_worker":
        procs, _ = start_workers(code, 2, env=env, output=folder / name)
        names = [f"{name}-{i}" for i in range(2)]
    else:
        procs = [popen_python(code, {**os.environ, **env}, folder / name)]
        names = [name]
    outputs = [(folder / f"{n}.out", folder / f"{n}.err") for n in names]
    return _Children(procs, outputs, deadline)


def _collect(children: _Children) -> tuple[list[dict[str, dict[str, Any]]], str]:
    """Waits for the children (until their deadline): verdicts and output."""
    log = []
    try:
        for i, (proc, (_, err)) in enumerate(
            zip(children.procs, children.outputs, strict=True)
        ):
            try:
                proc.wait(timeout=max(1.0, children.deadline - time.monotonic()))
                ended = f"exited with {proc.returncode}"
            except subprocess.TimeoutExpired:
                ended = f"killed after {CHILD_TIMEOUT:.0f} s"
                proc.kill()
                proc.wait()
            log.append(f"--- child {i} {ended}\n{err.read_text()[-3000:]}")
    finally:
        kill_all(children.procs)
    return [_parse(out.read_text()) for out, _ in children.outputs], "\n".join(log)


@pytest.fixture(scope="module")
def strategies(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """Strategy objects and child verdicts, each made once.

    The children of the selected cells start with the module's first cell,
    so their clusters train while the in-process cells run (the module took
    153 s this way, 181 s with each child started at its first cell).
    """
    selected = {
        item.callspec.params["name"]
        for item in request.session.items
        if item.path == request.path and hasattr(item, "callspec")
    }
    folder = tmp_path_factory.mktemp("children")
    cache: dict[str, Any] = {
        name: _start_children(name, folder)
        for name in ("parameter_server", "multi_worker")
        if name in selected
    }
    try:
        yield cache
    finally:
        for value in cache.values():
            if isinstance(value, _Children):
                kill_all(value.procs)


def _verdict(name: str, feature: str, cache: dict[str, Any], tmp: str) -> Any:
    if name in SYNCHRONOUS and name != "multi_worker":
        if name not in cache:
            cache[name] = _in_process(name)
        ctx = Context(cache[name], True, tmp)
        return judge(FEATURES_BY_NAME[feature], name, ctx)
    if isinstance(cache[name], _Children):
        cache[name] = _collect(cache[name])
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
