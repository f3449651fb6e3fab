import pytest
import tensorflow as tf

import tfpar
from tests._subprocess import run_python
from tfpar import devices


def test_simulate_devices_again_with_same_count_is_a_no_op():
    assert tfpar.simulate_devices(2) == ["/device:CPU:0", "/device:CPU:1"]
    assert len(tf.config.list_logical_devices("CPU")) == 2


def test_simulate_devices_after_initialization_says_why_and_what_to_do():
    with pytest.raises(
        RuntimeError, match=r"simulate_devices\(3\).*initialized.*2 logical"
    ):
        tfpar.simulate_devices(3)


@pytest.mark.parametrize("bad", [0, -1])
def test_simulate_devices_rejects_counts_below_one(bad):
    with pytest.raises(ValueError, match=rf"an int >= 1\. Received: n={bad!r}\."):
        tfpar.simulate_devices(bad)


@pytest.mark.parametrize("bad", [1.5, "2", True, None])
def test_simulate_devices_rejects_non_ints(bad):
    with pytest.raises(
        TypeError, match=rf"an int\. Received: n={bad!r} of type {type(bad).__name__}"
    ):
        tfpar.simulate_devices(bad)


def test_simulated_devices_run_ops_where_placed():
    with tf.device("/device:CPU:1"):
        x = tf.constant([1.0, 2.0]) * 3
    assert x.device.endswith("CPU:1")
    assert x.numpy().tolist() == [3.0, 6.0]


def test_default_devices_are_all_logical_cpus_without_gpus():
    assert tfpar.default_devices() == ["/device:CPU:0", "/device:CPU:1"]


def test_simulate_devices_in_a_fresh_process_and_too_late():
    proc = run_python(
        """
        import tensorflow as tf, tfpar
        print(tfpar.simulate_devices(3))
        print(tfpar.default_devices())
        """
    )
    assert proc.stdout.splitlines()[-1] == str(
        ["/device:CPU:0", "/device:CPU:1", "/device:CPU:2"]
    )
    late = run_python(
        """
        import tensorflow as tf, tfpar
        tf.constant(1.0) + 1
        tfpar.simulate_devices(4)
        """,
        check=False,
    )
    assert late.returncode != 0
    assert (
        "RuntimeError: simulate_devices(4) was called after TensorFlow" in late.stderr
    )


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("/gpu:0", "/device:GPU:0"),
        ("/cpu:1", "/device:CPU:1"),
        ("/job:localhost/replica:0/task:0/device:CPU:1", "/device:CPU:1"),
        (
            "/job:worker/task:1/device:CPU:0",
            "/job:worker/replica:0/task:1/device:CPU:0",
        ),
    ],
)
def test_canonical_device(name, canonical):
    assert devices.canonical_device(name) == canonical


def test_resolve_devices_accepts_any_spelling_and_keeps_order():
    assert devices.resolve_devices(("/cpu:1", "/CPU:0")) == [
        "/device:CPU:1",
        "/device:CPU:0",
    ]
    assert devices.resolve_devices(None) == tfpar.default_devices()


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (
            "/cpu:0",
            TypeError,
            r"list or tuple.*Received: devices='/cpu:0'.*write \['/cpu:0'\]",
        ),
        ({"/cpu:0"}, TypeError, r"Received: devices=\{'/cpu:0'\} of type set"),
        ([0], TypeError, r"Received: devices=\[0\], whose item 0 is of type int"),
        ([], ValueError, r"at least one device.*Available: \['/device:CPU:0'"),
        (
            ["/cpu:0", "/CPU:0"],
            ValueError,
            r"more than once.*duplicates: \['/device:CPU:0'\]",
        ),
        (["/gpu:7"], ValueError, r"do not exist: \['/gpu:7'\].*Available"),
        (["/cpu:0", "/cpu:9"], ValueError, r"do not exist: \['/cpu:9'\]"),
        (["/job:worker/task:0/device:CPU:0"], ValueError, r"do not exist"),
        (
            ["nonsense"],
            ValueError,
            r"device names like '/device:CPU:0'.*Received: devices=\['nonsense'\], "
            r"whose item 'nonsense' is not a device name",
        ),
        (["/cpu:0", ""], ValueError, r"whose item '' is not a device name"),
        (["/cpu:x"], ValueError, r"whose item '/cpu:x' is not a device name"),
    ],
)
def test_resolve_devices_rejects_bad_input(bad, error, message):
    with pytest.raises(error, match=message):
        devices.resolve_devices(bad)


def test_device_report_lists_physical_logical_and_default():
    text = devices.DeviceReport.collect().format()
    assert "/physical_device:CPU:0  (CPU)" in text
    assert text.endswith(
        "Used by a strategy with devices=None:\n  /device:CPU:0\n  /device:CPU:1"
    )
