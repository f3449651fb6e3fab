"""The counter sources of one `fit`: which to open, reading them, failing softly.

`DeviceUtilization` reads every source each time a window closes. A source
that fails to open or to read is reported once (through `on_error`) and
skipped: training never stops because a counter broke. Which sources open
depends on the metrics asked for and on the devices reported: the host
always has counters, GPUs have TensorFlow's allocator and NVML, CPUs neither
(their memory is the host's, their utilization comes from traces).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tfpar.callbacks.sources import (
    HostSource,
    NvmlSource,
    Sample,
    Source,
    TensorFlowMemorySource,
)

# Called with the failing source's name and the exception.
OnError = Callable[[str, BaseException], None]


class SourceGroup:
    """Opens counter sources, reads them together and closes them.

    Args:
        on_error: Called with a source's name and the exception when it fails
            to open or to read. The source is skipped that time (a source that
            failed to open, for good).

    Example:

    ```python
    sources = SourceGroup(on_error=lambda name, err: print(name, err))
    sources.open(HostSource.name, HostSource)
    samples = sources.read()  # [Sample('host/rss_mib', 812.5), ...]
    sources.close()
    ```
    """

    def __init__(self, *, on_error: OnError) -> None:
        self._on_error = on_error
        self._sources: list[Source] = []

    @classmethod
    def for_metrics(
        cls, metrics: Sequence[str], devices: Sequence[str], *, on_error: OnError
    ) -> SourceGroup:
        """Opens the sources that `metrics` need for `devices`.

        Args:
            metrics: Names from `"utilization"`, `"memory"`, `"host"`.
            devices: Canonical names of the devices reported.
            on_error: As for the constructor.

        Returns:
            The group, its sources open (those that could be).
        """
        group = cls(on_error=on_error)
        gpus = [d for d in devices if "GPU" in d]
        if "host" in metrics:
            group.open(HostSource.name, HostSource)
        if "memory" in metrics and gpus:
            group.open(
                TensorFlowMemorySource.name, lambda: TensorFlowMemorySource(gpus)
            )
        if "utilization" in metrics and gpus:
            group.open(NvmlSource.name, lambda: NvmlSource(gpus))
        return group

    def open(self, name: str, make: Callable[[], Source]) -> None:
        """Opens one source, or reports why it could not be opened.

        Args:
            name: The source's name, for the report.
            make: Opens the source.
        """
        try:
            self._sources.append(make())
        except Exception as err:  # never break training over a measurement
            self._on_error(name, err)

    def read(self) -> list[Sample]:
        """Reads every source, skipping (and reporting) one that fails.

        Returns:
            The samples of the sources that could be read, in opening order.
        """
        samples = []
        for source in self._sources:
            try:
                samples += source.read()
            except Exception as err:  # never break training over a measurement
                self._on_error(source.name, err)
        return samples

    def close(self) -> None:
        """Closes every source."""
        for source in self._sources:
            source.close()
