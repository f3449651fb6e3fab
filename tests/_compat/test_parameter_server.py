"""Internals of `tfpar.ParameterServerStrategy` (`tfpar/_compat/parameter_server.py`).

Each test fails loudly when an upgrade removes or changes what this area
relies on; `tfpar/_compat/parameter_server.py` says why each internal is needed.
Runs on the two simulated CPUs of `tests/conftest.py`.
"""

import inspect

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.distribute.coordinator import cluster_coordinator

from tfpar._compat import parameter_server as _compat


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
