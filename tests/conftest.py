"""Shared fixtures. The simulator fixtures (``kaleyra_simulator``, ``kaleyra_env``) come from
blockfilter's own pytest plugin, the same ones plugin authors get."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blockfilter.config import Settings, load_settings
from blockfilter.plugins.manager import reset_plugin_manager
from blockfilter.testing.simulator import Simulator
from tests.hostile_upstream import AnswerFunction, HostileUpstream
from tests.support.env import TEST_KEY, TEST_SID
from tests.support.env import clean_environ as clean_environ  # its place before tests.support

# Fails the session if any test's captured output or logs ever show a test API key.
pytest_plugins = ["tests._secret_guard", "tests.ledger_support"]


def fast_settings(base_url: str, **overrides: object) -> Settings:
    """Settings for a test against a simulator: its URL, the test credentials, a short retry
    budget so failure cases finish in about a second, and no shared cache."""
    values: dict[str, object] = {
        "sid": TEST_SID,
        "api_key": TEST_KEY,
        "base_url": base_url,
        "cache_url": "memory://",
        "retry_attempts": 3,
        "retry_deadline": 3.0,
        "backoff_base": 0.01,
        "backoff_max": 0.05,
        "retry_after_max": 0.2,
        "connect_timeout": 1.0,
        "request_timeout": 1.0,
    }
    values.update(overrides)
    return load_settings(environ={}, **values)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def simulator() -> Iterator[Simulator]:
    """A running simulator with the tests' credentials: an empty blocklist, no faults."""
    with Simulator(sid=TEST_SID, api_key=TEST_KEY) as sim:
        yield sim


@pytest.fixture(scope="module")
def module_simulator() -> Iterator[Simulator]:
    """One running simulator for a whole test module (the tests' credentials)."""
    with Simulator(sid=TEST_SID, api_key=TEST_KEY) as shared:
        yield shared


@pytest.fixture
def sim(module_simulator: Simulator) -> Simulator:
    """The module's simulator, back to a new one's state for each test (no blocklist, no
    faults, no counts): as good as a fresh one, without a server started per test."""
    module_simulator.reset()
    return module_simulator


@pytest.fixture
def fresh_plugin_manager() -> Iterator[None]:
    """No plugin manager (nor shared Kaleyra source) left by another test, nor to the next."""
    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test plugins installed as a distribution, for a worker's ``PYTHONPATH``."""
    from tests.support.harness import install_plugin_dist

    return install_plugin_dist(tmp_path_factory.mktemp("plugins"))


@pytest.fixture
def amqp_stack(plugin_dir: Path, tmp_path: Path) -> Iterator[Any]:
    """A :class:`~tests.support.harness.Stack` on RabbitMQ (skipped when it is not up)."""
    from tests.support.harness import Stack, require_broker

    world = Stack("amqp", require_broker("amqp"), tmp_path, plugin_dir)
    try:
        yield world
    finally:
        world.close()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No KALEYRA_* or BLOCKFILTER_* variable of the machine leaks into a test."""
    for name in list(os.environ):
        if name.startswith(("KALEYRA_", "BLOCKFILTER_")):
            monkeypatch.delenv(name)
    yield


@pytest.fixture
def hostile_upstream() -> Iterator[Callable[..., HostileUpstream]]:
    """Starts :class:`tests.hostile_upstream.HostileUpstream` servers: ``hostile_upstream(answer,
    lifetime=...)``. Each is stopped after the test, which fails if an answer function raised."""
    started: list[HostileUpstream] = []

    def start(answer: AnswerFunction, **options: float) -> HostileUpstream:
        upstream = HostileUpstream(answer, **options)
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        upstream.stop()
    errors = [error for upstream in started for error in upstream.errors]
    assert not errors, f"an answer function raised: {errors!r}"


@pytest.fixture(autouse=True)
def _no_worker_state_left_behind() -> Iterator[None]:
    """A Celery worker run inside the test process (the demo's) marks the process as a
    worker's for good: every later ``result.get()`` would then raise "Never call result.get()
    within a task!". Each test starts as a plain producer again."""
    yield
    from celery._state import _set_task_join_will_block

    _set_task_join_will_block(False)


@pytest.fixture
def private_rabbit(tmp_path: Path) -> Iterator[Any]:
    """A RabbitMQ node of the test's own (a test stops and restarts it), stopped afterwards;
    the test is skipped where none can be started, or Redis (records, results) is away."""
    from tests.support.harness import REDIS_URL, reachable
    from tests.support.private_servers import PrivateRabbit, rabbit_unavailable_reason

    reason = rabbit_unavailable_reason()
    if reason:
        pytest.skip(f"no private RabbitMQ node: {reason}")
    if not reachable(REDIS_URL):
        pytest.skip("Redis (records and results) not reachable at 127.0.0.1:6379")
    rabbit = PrivateRabbit(tmp_path / "rabbit")
    try:
        rabbit.start()
    except (RuntimeError, subprocess.SubprocessError) as exc:
        rabbit.stop()
        pytest.skip(f"a private RabbitMQ node cannot be started here: {exc}")
    try:
        yield rabbit
    finally:
        rabbit.stop()
