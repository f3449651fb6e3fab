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
import tensorflow as tf
from keras.src.backend.tensorflow.trainer import TensorFlowTrainer
from tensorflow.core.protobuf import config_pb2
from tensorflow.python.distribute import values as _values
from tensorflow.python.distribute.coordinator import coordinator_context
from tensorflow.python.distribute.distribute_lib import UpdateContext
from tensorflow.python.distribute.one_device_strategy import OneDeviceExtended
from tensorflow.python.eager import context

from tfpar.devices import canonical_device

__all__ = [
    "KERAS_ENTRY_POINTS",
    "OneDeviceExtended",
    "UpdateContext",
    "backing_variable",
    "called_from_keras_symbolic_build",
    "current_worker_index",
    "find_keras_caller",
    "gpu_bus_ids",
    "keras_step",
    "loss_tracker",
    "make_updates_atomic",
    "mirrored",
    "move_variable",
    "per_replica",
    "reserve_collective_keys",
    "schedule_callable",
    "scheduled_tracing",
    "start_graph_collection",
    "stock_default_cross_device_ops",
    "stop_graph_collection",
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
