"""Tests for tfpar.callbacks.cadence: when samples are due."""

import pytest

from tfpar.callbacks.cadence import Cadence, Trigger


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_every_steps_after_warmup() -> None:
    trigger = Trigger(Cadence(every_steps=3, every_seconds=None, warmup_steps=1))
    due = [step for step in range(12) if trigger.due(step)]
    assert due == [1, 4, 7, 10]


def test_every_seconds_follows_the_clock() -> None:
    clock = FakeClock()
    trigger = Trigger(
        Cadence(every_steps=None, every_seconds=2.0, warmup_steps=0), clock=clock
    )
    due = []
    for step in range(10):
        clock.now = step * 0.75  # due at t=0, then the first step with t >= last+2
        if trigger.due(step):
            due.append(step)
    assert due == [0, 3, 6, 9]


def test_steps_or_seconds_whichever_first() -> None:
    clock = FakeClock()
    trigger = Trigger(
        Cadence(every_steps=4, every_seconds=1.0, warmup_steps=0), clock=clock
    )
    times = [0.0, 0.1, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0]
    due = []
    for step, t in enumerate(times):
        clock.now = t
        if trigger.due(step):
            due.append(step)
    assert due == [0, 2, 6]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"every_steps": 0, "every_seconds": None}, ValueError, "every_steps=0"),
        ({"every_steps": -5}, ValueError, "every_steps=-5"),
        ({"every_seconds": 0}, ValueError, "every_seconds=0"),
        ({"every_seconds": -1.0}, ValueError, "every_seconds=-1.0"),
        ({"every_seconds": float("nan")}, ValueError, "every_seconds=nan"),
        ({"every_steps": None, "every_seconds": None}, ValueError, "at least one"),
        ({"every_steps": 2.5}, TypeError, "every_steps=2.5"),
        ({"every_steps": True}, TypeError, "every_steps=True"),
        ({"every_seconds": "10"}, TypeError, "every_seconds='10'"),
        ({"warmup_steps": -1}, ValueError, "warmup_steps=-1"),
    ],
)
def test_bad_cadence_is_refused(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(
        error, match="Received: .*" if "at least" not in message else message
    ) as info:
        Cadence(**kwargs)
    assert message in str(info.value)
