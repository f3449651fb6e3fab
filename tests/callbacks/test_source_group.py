"""Tests for tfpar.callbacks.source_group: opening and reading counter sources."""

from tfpar.callbacks.source_group import SourceGroup
from tfpar.callbacks.sources import Sample


class FakeSource:
    name = "fake"

    def __init__(self, value: float, *, broken: bool = False) -> None:
        self.value, self.broken, self.closed = value, broken, False

    def read(self) -> list[Sample]:
        if self.broken:
            raise OSError("gone")
        return [Sample("fake/value", self.value)]

    def close(self) -> None:
        self.closed = True


def test_failing_sources_are_reported_and_skipped() -> None:
    errors: list[tuple[str, str]] = []
    group = SourceGroup(on_error=lambda name, err: errors.append((name, str(err))))
    good, bad = FakeSource(1.0), FakeSource(2.0, broken=True)
    group.open("good", lambda: good)
    group.open("bad", lambda: bad)
    group.open("unopenable", lambda: 1 / 0)
    assert group.read() == [Sample("fake/value", 1.0)]
    assert errors == [("unopenable", "division by zero"), ("fake", "gone")]
    group.close()
    assert good.closed and bad.closed


def test_for_metrics_opens_what_the_metrics_need_for_the_devices() -> None:
    def tags(metrics: tuple[str, ...]) -> set[str]:
        cpus = ["/device:CPU:0", "/device:CPU:1"]
        group = SourceGroup.for_metrics(metrics, cpus, on_error=print)
        try:
            return {sample.tag for sample in group.read()}
        finally:
            group.close()

    # CPUs have neither allocator statistics nor NVML: only the host counts.
    assert tags(("utilization", "memory", "host")) >= {
        "host/rss_mib",
        "host/peak_rss_mib",
    }
    assert tags(("utilization", "memory")) == set()
