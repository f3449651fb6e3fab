"""Tests for tfpar.callbacks.placement: the strategy's devices and each op's device."""

import tensorflow as tf

from tests.callbacks._tb import dataset, stock_mirrored, tiny_model
from tfpar.callbacks.placement import GraphPlacement, OpDevices, strategy_devices


def test_strategy_devices_of_no_strategy_and_a_stock_one() -> None:
    assert strategy_devices(tf.distribute.get_strategy()) == ["/device:CPU:0"]
    assert strategy_devices(stock_mirrored()) == ["/device:CPU:0", "/device:CPU:1"]


def test_local_devices_leave_remote_ones_out() -> None:
    placed = OpDevices(
        {
            "a": "/device:CPU:1",
            "b": "/device:CPU:0",
            "c": "/device:CPU:1",
            "d": "/job:worker/replica:0/task:0/device:CPU:0",
        }
    )
    assert placed.local_devices() == ["/device:CPU:0", "/device:CPU:1"]


def test_placement_is_learned_from_the_first_step_once_per_function() -> None:
    model = tiny_model()
    x, y = dataset(64)
    placement = GraphPlacement()
    placement.note_model(model)
    model.make_train_function()
    assert placement.start(model, rebuild=True) is None
    model.train_on_batch(x[:32], y[:32])
    learned = placement.finish(model)
    assert learned is not None and set(learned.devices.values()) == {"/device:CPU:0"}
    assert placement.finish(model) is None  # nothing collected since
    assert placement.start(model, rebuild=True) is learned  # the same function
