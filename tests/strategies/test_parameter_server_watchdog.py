"""StepTracker: deadlines, joins and error naming, without a cluster.

A stub stands in for `ClusterCoordinator`: the tracker only calls its
`done()`, which returns or raises the first error of a scheduled function.
"""

import threading
import time

import pytest
import tensorflow as tf

from tfpar.strategies.ps_watchdog import (
    ClusterTaskError,
    StepDeadlineExceededError,
    StepTracker,
)

TASKS = {
    "/job:worker/replica:0/task:0": "10.0.0.1:2222",
    "/job:worker/replica:0/task:1": "10.0.0.2:2222",
    "/job:ps/replica:0/task:0": "10.0.0.3:2222",
}


class StubCoordinator:
    def __init__(self, error=None):
        self.error = error

    def done(self):
        if self.error is not None:
            raise self.error
        return True


def tracker(deadline=None):
    return StepTracker(["10.0.0.1:2222", "10.0.0.2:2222"], deadline, TASKS)


def test_join_waits_for_every_scheduled_function_and_counts_per_worker():
    t = tracker()
    for _ in range(3):
        t.scheduled()

    def work():
        for worker in (0, 1, 0):
            started = t.start(worker)
            time.sleep(0.05)
            t.finish(worker, started, steps=2, device_seconds=0.01, logs={"loss": 1.0})

    thread = threading.Thread(target=work)
    thread.start()
    t.join(StubCoordinator())
    thread.join()
    assert t.in_flight == 0
    assert [r.steps for r in t.records] == [4, 2]
    assert [r.closures for r in t.records] == [2, 1]
    assert all(r.wall_seconds >= r.device_seconds > 0 for r in t.records)
    assert t.latest_logs == {"loss": 1.0}


def test_a_function_running_past_the_deadline_names_its_worker():
    t = tracker(deadline=0.2)
    t.scheduled()
    t.scheduled()
    t.finish(0, t.start(0), steps=1, device_seconds=0.0, logs=None)
    t.start(1)  # never finishes: a frozen worker
    start = time.monotonic()
    with pytest.raises(StepDeadlineExceededError) as info:
        t.join(StubCoordinator())
    assert 0.2 <= time.monotonic() - start < 1.0
    assert info.value.tasks == ("/job:worker/replica:0/task:1",)
    assert "/job:worker/replica:0/task:1 (10.0.0.2:2222)" in str(info.value)
    assert "task:0" not in str(info.value)


def test_without_a_deadline_a_failed_function_still_ends_the_wait():
    t = tracker()
    t.scheduled()
    t.start(0)
    t.fail(0)
    error = tf.errors.UnavailableError(
        None,
        None,
        "Graph execution error:\n\nfailed to connect to all addresses while "
        "calling /job:ps/replica:0/task:0",
    )
    with pytest.raises(ClusterTaskError) as info:
        t.join(StubCoordinator(error))
    assert info.value.task == "/job:ps/replica:0/task:0"
    message = str(info.value)
    assert message.startswith(
        "UnavailableError from /job:ps/replica:0/task:0 (10.0.0.3:2222): failed"
    )
    assert "BackupAndRestore" in message
    assert t.records[0].failures == 1
    assert t.in_flight == 0  # the coordinator dropped the rest


def test_errors_naming_only_an_address_or_nothing():
    t = tracker()
    by_address = t.describe(
        tf.errors.UnavailableError(None, None, "10.0.0.2:2222 down")
    )
    assert by_address.task == "/job:worker/replica:0/task:1"
    unknown = t.describe(tf.errors.InternalError(None, None, "something broke"))
    assert unknown.task is None
    assert "from a cluster task: something broke" in str(unknown)
