"""Runs a feature under a strategy and judges the cell: works, refused or fails.

A cell *works* when its losses are finite and fall, match training without a
strategy (synchronous strategies, within the feature's `rtol`), and its own
checks pass. It is *refused* when a `ValueError`, `TypeError` or
`NotImplementedError` came at `compile` or before the first step finished
(while it is traced at the latest), naming the strategy and the feature.
Anything else *fails*, with the reason.

The strategies whose set-up needs other processes run every feature in one
child (`python -m tests.compatibility.cells STRATEGY`), which prints each
cell's verdict on its own line as soon as it is known.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from tests.compatibility.features import FEATURES, Context, Feature

# Column order of the table, and the class a refusal must name.
STRATEGIES = {
    "mirrored": "MirroredStrategy",
    "pipeline": "PipelineStrategy",
    "parameter_server": "ParameterServerStrategy",
    "multi_worker": "MultiWorkerMirroredStrategy",
}
SYNCHRONOUS = {"mirrored", "pipeline", "multi_worker"}
CELL_TAG = "CELL"


def judge(feature: Feature, strategy: str, ctx: Context) -> dict[str, Any]:
    """Runs `feature` in `ctx` and returns the cell's verdict.

    The verdict has `outcome` (`"works"`, `"refused"` or `"fails"`), `detail`
    (the refusal's message, or what failed) and the `losses` seen.
    """
    try:
        run = feature.run(ctx)
    except (ValueError, TypeError, NotImplementedError) as error:
        message = str(error)
        before = getattr(error, "batches_before_error", 0)
        named = STRATEGIES[strategy] in message and feature.keyword in message
        if before == 0 and named:
            return {"outcome": "refused", "detail": message.split("\n")[0]}
        where = f"after {before} steps" if before else "before the first step"
        return _fails(f"{type(error).__name__} {where}: {message[:600]}", error)
    except Exception as error:
        return _fails(f"{type(error).__name__}: {str(error)[:600]}", error)
    problems = [p for p in run.checks.values() if p]
    if not all(math.isfinite(v) for v in run.losses):
        problems.append(f"non-finite losses {run.losses}")
    elif len(run.losses) < 2 or run.losses[-1] >= run.losses[0]:
        problems.append(f"losses do not fall: {run.losses}")
    if run.reference is not None and not np.allclose(
        run.losses, run.reference, rtol=feature.rtol, atol=1e-6
    ):
        problems.append(
            f"losses {run.losses} differ from training without a strategy "
            f"{run.reference} (rtol {feature.rtol})"
        )
    verdict = {"outcome": "fails" if problems else "works", "losses": run.losses}
    verdict["detail"] = "; ".join(problems)
    return verdict


def _fails(detail: str, error: BaseException) -> dict[str, Any]:
    stack = "".join(traceback.format_exception(error)[-6:])
    return {"outcome": "fails", "detail": detail, "stack": stack}


def run_all(
    strategy_name: str,
    strategy: tf.distribute.Strategy,
    only: Sequence[str] | None = None,
) -> None:
    """Judges every feature (or those named in `only`), printing each verdict."""
    with tempfile.TemporaryDirectory() as workdir:
        for index, feature in enumerate(FEATURES):
            if only is not None and feature.name not in only:
                continue
            folder = os.path.join(workdir, str(index))
            os.makedirs(folder)
            ctx = Context(strategy, strategy_name in SYNCHRONOUS, folder)
            start = time.monotonic()
            verdict = judge(feature, strategy_name, ctx)
            verdict["seconds"] = round(time.monotonic() - start, 2)
            line = json.dumps({"feature": feature.name, **verdict})
            print(f"{CELL_TAG} {line}", flush=True)


def main(strategy_name: str, only: Sequence[str] | None = None) -> None:
    """The child's entry point: sets up `strategy_name`, then runs the cells."""
    import tfpar

    if strategy_name == "multi_worker":
        # Before any TensorFlow op: collectives are configured at start-up.
        run_all(strategy_name, tfpar.MultiWorkerMirroredStrategy(), only)
    elif strategy_name == "parameter_server":
        with tfpar.LocalCluster(num_workers=2, num_ps=1) as cluster:
            strategy = tfpar.ParameterServerStrategy(
                cluster.cluster_resolver, step_deadline=60
            )
            run_all(strategy_name, strategy, only)
    else:
        raise ValueError(f"no child set-up for {strategy_name!r}")


if __name__ == "__main__":
    main(sys.argv[1])
