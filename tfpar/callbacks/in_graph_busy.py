"""Utilization from a strategy's in-graph busy time, where no profiler sees.

This process's profiler cannot see ops that run in another process (the
stages of a `tfpar.PipelineStrategy`, the replicas of a single-client
`tfpar.MirroredStrategy` on cluster workers), and traces nothing under a
multi-worker strategy. The tfpar strategies measure each device's busy time
themselves, with timestamps in the step's graph on the device's host;
divided by the training steps' wall time, it is that device's utilization,
whatever process it is in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from tfpar.callbacks.sources import Sample
from tfpar.callbacks.summaries import device_label
from tfpar.stats import CommunicationStats


class InGraphBusy:
    """`device/<d>/utilization` from the strategy's `busy_seconds` counters.

    Utilization is the busy time the strategy counted since the previous
    read over the wall time of the training steps in between (batch start to
    batch end in this process, so epoch ends and validation do not count).
    Under the asynchronous parameter-server strategy, whose steps Keras's
    batches here only schedule, it is over the wall time between the reads:
    the share of time a worker ran training functions. The first step,
    which traces the step function, is left out.

    Args:
        stats: The strategy's `communication_stats`.
        devices: The devices to report, among those it counts busy time for.
        per_wall: Divide by the wall time between reads rather than by the
            training steps'. Defaults to `False`.

    Example:

    ```python
    busy = InGraphBusy(strategy.communication_stats, [worker_0, worker_1])
    busy.begin_step(); ...; busy.end_step()   # around each training step
    busy.read()  # [Sample('device/worker:0/CPU:0/utilization', 71.2), ...]
    ```
    """

    def __init__(
        self,
        stats: Callable[[], CommunicationStats],
        devices: Sequence[str],
        *,
        per_wall: bool = False,
    ) -> None:
        self._stats = stats
        self.devices = tuple(devices)
        self.per_wall = per_wall
        self._previous: CommunicationStats | None = None  # after the first step
        self._wall = 0.0
        self._started = 0.0
        self._read_at = 0.0

    @classmethod
    def covering(
        cls,
        stats: Callable[[], CommunicationStats],
        wanted: Callable[[str], bool],
    ) -> InGraphBusy | None:
        """Returns a source for the `wanted` devices whose busy time the strategy
        counts in the step's graph.

        Args:
            stats: The strategy's `communication_stats`.
            wanted: Whether to report a device, by its canonical name.

        Returns:
            The source, or `None` if the strategy keeps no busy time of any
            wanted device in this process's counters.
        """
        current = stats()
        if "busy_seconds" not in current.counters:
            return None
        # Another worker's replica, known here by its wait only, is not one.
        devices = [
            d.device for d in current.devices if d.in_process and wanted(d.device)
        ]
        per_wall = current.kind == "parameter_server"
        return cls(stats, devices, per_wall=per_wall) if devices else None

    def begin_step(self) -> None:
        """Starts a training step's clock."""
        self._started = time.perf_counter()

    def end_step(self) -> None:
        """Adds the step's wall time; the first step only sets the baseline."""
        if self._previous is None:
            self._previous = self._stats()
            self._read_at = time.perf_counter()
            return
        self._wall += time.perf_counter() - self._started

    def read(self) -> list[Sample]:
        """Returns each device's utilization (%) since the previous read."""
        if self._previous is None:
            return []
        current = self._stats()
        now = time.perf_counter()
        delta = current.since(self._previous)
        wall = now - self._read_at if self.per_wall else self._wall
        self._wall, self._previous, self._read_at = 0.0, current, now
        if wall <= 0.0 or delta.steps <= 0:
            return []
        busy = {d.device: d.busy_seconds for d in delta.devices}
        return [
            Sample(f"device/{device_label(d)}/utilization", 100.0 * busy[d] / wall)
            for d in self.devices
        ]
