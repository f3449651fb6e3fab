"""Every private TensorFlow and Keras internal tfpar relies on, and why.

None of these has a public path in TensorFlow 2.21 / Keras 3.
`tests/test_compat.py` fails loudly if an upgrade removes any of them.

MirroredStrategy (`tfpar/strategies/mirrored.py`, `allreduce.py`):

- `values.PerReplica`, `values.Mirrored`: a `CrossDeviceOps` subclass that
  compresses or packs gradients must hand the wrapped algorithm new
  per-replica values and return mirrored ones; `tf.distribute` exposes only
  the abstract `DistributedValues`, with no constructor.
- `MirroredExtended._collective_ops`: the stock default reduction (collective
  all-reduce with its group keys: ring on CPUs, NCCL on GPUs, reduction to one
  device on mixed devices) is built inside the constructor and only kept
  there. Wrapping that very object makes the tfpar strategy bit-identical to
  the stock one; building our own would need the private
  `CollectiveAllReduce` class and the strategy's private collective keys.
- `MirroredStrategy._collective_key_base`: every stock `MirroredStrategy` in
  a process starts its collective group keys at 1, so two strategies over the
  same devices share collective instance keys. When their tensors differ in
  dtype (a compressed bf16 reduction after a float32 one) TensorFlow aborts
  all collectives of the process ("Collective instance 100 expected ...
  data_type 1 but got ... data_type 14"). Each tfpar strategy gets its own
  base.
- Keras's `TensorFlowTrainer._maybe_symbolic_build`: it averages the first
  distributed batch over the replicas (`strategy.reduce("MEAN", batch,
  axis=None)`) only to get shapes for building the model, which fails with an
  AddN shape error when that batch does not split evenly (keras-team/keras
  issue 19246). `called_from_keras_symbolic_build` recognizes that one
  caller, so the strategy can answer it and still reject the same call from
  user code.
- `MirroredExtended._initialize_strategy`, `_input_workers_devices`,
  `_host_input_device`, `_default_device` (`use_remote_devices`): in eager
  mode the stock constructor refuses devices of several tasks ("In-graph
  multi-worker training ... not supported in eager mode"), although its
  single-worker set-up works for them once the input pipeline stays on this
  process's CPU. The strategy is built on a local placeholder device, then
  set up again on the remote devices; no public path exists.
- `MirroredExtended._use_merge_call`, `_get_cross_device_ops`,
  `mirrored_run._MirroredReplicaThread.graph`
  (`reduce_without_merge_call_in_nested_graphs`): Keras 3 reduces gradients
  inside a `tf.cond` when `gradient_accumulation_steps` is set, where
  `merge_call` is refused. TensorFlow's own no-`merge_call` path (used for XLA
  on GPUs) is selected only by `_use_merge_call`, and its reductions go to the
  strategy's private collective ops, not to `cross_device_ops`. No public
  switch exists for either.

PipelineStrategy (`tfpar/strategies/pipeline.py`, `pipeline_engine.py`):

- `OneDeviceExtended`, `UpdateContext` (tensorflow.python.distribute): the
  pipeline's host side (input pipeline, replica context, reductions) is
  exactly a one-device strategy. Subclassing its extended object is the only
  way to build a `tf.distribute.Strategy` whose `run` and `update` we control.
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

Callbacks (`tfpar/callbacks/profiling.py`, `device_utilization.py`,
`sources.py`):

- Graph collection (`context.enable_graph_collection`,
  `export_run_metadata`): on CPU the profiler records the thread, not the
  logical device (`/device:CPU:1` shares `/device:CPU:0`'s thread pool). Each
  op's device is in the partition graphs TensorFlow builds when it
  instantiates a function, exported through the eager context's run
  metadata. `tf.summary.trace_on(graph=True)` switches the same collection
  on but only writes it to an event file: no public path returns the graphs
  to Python. Without them `DeviceUtilization` falls back to attributing ops by
  name.
- `device_lib.list_local_devices()`: NVML numbers GPUs differently from
  TensorFlow (`CUDA_VISIBLE_DEVICES` renumbers TensorFlow's), so they are
  matched by PCI bus id, which TensorFlow reports only in these device
  descriptions.
ParameterServerStrategy (`tfpar/strategies/parameter_server.py`,
`ps_training.py`):

- `find_keras_caller`: Keras 3's `fit`, `evaluate` and `predict` never tell
  the strategy which model they run; their only call into it before the first
  step is `strategy.experimental_distribute_dataset(dataset)`, from the
  constructor of their `TFEpochIterator`. The strategy needs that model (to
  give it coordinator-aware train, test and predict functions) and the epoch
  iterator (for the epoch length): both are found from the caller frames.
- `schedule_callable`: `ClusterCoordinator.schedule` accepts only a
  `tf.function`; the coordinator's internal cluster object runs plain Python
  callables on its worker threads (with the same retries), which tfpar needs
  to time each step and enforce a step deadline.
- `current_worker_index`: the coordinator's dispatch context names the worker
  of the running closure; the public accessor works only while tracing.
- `make_updates_atomic`: Keras 3's `Variable.assign_add` reads then writes,
  which loses concurrent updates from several workers.
- `support_sharded_variables` (`ps_sharding.py`): Keras 3 wraps a
  `ShardedVariable` as if it were one `tf.Variable`; its gradient (one
  `handle`), saving (`__array__`, checkpoint tensors), optimizer updates
  (colocated with one device) and optimizer slots (never partitioned) need
  subclasses of `ShardedVariable` and of the strategy's extended object.

LocalCluster (`tfpar/cluster.py`):

- `detach_from_cluster`: a process connected to a cluster removes every
  function it deletes from every remote task, so after the servers stop it
  logs one gRPC error per function and task (most at exit); leaving the
  cluster first needs `Context.update_server_def`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import logging
import sys
import threading
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras.src.backend.tensorflow.trainer import TensorFlowTrainer
from tensorflow.core.protobuf import config_pb2
from tensorflow.python.distribute import mirrored_run as _mirrored_run
from tensorflow.python.distribute import numpy_dataset as _numpy_dataset
from tensorflow.python.distribute import values as _values
from tensorflow.python.distribute.coordinator import coordinator_context
from tensorflow.python.distribute.distribute_lib import UpdateContext
from tensorflow.python.distribute.one_device_strategy import OneDeviceExtended
from tensorflow.python.distribute.sharded_variable import ShardedVariable
from tensorflow.python.eager import context
from tensorflow.python.framework import composite_tensor_gradient

from tfpar.devices import canonical_device

__all__ = [
    "KERAS_ENTRY_POINTS",
    "OneDeviceExtended",
    "UpdateContext",
    "backing_variable",
    "called_from_keras_symbolic_build",
    "current_worker_index",
    "detach_from_cluster",
    "find_keras_caller",
    "gpu_bus_ids",
    "is_sharded",
    "keras_step",
    "loss_tracker",
    "make_updates_atomic",
    "merge_shard_gradients",
    "mirrored",
    "move_variable",
    "per_replica",
    "reduce_without_merge_call_in_nested_graphs",
    "reserve_collective_keys",
    "schedule_callable",
    "scheduled_tracing",
    "start_graph_collection",
    "stock_default_cross_device_ops",
    "stop_graph_collection",
    "support_sharded_variables",
    "use_remote_devices",
]

# --- MirroredStrategy -------------------------------------------------------

# Far above the group keys any stock strategy of the process uses (1, 2, ...).
_KEY_BASES = itertools.count(start=10_000, step=10_000)


def per_replica(tensors: Sequence[Any]) -> tf.distribute.DistributedValues:
    """Wraps one tensor per replica (in replica order) as a `PerReplica`."""
    return _values.PerReplica(tuple(tensors))


def mirrored(tensors: Sequence[Any]) -> tf.distribute.DistributedValues:
    """Wraps one equal tensor per replica (in replica order) as `Mirrored`."""
    return _values.Mirrored(tuple(tensors))


def stock_default_cross_device_ops(
    extended: tf.distribute.StrategyExtended,
) -> tf.distribute.CrossDeviceOps:
    """Returns the reduction a stock `MirroredStrategy` uses by default."""
    return extended._collective_ops


def reserve_collective_keys(strategy: tf.distribute.MirroredStrategy) -> None:
    """Gives `strategy` collective group keys no other strategy uses.

    Must run before `MirroredStrategy.__init__`, which reads the base.
    """
    strategy._collective_key_base = next(_KEY_BASES)


def called_from_keras_symbolic_build() -> bool:
    """Whether the running `Strategy.reduce` was called by Keras's model build."""
    frame: types.FrameType | None = sys._getframe(1)
    for _ in range(6):  # reduce() -> our override -> Keras, with slack.
        if frame is None:
            return False
        if frame.f_code.co_name == "_maybe_symbolic_build" and "keras" in (
            frame.f_code.co_filename
        ):
            return True
        frame = frame.f_back
    return False


