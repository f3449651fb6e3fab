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
    ("text", "message"),
    [
        ("", "TF_CONFIG is not set"),
        ("{not json", "TF_CONFIG is not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        (json.dumps({"task": {"type": "worker"}}), "no 'cluster' entry"),
        (json.dumps({"sparseCluster": {}, "task": {}}), "sparseCluster"),
        (tf_config(cluster={"master": ["a:1"], "worker": ["b:1"]}), "call it 'chief'"),
        (tf_config(task=None), "needs a 'task' entry"),
        (tf_config(task={"type": "evaluator", "index": 0}), "type='evaluator'"),
        (tf_config(task={"type": "worker", "index": 2}), "index=2.*tasks 0 to 1"),
        (tf_config(task={"type": "worker", "index": "0"}), "index='0'"),
        (
            tf_config(cluster={"worker": ["10.0.0.2"]}),
            "'10.0.0.2' of job 'worker' has no port",
        ),
        (
            tf_config(cluster={"worker": ["0.0.0.0:2222"]}),
            "names every network interface",
        ),
        (tf_config(cluster={"worker": []}), "Job 'worker' has no tasks"),
        (tf_config(cluster={"worker": "a:1"}), "must map to a list"),
    ],
)
def test_read_tf_config_rejects_bad_configs(text, message):
    with pytest.raises((ValueError, TypeError), match=message):
        server.read_tf_config(text)


def test_serve_rejects_unknown_task_before_starting():
    with pytest.raises(ValueError, match="job_name='chief'"):
        server.serve(CLUSTER, "chief", 0)
    with pytest.raises(ValueError, match="task_index=5"):
        server.serve(CLUSTER, "ps", 5)
