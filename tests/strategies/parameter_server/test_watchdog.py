"""StepTracker: deadlines, joins and error naming, without a cluster.

A stub stands in for `ClusterCoordinator`: the tracker only calls its
`done()`, which returns or raises the first error of a scheduled function.
"""

import contextlib
import socket
import threading
import time

import pytest
import tensorflow as tf

from tfpar.strategies.parameter_server.watchdog import (
    ClusterTaskError,
    StepDeadlineExceededError,
    StepTracker,
    silent_servers,
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


def test_work_that_no_worker_picks_up_past_the_deadline_names_every_worker():
    # A coordinator thread blocked between two functions (inside TensorFlow,
    # on a frozen worker) runs nothing: no function is past the deadline,
    # yet scheduled work waits forever.
    # Both ports refuse connections: no server is silent, so both are named.
    t = StepTracker([f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"], 0.2, {})
    for _ in range(3):
        t.scheduled()
    t.finish(0, t.start(0), steps=1, device_seconds=0.0, logs=None)
    start = time.monotonic()
    with pytest.raises(StepDeadlineExceededError) as info:
        t.join(StubCoordinator())
    assert 0.2 <= time.monotonic() - start < 1.0
    assert info.value.tasks == (
        "/job:worker/replica:0/task:0",
        "/job:worker/replica:0/task:1",
    )
    assert str(info.value).startswith(
        "2 scheduled function(s) wait, but no worker started or finished one"
    )


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def servers():
    """A live server (answers every connection), a frozen one (its kernel
    accepts connections, nobody reads them) and a dead port."""
    live, frozen = socket.socket(), socket.socket()
    for server in (live, frozen):
        server.bind(("127.0.0.1", 0))
        server.listen(8)

    def answer():
        with contextlib.suppress(OSError):
            while True:
                conn, _ = live.accept()
                conn.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
                conn.close()

    threading.Thread(target=answer, daemon=True).start()
    addresses = [f"127.0.0.1:{s.getsockname()[1]}" for s in (live, frozen)]
    yield [*addresses, f"127.0.0.1:{free_port()}"]
    live.close()
    frozen.close()


def test_only_servers_that_accept_but_never_answer_are_silent(servers):
    start = time.monotonic()
    assert silent_servers(servers, 0.3) == [1]
    assert 0.3 <= time.monotonic() - start < 1.0
    assert silent_servers([servers[0], servers[2]], 0.3) == []


@pytest.mark.parametrize("late", [[0], [0, 1]])
def test_the_frozen_worker_is_told_apart_by_a_probe_of_the_servers(servers, late):
    # Functions run past the deadline, but only worker 1's server is silent:
    # a frozen worker (or a lock it holds) can make another one late.
    t = StepTracker(servers[:2], 0.2, {})
    for worker in late:
        t.scheduled()
        t.start(worker)
    with pytest.raises(StepDeadlineExceededError) as info:
        t.join(StubCoordinator())
    assert info.value.tasks == ("/job:worker/replica:0/task:1",)


def test_a_silent_worker_stops_a_function_registration(servers):
    t = StepTracker(servers[:2], 0.2, {})
    with pytest.raises(StepDeadlineExceededError) as info:
        t.check_workers_answer()
    assert info.value.tasks == ("/job:worker/replica:0/task:1",)
    assert "Before registering a new TensorFlow function" in str(info.value)
    StepTracker([servers[0], servers[2]], 0.2, {}).check_workers_answer()


def test_steady_progress_never_trips_the_deadline():
    # Each function is shorter than the deadline, the whole join is longer.
    t = tracker(deadline=0.2)
    for _ in range(6):
        t.scheduled()

    def work():
        for i in range(6):
            started = t.start(i % 2)
            time.sleep(0.1)
            t.finish(i % 2, started, steps=1, device_seconds=0.0, logs=None)

    thread = threading.Thread(target=work)
    thread.start()
    t.join(StubCoordinator())
    thread.join()
    assert t.in_flight == 0
