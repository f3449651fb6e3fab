"""Pipeline schedules as plain data: who runs what, in which time slot.

A schedule is a grid with one row per pipeline stage (one stage per device) and
one column per time slot. Each cell holds an `Action` (run the forward or the
backward pass of one micro-batch on that stage) or `None`, an idle slot: the
pipeline bubble. The grid is built by simulating the per-stage action order
with unit-time actions, so it is also the plan against which the measured
bubble is compared.

The interleaved schedule gives each stage V > 1 chunks of the model: the model
is cut into K * V chunks and stage s holds chunks s, s + K, ..., s + (V-1) K,
so a micro-batch visits every device V times. Its actions name the stage's
chunk they run.

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
INTERLEAVED = "interleaved"


@dataclasses.dataclass(frozen=True)
class Action:
    """One unit of work on one stage.

    Attributes:
        stage: Index of the pipeline stage (and of its device), from 0.
        kind: `"F"` (forward pass) or `"B"` (backward pass).
        microbatch: Index of the micro-batch, from 0.
        chunk: Which of the stage's model chunks the action runs, from 0.
            Defaults to `0`, the only chunk outside the interleaved schedule.
            Chunk v of stage s is chunk `v * K + s` of the model (see
            `Schedule.chunk_index`).
    """

    stage: int
    kind: str
    microbatch: int
    chunk: int = 0

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, (FORWARD, BACKWARD))

    def __str__(self) -> str:
        suffix = f".{self.chunk}" if self.chunk else ""
        return f"{self.kind}{self.microbatch}{suffix}"


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A pipeline schedule: per stage, the action run in each time slot.

    Attributes:
        name: The schedule's registered name (`"gpipe"`, `"1f1b"` or
            `"interleaved"`).
        num_stages: Number of stages K (one per device).
        num_microbatches: Number of micro-batches M.
        grid: `grid[stage][slot]` is the `Action` run there, or `None` when
            the stage is idle (bubble).
        chunks_per_device: Number of model chunks V each stage holds.
            Defaults to `1`.

    Example:

    ```python
    print(get_schedule("1f1b", num_stages=2, num_microbatches=4).format())
    # stage 0 | F0 F1 .  B0 F2 B1 F3 B2 .  B3
    # stage 1 | .  F0 B0 F1 B1 F2 B2 F3 B3 .
    # planned bubble 0.200
    ```
    """

    name: str
    num_stages: int
    num_microbatches: int
    grid: tuple[tuple[Action | None, ...], ...]
    chunks_per_device: int = 1

    @property
    def num_chunks(self) -> int:
        """Number of model chunks, K * V (K when each stage holds one)."""
        return self.num_stages * self.chunks_per_device

    def chunk_index(self, action: Action) -> int:
        """Returns the index in the model (and partition table) of `action`'s chunk."""
        return action.chunk * self.num_stages + action.stage

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
        from the previous chunk, its gradient from the next one, and the
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

        For GPipe and 1F1B this is `(K - 1) / (M + K - 1)`. An interleaved
        action runs one chunk, 1/V of a stage's work: with M >= K the
        interleaved schedule idles `(K - 1) / (V * M + K - 1)`.
        """
        idle = sum(cell is None for row in self.grid for cell in row)
        return idle / (self.num_stages * self.num_slots)

    def peak_in_flight(self, stage: int | None = None) -> int:
        """Returns the most micro-batches whose activations a stage holds at once.

        A micro-batch is in flight on a stage from its forward until its
        backward. GPipe holds all M; 1F1B at most K (stage s holds K - s).
        The interleaved schedule counts (micro-batch, chunk) pairs, each about
        1/V of a stage's activations: stage s holds
        `2 * (K - s - 1) + (V - 1) * G + 1` of them, at most M * V, where G is
        its micro-batch group (K when K divides M; see `interleaved_order`).

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
        """Returns the grid as text, one line per stage, and the planned bubble.

        Idle slots show as `.`, actions as `F3` (forward pass of micro-batch
        3) or `B3`; in an interleaved schedule as `F3.1`, micro-batch 3
        through the stage's chunk 1. The last line is `bubble_fraction()`.
        """
        labels = [[self._label(a) for a in row] for row in self.grid]
        width = max(len(label) for row in labels for label in row)
        lines = [
            f"stage {stage} | " + " ".join(label.ljust(width) for label in row).rstrip()
            for stage, row in enumerate(labels)
        ]
        lines.append(f"planned bubble {self.bubble_fraction():.3f}")
        return "\n".join(lines)

    def _label(self, action: Action | None) -> str:
        if action is None:
            return "."
        if self.chunks_per_device == 1:
            return str(action)
        return f"{action.kind}{action.microbatch}.{action.chunk}"


