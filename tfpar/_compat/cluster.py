"""Private TensorFlow internals of clusters (LocalCluster, coordinator), and why.

Used by `tfpar/cluster.py` and `tfpar/strategies/parameter_server/runtime.py`:

- `detach_from_cluster`: a process connected to a cluster removes every
  function it deletes from every remote task, so after the servers stop it
  logs one gRPC error per function and task (most at exit); leaving the
  cluster first needs `Context.update_server_def`.
- `free_coordinator_threads`: each closure a `ClusterCoordinator` worker
  thread runs ends in `context.executor_scope`, whose exit waits for every
  pending node of the thread's previous executor; for a thread left on the
  process-wide default executor, where TensorFlow queues the deletion of
  every remote tensor, a frozen worker makes that wait block every
  coordinator thread forever, after its closure returned: no step deadline
  can see it. The coordinator's `Worker` objects (private `_cluster.workers`,
  class `cluster_coordinator.Worker`, methods `_process_closure` and
  `_process_resource_closure`) move to `TfparCoordinatorWorker`, whose
  thread runs on its own executor; no function of TensorFlow changes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tensorflow.python.distribute.coordinator import cluster_coordinator
from tensorflow.python.eager import context

from tfpar._subclass import swap_class


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


class TfparCoordinatorWorker(cluster_coordinator.Worker):
    """A coordinator `Worker` whose thread runs on the worker's own executor.

    Why: each closure runs inside `context.executor_scope(worker.executor)`.
    That scope reads the thread's previous executor as a new Python
    `Executor` view, and the view's `__del__`, on the scope's exit, waits for
    every pending node of that executor. On a thread left on the process's
    default executor, those include the deletions of remote tensors (TensorFlow
    sends each from a runner thread, on the default executor): once a worker
    is frozen (SIGSTOP, a hung host), a deletion sent to it never completes,
    and every coordinator thread blocks at the end of its next closure, after
    that closure returned, where no step deadline sees it (seen: a hang of
    `fit` with both coordinator threads in
    `EagerExecutor::WaitForAllPendingNodes`). This worker first makes its
    thread's executor its own synchronous one (`Context.executor = ...` sets
    it for the calling thread only, without waiting). The stock scope then
    saves and restores that same executor, and its exit waits only on it:
    its ops ran inline on this thread, so nothing is pending. Deletions still
    run on the default executor, asynchronously, as before; the thread of a
    frozen worker blocks inside its next step, where the step deadline sees
    it. Only the threads of tfpar's coordinators change.
    """

    def _process_closure(self, closure: Any) -> None:
        self._use_own_executor()
        super()._process_closure(closure)

    def _process_resource_closure(self, closure: Any) -> None:
        self._use_own_executor()
        super()._process_resource_closure(closure)

    def _use_own_executor(self) -> None:
        # The setter creates no view of the previous executor: no wait. (Its
        # getter would: a view of the default one, waiting on its deletions.)
        context.context().executor = self.executor


def free_coordinator_threads(coordinator: Any) -> None:
    """Stops the coordinator's threads from waiting on the default executor.

    Moves each of the coordinator's `Worker` objects (its private `_cluster`'s
    `workers`) to `TfparCoordinatorWorker`. Each worker thread looks up its
    closure-processing methods at every closure, so the change applies from
    the next closure on; call this before scheduling anything.

    Args:
        coordinator: The `tf.distribute.coordinator.ClusterCoordinator` of a
            `tfpar.ParameterServerStrategy`.
    """
    for worker in coordinator._cluster.workers:
        swap_class(worker, "coordinator_worker", TfparCoordinatorWorker)
