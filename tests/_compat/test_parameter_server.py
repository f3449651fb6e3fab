"""Internals of `tfpar.ParameterServerStrategy` (`tfpar/_compat/parameter_server.py`).

Each test fails loudly when an upgrade removes or changes what this area
relies on; `tfpar/_compat/parameter_server.py` says why each internal is needed.
Runs on the two simulated CPUs of `tests/conftest.py`.
"""

import inspect

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.distribute.coordinator import cluster_coordinator

from tfpar._compat import parameter_server as _compat


def test_keras_assign_add_is_still_read_then_write_and_the_fix_is_atomic():
    source = inspect.getsource(keras.Variable.assign_add)
    assert "self.assign(self + value)" in source, (
        "Keras changed Variable.assign_add: check whether make_updates_atomic "
        "is still needed."
    )
    variable = keras.Variable(np.zeros(2, "float32"))
    other = keras.Variable(np.zeros(2, "float32"))
    _compat.make_updates_atomic([variable])
    variable.assign_add([1.0, 2.0])
    variable.assign_sub([0.5, 0.5])
    np.testing.assert_array_equal(variable.numpy(), [0.5, 1.5])
    assert type(variable).__name__ == type(other).__name__
    assert type(variable).__qualname__.endswith("[tfpar:atomic_updates]")
    assert isinstance(variable, type(other))
    assert type(other).assign_add is keras.Variable.assign_add  # others untouched


def test_coordinator_internals_used_by_tfpar_exist():
    # schedule_callable: the internal cluster object schedules plain callables.
    assert (
        "function" in inspect.signature(cluster_coordinator.Cluster.schedule).parameters
    )
    assert "self._cluster.schedule(" in inspect.getsource(
        tf.distribute.coordinator.ClusterCoordinator.schedule
    )
    # current_worker_index: the dispatch context of a worker thread.
    from tensorflow.python.distribute.coordinator import coordinator_context

    assert coordinator_context.get_current_dispatch_context() is None
    assert "worker_index" in dir(coordinator_context.DispatchContext)


def unscheduled_extended(cls):
    """An extended object of `cls`, with only the two flags the check reads."""
    extended = object.__new__(cls)
    extended._being_scheduled = False
    extended._allow_run_without_coordinator = False
    return extended


class FakeWorker:
    worker_index = 1


def test_unscheduled_warning_is_skipped_only_in_a_coordinator_dispatch_context(
    caplog,
):
    # TfparParameterServerExtended: TensorFlow's check, its flag and its
    # message; the override skips it only on a coordinator worker thread.
    from tensorflow.python.distribute import parameter_server_strategy_v2 as ps
    from tensorflow.python.distribute.coordinator import coordinator_context

    check = ps.ParameterServerStrategyV2Extended._assert_being_scheduled_by_cluster_coordinator
    assert "self._being_scheduled" in inspect.getsource(check)
    for method in ("_call_for_each_replica", "_reduce", "_reduce_to"):
        source = inspect.getsource(
            getattr(ps.ParameterServerStrategyV2Extended, method)
        )
        assert "_assert_being_scheduled_by_cluster_coordinator()" in source, method
    assert "self.strategy.extended._being_scheduled = True" in inspect.getsource(
        tf.distribute.coordinator.ClusterCoordinator.schedule
    )
    tfpar_extended = unscheduled_extended(_compat.TfparParameterServerExtended)
    stock_extended = unscheduled_extended(ps.ParameterServerStrategyV2Extended)
    assert _compat.TfparParameterServerExtended.__bases__ == (
        ps.ParameterServerStrategyV2Extended,
    )
    with caplog.at_level("WARNING", logger="tensorflow"):
        tfpar_extended._assert_being_scheduled_by_cluster_coordinator()
        assert len(caplog.records) == 1  # outside a dispatch context: TF's own
        assert (
            caplog.records[0]
            .getMessage()
            .startswith(
                "A `tf.distribute.experimental.ParameterServerStrategy` method is invoked"
            )
        )
        with coordinator_context.with_dispatch_context(FakeWorker()):
            assert _compat.current_worker_index() == 1
            tfpar_extended._assert_being_scheduled_by_cluster_coordinator()
            stock_extended._assert_being_scheduled_by_cluster_coordinator()
        # TensorFlow's class is unchanged: it warns there too.
        assert len(caplog.records) == 2


