"""A real TensorFlow cluster on one machine: one server process per task.

Logical devices in one process share one inter-op thread pool, so they cannot
show a parallel speedup. `LocalCluster` starts one `tf.distribute.Server`
process per task on loopback, each optionally pinned to its own core with one
TensorFlow thread, so that one task is one honest "device": parallel speedups,
pipeline bubbles and transfer costs show up in wall time.
"""

from __future__ import annotations

import atexit
import gc
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import tensorflow as tf

from tfpar._compat import cluster as _compat
from tfpar._validation import check_bool, check_int, check_number
from tfpar.server import READY_LINE, SECURITY_WARNING

logger = logging.getLogger("tfpar")

_HOST = "127.0.0.1"


class LocalCluster:
    """Starts a TensorFlow cluster of local server processes, and stops it.

    Each task (`num_workers` workers, `num_ps` parameter servers) is its own OS
    process running `tf.distribute.Server` on a free loopback port; it receives
    its role through `TF_CONFIG`, like a task of a real cluster, and runs
    `tfpar server`. With `pin_cores=True` each process is pinned to one core
    (round robin over the cores this process may use) with one intra-op
    thread (and two inter-op threads: with one, parameter-server steps
    deadlock).

    Use it as a context manager: every process it started is stopped on exit,
    also on exceptions and Ctrl-C. Should this process die without cleaning up
    (SIGKILL), each server exits too, even a SIGSTOPped one. Start and restart
    tasks from a thread that lives as long as the cluster (Linux ties a
    child's parent-death signal to the thread that started it).

    Args:
        num_workers: Number of worker tasks, an int >= 1. Defaults to 2.
        num_ps: Number of parameter-server tasks, an int >= 0. Defaults to 0.
        pin_cores: Pin each task to its own core with one TensorFlow thread.
            Defaults to `True`.
        start_timeout: Seconds to wait for every server to listen. Defaults
            to 60.

    Raises:
        ValueError: If a count or the timeout is out of range.
        TypeError: If a count is not an int, `pin_cores` not a bool or
            `start_timeout` not a number.

    Example:

    ```python
    with tfpar.LocalCluster(num_workers=2) as cluster:
        devices = cluster.connect()
        # ['/job:worker/replica:0/task:0/device:CPU:0',
        #  '/job:worker/replica:0/task:1/device:CPU:0']
        strategy = tfpar.PipelineStrategy(devices=devices)
    ```
    """

    def __init__(
        self,
        num_workers: int = 2,
        num_ps: int = 0,
        *,
        pin_cores: bool = True,
        start_timeout: float = 60.0,
    ) -> None:
        check_int("num_workers", num_workers, minimum=1)
        check_int("num_ps", num_ps, minimum=0)
        check_bool("pin_cores", pin_cores)
        check_number("start_timeout", start_timeout, positive=True, unit="seconds")
        self.num_workers = num_workers
        self.num_ps = num_ps
        self.pin_cores = pin_cores
        self.start_timeout = start_timeout
        self._cluster: dict[str, list[str]] = {}
        self._processes: dict[tuple[str, int], subprocess.Popen[bytes]] = {}
        self._profiler_ports: dict[tuple[str, int], int] = {}
        self._logdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def cluster_spec(self) -> tf.train.ClusterSpec:
        """The `tf.train.ClusterSpec` of the running cluster."""
        self._require_started()
        return tf.train.ClusterSpec(self._cluster)

    @property
    def cluster_resolver(self) -> LocalClusterResolver:
        """A cluster resolver for a client (coordinator) of this cluster.

        It also carries `profiler_addresses`, where `DeviceUtilization` finds
        each task's profiler service.
        """
        return LocalClusterResolver(self.cluster_spec, self.profiler_addresses)

    @property
    def profiler_addresses(self) -> dict[str, str]:
        """Each task's TensorFlow profiler service, `"host:port"` by task name.

        Every task runs one (`tfpar server --profiler-port`), so that
        `tfpar.callbacks.DeviceUtilization` can trace short windows of tasks
        whose busy time no strategy measures, such as parameter servers.

        Example:

        ```python
        cluster.profiler_addresses
        # {'/job:worker/replica:0/task:0': '127.0.0.1:41235', ...}
        ```
        """
        self._require_started()
        return {
            f"/job:{job}/replica:0/task:{index}": f"{_HOST}:{port}"
            for (job, index), port in self._profiler_ports.items()
        }

    @property
    def worker_devices(self) -> list[str]:
        """The CPU device of each worker task, in task order."""
        self._require_started()
        return [
            f"/job:worker/replica:0/task:{i}/device:CPU:0"
            for i in range(self.num_workers)
        ]

    def start(self) -> LocalCluster:
        """Starts every server process and waits until each one listens.

        Returns:
            This cluster.

        Raises:
            RuntimeError: If it is already running, or a server exits or does
                not listen within `start_timeout` (the message holds its log).
        """
        if self._processes:
            raise RuntimeError("This LocalCluster is already running.")
        tasks = self.num_workers + self.num_ps
        ports = _free_ports(2 * tasks)
        self._cluster = {"worker": [f"{_HOST}:{p}" for p in ports[: self.num_workers]]}
        if self.num_ps:
            self._cluster["ps"] = [
                f"{_HOST}:{p}" for p in ports[self.num_workers : tasks]
            ]
        self._profiler_ports = dict(
            zip(
                [("worker", i) for i in range(self.num_workers)]
                + [("ps", i) for i in range(self.num_ps)],
                ports[tasks:],
                strict=True,
            )
        )
        self._logdir = tempfile.TemporaryDirectory(prefix="tfpar-cluster-")
        logger.warning(SECURITY_WARNING)
        atexit.register(self.stop)
        try:
            for job, addresses in self._cluster.items():
                for index in range(len(addresses)):
                    self._spawn(job, index)
            for job, index in list(self._processes):
                self._wait_ready(job, index)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kills every server process this cluster started and waits for it.

        Safe to call more than once. Servers hold no state worth saving
        (TensorFlow cannot shut a server down cleanly anyway), so they are
        killed, not asked to exit. A process connected to the cluster first
        leaves it while every server still runs (without that, each
        TensorFlow function deleted later, most at exit, logs a gRPC
        "Connection refused" error per task). It does not when a server is
        stopped (SIGSTOP) or gone: leaving would wait for it, or log one such
        error per task.
        """
        if self._processes and all(_running(p) for p in self._processes.values()):
            addresses = [a for tasks in self._cluster.values() for a in tasks]
            try:
                _compat.detach_from_cluster(addresses)
            except Exception as err:  # leaving is a courtesy; stopping is not
                logger.debug("Could not leave the cluster before stopping: %s", err)
        for process in self._processes.values():
            _kill_and_reap(process)
        self._processes.clear()
        if self._logdir is not None:
            self._logdir.cleanup()
            self._logdir = None
        atexit.unregister(self.stop)

    def connect(self) -> list[str]:
        """Connects this process to the cluster, for placing ops on its tasks.

        Uses `tf.config.experimental_connect_to_cluster` with the local device
        kept as the default, so only ops placed explicitly run remotely. A
        process stays connected until it exits: after `stop()`, ops placed on
        the cluster fail.

        Returns:
            The workers' device names (see `worker_devices`).
        """
        collect_before_joining()
        tf.config.experimental_connect_to_cluster(
            self.cluster_resolver, make_master_device_default=False
        )
        return self.worker_devices

    def kill(self, job: str, index: int, sig: int = signal.SIGKILL) -> None:
        """Sends `sig` to one task, to test faults (SIGKILL, SIGSTOP, ...).

        Args:
            job: `"worker"` or `"ps"`.
            index: The task index.
            sig: The signal. Defaults to `SIGKILL`.

        Raises:
            ValueError: If the task does not exist.
        """
        process = self._process(job, index)
        process.send_signal(sig)
        if sig == signal.SIGKILL:
            process.wait()

    def restart(self, job: str, index: int) -> None:
        """Starts a task again on its old address (after `kill`).

        Raises:
            ValueError: If the task does not exist.
            RuntimeError: If it does not listen within `start_timeout`.
        """
        _kill_and_reap(self._process(job, index))
        self._spawn(job, index)
        self._wait_ready(job, index)

    def pid(self, job: str, index: int) -> int:
        """Returns the process id of one task."""
        return self._process(job, index).pid

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self._processes else "stopped"
        return (
            f"LocalCluster(num_workers={self.num_workers}, num_ps={self.num_ps}, "
            f"pin_cores={self.pin_cores}) [{state}] {self._cluster or ''}"
        )

    def _spawn(self, job: str, index: int) -> None:
        assert self._logdir is not None
        tf_config = {"cluster": self._cluster, "task": {"type": job, "index": index}}
        command = [
            sys.executable,
            "-m",
            "tfpar",
            "server",
            "--parent-pid",
            str(os.getpid()),
            "--profiler-port",
            str(self._profiler_ports[(job, index)]),
        ]
        if self.pin_cores:
            command += ["--core", str(self._core_for(job, index))]
        log = open(self._log_path(job, index), "wb")  # noqa: SIM115 (child owns it)
        with log:
            self._processes[(job, index)] = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "TF_CONFIG": json.dumps(tf_config)},
                # Ctrl-C reaches only this process, which then stops the servers.
                start_new_session=True,
            )

    def _wait_ready(self, job: str, index: int) -> None:
        process = self._processes[(job, index)]
        log = self._log_path(job, index)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if READY_LINE.encode() in log.read_bytes():
                return
            if process.poll() is not None:
                raise RuntimeError(
                    f"Server {job}:{index} exited with code {process.returncode} "
                    f"before listening. Its log:\n{_tail(log)}"
                )
            time.sleep(0.05)
        raise RuntimeError(
            f"Server {job}:{index} did not listen within start_timeout="
            f"{self.start_timeout}s. Its log:\n{_tail(log)}"
        )

    def _core_for(self, job: str, index: int) -> int:
        cores = sorted(os.sched_getaffinity(0))
        position = index if job == "worker" else self.num_workers + index
        return cores[position % len(cores)]

    def _log_path(self, job: str, index: int) -> Path:
        assert self._logdir is not None
        return Path(self._logdir.name) / f"{job}-{index}.log"

    def _process(self, job: str, index: int) -> subprocess.Popen[bytes]:
        try:
            return self._processes[(job, index)]
        except KeyError:
            raise ValueError(
                f"No such task. Received: job={job!r}, index={index!r} "
                f"(running: {sorted(self._processes)})."
            ) from None

    def _require_started(self) -> None:
        if not self._cluster:
            raise RuntimeError(
                "The LocalCluster is not started: use it as a context manager "
                "or call start() first."
            )


def collect_before_joining() -> None:
    """Frees the TensorFlow functions that died before this process joins a cluster.

    Call it right before connecting to a cluster (`LocalCluster.connect`,
    `tfpar.ParameterServerStrategy`). Why: TensorFlow registers a new
    function with the remote tasks joined when it is created, but removes a
    deleted function from every task joined when it is deleted, whether
    that task holds it or not (`EagerContext::MaybeRemoveFunctionRemotely`
    keeps no record). A function created before joining and deleted after
    therefore logs "Failed to remove function remotely due to Tried to
    remove non-existent function" once per task. Most such functions are
    garbage already, kept only by reference cycles (the models, datasets and
    iterators of an earlier `fit`), and freed whenever Python's cycle
    collector next runs: by then, joined (seen: 96 dataset functions of
    three earlier `fit`s, 288 errors, in the quickstart). Collecting now
    removes them while they exist in this process only. A function still
    referenced when this process joins, and deleted later, still logs:
    TensorFlow has no way to mark a function local.

    Example:

    ```python
    collect_before_joining()
    tf.config.experimental_connect_to_cluster(resolver)
    ```
    """
    gc.collect()


def _free_ports(count: int) -> list[int]:
    """Asks the kernel for `count` distinct free loopback ports."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((_HOST, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _running(process: subprocess.Popen[bytes]) -> bool:
    """Whether a server process runs (not exited, not stopped by a signal)."""
    if process.poll() is not None:
        return False
    try:
        with open(f"/proc/{process.pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[-1].split()[0] not in ("T", "t", "Z")
    except OSError:  # no /proc (not Linux): assume it runs
        return True


def _kill_and_reap(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()  # SIGKILL also ends a SIGSTOPped process
    process.wait(timeout=30)


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class LocalClusterResolver(tf.distribute.cluster_resolver.SimpleClusterResolver):
    """A `SimpleClusterResolver` that also knows each task's profiler service.

    Args:
        cluster_spec: The cluster's `tf.train.ClusterSpec`.
        profiler_addresses: `"host:port"` of each task's TensorFlow profiler
            service, by task name (`"/job:ps/replica:0/task:0"`).

    Example:

    ```python
    with tfpar.LocalCluster(num_workers=2, num_ps=1) as cluster:
        resolver = cluster.cluster_resolver  # a LocalClusterResolver
        strategy = tfpar.ParameterServerStrategy(resolver)
        resolver.profiler_addresses["/job:ps/replica:0/task:0"]  # '127.0.0.1:...'
    ```
    """

    def __init__(
        self, cluster_spec: tf.train.ClusterSpec, profiler_addresses: dict[str, str]
    ) -> None:
        super().__init__(cluster_spec, rpc_layer="grpc")
        self.profiler_addresses = dict(profiler_addresses)
