"""Pipeline schedules as plain data: who runs what, in which time slot.

A schedule is a grid with one row per pipeline stage (one stage per device) and
one column per time slot. Each cell holds an `Action` (run the forward or the
backward pass of one micro-batch on that stage) or `None`, an idle slot: the
pipeline bubble. The grid is built by simulating the per-stage action order
with unit-time actions, so it is also the plan against which the measured
bubble is compared.

`PipelineStrategy` turns the grid into graph ops: it creates the actions in
slot order and chains the actions of each stage with control dependencies, so
each device runs its actions in exactly the planned order. Everything here is
pure Python and testable without TensorFlow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import cast

from tfpar._validation import check_choice, check_int

FORWARD = "F"
BACKWARD = "B"


@dataclasses.dataclass(frozen=True)
class Action:
    """One unit of work on one stage.

    Attributes:
        stage: Index of the pipeline stage (and of its device), from 0.
        kind: `"F"` (forward pass) or `"B"` (backward pass).
        microbatch: Index of the micro-batch, from 0.
    """

    stage: int
    kind: str
    microbatch: int

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, (FORWARD, BACKWARD))

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}"


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A pipeline schedule: per stage, the action run in each time slot.

    Attributes:
        name: The schedule's registered name (`"gpipe"` or `"1f1b"`).
        num_stages: Number of stages K.
        num_microbatches: Number of micro-batches M.
        grid: `grid[stage][slot]` is the `Action` run there, or `None` when
            the stage is idle (bubble).

    Example:

    ```python
    print(get_schedule("1f1b", num_stages=2, num_microbatches=4).format())
    # stage 0 | F0 F1 .  B0 F2 B1 F3 B2 .  B3
    # stage 1 | .  F0 B0 F1 B1 F2 B2 F3 B3 .
    ```
    """

    name: str
    num_stages: int
    num_microbatches: int
    grid: tuple[tuple[Action | None, ...], ...]

    @property
    def num_slots(self) -> int:
        """Number of time slots from the first action to the last."""
        return len(self.grid[0]) if self.grid else 0

    def stage_actions(self, stage: int) -> list[Action]:
        """Returns the actions of `stage` in the order it runs them."""
        return [a for a in self.grid[stage] if a is not None]

    def order(self) -> list[Action]:
        """Returns every action, by time slot and then by stage.

        Every action comes after the actions it depends on (its forward input
        from the previous stage, its gradient from the next one, and the
        previous action of its own stage), so building ops in this order only
        ever adds dependencies on ops that already exist.
        """
        return [
            self.grid[stage][slot]  # type: ignore[misc]
            for slot in range(self.num_slots)
            for stage in range(self.num_stages)
            if self.grid[stage][slot] is not None
        ]

    def bubble_fraction(self) -> float:
        """Returns the planned idle fraction of the stage-slots (unit-time actions).

        For GPipe and 1F1B this is `(K - 1) / (M + K - 1)`.
        """
        idle = sum(cell is None for row in self.grid for cell in row)
        return idle / (self.num_stages * self.num_slots)

    def peak_in_flight(self, stage: int | None = None) -> int:
        """Returns the most micro-batches whose activations a stage holds at once.

        A micro-batch is in flight on a stage from its forward until its
        backward. GPipe holds all M; 1F1B at most K (stage s holds K - s).

        Args:
            stage: A stage index, or `None` for the maximum over all stages.
        """
        stages = range(self.num_stages) if stage is None else [stage]
        peak = 0
        for s in stages:
            live = 0
            for action in self.stage_actions(s):
                live += 1 if action.kind == FORWARD else -1
                peak = max(peak, live)
        return peak

    def format(self) -> str:
        """Returns the grid as text, one line per stage, `.` for idle slots."""
        width = max(len(str(a)) for row in self.grid for a in row if a is not None)
        lines = []
        for stage, row in enumerate(self.grid):
            cells = [(str(a) if a is not None else ".").ljust(width) for a in row]
            lines.append(f"stage {stage} | " + " ".join(cells).rstrip())
        return "\n".join(lines)