def test_no_filter_on_tensorflows_logger():
    # Wrap, never patch: importing tfpar adds nothing to TensorFlow's logger.
    import tfpar  # noqa: F401

    for log_filter in tf.get_logger().filters:
        assert not type(log_filter).__module__.startswith("tfpar"), log_filter


def test_every_object_swap_is_listed_and_says_tfpar():
    from tfpar import _subclass
    from tfpar._compat import cluster, sharding

    names = [swap.name for swap in _subclass.OBJECT_SWAPS]
    assert len(names) == len(set(names))
    for cls in (
        _compat.TfparParameterServerExtended,
        sharding.TfparShardedExtended,
        sharding.TfparTrainableShardedVariable,
        cluster.TfparCoordinatorWorker,
    ):
        assert cls.__module__.startswith("tfpar._compat."), cls
        assert "Tfpar" in cls.__qualname__
    layer = keras.layers.Dense(1)
    with pytest.raises(ValueError, match="not listed"):
        _subclass.use_overrides(layer, "unlisted", {}, {})
    with pytest.raises(TypeError, match="a tfpar subclass of exactly"):
        _subclass.swap_class(layer, "ps_extended", sharding.TfparShardedExtended)
    assert type(layer) is keras.layers.Dense


def test_merge_call_hooks_used_by_tfpar_exist_and_apply_only_while_tracing():
    # TfparParameterServerExtended skips merge_call through TensorFlow's own
    # hooks: maybe_merge_call asks _use_merge_call, a replica-context update
    # goes to _replica_ctx_update, a replica-context all-reduce to
    # _replica_ctx_all_reduce.
    from tensorflow.python.distribute import distribute_lib, merge_call_interim
    from tensorflow.python.distribute import parameter_server_strategy_v2 as ps

    assert "_use_merge_call()" in inspect.getsource(
        merge_call_interim.strategy_supports_no_merge_call
    )
    update = inspect.getsource(distribute_lib.StrategyExtendedV2.update)
    assert "self._replica_ctx_update(" in update
    assert "_replica_ctx_all_reduce(" in inspect.getsource(
        distribute_lib.ReplicaContext.all_reduce
    )
    for name in ("_use_merge_call", "_replica_ctx_update", "_replica_ctx_all_reduce"):
        assert callable(getattr(ps.ParameterServerStrategyV2Extended, name)), name
    assert isinstance(
        ps.ParameterServerStrategyV2Extended._num_replicas_in_sync, property
    )
    extended = object.__new__(_compat.TfparParameterServerExtended)
    extended._num_gpus_per_worker = 0
    stock = object.__new__(ps.ParameterServerStrategyV2Extended)
    assert extended._use_merge_call()
    with _compat.without_merge_call(extended), _compat.without_merge_call(stock):
        assert not extended._use_merge_call()
        assert stock._use_merge_call()  # TensorFlow's class is unchanged
        value = tf.constant([1.0, 2.0])
        np.testing.assert_array_equal(
            extended._replica_ctx_all_reduce("SUM", [value])[0], value
        )
    assert extended._use_merge_call()
    extended._num_gpus_per_worker = 2  # several replicas: TensorFlow's path
    with _compat.without_merge_call(extended):
        assert extended._use_merge_call()


def test_keras_data_adapters_of_python_data_are_where_tfpar_looks():
    # feeds_python_data: Keras's epoch iterator keeps its adapter as
    # `data_adapter`; PyDataset and generators have adapters of their own.
    from keras.src.trainers.epoch_iterator import EpochIterator

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            return np.zeros((2, 1)), np.zeros((2, 1))

    def generator():
        yield np.zeros((2, 1)), np.zeros((2, 1))

    x = np.zeros((4, 1))
    for data, python in [(Batches(), True), (generator(), True), (x, False)]:
        iterator = EpochIterator(x=data, y=None if python else x, batch_size=2)
        assert _compat.feeds_python_data(iterator) is python, data
    assert not _compat.feeds_python_data(None)
