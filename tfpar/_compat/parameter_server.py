"""Private TensorFlow and Keras internals of ParameterServerStrategy, and why.

Used by `tfpar/strategies/parameter_server/` (`strategy.py`, `runtime.py`,
`training.py`):

- `schedule_callable`: `ClusterCoordinator.schedule` accepts only a
  `tf.function`; the coordinator's internal cluster object (`_cluster`) runs
  plain Python callables on its worker threads (with the same retries), which
  tfpar needs to time each step and enforce a step deadline.
- `current_worker_index`: the coordinator's dispatch context names the worker
  of the running closure; the public accessor works only while tracing.
- `make_updates_atomic`: Keras 3's `Variable.assign_add` reads then writes,
  which loses concurrent updates from several workers (uses Keras's private
  `_convert_to_tensor` and `_dtype` to convert like Keras does).
- `feeds_python_data`: whether Keras's epoch iterator reads a
  `keras.utils.PyDataset` or a Python generator (Keras keeps its data adapter
  as the iterator's `data_adapter` attribute; the adapter classes are not
  public). Such elements come from this process's Python objects, so
  tfpar reads them here and sends them to the workers.
- `TfparParameterServerExtended`: overrides TensorFlow's private
  `_assert_being_scheduled_by_cluster_coordinator`, so tfpar's scheduled
  callables, which trace on the coordinator's worker threads, do not log
  TensorFlow's "not scheduled" warning (no process-wide log filter); and,
  while tfpar traces a step (`without_merge_call`), TensorFlow's private
  `_use_merge_call`, `_replica_ctx_update` and `_replica_ctx_all_reduce`, so
  that Keras's optimizers update without `merge_call`, which fails inside
  the `ops.cond` of gradient accumulation.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import tensorflow as tf
from keras.src.trainers.data_adapters.generator_data_adapter import (
    GeneratorDataAdapter,
)
from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter
from tensorflow.python.distribute.coordinator import coordinator_context
from tensorflow.python.distribute.parameter_server_strategy_v2 import (
    ParameterServerStrategyV2Extended,
)

from tfpar._subclass import swap_class, use_overrides


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


def feeds_python_data(epoch_iterator: Any) -> bool:
    """Whether Keras's epoch iterator reads a `PyDataset` or a generator.

    Why: Keras turns both into a `tf.data` dataset whose elements come from
    a Python callback of this process (`Dataset.from_generator`); only its
    private data adapter says so. A worker reading that dataset calls back
    here for every element, and each worker's repeated copy would restart
    the `PyDataset` epoch (its enqueuer then fails) or share the
    generator's elements at random.

    Args:
        epoch_iterator: Keras's epoch iterator (from `KerasCaller`), or `None`.
    """
    adapter = getattr(epoch_iterator, "data_adapter", None)
    return isinstance(adapter, (GeneratorDataAdapter, PyDatasetAdapter))


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
    overrides = {"assign_add": _atomic_assign_add, "assign_sub": _atomic_assign_sub}
    for variable in variables:
        if hasattr(variable, "_convert_to_tensor"):  # a Keras TensorFlow variable
            use_overrides(variable, "atomic_updates", overrides, _ATOMIC_CLASSES)


class TfparParameterServerExtended(ParameterServerStrategyV2Extended):
    """The `extended` object of a `tfpar.ParameterServerStrategy`.

    Why: TensorFlow's `ClusterCoordinator.schedule` traces a `tf.function`
    on the calling thread while `_being_scheduled` is set, and every
    `strategy.run`, `reduce` or `reduce_to` traced otherwise logs "A
    `tf.distribute.experimental.ParameterServerStrategy` method is invoked
    without using `ClusterCoordinator.schedule`". tfpar's scheduled callables
    (`schedule_callable`) trace their step function on the worker's
    coordinator thread, inside the coordinator's dispatch context: scheduled,
    yet TensorFlow's flag is not set there. The warning is skipped exactly
    there, on this strategy's object; anywhere else it is TensorFlow's.
    """

    def _assert_being_scheduled_by_cluster_coordinator(self) -> None:
        if coordinator_context.get_current_dispatch_context() is None:
            super()._assert_being_scheduled_by_cluster_coordinator()

    # Why: Keras's optimizer updates variables through `maybe_merge_call`,
    # and a gradient-accumulating optimizer (or a `LossScaleOptimizer`)
    # does so inside `ops.cond`, where a `merge_call` fails. With one
    # replica per worker, the merge is a no-op: TensorFlow's documented way
    # to skip it is a strategy whose `_use_merge_call` is False, with its own
    # replica-context update and all-reduce. Only while tfpar traces a step
    # (the steps run in replica threads, hence a count on this object, not
    # a thread-local flag); custom training loops keep TensorFlow's path.

    def _use_merge_call(self) -> bool:
        if _tracing_steps(self):
            return False
        return bool(super()._use_merge_call())

    def _replica_ctx_update(
        self, var: Any, fn: Any, args: Any = (), kwargs: Any = None, group: bool = True
    ) -> Any:
        if not _tracing_steps(self):
            return super()._replica_ctx_update(var, fn, args, kwargs, group)
        # What `merge_call` would run, in the replica's own context.
        return self._update(var, fn, args, kwargs or {}, group)

    def _replica_ctx_all_reduce(
        self, reduce_op: Any, value: Any, options: Any = None
    ) -> Any:
        if not _tracing_steps(self):
            return super()._replica_ctx_all_reduce(reduce_op, value, options)
        # One replica: its sum and its mean are its own value.
        return tf.nest.map_structure(tf.identity, value)


_TRACING_LOCK = threading.Lock()
# Strategies' extended objects (by id) tracing tfpar steps, and how many.
_TRACING: dict[int, int] = {}


def _tracing_steps(extended: Any) -> bool:
    return _TRACING.get(id(extended), 0) > 0


@contextlib.contextmanager
def without_merge_call(extended: Any) -> Iterator[None]:
    """While tfpar traces a step: updates without `merge_call`, if possible.

    Possible on a `TfparParameterServerExtended` with one replica per worker
    (CPU workers, or one GPU each); otherwise TensorFlow's path is kept.

    Args:
        extended: The strategy's `extended` object.
    """
    if not (
        isinstance(extended, TfparParameterServerExtended)
        and extended._num_replicas_in_sync == 1
    ):
        yield
        return
    with _TRACING_LOCK:
        _TRACING[id(extended)] = _TRACING.get(id(extended), 0) + 1
    try:
        yield
    finally:
        with _TRACING_LOCK:
            _TRACING[id(extended)] -= 1
            if not _TRACING[id(extended)]:
                del _TRACING[id(extended)]


def use_tfpar_extended(extended: Any) -> None:
    """Moves a new strategy's `extended` object to `TfparParameterServerExtended`.

    Args:
        extended: The `ParameterServerStrategyV2Extended` that TensorFlow's
            strategy constructor just created.
    """
    swap_class(extended, "ps_extended", TfparParameterServerExtended)
