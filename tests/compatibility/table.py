"""docs/compatibility.md: rendered from the matrix's verdicts, and read back.

`docs/scripts/compatibility.py` runs the matrix and calls `render`; every
cell's test reads the page back with `documented` and fails when the page
says something else than the cell just did, so the page always matches the
last run.
"""

from __future__ import annotations

import pathlib
from typing import Any

from tests.compatibility.cells import STRATEGIES
from tests.compatibility.features import FEATURES

PAGE = pathlib.Path(__file__).parents[2] / "docs" / "compatibility.md"

TEST_BEDS = {
    "mirrored": "2 simulated CPU devices in one process",
    "pipeline": "2 stages on 2 simulated CPU devices, 4 micro-batches, 1F1B",
    "parameter_server": "`LocalCluster`: 2 workers and 1 parameter server, "
    "each a process pinned to a core",
    "multi_worker": "2 worker processes on loopback (`TF_CONFIG`), one CPU device each",
}

_HEADER = """\
# Keras compatibility

Which Keras features work under each tfpar strategy, as the test matrix in
`tests/compatibility/` found them on its last run. This page is generated
from that run, not written by hand:

```
python docs/scripts/compatibility.py   # runs the matrix, rewrites this page
```

and every cell's test fails when this page disagrees with it.

A cell **works** when training is finite and its loss falls, under the
synchronous strategies (mirrored, pipeline, multi-worker) matches the same
model trained without a strategy on the same data and seed (per-epoch
losses, `rtol=1e-4` unless noted below), and the feature's own checks pass
(for example: the resumed run ends with the weights of an uninterrupted one,
predictions equal calling the model, the saved model loads where tfpar
cannot be imported). It is **refused** when the strategy raises a
`ValueError`, `TypeError` or `NotImplementedError` at `compile` or before
the first training step finished, naming itself and the feature. Anything
else **fails**. The features run one after the other on one strategy
object (one cluster), so every cell also checks that the cells before it,
refused ones included, left the strategy usable.
"""

_NOTES = """## Notes

- A custom `train_step` written as in Keras's guide logs the value of
  `self.compute_loss(...)`, which Keras divides by the number of replicas
  under any `tf.distribute` strategy (so that summed gradients are a mean):
  with 2 replicas the logged loss is half the real one, as under the stock
  strategies. The matrix's `train_step` logs `loss * num_replicas_in_sync`.
  Under `PipelineStrategy` a model overriding `train_step` trains unsplit,
  on the first device, with a warning: only Keras's own steps are
  pipelined.
- Plain `BatchNormalization` (without `synchronized=True`) computes its
  statistics per replica under the mirrored strategies, as stock does, and
  per micro-batch under `PipelineStrategy` (which warns): it trains, but
  not as one device on the whole batch does. The table's row uses
  `synchronized=True`, which the mirrored strategies reduce over all
  replicas.
"""


def render(verdicts: dict[tuple[str, str], dict[str, Any]]) -> str:
    """The page for `verdicts`, keyed by (strategy, feature) names."""
    counts = {o: 0 for o in ("works", "refused", "fails")}
    for verdict in verdicts.values():
        counts[verdict["outcome"]] += 1
    lines = [
        _HEADER,
        f"Last run: {len(verdicts)} cells; {counts['works']} work, "
        f"{counts['refused']} refused, {counts['fails']} fail.",
        "",
        "| Feature | " + " | ".join(f"`{c}`" for c in STRATEGIES.values()) + " |",
        "|---" * (len(STRATEGIES) + 1) + "|",
    ]
    for feature in FEATURES:
        cells = [
            verdicts.get((s, feature.name), {}).get("outcome", "not run")
            for s in STRATEGIES
        ]
        lines.append(f"| {feature.title} | " + " | ".join(cells) + " |")
    lines += ["", "## Test beds", ""]
    lines += [f"- `{STRATEGIES[s]}`: {bed}." for s, bed in TEST_BEDS.items()]
    lines += ["", "## Looser tolerances", ""]
    lines += [
        f"- {f.title}: `rtol={f.rtol}` ({f.why_rtol})." for f in FEATURES if f.why_rtol
    ]
    lines += ["", _NOTES.rstrip()]
    for outcome, heading in (("refused", "Refused"), ("fails", "Failing")):
        found = [
            (s, f, verdicts[(s, f.name)]["detail"])
            for f in FEATURES
            for s in STRATEGIES
            if verdicts.get((s, f.name), {}).get("outcome") == outcome
        ]
        if found:
            lines += ["", f"## {heading} cells", ""]
            lines += [f"- `{STRATEGIES[s]}`, {f.title}: {d}" for s, f, d in found]
    return "\n".join(lines) + "\n"


def documented(page: str) -> dict[tuple[str, str], str]:
    """The outcome `page` gives each (strategy, feature); absent cells are absent."""
    by_title = {f.title: f.name for f in FEATURES}
    outcomes = {}
    for line in page.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] in by_title and len(cells) == len(STRATEGIES) + 1:
            for strategy, outcome in zip(STRATEGIES, cells[1:], strict=True):
                outcomes[(strategy, by_title[cells[0]])] = outcome
    return outcomes
