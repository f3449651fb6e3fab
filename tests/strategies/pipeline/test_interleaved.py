"""Tests for PipelineStrategy(schedule="interleaved") under real `model.fit`.

Each device holds several chunks of the model (chunk c on device c % K); the
weights must match training without a strategy, and the counters stay one
entry per device.
"""

import collections

import keras
import pytest
import tensorflow as tf

from tests._subprocess import run_python, tagged_json
from tests.strategies.pipeline._fitting import (
    DEVICES,
    assert_same_inference,
    assert_same_training,
    data,
    train,
)
from tfpar import PipelineStrategy

WIDTHS = (16, 8, 4)  # of d0, d1, d2: the boundaries of chunks [d0] [d1] [d2] [out]
CUTS = ["d1", "d2", "out"]


def chain(widths: tuple[int, ...] = WIDTHS) -> keras.Model:
    """A tanh MLP from 6 inputs through `widths` (layers `d0`, ...) to `out`."""
    keras.utils.set_random_seed(7)
    return keras.Sequential(
        [keras.Input((6,))]
        + [
            keras.layers.Dense(w, activation="tanh", name=f"d{i}")
            for i, w in enumerate(widths)
        ]
        + [keras.layers.Dense(2, name="out")]
    )


def interleaved(**kwargs: object) -> PipelineStrategy:
    options = {"num_microbatches": 4, "partition": CUTS, **kwargs}
    return PipelineStrategy(DEVICES, schedule="interleaved", **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("num_microbatches", "recompute"), [(4, False), (4, True), (3, False)]
)
def test_fit_matches_training_without_a_strategy(
    num_microbatches: int, recompute: bool
) -> None:
    # Batch 10 into 4 micro-batches of 3, 3, 2, 2 (or 3 of 4, 3, 3: M not a
    # multiple of K, one group of 3 micro-batches through the chunks).
    reference = train(None, chain, batch_size=10, epochs=2)
    strategy = interleaved(num_microbatches=num_microbatches, recompute=recompute)
    model = train(strategy, chain, batch_size=10, epochs=2)
    assert strategy.schedule.chunks_per_device == 2
    assert_same_training(reference, model)


def test_evaluate_and_predict_match() -> None:
    reference = train(None, chain, batch_size=8, epochs=1)
    model = train(interleaved(), chain, batch_size=8, epochs=1)
    assert_same_inference(model, reference, batch_size=8)


def test_chunks_alternate_devices_with_their_variables() -> None:
    # `partition="flops"` balances K * V = 4 chunks; this model has exactly
    # 3 cut points, so each layer is a chunk.
    strategy = interleaved(partition="flops")
    with strategy.scope():
        model = chain()
        model.compile(optimizer="adam", loss="mse")
    table = strategy.partition_model(model)
    assert [(row.index, row.device, row.layers) for row in table.stages] == [
        (0, DEVICES[0], ("d0",)),
        (1, DEVICES[1], ("d1",)),
        (2, DEVICES[0], ("d2",)),
        (3, DEVICES[1], ("out",)),
    ]
    x, y = data()
    model.fit(x, y, batch_size=8, verbose=0)
    device = {w.path: w.value.device.split("device:")[-1] for w in model.weights}
    on_first = {"d0", "d2"}
    assert device == {
        f"{model.name}/{layer}/{k}": "CPU:0" if layer in on_first else "CPU:1"
        for layer in ("d0", "d1", "d2", "out")
        for k in ("kernel", "bias")
    }
    slots = {
        v.name: v.value.device.split("device:")[-1]
        for v in model.optimizer.variables
        if v.name.endswith(("momentum", "velocity"))
    }
    assert len(slots) == 16
    assert all(
        (dev == "CPU:0") == any(f"_{n}_" in name for n in on_first)
        for name, dev in slots.items()
    ), slots


def test_counters_per_device() -> None:
    strategy = interleaved()
    assert strategy.peak_in_flight() == [0, 0]
    before = strategy.communication_stats()
    train(strategy, chain, batch_size=8, epochs=1)
    stats = strategy.communication_stats().since(before)
    assert stats.steps == 5
    assert [d.device for d in stats.devices] == DEVICES
    # With 2 devices every chunk boundary joins them: each device sends each
    # boundary's activations one way or its gradients the other, 40 examples
    # of float32 per boundary.
    assert [d.bytes_sent for d in stats.devices] == [40 * sum(WIDTHS) * 4] * 2
    assert stats.bytes_moved == 2 * 40 * sum(WIDTHS) * 4
    assert stats.calls == 5 * 2 * 4 * 3  # steps x (F, B) x M x chunk boundaries
    spans = [d.busy_seconds + d.comm_seconds + d.idle_seconds for d in stats.devices]
    assert spans == pytest.approx([spans[0]] * 2, rel=1e-9, abs=1e-9)
    for d in stats.devices:
        assert d.busy_seconds > 0 and d.idle_seconds >= 0 and d.comm_seconds >= 0, d
    # Measured from timestamps: (micro-batch, chunk) pairs held per device,
    # as planned, 2 (K - s - 1) + (V - 1) K + 1.
    assert strategy.peak_in_flight() == [5, 3]
    assert [strategy.schedule.peak_in_flight(s) for s in range(2)] == [5, 3]


