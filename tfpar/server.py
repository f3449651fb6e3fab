"""Running one task of a TensorFlow cluster: a `tf.distribute.Server` process.

`serve` is what every tfpar server process runs, whether `tfpar.LocalCluster`
spawned it or a user started it on another machine with `tfpar server`.

Security: TensorFlow's gRPC server listens on all interfaces (`0.0.0.0:port`)
whatever address the cluster spec names, with no authentication and no
encryption; anyone who reaches the port can run arbitrary ops in the process
(TensorFlow's SECURITY.md). Run clusters only on an isolated network; see
README.md, "Isolating a cluster".
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence

from tfpar._validation import check_choice, check_int, value_error

logger = logging.getLogger("tfpar")

SECURITY_WARNING = (
    "TensorFlow's gRPC server listens on all network interfaces, without "
    "authentication or encryption, whatever address the cluster spec names: "
    "anyone who can reach its port can run code in it. Run tfpar clusters only "
    "on an isolated network (firewall, network namespace or Kubernetes "
    "NetworkPolicy; see tfpar's README, 'Isolating a cluster')."
)

READY_LINE = "tfpar-server-ready"

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

# Inter-op threads of a task pinned to one core (see `serve`).
PINNED_INTER_OP_THREADS = 2


def validate_cluster_spec(cluster: Mapping[str, Sequence[str]]) -> None:
    """Checks a cluster spec dict before any server starts.

    Args:
        cluster: Job name to list of `"host:port"` addresses.

    Raises:
        ValueError: If a job has no tasks, an address has no port from 1 to
            65535, or an address binds every interface (`0.0.0.0`, `::`,
            empty host).
        TypeError: If the spec is not a mapping of job names to lists of
            address strings.
    """
    if not isinstance(cluster, Mapping) or not cluster:
        raise TypeError(
            "The cluster spec must be a non-empty mapping of job name to a list "
            f"of 'host:port' addresses. Received: {cluster!r}."
        )
    for job, addresses in cluster.items():
        if not isinstance(job, str):
            raise TypeError(
                f"Job names must be strings. Received: job {job!r} of type "
                f"{type(job).__name__} in {cluster!r}."
            )
        if isinstance(addresses, str) or not isinstance(addresses, Sequence):
            raise TypeError(
                f"Job {job!r} must map to a list of 'host:port' addresses. "
                f"Received: {job}={addresses!r}."
            )
        if not addresses:
            raise ValueError(f"Job {job!r} has no tasks. Received: {job}=[].")
        for address in addresses:
            if not isinstance(address, str):
                raise TypeError(
                    f"Job {job!r} must map to a list of 'host:port' strings. "
                    f"Received: {job}={addresses!r}, whose item {address!r} is "
                    f"of type {type(address).__name__}."
                )
            host, sep, port = address.rpartition(":")
            if not sep or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(
                    f"Address {address!r} of job {job!r} has no port "
                    "(expected 'host:port' with a port from 1 to 65535, e.g. "
                    "'10.0.0.2:2222')."
                )
            if host.strip("[]") in ("", "0.0.0.0", "::"):
                raise ValueError(
                    f"Address {address!r} of job {job!r} names every network "
                    "interface; name the host's own address instead. (TensorFlow "
                    "listens on all interfaces anyway; tfpar refuses to make that "
                    "the documented intent.)"
                )


def serve(
    cluster: Mapping[str, Sequence[str]],
    job_name: str,
    task_index: int,
    *,
    core: int | None = None,
    parent_pid: int | None = None,
    profiler_port: int | None = None,
) -> None:
    """Runs one cluster task until the process is killed.

    Args:
        cluster: Job name to list of `"host:port"` addresses.
        job_name: This task's job, a key of `cluster`.
        task_index: This task's index within its job.
        core: If set, pins the process to this CPU core and gives TensorFlow
            one intra-op thread (and two inter-op threads, so that a blocked
            receive cannot deadlock the task), so the task is one honest
            "device" on a shared machine.
        parent_pid: If set, exits as soon as this process is no longer the
            parent, so that no server outlives the program that started it,
            even a SIGSTOPped one (on Linux).
        profiler_port: If set, also runs TensorFlow's profiler service on
            this port (`tf.profiler.experimental.server.start`), so that
            `tfpar.callbacks.DeviceUtilization` can trace short windows of
            the task from the coordinator. Like the task's own server, it
            listens on all interfaces without authentication.

    Raises:
        ValueError: If the spec is invalid, does not contain the task, or
            `core` is not a core this process may use.
        TypeError: If an argument has the wrong type.
    """
    validate_task(
        cluster,
        job_name,
        task_index,
        core=core,
        parent_pid=parent_pid,
        profiler_port=profiler_port,
    )
    if parent_pid is not None:
        _exit_with_parent(parent_pid)
    if core is not None:
        _pin_process(core)
    import tensorflow as tf

    config = None
    if core is not None:
        # One thread computes. Two inter-op threads, not one: parameter-server
        # steps deadlock when a task's only inter-op thread waits on a peer.
        config = tf.compat.v1.ConfigProto(
            intra_op_parallelism_threads=1,
            inter_op_parallelism_threads=PINNED_INTER_OP_THREADS,
        )
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(PINNED_INTER_OP_THREADS)
    logger.warning(SECURITY_WARNING)
    server = tf.distribute.Server(
        tf.train.ClusterSpec({job: list(a) for job, a in cluster.items()}),
        job_name=job_name,
        task_index=task_index,
        protocol="grpc",
        config=config,
        start=True,
    )
    if profiler_port is not None:
        tf.profiler.experimental.server.start(profiler_port)
    print(READY_LINE, flush=True)
    server.join()


def validate_task(
    cluster: Mapping[str, Sequence[str]],
    job_name: str,
    task_index: int,
    *,
    core: int | None = None,
    parent_pid: int | None = None,
    profiler_port: int | None = None,
) -> None:
    """Checks the arguments of `serve` without starting anything.

    Raises:
        ValueError: If the spec is invalid, does not contain the task, or
            `core` is not a core this process may use.
        TypeError: If an argument has the wrong type.
    """
    validate_cluster_spec(cluster)
    check_choice("job_name", job_name, sorted(cluster))
    check_int("task_index", task_index, minimum=0, maximum=len(cluster[job_name]) - 1)
    check_int("core", core, minimum=0, allow_none=True)
    check_int("parent_pid", parent_pid, minimum=1, allow_none=True)
    check_int("profiler_port", profiler_port, minimum=1, maximum=65535, allow_none=True)
    if profiler_port is not None and (busy := port_in_use(profiler_port)):
        # TensorFlow's profiler server only logs that it could not bind.
        raise value_error(
            "profiler_port",
            profiler_port,
            f"a free port; it is already in use ({busy})",
        )
    if core is not None and core not in (cores := sorted(os.sched_getaffinity(0))):
        raise value_error("core", core, f"a CPU core this process may use, {cores}")


def port_in_use(port: int) -> str | None:
    """Says why `port` cannot be bound on every interface, or `None` if it can.

    Every interface is where TensorFlow's servers listen, whatever address
    they are given.

    Args:
        port: A TCP port number.

    Returns:
        The operating system's reason (`"Address already in use"`), or `None`.

    Example:

    ```python
    port_in_use(6009)  # None, or 'Address already in use'
    ```
    """
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError as err:
            return err.strerror or str(err)
    return None


def _exit_with_parent(parent_pid: int) -> None:
    """Ends this process once its parent is gone (it was killed, or crashed)."""
    if sys.platform.startswith("linux"):
        # A SIGSTOPped server runs no thread, so let the kernel kill it too.
        # Linux ties this to the parent *thread* that started the process:
        # LocalCluster starts servers from the thread that owns the cluster.
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="tfpar-parent-watch", daemon=True).start()


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """One task's view of its cluster, as `TF_CONFIG` describes it.

    Attributes:
        cluster: Job name to the tuple of `"host:port"` addresses.
        task_type: This task's job name.
        task_index: This task's index within its job.
    """

    cluster: Mapping[str, tuple[str, ...]]
    task_type: str
    task_index: int


def read_tf_config(value: str | None = None) -> TaskConfig:
    """Parses and validates `TF_CONFIG`, with errors that say what is wrong.

    `TF_CONFIG` is the JSON convention TensorFlow, Kubeflow's TFJob and other
    launchers use: `{"cluster": {"worker": ["host:port", ...], "ps": [...]},
    "task": {"type": "worker", "index": 0}}`.

    Args:
        value: The JSON text; `None` reads the `TF_CONFIG` environment variable.

    Returns:
        The parsed `TaskConfig`.

    Raises:
        ValueError: If it is unset, not JSON, lacks `cluster` or `task`, uses a
            job type TensorFlow rejects (`master`) or Kubeflow's
            `sparseCluster`, names a task that is not in the cluster, or has an
            invalid address.
        TypeError: If an entry has the wrong JSON type (an object where a
            list is expected, a string task index, ...).

    Example:

    ```python
    os.environ["TF_CONFIG"] = json.dumps({
        "cluster": {"worker": ["10.0.0.2:2222"], "ps": ["10.0.0.3:2222"]},
        "task": {"type": "ps", "index": 0}})
    tfpar.server.read_tf_config().task_type  # 'ps'
    ```
    """
    text = os.environ.get("TF_CONFIG") if value is None else value
    if not text:
        raise ValueError(
            "TF_CONFIG is not set. It must hold JSON like "
            '{"cluster": {"worker": ["host:port"], "ps": ["host:port"]}, '
            '"task": {"type": "worker", "index": 0}}.'
        )
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"TF_CONFIG is not valid JSON ({err}). Received: {text!r}."
        ) from err
    if not isinstance(config, dict):
        raise TypeError(f"TF_CONFIG must be a JSON object. Received: {text!r}.")
    if "cluster" not in config:
        hint = (
            " It has 'sparseCluster' (Kubeflow's dynamic workers), which "
            "TensorFlow reads as an empty cluster; list every task in 'cluster'."
            if "sparseCluster" in config
            else ""
        )
        raise ValueError(f"TF_CONFIG has no 'cluster' entry.{hint} Received: {text!r}.")
    cluster = config["cluster"]
    validate_cluster_spec(cluster)
    if "master" in cluster:
        raise ValueError(
            "TF_CONFIG's cluster has a 'master' job, which TensorFlow 2 rejects; "
            f"call it 'chief'. Received jobs: {sorted(cluster)}."
        )
    task = config.get("task")
    if not isinstance(task, dict) or "type" not in task:
        error = ValueError if task is None or isinstance(task, dict) else TypeError
        raise error(
            'TF_CONFIG needs a \'task\' entry like {"type": "worker", "index": 0}. '
            f"Received: task={task!r}."
        )
    task_type, task_index = task["type"], task.get("index", 0)
    if not isinstance(task_type, str):
        raise TypeError(
            "TF_CONFIG's task type must be a job name string. Received: "
            f"type={task_type!r} of type {type(task_type).__name__}."
        )
    if task_type not in cluster:
        raise ValueError(
            f"TF_CONFIG's task type is not a job of its cluster. Received: "
            f"type={task_type!r} (jobs: {sorted(cluster)})."
        )
    if isinstance(task_index, bool) or not isinstance(task_index, int):
        raise TypeError(
            "TF_CONFIG's task index must be an int. Received: "
            f"index={task_index!r} of type {type(task_index).__name__}."
        )
    if not 0 <= task_index < len(cluster[task_type]):
        raise ValueError(
            f"TF_CONFIG's task index does not exist. Received: index={task_index!r} "
            f"(job {task_type!r} has tasks 0 to {len(cluster[task_type]) - 1})."
        )
    return TaskConfig(
        cluster={job: tuple(addresses) for job, addresses in cluster.items()},
        task_type=task_type,
        task_index=task_index,
    )


def _pin_process(core: int) -> None:
    """Pins every thread of this process to `core`.

    `sched_setaffinity(0, ...)` changes only the calling thread on Linux, and
    importing Python modules may already have started threads, so each one is
    pinned; threads started later inherit the mask.
    """
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # the thread ended meanwhile
            os.sched_setaffinity(int(tid), {core})
