"""Tests for tfpar.strategies.pipeline.partition: cut points, balancing, the table."""

import itertools

import keras
import numpy as np
import pytest

from tfpar.strategies.pipeline import partition as partition_lib
from tfpar.strategies.pipeline.partition import partition_model, valid_cut_points

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


def test_flops_balances_counted_cost() -> None:
    # Large layers first: a balanced cut is not the middle layer.
    model = keras.Sequential(
        [keras.Input((64,))]
        + [keras.layers.Dense(64, name=f"big{i}") for i in range(2)]
        + [keras.layers.Dense(4, name="small0")]
        + [keras.layers.Dense(4, name=f"small{i}") for i in range(1, 5)]
    )
    table, stages = partition_model(model, DEVICES, "flops")
    assert table.cost_source == "flops"
    assert len(stages) == 2 and table.cut_points == ["big1"]
    assert all(s.cost > 0 for s in table.stages)
    assert "est. cost (FLOPs)" in table.format()


def test_flops_partition_is_stable_and_balances_equal_layers() -> None:
    # FLOPs are counted, not timed: every construction chooses the same cut,
    # and 8 equal layers plus a tiny head split 4 / 5.
    def table() -> partition_lib.Partition:
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((32,))]
            + [keras.layers.Dense(32, name=f"d{i}") for i in range(8)]
            + [keras.layers.Dense(1, name="head")]
        )
        return partition_model(model, DEVICES, "flops")[0]

    first, second = table(), table()
    assert first == second
    assert first.cut_points == ["d4"]
    # 2 * 32 * 32 multiply-adds plus 32 bias adds per example, batch 16.
    assert first.stages[0].cost == 4 * 16 * (2 * 32 * 32 + 32)


class Repeated(keras.layers.Layer):
    """A fixed matrix applied 60 times in a loop: the FLOP count does not see
    inside the loop's body, timing does."""

    def build(self, input_shape: tuple[int, ...]) -> None:
        width = input_shape[-1]
        matrix = np.random.default_rng(0).normal(size=(width, width)) / width**0.5
        self.matrix = keras.ops.convert_to_tensor(matrix, dtype="float32")

    def compute_output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return input_shape

    def call(self, h):  # type: ignore[no-untyped-def]
        return keras.ops.fori_loop(
            0, 60, lambda _, h: keras.ops.tanh(h @ self.matrix), h
        )


def repeated_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((256,)), Repeated(name="r")]
        + [keras.layers.Dense(256, name=f"d{i}") for i in range(4)]
    )


def test_auto_measures_what_flops_cannot_see() -> None:
    counted, _ = partition_model(repeated_model(), DEVICES, "flops")
    assert counted.cut_points == ["d2"]  # the loop counts as free
    model = repeated_model()
    before = [w.numpy() for w in model.weights]
    measured, _ = partition_model(model, DEVICES)
    assert measured.cost_source == "measured"
    # 60 matrix products against 3 per Dense layer (forward, weight and input
    # gradients): the loop alone on stage 0, or (were the timing off by 3x)
    # with one Dense layer. Matrix products against matrix products, so the
    # ratio does not depend on the CPU (tanh against Dense did).
    assert measured.cut_points in (["d0"], ["d1"]), measured
    assert all(s.cost > 0 for s in measured.stages)
    assert "est. cost (ms)" in measured.format()
    for a, b in zip(before, model.weights, strict=True):
        np.testing.assert_array_equal(a, b.numpy())


def test_measuring_leaves_layer_state_alone() -> None:
    # The timed passes run in training mode under StatelessScope: moving
    # statistics and seed generators keep their values.
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(16, name="a"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.Dropout(0.5, name="drop"),
            keras.layers.Dense(2, name="b"),
        ]
    )
    before = [v.numpy() for v in model.variables]
    table, _ = partition_model(model, DEVICES)
    assert table.cost_source == "measured"
    for a, b in zip(before, model.variables, strict=True):
        np.testing.assert_array_equal(a, b.numpy(), err_msg=b.path)


def test_params_balances_parameter_counts() -> None:
    table, _ = partition_model(residual_model(), DEVICES, "params")
    assert table.cost_source == "parameters"
    assert [s.cost for s in table.stages] == [s.parameters for s in table.stages]
    assert "est. cost (params)" in table.format()


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


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"partition": "even"},
            ValueError,
            r"`partition` must be 'auto', 'flops', 'params' or a list of layer "
            r"names\. Received: partition='even'\.",
        ),
        ({"partition": 1}, TypeError, r"Received: partition=1 of type int\."),
        (
            {"partition": ("d", None)},
            TypeError,
            r"Received: partition=\('d', None\), whose item None is of type NoneType",
        ),
        (
            {"sample_batch_size": 0},
            ValueError,
            r"an int >= 1\. Received: sample_batch_size=0\.",
        ),
    ],
)
def test_bad_arguments_are_rejected(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        partition_model(residual_model(), DEVICES, **kwargs)  # type: ignore[arg-type]


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
