"""Starting the workers of a multi-worker job on this machine: `tfpar launch`.

`launch` does what `torchrun` and `horovodrun` do for their frameworks: it
starts `num_workers` copies of one command, each with the `TF_CONFIG` of one
`worker` task of a cluster on loopback, streams their output with a
`[worker i] ` prefix, and stops them all as soon as one fails or the launcher
is interrupted. The command is any program (usually `python train.py`); the
launcher itself never imports TensorFlow.

Each worker runs in its own session (Ctrl-C in a terminal reaches only the
launcher, which forwards it once), with stdin from `/dev/null`, and dies with
the launcher even if the launcher is SIGKILLed (Linux's parent-death signal).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import IO

from tfpar._validation import (
    check_bool,
    check_int,
    check_number,
    check_sequence,
    value_error,
)
from tfpar.server import PINNED_INTER_OP_THREADS, PR_SET_PDEATHSIG, port_in_use

_HOST = "127.0.0.1"
_MAX_PORT = 65535
DEFAULT_GRACE_PERIOD = 5.0

# The environment of a pinned worker: TensorFlow 2.21 reads both variables
# when it creates its thread pools (checked by counting the threads of a
# process), unless the script sets `tf.config.threading` itself. Two
# inter-op threads, as in `tfpar server`: with one, a task whose only
# inter-op thread waits on a peer deadlocks.
PINNED_THREAD_ENV = {
    "TF_NUM_INTRAOP_THREADS": "1",
    "TF_NUM_INTEROP_THREADS": str(PINNED_INTER_OP_THREADS),
}

# What each worker process runs first, in a bare interpreter, before it
# replaces itself (same pid) with the user's command: the parent-death
# signal (kept across exec), the check that the launcher did not die before
# it was set, and the core.
_WORKER_PRELUDE = f"""\
import ctypes, os, signal, sys
parent, core, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl({PR_SET_PDEATHSIG}, signal.SIGKILL)
if os.getppid() != parent:
    os._exit(1)
if core:
    os.sched_setaffinity(0, {{int(core)}})
try:
    os.execvp(argv[0], argv)
except OSError as err:
    print(f"tfpar launch: cannot run {{argv[0]!r}}: {{err.strerror}}", file=sys.stderr)
    os._exit(127)
