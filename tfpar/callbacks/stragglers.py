"""Naming the replica the others wait for, from the strategies' wait counters.

The synchronous strategies count, per replica, how long it waited at each
gradient synchronization for the slowest replica and how often it was that
slowest one (`tfpar.DeviceCommunication.wait_seconds`, `slowest_steps`).
Identical replicas take turns at being the slowest by a hair; a straggler is
the slowest at nearly every synchronization while the others wait a real
share of the step for it, sample after sample.
"""

from __future__ import annotations

import dataclasses

from tfpar.callbacks.summaries import device_label
from tfpar.stats import CommunicationStats


@dataclasses.dataclass(frozen=True)
class Straggler:
    """A replica the others waited for, over one sample.

    Attributes:
        device: Its canonical device name.
        slowest_share: Share of the sample's synchronizations at which it was
            the slowest replica.
        others_wait_ms: Per step, the mean wait for it of the replicas that
            waited: every other one, or, among a pipeline's stage replicas,
            those of the other replica groups (its own group is late with
            it).
        step_ms: The sample's mean step time.

    Example:

    ```python
    Straggler("/job:worker/replica:0/task:1/device:CPU:0", 0.95, 41.0, 120.0).message()
    ```
    """

    device: str
    slowest_share: float
    others_wait_ms: float
    step_ms: float

    def message(self) -> str:
        """Says who, how often, and what it costs."""
        share = self.others_wait_ms / self.step_ms if self.step_ms > 0 else 0.0
        return (
            f"{device_label(self.device)} is a straggler: it was the slowest replica "
            f"at {self.slowest_share:.0%} of the gradient synchronizations, and the "
            f"other replicas waited {self.others_wait_ms:.1f} ms per step for it "
            f"({share:.0%} of a {self.step_ms:.1f} ms step). Look for another load "
            "on its device or host, a slower device, or a larger share of the "
            "input on that replica."
        )


class StragglerDetector:
    """Finds a replica that is persistently the slowest by a margin.

    A replica is named when, in `samples` consecutive samples of at least
    `min_steps` synchronizations each, it was the slowest at `share` or more
    of them and the mean wait for it of the replicas that waited
    (`Straggler.others_wait_ms`) was at least `margin` of the step time.
    Each replica is named once, until `reset`.

    Args:
        share: Least share of synchronizations it must be the slowest at.
        margin: Least mean wait of the others, as a share of the step time.
        samples: Consecutive samples the condition must hold for.
        min_steps: Samples with fewer synchronizations neither count nor
            break a run.

    Example:

    ```python
    detector = StragglerDetector()
    found = detector.update(delta, step_ms=120.0)  # a Straggler or None
    ```
    """

    def __init__(
        self,
        *,
        share: float = 0.75,
        margin: float = 0.05,
        samples: int = 2,
        min_steps: int = 5,
    ) -> None:
        self.share = share
        self.margin = margin
        self.samples = samples
        self.min_steps = min_steps
        self.reset()

    def reset(self) -> None:
        """Forgets the runs and the replicas named (a new `fit`)."""
        self._candidate: str | None = None
        self._run = 0
        self._named: set[str] = set()

    def update(self, delta: CommunicationStats, step_ms: float) -> Straggler | None:
        """Takes one sample's counters; returns a straggler when one is first found.

        Args:
            delta: The counters accumulated over the sample.
            step_ms: The sample's mean step time, in milliseconds.

        Returns:
            The replica found in this sample, or `None`.
        """
        syncs = sum(d.slowest_steps for d in delta.devices)
        if len(delta.devices) < 2 or syncs < self.min_steps:
            return None
        slowest = max(delta.devices, key=lambda d: d.slowest_steps)
        # A pipeline's replica group is late as one: its own devices did not
        # wait for it.
        others = [
            d
            for d in delta.devices
            if d is not slowest
            and (d.replica_group is None or d.replica_group != slowest.replica_group)
        ]
        if not others:
            return None
        share = slowest.slowest_steps / syncs
        waited_ms = 1000.0 * sum(d.wait_seconds for d in others) / len(others) / syncs
        if share < self.share or waited_ms < self.margin * step_ms:
            self._candidate, self._run = None, 0
            return None
        if slowest.device != self._candidate:
            self._candidate, self._run = slowest.device, 0
        self._run += 1
        if self._run < self.samples or slowest.device in self._named:
            return None
        self._named.add(slowest.device)
        return Straggler(slowest.device, share, waited_ms, step_ms)
