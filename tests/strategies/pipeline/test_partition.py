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


def test_every_layer_but_the_first_is_a_cut_point() -> None:
    model = residual_model()
    # Inside the block (before "c") two tensors cross the boundary.
    assert valid_cut_points(model) == ["b", "c", "d", "e"]
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
    assert lines[0].endswith("receives  bytes per example")
    assert lines[1].split()[:2] == ["0", "/device:CPU:0"]
    assert "a, b, c" in lines[1] and "40" in lines[1]
    assert lines[1].split()[-2:] == ["-", "-"]  # the first stage gets the batch
    assert lines[2].split()[:2] == ["1", "/device:CPU:1"]
    assert lines[2].split()[-2:] == ["c", "16"]  # 4 float32 values per example
    assert str(table) == table.format()


def test_cut_inside_a_block_sends_both_tensors() -> None:
    # Before "c" (the Add), its two inputs cross: "a" (the skip connection)
    # and "b".
    model = residual_model()
    table, stages = partition_model(model, DEVICES, ["c"])
    assert [s.layers for s in table.stages] == [("a", "b"), ("c", "d", "e")]
    assert [s.receives for s in table.stages] == [(), ("a", "b")]
    assert [s.bytes_per_example for s in table.stages] == [0, 2 * 4 * 4]
    assert table.format().splitlines()[2].split()[-3:] == ["a,", "b", "32"]
    x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    sent = stages[0](x)
    assert isinstance(sent, list) and len(sent) == 2
    np.testing.assert_allclose(stages[1](sent), model(x), rtol=1e-6)


def skipping_model() -> keras.Model:
    """`a` is needed by the Add after `b` and `c`: it skips over their stages."""
    inputs = keras.Input((4,), name="x")
    a = keras.layers.Dense(8, name="a")(inputs)
    b = keras.layers.Dense(5, name="b")(a)
    c = keras.layers.Dense(8, name="c")(b)
    d = keras.layers.Add(name="d")([a, c])
    return keras.Model(inputs, keras.layers.Dense(2, name="e")(d))


def test_a_tensor_passes_through_the_stages_it_skips() -> None:
    model = skipping_model()
    devices = [*DEVICES, "/device:CPU:0"]  # placement does not matter here
    table, stages = partition_model(model, devices, ["b", "c"])
    assert [s.receives for s in table.stages] == [(), ("a",), ("a", "b")]
    assert [s.bytes_per_example for s in table.stages] == [0, 8 * 4, (8 + 5) * 4]
    x = np.random.default_rng(0).normal(size=(3, 4)).astype("float32")
    a, b = stages[1](stages[0](x))
    # Stage 1 returns the `a` it received, unchanged, beside its own `b`.
    np.testing.assert_array_equal(a, stages[0](x))
    np.testing.assert_allclose(stages[2]([a, b]), model(x), rtol=1e-6)


def test_inputs_and_early_outputs_are_carried_to_their_stage() -> None:
    # The second input is first used after the cut, and the auxiliary output
    # is computed before it: both cross, and the last stage returns the
    # model's dict of outputs.
    x1, x2 = keras.Input((5,), name="x1"), keras.Input((3,), name="x2")
    h = keras.layers.Dense(8, name="h")(x1)
    aux = keras.layers.Dense(1, name="aux")(h)
    g = keras.layers.Dense(4, name="g")(h)
    main = keras.layers.Dense(2, name="main")(
        keras.layers.Concatenate(name="cat")([g, aux, x2])
    )
    model = keras.Model({"x1": x1, "x2": x2}, {"main": main, "aux": aux})
    table, stages = partition_model(model, DEVICES, ["cat"])
    assert table.stages[1].receives == ("x2", "aux", "g")
    assert table.stages[1].bytes_per_example == (3 + 1 + 4) * 4
    rng = np.random.default_rng(0)
    x = {
        "x1": rng.normal(size=(3, 5)).astype("float32"),
        "x2": rng.normal(size=(3, 3)).astype("float32"),
    }
    got, expected = stages[1](stages[0](x)), model(x)
    assert set(got) == {"main", "aux"}
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-6)


