"""Private TensorFlow and Keras internals of PipelineStrategy, and why.

Used by `tfpar/strategies/pipeline/strategy.py` and `engine.py`:

- `OneDeviceExtended`, `UpdateContext` (tensorflow.python.distribute) and the
  `StrategyExtended` hooks `_create_variable`, `_call_for_each_replica`,
  `_use_merge_call`, `_update` (`OneDeviceAdapter`): the pipeline's host side
  (input pipeline, replica context, reductions) is exactly a one-device
  strategy. Subclassing its extended object and overriding these private
  hooks is the only way to build a `tf.distribute.Strategy` whose variable
  creation, `run` and `update` we control.
- `OneReplicaContext`: entering a `tf.distribute.ReplicaContext` with `with`
  (its `__enter__` is hidden from TensorFlow's docs; strategies enter it in
  their private `_call_for_each_replica`). Keras's `LossScaleOptimizer`
  (mixed precision) refuses to apply gradients outside a replica context,
  and the pipeline builds its step outside one; a strategy's public `run`
  would re-enter the strategy's own hook.
- `keras_step`: Keras passes its step function to `strategy.run` as the bound
  method `model.train_step` / `model.test_step`, or, for predict, as a
  `functools.wraps` wrapper of a closure over the model. The strategy needs
  the model to cut it into stages; nothing else hands it over.
- `loss_tracker`: Keras's train and test steps update `model._loss_tracker`
  (the "loss" shown by `fit`); a pipelined step must update it the same way.
- `move_variable`: a Keras variable's backing `tf.Variable` is fixed to one
  device when created, before the model can be partitioned. Moving it means
  swapping `KerasVariable._value`, keeping the `_unique_id` that Keras
  optimizers use as the variable's key.
- `layer_calls`, `keras_mask` (used by `partition.py`): cutting a model
  anywhere needs every call of every layer with its input and output
  tensors. Keras records a call as a `Node` in the private
  `Operation._inbound_nodes`, reached from a tensor's `_keras_history`; the
  public `layer.input` and `layer.output` show only a layer's first call (a
  shared layer has several, and a layer gains one per model built from its
  tensors). A tensor's Keras mask (`Embedding(mask_zero=True)`, `Masking`)
  is the private attribute `_keras_mask`; a mask cannot cross a stage
  boundary, so the partition must see it.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import keras
import tensorflow as tf
from keras.src.backend.tensorflow.trainer import TensorFlowTrainer
from tensorflow.python.distribute.distribute_lib import UpdateContext
from tensorflow.python.distribute.one_device_strategy import OneDeviceExtended

from tfpar.devices import canonical_device

__all__ = [
    "LayerCall",
    "OneDeviceAdapter",
    "OneReplicaContext",
    "UpdateContext",
    "keras_mask",
    "keras_step",
    "layer_calls",
    "loss_tracker",
    "move_variable",
    "overrides_step",
    "seed_states",
]


_STOCK_STEPS = {
    "train": TensorFlowTrainer.train_step,
    "test": TensorFlowTrainer.test_step,
    "predict": TensorFlowTrainer.predict_step,
}


class OneReplicaContext(tf.distribute.ReplicaContext):
    """The one replica's context of `strategy`, to enter with `with`.

    Its `all_reduce` returns the values as they are: over one replica the
    sum and the mean are the value itself, and the stock all-reduce adds
    identity ops that TensorFlow may place away from the stage that holds
    the gradient. `merge_call` and `extended.update` work as for any
    one-replica context.

    Args:
        strategy: The strategy whose replica this is.
    """

    def __init__(self, strategy: tf.distribute.Strategy) -> None:
        super().__init__(strategy, replica_id_in_sync_group=0)

    def all_reduce(self, reduce_op: Any, value: Any, options: Any = None) -> Any:
        """Returns `value`: one replica's values are already reduced."""
        del reduce_op, options
        return value


class OneDeviceAdapter(OneDeviceExtended):
    """A one-device `StrategyExtended` whose private hooks call tfpar-named ones.

    Subclasses override `make_variable`, `run_replica_fn`, `uses_merge_call`
    and `update_variable`; each defaults to the stock one-device behaviour.

    Args:
        container_strategy: The `tf.distribute.Strategy` this object extends.
        device: The one device (the host side of the strategy).
    """

    def make_variable(self, next_creator: Any, **kwargs: Any) -> Any:
        """Creates a variable in the strategy's scope."""
        return super()._create_variable(next_creator, **kwargs)

    def run_replica_fn(self, fn: Any, args: Any, kwargs: Any) -> Any:
        """Runs `fn` as the one replica (what `strategy.run` calls)."""
        return super()._call_for_each_replica(fn, args, kwargs)

    def uses_merge_call(self) -> bool:
        """Whether replica contexts go through `merge_call`."""
        return bool(super()._use_merge_call())

    def update_variable(
        self, var: Any, fn: Any, args: Any, kwargs: Any, group: bool
    ) -> Any:
        """Runs `fn(var, *args, **kwargs)` to update `var` (`extended.update`)."""
        return super()._update(var, fn, args, kwargs, group)

    def _create_variable(self, next_creator: Any, **kwargs: Any) -> Any:
        return self.make_variable(next_creator, **kwargs)

    def _call_for_each_replica(self, fn: Any, args: Any, kwargs: Any) -> Any:
        return self.run_replica_fn(fn, args, kwargs)

    def _use_merge_call(self) -> bool:
        return self.uses_merge_call()

    def _update(self, var: Any, fn: Any, args: Any, kwargs: Any, group: bool) -> Any:
        return self.update_variable(var, fn, args, kwargs, group)


