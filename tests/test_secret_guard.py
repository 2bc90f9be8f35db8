"""The suite's secret guard (``tests/_secret_guard.py``) fails a run whose tests showed a test
API key, whether the run is one process or spread over pytest-xdist workers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.env import TEST_KEY, subprocess_env

LEAKY_TEST = f"""
import logging


def test_logs_the_key():
    logging.getLogger("leaky").warning("calling with key %s", {TEST_KEY!r})


def test_says_nothing():
    pass
"""


def run_guarded(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """pytest on a test that logs a key, with the guard and nothing of this suite's conftest.

    Without pytest's log capture, the guard's own handler is the only witness of the record:
    under xdist it sits in a worker, and only that worker can tell the controller."""
    (tmp_path / "test_leaky.py").write_text(LEAKY_TEST, encoding="utf-8")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging"]
        + ["-p", "tests._secret_guard", "test_leaky.py", *args],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_reported(done: subprocess.CompletedProcess[str]) -> None:
    assert "2 passed" in done.stdout, done.stdout + done.stderr
    assert done.returncode == pytest.ExitCode.TESTS_FAILED, done.stdout
    assert "an API key showed in captured output" in done.stdout
    assert "test_leaky.py::test_logs_the_key: log record of leaky at WARNING: test..." in (
        done.stdout
    )
    assert TEST_KEY not in done.stdout + done.stderr


def test_a_key_in_a_log_record_fails_the_run(tmp_path: Path) -> None:
    assert_reported(run_guarded(tmp_path))


def test_a_key_seen_by_an_xdist_worker_fails_the_run(tmp_path: Path) -> None:
    pytest.importorskip("xdist", reason="pytest-xdist is not installed")
    assert_reported(run_guarded(tmp_path, "-n", "2"))
