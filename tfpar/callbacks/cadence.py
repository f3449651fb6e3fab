"""When the callbacks sample: every N steps and/or every T seconds.

A `Cadence` is the validated option (what the user asked for); a `Trigger` is
the small state machine that answers "is a sample due now?" for one training
run. Keeping them apart lets the option live in a frozen dataclass while the
trigger counts steps and watches the clock. How steps are counted (Keras's
optimizer step, `steps_per_execution`) lives here too, for both callbacks.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import keras

from tfpar._validation import check_int, check_number


@dataclasses.dataclass(frozen=True)
class Cadence:
    """How often a callback samples its counters.

    A sample is due when either condition is met: `every_steps` training steps
    or `every_seconds` seconds have passed since the previous sample. The first
    sample is taken after `warmup_steps` steps, so that the step which traces
    and compiles the train function is never measured as if it were typical.

    Args:
        every_steps: Sample every this many steps, a positive `int`, or `None`
            to sample on time only. Defaults to `None`.
        every_seconds: Sample every this many seconds, a positive number, or
            `None` to sample on steps only. Defaults to `10.0`.
        warmup_steps: Steps to skip before the first sample, an `int >= 0`.
            Defaults to `1`.

    Raises:
        ValueError: If both `every_steps` and `every_seconds` are `None`, or a
            value is out of range.
        TypeError: If a value has the wrong type.

    Example:

    ```python
    cadence = Cadence(every_steps=50, every_seconds=None)
    ```
    """

    every_steps: int | None = None
    every_seconds: float | None = 10.0
    warmup_steps: int = 1

    def __post_init__(self) -> None:
        if self.every_steps is None and self.every_seconds is None:
            raise ValueError(
                "A cadence needs `every_steps` or `every_seconds`. Received: "
                "every_steps=None, every_seconds=None (set at least one)."
            )
        check_int("every_steps", self.every_steps, minimum=1, allow_none=True)
        check_number(
            "every_seconds",
            self.every_seconds,
            positive=True,
            unit="seconds",
            allow_none=True,
        )
        check_int("warmup_steps", self.warmup_steps, minimum=0)


class Trigger:
    """Decides, step by step, whether a `Cadence` wants a sample now.

    Args:
        cadence: The cadence to follow.
        clock: Returns the current time in seconds. Defaults to
            `time.monotonic`; tests pass a fake clock.

    Example:

    ```python
    trigger = Trigger(Cadence(every_steps=2, every_seconds=None, warmup_steps=0))
    [trigger.due(step) for step in range(5)]  # [True, False, True, False, True]
    ```
    """

    def __init__(
        self, cadence: Cadence, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._cadence = cadence
        self._clock = clock
        # Called every training step: the common answer ("not yet") costs one
        # integer compare and, with a time cadence, one clock read.
        self._next_step: float = cadence.warmup_steps
        self._deadline: float | None = None  # no time condition before warm-up

    def due(self, step: int) -> bool:
        """Returns whether a sample is due at `step`, and if so records it.

        Args:
            step: Steps completed so far in this run (0 for the first step).

        Returns:
            `True` when a sample should be taken now.
        """
        if step < self._next_step and (
            self._deadline is None or self._clock() < self._deadline
        ):
            return False
        every_steps = self._cadence.every_steps
        every_seconds = self._cadence.every_seconds
        self._next_step = math.inf if every_steps is None else step + every_steps
        if every_seconds is not None:
            self._deadline = self._clock() + every_seconds
        return True


def optimizer_step(model: keras.Model) -> int:
    """Returns the model's optimizer step: the x axis of Keras's batch charts.

    Args:
        model: A compiled Keras model (an uncompiled one gives 0).

    Returns:
        `model.optimizer.iterations` as an `int`.

    Example:

    ```python
    optimizer_step(model)  # 0 before the first fit()
    ```
    """
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return 0
    return int(keras.ops.convert_to_numpy(optimizer.iterations))


def steps_per_call(model: keras.Model) -> int:
    """Returns the training steps behind one `on_train_batch_end` call.

    Args:
        model: A compiled Keras model.

    Returns:
        Its `steps_per_execution` (1 unless set in `compile`).

    Example:

    ```python
    model.compile(optimizer="sgd", loss="mse", steps_per_execution=4)
    steps_per_call(model)  # 4
    ```
    """
    return int(getattr(model, "steps_per_execution", 1) or 1)