def use_remote_devices(
    extended: tf.distribute.StrategyExtended, devices: Sequence[str], host: str
) -> None:
    """Sets a `MirroredExtended` built on a placeholder up on `devices`.

    The single-worker set-up of the stock class, minus its eager-mode refusal
    of several tasks, with the input pipeline and default device kept on
    `host` (this process's CPU): batches are prefetched from here to each
    remote replica, and nothing runs on a worker unless placed there.
    """
    extended._initialize_strategy(tuple(devices))
    extended._input_workers_devices = ((host, tuple(devices)),)
    extended._host_input_device = _numpy_dataset.SingleDevice(host)
    extended._default_device = None


def reduce_without_merge_call_in_nested_graphs(
    extended: tf.distribute.StrategyExtended,
    cross_device_ops: tf.distribute.CrossDeviceOps,
) -> None:
    """Lets replicas reduce inside a `tf.cond` branch, where `merge_call` fails.

    Keras 3 with `gradient_accumulation_steps` reduces gradients inside a
    `tf.cond`; a `merge_call` from a replica thread in a graph other than the
    replica function's own fails ("`merge_call` called while defining a new
    graph"). There, as TensorFlow does for XLA on GPUs, the strategy now says
    it does not use `merge_call`: Keras's `maybe_merge_call` and the replica
    context's `all_reduce` then run per replica, the reduction through
    `cross_device_ops._all_reduce` (collective ops). Everywhere else the stock
    answers stand, so the default path is unchanged.
    """
    stock_use_merge_call = extended._use_merge_call
    stock_get_cross_device_ops = extended._get_cross_device_ops

    def use_merge_call() -> bool:
        thread = threading.current_thread()
        if (
            isinstance(thread, _mirrored_run._MirroredReplicaThread)
            and tf.compat.v1.get_default_graph() is not thread.graph
        ):
            return False
        return bool(stock_use_merge_call())

    def get_cross_device_ops(value: Any) -> tf.distribute.CrossDeviceOps:
        if not use_merge_call():
            return cross_device_ops
        return stock_get_cross_device_ops(value)

    extended._use_merge_call = use_merge_call
    extended._get_cross_device_ops = get_cross_device_ops


