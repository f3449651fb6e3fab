"""Private TensorFlow and Keras internals of MirroredStrategy, and why.

Used by `tfpar/strategies/mirrored/`: `strategy.py`, `multi_worker.py`,
`all_reduce.py` and `keras_reduce.py`:

- `CrossDeviceOps._num_between_graph_workers`, `_gather_implementation`,
  `_all_reduce` (`CrossDeviceOpsHooks` and the functions calling them on a
  wrapped algorithm): a `CrossDeviceOps` that wraps another must answer and
  forward all three, and the stock ops implement them only under these
  private names. `_num_between_graph_workers` is read by the stock `reduce`,
  `batch_reduce` and `gather` and by the strategy's multi-worker set-up;
  `_gather_implementation` is `gather`'s only hook; `_all_reduce` is the
  replica-context reduction without `merge_call`.
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
  issue 19246). `keras_callers.called_from_keras_symbolic_build` recognizes
  that one caller, so the strategy can answer it and still reject the same
  call from user code.
- `MirroredExtended._initialize_strategy`, `_input_workers_devices`,
  `_host_input_device`, `_default_device` (`use_remote_devices`): in eager
  mode the stock constructor refuses devices of several tasks ("In-graph
  multi-worker training ... not supported in eager mode"), although its
  single-worker set-up works for them once the input pipeline stays on this
  process's CPU. The strategy is built on a local placeholder device, then
  set up again on the remote devices; no public path exists.
- `MirroredExtended._use_merge_call`, `_get_cross_device_ops`,
  `mirrored_run._MirroredReplicaThread.graph`
  (`reduce_without_merge_call_in_nested_graphs`,
  `refuse_reductions_in_nested_graphs`): Keras 3 reduces gradients
  inside a `tf.cond` when `gradient_accumulation_steps` is set, where
  `merge_call` is refused. TensorFlow's own no-`merge_call` path (used for XLA
  on GPUs) is selected only by `_use_merge_call`, and its reductions go to the
  strategy's private collective ops, not to `cross_device_ops`. No public
  switch exists for either.
- `CollectiveAllReduceExtended` (`TfparCollectiveExtended`,
  `init_multi_worker`): the multi-worker strategy takes no
  `cross_device_ops` argument and picks its local devices itself (every
  GPU, else one CPU). tfpar's subclass of its extended object, passed to
  `tf.distribute.Strategy.__init__` as the stock class passes its own, wraps
  the collective all-reduce it builds (`_cross_device_ops`, with the group
  keys every worker shares) in tfpar's measured one, and uses every logical
  CPU of `tfpar.simulate_devices` as a replica (`_initialize_local_devices`).
  The stock strategy's constructor adds only usage gauges.
- `CollectiveAllReduce._launchers`, `CollectiveReplicaLauncher.
  _use_unique_instance_key`, `FuncGraph.outer_graph` and
  `is_control_flow_graph`, the multi-worker `_host_cross_device_ops`
  (`instance_keys_at_trace_time_in_control_flow`): a collective all-reduce
  traced in a `tf.function` takes its instance key as a call-time capture
  (`FuncGraph.capture_call_time_value`). Called from inside a `tf.cond` or
  `tf.while_loop` of another function (Keras's `steps_per_execution > 1`
  loop calls its one-step `tf.function` there), TensorFlow re-captures that
  value in the branch graph, whose call-time captures control flow never
  feeds: the step fails with "You must feed a value for placeholder tensor
  'while/cond/Placeholder'", under the stock strategies too. The launchers
  are built and kept inside the stock ops (the multi-worker strategy has a
  second set for host tensors), the choice of key is a private method, and
  only the graphs' private links tell where the function is called from;
  no public switch exists.
- `Context._context_handle` (`runtime_started`): collective ops must be
  configured before TensorFlow's runtime starts, and TensorFlow says only
  "Collective ops must be configured at program startup" from deep inside
  the strategy's constructor; the handle is what it checks.
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf
from tensorflow.python.distribute import collective_all_reduce_strategy as _collective
from tensorflow.python.distribute import distribute_lib as _distribute_lib
from tensorflow.python.distribute import mirrored_run as _mirrored_run
from tensorflow.python.distribute import numpy_dataset as _numpy_dataset
from tensorflow.python.distribute import values as _values
from tensorflow.python.eager import context as _context

# Keras's methods that distribute a dataset for a model.
# Far above the group keys any stock strategy of the process uses (1, 2, ...).
_KEY_BASES = itertools.count(start=10_000, step=10_000)


class CrossDeviceOpsHooks(tf.distribute.CrossDeviceOps):
    """A `tf.distribute.CrossDeviceOps` whose private hooks call tfpar-named ones.

    Subclasses implement `num_between_graph_workers`, `gather_implementation`
    and `replica_all_reduce`; TensorFlow calls them through the private names
    it knows.
    """

    @property
    def _num_between_graph_workers(self) -> int:
        return self.num_between_graph_workers()

    def _gather_implementation(
        self, per_replica_value: Any, destinations: Any, axis: Any, options: Any
    ) -> Any:
        return self.gather_implementation(
            per_replica_value, destinations, axis, options
        )

    def _all_reduce(
        self, reduce_op: Any, value: Any, replica_id: int, options: Any
    ) -> Any:
        return self.replica_all_reduce(reduce_op, value, replica_id, options)

    def num_between_graph_workers(self) -> int:
        """Returns how many workers run their own graph (1 in one client)."""
        raise NotImplementedError

    def gather_implementation(
        self, per_replica_value: Any, destinations: Any, axis: Any, options: Any
    ) -> Any:
        """Gathers `per_replica_value` along `axis` onto `destinations`."""
        raise NotImplementedError

    def replica_all_reduce(
        self, reduce_op: Any, value: Any, replica_id: int, options: Any
    ) -> Any:
        """All-reduces `value` from replica `replica_id`, without `merge_call`."""
        raise NotImplementedError


def num_between_graph_workers(ops: tf.distribute.CrossDeviceOps) -> int:
    """Returns `ops`'s number of between-graph workers."""
    return int(ops._num_between_graph_workers)