def gpipe_order(
    num_stages: int, num_microbatches: int, stage: int, chunks_per_device: int = 1
) -> list[Action]:
    """GPipe: every forward, then every backward (all M activations kept)."""
    del num_stages, chunks_per_device
    return [Action(stage, FORWARD, j) for j in range(num_microbatches)] + [
        Action(stage, BACKWARD, j) for j in range(num_microbatches)
    ]


def one_f_one_b_order(
    num_stages: int, num_microbatches: int, stage: int, chunks_per_device: int = 1
) -> list[Action]:
    """1F1B: K - 1 - s warm-up forwards, then alternate forward and backward."""
    del chunks_per_device
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


def interleaved_order(
    num_stages: int, num_microbatches: int, stage: int, chunks_per_device: int
) -> list[Action]:
    """Interleaved 1F1B (Megatron-LM's virtual pipeline stages) on stage s.

    Micro-batches go through the chunks in groups of G: the forwards of
    micro-batches 0..G-1 on the stage's chunk 0, then on its chunk 1, ...,
    then the next group; the backwards in the same order with the chunks
    reversed. After `2 * (K - s - 1) + (V - 1) * G` warm-up forwards (at most
    M * V), forwards and backwards alternate, then the remaining backwards
    run. G is K when K divides M, as in Megatron-LM; otherwise the smallest
    divisor of M at least K (M itself when M is prime), or M when M < K: groups
    of one size at least K keep every stage busy once the pipeline is full
    (a smaller last group would idle it, or deadlock), at the price of more
    activations in flight.

    Args:
        num_stages: K, the devices.
        num_microbatches: M.
        stage: The device s whose actions to list.
        chunks_per_device: V.

    Returns:
        The stage's actions, in the order it runs them.

    Example:

    ```python
    " ".join(str(a) for a in interleaved_order(2, 2, 0, 2))
    # "F0 F1 F0.1 F1.1 B0.1 B1.1 B0 B1" (chunk 0 unmarked)
    ```
    """
    k, m, v = num_stages, num_microbatches, chunks_per_device
    group = m if m <= k else next(g for g in range(k, m + 1) if m % g == 0)
    table = [
        (j, chunk)
        for first in range(0, m, group)
        for chunk in range(v)
        for j in range(first, first + group)
    ]
    forwards = [Action(stage, FORWARD, j, chunk) for j, chunk in table]
    backwards = [Action(stage, BACKWARD, j, v - 1 - chunk) for j, chunk in table]
    warmup = min(2 * (k - stage - 1) + (v - 1) * group, m * v)
    order = forwards[:warmup]
    for i in range(m * v - warmup):
        order += [forwards[warmup + i], backwards[i]]
    return order + backwards[m * v - warmup :]


_ORDERS: dict[str, Callable[[int, int, int, int], list[Action]]] = {
    "gpipe": gpipe_order,
    "1f1b": one_f_one_b_order,
    INTERLEAVED: interleaved_order,
}

SCHEDULE_NAMES: tuple[str, ...] = tuple(_ORDERS)


def get_schedule(
    name: str,
    *,
    num_stages: int,
    num_microbatches: int,
    chunks_per_device: int | None = None,
) -> Schedule:
    """Builds the named schedule for K stages and M micro-batches.

    Args:
        name: `"gpipe"`, `"1f1b"` or `"interleaved"`.
        num_stages: Number of stages K, an int >= 1 (>= 2 for
            `"interleaved"`).
        num_microbatches: Number of micro-batches M, an int >= 1.
        chunks_per_device: Model chunks per stage, V. Defaults to `None`: 2
            for `"interleaved"` (which needs V >= 2), 1 otherwise (the only
            value GPipe and 1F1B accept).

    Returns:
        The `Schedule`, with its grid simulated from the per-stage orders.

    Raises:
        TypeError: If `name` is not a string or K, M or V is not an int.
        ValueError: If `name` is unknown (the message lists the valid names),
            K or M is smaller than 1, or V does not fit the schedule (see
            `check_chunks_per_device`).

    Example:

    ```python
    schedule = get_schedule("gpipe", num_stages=2, num_microbatches=2)
    schedule.bubble_fraction()  # 1/3
    interleaved = get_schedule("interleaved", num_stages=2, num_microbatches=4)
    interleaved.bubble_fraction()  # 1/9, against 1/5 for 1F1B
    ```
    """
    validate_schedule_name(name)
    check_int("num_stages", num_stages, minimum=1)
    check_int("num_microbatches", num_microbatches, minimum=1)
    chunks = check_chunks_per_device(
        chunks_per_device, schedule=name, num_stages=num_stages
    )
    orders = [
        _ORDERS[name](num_stages, num_microbatches, s, chunks)
        for s in range(num_stages)
    ]
    grid = _simulate(orders, chunks)
    return Schedule(name, num_stages, num_microbatches, grid, chunks)


