"""Tests for tfpar.strategies.pipeline.schedules: the plans, without TensorFlow."""

import pytest

from tfpar.strategies.pipeline.schedules import (
    BACKWARD,
    FORWARD,
    SCHEDULE_NAMES,
    Action,
    get_schedule,
)

SHAPES = [(1, 1), (1, 4), (2, 1), (2, 4), (2, 8), (3, 5), (4, 8), (4, 2)]
# Interleaved: K >= 2; M multiples of K, not, and below K.
INTERLEAVED_SHAPES = [
    (2, 1),
    (2, 2),
    (2, 3),
    (2, 4),
    (2, 8),
    (3, 5),
    (3, 6),
    (4, 2),
    (4, 7),
    (4, 8),
    (5, 12),
]
PLANS = [(name, stages, m, 1) for name in ("gpipe", "1f1b") for stages, m in SHAPES]
PLANS += [("interleaved", k, m, v) for k, m in INTERLEAVED_SHAPES for v in (2, 3)]


@pytest.mark.parametrize(("name", "stages", "microbatches", "chunks"), PLANS)
def test_plan_invariants(
    name: str, stages: int, microbatches: int, chunks: int
) -> None:
    schedule = get_schedule(
        name,
        num_stages=stages,
        num_microbatches=microbatches,
        chunks_per_device=chunks,
    )
    assert schedule.chunks_per_device == chunks
    assert schedule.num_chunks == stages * chunks
    slot_of = {}
    for s in range(stages):
        actions = schedule.stage_actions(s)
        # Every action of the stage's chunks, exactly once.
        assert sorted((a.kind, a.microbatch, a.chunk) for a in actions) == sorted(
            (kind, j, v)
            for kind in (FORWARD, BACKWARD)
            for j in range(microbatches)
            for v in range(chunks)
        )
        for t, action in enumerate(schedule.grid[s]):
            if action is not None:
                assert action.stage == s
                c = schedule.chunk_index(action)
                assert c == action.chunk * stages + s
                slot_of[(c, action.kind, action.microbatch)] = t
    # Data dependencies: forward flows down the model's chunks, gradients flow
    # back up.
    last = stages * chunks - 1
    for (c, kind, j), t in slot_of.items():
        if kind == FORWARD and c > 0:
            assert slot_of[(c - 1, FORWARD, j)] < t
        if kind == BACKWARD:
            assert slot_of[(c, FORWARD, j)] < t
            if c < last:
                assert slot_of[(c + 1, BACKWARD, j)] < t
    # Creation order lists every action after everything it depends on.
    order = schedule.order()
    assert len(order) == 2 * stages * chunks * microbatches
    slots = [slot_of[(schedule.chunk_index(a), a.kind, a.microbatch)] for a in order]
    assert slots == sorted(slots)
    classic = (stages - 1) / (microbatches + stages - 1)
    if chunks == 1:
        # Unit-time actions: both schedules reach the classic bound exactly.
        assert schedule.bubble_fraction() == pytest.approx(classic)
    elif microbatches >= stages:
        # Narayanan et al. (2021), interleaved schedule: the bubble shrinks by
        # V, each action being 1/V of a stage's work.
        assert schedule.bubble_fraction() == pytest.approx(
            (stages - 1) / (chunks * microbatches + stages - 1)
        )
    elif microbatches > 1:
        assert schedule.bubble_fraction() < classic
    else:  # a single micro-batch crosses the devices one after another
        assert schedule.bubble_fraction() == pytest.approx(classic)


@pytest.mark.parametrize(
    ("stages", "microbatches"), [(2, 2), (2, 3), (2, 8), (3, 4), (4, 2), (4, 8)]
)
@pytest.mark.parametrize("chunks", [2, 4])
def test_interleaved_bubble_is_below_1f1b(
    stages: int, microbatches: int, chunks: int
) -> None:
    one_f_one_b = get_schedule("1f1b", num_stages=stages, num_microbatches=microbatches)
    interleaved = get_schedule(
        "interleaved",
        num_stages=stages,
        num_microbatches=microbatches,
        chunks_per_device=chunks,
    )
    assert interleaved.bubble_fraction() < one_f_one_b.bubble_fraction()


@pytest.mark.parametrize(("stages", "microbatches"), SHAPES)
def test_activations_in_flight(stages: int, microbatches: int) -> None:
    gpipe = get_schedule("gpipe", num_stages=stages, num_microbatches=microbatches)
    one_f_one_b = get_schedule("1f1b", num_stages=stages, num_microbatches=microbatches)
    assert gpipe.peak_in_flight() == microbatches
    for s in range(stages):
        assert one_f_one_b.peak_in_flight(s) == min(stages - s, microbatches)
    assert one_f_one_b.peak_in_flight() == min(stages, microbatches)


@pytest.mark.parametrize(("stages", "microbatches"), [(2, 2), (2, 8), (3, 6), (4, 8)])
@pytest.mark.parametrize("chunks", [2, 3])
def test_interleaved_activations_in_flight(
    stages: int, microbatches: int, chunks: int
) -> None:
    # Megatron-LM's interleaved warm-up with K | M: stage s runs
    # 2 (K - s - 1) + (V - 1) K forwards before its first backward, so it
    # holds one more (micro-batch, chunk) pair when that backward starts.
    schedule = get_schedule(
        "interleaved",
        num_stages=stages,
        num_microbatches=microbatches,
        chunks_per_device=chunks,
    )
    for s in range(stages):
        expected = 2 * (stages - s - 1) + (chunks - 1) * stages + 1
        assert schedule.peak_in_flight(s) == min(expected, microbatches * chunks)


