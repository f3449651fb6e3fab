"""A Keras model's layer graph: where it can be cut, what crosses, the pieces.

`LayerGraph` places a Sequential or functional model's operations at
positions in model order (`model.layers`, a topological order of its
graph); a cut at position `i` puts operations `[0, i)` before it. It answers
which tensors cross a cut, why a cut is refused (a shared layer called on
both sides, a tensor carrying a Keras mask) and builds the functional
sub-model of a range of positions. `partition.py` chooses the cuts.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf
from keras import tree

from tfpar._compat import pipeline as compat


def model_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Returns the model's layers in topological order, without input layers.

    Args:
        model: A Sequential or functional model.

    Returns:
        `model.layers` without its `keras.layers.InputLayer`s.

    Example:

    ```python
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    [layer.name for layer in model_layers(model)]  # ["dense"]
    ```
    """
    return [
        layer
        for layer in model.layers
        if not isinstance(layer, keras.layers.InputLayer)
    ]


def nested_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Returns `model`'s layers, and those of the models nested in it, in order.

    Args:
        model: A Keras model.

    Returns:
        Each layer of `model.layers`, followed, for a nested model, by its
        own layers (recursively).

    Example:

    ```python
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    outer = keras.Sequential([keras.Input((4,)), inner])
    [layer.name for layer in nested_layers(outer)]  # [inner's name, "dense"]
    ```
    """
    layers = []
    for layer in model.layers:
        layers.append(layer)
        if isinstance(layer, keras.Model):
            layers += nested_layers(layer)
    return layers


def has_layer_graph(model: keras.Model) -> bool:
    """Whether `model` is Sequential or functional (not subclassed).

    Args:
        model: A Keras model.

    Returns:
        `True` if its layer graph is known, so that it can be cut.

    Example:

    ```python
    has_layer_graph(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]))
    # True
    ```
    """
    return isinstance(model, keras.Sequential) or _is_functional(model)


def check_graph_model(model: keras.Model) -> None:
    """Raises unless `model` is a built Sequential or functional model.

    Args:
        model: The model about to be cut.

    Raises:
        TypeError: For a subclassed model, naming its type.
        ValueError: For a model without a `keras.Input` (not built).

    Example:

    ```python
    check_graph_model(keras.Sequential([keras.layers.Dense(2)]))  # ValueError
    ```
    """
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


def _outputs(model: keras.Model) -> Any:
    # A functional model's `output` keeps the structure it was built with (a
    # dict of outputs stays a dict in `predict`); Sequential has one output.
    if isinstance(model, keras.Sequential):
        return model.outputs[0]
    return model.output


def one_or_list(tensors: list[Any]) -> Any:
    """`tensors[0]` if it is the only one, else `tensors`.

    A single boundary tensor travels as itself, as in a Sequential model.

    Example:

    ```python
    one_or_list([a])  # a
    one_or_list([a, b])  # [a, b]
    ```
    """
    return tensors[0] if len(tensors) == 1 else tensors


def bytes_per_example(
    tensors: list[keras.KerasTensor], *, unknown: int | None = None
) -> int | None:
    """Bytes of `tensors` per example, `None` if a dimension is unknown.

    Args:
        tensors: KerasTensors, batch dimension first.
        unknown: Counts an unknown dimension as this size instead.

    Example:

    ```python
    bytes_per_example([keras.KerasTensor((None, 256, 4), "float32")])  # 4096
    ```
    """
    total = 0
    for t in tensors:
        size = tf.as_dtype(t.dtype).size
        for d in t.shape[1:]:
            if d is None:
                if unknown is None:
                    return None
                d = unknown
            size *= d
        total += size
    return total


class LayerGraph:
    """A model's layer calls, placed at the positions of its operations.

    The layers are taken in model order (`model.layers`); an operation that
    is not a layer (a Keras op applied to KerasTensors, or the comparison an
    `Embedding(mask_zero=True)` computes its mask with) comes right after
    the operation producing its latest input. A cut at position `i` puts
    operations `[0, i)` before it, and every call of an operation runs in
    the operation's stage.
    """

    def __init__(self, model: keras.Model) -> None:
        self.model = model
        outputs = tree.flatten(_outputs(model))
        calls = compat.layer_calls(list(model.inputs), outputs)
        # Sort keys: (position,) for a layer; a non-layer operation extends
        # its latest input's key with its place in the walk.
        order: dict[int, tuple[int, ...]] = {
            id(layer): (p,) for p, layer in enumerate(model_layers(model))
        }
        made: dict[int, tuple[int, ...]] = {id(t): (-1,) for t in model.inputs}
        ops: dict[int, Any] = {}
        for n, call in enumerate(calls):
            op = call.operation
            if id(op) not in order:
                latest = max((made[id(t)] for t in call.inputs), default=(-1,))
                order[id(op)] = (*latest, n)
            ops[id(op)] = op
            made.update((id(t), order[id(op)]) for t in call.outputs)
        self.units = sorted(ops.values(), key=lambda op: order[id(op)])
        position = {id(op): p for p, op in enumerate(self.units)}
        calls.sort(key=lambda call: position[id(call.operation)])  # stable
        # Every tensor, model inputs first, each with the position of the
        # operation producing it (-1 for an input), the last position
        # needing it (len(units) for a model output), and its name.
        self.tensors: list[keras.KerasTensor] = list(model.inputs)
        self._produced = {id(t): -1 for t in model.inputs}
        self._names = {id(t): t.name for t in model.inputs}
        for call in calls:
            for k, t in enumerate(call.outputs):
                self.tensors.append(t)
                self._produced[id(t)] = position[id(call.operation)]
                indices = (call.node_index, k)
                self._names[id(t)] = call.operation.name + (
                    "" if indices == (0, 0) else f"[{indices[0]}][{indices[1]}]"
                )
        self._needed: dict[int, int] = {}
        # (p, q, layer): a call of `layer`, at position p, needs a tensor
        # produced at q > p (a shared layer's later call), so a cut in (p, q]
        # would split its calls.
        self._splits: list[tuple[int, int, str]] = []
        for call in calls:
            p = position[id(call.operation)]
            for t in call.inputs:
                self._needed[id(t)] = max(self._needed.get(id(t), -1), p)
                if self._produced[id(t)] > p:
                    self._splits.append((p, self._produced[id(t)], call.operation.name))
        for t in outputs:
            self._needed[id(t)] = len(self.units)

    def boundary(self, i: int) -> list[keras.KerasTensor]:
        """The tensors crossing a cut at position `i`, in a fixed order."""
        return [
            t
            for t in self.tensors
            if self._produced[id(t)] < i <= self._needed.get(id(t), -1)
        ]

    def name(self, tensor: keras.KerasTensor) -> str:
        """The name of the layer (or model input) that produced `tensor`."""
        return self._names[id(tensor)]

    def names(self, positions: list[int]) -> list[str]:
        """The names of the operations at `positions`."""
        return [self.units[i].name for i in positions]

    def cuts(self) -> list[int]:
        """The positions of the layers before which the model can be cut."""
        layers = [
            i for i, u in enumerate(self.units) if isinstance(u, keras.layers.Layer)
        ]
        return [i for i in layers[1:] if self.refusal(i) is None]

    def refusal(self, i: int) -> str | None:
        """Why the model cannot be cut at position `i`, or `None` if it can."""
        if not any(isinstance(u, keras.layers.Layer) for u in self.units[:i]):
            return "it is the first layer (the first stage needs one)"
        for p, q, layer in self._splits:
            if p < i <= q:
                return (
                    f"the shared layer {layer!r} is called both before and after "
                    "that point, and all calls of a layer run in one stage (its "
                    "weights live on one device)"
                )
        for t in self.boundary(i):
            if compat.keras_mask(t) is not None:
                return (
                    f"the output of {self.name(t)!r} carries a Keras mask "
                    "(Embedding(mask_zero=True), Masking), which travels with the "
                    "tensor inside Keras and cannot cross a stage boundary as "
                    "data; cut after the layers that use the mask"
                )
        return None

    def balance_bytes(self, i: int) -> float:
        """Bytes per example crossing a cut at `i`, an unknown dimension as 1.

        Only compared between cuts of one model, for balancing.
        """
        return float(bytes_per_example(self.boundary(i), unknown=1) or 0)

    def sub_model(self, a: int, b: int, name: str) -> keras.Model:
        """A functional model of operations `[a, b)`, sharing their layers."""
        model = self.model
        inputs = (
            one_or_list(list(model.inputs)) if a == 0 else one_or_list(self.boundary(a))
        )
        outputs = (
            _outputs(model) if b == len(self.units) else one_or_list(self.boundary(b))
        )
        flat_in, flat_out = tree.flatten(inputs), tree.flatten(outputs)
        received = {id(t) for t in flat_in}
        if not any(id(t) in received for t in flat_out):
            return keras.Model(inputs, outputs, name=name)
        # Tensors passing through. Keras re-creates intermediate inputs as new
        # `keras.Input`s, and an output that is one of the original tensors is
        # then "not connected": build the computed part first, then a model
        # over its new inputs, which may be returned as they are.
        computed = [t for t in flat_out if id(t) not in received]
        inner = keras.Model(flat_in, computed)
        new = {
            id(t): u
            for t, u in zip(
                [*flat_in, *computed], [*inner.inputs, *inner.outputs], strict=True
            )
        }
        return keras.Model(
            tree.map_structure(lambda t: new[id(t)], inputs),
            tree.map_structure(lambda t: new[id(t)], outputs),
            name=name,
        )
