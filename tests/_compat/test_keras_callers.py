"""Keras's call chain into a strategy (`tfpar/_compat/keras_callers.py`).

Fails loudly when a Keras upgrade changes which frames call
`experimental_distribute_dataset`; the module docstring says why tfpar
looks. Runs on the two simulated CPUs of `tests/conftest.py`.
"""

import keras
import numpy as np
import tensorflow as tf

from tfpar._compat import keras_callers


class RecordingStrategy(tf.distribute.OneDeviceStrategy):
    """Records what `find_keras_caller` sees when Keras distributes a dataset."""

    def __init__(self):
        super().__init__("/cpu:0")
        self.callers = []

    def experimental_distribute_dataset(self, dataset, options=None):
        self.callers.append(keras_callers.find_keras_caller(self))
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
    assert keras_callers.find_keras_caller(strategy) is None
    # The multi-worker strategy wraps the functions Keras made: Keras keeps a
    # function once made, so make_train_function after the wrap keeps it.
    made = model.train_function
    model.make_train_function()
    assert model.train_function is made
