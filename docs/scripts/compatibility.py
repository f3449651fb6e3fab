"""Runs the Keras compatibility matrix and rewrites docs/compatibility.md.

    python docs/scripts/compatibility.py [extra pytest arguments]

The page is rendered from this run's verdicts (tests/compatibility/table.py),
whatever their outcome, so a failing cell shows as failing. The matrix's
tests then check the page on every `make test`.
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).parents[2]
sys.path.insert(0, str(ROOT))

from tests.compatibility import table  # noqa: E402


def main() -> int:
    with tempfile.TemporaryDirectory() as folder:
        results = pathlib.Path(folder) / "verdicts.jsonl"
        env = {**os.environ, "TFPAR_COMPAT_RESULTS": str(results)}
        command = [sys.executable, "-m", "pytest", "-q", "tests/compatibility"]
        status = subprocess.run(command + sys.argv[1:], cwd=ROOT, env=env).returncode
        if not results.exists():
            print("the matrix produced no verdicts", file=sys.stderr)
            return status or 1
        verdicts = {}
        for line in results.read_text().splitlines():
            verdict = json.loads(line)
            verdicts[(verdict.pop("strategy"), verdict.pop("feature"))] = verdict
    table.PAGE.write_text(table.render(verdicts))
    print(f"wrote {table.PAGE.relative_to(ROOT)} from {len(verdicts)} cells")
    return status


if __name__ == "__main__":
    sys.exit(main())
