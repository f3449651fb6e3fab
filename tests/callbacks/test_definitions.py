"""Every tag the callbacks can log has a definition that says what kind of number it is."""

import pytest

from tfpar.callbacks.communication_time import step_samples
from tfpar.callbacks.definitions import describe
from tfpar.stats import CommunicationStats, DeviceCommunication

KINDS_OF_NUMBER = ("Measured", "Counted", "Computed", "Modelled")
EVERY_COUNTER = (
    "busy_seconds",
    "comm_seconds",
    "idle_seconds",
    "bytes_sent",
    "wait_seconds",
    "slowest_steps",
    "dispatch_seconds",
    "reduce_seconds",
    "reduce_bytes_sent",
)


def _everything(kind: str, modelled: tuple[str, ...]) -> CommunicationStats:
    device = DeviceCommunication(
        "/device:CPU:0",
        1.0,
        1.0,
        1.0,
        8,
        1.0,
        1,
        dispatch_seconds=1.0,
        reduce_seconds=1.0,
        reduce_bytes_sent=8,
    )
    # The parameter-server strategy measures no communication time and
    # counts no bytes.
    measures = kind != "parameter_server"
    return CommunicationStats(
        kind=kind,
        steps=2,
        comm_seconds=1.0 if measures else 0.0,
        bytes_moved=8 if measures else 0,
        devices=(device,),
        counters=EVERY_COUNTER,
        modelled=modelled,
    )


@pytest.mark.parametrize(
    ("kind", "modelled"),
    [("allreduce", ("bytes_sent",)), ("pipeline", ()), ("parameter_server", ())],
)
def test_every_communication_tag_is_defined_under_each_strategy(kind, modelled):
    for sample in step_samples(1.0, 2, _everything(kind, modelled)):
        assert describe(sample.tag, kind).startswith(KINDS_OF_NUMBER), sample.tag


@pytest.mark.parametrize(
    ("tag", "context", "word"),
    [
        ("device/CPU:1/utilization", "profiler", "profiler"),
        ("device/GPU:0/utilization", "nvml", "NVML"),
        ("comm/device/CPU:0/modelled_bytes_sent_per_step", "allreduce", "Modelled"),
        ("comm/time_ms", "pipeline", "stage"),
        ("comm/time_ms", "allreduce", "all-reduce"),
    ],
)
def test_definitions_follow_the_source(tag, context, word):
    assert word in describe(tag, context)


def test_an_unknown_tag_has_no_definition():
    assert describe("epoch_loss") == ""
    # Not measured under the parameter-server strategy, so not defined there.
    assert describe("comm/time_ms", "parameter_server") == ""
