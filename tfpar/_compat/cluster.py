"""Private TensorFlow internals of clusters (LocalCluster, coordinator), and why.

Used by `tfpar/cluster.py` and `tfpar/strategies/parameter_server.py`:

- `detach_from_cluster`: a process connected to a cluster removes every
  function it deletes from every remote task, so after the servers stop it
  logs one gRPC error per function and task (most at exit); leaving the
  cluster first needs `Context.update_server_def`.
- `free_coordinator_threads`: each closure a `ClusterCoordinator` worker
  thread runs ends in `context.executor_scope`, whose exit waits for every
  pending node of the process-wide default eager executor, where TensorFlow
  queues the deletion of every remote tensor. A frozen worker never answers
  its deletions, so that wait blocks every coordinator thread forever, after
  its closure returned: no step deadline can see it.
- `check_before_function_registration`: TensorFlow registers every new
  function with every remote task inside `Context.add_c_function` /
  `add_function_def`, waiting for each task while holding Python's GIL; a
  frozen worker makes that wait forever and stops every Python thread.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tensorflow.python import pywrap_tfe
from tensorflow.python.eager import context


def detach_from_cluster(addresses: Iterable[str]) -> bool:
    """Drops the remote tasks from this process's eager context, if connected.

    Why: once a process joined a cluster, every TensorFlow function it
    deletes afterwards (most at interpreter exit) is also removed from every
    remote task; after the servers stopped, each removal logs a gRPC
    "Failed to remove function remotely ... Connection refused" error. The
    only way to leave a cluster is to give the eager context a server def
    without the remote jobs (`Context.update_server_def`, no public path),
    which also closes the remote contexts while the servers still run.

    Args:
        addresses: The `host:port` addresses of the cluster's tasks.

    Returns:
        Whether this process was connected to those tasks and left them.
    """
    ctx = context.context()
    server_def = ctx.get_server_def()
    if server_def is None:
        return False
    wanted = set(addresses)
    remote = {
        address
        for job in server_def.cluster.job
        if job.name != server_def.job_name
        for address in job.tasks.values()
    }
    if not remote & wanted:
        return False
    local = type(server_def)()
    local.CopyFrom(server_def)
    for job in list(local.cluster.job):
        if job.name != local.job_name:
            local.cluster.job.remove(job)
    ctx.update_server_def(local)
    return True


# The coordinator workers whose threads skip the wait, and the stock scope.
_FREED_WORKERS: weakref.WeakSet[Any] = weakref.WeakSet()
_STOCK_EXECUTOR_SCOPE = context.executor_scope


@contextlib.contextmanager
def _executor_scope(executor: Any) -> Iterator[None]:
    """`context.executor_scope`, without its wait on the previous executor.

    The stock scope reads the thread's previous executor as a new Python
    `Executor` view, whose `__del__` waits for all of that executor's pending
    nodes; for a coordinator thread the previous executor is the default one.
    This scope restores the same executor through the same view and frees the
    view (`TFE_DeleteExecutor` on a view deletes only the view), not waiting.
    """
    if not any(worker.executor is executor for worker in list(_FREED_WORKERS)):
        with _STOCK_EXECUTOR_SCOPE(executor):
            yield
        return
    ctx = context.context()
    ctx.ensure_initialized()
    previous = pywrap_tfe.TFE_ContextGetExecutorForThread(ctx._context_handle)
    try:
        ctx.executor = executor
        yield
    finally:
        pywrap_tfe.TFE_ContextSetExecutorForThread(ctx._context_handle, previous)
        pywrap_tfe.TFE_DeleteExecutor(previous)


def free_coordinator_threads(coordinator: Any) -> None:
    """Stops the coordinator's threads waiting on the default executor.

    Why: `ClusterCoordinator` runs each closure inside
    `context.executor_scope(worker.executor)`. On exit, that scope drops a
    Python view of the thread's previous executor (the process-wide default
    one), and the view's `__del__` waits for all of its pending nodes. Remote
    tensors are deleted by nodes queued on that default executor, each
    waiting for its task's answer: once a worker is frozen (SIGSTOP, a hung
    host), a deletion sent to it never completes, and every coordinator
    thread then blocks at the end of its next closure, after that closure
    returned. Steps stop without any step running past a deadline: seen as a
    hang of `fit` with both coordinator threads in
    `EagerExecutor::WaitForAllPendingNodes`. With this, the threads of this
    coordinator restore the default executor without waiting on it (the
    deletions still run, asynchronously, as before); the thread of the frozen
    worker then blocks inside its next step, where the step deadline sees
    it. Other coordinators and other `executor_scope` users keep TensorFlow's
    behaviour. There is no public way to change either; the module attribute
    `context.executor_scope`, which `cluster_coordinator` looks up at every
    closure, is replaced once by a function that keeps the stock behaviour
    for every executor but those of the workers given here.

    Args:
        coordinator: A `tf.distribute.coordinator.ClusterCoordinator`.
    """
    _FREED_WORKERS.update(coordinator._cluster.workers)
    context.executor_scope = _executor_scope


# Checks run before a function is registered with the remote tasks.
_REGISTRATION_CHECKS: list[weakref.WeakMethod[Callable[[], None]]] = []


def _run_registration_checks() -> None:
    for reference in list(_REGISTRATION_CHECKS):
        check = reference()
        if check is None:
            _REGISTRATION_CHECKS.remove(reference)
        else:
            check()


def _checked(register: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(register)
    def checked_register(self: Any, function: Any) -> Any:
        _run_registration_checks()
        return register(self, function)

    checked_register._tfpar_checked = True  # type: ignore[attr-defined]
    return checked_register


def check_before_function_registration(check: Callable[[], None]) -> None:
    """Runs `check` before this process registers each new TensorFlow function.

    Why: in a process connected to a cluster, `Context.add_c_function` and
    `Context.add_function_def` (every new trace: Keras's steps, dataset
    functions, gradients) register the function with every remote task,
    and the registration waits for each task's gRPC stream without releasing
    Python's GIL (seen: `TFE_ContextAddFunction` in
    `GrpcEagerClient::StreamingEnqueueAsync`, the main thread in
    `take_gil`). A frozen worker therefore stops every Python thread for
    ever, deadline watchdog included. A check that raises first keeps the
    process alive. No public hook runs before registration; the two methods
    of the eager `Context` class are wrapped once, and call the checks of
    live owners only (held weakly).

    Args:
        check: A bound method that raises if the registration would hang.
    """
    _REGISTRATION_CHECKS.append(weakref.WeakMethod(check))
    for name in ("add_c_function", "add_function_def"):
        method = getattr(context.Context, name)
        if not getattr(method, "_tfpar_checked", False):
            setattr(context.Context, name, _checked(method))
