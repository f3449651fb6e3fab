"""Tests for tfpar.strategies.partition: cut points, balancing, the table."""

import itertools

import keras
import numpy as np
import pytest

from tfpar.strategies import partition as partition_lib
from tfpar.strategies.partition import partition_model, valid_cut_points

DEVICES = ["/device:CPU:0", "/device:CPU:1"]


def residual_model() -> keras.Model:
    inputs = keras.Input((4,), name="x")
    a = keras.layers.Dense(4, name="a")(inputs)
    b = keras.layers.Dense(4, name="b")(a)
    c = keras.layers.Add(name="c")([a, b])
    d = keras.layers.Dense(3, name="d")(c)
    e = keras.layers.Dense(2, name="e")(d)
    return keras.Model(inputs, e)


def test_cut_points_skip_residual_blocks() -> None:
    model = residual_model()
    # Inside the block (before "c") two tensors would cross the boundary.
    assert valid_cut_points(model) == ["b", "d", "e"]
    sequential = keras.Sequential(
        [keras.Input((3,))] + [keras.layers.Dense(2, name=f"l{i}") for i in range(4)]
    )
    assert valid_cut_points(sequential) == ["l1", "l2", "l3"]


def test_explicit_cut_builds_stage_models_sharing_layers() -> None:
    model = residual_model()
    table, stages = partition_model(model, DEVICES, ["d"])
    assert [s.layers for s in table.stages] == [("a", "b", "c"), ("d", "e")]
    assert [s.parameters for s in table.stages] == [40, 23]
    assert table.cut_points == ["d"]
    assert stages[1].get_layer("d") is model.get_layer("d")
    x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    np.testing.assert_allclose(stages[1](stages[0](x)), model(x), rtol=1e-6)


def test_table_lists_every_stage() -> None:
    table, _ = partition_model(residual_model(), DEVICES, ["d"])
    lines = table.format().splitlines()
    assert lines[0].split()[:4] == ["stage", "device", "layers", "parameters"]
    assert lines[1].split()[:2] == ["0", "/device:CPU:0"]
    assert "a, b, c" in lines[1] and "40" in lines[1]
    assert lines[2].split()[:2] == ["1", "/device:CPU:1"]
    assert str(table) == table.format()


def test_auto_balances_cost() -> None:
    # Large layers first: a balanced cut is not the middle layer.
    model = keras.Sequential(
        [keras.Input((64,))]
        + [keras.layers.Dense(64, name=f"big{i}") for i in range(2)]
        + [keras.layers.Dense(4, name="small0")]
        + [keras.layers.Dense(4, name=f"small{i}") for i in range(1, 5)]
    )
    table, stages = partition_model(model, DEVICES)
    assert table.cost_source == "flops"
    assert len(stages) == 2 and table.cut_points == ["big1"]
    assert all(s.cost > 0 for s in table.stages)


def test_auto_partition_is_stable_and_balances_equal_layers() -> None:
    # FLOPs are counted, not timed: every construction chooses the same cut,
    # and 8 equal layers plus a tiny head split 4 / 5.
    def table() -> partition_lib.Partition:
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((32,))]
            + [keras.layers.Dense(32, name=f"d{i}") for i in range(8)]
            + [keras.layers.Dense(1, name="head")]
        )
        return partition_model(model, DEVICES)[0]

    first, second = table(), table()
    assert first == second
    assert first.cut_points == ["d4"]
    # 2 * 32 * 32 multiply-adds plus 32 bias adds per example, batch 16.
    assert first.stages[0].cost == 4 * 16 * (2 * 32 * 32 + 32)


def test_balance_minimizes_the_largest_stage() -> None:
    costs = [5.0, 1.0, 1.0, 1.0, 1.0, 1.0, 4.0]

    def largest(starts: list[int]) -> float:
        bounds = [*starts, len(costs)]
        return max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds))

    assert partition_lib._balance(costs, list(range(7)), 2) == [0, 3]
    assert largest(partition_lib._balance(costs, list(range(7)), 3)) == 5.0
    assert partition_lib._balance(costs, list(range(7)), 7) == list(range(7))
    # Only some cut points allowed: layers 1..4 form one block.
    assert partition_lib._balance(costs, [0, 1, 5, 6], 2) == [0, 1]


def test_unknown_cut_point_names_the_layer() -> None:
    with pytest.raises(
        ValueError, match=r"'nope' is not a layer.*partition=\['nope'\]"
    ):
        partition_model(residual_model(), DEVICES, ["nope"])


def test_cut_inside_a_block_names_the_layer() -> None:
    with pytest.raises(
        ValueError, match=r"before layer 'c'.*valid cut points: \['b', 'd', 'e'\]"
    ):
        partition_model(residual_model(), DEVICES, ["c"])


def test_cut_points_out_of_order() -> None:
    devices = [*DEVICES, "/device:CPU:0"]
    with pytest.raises(ValueError, match="in model order"):
        partition_model(residual_model(), devices, ["e", "d"])


def test_more_stages_than_layers() -> None:
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="only")])
    with pytest.raises(
        ValueError, match=r"1 layer\(s\) and only 0 valid cut.*devices="
    ):
        partition_model(model, DEVICES)


def test_subclassed_model_is_rejected() -> None:
    class Custom(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):  # type: ignore[no-untyped-def]
            return self.dense(x)

    model = Custom()
    model(np.zeros((1, 3), "float32"))
    with pytest.raises(TypeError, match="subclassed model of type Custom"):
        partition_model(model, DEVICES)