# --- PipelineStrategy -------------------------------------------------------

_STOCK_STEPS = {
    "train": TensorFlowTrainer.train_step,
    "test": TensorFlowTrainer.test_step,
    "predict": TensorFlowTrainer.predict_step,
}


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
        return (model, kind) if _is_stock(model, kind) else None
    inner = getattr(inner, "python_function", inner)  # a tf.function (jit)
    if getattr(inner, "__name__", "") != "one_step_on_data":
        return None
    for cell in getattr(inner, "__closure__", None) or ():
        candidate = cell.cell_contents
        if isinstance(candidate, keras.Model):
            return (candidate, "predict") if _is_stock(candidate, "predict") else None
    return None


def _is_stock(model: keras.Model, kind: str) -> bool:
    return getattr(type(model), f"{kind}_step", None) is _STOCK_STEPS[kind]


def loss_tracker(model: keras.Model) -> keras.metrics.Metric | None:
    """Returns the `Mean` metric behind the "loss" Keras reports, if any."""
    return getattr(model, "_loss_tracker", None)


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


def backing_variable(variable: Any) -> tf.Variable:
    """Returns the `tf.Variable` behind a Keras variable (or itself)."""
    return variable.value if isinstance(variable, keras.Variable) else variable


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


# --- Callbacks --------------------------------------------------------------