def gather(
    ops: tf.distribute.CrossDeviceOps,
    per_replica_value: Any,
    destinations: Any,
    axis: Any,
    options: Any,
) -> Any:
    """Gathers with `ops`, as its `gather` does after checking its arguments."""
    return ops._gather_implementation(per_replica_value, destinations, axis, options)


def replica_all_reduce(
    ops: tf.distribute.CrossDeviceOps,
    reduce_op: Any,
    value: Any,
    replica_id: int,
    options: Any,
) -> Any:
    """All-reduces `value` with `ops` from one replica, without `merge_call`."""
    return ops._all_reduce(reduce_op, value, replica_id, options)


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


class TfparCollectiveExtended(_collective.CollectiveAllReduceExtended):
    """The multi-worker extended object, with tfpar's all-reduce and devices.

    Args:
        container_strategy: The `tfpar.MultiWorkerMirroredStrategy`.
        cluster_resolver: Its cluster resolver.
        communication_options: A `tf.distribute.experimental.CommunicationOptions`.
        wrap: Returns the `CrossDeviceOps` to reduce with, given the stock
            collective all-reduce, this worker's replica devices and the
            number of replicas of all workers.
    """

    def __init__(
        self,
        container_strategy: tf.distribute.Strategy,
        cluster_resolver: Any,
        communication_options: Any,
        wrap: Callable[
            [tf.distribute.CrossDeviceOps, tuple[str, ...], int],
            tf.distribute.CrossDeviceOps,
        ],
    ) -> None:
        super().__init__(
            container_strategy,
            cluster_resolver=cluster_resolver,
            communication_options=communication_options,
        )
        # After the stock constructor, which asserts its own class there.
        devices = tuple(self.worker_devices)
        stock = self._cross_device_ops  # type: ignore[has-type]
        # Keras's steps_per_execution loop calls the step inside control flow.
        for ops in (stock, self._host_cross_device_ops):
            instance_keys_at_trace_time_in_control_flow(ops)
        self._cross_device_ops = wrap(stock, devices, len(devices) * self._num_workers)
        # Keras reduces inside a tf.cond with gradient_accumulation_steps.
        reduce_without_merge_call_in_nested_graphs(self, self._cross_device_ops)

    def _initialize_local_devices(
        self, cluster_resolver: Any, worker_device: str
    ) -> tuple[tuple[str, ...], str]:
        devices, kind = super()._initialize_local_devices(
            cluster_resolver, worker_device
        )
        cpus = tf.config.list_physical_devices("CPU")
        logical = tf.config.get_logical_device_configuration(cpus[0]) if cpus else None
        if kind == "CPU" and logical:
            devices = tuple(
                f"{worker_device}/device:CPU:{i}" for i in range(len(logical))
            )
        return devices, kind


