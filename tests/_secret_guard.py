"""A suite-wide guard: no API key of the test suite in anything the suite captured.

Register it from ``tests/conftest.py`` with one line::

    pytest_plugins = ["tests._secret_guard"]

(or for one run: ``pytest -p tests._secret_guard``). What it watches:

* every log record that reaches the root logger, through a handler at DEBUG. It lowers no
  logger's level, so the tests see exactly the records they would without it; a test that
  turns DEBUG on (``caplog.set_level``, ``-vv``) is watched at DEBUG;
* each test's captured stdout, stderr and log sections and its failure text.

A sighting does not stop the test that made it: at the end of the session every sighting is
listed (test, where, which key, masked) and the run fails. Under pytest-xdist each worker hands
its sightings to the controller, which lists them and fails the run. Output a test captures itself
(a subprocess's ``stdout``) is the test's to check; ``tests/test_secrets.py`` does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

# Every key the suite hands to the code under test. More can be added for a run with
# BLOCKFILTER_GUARDED_SECRETS=a,b.
KNOWN_TEST_KEYS = (
    # tests.support.env.TEST_KEY, blockfilter.testing.pytest_plugin.TEST_API_KEY
    "test-key-0123456789",
    "sekrit-client-key-7f3a9c",  # tests/test_client.py
    "sim-key-0123456789abcdef",  # tests/test_simulator.py
    "sekrit-Key-9d41e07bb2",  # tests/test_secrets.py
    "ledger-key-A-0123456789abcdefghijklmnop",  # tests/ledger_support.py (opt-out ledger keys)
    "ledger-key-B-0123456789abcdefghijklmnop",
)


def guarded_secrets() -> tuple[str, ...]:
    extra = os.environ.get("BLOCKFILTER_GUARDED_SECRETS", "")
    return KNOWN_TEST_KEYS + tuple(s.strip() for s in extra.split(",") if s.strip())


def _masked(secret: str) -> str:
    return secret[:4] + "..." if len(secret) > 8 else "..."


@dataclass
class _Sightings:
    secrets: tuple[str, ...]
    current: str = "(outside any test)"
    found: list[tuple[str, str, str]] = field(default_factory=list)

    def check(self, text: str, where: str, test: str | None = None) -> None:
        for secret in self.secrets:
            if secret in text:
                self.found.append((test or self.current, where, _masked(secret)))


class _GuardHandler(logging.Handler):
    def __init__(self, sightings: _Sightings) -> None:
        super().__init__(logging.DEBUG)
        self._sightings = sightings
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # a record that cannot be formatted: check its raw parts
            text = f"{record.msg!r} {record.args!r}"
        self._sightings.check(text, f"log record of {record.name} at {record.levelname}")


# One session per process; set by pytest_configure.
_sightings: _Sightings | None = None
_handler: _GuardHandler | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _sightings, _handler
    _sightings = _Sightings(guarded_secrets())
    _handler = _GuardHandler(_sightings)
    logging.getLogger().addHandler(_handler)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _handler is not None:
        logging.getLogger().removeHandler(_handler)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    if _sightings is None:
        return (yield)
    _sightings.current = item.nodeid
    try:
        return (yield)
    finally:
        _sightings.current = "(outside any test)"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if _sightings is None:
        return
    for name, content in report.sections:
        _sightings.check(content, name, report.nodeid)
    if report.failed and report.longrepr is not None:
        _sightings.check(str(report.longrepr), f"failure text ({report.when})", report.nodeid)


# Where a pytest-xdist worker hands its sightings to the controller, which reports them all.
_WORKER_OUTPUT_KEY = "blockfilter_secret_sightings"


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """pytest-xdist, in the controller: a worker is done; take in what it saw (the log
    records of its tests reached its own handler only)."""
    if _sightings is not None:
        found = getattr(node, "workeroutput", {}).get(_WORKER_OUTPUT_KEY, [])
        _sightings.found.extend((test, where, secret) for test, where, secret in found)


def pytest_sessionfinish(session: pytest.Session) -> None:
    sightings = _sightings
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # a pytest-xdist worker: its controller reports and fails
        workeroutput[_WORKER_OUTPUT_KEY] = list(sightings.found) if sightings else []
        return
    if sightings is None or not sightings.found:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"{test}: {where}: {secret}" for test, where, secret in sightings.found]
    if reporter is not None:
        reporter.write_line("")
        reporter.write_sep("=", "an API key showed in captured output", red=True)
        for line in dict.fromkeys(lines):
            reporter.write_line(line)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