def keras_step(fn: Any) -> tuple[keras.Model, str] | None:
    """Recognizes the step function Keras passes to `strategy.run`.

    Returns:
        `(model, kind)` with kind `"train"`, `"test"` or `"predict"` when `fn`
        is Keras's own step of a model that does not override that step, else
        `None`.
    """
    # `strategy.run` wraps `fn` for autograph (functools.wraps), and Keras
    # wraps the predict step the same way: unwrap down to Keras's function.
    inner = fn
    while hasattr(inner, "__wrapped__") or isinstance(inner, functools.partial):
        model = getattr(inner, "__self__", None)
        if isinstance(model, keras.Model):
            break
        inner = getattr(inner, "__wrapped__", None) or getattr(inner, "func", None)
    model = getattr(inner, "__self__", None)
    name = getattr(inner, "__name__", "")
    if isinstance(model, keras.Model) and name in ("train_step", "test_step"):
        kind = name.removesuffix("_step")
        return None if overrides_step(model, kind) else (model, kind)
    inner = getattr(inner, "python_function", inner)  # a tf.function (jit)
    if getattr(inner, "__name__", "") != "one_step_on_data":
        return None
    for cell in getattr(inner, "__closure__", None) or ():
        candidate = cell.cell_contents
        if isinstance(candidate, keras.Model):
            if overrides_step(candidate, "predict"):
                return None
            return (candidate, "predict")
    return None


def overrides_step(model: keras.Model, kind: str) -> bool:
    """Whether `model`'s class replaces Keras's `<kind>_step` (`"train"`, ...)."""
    return getattr(type(model), f"{kind}_step", None) is not _STOCK_STEPS[kind]


def loss_tracker(model: keras.Model) -> keras.metrics.Metric | None:
    """Returns the `Mean` metric behind the "loss" Keras reports, if any."""
    return getattr(model, "_loss_tracker", None)


class LayerCall(NamedTuple):
    """One call of a layer (or other Keras operation) in a model's graph.

    Attributes:
        operation: The layer or operation called.
        node_index: Which of its calls this is (Keras's node index, as in
            `model.summary()`).
        inputs: The KerasTensors it received, keyword arguments included
            (an explicit `mask=`).
        outputs: The KerasTensors it returned, flattened.
    """

    operation: Any
    node_index: int
    inputs: tuple[keras.KerasTensor, ...]
    outputs: tuple[keras.KerasTensor, ...]


def layer_calls(
    inputs: list[keras.KerasTensor], outputs: list[keras.KerasTensor]
) -> list[LayerCall]:
    """Every call between `inputs` and `outputs`, each after the calls it needs.

    Args:
        inputs: A model's input tensors (where the walk stops).
        outputs: Its output tensors, flattened.

    Returns:
        The calls in a deterministic topological order (a depth-first walk
        from the outputs), without the calls of input layers.
    """
    known = {id(t) for t in inputs}
    calls: list[LayerCall] = []
    done: set[int] = set()
    # Iterative post-order walk: a deep model would exceed Python's
    # recursion limit.
    stack = [(t._keras_history[:2], False) for t in reversed(outputs)]
    while stack:
        (operation, index), expanded = stack.pop()
        node = operation._inbound_nodes[index]
        if id(node) in done:
            continue
        if expanded or node.is_input:
            done.add(id(node))
            if not node.is_input:
                calls.append(
                    LayerCall(
                        operation, index, tuple(node.input_tensors), tuple(node.outputs)
                    )
                )
            continue
        stack.append(((operation, index), True))
        stack += [
            (t._keras_history[:2], False)
            for t in reversed(node.input_tensors)
            if id(t) not in known
        ]
    return calls


def keras_mask(tensor: keras.KerasTensor) -> keras.KerasTensor | None:
    """The Keras mask `tensor` carries (`Embedding(mask_zero=True)`), if any."""
    return getattr(tensor, "_keras_mask", None)


def move_variable(variable: keras.Variable, device: str) -> None:
    """Re-creates the `tf.Variable` behind `variable` on `device`.

    Call outside any `tf.function` (or under `tf.init_scope()`).
    """
    old = variable.value
    if canonical_device(old.device or "/device:CPU:0") == canonical_device(device):
        return
    with tf.device(device):
        new = tf.Variable(
            old.read_value(),
            trainable=old.trainable,
            name=old.name.split(":")[0],
            aggregation=old.aggregation,
            synchronization=old.synchronization,
        )
    new._unique_id = old._unique_id  # Keras optimizers key variables by this id.
    variable._value = new


def seed_states(model: keras.Model) -> list[keras.Variable]:
    """The state variables of every `SeedGenerator` of `model`'s layers.

    Keras tracks a layer's seed generators only in the private
    `Layer._seed_generators` (no public accessor); a recomputed forward reads
    these states as they were in the original forward, so that Dropout draws
    the same mask.
    """
    return [
        generator.state
        for layer in model._flatten_layers(include_self=False)
        for generator in getattr(layer, "_seed_generators", [])
    ]
