"""LocalCluster: real server processes on loopback, always stopped.

Connecting a process to a cluster cannot be undone, so placement tests run in
a subprocess; the others start clusters from the test process itself.
"""

import signal

import pytest

import tfpar
from tests._subprocess import alive, run_python, wait_dead

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_workers": 0}, ValueError, r"an int >= 1\. Received: num_workers=0\."),
        ({"num_workers": 1.0}, TypeError, r"num_workers=1\.0 of type float"),
        ({"num_ps": -1}, ValueError, r"an int >= 0\. Received: num_ps=-1\."),
        ({"num_ps": True}, TypeError, r"an int\. Received: num_ps=True of type bool"),
        ({"pin_cores": "yes"}, TypeError, r"True or False\. .*pin_cores='yes'"),
        ({"start_timeout": 0}, ValueError, r"seconds > 0\. .*start_timeout=0\."),
        ({"start_timeout": "60"}, TypeError, r"start_timeout='60' of type str"),
    ],
)
def test_bad_arguments_fail_before_any_process_starts(kwargs, error, message):
    with pytest.raises(error, match=message):
        tfpar.LocalCluster(**kwargs)


def test_not_started_cluster_says_so():
    with pytest.raises(RuntimeError, match="not started"):
        tfpar.LocalCluster().cluster_spec  # noqa: B018


def test_ops_run_on_the_task_they_are_placed_on_and_processes_are_pinned():
    proc = run_python(
        """
        import os
        import tensorflow as tf, tfpar
        with tfpar.LocalCluster(num_workers=2, pin_cores=True) as cluster:
            devices = cluster.connect()
            print(devices)
            with tf.device(devices[1]):
                x = tf.reduce_sum(tf.range(10.0))
            print(x.device, x.numpy())
            cores = sorted(os.sched_getaffinity(0))
            print([sorted(os.sched_getaffinity(cluster.pid("worker", i))) for i in range(2)])
            print([cores[0]], [cores[1 % len(cores)]])
            print(cluster.pid("worker", 0), cluster.pid("worker", 1))
        """
    )
    lines = proc.stdout.splitlines()
    assert lines[0] == str(
        [
            "/job:worker/replica:0/task:0/device:CPU:0",
            "/job:worker/replica:0/task:1/device:CPU:0",
        ]
    )
    assert lines[1] == "/job:worker/replica:0/task:1/device:CPU:0 45.0"
    expected = lines[3].split(" ")
    assert lines[2] == f"[{expected[0]}, {expected[1]}]"
    assert wait_dead([int(p) for p in lines[4].split()]) == []


def test_every_process_stops_on_exceptions_and_kill_restart_works():
    cluster = tfpar.LocalCluster(num_workers=1, num_ps=1, pin_cores=False)
    with pytest.raises(KeyboardInterrupt), cluster:
        spec = cluster.cluster_spec.as_dict()
        assert sorted(spec) == ["ps", "worker"]
        assert all(a.startswith("127.0.0.1:") for a in spec["worker"] + spec["ps"])
        old = cluster.pid("worker", 0)
        cluster.kill("worker", 0)
        assert not alive(old)
        cluster.restart("worker", 0)
        pids = [cluster.pid("worker", 0), cluster.pid("ps", 0)]
        assert old not in pids and all(alive(p) for p in pids)
        assert cluster.cluster_spec.as_dict() == spec  # same addresses
        with pytest.raises(ValueError, match="job='chief'"):
            cluster.kill("chief", 0)
        raise KeyboardInterrupt  # what Ctrl-C raises
    assert wait_dead(pids) == []
    cluster.stop()  # idempotent


def test_a_killed_parent_leaves_no_server_behind():
    proc = run_python(
        """
        import os, signal, tfpar
        cluster = tfpar.LocalCluster(num_workers=2, num_ps=1, pin_cores=False).start()
        print(" ".join(str(cluster.pid(j, i)) for j, i in [("worker", 0), ("worker", 1), ("ps", 0)]), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no finally, no atexit
        """,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 3
    assert wait_dead(pids, timeout=5) == []


def test_a_killed_parent_leaves_no_stopped_server_behind():
    proc = run_python(
        """
        import os, signal, tfpar
        cluster = tfpar.LocalCluster(num_workers=1, pin_cores=False).start()
        cluster.kill("worker", 0, signal.SIGSTOP)  # a frozen server runs no thread
        print(cluster.pid("worker", 0), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL
    assert wait_dead([int(proc.stdout.split()[0])], timeout=5) == []
