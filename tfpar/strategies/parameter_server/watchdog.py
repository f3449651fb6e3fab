"""Step bookkeeping for parameter-server training: progress, deadlines, errors.

`tf.distribute.coordinator.ClusterCoordinator` runs each scheduled function
on one of its worker threads and offers only blocking waits (`join`,
`RemoteValue.fetch`) without a timeout: a frozen worker (SIGSTOP, a hung
host) makes them wait forever. tfpar therefore schedules a small Python
closure around each step function; the closure reports to a `StepTracker`
when it starts and ends on which worker, and the coordinator thread waits on
the tracker with a deadline instead of calling `join()`. Three checks raise
`StepDeadlineExceededError`: a function running for longer than the
deadline; scheduled work on which no worker started or finished anything for
longer than the deadline (a thread blocked inside TensorFlow between two
functions); and, before a new function is registered with every worker
(which TensorFlow does holding the GIL), a worker whose server does not
answer. The frozen worker is told from merely late ones by probing each
worker's gRPC server from plain Python (`silent_servers`).

The same records give per-worker step counts and times for
`ParameterServerStrategy.communication_stats()`.
"""

from __future__ import annotations

import dataclasses
import re
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import tensorflow as tf

from tfpar.errors import ClusterTaskError, StepDeadlineExceededError

# How often a waiting coordinator wakes up to check deadlines and errors.
_POLL_SECONDS = 0.05
# Workers that answered a probe this recently are not probed again.
_PROBE_INTERVAL_SECONDS = 0.1
# How long the probe that tells a frozen worker from late ones waits (a
# live server answers within milliseconds).
_PROBE_SECONDS = 0.5


@dataclasses.dataclass
class WorkerRecord:
    """Cumulative counters of one worker, updated by the coordinator threads.

    Attributes:
        steps: Training steps completed on the worker.
        closures: Scheduled functions completed on the worker.
        wall_seconds: Wall time of its training functions, measured on the
            coordinator from dispatch to results back.
        device_seconds: Time between the first and the last op of each
            training function, measured in the graph on the worker
            (`tf.timestamp`).
        running_since: Monotonic start time of the function now running on
            the worker, or `None` when it is idle.
        failures: Scheduled functions that failed on the worker (and that the
            coordinator ran again elsewhere).
    """

    steps: int = 0
    closures: int = 0
    wall_seconds: float = 0.0
    device_seconds: float = 0.0
    running_since: float | None = None
    failures: int = 0