def init_multi_worker(
    strategy: tf.distribute.Strategy, extended: TfparCollectiveExtended
) -> None:
    """Initializes `strategy` on `extended`, as the stock class does its own."""
    _distribute_lib.Strategy.__init__(strategy, extended)


def runtime_started() -> bool:
    """Whether this process's TensorFlow runtime has started (ran an op)."""
    return _context.context()._context_handle is not None


def reserve_collective_keys(strategy: tf.distribute.MirroredStrategy) -> None:
    """Gives `strategy` collective group keys no other strategy uses.

    Must run before `MirroredStrategy.__init__`, which reads the base.
    """
    strategy._collective_key_base = next(_KEY_BASES)


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
        if _in_nested_replica_graph():
            return False
        return bool(stock_use_merge_call())

    def get_cross_device_ops(value: Any) -> tf.distribute.CrossDeviceOps:
        if not use_merge_call():
            return cross_device_ops
        return stock_get_cross_device_ops(value)

    extended._use_merge_call = use_merge_call
    extended._get_cross_device_ops = get_cross_device_ops


def refuse_reductions_in_nested_graphs(
    extended: tf.distribute.StrategyExtended, error: Exception
) -> None:
    """Raises `error` for a reduction inside a `tf.cond` branch of a replica.

    Where `reduce_without_merge_call_in_nested_graphs` cannot apply (devices
    of several tasks, which TensorFlow's collective ops do not span from one
    client), the stock `merge_call` would fail there with an error naming
    neither the option nor the strategy.
    """
    stock_use_merge_call = extended._use_merge_call

    def use_merge_call() -> bool:
        if _in_nested_replica_graph():
            raise error
        return bool(stock_use_merge_call())

    extended._use_merge_call = use_merge_call


def instance_keys_at_trace_time_in_control_flow(
    ops: tf.distribute.CrossDeviceOps,
) -> None:
    """Gives collectives traced for a call inside control flow fixed instance keys.

    A collective all-reduce in a `tf.function` normally takes a fresh
    instance key at each call, through a call-time capture; TensorFlow
    drops that capture when the function is called inside a `tf.cond` or
    `tf.while_loop` branch of another function (Keras with
    `steps_per_execution > 1`), and the call fails on an unfed placeholder.
    Only for such a function, each collective gets its key when traced, as
    TensorFlow does in graph mode: every call, and every iteration of the
    loop, reuses it (TensorFlow's collective executor also keys each run
    by loop frame and iteration).
    Elsewhere the stock choice stands.

    Args:
        ops: The strategy's stock reduction; anything but TensorFlow's
            collective all-reduce (reduction to one device on mixed
            devices) has no keys and is left as it is.
    """
    for launcher in getattr(ops, "_launchers", ()):
        launcher._use_unique_instance_key = functools.partial(
            _unique_instance_key, launcher._use_unique_instance_key
        )


def _unique_instance_key(stock: Callable[[], bool]) -> bool:
    return bool(stock()) and not _traced_for_call_in_control_flow()


def _traced_for_call_in_control_flow() -> bool:
    """Whether the function being traced is called inside another's control flow."""
    graph = tf.compat.v1.get_default_graph()
    # Collectives inside this function's own control flow are keyed on it.
    while getattr(graph, "is_control_flow_graph", False):
        graph = graph.outer_graph
    caller = getattr(graph, "outer_graph", None)
    while caller is not None and caller.building_function:
        if getattr(caller, "is_control_flow_graph", False):
            return True
        caller = caller.outer_graph
    return False


def _in_nested_replica_graph() -> bool:
    """Whether a replica thread is building a graph other than its own."""
    thread = threading.current_thread()
    return (
        isinstance(thread, _mirrored_run._MirroredReplicaThread)
        and tf.compat.v1.get_default_graph() is not thread.graph
    )
