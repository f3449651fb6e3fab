"""Runs one part of a benchmark in a child process and returns its result.

TensorFlow configures devices once per process, so each part (a device
setting, a number of workers) runs in its own. The child prints its result
as JSON on its last line of stdout.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


def child_result(
    command: list[str],
    *,
    name: str,
    out: str,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
) -> Any:
    """Runs `command` and returns the JSON on the last line of its stdout.

    Args:
        command: The child's command line.
        name: The part's name (a file-name-safe word), for the message and
            the stderr file.
        out: The benchmark's JSON output path; a failed child's whole stderr
            is written to `{out}.{name}.stderr`.
        env: The child's environment (defaults to this process's).
        timeout: Seconds before the child is killed (default: no limit).

    Returns:
        The decoded result.

    Raises:
        SystemExit: If the child fails, after printing the end of its stderr.
    """
    proc = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        log = f"{out}.{name}.stderr"
        with open(log, "w") as f:
            f.write(proc.stderr)
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(
            f"benchmark part {name!r} failed (exit status {proc.returncode}); "
            f"its whole stderr is in {log}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])
