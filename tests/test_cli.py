import re
import socket
import subprocess
import sys

import pytest

import tfpar
from tfpar import cli


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"tfpar {tfpar.__version__}"


@pytest.mark.parametrize("command", [[], ["devices"], ["server"], ["launch"]])
def test_help_everywhere(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: tfpar" in capsys.readouterr().out


def test_devices_lists_what_a_strategy_would_use(capsys):
    assert cli.main(["devices"]) == 0
    out = capsys.readouterr().out
    assert (
        "Used by a strategy with devices=None:\n  /device:CPU:0\n  /device:CPU:1" in out
    )


def test_console_script_simulates_devices_in_a_fresh_process():
    proc = subprocess.run(
        [sys.executable, "-m", "tfpar", "devices", "--simulate", "3"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert proc.stdout.rstrip().endswith(
        "devices=None:\n  /device:CPU:0\n  /device:CPU:1\n  /device:CPU:2"
    )


def test_server_without_tf_config_fails_in_one_line(monkeypatch, capsys):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["server"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("tfpar server: error: TF_CONFIG is not set.")
    assert err.count("\n") == 1


def test_a_profiler_port_in_use_fails_in_one_line(monkeypatch, capsys):
    monkeypatch.setenv(
        "TF_CONFIG",
        '{"cluster": {"ps": ["127.0.0.1:1"]}, "task": {"type": "ps", "index": 0}}',
    )
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["server", "--profiler-port", str(port)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"tfpar server: error: `profiler_port` must be a free port; it is "
        f"already in use (Address already in use). Received: profiler_port={port}."
    ), err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["devices", "--simulate", "0"], r"`--simulate` must be an int >= 1"),
        (["server", "--core", "-1"], r"`--core` must be an int >= 0"),
        (["server", "--core", "4096"], r"`core` must be a CPU core this process"),
        (
            ["server", "--profiler-port", "0"],
            r"`--profiler-port` must be an int from 1 to 65535. Received: "
            r"--profiler-port=0",
        ),
        (
            ["server", "--profiler-port", "70000"],
            r"`--profiler-port` must be an int from 1 to 65535. Received: "
            r"--profiler-port=70000",
        ),
    ],
)
def test_bad_options_fail_in_one_line(argv, message, capsys, monkeypatch):
    monkeypatch.setenv(
        "TF_CONFIG",
        '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker"}}',
    )
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.match(rf"tfpar {argv[0]}: error: {message}.*\n\Z", err)