"""

_POLL_SECONDS = 0.05


def launch(
    command: Sequence[str],
    *,
    num_workers: int,
    pin_cores: bool = False,
    port_base: int | None = None,
    grace_period: float = DEFAULT_GRACE_PERIOD,
) -> int:
    """Runs `command` as `num_workers` local workers of one cluster.

    Worker `i` gets, on top of this process's environment, `TF_CONFIG` =
    `{"cluster": {"worker": [...]}, "task": {"type": "worker", "index": i}}`
    for a cluster of `num_workers` worker tasks on `127.0.0.1`, and
    `PYTHONUNBUFFERED=1` (unless set) so that a Python worker's lines arrive
    as it prints them. Each line a worker writes to stdout (stderr) is written
    to this process's stdout (stderr) as `[worker i] line`. Workers read
    stdin from `/dev/null` and run in their own sessions.

    As soon as a worker exits with a non-zero status or is killed by a
    signal, the launcher prints one line on stderr naming it, sends SIGTERM to
    every other worker, SIGKILL to those still running `grace_period` seconds
    later, and returns that worker's status (`128 + signal` for a signal, as
    shells report it). SIGINT (Ctrl-C) or SIGTERM received by the launcher,
    when it runs in the main thread, is forwarded to every worker, escalated
    to SIGKILL after `grace_period` (or at a second signal), and `launch`
    returns 130 or 143. Should the launcher be killed outright, the kernel
    kills every worker too (on Linux).

    Splitting the global batch over the workers is the strategy's job, not
    the launcher's: any worker count is accepted.

    Args:
        command: The program and its arguments, e.g.
            `["python", "train.py", "--epochs", "3"]`. The program is looked
            up on `PATH` before anything starts.
        num_workers: Number of worker processes, an int >= 1.
        pin_cores: Pins worker `i` to core `i % n` of the `n` cores this
            process may use (several workers share a core when there are
            more workers than cores), and sets `TF_NUM_INTRAOP_THREADS=1` and
            `TF_NUM_INTEROP_THREADS=2` where the environment does not set
            them already, so that one worker is one core. TensorFlow reads
            both when it starts; a script that calls
            `tf.config.threading.set_*` overrides them. Defaults to `False`.
        port_base: The first port; worker `i` uses `port_base + i`. Each
            port is checked free (by binding it) before anything starts.
            `None` (the default) picks free ports.
        grace_period: Seconds a worker has to exit after SIGTERM or SIGINT
            before it is SIGKILLed. Defaults to 5.

    Returns:
        0 if every worker exited with 0; else the status of the first worker
        that failed, or 130 (SIGINT) or 143 (SIGTERM) if the launcher was
        interrupted.

    Raises:
        TypeError: If `command` is not a list or tuple of strings, or another
            argument has the wrong type.
        ValueError: If `command` is empty or its program does not exist or is
            not executable, `num_workers` < 1, a port is out of range or in
            use, or `grace_period` is negative.

    Example:

    ```python
    from tfpar.launch import launch

    status = launch(["python", "train.py", "--epochs", "3"], num_workers=2)
    # [worker 0] Epoch 1/3 ...
    # [worker 1] Epoch 1/3 ...
    sys.exit(status)
    ```
    """
    argv = check_command(command)
    check_int("num_workers", num_workers, minimum=1)
    check_bool("pin_cores", pin_cores)
    check_port_base("port_base", port_base, num_workers)
    check_number("grace_period", grace_period, minimum=0, unit="seconds")
    ports = (
        check_ports_free(port_base, num_workers)
        if port_base is not None
        else free_ports(num_workers)
    )
    cluster = {"worker": [f"{_HOST}:{port}" for port in ports]}
    cores = sorted(os.sched_getaffinity(0)) if pin_cores else []
    return _Launcher(argv, cluster, cores, grace_period).run()


def worker_environment(
    cluster: dict[str, list[str]], index: int, *, pin_cores: bool = False
) -> dict[str, str]:
    """Returns the environment `launch` gives worker `index` of `cluster`.

    This process's environment, with `TF_CONFIG` for the task, and
    `PYTHONUNBUFFERED=1` and (with `pin_cores`) `PINNED_THREAD_ENV` where
    the environment does not set them.

    Args:
        cluster: `{"worker": ["host:port", ...]}`.
        index: The worker's index.
        pin_cores: Whether the worker is pinned to one core.

    Returns:
        The environment, a new dict.

    Example:

    ```python
    env = worker_environment({"worker": ["127.0.0.1:2222"]}, 0)
    json.loads(env["TF_CONFIG"])["task"]  # {'type': 'worker', 'index': 0}
    ```
    """
    tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
    defaults = {"PYTHONUNBUFFERED": "1", **(PINNED_THREAD_ENV if pin_cores else {})}
    return {**defaults, **os.environ, "TF_CONFIG": json.dumps(tf_config)}


def check_command(command: object) -> list[str]:
    """Checks a worker command and returns it as a list.

    Args:
        command: The program and its arguments.

    Returns:
        The command as a list.

    Raises:
        TypeError: If it is not a list or tuple of strings (a single string
            is refused: write `["python", "train.py"]`).
        ValueError: If it is empty, or its program is not an executable file
            on `PATH` (or at the path given).

    Example:

    ```python
    check_command(("python", "train.py"))  # ['python', 'train.py']
    ```
    """
    allowed = "a list of strings: the program and its arguments"
    if isinstance(command, str):
        raise TypeError(
            f"`command` must be {allowed}. Received: command={command!r} "
            f"(write {command.split()!r})."
        )
    argv = list(check_sequence("command", command, str, allowed))
    if not argv or not argv[0]:
        raise value_error("command", command, f"{allowed}, e.g. ['python', 'train.py']")
    if shutil.which(argv[0]) is None:
        where = "at that path" if os.sep in argv[0] else "on PATH"
        raise ValueError(
            f"The program {argv[0]!r} does not exist {where} or is not "
            f"executable. Received: command={command!r}."
        )
    return argv


def check_port_base(name: str, port_base: object, num_workers: int) -> int | None:
    """Checks that `num_workers` ports from `port_base` are valid port numbers.

    Args:
        name: The argument's name (`"port_base"`, or `"--port-base"`).
        port_base: What the caller passed; `None` is allowed.
        num_workers: How many consecutive ports are needed.

    Raises:
        TypeError: If it is not an int or None.
        ValueError: If a port would be outside 1 to 65535.

    Example:

    ```python
    check_port_base("port_base", 65535, num_workers=2)  # ValueError
    ```
    """
    return check_int(
        name, port_base, minimum=1, maximum=_MAX_PORT - num_workers + 1, allow_none=True
    )


def check_ports_free(port_base: int, num_workers: int) -> list[int]:
    """Checks that ports `port_base` to `port_base + num_workers - 1` are free.

    Each port is bound on every interface, where TensorFlow's server listens.

    Args:
        port_base: The first port.
        num_workers: How many consecutive ports.

    Returns:
        The ports.

    Raises:
        ValueError: If one is in use, naming it.

    Example:

    ```python
    check_ports_free(23456, 2)  # [23456, 23457]
    ```
    """
    ports = list(range(port_base, port_base + num_workers))
    for index, port in enumerate(ports):
        busy = port_in_use(port)
        if busy:
            raise ValueError(
                f"Port {port} (worker {index}, port_base={port_base}) is "
                f"already in use ({busy}). Stop what uses it, choose "
                "another port base (--port-base), or leave it unset to pick "
                "free ports."
            )
    return ports


def free_ports(count: int) -> list[int]:
    """Asks the kernel for `count` distinct free loopback ports.

    A port is free when asked; another process may take it before a worker
    listens on it.

    Args:
        count: How many ports.

    Returns:
        The ports.

    Example:

    ```python
    free_ports(2)  # e.g. [41235, 39871]
    ```
    """
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((_HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def describe_status(returncode: int) -> tuple[int, str]:
    """Returns a process's exit status as a shell reports it, and in words.

    Args:
        returncode: `subprocess.Popen.returncode` (negative for a signal).

    Returns:
        The status (`128 + signal` for a signal) and a phrase like
        `"exited with status 3"`.

    Example:

    ```python
    describe_status(-9)  # (137, 'was killed by signal SIGKILL (status 137)')
    ```
    """
    if returncode >= 0:
        return returncode, f"exited with status {returncode}"
    number = -returncode
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = str(number)
    return 128 + number, f"was killed by signal {name} (status {128 + number})"


class _Output:
    """One output stream of the launcher, shared by the workers' reader threads."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._broken = False

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._broken:
                return
            try:
                buffer = getattr(self._stream, "buffer", None)
                if buffer is not None:
                    buffer.write(data)
                else:
                    self._stream.write(data.decode(errors="replace"))
                self._stream.flush()
            except (OSError, ValueError):  # closed or broken pipe: keep draining
                self._broken = True


