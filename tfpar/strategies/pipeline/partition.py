"""Cutting a Keras model into a chain of pipeline stages.

A model can be cut before a layer when everything after the cut can be
computed from that layer's single input tensor: then exactly one tensor (the
activation) crosses the boundary. In a Sequential model every layer is such a
cut point; in a functional model the layers inside a branch or a residual
block are not (their block stays whole inside one stage).

Each stage becomes a functional sub-model sharing the original layers, so it
runs with Keras's own call logic (training flags, masks) and owns exactly its
layers' variables. The original model is not modified.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

from tfpar._validation import check_int, check_sequence, value_error
from tfpar.strategies.pipeline import cost as pipeline_cost

logger = logging.getLogger("tfpar")

_PARTITIONS = "'auto', 'flops', 'params' or a list of layer names"


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
    """

    index: int
    device: str
    layers: tuple[str, ...]
    parameters: int
    cost: float


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
        """Returns the table as aligned text."""
        unit = {"measured": "ms", "flops": "FLOPs"}.get(self.cost_source, "params")
        header = ("stage", "device", "layers", "parameters", f"est. cost ({unit})")
        rows = [header]
        for stage in self.stages:
            names = stage.layers
            shown = (
                ", ".join(names)
                if len(names) <= 3
                else (f"{names[0]} .. {names[-1]} ({len(names)} layers)")
            )
            cost = f"{stage.cost:.3g}"
            rows.append(
                (str(stage.index), stage.device, shown, f"{stage.parameters:,}", cost)
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


def model_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Returns the model's layers in topological order, without input layers."""
    return [
        layer
        for layer in model.layers
        if not isinstance(layer, keras.layers.InputLayer)
    ]


def valid_cut_points(model: keras.Model) -> list[str]:
    """Lists the layers before which `model` can be cut.

    Args:
        model: A built Sequential or functional Keras model.

    Returns:
        Layer names, in model order.

    Raises:
        TypeError: If `model` is a subclassed model (it has no layer graph).
    """
    _check_graph_model(model)
    layers = model_layers(model)
    return [layers[i].name for i in range(1, len(layers)) if _can_cut(model, layers, i)]


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
            (each indivisible segment's forward and backward pass timed on
            `devices[0]`; counted FLOPs when a segment cannot run alone,
            parameter counts when an input shape is not fully known);
            `"flops"` balances counted forward FLOPs (no run: a given model
            always gets the same cut); `"params"` balances parameter counts.
            Or a list of `len(devices) - 1` layer names, each the first layer
            of a new stage (the table then shows FLOPs).
        sample_batch_size: Batch size of the sample micro-batch whose passes
            are timed or whose FLOPs are counted. Defaults to `16`.

    Returns:
        A tuple `(table, stage_models)`: the `Partition` and one functional
        sub-model per stage, sharing the model's layers.

    Raises:
        TypeError: If `model` is a subclassed model, or `partition` or
            `sample_batch_size` has the wrong type.
        ValueError: If `partition` is an unknown name, `sample_batch_size` is
            smaller than 1, the model has fewer cut points than stages need,
            or a cut-point name is unknown, out of order or not a valid cut
            (the message names the layer and lists the valid cut points).
    """
    partition = check_partition(partition)
    check_int("sample_batch_size", sample_batch_size, minimum=1)
    _check_graph_model(model)
    layers = model_layers(model)
    names = [layer.name for layer in layers]
    cuts = [i for i in range(1, len(layers)) if _can_cut(model, layers, i)]
    num_stages = len(devices)
    if isinstance(partition, str):
        if num_stages - 1 > len(cuts):
            raise ValueError(
                f"Cannot cut model {model.name!r} into {num_stages} stages: it has "
                f"{len(layers)} layer(s) and only {len(cuts)} valid cut point(s) "
                f"({[names[i] for i in cuts]}). Received: devices={list(devices)} "
                f"(must have at most {len(cuts) + 1} devices for this model)."
            )
        costs, source = _layer_costs(
            model, layers, cuts, sample_batch_size, partition, devices[0]
        )
        starts = _balance(costs, [0, *cuts], num_stages)
    else:
        starts = [0, *_explicit_cuts(model, names, cuts, list(partition))]
        costs, source = _layer_costs(
            model, layers, cuts, sample_batch_size, "flops", devices[0]
        )
        source = "explicit" if source == "parameters" else source
    bounds = [*starts, len(layers)]
    stages, stage_models = [], []
    for s in range(num_stages):
        group = layers[bounds[s] : bounds[s + 1]]
        stages.append(
            Stage(
                index=s,
                device=devices[s],
                layers=tuple(layer.name for layer in group),
                parameters=sum(layer.count_params() for layer in group),
                cost=float(sum(costs[bounds[s] : bounds[s + 1]])),
            )
        )
        stage_models.append(_sub_model(model, layers, bounds[s], bounds[s + 1], s))
    return Partition(tuple(stages), source), stage_models


def has_layer_graph(model: keras.Model) -> bool:
    """Whether `model` is Sequential or functional (not subclassed)."""
    return isinstance(model, keras.Sequential) or _is_functional(model)


def _check_graph_model(model: keras.Model) -> None:
    if not has_layer_graph(model):
        raise TypeError(
            "PipelineStrategy cuts Sequential and functional models along their "
            f"layer graph. Received: a subclassed model of type "
            f"{type(model).__name__} (build it with keras.Sequential or "
            "keras.Model(inputs, outputs))."
        )
    if not model.built or not model.outputs:
        raise ValueError(
            f"Model {model.name!r} must be built before it is partitioned "
            "(give it a keras.Input)."
        )


def _is_functional(model: keras.Model) -> bool:
    try:
        return bool(model.inputs) and bool(model.outputs)
    except (AttributeError, ValueError):
        return False


def _boundary(layer: keras.layers.Layer) -> Any:
    """The single tensor entering `layer`, or None when there is not one."""
    try:
        tensor = layer.input
    except (AttributeError, ValueError):  # a shared layer has several inputs
        return None
    return tensor if isinstance(tensor, keras.KerasTensor) else None


def _can_cut(model: keras.Model, layers: list[keras.layers.Layer], i: int) -> bool:
    tensor = _boundary(layers[i])
    if tensor is None:
        return False
    try:
        tail = keras.Model(tensor, _outputs(model))
    except ValueError:  # "not connected to inputs": something skips the cut
        return False
    return {layer.name for layer in model_layers(tail)} == {
        layer.name for layer in layers[i:]
    }


def _outputs(model: keras.Model) -> Any:
    # A functional model's `output` keeps the structure it was built with (a
    # dict of outputs stays a dict in `predict`); Sequential has one output.
    if isinstance(model, keras.Sequential):
        return model.outputs[0]
    return model.output


def _sub_model(
    model: keras.Model, layers: list[keras.layers.Layer], start: int, stop: int, s: int
) -> keras.Model:
    inputs = (
        (model.inputs[0] if len(model.inputs) == 1 else model.inputs)
        if start == 0
        else layers[start].input
    )
    outputs = _outputs(model) if stop == len(layers) else layers[stop].input
    return keras.Model(inputs, outputs, name=f"{model.name}_stage_{s}")


def _explicit_cuts(
    model: keras.Model, names: list[str], cuts: list[int], partition: list[str]
) -> list[int]:
    valid = [names[i] for i in cuts]
    positions = []
    for name in partition:
        if name not in names:
            raise ValueError(
                f"Cut point {name!r} is not a layer of model {model.name!r}. "
                f"Received: partition={partition} (must name layers among "
                f"the valid cut points {valid})."
            )
        index = names.index(name)
        if index not in cuts:
            raise ValueError(
                f"Cannot cut model {model.name!r} before layer {name!r}: a branch, "
                "a residual connection or a Keras mask (Embedding(mask_zero=True), "
                "Masking) crosses that point (or it is the first layer), so more "
                "than one tensor would cross the stage boundary. "
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
    model: keras.Model,
    layers: list[keras.layers.Layer],
    cuts: list[int],
    batch_size: int,
    method: str,
    device: str,
) -> tuple[list[float], str]:
    """Per-layer cost, and its source (see `Partition.cost_source`).

    A segment between two neighbouring cut points is indivisible, so it is
    costed as a whole (timed, or its FLOPs counted) and its cost is spread
    over its layers by parameter count. FLOPs are counted for every segment
    anyway: tracing the segment gives the input spec of the next one, and they
    are the fallback when a segment cannot be timed alone. When an input has
    an unknown non-batch dimension, or no op of the model has a registered
    FLOP count, the parameter count is the cost.
    """
    params = [float(layer.count_params()) for layer in layers]
    shapes = [tuple(t.shape[1:]) for t in model.inputs]
    if method == "params" or any(d is None for shape in shapes for d in shape):
        return params, "parameters"
    bounds = [0, *cuts, len(layers)]
    specs: Any = [
        tf.TensorSpec((batch_size, *t.shape[1:]), t.dtype) for t in model.inputs
    ]
    specs = specs[0] if len(specs) == 1 else specs
    segments, inputs, flops = [], [], []
    for a, b in itertools.pairwise(bounds):
        segment = _sub_model(model, layers, a, b, a)
        forward = tf.function(lambda t, m=segment: m(t, training=False))
        graph = forward.get_concrete_function(specs).graph
        segments.append(segment)
        inputs.append(specs)
        flops.append(float(pipeline_cost.count_flops(graph)))
        outputs = tf.nest.flatten(graph.structured_outputs)
        specs = [tf.TensorSpec(t.shape, t.dtype) for t in outputs]
        specs = specs[0] if len(specs) == 1 else specs
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


def _balance(costs: list[float], starts: list[int], num_stages: int) -> list[int]:
    """Chooses `num_stages` start indices among `starts` minimizing the largest stage.

    Dynamic programming over the cuttable segments (at most a few hundred).
    """
    n = len(costs)
    bounds = [*starts, n]
    seg = [sum(costs[a:b]) for a, b in itertools.pairwise(bounds)]
    m = len(seg)
    prefix = [0.0]
    for c in seg:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][j]: smallest max-stage cost putting segments [0, j) in k stages.
    best = [[inf] * (m + 1) for _ in range(num_stages + 1)]
    choice = [[0] * (m + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for j in range(k, m + 1):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], prefix[j] - prefix[i])
                if value < best[k][j]:
                    best[k][j], choice[k][j] = value, i
    chosen, j = [], m
    for k in range(num_stages, 0, -1):
        i = choice[k][j]
        chosen.append(i)
        j = i
    return [bounds[i] for i in reversed(chosen)]
