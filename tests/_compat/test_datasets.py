"""Internals of the distributed datasets (`tfpar/_compat/datasets.py`).

Each test fails loudly when an upgrade removes or changes what this area
relies on; `tfpar/_compat/datasets.py` says why each internal is needed.
Runs on the two simulated CPUs of `tests/conftest.py`.
"""

import pytest
import tensorflow as tf

from tfpar import MirroredStrategy, MultiWorkerMirroredStrategy, PipelineStrategy
from tfpar._compat import datasets as _compat
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


@pytest.mark.parametrize("user_choice", [None, True])
@pytest.mark.parametrize("make", [MirroredStrategy, PipelineStrategy])
def test_tfpar_strategies_distribute_without_autotuning(
    make: type[tf.distribute.Strategy], user_choice: bool | None
) -> None:
    # DistributesWithoutAutotuning, through the layout checked above: the
    # dataset's own iterator keeps a choice its options made, the per-device
    # iterators never autotune; the batches are the stock strategy's.
    strategy = make(DEVICES)
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
