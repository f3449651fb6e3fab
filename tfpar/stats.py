"""Communication counters that tfpar strategies expose to the callbacks.

Every tfpar strategy has a `communication_stats()` method returning a
`CommunicationStats` snapshot of cumulative counters. A reader (for example
`tfpar.callbacks.CommunicationTime`) takes two snapshots and subtracts them
with `later.since(earlier)` to get what happened in between. Cumulative
counters make sampling cheap and lossless: nothing is dropped between two
reads, however rarely they happen.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DeviceCommunication:
    """Cumulative counters for one device (a replica, a pipeline stage, a worker).

    Which counters a strategy keeps is listed in
    `CommunicationStats.counters`, and what exactly each one measures is said
    by that strategy's `communication_stats()`; a counter a strategy does not
    keep stays 0.

    Attributes:
        device: Canonical device name.
        busy_seconds: Time the device spent computing.
        idle_seconds: Time the device waited (for a pipeline stage: its bubble).
        comm_seconds: Time the device spent sending or receiving.
        bytes_sent: Bytes the device sent to other devices.
        wait_seconds: Time the replica waited at the gradient synchronization
            for slower replicas (synchronous data-parallel strategies).
        slowest_steps: Synchronizations at which this replica was the slowest,
            the one the others waited for.
        dispatch_seconds: Wall time of the device's scheduled functions, as
            the coordinator saw it, beyond their time on the device (the
            parameter-server strategy).
        in_process: `False` for a replica of another process, of which only
            `wait_seconds` and `slowest_steps` are known here.
        reduce_seconds: Exposed time of the gradient reduction among a
            pipeline stage's replicas (and of the weight copies it receives),
            apart from `comm_seconds`.
        reduce_bytes_sent: Bytes the device sent for that reduction (summed
            gradients, or weight copies), apart from `bytes_sent`.
        replica_group: For a pipeline stage's replica, its replica group (the
            devices, one per stage, that run the same micro-batches), which
            waits and is late as one; `None` where each replica is its own.
    """

    device: str
    busy_seconds: float = 0.0
    idle_seconds: float = 0.0
    comm_seconds: float = 0.0
    bytes_sent: int = 0
    wait_seconds: float = 0.0
    slowest_steps: int = 0
    dispatch_seconds: float = 0.0
    in_process: bool = True
    reduce_seconds: float = 0.0
    reduce_bytes_sent: int = 0
    replica_group: int | None = None

    def since(self, earlier: DeviceCommunication) -> DeviceCommunication:
        """Returns the counters accumulated after `earlier` was taken."""
        return DeviceCommunication(
            device=self.device,
            busy_seconds=self.busy_seconds - earlier.busy_seconds,
            idle_seconds=self.idle_seconds - earlier.idle_seconds,
            comm_seconds=self.comm_seconds - earlier.comm_seconds,
            bytes_sent=self.bytes_sent - earlier.bytes_sent,
            wait_seconds=self.wait_seconds - earlier.wait_seconds,
            slowest_steps=self.slowest_steps - earlier.slowest_steps,
            dispatch_seconds=self.dispatch_seconds - earlier.dispatch_seconds,
            in_process=self.in_process,
            reduce_seconds=self.reduce_seconds - earlier.reduce_seconds,
            reduce_bytes_sent=self.reduce_bytes_sent - earlier.reduce_bytes_sent,
            replica_group=self.replica_group,
        )


@dataclasses.dataclass(frozen=True)
class CommunicationStats:
    """Cumulative communication counters of a strategy since it was created.

    Attributes:
        kind: What is counted: `"allreduce"` (gradient reductions of a
            mirrored strategy), `"pipeline"` (stage-boundary transfers) or
            `"parameter_server"` (scheduled step functions on the workers;
            no communication time is measured there, see
            `ParameterServerStrategy.communication_stats`).
        steps: Training steps measured.
        comm_seconds: Exposed communication time (not hidden behind
            computation), summed over steps; 0 where not measured.
        calls: Communication calls (reductions, transfers, RPCs).
        bytes_logical: Bytes the model asked to move (before compression).
        bytes_moved: Bytes actually moved (after compression).
        devices: Per-device counters, where the strategy has them.
        counters: Names of the `DeviceCommunication` counters the strategy
            keeps (`"busy_seconds"`, `"wait_seconds"`, ...); the others stay
            0 and mean nothing.
        modelled: Names of the `DeviceCommunication` counters that are
            computed from a model of the algorithm rather than measured or
            counted (the mirrored strategies' `"bytes_sent"`, from the ring's
            routing).

    Example:

    ```python
    before = strategy.communication_stats()
    model.fit(x, y, epochs=1)
    delta = strategy.communication_stats().since(before)
    print(f"{1000 * delta.comm_seconds / max(delta.steps, 1):.2f} ms per step")
    ```
    """

    kind: str
    steps: int = 0
    comm_seconds: float = 0.0
    calls: int = 0
    bytes_logical: int = 0
    bytes_moved: int = 0
    devices: tuple[DeviceCommunication, ...] = ()
    counters: tuple[str, ...] = ()
    modelled: tuple[str, ...] = ()

    def since(self, earlier: CommunicationStats) -> CommunicationStats:
        """Returns the counters accumulated after `earlier` was taken.

        Args:
            earlier: A snapshot from the same strategy, taken before this one.

        Returns:
            A `CommunicationStats` holding the differences.

        Raises:
            ValueError: If the snapshots are of different kinds.
        """
        if earlier.kind != self.kind:
            raise ValueError(
                f"Cannot subtract a {earlier.kind!r} snapshot from a {self.kind!r} one."
            )
        before = {d.device: d for d in earlier.devices}
        return CommunicationStats(
            kind=self.kind,
            steps=self.steps - earlier.steps,
            comm_seconds=self.comm_seconds - earlier.comm_seconds,
            calls=self.calls - earlier.calls,
            bytes_logical=self.bytes_logical - earlier.bytes_logical,
            bytes_moved=self.bytes_moved - earlier.bytes_moved,
            devices=tuple(
                d.since(before[d.device]) if d.device in before else d
                for d in self.devices
            ),
            counters=self.counters,
            modelled=self.modelled,
        )