def start_graph_collection() -> None:
    """Starts recording the partition graphs of functions instantiated from now on."""
    context.context().enable_graph_collection()


def stop_graph_collection() -> config_pb2.RunMetadata:
    """Stops recording and returns what was recorded.

    Returns:
        A `RunMetadata` proto whose `function_graphs[i].partition_graphs` hold
        the placed (post-optimization) graphs, one per device.
    """
    ctx = context.context()
    metadata = ctx.export_run_metadata()
    ctx.disable_graph_collection()
    return metadata if metadata is not None else config_pb2.RunMetadata()


def gpu_bus_ids() -> dict[str, str]:
    """Maps local TensorFlow GPU names to their PCI bus ids.

    Returns:
        Canonical device name to bus id (e.g. `"0000:00:04.0"`); empty on a
        machine without GPUs.
    """
    from tensorflow.python.client import device_lib

    result = {}
    for device in device_lib.list_local_devices():
        if device.device_type != "GPU":
            continue
        for part in device.physical_device_desc.split(","):
            key, _, value = part.partition(":")
            if key.strip() == "pci bus id":
                result[_local_name(device.name)] = value.strip()
    return result


def _local_name(name: str) -> str:
    spec = tf.DeviceSpec.from_string(name)
    return f"/device:{(spec.device_type or 'CPU').upper()}:{spec.device_index or 0}"


# --- ParameterServerStrategy ------------------------------------------------

# Keras's call chain is Trainer.fit/evaluate/predict -> TFEpochIterator.__init__
# -> strategy.experimental_distribute_dataset: two frames; a few more are
# searched so that a subclass overriding one of them still works.
_MAX_FRAMES = 6

# The Keras methods that create epoch iterators.
KERAS_ENTRY_POINTS = ("fit", "evaluate", "predict")


def find_keras_caller(strategy: object) -> tuple[keras.Model, Any] | None:
    """Returns the Keras model and epoch iterator that called into `strategy`.

    Args:
        strategy: The strategy whose method is running.

    Returns:
        `(model, epoch_iterator)` when a Keras `fit`, `evaluate` or `predict`
        of a model built under `strategy` is on the stack, else `None` (a
        custom training loop: stock behaviour applies).
    """
    frame = inspect.currentframe()
    epoch_iterator = None
    try:
        for _ in range(_MAX_FRAMES):
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            if epoch_iterator is None and hasattr(owner, "num_batches"):
                epoch_iterator = owner
            if (
                isinstance(owner, keras.Model)
                and frame.f_code.co_name in KERAS_ENTRY_POINTS
                and getattr(owner, "_distribute_strategy", None) is strategy
            ):
                return owner, epoch_iterator
            frame = frame.f_back
        return None
    finally:
        del frame  # frames hold references to every local: break the cycle


