"""Child processes for tests: fresh interpreters, and checks that processes ended."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import time
from typing import Any


def run_python(
    code: str,
    *,
    timeout: float = 180,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Runs `code` with this interpreter and returns the finished process.

    The child gets `TF_CPP_MIN_LOG_LEVEL=2` and the caller's environment plus
    `env`. With `check`, a non-zero exit fails with the child's output.
    """
    child_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"child exited with {proc.returncode}\n--- stdout\n{proc.stdout}"
            f"\n--- stderr\n{proc.stderr[-5000:]}"
        )
    return proc


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, waiting to be reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"


def wait_dead(pids: list[int], timeout: float = 10.0) -> list[int]:
    """Waits up to `timeout` seconds for `pids` to end; returns those still alive."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def tagged_json(stdout: str, tag: str) -> Any:
    """The JSON a child printed on its line `"<tag> <json>"`.

    Child scripts print their results as one such line, so that TensorFlow's
    own output around it does not matter.
    """
    prefix = f"{tag} "
    line = next((x for x in stdout.splitlines() if x.startswith(prefix)), None)
    if line is None:
        raise AssertionError(f"the child printed no {tag} line:\n{stdout[-3000:]}")
    return json.loads(line[len(prefix) :])


def free_ports(count: int) -> list[int]:
    """`count` loopback ports nobody listened on a moment ago."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run_workers(
    code: str, num_workers: int, *, timeout: float = 180
) -> list[subprocess.CompletedProcess[str]]:
    """Runs `code` in `num_workers` processes, each with its own `TF_CONFIG`.

    The processes form one cluster of `worker` tasks on loopback, as
    `tfpar launch` starts them. All are killed if one fails or the time runs
    out; a failed or late worker fails the caller with every worker's output.
    """
    procs, _ = start_workers(code, num_workers)
    deadline = time.monotonic() + timeout
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append(
                subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
            )
    finally:
        kill_all(procs)
    failed = [r for r in results if r.returncode != 0]
    if failed:
        raise AssertionError(
            "\n".join(
                f"--- worker exited with {r.returncode}\n{r.stdout}\n{r.stderr[-4000:]}"
                for r in results
            )
        )
    return results


def popen_python(
    code: str, env: dict[str, str], output: pathlib.Path | None = None
) -> subprocess.Popen[str]:
    """Starts `code` with this interpreter in `env` and returns at once.

    Its stdout and stderr are piped, or, with `output`, written to
    `output.out` and `output.err`: a child whose output is read only after
    it ends then never stalls on a full pipe.
    """
    args = [sys.executable, "-c", textwrap.dedent(code)]
    if output is None:
        return subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
    with (
        open(output.with_suffix(".out"), "w") as out,
        open(output.with_suffix(".err"), "w") as err,
    ):
        return subprocess.Popen(args, stdout=out, stderr=err, text=True, env=env)


def start_workers(
    code: str,
    num_workers: int,
    *,
    env: dict[str, str] | None = None,
    worker_env: list[dict[str, str]] | None = None,
    output: pathlib.Path | None = None,
) -> tuple[list[subprocess.Popen[str]], dict[str, list[str]]]:
    """Starts `code` in `num_workers` processes, each with its own `TF_CONFIG`.

    As `run_workers`, but returns at once: the started processes (stdout and
    stderr piped) and the cluster, for tests that stop or kill a worker. The
    caller must end every process (`kill_all` in a `finally`). `worker_env`
    adds variables to one worker each. With `output`, worker i writes to
    `<output>-<i>.out` and `.err` instead of pipes (`popen_python`).
    """
    ports = free_ports(num_workers)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs: list[subprocess.Popen[str]] = []
    try:
        for index in range(num_workers):
            tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
            child_env = {
                **os.environ,
                "TF_CPP_MIN_LOG_LEVEL": "2",
                "TF_CONFIG": json.dumps(tf_config),
                **(env or {}),
                **(worker_env[index] if worker_env else {}),
            }
            own = output.with_name(f"{output.name}-{index}") if output else None
            procs.append(popen_python(code, child_env, own))
    except BaseException:
        kill_all(procs)
        raise
    return procs, cluster


def kill_all(procs: list[subprocess.Popen[str]]) -> None:
    """SIGKILLs every process still running (stopped ones too) and reaps it."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired, ValueError):
            proc.communicate(timeout=10)
