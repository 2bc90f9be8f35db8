"""What the command line costs besides its work: `blockfilter --version` imports none of the
heavy libraries (Celery, requests, phonenumbers, pluggy, importlib.metadata), the commands that
need them import them, and a filter run puts the garbage collector back as it found it. (How
long any of it takes is the benchmarks' to measure.)"""

from __future__ import annotations

import gc
import json
import subprocess
import sys

import pytest

from blockfilter import __version__
from blockfilter.errors import ConfigError

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


# -- garbage collection during a run -------------------------------------------------------------


def test_a_filter_run_leaves_the_garbage_collector_as_it_found_it(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from blockfilter import cli

    before = gc.get_threshold()
    seen: list[tuple[tuple[int, ...], int]] = []

    def filter_run(args: object) -> int:
        seen.append((gc.get_threshold(), gc.get_freeze_count()))
        raise ConfigError("stopped half way")  # a run that fails still puts it back

    monkeypatch.setattr(cli, "_filter", filter_run)
    assert cli.main(["filter", str(tmp_path / "campaign.jsonl")]) == cli.EXIT_USAGE
    ((during, frozen),) = seen
    assert during[0] > before[0] and frozen > 0  # paced for the run...
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0  # ...and put back
