"""What the command line costs before it does anything: `blockfilter --version` imports none of
the heavy libraries (Celery, requests, phonenumbers, pluggy, importlib.metadata); the commands
that need them import them. (How long start-up takes is the benchmarks' to measure.)"""

from __future__ import annotations

import json
import subprocess
import sys

from blockfilter import __version__

HEAVY = ("celery", "kombu", "requests", "phonenumbers", "pluggy", "importlib.metadata")

# Runs the console script's entry point as the installed `blockfilter` does, then reports
# which of the heavy modules the process imported.
PROBE = """
import json, sys
sys.argv = ["blockfilter", *sys.argv[1:]]
from blockfilter.cli import main
try:
    code = main()
except SystemExit as stop:
    code = stop.code
heavy = sorted(name for name in {heavy!r} if name in sys.modules)
print(json.dumps({{"code": code, "heavy": heavy}}), file=sys.stderr)
"""


def probe(*arguments: str) -> tuple[dict[str, object], str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), *arguments],
        capture_output=True,
        text=True,
        timeout=60,
    )
    report = json.loads(done.stderr.strip().splitlines()[-1])
    return report, done.stdout


def test_version_imports_none_of_the_heavy_libraries() -> None:
    report, stdout = probe("--version")
    assert stdout == f"blockfilter {__version__}\n"
    assert report == {"code": 0, "heavy": []}


def test_a_command_that_needs_them_still_imports_them() -> None:
    # The probe sees imports: `plugins` lists the installed plugins, through pluggy.
    report, stdout = probe("plugins")
    assert report["code"] == 0
    assert "pluggy" in report["heavy"]
    assert stdout