class StepTracker:
    """Thread-safe record of scheduled work, per worker.

    Args:
        workers: Address of each worker task, in task order.
        step_deadline: Seconds a scheduled function may run on one worker,
            and seconds scheduled work may wait while no worker starts or
            finishes one, before waits raise `StepDeadlineExceededError`;
            `None` waits forever, like TensorFlow.
        tasks: Every task of the cluster (`"/job:ps/replica:0/task:0"` to its
            address), to name failed tasks in errors.
    """

    def __init__(
        self,
        workers: Sequence[str],
        step_deadline: float | None,
        tasks: Mapping[str, str],
    ) -> None:
        self.workers = tuple(workers)
        self.step_deadline = step_deadline
        self.tasks = dict(tasks)
        self.records = [WorkerRecord() for _ in self.workers]
        self.latest_logs: dict[str, Any] | None = None
        self._scheduled = 0
        self._finished = 0
        # Latest start, end or failure of a function, or the moment work
        # became pending: the stall rule measures from there.
        self._last_progress = time.monotonic()
        self._last_answer = -float("inf")  # latest probe every worker answered
        # The workers the latest probe found silent, and when: the checks of
        # the other in-flight closures reuse that verdict for a deadline
        # rather than each waiting a deadline of its own.
        self._found_silent: tuple[list[int], float] | None = None
        self._condition = threading.Condition()

    # Called on the coordinator's worker threads.

    def start(self, worker: int) -> float:
        """Marks a function as running on `worker`; returns its start time."""
        now = time.monotonic()
        with self._condition:
            self.records[worker].running_since = now
            self._last_progress = now
        return now

    def finish(
        self,
        worker: int,
        started: float,
        *,
        steps: int,
        device_seconds: float | None,
        logs: dict[str, Any] | None,
    ) -> None:
        """Records a function that completed on `worker`.

        `device_seconds` is `None` for a function that is not timed (only
        training functions are: the counters describe training steps).
        """
        with self._condition:
            record = self.records[worker]
            record.running_since = None
            record.steps += steps
            record.closures += 1
            if device_seconds is not None:
                record.wall_seconds += time.monotonic() - started
                record.device_seconds += device_seconds
            self._finished += 1
            self._last_progress = time.monotonic()
            if logs is not None:
                self.latest_logs = logs
            self._condition.notify_all()

    def fail(self, worker: int) -> None:
        """Records a function that failed on `worker` (it may run again)."""
        with self._condition:
            self.records[worker].running_since = None
            self.records[worker].failures += 1
            self._last_progress = time.monotonic()
            self._condition.notify_all()

    # Called on the coordinator (the main thread).

    def scheduled(self) -> None:
        """Counts one scheduled function."""
        with self._condition:
            if self._scheduled == self._finished:
                self._last_progress = time.monotonic()
            self._scheduled += 1

    @property
    def in_flight(self) -> int:
        """Scheduled functions not finished yet."""
        with self._condition:
            return self._scheduled - self._finished

    def wait(
        self,
        coordinator: tf.distribute.coordinator.ClusterCoordinator,
        until: Callable[[], bool],
    ) -> None:
        """Waits until `until()` holds, checking deadlines and task errors.

        Raises:
            StepDeadlineExceededError: If a function runs longer than the
                step deadline, or scheduled work waits that long while no
                worker starts or finishes one; the message names the workers
                whose servers do not answer, else the late ones (all of
                them when none runs a function).
            ClusterTaskError: If a scheduled function failed; the message
                names the failed task when TensorFlow's error does.
        """
        while True:
            with self._condition:
                if until():
                    return
                self._condition.wait(_POLL_SECONDS)
            self._raise_if_failed(coordinator)
            self._raise_if_frozen()

    def join(self, coordinator: tf.distribute.coordinator.ClusterCoordinator) -> None:
        """Like `coordinator.join()`, but with the step deadline."""
        self.wait(coordinator, lambda: self._finished >= self._scheduled)
        self._raise_if_failed(coordinator)

    def _raise_if_failed(
        self, coordinator: tf.distribute.coordinator.ClusterCoordinator
    ) -> None:
        try:
            coordinator.done()  # raises the first error of a scheduled function
        except Exception as err:
            # Raising, the coordinator waited for the running functions and
            # dropped the queued ones: none is in flight any more, whatever
            # the error (a Python error while tracing a step too).
            with self._condition:
                self._scheduled = self._finished
                self.latest_logs = None
            if isinstance(err, tf.errors.OpError):
                raise self.describe(err) from err
            raise

    def _raise_if_frozen(self) -> None:
        if self.step_deadline is None:
            return
        now = time.monotonic()
        with self._condition:
            frozen = [
                index
                for index, record in enumerate(self.records)
                if record.running_since is not None
                and now - record.running_since > self.step_deadline
            ]
            running = any(r.running_since is not None for r in self.records)
            waiting = self._scheduled - self._finished
            stalled = (
                not running
                and waiting > 0
                and now - self._last_progress > self.step_deadline
            )
        if frozen:
            raise self._frozen_error(self._silent(frozen), "No answer from worker")
        if stalled:
            # A coordinator thread blocked between two functions (inside
            # TensorFlow, on a frozen worker).
            raise self._frozen_error(
                self._silent(range(len(self.workers))),
                f"{waiting} scheduled function(s) wait, but no worker started "
                "or finished one: no answer from worker",
            )

    def _silent(self, suspects: Iterable[int]) -> list[int]:
        """The workers whose servers do not answer, else the suspects.

        A late function does not always run on the frozen worker: one frozen
        worker makes every coordinator thread wait (between functions, or
        registering a new function with every worker), and any lock it holds
        on a parameter server stops the others' steps. A probe of every
        server tells the frozen one; if every server answers, the late
        workers are named.
        """
        timeout = min(_PROBE_SECONDS, self.step_deadline or _PROBE_SECONDS)
        return silent_servers(self.workers, timeout) or list(suspects)

    def check_workers_answer(self) -> None:
        """Raises if a worker's server accepts connections but never answers.

        Run before this process registers a new function with every worker:
        TensorFlow's registration waits for each worker while holding
        Python's GIL, so a frozen worker would hang the whole process, this
        deadline included. Probes at most every 0.1 s (tracing registers
        functions in bursts).

        Raises:
            StepDeadlineExceededError: Naming the workers that did not answer
                within the step deadline.
        """
        if self.step_deadline is None:
            return
        now = time.monotonic()
        if now - self._last_answer < _PROBE_INTERVAL_SECONDS:
            return
        if (
            self._found_silent is not None
            and now - self._found_silent[1] < self.step_deadline
        ):
            silent = self._found_silent[0]
        else:
            silent = silent_servers(self.workers, self.step_deadline)
            self._found_silent = (silent, time.monotonic()) if silent else None
        if silent:
            raise self._frozen_error(
                silent,
                "Before registering a new TensorFlow function with every "
                "worker (which would wait forever, holding Python's GIL): no "
                "gRPC answer from worker",
            )
        self._last_answer = time.monotonic()

    def _frozen_error(
        self, indices: Iterable[int], what: str
    ) -> StepDeadlineExceededError:
        frozen = list(indices)
        names = [f"/job:worker/replica:0/task:{i}" for i in frozen]
        listed = ", ".join(
            f"{name} ({self.workers[i]})" for name, i in zip(names, frozen, strict=True)
        )
        return StepDeadlineExceededError(
            f"{what} {listed} for more than step_deadline="
            f"{self.step_deadline}s: the task is frozen or far too slow. "
            "Training stopped. TensorFlow cannot cancel the call, so its "
            "coordinator threads stay blocked on that worker: end this "
            "process, restart or replace the worker and resume from a "
            "backup, or raise step_deadline if steps are this long.",
            names,
        )

    def describe(self, err: tf.errors.OpError) -> ClusterTaskError:
        """Turns a TensorFlow error from a cluster task into a clear one."""
        # An op that failed on its inputs says nothing of a lost task, even
        # when the message also names the parameter server it read from.
        program = isinstance(err, _PROGRAM_ERRORS)
        task = _failed_task(str(err), self.tasks, ps_first=not program)
        where = f"{task} ({self.tasks[task]})" if task else "a cluster task"
        kind = type(err).__name__
        hint = (
            " A parameter server holds the model's variables: they are lost. "
            "Restart the cluster and resume from the last checkpoint "
            "(keras.callbacks.BackupAndRestore or ModelCheckpoint)."
            if task and task.startswith("/job:ps") and not program
            else ""
        )
        # TensorFlow's first line is often just "Graph execution error:",
        # followed by where the failed op was defined (a Python traceback);
        # with several root errors, "(0) KIND: message" says what failed.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        message = next(
            (x for x in lines if x.startswith("(0) ")),
            next(
                (x for x in lines if not x.endswith(":") and not x.startswith(_WHERE)),
                kind,
            ),
        )[:300]
        return ClusterTaskError(f"{kind} from {where}: {message}{hint}", task)


