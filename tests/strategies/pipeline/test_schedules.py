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


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize(("stages", "microbatches"), SHAPES)
def test_plan_invariants(name: str, stages: int, microbatches: int) -> None:
    schedule = get_schedule(name, num_stages=stages, num_microbatches=microbatches)
    slot_of = {}
    for s in range(stages):
        actions = schedule.stage_actions(s)
        assert sorted((a.kind, a.microbatch) for a in actions) == sorted(
            [(FORWARD, j) for j in range(microbatches)]
            + [(BACKWARD, j) for j in range(microbatches)]
        )
        for t, action in enumerate(schedule.grid[s]):
            if action is not None:
                assert action.stage == s
                slot_of[(s, action.kind, action.microbatch)] = t
    # Data dependencies: forward flows down the stages, gradients flow back up.
    for (s, kind, j), t in slot_of.items():
        if kind == FORWARD and s > 0:
            assert slot_of[(s - 1, FORWARD, j)] < t
        if kind == BACKWARD:
            assert slot_of[(s, FORWARD, j)] < t
            if s < stages - 1:
                assert slot_of[(s + 1, BACKWARD, j)] < t
    # Creation order lists every action after everything it depends on.
    order = schedule.order()
    assert len(order) == 2 * stages * microbatches
    assert [slot_of[(a.stage, a.kind, a.microbatch)] for a in order] == sorted(
        slot_of[(a.stage, a.kind, a.microbatch)] for a in order
    )
    # Unit-time actions: both schedules reach the classic bubble bound exactly.
    assert schedule.bubble_fraction() == pytest.approx(
        (stages - 1) / (microbatches + stages - 1)
    )


@pytest.mark.parametrize(("stages", "microbatches"), SHAPES)
def test_activations_in_flight(stages: int, microbatches: int) -> None:
    gpipe = get_schedule("gpipe", num_stages=stages, num_microbatches=microbatches)
    one_f_one_b = get_schedule("1f1b", num_stages=stages, num_microbatches=microbatches)
    assert gpipe.peak_in_flight() == microbatches
    for s in range(stages):
        assert one_f_one_b.peak_in_flight(s) == min(stages - s, microbatches)
    assert one_f_one_b.peak_in_flight() == min(stages, microbatches)


def test_format_is_the_grid() -> None:
    schedule = get_schedule("1f1b", num_stages=2, num_microbatches=4)
    assert schedule.format() == (
        "stage 0 | F0 F1 .  B0 F2 B1 F3 B2 .  B3\n"
        "stage 1 | .  F0 B0 F1 B1 F2 B2 F3 B3 ."
    )
    gpipe = get_schedule("gpipe", num_stages=2, num_microbatches=2)
    assert gpipe.format() == "stage 0 | F0 F1 .  .  B0 B1\nstage 1 | .  F0 F1 B0 B1 ."
    assert gpipe.grid[0][2] is None
    assert gpipe.grid[1][3] == Action(1, BACKWARD, 0)


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(
        ValueError,
        match=r"`schedule` must be one of 'gpipe', '1f1b'\. "
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