def test_devices_are_not_ordered_against_each_other_by_control_edges() -> None:
    # Chunks share their device's chain of actions; data edges stay the only
    # links between devices.
    strategy = interleaved()
    with strategy.scope():
        model = chain()
        model.compile(optimizer="sgd", loss="mse")
    strategy.partition_model(model)
    model.optimizer.build(model.trainable_variables)
    step = tf.function(lambda x, y: strategy.run(model.train_step, args=((x, y),)))
    graph = step.get_concrete_function(
        tf.TensorSpec([8, 6], tf.float32), tf.TensorSpec([8, 2], tf.float32)
    ).graph
    crossing = collections.Counter(
        (source.type, op.type)
        for op in graph.get_operations()
        for source in op.control_inputs
        if {source.device, op.device} <= set(DEVICES) and source.device != op.device
    )
    assert {op.device for op in graph.get_operations()} >= set(DEVICES)
    assert not crossing, crossing


def test_three_devices_two_chunks_each() -> None:
    # K=3, V=2 (K != V), M=3 in a child process with 3 devices: weights match
    # training without a strategy, and bytes are counted per device from
    # boundaries of distinct widths.
    proc = run_python(
        """
        import json
        import tfpar
        tfpar.simulate_devices(3)
        import keras, numpy as np

        widths = (32, 16, 8, 4, 3)
        def build():
            keras.utils.set_random_seed(7)
            return keras.Sequential(
                [keras.Input((6,))]
                + [keras.layers.Dense(w, activation="tanh") for w in widths]
                + [keras.layers.Dense(2)])

        rng = np.random.default_rng(0)
        x = rng.normal(size=(24, 6)).astype("float32")
        y = rng.normal(size=(24, 2)).astype("float32")
        reference = build()
        reference.compile(optimizer="sgd", loss="mse")
        reference.fit(x, y, batch_size=6, shuffle=False, verbose=0)
        strategy = tfpar.PipelineStrategy(
            ["/device:CPU:0", "/device:CPU:1", "/device:CPU:2"],
            num_microbatches=3, schedule="interleaved", partition="params",
        )
        with strategy.scope():
            model = build()
            model.compile(optimizer="sgd", loss="mse")
        model.fit(x, y, batch_size=6, shuffle=False, verbose=0)
        for a, b in zip(reference.weights, model.weights, strict=True):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
        stats = strategy.communication_stats()
        print("RESULTS " + json.dumps({
            "devices": [row.device[-1] for row in strategy.partition_model(model).stages],
            "sent": [d.bytes_sent for d in stats.devices],
            "calls": stats.calls,
            "peak": strategy.peak_in_flight(),
            "planned": [strategy.schedule.peak_in_flight(s) for s in range(3)],
        }))
        """
    )
    r = tagged_json(proc.stdout, "RESULTS")
    assert r["devices"] == ["0", "1", "2", "0", "1", "2"]
    # Chunk c (one Dense layer each) sends its output (width w_c) forward and,
    # for c > 0, its input gradient (width w_{c-1}) back; chunk c runs on
    # device c % 3.
    w = (32, 16, 8, 4, 3)
    sent = [
        w[0] + w[3] + w[2],  # chunks 0 and 3
        w[1] + w[4] + w[0] + w[3],  # chunks 1 and 4
        w[2] + w[1] + w[4],  # chunks 2 and 5 (the head sends no activations)
    ]
    assert r["sent"] == [24 * 4 * n for n in sent]
    assert r["calls"] == 4 * 2 * 3 * 5  # steps x (F, B) x M x chunk boundaries
    assert r["peak"] == r["planned"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"schedule": "1f1b", "chunks_per_device": 2},
            ValueError,
            r"`chunks_per_device` must be 1 with schedule='1f1b'.*"
            r"Received: chunks_per_device=2\.",
        ),
        (
            {"schedule": "interleaved", "chunks_per_device": 1},
            ValueError,
            r"must be an int >= 2 with schedule='interleaved'.*chunks_per_device=1\.",
        ),
        (
            {"schedule": "interleaved", "chunks_per_device": "2"},
            TypeError,
            r"`chunks_per_device` must be an int\. Received: chunks_per_device='2'",
        ),
        (
            {"schedule": "interleaved", "devices": DEVICES[:1]},
            ValueError,
            r"needs at least 2 stages \(devices\).*num_stages=1",
        ),
        (
            {"schedule": "interleaved", "partition": ["d1"]},
            ValueError,
            r"`partition` must name the first layer of every chunk but the first: "
            r"3 name\(s\) for 2 device\(s\) x chunks_per_device=2\. "
            r"Received: partition=\['d1'\]",
        ),
    ],
)
def test_bad_arguments_fail_at_construction(
    kwargs: dict, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        PipelineStrategy(**{"devices": DEVICES, **kwargs})


def test_too_few_cut_points_fail_when_partitioning() -> None:
    # 3 chunks per device on 2 devices need 5 cut points; the chain has 3.
    strategy = PipelineStrategy(DEVICES, schedule="interleaved", chunks_per_device=3)
    with strategy.scope():
        model = chain()
        model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(
        ValueError,
        match=r"into 6 chunks \(2 devices x chunks_per_device=3\): it has only 3 "
        r"valid cut point\(s\).*Received: chunks_per_device=3 \(at most 2 for "
        r"this model on 2 devices\)",
    ):
        strategy.partition_model(model)
