import json

import pytest

from tfpar import server

CLUSTER = {"worker": ["10.0.0.2:2222", "10.0.0.3:2222"], "ps": ["10.0.0.4:2222"]}


def tf_config(**overrides):
    config = {"cluster": CLUSTER, "task": {"type": "worker", "index": 1}, **overrides}
    return json.dumps(config)


def test_read_tf_config():
    task = server.read_tf_config(tf_config())
    assert task == server.TaskConfig(
        cluster={job: tuple(a) for job, a in CLUSTER.items()},
        task_type="worker",
        task_index=1,
    )


def test_read_tf_config_from_the_environment(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", tf_config(task={"type": "ps", "index": 0}))
    assert server.read_tf_config().task_type == "ps"


@pytest.mark.parametrize(
    ("text", "error", "message"),
    [
        ("", ValueError, "TF_CONFIG is not set"),
        ("{not json", ValueError, "TF_CONFIG is not valid JSON"),
        ("[1, 2]", TypeError, "must be a JSON object"),
        (json.dumps({"task": {"type": "worker"}}), ValueError, "no 'cluster' entry"),
        (json.dumps({"sparseCluster": {}, "task": {}}), ValueError, "sparseCluster"),
        (
            tf_config(cluster={"master": ["a:1"], "worker": ["b:1"]}),
            ValueError,
            "call it 'chief'",
        ),
        (tf_config(task=None), ValueError, "needs a 'task' entry"),
        (tf_config(task=["worker", 0]), TypeError, "needs a 'task' entry"),
        (
            tf_config(task={"type": "evaluator", "index": 0}),
            ValueError,
            "type='evaluator'",
        ),
        (
            tf_config(task={"type": ["worker"], "index": 0}),
            TypeError,
            r"type=\['worker'\] of type list",
        ),
        (
            tf_config(task={"type": "worker", "index": 2}),
            ValueError,
            "index=2.*tasks 0 to 1",
        ),
        (
            tf_config(task={"type": "worker", "index": "0"}),
            TypeError,
            "must be an int. Received: index='0' of type str",
        ),
        (
            tf_config(cluster={"worker": ["10.0.0.2"]}),
            ValueError,
            "'10.0.0.2' of job 'worker' has no port",
        ),
        (
            tf_config(cluster={"worker": ["10.0.0.2:70000"]}),
            ValueError,
            r"'10.0.0.2:70000' of job 'worker' has no port \(.*from 1 to 65535",
        ),
        (
            tf_config(cluster={"worker": [2222]}),
            TypeError,
            "whose item 2222 is of type int",
        ),
        (
            tf_config(cluster={"worker": ["0.0.0.0:2222"]}),
            ValueError,
            "names every network interface",
        ),
        (tf_config(cluster={"worker": []}), ValueError, "Job 'worker' has no tasks"),
        (tf_config(cluster={"worker": "a:1"}), TypeError, "must map to a list"),
    ],
)
def test_read_tf_config_rejects_bad_configs(text, error, message):
    with pytest.raises(error, match=message):
        server.read_tf_config(text)


def test_serve_rejects_unknown_task_before_starting():
    with pytest.raises(
        ValueError, match=r"one of 'ps', 'worker'\. Received: job_name='chief'\."
    ):
        server.serve(CLUSTER, "chief", 0)
    with pytest.raises(
        ValueError, match=r"an int from 0 to 0\. Received: task_index=5\."
    ):
        server.serve(CLUSTER, "ps", 5)
    with pytest.raises(TypeError, match=r"Received: task_index='0' of type str"):
        server.serve(CLUSTER, "ps", "0")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"a CPU core this process may use, \[.*core=4096"
    ):
        server.serve(CLUSTER, "ps", 0, core=4096)
    with pytest.raises(TypeError, match=r"Received: core='0' of type str"):
        server.serve(CLUSTER, "ps", 0, core="0")  # type: ignore[arg-type]
