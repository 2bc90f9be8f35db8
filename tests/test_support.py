"""The tests' shared support: the environment of child processes and the worker launcher."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.support.env import FAST_RETRIES, ROOT, TEST_KEY, TEST_SID, subprocess_env
from tests.support.workers import Worker


class Upstream:
    base_url = "http://127.0.0.1:9"


def test_a_child_gets_none_of_the_machines_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KALEYRA_API_KEY", "the-machines-key")
    monkeypatch.setenv("BLOCKFILTER_CACHE_URL", "redis://prod:6379/0")
    monkeypatch.setenv("BFTEST_QUEUE", "someone-elses")
    monkeypatch.setenv("HOME", "/home/someone")
    env = subprocess_env(strip=("BFTEST_",))
    assert not [k for k in env if k.startswith(("KALEYRA_", "BLOCKFILTER_", "BFTEST_"))]
    assert env["HOME"] == "/home/someone"


def test_a_child_imports_this_checkout_first(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    inherited = tmp_path / "inherited"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(inherited), str(ROOT)]))
    env = subprocess_env(path=[tmp_path / "plugins"])
    assert env["PYTHONPATH"].split(os.pathsep) == [
        str(tmp_path / "plugins"),
        str(ROOT),
        str(inherited),
    ]
    assert subprocess_env(PYTHONPATH="only-this")["PYTHONPATH"] == "only-this"


def test_an_upstream_brings_the_test_account_and_a_short_budget() -> None:
    env = subprocess_env(Upstream(), BLOCKFILTER_RETRY_ATTEMPTS="5", EXTRA="1")
    assert (env["KALEYRA_SID"], env["KALEYRA_API_KEY"]) == (TEST_SID, TEST_KEY)
    assert env["KALEYRA_BASE_URL"] == Upstream.base_url
    assert env["BLOCKFILTER_RETRY_ATTEMPTS"] == "5"  # what the test asks for wins
    assert env["EXTRA"] == "1"
    for name, value in FAST_RETRIES.items():
        if name != "BLOCKFILTER_RETRY_ATTEMPTS":
            assert env[name] == value
    assert subprocess_env("http://127.0.0.1:8")["KALEYRA_BASE_URL"] == "http://127.0.0.1:8"
    assert "KALEYRA_SID" not in subprocess_env()


def test_a_worker_runs_the_app_it_is_given_on_its_own_queue(tmp_path: Path) -> None:
    worker = Worker({}, "q1", tmp_path / "w.log", "w1", app="my_app", concurrency=3)
    command = worker.command()
    assert command[:5] == [sys.executable, "-m", "celery", "-A", "my_app"]
    assert command[command.index("-Q") + 1] == "q1"
    assert command[command.index("-n") + 1] == "w1@localhost"
    assert command[command.index("-c") + 1] == "3"
    assert worker.cwd == ROOT