def schedule_callable(
    coordinator: Any, function: Callable[..., Any], args: tuple[Any, ...]
) -> Any:
    """Schedules a plain Python callable on the coordinator's workers.

    Why: the public `ClusterCoordinator.schedule` accepts only a
    `tf.function`, whose Python body runs once, at tracing. tfpar needs a
    Python hook around every execution (which worker, when it started, when
    it ended) to enforce a step deadline and to count steps per worker; the
    coordinator's internal cluster object runs plain callables on its worker
    threads (with the same retry-on-worker-failure), and this is the call
    the public method makes after its type check.

    Args:
        coordinator: A `tf.distribute.coordinator.ClusterCoordinator`.
        function: The callable; it runs on a coordinator worker thread, with
            that worker as the default device.
        args: Its arguments (per-worker values are resolved per worker).

    Returns:
        The `RemoteValue` of the call.
    """
    with coordinator.strategy.scope():
        return coordinator._cluster.schedule(function, args=args, kwargs=None)


def current_worker_index() -> int:
    """The index of the worker whose coordinator thread runs the caller.

    Why: the public `experimental_get_current_worker_index` works only while
    tracing a function; a callable scheduled with `schedule_callable` runs
    eagerly, in the coordinator's dispatch context of that worker.

    Raises:
        RuntimeError: If called outside a scheduled callable.
    """
    context = coordinator_context.get_current_dispatch_context()
    if context is None:
        raise RuntimeError("Not running in a ClusterCoordinator worker thread.")
    return int(context.worker_index)


def _atomic_assign_add(self: Any, value: Any) -> Any:
    value = self._convert_to_tensor(value, dtype=self._dtype)
    return self.value.assign_add(value)


def _atomic_assign_sub(self: Any, value: Any) -> Any:
    value = self._convert_to_tensor(value, dtype=self._dtype)
    return self.value.assign_sub(value)


_ATOMIC_CLASSES: dict[type, type] = {}


def make_updates_atomic(variables: Iterable[Any]) -> None:
    """Makes `assign_add`/`assign_sub` of these Keras variables atomic.

    Why: Keras 3's `Variable.assign_add(v)` is `assign(self + v)`, a read then
    a write. Under a parameter server, workers update the same variables
    concurrently (the optimizer's `iterations`, metric totals and counts), and
    a read-then-write loses updates: 10 scheduled steps were seen to leave
    `optimizer.iterations` at 7. TensorFlow's own `assign_add` is one op on
    the parameter server, atomic. Only the variables given here, those of a
    model trained under `tfpar.ParameterServerStrategy`, change class (to a
    subclass defined here); other Keras variables are untouched, and saved
    files never record a variable's Python class.

    Args:
        variables: Keras variables (backed by TensorFlow variables).
    """
    for variable in variables:
        cls = type(variable)
        if cls in _ATOMIC_CLASSES.values() or not hasattr(
            variable, "_convert_to_tensor"
        ):
            continue
        atomic = _ATOMIC_CLASSES.get(cls)
        if atomic is None:
            atomic = type(
                cls.__name__,  # the same name: reprs and error messages stay Keras's
                (cls,),
                {"assign_add": _atomic_assign_add, "assign_sub": _atomic_assign_sub},
            )
            _ATOMIC_CLASSES[cls] = atomic
        variable.__class__ = atomic


_SCHEDULED = threading.local()
_UNSCHEDULED_WARNING = "A `tf.distribute.experimental.ParameterServerStrategy` method"