class _Launcher:
    """The worker processes of one `launch` call, and their supervision."""

    def __init__(
        self,
        argv: list[str],
        cluster: dict[str, list[str]],
        cores: list[int],
        grace_period: float,
    ) -> None:
        self.argv = argv
        self.cluster = cluster
        self.cores = cores
        self.grace_period = grace_period
        self.processes: list[subprocess.Popen[bytes]] = []
        self.readers: list[threading.Thread] = []
        self.stdout = _Output(sys.stdout)
        self.stderr = _Output(sys.stderr)
        self.received: list[int] = []

    def run(self) -> int:
        with self._signals_handled():
            try:
                for index in range(len(self.cluster["worker"])):
                    if self.received:
                        break
                    self._spawn(index)
                status = self._supervise()
            finally:
                for process in self.processes:  # only after an exception
                    if process.poll() is None:
                        self._signal(process, signal.SIGKILL)
                        process.wait()
        # A grandchild of a worker may hold its pipe open: do not wait forever.
        deadline = time.monotonic() + 1.0
        for reader in self.readers:
            reader.join(timeout=max(0.0, deadline - time.monotonic()))
        return status

    def _spawn(self, index: int) -> None:
        core = str(self.cores[index % len(self.cores)]) if self.cores else ""
        command = [
            sys.executable,
            "-I",
            "-S",
            "-c",
            _WORKER_PRELUDE,
            str(os.getpid()),
            core,
            *self.argv,
        ]
        env = worker_environment(self.cluster, index, pin_cores=bool(self.cores))
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        self.processes.append(process)
        prefix = f"[worker {index}] ".encode()
        for pipe, output in (
            (process.stdout, self.stdout),
            (process.stderr, self.stderr),
        ):
            assert pipe is not None
            reader = threading.Thread(
                target=_copy_lines,
                args=(pipe, output, prefix),
                name=f"tfpar-launch-worker-{index}",
                daemon=True,
            )
            reader.start()
            self.readers.append(reader)

    def _supervise(self) -> int:
        """Waits until every worker exits, one fails or a signal arrives."""
        while True:
            if self.received:
                signum = self.received[0]
                self._say(
                    f"received {signal.Signals(signum).name}; stopping the workers."
                )
                self._stop(signum)
                return 128 + signum
            finished = True
            for index, process in enumerate(self.processes):
                returncode = process.poll()
                if returncode is None:
                    finished = False
                elif returncode != 0:
                    status, how = describe_status(returncode)
                    others = "; stopping the other workers" if self._running() else ""
                    self._say(f"worker {index} {how}{others}.")
                    self._stop(signal.SIGTERM)
                    return status
            if finished:
                return 0
            time.sleep(_POLL_SECONDS)

    def _stop(self, first: int) -> None:
        """Sends `first` to each running worker, then SIGKILL after the grace period.

        A further signal to the launcher meanwhile escalates at once.
        """
        already = len(self.received)
        for process in self._running():
            self._signal(process, first)
        deadline = time.monotonic() + self.grace_period
        while (
            self._running()
            and time.monotonic() < deadline
            and len(self.received) <= already
        ):
            time.sleep(_POLL_SECONDS)
        for process in self._running():
            self._signal(process, signal.SIGKILL)
        for process in self.processes:
            process.wait()

    def _running(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.processes if p.poll() is None]

    @staticmethod
    def _signal(process: subprocess.Popen[bytes], signum: int) -> None:
        # Each worker leads its own process group: its own children get it too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signum)

    def _say(self, message: str) -> None:
        self.stderr.write(f"tfpar launch: {message}\n".encode())

    @contextlib.contextmanager
    def _signals_handled(self) -> Iterator[None]:
        """Records SIGINT and SIGTERM instead of dying, in the main thread only."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def record(signum: int, frame: FrameType | None) -> None:
            self.received.append(signum)

        previous = {
            signum: signal.signal(signum, record)
            for signum in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _copy_lines(pipe: IO[bytes], output: _Output, prefix: bytes) -> None:
    """Copies each line of `pipe` to `output` behind `prefix`, until EOF."""
    with pipe:
        for line in iter(pipe.readline, b""):
            output.write(prefix + (line if line.endswith(b"\n") else line + b"\n"))
