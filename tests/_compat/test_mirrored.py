"""Internals of `tfpar.MirroredStrategy` (`tfpar/_compat/mirrored.py`).

Each test fails loudly when an upgrade removes or changes what this area
relies on; `tfpar/_compat/mirrored.py` says why each internal is needed.
Runs on the two simulated CPUs of `tests/conftest.py`.
"""

import inspect
from typing import Any

import pytest
import tensorflow as tf

from tfpar._compat import mirrored as _compat

DEVICES = ["/device:CPU:0", "/device:CPU:1"]


def test_private_tensorflow_internals_exist() -> None:
    # Fails loudly when a TensorFlow or Keras upgrade removes what
    # tfpar/_compat/mirrored.py relies on.
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer
    from tensorflow.python.distribute import values

    assert hasattr(values, "PerReplica") and hasattr(values, "Mirrored")
    assert hasattr(TensorFlowTrainer, "_maybe_symbolic_build")
    assert tf.distribute.MirroredStrategy._collective_key_base == 0
    stock = tf.distribute.MirroredStrategy(DEVICES)
    assert isinstance(
        _compat.stock_default_cross_device_ops(stock.extended),
        tf.distribute.CrossDeviceOps,
    )


def test_mirrored_remote_devices_and_no_merge_call_internals_exist() -> None:
    # use_remote_devices and reduce_without_merge_call_in_nested_graphs.
    from tensorflow.python.distribute import mirrored_run, mirrored_strategy

    extended = mirrored_strategy.MirroredExtended
    for name in ("_initialize_strategy", "_use_merge_call", "_get_cross_device_ops"):
        assert callable(getattr(extended, name)), name
    stock = tf.distribute.MirroredStrategy(DEVICES)
    for name in ("_input_workers_devices", "_host_input_device", "_default_device"):
        assert hasattr(stock.extended, name), name
    thread = inspect.getsource(mirrored_run._MirroredReplicaThread)
    assert "self.graph = " in thread
    assert "not supported in eager mode" in inspect.getsource(extended.__init__)


class _Recording(_compat.CrossDeviceOpsHooks):
    """Forwards every call to stock ops and records which private hook ran."""

    def __init__(self) -> None:
        super().__init__()
        self.algorithm = tf.distribute.ReductionToOneDevice()
        self.replica_algorithm: tf.distribute.CrossDeviceOps | None = None
        self.calls: list[str] = []

    def num_between_graph_workers(self) -> int:
        self.calls.append("num_between_graph_workers")
        return _compat.num_between_graph_workers(self.algorithm)

    def reduce_implementation(self, *args: object) -> object:
        return self.algorithm.reduce_implementation(*args)

    def batch_reduce_implementation(self, *args: object) -> object:
        return self.algorithm.batch_reduce_implementation(*args)

    def broadcast_implementation(self, *args: object) -> object:
        return self.algorithm.broadcast_implementation(*args)

    def gather_implementation(self, *args: object) -> object:
        self.calls.append("gather_implementation")
        return _compat.gather(self.algorithm, *args)

    def replica_all_reduce(self, *args: object) -> object:
        self.calls.append("replica_all_reduce")
        return _compat.replica_all_reduce(self.replica_algorithm, *args)


class _OwnKeys(tf.distribute.MirroredStrategy):
    """Collective keys of its own: other tests' reductions reuse the stock ones."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _compat.reserve_collective_keys(self)
        super().__init__(*args, **kwargs)


def test_tensorflow_calls_the_cross_device_ops_hooks() -> None:
    # CrossDeviceOpsHooks: TensorFlow reaches each tfpar-named hook through
    # its private name, and the stock ops answer the forwarding functions.
    ops = _Recording()
    strategy = _OwnKeys(DEVICES, cross_device_ops=ops)
    ops.replica_algorithm = _compat.stock_default_cross_device_ops(strategy.extended)
    _compat.reduce_without_merge_call_in_nested_graphs(strategy.extended, ops)
    values = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.fill([2], float(ctx.replica_id_in_sync_group + 1))
    )

    # The public reduce reads the worker count first.
    reduced = ops.reduce(tf.distribute.ReduceOp.SUM, values, DEVICES[0])
    assert reduced.numpy().tolist() == [3.0, 3.0]
    assert ops.calls == ["num_between_graph_workers"]
    gathered = strategy.gather(values, axis=0)
    assert gathered.numpy().tolist() == [1.0, 1.0, 2.0, 2.0]
    assert ops.calls[-1] == "gather_implementation"

    @tf.function
    def step(value: tf.Tensor) -> tf.Tensor:
        def replica(v: tf.Tensor) -> tf.Tensor:
            # Inside a tf.cond: the replica context reduces without merge_call.
            ctx = tf.distribute.get_replica_context()
            return tf.cond(
                tf.constant(True), lambda: ctx.all_reduce("SUM", v), lambda: v
            )

        return strategy.run(replica, args=(value,))

    result = strategy.experimental_local_results(step(values))
    assert [r.numpy().tolist() for r in result] == [[3.0, 3.0]] * 2
    assert ops.calls[-1] == "replica_all_reduce"


def test_collectives_of_a_function_called_inside_control_flow() -> None:
    # instance_keys_at_trace_time_in_control_flow: what it relies on, and
    # the stock failure it avoids (Keras's steps_per_execution loop).
    from tensorflow.python.distribute import collective_all_reduce_strategy

    extended = collective_all_reduce_strategy.CollectiveAllReduceExtended
    assert "self._host_cross_device_ops = " in inspect.getsource(extended)

    def step_in_a_cond(strategy: tf.distribute.Strategy) -> list[float]:
        values = strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.fill([2], float(ctx.replica_id_in_sync_group + 1))
        )

        def replica(value: tf.Tensor) -> tf.Tensor:
            return tf.distribute.get_replica_context().all_reduce("SUM", value)

        @tf.function
        def step(value: Any) -> Any:
            return strategy.run(replica, args=(value,))

        @tf.function
        def loop(value: Any) -> Any:
            return tf.cond(tf.constant(True), lambda: step(value), lambda: value)

        results = strategy.experimental_local_results(loop(values))
        return [float(r.numpy()[0]) for r in results]

    stock = _OwnKeys(DEVICES)
    ops = _compat.stock_default_cross_device_ops(stock.extended)
    launchers = ops._launchers
    assert len(launchers) == 2
    assert all(launcher._use_unique_instance_key() for launcher in launchers)
    with pytest.raises(tf.errors.InvalidArgumentError, match="Placeholder"):
        step_in_a_cond(stock)

    fixed = _OwnKeys(DEVICES)
    _compat.instance_keys_at_trace_time_in_control_flow(
        _compat.stock_default_cross_device_ops(fixed.extended)
    )
    assert step_in_a_cond(fixed) == [3.0, 3.0]
    assert step_in_a_cond(fixed) == [3.0, 3.0]
