"""The private TensorFlow and Keras internals `tfpar/_compat.py` relies on.

Each test fails loudly when an upgrade removes what one area relies on; the
module docstring of `tfpar/_compat.py` says why each internal is needed.
Runs on the two simulated CPUs of `tests/conftest.py`.
"""

import inspect

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.distribute.coordinator import cluster_coordinator

from tests.strategies.pipeline.test_strategy import mlp
from tfpar import _compat
from tfpar.callbacks.profiling import OpDevices

DEVICES = ["/device:CPU:0", "/device:CPU:1"]


# --- MirroredStrategy -------------------------------------------------------


def test_private_tensorflow_internals_exist() -> None:
    # Fails loudly when a TensorFlow or Keras upgrade removes what
    # MirroredStrategy's part of tfpar/_compat.py relies on.
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


# --- PipelineStrategy -------------------------------------------------------


def test_compat_internals_exist() -> None:
    # Fails loudly when a TensorFlow or Keras upgrade removes what
    # PipelineStrategy's part of tfpar/_compat.py relies on.
    model = mlp()
    model.compile(optimizer="sgd", loss="mse")
    assert _compat.keras_step(model.train_step) == (model, "train")
    assert _compat.keras_step(model.test_step) == (model, "test")
    assert isinstance(_compat.loss_tracker(model), keras.metrics.Mean)
    variable = model.get_layer("d0").kernel
    assert isinstance(variable.value, tf.Variable) and hasattr(variable, "_value")
    unique_id = variable.value._unique_id
    _compat.move_variable(variable, "/device:CPU:1")
    assert (
        variable.value.device.endswith("CPU:1")
        and variable.value._unique_id == unique_id
    )
    assert hasattr(_compat.OneDeviceExtended, "_call_for_each_replica")
    assert hasattr(_compat.OneDeviceExtended, "_update")
    dropout = keras.Sequential([keras.Input((4,)), keras.layers.Dropout(0.5)])
    assert _compat.seed_states(dropout) == [dropout.layers[0].seed_generator.state]


# --- Callbacks --------------------------------------------------------------


def test_compat_graph_collection_returns_placed_graphs() -> None:
    # Fails loudly if TensorFlow drops the private graph-collection API.
    @tf.function
    def f(x: tf.Tensor) -> tf.Tensor:
        with tf.device("/device:CPU:1"):
            y = tf.linalg.matmul(x, x, name="placed_on_one")
        return y + 1.0

    _compat.start_graph_collection()
    f(tf.ones((4, 4)))
    ops = OpDevices.from_run_metadata(_compat.stop_graph_collection())
    assert ops.devices["placed_on_one"] == "/device:CPU:1"


# --- ParameterServerStrategy ------------------------------------------------


class RecordingStrategy(tf.distribute.OneDeviceStrategy):
    """Records what `find_keras_caller` sees when Keras distributes a dataset."""

    def __init__(self):
        super().__init__("/cpu:0")
        self.callers = []

    def experimental_distribute_dataset(self, dataset, options=None):
        self.callers.append(_compat.find_keras_caller(self))
        return super().experimental_distribute_dataset(dataset, options)


def test_keras_fit_evaluate_predict_are_found_from_experimental_distribute_dataset():
    strategy = RecordingStrategy()
    with strategy.scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
    x, y = np.ones((8, 3), "float32"), np.ones((8, 1), "float32")
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    model.evaluate(x, y, batch_size=4, verbose=0)
    model.predict(x, batch_size=4, verbose=0)
    assert len(strategy.callers) == 3
    for caller in strategy.callers:
        assert caller is not None, "Keras no longer calls it from fit/evaluate/predict"
        found_model, epoch_iterator = caller
        assert found_model is model
        assert epoch_iterator.num_batches == 2
    # Outside Keras (a custom loop), nothing is found: stock behaviour.
    assert _compat.find_keras_caller(strategy) is None


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