def test_format_is_the_grid() -> None:
    schedule = get_schedule("1f1b", num_stages=2, num_microbatches=4)
    assert schedule.format() == (
        "stage 0 | F0 F1 .  B0 F2 B1 F3 B2 .  B3\n"
        "stage 1 | .  F0 B0 F1 B1 F2 B2 F3 B3 .\n"
        "planned bubble 0.200"
    )
    gpipe = get_schedule("gpipe", num_stages=2, num_microbatches=2)
    assert gpipe.format() == (
        "stage 0 | F0 F1 .  .  B0 B1\nstage 1 | .  F0 F1 B0 B1 .\nplanned bubble 0.333"
    )
    assert gpipe.grid[0][2] is None
    assert gpipe.grid[1][3] == Action(1, BACKWARD, 0)


def test_interleaved_format_names_the_chunk() -> None:
    # Stage 0 holds the model's chunks 0 and 2, stage 1 chunks 1 and 3; `F1.1`
    # is micro-batch 1 through the stage's chunk 1.
    schedule = get_schedule("interleaved", num_stages=2, num_microbatches=2)
    assert schedule.format() == (
        "stage 0 | F0.0 F1.0 F0.1 F1.1 .    B0.1 .    B1.1 B0.0 B1.0\n"
        "stage 1 | .    F0.0 F1.0 F0.1 B0.1 F1.1 B1.1 B0.0 B1.0 .\n"
        "planned bubble 0.200"
    )
    assert schedule.grid[1][5] == Action(1, FORWARD, 1, chunk=1)
    assert schedule.chunk_index(schedule.grid[1][5]) == 3
    assert str(Action(1, FORWARD, 1, chunk=1)) == "F1.1"
    assert str(Action(1, FORWARD, 1)) == "F1"


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(
        ValueError,
        match=r"`schedule` must be one of 'gpipe', '1f1b', 'interleaved'\. "
        r"Received: schedule='pipedream'\.",
    ):
        get_schedule("pipedream", num_stages=2, num_microbatches=2)
    with pytest.raises(TypeError, match=r"Received: schedule=None of type NoneType"):
        get_schedule(None, num_stages=2, num_microbatches=2)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("stages", "microbatches", "error", "message"),
    [
        (0, 2, ValueError, r"`num_stages` must be an int >= 1\. .*num_stages=0\."),
        (2, 0, ValueError, r"an int >= 1\. Received: num_microbatches=0\."),
        (2, 1.5, TypeError, r"an int\. Received: num_microbatches=1\.5 of type float"),
    ],
)
def test_bad_sizes(
    stages: int, microbatches: int, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        get_schedule("gpipe", num_stages=stages, num_microbatches=microbatches)


def test_action_kind_is_checked() -> None:
    with pytest.raises(ValueError, match=r"one of 'F', 'B'\. Received: kind='X'"):
        Action(0, "X", 0)


@pytest.mark.parametrize(
    ("name", "stages", "chunks", "error", "message"),
    [
        (
            "1f1b",
            2,
            2,
            ValueError,
            r"`chunks_per_device` must be 1 with schedule='1f1b'; several chunks "
            r"per device need schedule='interleaved'\. Received: chunks_per_device=2\.",
        ),
        ("gpipe", 2, 3, ValueError, r"schedule='gpipe'.*chunks_per_device=3\."),
        (
            "interleaved",
            2,
            1,
            ValueError,
            r"`chunks_per_device` must be an int >= 2 with schedule='interleaved' "
            r"\(one chunk per device is schedule='1f1b'\)\. "
            r"Received: chunks_per_device=1\.",
        ),
        (
            "interleaved",
            2,
            0,
            ValueError,
            r"an int >= 1\. Received: chunks_per_device=0\.",
        ),
        (
            "interleaved",
            2,
            2.0,
            TypeError,
            r"an int\. Received: chunks_per_device=2\.0 of type float",
        ),
        ("interleaved", 2, True, TypeError, r"chunks_per_device=True of type bool"),
        (
            "interleaved",
            1,
            None,
            ValueError,
            r"needs at least 2 stages.*Received: num_stages=1 \(use schedule='1f1b'",
        ),
    ],
)
def test_bad_chunks_per_device(
    name: str, stages: int, chunks: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        get_schedule(
            name,
            num_stages=stages,
            num_microbatches=4,
            chunks_per_device=chunks,  # type: ignore[arg-type]
        )


def test_chunks_per_device_defaults_by_schedule() -> None:
    assert get_schedule("1f1b", num_stages=2, num_microbatches=2).chunks_per_device == 1
    interleaved = get_schedule("interleaved", num_stages=2, num_microbatches=2)
    assert interleaved.chunks_per_device == 2
    assert SCHEDULE_NAMES == ("gpipe", "1f1b", "interleaved")
