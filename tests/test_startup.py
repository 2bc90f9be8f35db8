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


def test_a_filter_run_switches_threads_quickly_and_puts_the_interval_back(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The request threads must not wait 5 ms for the interpreter each time an answer comes in
    # while the main thread reads the input: the pool would sit idle (bench_flight).
    import sys

    from blockfilter import cli
    from blockfilter.gcpacing import RUN_SWITCH_INTERVAL

    before = sys.getswitchinterval()
    seen: list[float] = []

    def filter_run(args: object) -> int:
        seen.append(sys.getswitchinterval())
        raise ConfigError("stopped half way")

    monkeypatch.setattr(cli, "_filter", filter_run)
    assert cli.main(["filter", str(tmp_path / "campaign.jsonl")]) == cli.EXIT_USAGE
    assert seen == [pytest.approx(RUN_SWITCH_INTERVAL)] and before > RUN_SWITCH_INTERVAL
    assert sys.getswitchinterval() == before


def test_runs_that_overlap_share_the_pacing_and_the_last_one_out_puts_it_back() -> None:
    # A worker with a thread pool runs batches at once: the first one's end must not put the
    # collector back under the second one, nor the second one's restore the first one's values.
    import threading

    from blockfilter.gcpacing import RUN_THRESHOLDS, paced_collections

    before = gc.get_threshold()
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, tuple[int, ...]] = {}

    def second() -> None:
        first_in.wait(5)
        with paced_collections():
            second_in.set()
            first_out.wait(5)
            seen["second after the first left"] = gc.get_threshold()

    worker = threading.Thread(target=second)
    worker.start()
    with paced_collections():
        first_in.set()
        second_in.wait(5)
    first_out.set()
    worker.join(5)
    assert seen["second after the first left"] == RUN_THRESHOLDS
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_a_task_batch_is_checked_with_paced_collections() -> None:
    from blockfilter import hookimpl
    from blockfilter.config import load_settings
    from blockfilter.gcpacing import RUN_THRESHOLDS
    from blockfilter.pipeline import batch
    from blockfilter.plugins.manager import get_plugin_manager, reset_plugin_manager
    from blockfilter.sources import FunctionSource
    from blockfilter.testing.simulator import Simulator

    seen: list[tuple[int, ...]] = []

    def blocklist(channel: str, numbers: list[str]) -> set[str]:
        seen.append(gc.get_threshold())  # while the batch is being checked
        return set()

    class OptOutTable:  # a pipeline's own source, as a plugin registers it
        @hookimpl
        def blockfilter_blocklist_sources(self, settings: object) -> list[object]:
            return [FunctionSource("optouts", blocklist)]

    before = gc.get_threshold()
    with Simulator(sid="GCSID", api_key="gc-key-81f3") as simulator:
        conf = {
            "kaleyra_sid": "GCSID",
            "kaleyra_api_key": "gc-key-81f3",
            "kaleyra_base_url": simulator.base_url,
            "blockfilter_load_plugins": "",
        }
        reset_plugin_manager()
        get_plugin_manager(load_settings(celery_conf=conf)).register(OptOutTable())
        try:
            message = {"id": "m1", "channel": "sms", "to": "+919812300001"}
            checked = batch.check_batch([message], conf, retries_left=lambda settings: False)
        finally:
            reset_plugin_manager()
    assert [r["verdict"] for r in checked.results] == ["allowed"]
    assert seen == [RUN_THRESHOLDS]
    assert gc.get_threshold() == before