class _DropSchedulingWarning(logging.Filter):
    """Drops TensorFlow's "not scheduled" warning, for tfpar's own closures.

    TensorFlow warns when `strategy.run` is traced outside
    `ClusterCoordinator.schedule`; `schedule_callable` closures trace their
    step functions on the worker's dispatch thread, where the warning is
    wrong. Everywhere else it is kept.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        scheduled = getattr(_SCHEDULED, "active", False)
        return not (scheduled and str(record.msg).startswith(_UNSCHEDULED_WARNING))


@contextlib.contextmanager
def scheduled_tracing() -> Iterator[None]:
    """Marks the current thread as running a tfpar scheduled closure."""
    _SCHEDULED.active = True
    try:
        yield
    finally:
        _SCHEDULED.active = False


tf.get_logger().addFilter(_DropSchedulingWarning())


# --- ParameterServerStrategy: sharded variables -----------------------------
#
# A `variable_partitioner` makes TensorFlow create large variables as a
# `ShardedVariable` (one `tf.Variable` per shard, spread over the PS tasks),
# which Keras 3 then wraps as if it were one `tf.Variable`. Keras paths that
# need what a `ShardedVariable` lacks, each with no public hook:
#
# - `GradientTape.gradient(loss, keras_variable)` asks the variable for its
#   one resource `handle`. `_ShardedGradient` (TensorFlow's composite-tensor
#   gradient protocol, `composite_tensor_gradient`) lets the tape
#   differentiate every shard and hands Keras one gradient of the whole
#   variable.
# - Saving converts variables with `np.asarray`, which needs `__array__`.
# - The optimizer updates a variable through `strategy.extended.update`,
#   whose parameter-server implementation (`_update`) colocates the update
#   with the variable's one device; a sharded variable's shards update on
#   their own PS each, so its update runs without that colocation.
# - The optimizer creates its slots (Adam's moments) under
#   `extended.colocate_vars_with(variable)`, which TensorFlow never
#   partitions; for a sharded variable they are sharded like it instead.
# All four are methods of subclasses (of `ShardedVariable`, and of the
# strategy's extended object, whose `_create_variable` gives every new
# sharded variable the subclass): the strategy stays TensorFlow's own.


def is_sharded(variable: Any) -> bool:
    """Whether a Keras variable (or a `tf.Variable`) is a `ShardedVariable`."""
    return isinstance(backing_variable(variable), ShardedVariable)


def merge_shard_gradients(
    shape: tf.TensorShape, shard_rows: Sequence[int], grads: Sequence[Any]
) -> Any:
    """One gradient of a whole sharded variable from its shards' gradients.

    Sparse shard gradients (an embedding lookup's) stay sparse: one
    `IndexedSlices` whose row indices are shifted by each shard's first row.
    """
    if all(g is None for g in grads):
        return None
    offsets = list(itertools.accumulate([0, *shard_rows[:-1]]))
    if all(g is None or isinstance(g, tf.IndexedSlices) for g in grads):
        present = [(g, o) for g, o in zip(grads, offsets, strict=True) if g is not None]
        return tf.IndexedSlices(
            values=tf.concat([g.values for g, _ in present], axis=0),
            indices=tf.concat(
                [tf.cast(g.indices, tf.int64) + o for g, o in present], axis=0
            ),
            dense_shape=tf.constant(shape.as_list(), tf.int64),
        )
    dense = [
        tf.zeros([rows, *shape[1:]]) if g is None else tf.convert_to_tensor(g)
        for g, rows in zip(grads, shard_rows, strict=True)
    ]
    return tf.concat(dense, axis=0)


class _ShardedGradient(composite_tensor_gradient.CompositeTensorGradient):
    """Differentiates a sharded variable through each shard's handle."""

    def get_gradient_components(self, value: Any) -> Any:
        return [v.handle for v in value.variables]

    def replace_gradient_components(self, value: Any, component_grads: Any) -> Any:
        rows = [int(v.shape[0]) for v in value.variables]
        return merge_shard_gradients(value.shape, rows, component_grads)


class _TrainableShardedVariable(ShardedVariable):
    """A `ShardedVariable` that Keras can differentiate and save as one."""

    __composite_gradient__ = _ShardedGradient()

    @property
    def handle(self) -> Any:
        # The tape differentiates `keras_variable.handle`: this object, which
        # `__composite_gradient__` expands into the shards' handles.
        return self

    def __array__(self, dtype: Any = None) -> Any:
        return np.asarray(self.numpy(), dtype=dtype)

    # `tf.train.Checkpoint` of a Keras variable saves what these return: the
    # whole table under the variable's usual key, so a checkpoint restores
    # into an unsharded model (or another sharding) as well.
    def _serialize_to_tensors(self) -> dict[str, Any]:
        return {"VARIABLE_VALUE": tf.convert_to_tensor(self)}

    def _restore_from_tensors(self, restored_tensors: dict[str, Any]) -> Any:
        return self.assign(restored_tensors["VARIABLE_VALUE"])


def _create_variable(self: Any, next_creator: Any, **kwargs: Any) -> Any:
    variable = _stock(self)._create_variable(self, next_creator, **kwargs)
    if type(variable) is ShardedVariable:
        variable.__class__ = _TrainableShardedVariable
    return variable


def _update(self: Any, var: Any, fn: Any, args: Any, kwargs: Any, group: bool) -> Any:
    if not isinstance(var, ShardedVariable):
        return _stock(self)._update(self, var, fn, args, kwargs, group)
    # Each shard's update is an op on that shard's PS (TensorFlow places
    # resource ops with their resource): no single device to colocate with.
    with UpdateContext(var.variables[0].device):
        result = fn(
            var, *self._select_single_value(args), **self._select_single_value(kwargs)
        )
    return result if group else tf.nest.map_structure(self._local_results, result)


def _colocate_vars_with(self: Any, colocate_with_variable: Any) -> Any:
    if isinstance(colocate_with_variable, ShardedVariable):
        # Created without colocation, the variable (an optimizer slot of the
        # same shape) is partitioned like the one it would colocate with.
        return contextlib.nullcontext()
    return _stock(self).colocate_vars_with(self, colocate_with_variable)


def _stock(extended: Any) -> Any:
    return type(extended).__mro__[1]


_SHARDING_CLASSES: dict[type, type] = {}


def support_sharded_variables(extended: tf.distribute.StrategyExtended) -> None:
    """Lets Keras 3 train, update and save the strategy's sharded variables.

    Must run before any variable is created under the strategy.
    """
    cls = type(extended)
    if cls in _SHARDING_CLASSES.values():
        return
    subclass = _SHARDING_CLASSES.get(cls)
    if subclass is None:
        subclass = type(
            cls.__name__,
            (cls,),
            {
                "_create_variable": _create_variable,
                "_update": _update,
                "colocate_vars_with": _colocate_vars_with,
            },
        )
        _SHARDING_CLASSES[cls] = subclass
    extended.__class__ = subclass


# --- LocalCluster: leaving a cluster before it stops -------------------------


def detach_from_cluster(addresses: Iterable[str]) -> bool:
    """Drops the remote tasks from this process's eager context, if connected.

    Why: once a process joined a cluster, every TensorFlow function it
    deletes afterwards (most at interpreter exit) is also removed from every
    remote task; after the servers stopped, each removal logs a gRPC
    "Failed to remove function remotely ... Connection refused" error. The
    only way to leave a cluster is to give the eager context a server def
    without the remote jobs (`Context.update_server_def`, no public path),
    which also closes the remote contexts while the servers still run.

    Args:
        addresses: The `host:port` addresses of the cluster's tasks.

    Returns:
        Whether this process was connected to those tasks and left them.
    """
    ctx = context.context()
    server_def = ctx.get_server_def()
    if server_def is None:
        return False
    wanted = set(addresses)
    remote = {
        address
        for job in server_def.cluster.job
        if job.name != server_def.job_name
        for address in job.tasks.values()
    }
    if not remote & wanted:
        return False
    local = type(server_def)()
    local.CopyFrom(server_def)
    for job in list(local.cluster.job):
        if job.name != local.job_name:
            local.cluster.job.remove(job)
    ctx.update_server_def(local)
    return True
