"""`tfpar launch` and `tfpar.launch.launch`: real worker processes, real signals.

Workers are plain Python scripts (`WORKER` below), so that most tests start in
milliseconds; one test runs TensorFlow under two workers. Every worker writes
its pid to a file first: the `pids` fixture kills any still alive after the
test, whatever happened.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests._subprocess import alive, wait_dead
from tfpar import cli
from tfpar.launch import launch

# argv: MODE PID_DIR. Each worker writes PID_DIR/<index>.pid, then acts by mode.
WORKER = textwrap.dedent(
    """
    import json, os, signal, sys, time

    mode, pid_dir = sys.argv[1], sys.argv[2]
    config = json.loads(os.environ["TF_CONFIG"])
    index = config["task"]["index"]
    count = len(config["cluster"]["worker"])
    tmp = os.path.join(pid_dir, f"{index}.tmp")
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, os.path.join(pid_dir, f"{index}.pid"))

    def all_started():
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if all(os.path.exists(os.path.join(pid_dir, f"{i}.pid"))
                   for i in range(count)):
                return
            time.sleep(0.02)

    def record(signum, frame):
        with open(os.path.join(pid_dir, f"{index}.signal"), "w") as f:
            f.write(signal.Signals(signum).name)
        sys.exit(0)

    if mode == "report":
        print("TF_CONFIG", os.environ["TF_CONFIG"])
        print("PINNED", json.dumps([sorted(os.sched_getaffinity(0)),
              os.environ.get("TF_NUM_INTRAOP_THREADS"),
              os.environ.get("TF_NUM_INTEROP_THREADS")]))
        print(f"on stderr from {index}", file=sys.stderr)
        sys.stdout.write("no newline at the end")
    elif mode in ("fail", "sigkill", "stubborn"):
        if mode == "stubborn":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if index == 1:
            all_started()
            if mode == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            sys.exit(3)
        time.sleep(60)
    elif mode == "sleep":
        signal.signal(signal.SIGINT, record)
        signal.signal(signal.SIGTERM, record)
        time.sleep(60)
    """
)


@pytest.fixture
def worker(tmp_path: Path) -> Path:
    path = tmp_path / "worker.py"
    path.write_text(WORKER)
    return path


@pytest.fixture
def pid_dir(tmp_path: Path):
    """The directory workers write their pids to; kills any still alive after."""
    directory = tmp_path / "pids"
    directory.mkdir()
    yield directory
    for pid in _pids(directory):
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def _pids(directory: Path) -> list[int]:
    return [int(p.read_text()) for p in sorted(directory.glob("*.pid"))]


def _wait_for_pids(directory: Path, count: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(pids := _pids(directory)) < count:
        assert time.monotonic() < deadline, f"only {len(pids)} workers started"
        time.sleep(0.05)
    return pids


def _command(worker: Path, mode: str, pid_dir: Path) -> list[str]:
    return [sys.executable, str(worker), mode, str(pid_dir)]


@pytest.mark.timeout(30)
def test_each_worker_gets_its_task_and_prefixed_output(worker, pid_dir, capfd):
    assert launch(_command(worker, "report", pid_dir), num_workers=3) == 0
    out, err = capfd.readouterr()
    configs = [
        json.loads(line.split("TF_CONFIG ", 1)[1])
        for line in out.splitlines()
        if "TF_CONFIG " in line
    ]
    assert sorted(c["task"]["index"] for c in configs) == [0, 1, 2]
    assert all(c["task"]["type"] == "worker" for c in configs)
    clusters = {json.dumps(c["cluster"]) for c in configs}
    assert len(clusters) == 1
    addresses = configs[0]["cluster"]["worker"]
    assert len(set(addresses)) == 3
    assert all(re.fullmatch(r"127\.0\.0\.1:\d+", a) for a in addresses)
    for i in range(3):
        mine = [line for line in out.splitlines() if f'"index": {i}}}' in line]
        assert mine and all(line.startswith(f"[worker {i}] TF_CONFIG") for line in mine)
        assert f"[worker {i}] no newline at the end\n" in out
        assert f"[worker {i}] on stderr from {i}\n" in err
        assert f"on stderr from {i}" not in out
    assert all(re.match(r"\[worker \d\] ", line) for line in out.splitlines())


@pytest.mark.timeout(30)
def test_port_base_and_pinned_cores(worker, pid_dir, capfd):
    port_base = _free_port_range(3)
    status = launch(
        _command(worker, "report", pid_dir),
        num_workers=3,
        pin_cores=True,
        port_base=port_base,
    )
    assert status == 0
    out = capfd.readouterr().out
    cores = sorted(os.sched_getaffinity(0))
    for i in range(3):
        config = json.loads(_tagged(out, i, "TF_CONFIG"))
        assert config["cluster"]["worker"] == [
            f"127.0.0.1:{port_base + j}" for j in range(3)
        ]
        assert json.loads(_tagged(out, i, "PINNED")) == [
            [cores[i % len(cores)]],
            "1",
            "2",
        ]


@pytest.mark.timeout(30)
def test_a_failing_worker_stops_the_others_and_gives_its_status(worker, pid_dir, capfd):
    start = time.monotonic()
    status = launch(_command(worker, "fail", pid_dir), num_workers=3)
    elapsed = time.monotonic() - start
    assert status == 3
    assert elapsed < 4  # the sleepers (60 s) ended at SIGTERM, not after the grace
    assert wait_dead(_pids(pid_dir), timeout=2) == []
    err = capfd.readouterr().err
    assert (
        "tfpar launch: worker 1 exited with status 3; stopping the other workers.\n"
        in err
    )
    assert err.count("tfpar launch:") == 1


@pytest.mark.timeout(30)
def test_a_worker_killed_by_a_signal_gives_128_plus_signal(worker, pid_dir, capfd):
    status = launch(_command(worker, "sigkill", pid_dir), num_workers=2)
    assert status == 128 + signal.SIGKILL == 137
    assert wait_dead(_pids(pid_dir), timeout=2) == []
    err = capfd.readouterr().err
    assert "tfpar launch: worker 1 was killed by signal SIGKILL (status 137)" in err


@pytest.mark.timeout(30)
def test_a_worker_ignoring_sigterm_is_killed_after_the_grace_period(
    worker, pid_dir, capfd
):
    start = time.monotonic()
    status = launch(
        _command(worker, "stubborn", pid_dir), num_workers=2, grace_period=1.0
    )
    elapsed = time.monotonic() - start
    assert status == 3
    assert 1.0 <= elapsed < 5
    assert wait_dead(_pids(pid_dir), timeout=2) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)]
)
def test_a_signal_to_the_launcher_stops_every_worker(
    worker, pid_dir, tmp_path, sig, status
):
    launcher = _start_launcher(worker, "sleep", pid_dir, tmp_path)
    try:
        pids = _wait_for_pids(pid_dir, 2, timeout=40)
        launcher.send_signal(sig)
        assert launcher.wait(timeout=10) == status
        assert wait_dead(pids, timeout=2) == []
        # Each worker received the launcher's signal, forwarded once.
        for i in range(2):
            assert (pid_dir / f"{i}.signal").read_text() == sig.name
        err = (tmp_path / "launcher.err").read_text()
        assert f"tfpar launch: received {sig.name}; stopping the workers.\n" in err
    finally:
        _kill(launcher)


@pytest.mark.timeout(60)
def test_workers_die_with_a_killed_launcher(worker, pid_dir, tmp_path):
    launcher = _start_launcher(worker, "sleep", pid_dir, tmp_path)
    try:
        pids = _wait_for_pids(pid_dir, 2, timeout=40)
        assert all(alive(p) for p in pids)
        launcher.kill()
        launcher.wait(timeout=10)
        assert wait_dead(pids, timeout=5) == []
        assert not list(pid_dir.glob("*.signal"))  # killed, not asked
    finally:
        _kill(launcher)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workers", "0", "--", "python"], r"`--workers` must be an int >= 1\."),
        (["--workers", "-2", "--", "python"], r"`--workers` must be an int >= 1\."),
        (["--workers", "2", "--"], r"No command to run: give it after `--`"),
        (["--workers", "2"], r"No command to run: give it after `--`"),
        (
            ["--workers", "2", "--port-base", "65535", "--", "python"],
            r"`--port-base` must be an int from 1 to 65534\. "
            r"Received: --port-base=65535\.",
        ),
        (
            ["--workers", "2", "--port-base", "0", "--", "python"],
            r"`--port-base` must be an int from 1 to 65534\.",
        ),
        (
            ["--workers", "2", "--", "no-such-program-tfpar", "x"],
            r"The program 'no-such-program-tfpar' does not exist on PATH",
        ),
        (
            ["--workers", "2", "--", "/nonexistent/train.py"],
            r"The program '/nonexistent/train.py' does not exist at that path",
        ),
    ],
)
def test_bad_input_fails_in_one_line_before_starting(argv, message, capfd):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["launch", *argv])
    assert exit_info.value.code == 2
    out, err = capfd.readouterr()
    assert out == ""
    assert re.match(rf"tfpar launch: error: {message}.*\n\Z", err)


@pytest.mark.timeout(30)
def test_a_port_in_use_is_named_before_starting(worker, pid_dir, capfd):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit) as exit_info:
            cli.main(
                [
                    *("launch", "--workers", "2", "--port-base", str(port - 1), "--"),
                    *_command(worker, "report", pid_dir),
                ]
            )
        assert exit_info.value.code == 2
        err = capfd.readouterr().err
        assert err.startswith(
            f"tfpar launch: error: Port {port} (worker 1, port_base={port - 1}) "
            "is already in use"
        )
        assert "choose another port base (--port-base)" in err
        assert err.count("\n") == 1
        with pytest.raises(ValueError, match=f"Port {port} "):
            launch(["python"], num_workers=1, port_base=port)
    assert _pids(pid_dir) == []


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"command": "python x.py"}, TypeError, r"write \['python', 'x\.py'\]"),
        ({"command": ["python", 3]}, TypeError, r"whose item 3 is of type int"),
        ({"command": []}, ValueError, r"`command` must be a list of strings"),
        ({"num_workers": True}, TypeError, r"`num_workers` must be an int\."),
        ({"num_workers": 0}, ValueError, r"`num_workers` must be an int >= 1\."),
        ({"pin_cores": 1}, TypeError, r"`pin_cores` must be True or False\."),
        ({"port_base": "2222"}, TypeError, r"`port_base` must be an int or None\."),
        ({"grace_period": -1}, ValueError, r"`grace_period` must be a number of"),
    ],
)
def test_bad_arguments_of_the_api(kwargs, error, message):
    arguments = {"command": ["python", "x.py"], "num_workers": 2, **kwargs}
    with pytest.raises(error, match=message):
        launch(**arguments)


@pytest.mark.timeout(120)
def test_tensorflow_workers_all_reduce_over_the_launched_cluster(tmp_path, capfd):
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            """
            import os
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
            import tensorflow as tf

            strategy = tf.distribute.MultiWorkerMirroredStrategy()
            ctx = tf.distribute.get_replica_context

            @tf.function
            def step():
                task = strategy.cluster_resolver.task_id
                return ctx().all_reduce(tf.distribute.ReduceOp.SUM, tf.constant(float(task + 1)))

            total = strategy.experimental_local_results(strategy.run(step))[0]
            print("TOTAL", float(total), strategy.num_replicas_in_sync)
            """
        )
    )
    status = launch([sys.executable, str(script)], num_workers=2, pin_cores=True)
    out = capfd.readouterr().out
    assert status == 0, out
    assert "[worker 0] TOTAL 3.0 2\n" in out
    assert "[worker 1] TOTAL 3.0 2\n" in out


def _tagged(out: str, index: int, tag: str) -> str:
    prefix = f"[worker {index}] {tag} "
    return next(line for line in out.splitlines() if line.startswith(prefix))[
        len(prefix) :
    ]


def _free_port_range(count: int) -> int:
    """A base port whose `count` ports are free now (retries a few bases)."""
    for _ in range(20):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count > 65535:
            continue
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("", port))
        except OSError:
            continue
        return base
    raise AssertionError("no free port range")


def _start_launcher(
    worker: Path, mode: str, pid_dir: Path, tmp_path: Path
) -> subprocess.Popen[bytes]:
    with (
        open(tmp_path / "launcher.out", "wb") as out,
        open(tmp_path / "launcher.err", "wb") as err,
    ):
        return subprocess.Popen(
            [
                *(sys.executable, "-m", "tfpar", "launch", "--workers", "2", "--"),
                *_command(worker, mode, pid_dir),
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        )


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=10)


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["launch", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tfpar launch [-h] --workers N [--pin-cores]")
