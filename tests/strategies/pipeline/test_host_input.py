"""Tests for the pipeline's input: one plain tf.data iterator on the host."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests._models import mlp
from tfpar import PipelineStrategy

DEVICES = ["/device:CPU:0", "/device:CPU:1"]


def _stock_batches(dataset: tf.data.Dataset) -> list[list[int]]:
    stock = tf.distribute.OneDeviceStrategy(DEVICES[0])
    return [b.numpy().tolist() for b in stock.experimental_distribute_dataset(dataset)]


@pytest.mark.parametrize("user_choice", [None, True])
def test_reads_the_stock_batches_through_a_plain_iterator(
    user_choice: bool | None,
) -> None:
    # No MultiDeviceIterator (its teardown can crash, host_input.py): a
    # tf.data iterator that keeps the user's autotuning choice, else none.
    dataset = tf.data.Dataset.range(16).batch(4)
    if user_choice is not None:
        options = tf.data.Options()
        options.autotune.enabled = user_choice
        dataset = dataset.with_options(options)
    distributed = PipelineStrategy(DEVICES).experimental_distribute_dataset(dataset)
    assert isinstance(distributed, tf.distribute.DistributedDataset)
    iterator = iter(distributed)
    assert isinstance(iterator, tf.data.Iterator)
    expected = False if user_choice is None else user_choice
    assert distributed._dataset.options().autotune.enabled is expected
    assert [b.numpy().tolist() for b in iterator] == _stock_batches(dataset)


def test_custom_loop_run_reduce_and_datasets_from_function() -> None:
    strategy = PipelineStrategy(DEVICES)
    dataset = tf.data.Dataset.range(8).batch(4)
    distributed = strategy.experimental_distribute_dataset(dataset)

    @tf.function
    def total(iterator: tf.data.Iterator) -> tf.Tensor:
        return strategy.run(tf.reduce_sum, args=(next(iterator),))

    with pytest.warns(UserWarning, match="without pipelining"):
        assert int(total(iter(distributed))) == 0 + 1 + 2 + 3
    summed = distributed.reduce(
        tf.constant(0, tf.int64), lambda acc, b: acc + tf.reduce_sum(b)
    )
    assert int(summed) == sum(range(8))
    contexts = []

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        contexts.append(context)
        return dataset

    per_replica = strategy.distribute_datasets_from_function(dataset_fn)
    assert [b.numpy().tolist() for b in per_replica] == _stock_batches(dataset)
    (context,) = contexts
    assert (context.num_input_pipelines, context.num_replicas_in_sync) == (1, 1)


def test_options_are_checked_and_the_buffer_is_kept() -> None:
    strategy = PipelineStrategy(DEVICES)
    dataset = tf.data.Dataset.range(8).batch(4)
    with pytest.raises(TypeError, match=r"`options` must be tf\.distribute\.Input"):
        strategy.experimental_distribute_dataset(dataset, {"buffer": 2})
    per_replica = tf.distribute.InputOptions(
        experimental_replication_mode=tf.distribute.InputReplicationMode.PER_REPLICA
    )
    with pytest.raises(ValueError, match="PER_REPLICA is only supported by"):
        strategy.experimental_distribute_dataset(dataset, per_replica)
    with pytest.raises(TypeError, match=r"`dataset_fn\(\)` must be a tf.data"):
        strategy.distribute_datasets_from_function(lambda context: [1, 2])
    with pytest.raises(TypeError, match="`dataset_fn` must be a function"):
        strategy.distribute_datasets_from_function(dataset)
    buffered = tf.distribute.InputOptions(experimental_per_replica_buffer_size=3)
    distributed = strategy.experimental_distribute_dataset(dataset, buffered)
    assert [b.numpy().tolist() for b in distributed] == _stock_batches(dataset)


def test_fit_evaluate_predict_read_every_batch_once() -> None:
    # Against training without a strategy: the same batches, in order.
    x = np.random.default_rng(0).normal(size=(48, 6)).astype("float32")
    y = x[:, :2] * 2.0
    models = []
    for strategy in (None, PipelineStrategy(DEVICES, num_microbatches=2)):
        scope = strategy.scope() if strategy else tf.distribute.get_strategy().scope()
        with scope:
            model = mlp()
            model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        history = model.fit(
            x,
            y,
            batch_size=8,
            epochs=2,
            shuffle=False,
            verbose=0,
            validation_data=(x[:16], y[:16]),
        )
        models.append((model, history.history))
    (plain, plain_history), (piped, piped_history) = models
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose(piped_history[key], plain_history[key], rtol=1e-5)
    np.testing.assert_allclose(
        piped.predict(x, batch_size=8, verbose=0),
        plain.predict(x, batch_size=8, verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )
