"""Tests for tfpar.callbacks.placement: the strategy's devices and each op's device."""

import tensorflow as tf

from tests.callbacks._tb import dataset, stock_mirrored, tiny_model
from tfpar.callbacks.placement import GraphPlacement, OpDevices, strategy_devices


def test_strategy_devices_of_no_strategy_and_a_stock_one() -> None:
    assert strategy_devices(tf.distribute.get_strategy()) == ["/device:CPU:0"]
    assert strategy_devices(stock_mirrored()) == ["/device:CPU:0", "/device:CPU:1"]


def test_placed_ops_are_counted_per_device_ambiguous_names_included() -> None:
    worker = "/job:worker/replica:0/task:1/device:CPU:0"
    metadata = tf.compat.v1.RunMetadata()
    graphs = metadata.function_graphs.add().partition_graphs
    on_cpu0, on_cpu1, on_worker = graphs.add(), graphs.add(), graphs.add()
    for name in ["a", "Const", "a"]:  # the same node twice counts once
        on_cpu0.node.add(name=name, device="/job:localhost/replica:0/task:0/cpu:0")
    on_cpu1.node.add(name="b", device="/device:CPU:1")
    on_cpu1.node.add(name="Const", device="/device:CPU:1")  # also on CPU:0
    on_worker.node.add(name="w", device=worker)
    on_worker.node.add(name="unplaced")  # no device: not counted
    placed = OpDevices.from_run_metadata(metadata)
    assert placed.devices == {"a": "/device:CPU:0", "b": "/device:CPU:1", "w": worker}
    assert placed.placed == {"/device:CPU:0": 2, "/device:CPU:1": 2, worker: 1}
    assert OpDevices({"a": "/device:CPU:0"}).placed == {}  # placement unknown


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
    assert set(learned.placed) == {"/device:CPU:0"}
    assert learned.placed["/device:CPU:0"] >= len(learned.devices)
    assert placement.finish(model) is None  # nothing collected since
    assert placement.start(model, rebuild=True) is learned  # the same function
