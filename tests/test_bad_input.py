"""Malformed calls of the public API, as a new user would make them.

One policy everywhere (`tfpar/_validation.py`): a wrong type is a `TypeError`,
a wrong value a `ValueError`, and the message names the argument, repeats the
value and says what is allowed. Every call here fails before doing anything
(no strategy is built, no process is started). The command line turns the
same mistakes into one line on stderr and exit status 2.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable

import pytest

import tfpar

DEVICES = ["/device:CPU:0", "/device:CPU:1"]
PARTITIONS = r"'auto', 'flops', 'params' or a list of layer names"
DEVICE_NAMES = r"device names like '/device:CPU:0', '/gpu:1' or '/job:worker/.*"


def mirrored(**kwargs: object) -> Callable[[], object]:
    return lambda: tfpar.MirroredStrategy(**kwargs)  # type: ignore[arg-type]


def pipeline(**kwargs: object) -> Callable[[], object]:
    return lambda: tfpar.PipelineStrategy(**{"devices": DEVICES, **kwargs})  # type: ignore[arg-type]


def cluster(**kwargs: object) -> Callable[[], object]:
    return lambda: tfpar.LocalCluster(**kwargs)  # type: ignore[arg-type]


CASES: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    # simulate_devices, default_devices
    (
        "simulate_devices(0)",
        lambda: tfpar.simulate_devices(0),
        ValueError,
        r"`n` must be an int >= 1\. Received: n=0\.",
    ),
    (
        "simulate_devices(1.5)",
        lambda: tfpar.simulate_devices(1.5),  # type: ignore[arg-type]
        TypeError,
        r"`n` must be an int\. Received: n=1\.5 of type float\.",
    ),
    (
        "simulate_devices('2')",
        lambda: tfpar.simulate_devices("2"),  # type: ignore[arg-type]
        TypeError,
        r"`n` must be an int\. Received: n='2' of type str\.",
    ),
    (
        "simulate_devices(True)",
        lambda: tfpar.simulate_devices(True),
        TypeError,
        r"`n` must be an int\. Received: n=True of type bool\.",
    ),
    (
        "default_devices(2)",
        lambda: tfpar.default_devices(2),  # type: ignore[call-arg]
        TypeError,
        r"default_devices\(\) takes 0 positional arguments but 1 was given",
    ),
    # MirroredStrategy
    (
        "mirrored devices=['banana']",
        mirrored(devices=["banana"]),
        ValueError,
        rf"`devices` must be a list of {DEVICE_NAMES}\. Received: "
        r"devices=\['banana'\], whose item 'banana' is not a device name\.",
    ),
    (
        "mirrored devices=['/cpu:x']",
        mirrored(devices=["/cpu:0", "/cpu:x"]),
        ValueError,
        r"`devices` must be .*whose item '/cpu:x' is not a device name\.",
    ),
    (
        "mirrored devices='/cpu:0'",
        mirrored(devices="/cpu:0"),
        TypeError,
        r"`devices` must be a list or tuple of device names\. "
        r"Received: devices='/cpu:0' \(for one device, write \['/cpu:0'\]\)\.",
    ),
    (
        "mirrored devices=2",
        mirrored(devices=2),
        TypeError,
        r"`devices` must be a list or tuple of device names\. "
        r"Received: devices=2 of type int\.",
    ),
    (
        "mirrored devices=[0]",
        mirrored(devices=[0]),
        TypeError,
        r"`devices` must be a list or tuple of device names\. "
        r"Received: devices=\[0\], whose item 0 is of type int\.",
    ),
    (
        "mirrored devices=[]",
        mirrored(devices=[]),
        ValueError,
        r"`devices` must name at least one device\. Received: devices=\[\]\. "
        r"Available: \['/device:CPU:0', '/device:CPU:1'\]",
    ),
    (
        "mirrored devices=['/gpu:7']",
        mirrored(devices=["/gpu:7"]),
        ValueError,
        r"`devices` names device\(s\) that do not exist: \['/gpu:7'\]\. "
        r"Received: devices=\['/gpu:7'\]\. Available: ",
    ),
    (
        "mirrored all_reduce='ring'",
        mirrored(all_reduce="ring"),
        ValueError,
        r"`all_reduce` must be one of 'auto', 'collective', 'nccl', "
        r"'hierarchical_copy', 'reduce_to_one_device'\. Received: all_reduce='ring'\.",
    ),
    (
        "mirrored all_reduce=None",
        mirrored(all_reduce=None),
        TypeError,
        r"`all_reduce` must be one of 'auto', .*Received: all_reduce=None of type",
    ),
    (
        "mirrored compression='int8'",
        mirrored(compression="int8"),
        ValueError,
        r"`compression` must be one of None, 'fp16', 'bf16'\. "
        r"Received: compression='int8'\.",
    ),
    (
        "mirrored compression=16",
        mirrored(compression=16),
        TypeError,
        r"`compression` must be one of None, 'fp16', 'bf16'\. "
        r"Received: compression=16 of type int\.",
    ),
    (
        "mirrored bucket_bytes=0",
        mirrored(bucket_bytes=0),
        ValueError,
        r"`bucket_bytes` must be an int >= 1\. Received: bucket_bytes=0\.",
    ),
    (
        "mirrored bucket_bytes='4MB'",
        mirrored(bucket_bytes="4MB"),
        TypeError,
        r"`bucket_bytes` must be an int or None\. "
        r"Received: bucket_bytes='4MB' of type str\.",
    ),
    (
        "mirrored on_nonfinite='ignore'",
        mirrored(on_nonfinite="ignore"),
        ValueError,
        r"`on_nonfinite` must be one of None, 'skip', 'raise'\. "
        r"Received: on_nonfinite='ignore'\.",
    ),
    (
        "mirrored on_nonfinite=False",
        mirrored(on_nonfinite=False),
        TypeError,
        r"`on_nonfinite` must be one of None, 'skip', 'raise'\. "
        r"Received: on_nonfinite=False of type bool\.",
    ),
    (
        "mirrored measure='yes'",
        mirrored(measure="yes"),
        TypeError,
        r"`measure` must be True or False\. Received: measure='yes' of type str\.",
    ),
    (
        "mirrored cross_device_ops='nccl'",
        mirrored(cross_device_ops="nccl"),
        TypeError,
        r"`cross_device_ops` must be .*CrossDeviceOps.*"
        r"Received: cross_device_ops='nccl' of type str\.",
    ),
    # PipelineStrategy
    (
        "pipeline devices=['banana']",
        lambda: tfpar.PipelineStrategy(devices=["banana"]),
        ValueError,
        rf"`devices` must be a list of {DEVICE_NAMES}\. Received: "
        r"devices=\['banana'\], whose item 'banana' is not a device name\.",
    ),
    (
        "pipeline num_microbatches=0",
        pipeline(num_microbatches=0),
        ValueError,
        r"`num_microbatches` must be an int >= 1\. Received: num_microbatches=0\.",
    ),
    (
        "pipeline num_microbatches='4'",
        pipeline(num_microbatches="4"),
        TypeError,
        r"`num_microbatches` must be an int\. "
        r"Received: num_microbatches='4' of type str\.",
    ),
    (
        "pipeline num_microbatches=2.0",
        pipeline(num_microbatches=2.0),
        TypeError,
        r"`num_microbatches` must be an int\. "
        r"Received: num_microbatches=2\.0 of type float\.",
    ),
    (
        "pipeline schedule='GPipe'",
        pipeline(schedule="GPipe"),
        ValueError,
        r"`schedule` must be one of 'gpipe', '1f1b', 'interleaved'\. Received: schedule='GPipe'\.",
    ),
    (
        "pipeline schedule=None",
        pipeline(schedule=None),
        TypeError,
        r"`schedule` must be one of 'gpipe', '1f1b', 'interleaved'\. "
        r"Received: schedule=None of type NoneType\.",
    ),
    (
        "pipeline partition=42",
        pipeline(partition=42),
        TypeError,
        rf"`partition` must be {PARTITIONS}\. Received: partition=42 of type int\.",
    ),
    (
        "pipeline partition=None",
        pipeline(partition=None),
        TypeError,
        rf"`partition` must be {PARTITIONS}\. "
        r"Received: partition=None of type NoneType\.",
    ),
    (
        "pipeline partition='even'",
        pipeline(partition="even"),
        ValueError,
        rf"`partition` must be {PARTITIONS}\. Received: partition='even'\.",
    ),
    (
        "pipeline partition={'dense'}",
        pipeline(partition={"dense"}),
        TypeError,
        rf"`partition` must be {PARTITIONS}\. "
        r"Received: partition=\{'dense'\} of type set\.",
    ),
    (
        "pipeline partition=[3]",
        pipeline(partition=[3]),
        TypeError,
        rf"`partition` must be {PARTITIONS}\. "
        r"Received: partition=\[3\], whose item 3 is of type int\.",
    ),
    (
        "pipeline partition=['a', 'b']",
        pipeline(partition=["a", "b"]),
        ValueError,
        r"`partition` must name the first layer of every stage but the first: "
        r"1 name\(s\) for 2 device\(s\)\. Received: partition=\['a', 'b'\]",
    ),
    (
        "pipeline recompute=1",
        pipeline(recompute=1),
        TypeError,
        r"`recompute` must be True or False\. Received: recompute=1 of type int\.",
    ),
    # LocalCluster: every check runs in the constructor, before any process.
    (
        "cluster num_workers=0",
        cluster(num_workers=0),
        ValueError,
        r"`num_workers` must be an int >= 1\. Received: num_workers=0\.",
    ),
    (
        "cluster num_workers='2'",
        cluster(num_workers="2"),
        TypeError,
        r"`num_workers` must be an int\. Received: num_workers='2' of type str\.",
    ),
    (
        "cluster num_ps=-1",
        cluster(num_ps=-1),
        ValueError,
        r"`num_ps` must be an int >= 0\. Received: num_ps=-1\.",
    ),
    (
        "cluster num_ps=1.0",
        cluster(num_ps=1.0),
        TypeError,
        r"`num_ps` must be an int\. Received: num_ps=1\.0 of type float\.",
    ),
    (
        "cluster pin_cores='yes'",
        cluster(pin_cores="yes"),
        TypeError,
        r"`pin_cores` must be True or False\. "
        r"Received: pin_cores='yes' of type str\.",
    ),
    (
        "cluster pin_cores=None",
        cluster(pin_cores=None),
        TypeError,
        r"`pin_cores` must be True or False\. "
        r"Received: pin_cores=None of type NoneType\.",
    ),
    (
        "cluster start_timeout=0",
        cluster(start_timeout=0),
        ValueError,
        r"`start_timeout` must be a number of seconds > 0\. "
        r"Received: start_timeout=0\.",
    ),
    (
        "cluster start_timeout=nan",
        cluster(start_timeout=math.nan),
        ValueError,
        r"`start_timeout` must be a finite number of seconds\. "
        r"Received: start_timeout=nan\.",
    ),
    (
        "cluster start_timeout='60'",
        cluster(start_timeout="60"),
        TypeError,
        r"`start_timeout` must be a number of seconds\. "
        r"Received: start_timeout='60' of type str\.",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_bad_input_raises_the_policy_error(
    call: Callable[[], object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        call()
    assert type(info.value) is error
    assert re.search(message, str(info.value)), str(info.value)


GOOD_TF_CONFIG = json.dumps(
    {"cluster": {"worker": ["127.0.0.1:2222"]}, "task": {"type": "worker"}}
)

# TensorFlow's own C++ logging, which no environment variable silences fully.
_TF_LOG_LINE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\)"
    r"|[IWEF]\d{4} \d\d:\d\d:[\d.]+ +\d+ \S+:\d+\] )"
)


def run_cli(args: list[str], tf_config: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    if tf_config is not None:
        env["TF_CONFIG"] = tf_config
    return subprocess.run(
        [sys.executable, "-m", "tfpar", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


@pytest.mark.parametrize(
    ("args", "tf_config", "line"),
    [
        (
            ["devices", "--simulate", "0"],
            None,
            r"tfpar devices: error: `--simulate` must be an int >= 1\. "
            r"Received: --simulate=0\.",
        ),
        (
            ["server"],
            None,
            r"tfpar server: error: TF_CONFIG is not set\. It must hold JSON like",
        ),
        (
            ["server"],
            "{not json",
            r"tfpar server: error: TF_CONFIG is not valid JSON \(.*\)\. "
            r"Received: '\{not json'\.",
        ),
        (
            ["server"],
            json.dumps(
                {
                    "cluster": {"worker": ["a:1"]},
                    "task": {"type": "worker", "index": "0"},
                }
            ),
            r"tfpar server: error: TF_CONFIG's task index must be an int\. "
            r"Received: index='0' of type str\.",
        ),
        (
            ["server", "--core", "4096"],
            GOOD_TF_CONFIG,
            r"tfpar server: error: `core` must be a CPU core this process may use, "
            r"\[.*\]\. Received: core=4096\.",
        ),
        (
            ["server", "--core", "-1"],
            GOOD_TF_CONFIG,
            r"tfpar server: error: `--core` must be an int >= 0\. Received: --core=-1\.",
        ),
    ],
    ids=["simulate-0", "no-tf-config", "bad-json", "string-index", "core", "core-1"],
)
def test_cli_turns_bad_input_into_one_line_and_status_2(
    args: list[str], tf_config: str | None, line: str
) -> None:
    proc = run_cli(args, tf_config)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    ours = [x for x in proc.stderr.splitlines() if not _TF_LOG_LINE.match(x)]
    assert len(ours) == 1, proc.stderr
    assert re.fullmatch(line + ".*", ours[0]), ours[0]
    assert proc.stdout == ""


def test_cli_option_errors_follow_argparse() -> None:
    proc = run_cli(["devices", "--simulate", "two"], None)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        "tfpar devices: error: argument --simulate: invalid int value: 'two'"
    )
