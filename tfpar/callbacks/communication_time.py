"""`CommunicationTime`: where each step's time goes between computing and communicating."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import keras
import tensorflow as tf

from tfpar._validation import check_bool, check_int, check_number, value_error
from tfpar.callbacks.cadence import Cadence, Trigger, optimizer_step, steps_per_call
from tfpar.callbacks.definitions import describe
from tfpar.callbacks.sources import Sample
from tfpar.callbacks.stragglers import StragglerDetector
from tfpar.callbacks.summaries import (
    ScalarWriter,
    check_log_dir,
    custom_scalars_layout,
    device_label,
)
from tfpar.stats import CommunicationStats

logger = logging.getLogger("tfpar")

_MIB = 1024.0 * 1024.0


class CommunicationTime(keras.callbacks.Callback):
    """Logs communication time, compute time and bytes moved per step to TensorBoard.

    Reads the cumulative counters every tfpar strategy exposes through
    `strategy.communication_stats()` (`tfpar.CommunicationStats`) and logs,
    per step, averaged over the steps since the previous sample (each
    strategy's `communication_stats()` says how it measures its counters;
    docs/callbacks.md has the table):

    - `comm/step_time_ms`: wall time of a training step (measured here, from
      the start to the end of each batch, so epoch ends and validation do not
      count).
    - `comm/time_ms`: exposed communication time, as the strategy measured
      it: gradient all-reduce for the mirrored strategies, the time an
      average pipeline stage waits for a tensor in transit.
    - `comm/compute_ms`: `step_time_ms - time_ms`, everything else.
    - `comm/fraction`: `time_ms / step_time_ms`.
    - `comm/dispatch_ms` (`tfpar.ParameterServerStrategy`, instead of the
      three above): a step function's wall time as the coordinator saw it
      beyond its time on the worker. Communication with the parameter
      servers happens inside the workers' steps and is not measured.
    - `comm/bytes_per_step`: bytes moved (after any compression) per step.
    - `comm/bandwidth_mib_per_s`: bytes moved over communication time.
    - `comm/device/<device>/busy_ms`, `.../comm_ms`, `.../idle_ms`
      (`.../bubble_ms` for a pipeline stage), `.../dispatch_ms`, and
      `.../bytes_sent_per_step` (`.../modelled_bytes_sent_per_step` where
      the strategy computes them from the algorithm's routing), where the
      strategy keeps them (`CommunicationStats.counters`); `.../reduce_ms`
      and `.../reduce_bytes_per_step` for a pipeline stage's replica (its
      share of the gradient reduction among the stage's replicas). All the
      communication numbers of a sample over which no counter moved are
      left out (no step finished yet under the asynchronous
      parameter-server strategy), never logged as made-up zeros.
    - `comm/device/<replica>/wait_ms` and `.../slowest_fraction` (the
      synchronous data-parallel strategies): per step, how long the replica
      waited at the gradient synchronization for the slowest one, and the
      share of synchronizations at which it was that slowest one; for
      every replica of the job, other workers' too.

    A replica that is the slowest at `straggler_share` (75%) or more of the
    synchronizations while the others wait `straggler_margin` (5%) or more
    of the step for it, in `straggler_samples` (two) samples in a row, is
    named a straggler: once per `fit`, in a warning and in a TensorBoard text
    summary at `comm/straggler`. `detect_stragglers=False` turns this off.

    Under a strategy without `communication_stats()` (the stock
    `tf.distribute` strategies, or none) it says once, with a warning, what it
    cannot measure, and logs `comm/step_time_ms` only.

    Each scalar's TensorBoard description says what it is, under the
    strategy in use (`tfpar.callbacks.definitions`). Scalars go to
    `<log_dir>/train` at the optimizer's step, beside Keras's
    `TensorBoard` callback. The first sample is a baseline taken after the
    first (tracing) step; the last is written when training ends, so even a
    short `fit` logs one point.

    Args:
        log_dir: Folder for the event files, the same as Keras's `TensorBoard`
            callback's `log_dir`. Created if missing; must be writable.
        every_steps: Sample every this many steps; `None` (default) samples
            on time only.
        every_seconds: Sample every this many seconds; `None` samples on
            steps only. Defaults to `10.0`.
        detect_stragglers: Whether to look for a straggler replica and name
            it (a warning and `comm/straggler`). The `wait_ms` and
            `slowest_fraction` scalars are logged either way. Defaults to
            `True`.
        straggler_share: Least share of a sample's gradient synchronizations
            at which a replica must be the slowest one, a number `> 0` and
            `<= 1`. Defaults to `0.75`.
        straggler_margin: Least mean wait of the other replicas for it, per
            step, as a share of the step time, a number from `0` to `1`.
            Defaults to `0.05`.
        straggler_samples: Samples in a row both conditions must hold for,
            an `int >= 1`. Defaults to `2`.
        straggler_min_steps: Least synchronizations a sample must have to be
            judged, an `int >= 1`; a sample with fewer neither counts nor
            breaks a run (a short last sample). Defaults to `5`.

    Raises:
        ValueError: For an unwritable `log_dir`, a cadence that is not
            positive, or a straggler threshold out of range.
        TypeError: For arguments of the wrong type.

    Example:

    ```python
    strategy = tfpar.MirroredStrategy()
    with strategy.scope():
        model = build_model()
        model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, callbacks=[CommunicationTime("runs/x", every_steps=50)])
    ```
    """

    def __init__(
        self,
        log_dir: str,
        *,
        every_steps: int | None = None,
        every_seconds: float | None = 10.0,
        detect_stragglers: bool = True,
        straggler_share: float = 0.75,
        straggler_margin: float = 0.05,
        straggler_samples: int = 2,
        straggler_min_steps: int = 5,
    ) -> None:
        super().__init__()
        self.log_dir = check_log_dir(log_dir)
        self.cadence = Cadence(every_steps=every_steps, every_seconds=every_seconds)
        # Checked even when detection is off: a bad value is a mistake anyway.
        detect = check_bool("detect_stragglers", detect_stragglers)
        detector = StragglerDetector(
            share=_check_share(
                "straggler_share", straggler_share, "of the synchronizations"
            ),
            margin=_check_share(
                "straggler_margin", straggler_margin, "of the step time", zero=True
            ),
            samples=check_int("straggler_samples", straggler_samples, minimum=1),
            # A sample with no synchronization has no slowest replica.
            min_steps=check_int("straggler_min_steps", straggler_min_steps, minimum=1),
        )
        self._kind: str | None = None  # the strategy's, once its counters are read
        self._writer = ScalarWriter(
            self.log_dir, describe=lambda tag: describe(tag, self._kind)
        )
        self._trigger = Trigger(self.cadence)
        self._stats: Callable[[], CommunicationStats] | None = None
        self._stragglers = detector if detect else None
        self._warned = False
        self._failed = False
        self._reset_run()

    def _reset_run(self) -> None:
        self._step = 0
        self._first_step = 0
        self._per_call = 1
        self._batch_start = 0.0
        self._busy = 0.0  # seconds inside batches since the last sample
        self._steps = 0  # steps since the last sample
        self._previous: CommunicationStats | None = None
        self._baseline = False
        self._counted = False  # whether any sample of this fit had counters

    def on_train_begin(self, logs: dict | None = None) -> None:
        """Finds the strategy's counters, or says once what cannot be measured."""
        self._reset_run()
        self._trigger = Trigger(self.cadence)
        if self._stragglers is not None:
            self._stragglers.reset()
        self._first_step = optimizer_step(self.model)
        self._per_call = steps_per_call(self.model)
        strategy = self.model.distribute_strategy
        stats = getattr(strategy, "communication_stats", None)
        self._stats = stats if callable(stats) else None
        if self._stats is None and not self._warned:
            self._warned = True
            logger.warning("tfpar CommunicationTime: %s", _unmeasured(strategy))
        self._writer.add_layout(custom_scalars_layout())

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        """Starts the batch's clock."""
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        """Adds the batch's time; takes a sample when the cadence says so."""
        # Runs every step: two clock reads, two additions and one compare;
        # counters are read only when a sample is due.
        elapsed = time.perf_counter() - self._batch_start
        self._step += self._per_call
        if self._baseline:
            self._busy += elapsed
            self._steps += self._per_call
        if self._trigger.due(self._step):
            self._sample()

    def on_train_end(self, logs: dict | None = None) -> None:
        """Writes the steps since the last sample and closes the event file."""
        if self._steps:
            self._sample()
        idle = self._stats is not None and self._baseline and not self._counted
        if idle and not self._failed:
            self._failed = True
            logger.warning(
                "tfpar CommunicationTime: the strategy's communication counters "
                "did not advance during this fit; logged step time only. Logged "
                "once."
            )
        self._writer.close()

    def _sample(self) -> None:
        current = self._read_stats()
        if self._baseline and self._steps:
            step = self._first_step + self._step
            delta = None
            if current is not None and self._previous is not None:
                delta = self._advanced(current.since(self._previous))
            for sample in step_samples(self._busy, self._steps, delta):
                self._writer.add(step, sample.tag, sample.value)
            if delta is not None:
                self._kind = delta.kind
            if delta is not None and self._stragglers is not None:
                step_ms = 1000.0 * self._busy / self._steps
                straggler = self._stragglers.update(delta, step_ms)
                if straggler is not None:
                    logger.warning("tfpar CommunicationTime: %s", straggler.message())
                    self._writer.add_text(step, "comm/straggler", straggler.message())
            self._writer.flush()
        self._baseline = True
        self._previous = current
        self._busy = 0.0
        self._steps = 0

    def _advanced(self, delta: CommunicationStats) -> CommunicationStats | None:
        """Returns `delta`, or `None` when the counters did not move at all.

        No counted step, time or byte over the sample's steps means nothing
        was measured (counters the strategy does not keep for this loop, or,
        under an asynchronous strategy, no step finished yet): logging them
        would show a made-up zero communication time.
        """
        if delta.steps or delta.comm_seconds or delta.bytes_moved:
            self._counted = True
            return delta
        return None

    def _read_stats(self) -> CommunicationStats | None:
        if self._stats is None:
            return None
        try:
            return self._stats()
        except Exception as err:  # never break training over a measurement
            if not self._failed:
                self._failed = True
                logger.warning(
                    "tfpar CommunicationTime: communication_stats() failed "
                    "(%s: %s); logging step time only. Logged once.",
                    type(err).__name__,
                    err,
                )
            return None


def _check_share(name: str, value: object, of: str, *, zero: bool = False) -> float:
    """Checks that `value` is a share (a number up to 1) and returns it.

    Args:
        name: The argument's name.
        value: What the caller passed.
        of: What it is a share of, for the message.
        zero: Whether 0 is allowed (else it must be > 0).

    Raises:
        TypeError: If it is not a number.
        ValueError: If it is not finite, or outside `[0, 1]` (`(0, 1]`).
    """
    number = float(check_number(name, value))
    if not (number >= 0.0 if zero else number > 0.0) or number > 1.0:
        bounds = "from 0 to 1" if zero else "> 0 and <= 1"
        raise value_error(name, value, f"a number {bounds} (a share {of})")
    return number


def _unmeasured(strategy: object) -> str:
    """Says what cannot be measured under a strategy without counters."""
    if _no_strategy(strategy):
        return (
            "the model is under no tf.distribute strategy (one device), so there "
            "is no communication to measure; logging step time only "
            "(comm/step_time_ms)."
        )
    return (
        f"{type(strategy).__name__} has no communication_stats(), so communication time, compute "
        "time, communication fraction, bytes moved and bandwidth cannot be "
        "measured; logging step time only (comm/step_time_ms). Use "
        "tfpar.MirroredStrategy, tfpar.PipelineStrategy or "
        "tfpar.ParameterServerStrategy to measure communication."
    )


def _no_strategy(strategy: object) -> bool:
    """Returns whether `strategy` is TensorFlow's default (no) strategy.

    The default strategy's class is private; this check is public. A model
    built outside any scope has no strategy of its own: Keras gives it the
    current one, which is the default one exactly when no scope is entered.
    """
    return not tf.distribute.has_strategy() and strategy is tf.distribute.get_strategy()


def step_samples(
    busy_seconds: float, steps: int, delta: CommunicationStats | None
) -> list[Sample]:
    """Turns measured step time and a counter delta into per-step samples.

    The one place where communication arithmetic is done. Every number is a
    counter divided by the steps it was counted over, or one of the two
    definitions `comm/compute_ms = step_time_ms - time_ms` and
    `comm/fraction = time_ms / step_time_ms`; nothing is clamped.

    Args:
        busy_seconds: Wall time spent inside the measured batches.
        steps: Steps measured (`> 0`).
        delta: Counters accumulated over the same steps
            (`later.since(earlier)`), or `None` when the strategy has none.

    Returns:
        The samples, tags as documented in `CommunicationTime`.

    Example:

    ```python
    delta = tfpar.CommunicationStats("allreduce", steps=10, comm_seconds=0.02,
                                     bytes_moved=4_000_000)
    step_samples(0.1, 10, delta)  # step 10 ms, comm 2 ms, fraction 0.2, ...
    ```
    """
    step_ms = 1000.0 * busy_seconds / steps
    samples = [Sample("comm/step_time_ms", step_ms)]
    if delta is None:
        return samples
    # The strategy's own step count, when it has one, is the right divisor for
    # its counters (a pipeline step may not be one Keras batch).
    counted = delta.steps if delta.steps > 0 else steps
    if delta.kind == "parameter_server":
        # Communication happens inside the workers' steps there, unmeasured:
        # what is logged is named for what it is.
        dispatch = sum(d.dispatch_seconds for d in delta.devices)
        samples.append(Sample("comm/dispatch_ms", 1000.0 * dispatch / counted))
    else:
        comm_ms = 1000.0 * delta.comm_seconds / counted
        samples += [
            Sample("comm/time_ms", comm_ms),
            Sample("comm/compute_ms", step_ms - comm_ms),
            Sample("comm/fraction", comm_ms / step_ms),
        ]
    # Zero bytes over measured steps: a strategy that counts none (the
    # parameter-server one), left out rather than logged as a made-up zero.
    if delta.bytes_moved > 0:
        samples.append(Sample("comm/bytes_per_step", delta.bytes_moved / counted))
        if delta.comm_seconds > 0:
            bandwidth = delta.bytes_moved / delta.comm_seconds / _MIB
            samples.append(Sample("comm/bandwidth_mib_per_s", bandwidth))
    return samples + _device_samples(delta, counted)


def _device_samples(delta: CommunicationStats, counted: int) -> list[Sample]:
    """Per-device samples: each counter the strategy keeps, per step."""
    idle = "bubble_ms" if delta.kind == "pipeline" else "idle_ms"
    sent = "bytes_sent_per_step"
    if "bytes_sent" in delta.modelled:
        sent = "modelled_" + sent
    # (counter, tag suffix, scale), per device in this process.
    fields = [
        ("busy_seconds", "busy_ms", 1000.0),
        ("comm_seconds", "comm_ms", 1000.0),
        ("idle_seconds", idle, 1000.0),
        ("bytes_sent", sent, 1.0),
        ("dispatch_seconds", "dispatch_ms", 1000.0),
        ("reduce_seconds", "reduce_ms", 1000.0),
        ("reduce_bytes_sent", "reduce_bytes_per_step", 1.0),
    ]
    samples = []
    for counter, suffix, scale in fields:
        if counter not in delta.counters:
            continue
        for device in delta.devices:
            if device.in_process:
                tag = f"comm/device/{device_label(device.device)}/{suffix}"
                samples.append(Sample(tag, scale * getattr(device, counter) / counted))
    # Waits are known for every replica of the group, other processes' too.
    syncs = sum(d.slowest_steps for d in delta.devices)
    if "wait_seconds" in delta.counters and syncs:
        for device in delta.devices:
            label = device_label(device.device)
            wait_ms = 1000.0 * device.wait_seconds / counted
            samples += [
                Sample(f"comm/device/{label}/wait_ms", wait_ms),
                Sample(
                    f"comm/device/{label}/slowest_fraction",
                    device.slowest_steps / syncs,
                ),
            ]
    return samples
