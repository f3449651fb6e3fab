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
        assert caller.model is model
        assert caller.epoch_iterator.num_batches == 2
        assert keras_callers.global_batch_size(caller.epoch_iterator, None) == 4
    assert [caller.method for caller in strategy.callers] == [
        "fit",
        "evaluate",
        "predict",
    ]
    # Outside Keras (a custom loop), nothing is found: stock behaviour.
    assert keras_callers.find_keras_caller(strategy) is None
    # The multi-worker strategy wraps the functions Keras made: Keras keeps a
    # function once made, so make_train_function after the wrap keeps it.
    made = model.train_function
    model.make_train_function()
    assert model.train_function is made


def test_the_batch_size_of_a_dataset_batched_without_drop_remainder_is_known():
    x = np.ones((10, 3), "float32")
    batched = tf.data.Dataset.from_tensor_slices(x).shuffle(4).batch(4)
    assert batched.element_spec.shape[0] is None  # unknown to Keras's adapter
    assert keras_callers.global_batch_size(None, batched) == 4
    assert keras_callers.global_batch_size(None, batched.prefetch(2)) == 4
    # A map after batching may change the batch: unknown, not guessed.
    mapped = batched.map(lambda t: t * 2)
    assert keras_callers.global_batch_size(None, mapped) is None


class Ones(keras.utils.PyDataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        return np.ones((4, 3), "float32"), np.ones((4, 1), "float32")


def test_a_pydataset_read_by_forked_workers_is_seen_from_the_epoch_iterator():
    strategy = RecordingStrategy()
    with strategy.scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
    for options, forks in [
        ({}, False),
        ({"workers": 2}, False),
        ({"workers": 2, "use_multiprocessing": True}, True),
    ]:
        model.fit(Ones(**options), epochs=1, verbose=0)
        caller = strategy.callers[-1]
        assert keras_callers.forks_data_workers(caller.epoch_iterator) is forks
    assert keras_callers.forks_data_workers(None) is False