# Lines of a TensorFlow error that say where, not what.
_WHERE = ('File "', "Detected at node ", "[[")

# Errors of the program itself (an assertion, a shape, a full device).
_PROGRAM_ERRORS = (
    tf.errors.InvalidArgumentError,
    tf.errors.OutOfRangeError,
    tf.errors.ResourceExhaustedError,
    tf.errors.UnimplementedError,
)


def _failed_task(
    message: str, tasks: Mapping[str, str], *, ps_first: bool
) -> str | None:
    """Finds the task a TensorFlow error message names, PS tasks first if asked.

    Otherwise the first task named, which for an op's own error is the task
    it ran on.
    """
    found = re.findall(r"/job:(\w+)/(?:replica:\d+/)?task:(\d+)", message)
    names = [f"/job:{job}/replica:0/task:{index}" for job, index in found]
    if ps_first:
        names.sort(key=lambda n: not n.startswith("/job:ps"))
    for name in names:
        if name in tasks:
            return name
    for address in re.findall(r"[\w.\-]+:\d{2,5}", message):
        for name, task_address in tasks.items():
            if address == task_address:
                return name
    return None


# An HTTP/2 client connection preface and an empty SETTINGS frame: a live
# gRPC server answers with its own SETTINGS frame at once.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(
    [0, 0, 0, 4, 0, 0, 0, 0, 0]
)


def silent_servers(addresses: Sequence[str], timeout: float) -> list[int]:
    """Indices of the gRPC servers that accept a connection but never answer.

    A frozen process (SIGSTOP, a hung host) still completes TCP handshakes in
    its kernel, but its gRPC server sends nothing back; a live one answers
    an HTTP/2 connection preface with its SETTINGS frame within
    milliseconds. A refused or failed connection (a dead task) does not
    count: TensorFlow fails fast on those. The answers are awaited together,
    in plain Python (no TensorFlow call, which could itself wait forever).

    Args:
        addresses: `host:port` of each server.
        timeout: Seconds to wait for the answers.

    Returns:
        The indices, in `addresses`, of the servers that did not answer.
    """
    pending: dict[socket.socket, int] = {}
    with selectors.DefaultSelector() as selector:
        for index, address in enumerate(addresses):
            host, _, port = address.rpartition(":")
            try:
                sock = socket.create_connection((host.strip("[]"), int(port)), timeout)
            except OSError:
                continue
            try:
                sock.sendall(_HTTP2_PREFACE)
            except OSError:
                sock.close()
                continue
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
            pending[sock] = index
        deadline = time.monotonic() + timeout
        while pending and (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                answered = next(x for x in pending if x is key.fileobj)
                selector.unregister(answered)
                answered.close()
                del pending[answered]
        for sock in pending:
            sock.close()
    return sorted(pending.values())
