"""Cutting a Keras model into a chain of pipeline stages.

A model can be cut before any of its layers but the first, in model order
(`model.layers`, a topological order of its graph). Every tensor computed
before the cut (or a model input) that is needed after it (or is a model
output) crosses the stage boundary: one activation in a Sequential model,
several inside a residual block or a branch, or in a model with several
inputs or outputs. A tensor needed two stages later passes through the
stages between, and a model output computed early (an auxiliary head) is
carried to the last stage. Two things cannot cross, so such cuts are
refused: a tensor carrying a Keras mask (`Embedding(mask_zero=True)`,
`Masking`: the mask travels with the tensor inside Keras, not as data), and
the calls of a shared layer (one layer, whose weights live on one device).

Each stage becomes a functional sub-model sharing the original layers, so it
runs with Keras's own call logic (training flags, masks) and owns exactly its
layers' variables. The original model is not modified. The graph itself
(what crosses a cut, which cuts are refused, the sub-models) is
`layer_graph.py`'s; this module chooses the cuts and tabulates them.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

from tfpar._validation import check_int, check_sequence, value_error
from tfpar.strategies.pipeline import cost as pipeline_cost
from tfpar.strategies.pipeline.layer_graph import (
    LayerGraph,
    bytes_per_example,
    check_graph_model,
    model_layers,
    one_or_list,
)

logger = logging.getLogger("tfpar")

_PARTITIONS = "'auto', 'flops', 'params' or a list of layer names"

# Balanced stages first, then fewer bytes crossing the cuts: a partition whose
# largest stage is within this fraction of the best one may be chosen for its
# smaller transfers. Measured costs vary by a few percent from run to run, so
# choices closer than this are a toss-up that the bytes decide.
_BALANCE_TOLERANCE = 0.05


@dataclasses.dataclass(frozen=True)
class Stage:
    """One row of the partition table.

    Attributes:
        index: Stage index, from 0.
        device: Canonical name of the device running the stage.
        layers: Names of the stage's layers, in model order.
        parameters: Number of weights (trainable and not) of those layers.
        cost: Estimated cost, in the unit of the partition's `cost_source`:
            milliseconds of a measured forward and backward pass over a
            sample micro-batch, FLOPs of a forward pass over it, or the
            parameter count.
        receives: The tensors crossing the cut before this stage, in the
            order the stage receives them: the name of the layer that
            produced each (`"layer[node][tensor]"`, as in `model.summary()`,
            for another call or output of that layer) or of the model input.
            A tensor computed earlier and needed later passes through the
            stages between, so it appears at every cut it crosses. Empty for
            the first stage, which receives the batch. Defaults to `()`.
        bytes_per_example: Bytes of those tensors per example (the product
            of each one's static shape without the batch dimension, times
            its dtype's size). A training step sends them forward and the
            gradients of the floating-point ones back, for every example.
            `None` when a dimension is unknown; `0` for the first stage.
            Defaults to `0`.
    """

    index: int
    device: str
    layers: tuple[str, ...]
    parameters: int
    cost: float
    receives: tuple[str, ...] = ()
    bytes_per_example: int | None = 0


@dataclasses.dataclass(frozen=True)
class Partition:
    """Which layers run on which device: the inspectable partition table.

    Attributes:
        stages: One `Stage` per device, in pipeline order.
        cost_source: `"measured"` (milliseconds per forward and backward
            pass, timed), `"flops"` (counted forward FLOPs: asked for, the
            estimate shown for explicit cut points, or the fallback when a
            segment cannot be run alone), `"parameters"` (asked for, or the
            fallback when an input shape is not fully known) or `"explicit"`
            (cut points given by the user, costs from parameter counts).

    Example:

    ```python
    print(strategy.partition_model(model).format())
    ```
    """

    stages: tuple[Stage, ...]
    cost_source: str

    @property
    def cut_points(self) -> list[str]:
        """The first layer of every stage but the first."""
        return [stage.layers[0] for stage in self.stages[1:]]

    def format(self) -> str:
        """Returns the table as aligned text.

        One row per stage: its device, layers, parameters, estimated cost,
        the tensors it receives across the cut before it and their bytes per
        example (`?` when a dimension is unknown, `-` for the first stage).
        """
        unit = {"measured": "ms", "flops": "FLOPs"}.get(self.cost_source, "params")
        header = (
            "stage",
            "device",
            "layers",
            "parameters",
            f"est. cost ({unit})",
            "receives",
            "bytes per example",
        )
        rows = [header]
        for stage in self.stages:
            if stage.index == 0:
                receives, size = "-", "-"
            else:
                receives = _shorten(stage.receives, "tensors")
                known = stage.bytes_per_example is not None
                size = f"{stage.bytes_per_example:,}" if known else "?"
            rows.append(
                (
                    str(stage.index),
                    stage.device,
                    _shorten(stage.layers, "layers"),
                    f"{stage.parameters:,}",
                    f"{stage.cost:.3g}",
                    receives,
                    size,
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        return "\n".join(
            "  ".join(
                cell.ljust(w) for cell, w in zip(row, widths, strict=True)
            ).rstrip()
            for row in rows
        )

    def __str__(self) -> str:
        return self.format()


def _shorten(names: tuple[str, ...], noun: str) -> str:
    if len(names) <= 3:
        return ", ".join(names)
    return f"{names[0]} .. {names[-1]} ({len(names)} {noun})"


def check_partition(partition: object) -> str | tuple[str, ...]:
    """Checks a `partition` argument and returns it, a list as a tuple.

    Args:
        partition: `"auto"`, `"flops"`, `"params"` or a list or tuple of
            layer names.

    Returns:
        The name, or the layer names as a tuple.

    Raises:
        TypeError: If it is neither a string nor a list or tuple of strings.
        ValueError: If it is a string other than the three names.
    """
    if isinstance(partition, str):
        if partition not in pipeline_cost.COST_METHODS:
            raise value_error("partition", partition, _PARTITIONS)
        return partition
    return check_sequence("partition", partition, str, _PARTITIONS)


def valid_cut_points(model: keras.Model) -> list[str]:
    """Lists the layers before which `model` can be cut.

    Every layer but the first is a cut point, unless a tensor carrying a
    Keras mask (`Embedding(mask_zero=True)`, `Masking`) would cross the cut,
    or a shared layer (one layer called at several places) is called both
    before and after it. Inside a residual block or a branch, several
    tensors cross the cut; the partition table shows which.

    Args:
        model: A built Sequential or functional Keras model.

    Returns:
        Layer names, in model order.

    Raises:
        TypeError: If `model` is a subclassed model (it has no layer graph).

    Example:

    ```python
    inputs = keras.Input((4,))
    a = keras.layers.Dense(4, name="a")(inputs)
    b = keras.layers.Dense(4, name="b")(a)
    h = keras.layers.Add(name="add")([a, b])  # a skips over b
    model = keras.Model(inputs, keras.layers.Dense(2, name="c")(h))
    valid_cut_points(model)  # ['b', 'add', 'c']: before 'add', a and b cross
    ```
    """
    check_graph_model(model)
    graph = LayerGraph(model)
    return [graph.units[i].name for i in graph.cuts()]


def partition_model(
    model: keras.Model,
    devices: Sequence[str],
    partition: str | Sequence[str] = "auto",
    *,
    sample_batch_size: int = 16,
) -> tuple[Partition, list[keras.Model]]:
    """Cuts `model` into `len(devices)` stages.

    Args:
        model: A built Sequential or functional Keras model.
        devices: One device per stage.
        partition: How to cut. `"auto"` balances the stages' measured cost
            (each segment's forward and backward pass timed on `devices[0]`;
            counted FLOPs when a segment cannot run alone, parameter counts
            when an input shape is not fully known); `"flops"` balances
            counted forward FLOPs (no run: a given model always gets the same
            cut); `"params"` balances parameter counts. The three then
            prefer fewer bytes crossing the cuts among partitions whose
            largest stage is within 5% of the best. Or a list of
            `len(devices) - 1` layer names, each the first layer of a new
            stage, in model order (the table then shows FLOPs).
        sample_batch_size: Batch size of the sample micro-batch whose passes
            are timed or whose FLOPs are counted. Defaults to `16`.

    Returns:
        A tuple `(table, stage_models)`: the `Partition` and one functional
        sub-model per stage, sharing the model's layers. A stage's model takes
        the tensors crossing the cut before it (the model's inputs for the
        first stage) and returns those crossing the cut after it (the model's
        outputs, in their structure, for the last stage); a single tensor is
        passed as itself, several as a list in the order of `Stage.receives`.

    Raises:
        TypeError: If `model` is a subclassed model, or `partition` or
            `sample_batch_size` has the wrong type.
        ValueError: If `partition` is an unknown name, `sample_batch_size` is
            smaller than 1, the model has fewer cut points than stages need,
            or a cut-point name is unknown, repeated, out of order or not a
            valid cut (the message names the layer, says why and lists the
            valid cut points).
    """
    partition = check_partition(partition)
    check_int("sample_batch_size", sample_batch_size, minimum=1)
    check_graph_model(model)
    graph = LayerGraph(model)
    cuts = graph.cuts()
    num_stages = len(devices)
    if isinstance(partition, str):
        if num_stages - 1 > len(cuts):
            raise ValueError(
                f"Cannot cut model {model.name!r} into {num_stages} stages: it has "
                f"{len(model_layers(model))} layer(s) and only {len(cuts)} valid "
                f"cut point(s) ({graph.names(cuts)}). Received: "
                f"devices={list(devices)} (must have at most {len(cuts) + 1} "
                "devices for this model)."
            )
        costs, source = _layer_costs(
            graph, cuts, sample_batch_size, partition, devices[0]
        )
        transfer = [0.0] + [graph.balance_bytes(i) for i in cuts]
        starts = _balance(
            costs,
            [0, *cuts],
            num_stages,
            transfer=transfer,
            tolerance=_BALANCE_TOLERANCE,
        )
    else:
        starts = [0, *_explicit_cuts(graph, cuts, list(partition))]
        # Only for the table: each stage is costed as a whole.
        costs, source = _layer_costs(
            graph, starts[1:], sample_batch_size, "flops", devices[0]
        )
        source = "explicit" if source == "parameters" else source
    bounds = [*starts, len(graph.units)]
    stages, stage_models = [], []
    for s, (a, b) in enumerate(itertools.pairwise(bounds)):
        group = [u for u in graph.units[a:b] if isinstance(u, keras.layers.Layer)]
        received = graph.boundary(a) if s > 0 else []
        stages.append(
            Stage(
                index=s,
                device=devices[s],
                layers=tuple(layer.name for layer in group),
                parameters=sum(layer.count_params() for layer in group),
                cost=float(sum(costs[a:b])),
                receives=tuple(graph.name(t) for t in received),
                bytes_per_example=bytes_per_example(received),
            )
        )
        stage_models.append(graph.sub_model(a, b, f"{model.name}_stage_{s}"))
    return Partition(tuple(stages), source), stage_models


def _explicit_cuts(
    graph: LayerGraph, cuts: list[int], partition: list[str]
) -> list[int]:
    model = graph.model
    valid = graph.names(cuts)
    layers = {
        u.name: i
        for i, u in enumerate(graph.units)
        if isinstance(u, keras.layers.Layer)
    }
    positions = []
    for name in partition:
        if name not in layers:
            raise ValueError(
                f"Cut point {name!r} is not a layer of model {model.name!r}. "
                f"Received: partition={partition} (must name layers among "
                f"the valid cut points {valid})."
            )
        index = layers[name]
        reason = graph.refusal(index)
        if reason is not None:
            raise ValueError(
                f"Cannot cut model {model.name!r} before layer {name!r}: {reason}. "
                f"Received: partition={partition} (valid cut points: {valid})."
            )
        positions.append(index)
    if positions != sorted(set(positions)):
        raise ValueError(
            "Cut points must be distinct and in model order. Received: "
            f"partition={partition} (model order: {valid})."
        )
    return positions


def _layer_costs(
    graph: LayerGraph,
    cuts: list[int],
    batch_size: int,
    method: str,
    device: str,
) -> tuple[list[float], str]:
    """Cost per operation, and its source (see `Partition.cost_source`).

    Each segment between two neighbouring `cuts` is costed as a whole
    (timed, or its FLOPs counted) and its cost is spread over its operations
    by parameter count (evenly when it has none). FLOPs are counted for every segment
    anyway: tracing the segment gives the input spec of the next one, and they
    are the fallback when a segment cannot be timed alone. When an input has
    an unknown non-batch dimension, or no op of the model has a registered
    FLOP count, the parameter count is the cost.
    """
    model = graph.model
    params = [
        float(u.count_params()) if isinstance(u, keras.layers.Layer) else 0.0
        for u in graph.units
    ]
    shapes = [tuple(t.shape[1:]) for t in model.inputs]
    if method == "params" or any(d is None for shape in shapes for d in shape):
        return params, "parameters"
    bounds = [0, *cuts, len(graph.units)]
    specs: Any = one_or_list(
        [tf.TensorSpec((batch_size, *t.shape[1:]), t.dtype) for t in model.inputs]
    )
    segments, inputs, flops = [], [], []
    for a, b in itertools.pairwise(bounds):
        segment = graph.sub_model(a, b, f"{model.name}_segment_{a}")
        forward = tf.function(lambda t, m=segment: m(t, training=False))
        traced = forward.get_concrete_function(specs).graph
        segments.append(segment)
        inputs.append(specs)
        flops.append(float(pipeline_cost.count_flops(traced)))
        outputs = tf.nest.flatten(traced.structured_outputs)
        specs = one_or_list([tf.TensorSpec(t.shape, t.dtype) for t in outputs])
    totals, source = flops, "flops"
    if method == "auto":
        try:
            seconds = pipeline_cost.measure_seconds(segments, inputs, device)
            totals = [1000.0 * t for t in seconds]
            source = "measured"
        except (tf.errors.OpError, ValueError, TypeError) as err:
            logger.warning(
                "partition='auto' balances counted FLOPs instead of measured "
                "time: a segment of model %r cannot run alone (%s).",
                model.name,
                err,
            )
    if not any(totals):
        return params, "parameters"
    costs: list[float] = []
    for (a, b), total in zip(itertools.pairwise(bounds), totals, strict=True):
        weight = sum(params[a:b])
        costs += [
            total * (params[i] / weight if weight else 1.0 / (b - a))
            for i in range(a, b)
        ]
    return costs, source


def _balance(
    costs: list[float],
    starts: list[int],
    num_stages: int,
    *,
    transfer: list[float] | None = None,
    tolerance: float = 0.0,
) -> list[int]:
    """Chooses `num_stages` start indices among `starts`.

    Minimizes the largest stage's cost; with `transfer` (the bytes crossing
    a cut before each of `starts`, the first ignored), then minimizes the
    bytes crossing all cuts among the choices whose largest stage is within
    `tolerance` (a fraction) of the smallest possible, the largest stage
    breaking ties. Dynamic programming over the cuttable segments (at most a
    few hundred).
    """
    n = len(costs)
    bounds = [*starts, n]
    prefix = [0.0]
    for a, b in itertools.pairwise(bounds):
        prefix.append(prefix[-1] + sum(costs[a:b]))
    chosen = _cheapest(prefix, [0.0] * len(starts), num_stages, math.inf)
    if transfer is not None:
        largest = max(prefix[j] - prefix[i] for i, j in itertools.pairwise(chosen))
        chosen = _cheapest(prefix, transfer, num_stages, largest * (1 + tolerance))
    return [bounds[i] for i in chosen[:-1]]


def _cheapest(
    prefix: list[float], transfer: list[float], num_stages: int, limit: float
) -> list[int]:
    """The segments starting each stage, then `m`: the fewest bytes, then balance.

    Minimizes (bytes crossing the cuts, largest stage) over the partitions
    of the `m` segments whose stages each cost at most `limit`.
    """
    m = len(prefix) - 1
    worst = (math.inf, math.inf)
    # best[k][j]: the smallest (bytes, largest stage) of segments [0, j) in
    # k stages, and where the last of them starts.
    best = [[worst] * (m + 1) for _ in range(num_stages + 1)]
    choice = [[0] * (m + 1) for _ in range(num_stages + 1)]
    best[0][0] = (0.0, 0.0)
    for k in range(1, num_stages + 1):
        for j in range(k, m + 1):
            for i in range(k - 1, j):
                stage = prefix[j] - prefix[i]
                before = best[k - 1][i]
                if stage > limit or before == worst:
                    continue
                value = (before[0] + (transfer[i] if i else 0.0), max(before[1], stage))
                if value < best[k][j]:
                    best[k][j], choice[k][j] = value, i
    chosen, j = [m], m
    for k in range(num_stages, 0, -1):
        j = choice[k][j]
        chosen.append(j)
    return chosen[::-1]