def test_sharded_variable_internals_differentiate_and_save_as_one_variable():
    from tensorflow.python.distribute import parameter_server_strategy as ps
    from tensorflow.python.distribute.sharded_variable import ShardedVariable

    # The methods the sharding subclass of the PS extended object overrides
    # or calls.
    for name in ("_create_variable", "_update", "_select_single_value"):
        assert hasattr(ps.ParameterServerStrategyExtended, name), name
    table = np.arange(10 * 2, dtype="float32").reshape(10, 2)
    sharded = ShardedVariable([tf.Variable(table[:5]), tf.Variable(table[5:])])
    sharded.__class__ = _compat.sharding._TrainableShardedVariable
    variable = keras.Variable(np.zeros((10, 2), "float32"))
    variable._value = sharded  # how Keras wraps what the strategy created
    assert _compat.is_sharded(variable)
    with tf.GradientTape() as tape:
        rows = tf.nn.embedding_lookup(sharded, [1, 7, 7])
        loss = tf.reduce_sum(rows * [[1.0, 2.0]])
    grad = tape.gradient(loss, variable)  # Keras's call: one handle per variable
    assert isinstance(grad, tf.IndexedSlices)
    np.testing.assert_array_equal(
        tf.convert_to_tensor(grad).numpy()[[1, 7]], [[1.0, 2.0], [2.0, 4.0]]
    )
    np.testing.assert_array_equal(np.asarray(variable), table)
    saved = sharded._serialize_to_tensors()["VARIABLE_VALUE"]
    np.testing.assert_array_equal(saved.numpy(), table)


def test_eager_context_can_leave_a_cluster():
    # detach_from_cluster: a process that never connected has no server def,
    # and the method that drops remote jobs exists.
    from tensorflow.python.eager import context

    assert callable(context.Context.update_server_def)
    assert context.context().get_server_def() is None
    assert _compat.detach_from_cluster(["127.0.0.1:1"]) is False


def test_coordinator_threads_can_restore_the_default_executor_without_waiting():
    # free_coordinator_threads: each closure runs in
    # `context.executor_scope(worker.executor)`, looked up on the module at
    # every call; the stock scope's view of the previous executor waits on
    # deletion, the replacement restores it through the same view.
    import threading
    import types

    from tensorflow.python.eager import context
    from tensorflow.python.eager import executor as executor_module

    assert "context.executor_scope(worker.executor)" in inspect.getsource(
        cluster_coordinator.Closure.execute_on
    )
    assert "self.wait()" in inspect.getsource(executor_module.Executor.__del__)
    assert "self.executor = executor.new_executor(" in inspect.getsource(
        cluster_coordinator.Worker.__init__
    )

    class Worker:  # the coordinator's `Worker` objects are weakly referenced
        executor = executor_module.new_executor(enable_async=False)

    worker = Worker()
    other = executor_module.new_executor(enable_async=False)
    coordinator = types.SimpleNamespace(
        _cluster=types.SimpleNamespace(workers=[worker])
    )
    _compat.free_coordinator_threads(coordinator)
    assert context.executor_scope.__module__ == "tfpar._compat.cluster"

    def run(e: executor_module.Executor, out: list[object]) -> None:
        with context.executor_scope(e):
            out.append(float(tf.reduce_sum(tf.ones([3]))))
        out.append(float(tf.reduce_sum(tf.ones([2]))))  # the default executor
        out.append(context.context().executor.is_async())

    for e in (worker.executor, other):  # tfpar's worker, then the stock path
        out: list[object] = []
        thread = threading.Thread(target=run, args=(e, out))
        thread.start()
        thread.join(30)
        assert out == [3.0, 2.0, False]


def test_function_registration_runs_the_checks_first():
    # check_before_function_registration: the eager context's two methods
    # that register a function (with every remote task, when connected).
    from tensorflow.python.eager import context

    assert "TFE_ContextAddFunction(" in inspect.getsource(
        context.Context.add_c_function
    )
    assert "TFE_ContextAddFunctionDef" in inspect.getsource(
        context.Context.add_function_def
    )

    class Owner:
        calls = 0

        def check(self) -> None:
            self.calls += 1

    owner = Owner()
    _compat.check_before_function_registration(owner.check)
    tf.function(lambda x: x + 1)(tf.constant(1.0))
    assert owner.calls >= 1
    del owner  # held weakly: its check is dropped with it
    tf.function(lambda x: x + 2)(tf.constant(1.0))