def gpipe_order(num_stages: int, num_microbatches: int, stage: int) -> list[Action]:
    """GPipe: every forward, then every backward (all M activations kept)."""
    del num_stages
    return [Action(stage, FORWARD, j) for j in range(num_microbatches)] + [
        Action(stage, BACKWARD, j) for j in range(num_microbatches)
    ]


def one_f_one_b_order(
    num_stages: int, num_microbatches: int, stage: int
) -> list[Action]:
    """1F1B: K - 1 - s warm-up forwards, then alternate forward and backward."""
    warmup = min(num_stages - 1 - stage, num_microbatches)
    order = [Action(stage, FORWARD, j) for j in range(warmup)]
    for j in range(num_microbatches - warmup):
        order.append(Action(stage, FORWARD, warmup + j))
        order.append(Action(stage, BACKWARD, j))
    order += [
        Action(stage, BACKWARD, j)
        for j in range(num_microbatches - warmup, num_microbatches)
    ]
    return order


_ORDERS: dict[str, Callable[[int, int, int], list[Action]]] = {
    "gpipe": gpipe_order,
    "1f1b": one_f_one_b_order,
}

SCHEDULE_NAMES: tuple[str, ...] = tuple(_ORDERS)


def get_schedule(name: str, *, num_stages: int, num_microbatches: int) -> Schedule:
    """Builds the named schedule for K stages and M micro-batches.

    Args:
        name: `"gpipe"` or `"1f1b"`.
        num_stages: Number of stages K, an int >= 1.
        num_microbatches: Number of micro-batches M, an int >= 1.

    Returns:
        The `Schedule`, with its grid simulated from the per-stage orders.

    Raises:
        TypeError: If `name` is not a string or K or M is not an int.
        ValueError: If `name` is unknown (the message lists the valid names)
            or K or M is smaller than 1.

    Example:

    ```python
    schedule = get_schedule("gpipe", num_stages=2, num_microbatches=2)
    schedule.bubble_fraction()  # 1/3
    ```
    """
    validate_schedule_name(name)
    check_int("num_stages", num_stages, minimum=1)
    check_int("num_microbatches", num_microbatches, minimum=1)
    orders = [_ORDERS[name](num_stages, num_microbatches, s) for s in range(num_stages)]
    return Schedule(name, num_stages, num_microbatches, _simulate(orders))


def validate_schedule_name(name: object, *, argument: str = "schedule") -> str:
    """Checks that `name` is a registered schedule and returns it.

    Raises:
        TypeError: If it is not a string.
        ValueError: If it is not a registered name (the message lists them).
    """
    return cast(str, check_choice(argument, name, SCHEDULE_NAMES))


def _simulate(orders: list[list[Action]]) -> tuple[tuple[Action | None, ...], ...]:
    """Runs the per-stage orders slot by slot with unit-time actions.

    An action may run in slot t when the actions it depends on finished in a
    slot before t: F(s, j) needs F(s-1, j); B(s, j) needs F(s, j) and
    B(s+1, j). A stage whose next action is not ready idles.
    """
    num_stages = len(orders)
    done: dict[tuple[int, str, int], int] = {}
    rows: list[list[Action | None]] = [[] for _ in range(num_stages)]
    position = [0] * num_stages
    slot = 0
    while any(position[s] < len(orders[s]) for s in range(num_stages)):
        ran = False
        for s in range(num_stages):
            action = orders[s][position[s]] if position[s] < len(orders[s]) else None
            if action is not None and all(
                done.get(dep, slot) < slot for dep in _dependencies(action, num_stages)
            ):
                rows[s].append(action)
                position[s] += 1
                ran = True
            else:
                rows[s].append(None)
        for s in range(num_stages):
            action = rows[s][-1]
            if action is not None:
                done[(action.stage, action.kind, action.microbatch)] = slot
        if not ran:
            raise ValueError(f"Schedule deadlocks at slot {slot}: {orders}.")
        slot += 1
    return tuple(tuple(row) for row in rows)


def _dependencies(action: Action, num_stages: int) -> list[tuple[int, str, int]]:
    s, j = action.stage, action.microbatch
    if action.kind == FORWARD:
        return [(s - 1, FORWARD, j)] if s > 0 else []
    deps = [(s, FORWARD, j)]
    if s < num_stages - 1:
        deps.append((s + 1, BACKWARD, j))
    return deps
