"""Internals of the distributed datasets (`tfpar/_compat/datasets.py`).

Each test fails loudly when an upgrade removes or changes what this area
relies on; `tfpar/_compat/datasets.py` says why each internal is needed.
Runs on the two simulated CPUs of `tests/conftest.py`.
"""

import tensorflow as tf

from tfpar._compat import datasets as _compat

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