def check_chunks_per_device(
    chunks_per_device: object, *, schedule: str, num_stages: int
) -> int:
    """Checks V, the model chunks per stage, against the schedule; returns it.

    Args:
        chunks_per_device: An int, or `None` for the schedule's default (2
            for `"interleaved"`, else 1).
        schedule: A registered schedule name.
        num_stages: Number of stages (devices) K.

    Returns:
        V, an int.

    Raises:
        TypeError: If `chunks_per_device` is neither an int nor `None`.
        ValueError: If it is not >= 2 for `"interleaved"` or not 1 for
            another schedule, or `"interleaved"` has a single stage (its
            chunks would all share one device).

    Example:

    ```python
    check_chunks_per_device(None, schedule="interleaved", num_stages=2)  # 2
    check_chunks_per_device(2, schedule="1f1b", num_stages=2)  # ValueError
    ```
    """
    if chunks_per_device is None:
        chunks_per_device = 2 if schedule == INTERLEAVED else 1
    chunks: int = check_int("chunks_per_device", chunks_per_device, minimum=1)
    if schedule != INTERLEAVED and chunks != 1:
        raise ValueError(
            f"`chunks_per_device` must be 1 with schedule={schedule!r}; several "
            "chunks per device need schedule='interleaved'. Received: "
            f"chunks_per_device={chunks}."
        )
    if schedule == INTERLEAVED and chunks < 2:
        raise ValueError(
            "`chunks_per_device` must be an int >= 2 with schedule='interleaved' "
            "(one chunk per device is schedule='1f1b'). Received: "
            f"chunks_per_device={chunks}."
        )
    if schedule == INTERLEAVED and num_stages < 2:
        raise ValueError(
            "schedule='interleaved' needs at least 2 stages (devices): on one "
            "device its chunks would run one after another. Received: "
            f"num_stages={num_stages} (use schedule='1f1b' on one device)."
        )
    return chunks


def validate_schedule_name(name: object, *, argument: str = "schedule") -> str:
    """Checks that `name` is a registered schedule and returns it.

    Raises:
        TypeError: If it is not a string.
        ValueError: If it is not a registered name (the message lists them).
    """
    return cast(str, check_choice(argument, name, SCHEDULE_NAMES))


def _simulate(
    orders: list[list[Action]], chunks_per_device: int
) -> tuple[tuple[Action | None, ...], ...]:
    """Runs the per-stage orders slot by slot with unit-time actions.

    An action may run in slot t when the actions it depends on finished in a
    slot before t: on the model's chunks c (chunk v of stage s is
    c = v * K + s), F(c, j) needs F(c-1, j); B(c, j) needs F(c, j) and
    B(c+1, j). A stage whose next action is not ready idles.
    """
    num_stages = len(orders)
    num_chunks = num_stages * chunks_per_device
    done: dict[tuple[int, str, int], int] = {}
    rows: list[list[Action | None]] = [[] for _ in range(num_stages)]
    position = [0] * num_stages
    slot = 0
    while any(position[s] < len(orders[s]) for s in range(num_stages)):
        ran = False
        for s in range(num_stages):
            action = orders[s][position[s]] if position[s] < len(orders[s]) else None
            if action is not None and all(
                done.get(dep, slot) < slot
                for dep in _dependencies(action, num_stages, num_chunks)
            ):
                rows[s].append(action)
                position[s] += 1
                ran = True
            else:
                rows[s].append(None)
        for s in range(num_stages):
            action = rows[s][-1]
            if action is not None:
                chunk = action.chunk * num_stages + action.stage
                done[(chunk, action.kind, action.microbatch)] = slot
        if not ran:
            raise ValueError(f"Schedule deadlocks at slot {slot}: {orders}.")
        slot += 1
    return tuple(tuple(row) for row in rows)


def _dependencies(
    action: Action, num_stages: int, num_chunks: int
) -> list[tuple[int, str, int]]:
    c, j = action.chunk * num_stages + action.stage, action.microbatch
    if action.kind == FORWARD:
        return [(c - 1, FORWARD, j)] if c > 0 else []
    deps = [(c, FORWARD, j)]
    if c < num_chunks - 1:
        deps.append((c + 1, BACKWARD, j))
    return deps