def test_unknown_dimension_shows_unknown_bytes() -> None:
    inputs = keras.Input((None, 3), name="seq")
    h = keras.layers.Dense(3, name="a")(inputs)
    h = keras.layers.Add(name="b")([inputs, h])
    model = keras.Model(inputs, keras.layers.Dense(2, name="c")(h))
    table, _ = partition_model(model, DEVICES, ["b"])
    assert table.stages[1].receives == ("seq", "a")
    assert table.stages[1].bytes_per_example is None
    assert table.format().splitlines()[2].endswith("seq, a    ?")


def test_a_mask_cannot_cross() -> None:
    # Masking's mask travels with the tensors of the layers that propagate
    # it (Dense); it can be cut once a layer has consumed it (the LSTM).
    inputs = keras.Input((5, 3), name="x")
    h = keras.layers.Masking(name="mask")(inputs)
    h = keras.layers.Dense(4, name="dense")(h)
    h = keras.layers.LSTM(4, name="lstm")(h)
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(h))
    assert valid_cut_points(model) == ["out"]
    with pytest.raises(
        ValueError,
        match=r"before layer 'lstm': the output of 'dense' carries a Keras mask "
        r".*partition=\['lstm'\] \(valid cut points: \['out'\]\)",
    ):
        partition_model(model, DEVICES, ["lstm"])


def shared_model() -> keras.Model:
    """One Dense layer, `shared`, called before and after `mid`."""
    inputs = keras.Input((4,), name="x")
    shared = keras.layers.Dense(4, name="shared")
    h = shared(keras.layers.Dense(4, name="mid")(shared(inputs)))
    return keras.Model(inputs, keras.layers.Dense(2, name="top")(h))


def test_the_calls_of_a_shared_layer_stay_in_one_stage() -> None:
    model = shared_model()
    assert valid_cut_points(model) == ["top"]
    with pytest.raises(
        ValueError,
        match=r"before layer 'mid': the shared layer 'shared' is called both "
        r"before and after",
    ):
        partition_model(model, DEVICES, ["mid"])
    table, stages = partition_model(model, DEVICES, ["top"])
    assert table.stages[0].layers == ("shared", "mid")
    # Its second call (Keras's node 1, as in model.summary()) crosses.
    assert table.stages[1].receives == ("shared[1][0]",)
    x = np.random.default_rng(0).normal(size=(3, 4)).astype("float32")
    np.testing.assert_allclose(stages[1](stages[0](x)), model(x), rtol=1e-6)


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
    # Before "c" (the Add, no weights) and before "d" balance 40 / 23 alike:
    # the cut with one tensor crossing wins.
    assert table.cut_points == ["d"]
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


def test_balance_prefers_fewer_bytes_among_nearly_equal_stages() -> None:
    costs = [1.0, 1.0, 1.0, 1.0]
    starts = [0, 1, 2, 3]

    def balance(transfer: list[float], tolerance: float) -> list[int]:
        return partition_lib._balance(
            costs, starts, 2, transfer=transfer, tolerance=tolerance
        )

    # Equal bytes: the most balanced cut, as without bytes.
    assert balance([0.0, 8.0, 8.0, 8.0], 0.0) == [0, 2]
    # 3 / 1 is 50% worse than 2 / 2: bytes only decide within the tolerance.
    assert balance([0.0, 8.0, 64.0, 8.0], 0.05) == [0, 2]
    assert balance([0.0, 8.0, 64.0, 8.0], 0.5) == [0, 1]
    # Three stages: the total bytes over both cuts count.
    assert partition_lib._balance(
        [1.0] * 6, list(range(6)), 3, transfer=[0, 1, 9, 1, 9, 5], tolerance=0.5
    ) == [0, 1, 3]


def test_unknown_cut_point_names_the_layer() -> None:
    with pytest.raises(
        ValueError, match=r"'nope' is not a layer.*partition=\['nope'\]"
    ):
        partition_model(residual_model(), DEVICES, ["nope"])


def test_cut_before_the_first_layer_names_the_layer() -> None:
    with pytest.raises(
        ValueError,
        match=r"before layer 'a': it is the first layer.*"
        r"valid cut points: \['b', 'c', 'd', 'e'\]",
    ):
        partition_model(residual_model(), DEVICES, ["a"])


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
