"""Private TensorFlow internals of LocalCluster, and why.

Used by `tfpar/cluster.py`:

- `detach_from_cluster`: a process connected to a cluster removes every
  function it deletes from every remote task, so after the servers stop it
  logs one gRPC error per function and task (most at exit); leaving the
  cluster first needs `Context.update_server_def`.
"""

from __future__ import annotations

from collections.abc import Iterable

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
