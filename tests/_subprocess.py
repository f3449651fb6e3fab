"""Runs Python code in a fresh interpreter, for tests that need a new process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap


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
