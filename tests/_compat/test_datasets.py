"""Internals of the distributed datasets (`tfpar/_compat/datasets.py`).

Each test fails loudly when an upgrade removes or changes what this area
relies on; `tfpar/_compat/datasets.py` says why each internal is needed.
Runs on the two simulated CPUs of `tests/conftest.py`.
"""

from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfpar import MirroredStrategy, MultiWorkerMirroredStrategy, PipelineStrategy
from tfpar._compat import datasets as _compat
from tfpar._compat import keras_callers
from tfpar._datasets import DistributesWithoutAutotuning

DEVICES = ["/device:CPU:0", "/device:CPU:1"]


def test_per_device_iterators_are_rebuilt_without_autotuning() -> None:
    # without_device_autotune: the distributed iterator's layout, and that
    # its per-device iterators yield what the stock ones do.
    strategy = tf.distribute.MirroredStrategy(DEVICES)
    dataset = tf.data.Dataset.range(16).batch(4)
    stock = iter(strategy.experimental_distribute_dataset(dataset))
    rebuilt = iter(
        _compat.without_device_autotune(
            strategy.experimental_distribute_dataset(dataset)
        )
    )
    for worker_iterator in rebuilt._iterators:
        device_iterators = worker_iterator._iterator._device_iterators
        assert len(device_iterators) == len(DEVICES)
        for device_iterator in device_iterators:
            assert device_iterator._dataset.options().autotune.enabled is False
    for stock_values, values in zip(stock, rebuilt, strict=True):
        expected = strategy.experimental_local_results(stock_values)
        got = strategy.experimental_local_results(values)
        assert [v.device for v in got] == [v.device for v in expected]
        assert [v.numpy().tolist() for v in got] == [
            v.numpy().tolist() for v in expected
        ]


def test_a_replica_on_its_host_reads_through_one_plain_iterator() -> None:
    # reads_in_place: the input workers' layout, and that TensorFlow's
    # per-replica mode without copies, set after the dataset is built, yields
    # the stock batches (a partial last one too) eagerly and inside a
    # tf.function, as Keras reads them.
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    dataset = tf.data.Dataset.range(10).batch(4)
    two_devices = tf.distribute.MirroredStrategy(DEVICES)
    assert not _compat.reads_in_place(
        two_devices.experimental_distribute_dataset(dataset)
    )
    options = tf.distribute.InputOptions(experimental_per_replica_buffer_size=3)
    in_place = _compat.without_device_autotune(
        strategy.experimental_distribute_dataset(dataset, options)
    )
    assert _compat.reads_in_place(in_place)
    assert in_place._options.experimental_per_replica_buffer_size == 3
    iterator = iter(in_place)
    (worker_iterator,) = iterator._iterators
    assert type(worker_iterator._iterator).__name__ == "OwnedIterator"

    @tf.function
    def next_doubled(iterator: Any) -> Any:
        return strategy.run(lambda x: 2 * x, args=(next(iterator),))

    stock = [
        b.numpy().tolist() for b in strategy.experimental_distribute_dataset(dataset)
    ]
    got = [next(iterator).numpy().tolist()]
    got += [(next_doubled(iterator) // 2).numpy().tolist() for _ in range(2)]
    assert got == stock == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


@pytest.mark.parametrize("user_choice", [None, True])
def test_tfpar_strategies_distribute_without_autotuning(
    user_choice: bool | None,
) -> None:
    # DistributesWithoutAutotuning, through the layout checked above: the
    # dataset's own iterator keeps a choice its options made, the per-device
    # iterators never autotune; the batches are the stock strategy's.
    # (PipelineStrategy reads through one plain iterator: test_host_input.py.)
    strategy = MirroredStrategy(DEVICES)
    dataset = tf.data.Dataset.range(16).batch(4)
    if user_choice is not None:
        options = tf.data.Options()
        options.autotune.enabled = user_choice
        dataset = dataset.with_options(options)
    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    for worker_iterator in iterator._iterators:
        expected = False if user_choice is None else user_choice
        assert worker_iterator._dataset.options().autotune.enabled is expected
        for device_iterator in worker_iterator._iterator._device_iterators:
            assert device_iterator._dataset.options().autotune.enabled is False
    stock = tf.distribute.OneDeviceStrategy(DEVICES[0])
    expected_batches = [
        b.numpy().tolist() for b in stock.experimental_distribute_dataset(dataset)
    ]
    got = [
        [x for v in strategy.experimental_local_results(b) for x in v.numpy().tolist()]
        for b in iterator
    ]
    assert got == expected_batches


def test_every_tfpar_strategy_with_replicas_distributes_without_autotuning() -> None:
    for strategy in (MirroredStrategy, MultiWorkerMirroredStrategy, PipelineStrategy):
        assert issubclass(strategy, DistributesWithoutAutotuning), strategy


@pytest.mark.parametrize("make", [MirroredStrategy, PipelineStrategy])
def test_a_dataset_that_is_not_one_is_named(make: type[tf.distribute.Strategy]) -> None:
    with pytest.raises(TypeError, match=r"`dataset` must be a tf.data.Dataset\. "):
        make(DEVICES).experimental_distribute_dataset([1, 2, 3])


class _RecordingMirrored(MirroredStrategy):
    """Records, for each iterator opened on its datasets, who opened it."""

    def experimental_distribute_dataset(self, dataset: tf.data.Dataset) -> Any:
        return _Recording(super().experimental_distribute_dataset(dataset))


class _Recording:
    opened: list[bool] = []

    def __init__(self, distributed: Any) -> None:
        self._distributed = distributed

    def __iter__(self) -> Any:
        _Recording.opened.append(keras_callers.called_from_keras_symbolic_build())
        return iter(self._distributed)


def test_keras_builds_from_an_iterator_of_its_own() -> None:
    # called_from_keras_symbolic_build: Keras's fit opens one iterator to build
    # the model, from `_maybe_symbolic_build`, then those of training.
    strategy = _RecordingMirrored(DEVICES)
    with strategy.scope():
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
    _Recording.opened.clear()
    model.fit(np.ones((8, 2)), np.ones((8, 1)), batch_size=4, verbose=0)
    assert _Recording.opened[0] is True
    assert _Recording.opened[1:] and not any(_Recording.opened[1:])
    assert not keras_callers.called_from_keras_symbolic_build()


def _batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
    yield np.ones((4, 2)), np.ones((4, 1))


class _Batches(keras.utils.PyDataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return np.ones((4, 2)), np.ones((4, 1))


@pytest.mark.parametrize(
    ("data", "from_python"),
    [
        (lambda: {"x": np.ones((4, 2)), "y": np.ones((4, 1))}, False),
        (lambda: {"x": tf.data.Dataset.from_tensors((np.ones((4, 2)),))}, False),
        (lambda: {"x": _batches()}, True),
        (lambda: {"x": _Batches()}, True),
    ],
    ids=["numpy", "tf_data", "generator", "py_dataset"],
)
def test_keras_adapters_that_feed_python_arrays_are_told_apart(
    data: Any, from_python: bool
) -> None:
    # fed_from_python: Keras's epoch iterator keeps its data adapter, and the
    # adapters building batches from tensors are these two classes.
    from keras.src.trainers.epoch_iterator import EpochIterator

    assert _compat.fed_from_python(EpochIterator(**data())) is from_python
    assert not _compat.fed_from_python(None)
