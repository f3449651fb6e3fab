"""Naming the worker a multi-worker job lost, in place of TensorFlow's error.

When a worker dies or freezes, TensorFlow's coordination service or the
gRPC channel to it fails every other worker's next collective, with errors
that name the lost task in some cases ("tasks are unhealthy (stopped
sending heartbeats)", "from remote target ...") and in others only imply it
(a missed heartbeat to the service that worker 0 hosts) or not at all (a
collective timeout). `lost_task_error` turns them into a
`tfpar.ClusterTaskError` that says which worker, where, and what to do;
`name_lost_tasks` gives one Keras model step functions that raise it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import tensorflow as tf

from tfpar.errors import ClusterTaskError

_TASK = re.compile(r"/job:(\w+)/replica:\d+/task:(\d+)")
_UNHEALTHY = re.compile(
    r"unhealthy \(stopped sending heartbeats\):\s*((?:/job:\S+\s*)+)"
)
_REMOTE = re.compile(r"from remote target (/job:\w+/replica:\d+/task:\d+)")
_LOST_ERRORS = (
    tf.errors.UnavailableError,
    tf.errors.DeadlineExceededError,
    tf.errors.AbortedError,
    tf.errors.CancelledError,
    tf.errors.InternalError,
    tf.errors.UnknownError,
)
_FUNCTIONS = ("train_function", "test_function", "predict_function")


class _NamingLostTasks:
    """A Keras step function whose lost-worker errors name the task."""

    def __init__(
        self,
        function: Callable[..., Any],
        translate: Callable[[tf.errors.OpError], ClusterTaskError | None],
    ) -> None:
        self.wrapped = function
        self._translate = translate

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.wrapped(*args, **kwargs)
        except _LOST_ERRORS as error:
            named = self._translate(error)
            if named is None:
                raise
            raise named from error


def name_lost_tasks(
    model: Any, translate: Callable[[tf.errors.OpError], ClusterTaskError | None]
) -> None:
    """Gives `model` step functions whose lost-worker errors name the task.

    Made now with Keras's public `make_*_function` (which Keras would call
    next, and which keeps a function once made), then wrapped once; only
    this model changes.

    Args:
        model: The Keras model whose `fit`, `evaluate` or `predict` runs.
        translate: Returns a step error as a `ClusterTaskError`, or `None`
            for an error that is not about a lost worker (raised unchanged).
    """
    model.make_train_function()
    model.make_test_function()
    model.make_predict_function()
    for name in _FUNCTIONS:
        function = getattr(model, name)
        if function is not None and not isinstance(function, _NamingLostTasks):
            setattr(model, name, _NamingLostTasks(function, translate))


def _task_name(job: str, index: int) -> str:
    return f"/job:{job}/replica:0/task:{index}"


def _described(task: str, cluster: Mapping[str, Sequence[str]]) -> str:
    """`task` with its address from `cluster`, e.g. `"/job:worker/replica:0/task:1 (h:p)"`."""
    match = _TASK.fullmatch(task)
    if match:
        job, index = match.group(1), int(match.group(2))
        addresses = cluster.get(job, ())
        if index < len(addresses):
            return f"{task} ({addresses[index]})"
    return task


def lost_task_error(
    error: tf.errors.OpError, cluster: Mapping[str, Sequence[str]], this_task: str
) -> ClusterTaskError | None:
    """TensorFlow's error about a lost worker, as a `ClusterTaskError`.

    Args:
        error: What a step function raised.
        cluster: The cluster, `{job: [address, ...]}`.
        this_task: This process's task name.

    Returns:
        A `ClusterTaskError` naming the lost task, its address and what to do,
        or `None` when `error` is not about a lost worker.
    """
    message = str(error)
    lost: list[str] = []
    how = ""
    unhealthy = _UNHEALTHY.search(message)
    remote = _REMOTE.search(message)
    if unhealthy:
        lost = unhealthy.group(1).split()
        how = "stopped sending heartbeats (killed, crashed or frozen)"
    elif remote and ("Connection reset" in message or "Socket closed" in message):
        lost = [remote.group(1)]
        how = "closed its connection (killed or crashed)"
    elif "CoordinationService/Heartbeat" in message or (
        "/tensorflow.CoordinationService/" in message and "Unavailable" in message
    ):
        jobs = [job for job in ("chief", "worker") if cluster.get(job)]
        lost = [_task_name(jobs[0], 0)] if jobs else []
        how = (
            "stopped answering heartbeats (killed, crashed or frozen); it "
            "hosts TensorFlow's coordination service"
        )
    elif isinstance(error, tf.errors.DeadlineExceededError) and "ollective" in message:
        how = "did not join a collective within the strategy's `timeout`"
    else:
        return None
    lost = [t for t in lost if t != this_task] or lost
    if lost:
        who = ", ".join(_described(t, cluster) for t in lost)
        first = "Worker" if len(lost) == 1 else "Workers"
        headline = f"{first} {who} {how}."
    else:
        others = [
            _described(_task_name(job, i), cluster)
            for job in ("chief", "worker")
            for i in range(len(cluster.get(job, ())))
            if _task_name(job, i) != this_task
        ]
        headline = (
            f"A worker {how}; TensorFlow does not say which. The other "
            f"workers: {', '.join(others)}."
        )
    return ClusterTaskError(
        f"{headline} This worker ({_described(this_task, cluster)}) cannot "
        "continue: every step all-reduces with every worker, and TensorFlow "
        "aborted this process's collectives. Restart every worker of the job "
        "(not only the lost one); with keras.callbacks.BackupAndRestore the "
        "relaunch resumes at the epoch that was interrupted. TensorFlow said: "
        f"{type(error).__name__}: {_first_line(error)}",
        lost[0] if lost else None,
    )


def _first_line(error: tf.errors.OpError) -> str:
    """TensorFlow's own message, without its traceback of graph nodes."""
    text = error.message if isinstance(error.message, str) else str(error)
    marker = "Collective ops is aborted by:"
    if marker in text:
        text = text[text.index(marker) :]
    return " ".join(text.split("\n\t")[0].split())[:600]
