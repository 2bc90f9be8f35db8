"""What the Celery tests share: brokers, one test's stack, the test plugin's distribution.

A :class:`Stack` is one test's world: a Kaleyra simulator in the test process, a Celery app on
a real broker with queue names and a Redis key prefix of its own, and worker processes
(:class:`~tests.support.workers.Worker`, on the app of :mod:`tests.support.app`) that find the
test plugin through a real entry point. Everything it made on the shared brokers is removed
afterwards (queues, exchange, keys under its prefix; never a FLUSHDB).
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from blockfilter.testing.simulator import Simulator
from tests.support.env import TEST_KEY, TEST_SID, subprocess_env
from tests.support.factory import make_app
from tests.support.workers import Worker

RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672//"
REDIS_URL = "redis://127.0.0.1:6379/0"
BROKERS = {"amqp": RABBIT_URL, "redis": REDIS_URL}

# Small budgets so failure cases finish in seconds: 2 client attempts x 3 task attempts.
RETRY_ATTEMPTS = 2
TASK_MAX_RETRIES = 2
WORKER_SETTINGS = {
    "BLOCKFILTER_RETRY_ATTEMPTS": str(RETRY_ATTEMPTS),
    "BLOCKFILTER_RETRY_DEADLINE": "3",
    "BLOCKFILTER_BACKOFF_BASE": "0.01",
    "BLOCKFILTER_BACKOFF_MAX": "0.05",
    "BLOCKFILTER_RETRY_AFTER_MAX": "0.2",
    "BLOCKFILTER_CONNECT_TIMEOUT": "1",
    "BLOCKFILTER_REQUEST_TIMEOUT": "1",
    "BLOCKFILTER_TASK_RETRY_BACKOFF": "0.2",
    "BLOCKFILTER_TASK_MAX_RETRIES": str(TASK_MAX_RETRIES),
    "BLOCKFILTER_CACHE_URL": "memory://",
}

PLUGIN_DIST = "bftest_plugins"
RECORDER_ENTRY_POINT = "bftest_recorder"
BROKEN_ENTRY_POINT = "bftest_broken"


def reachable(url: str) -> bool:
    host, port = ("127.0.0.1", 5672) if url.startswith("amqp") else ("127.0.0.1", 6379)
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_broker(kind: str) -> str:
    """The broker URL, or skip the test with the reason (CI guarantees both are up)."""
    url = BROKERS[kind]
    if not reachable(url):
        pytest.skip(f"{kind} broker not reachable at {url.split('@')[-1]}")
    if kind == "amqp" and not reachable(REDIS_URL):
        pytest.skip("Redis (records and results) not reachable at 127.0.0.1:6379")
    return url


def install_plugin_dist(directory: Path) -> Path:
    """A fake installed distribution whose ``[blockfilter]`` entry points are the test plugins.

    Put ``directory`` on ``PYTHONPATH`` and ``importlib.metadata`` finds it like any package.
    """
    info = directory / f"{PLUGIN_DIST}-1.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {PLUGIN_DIST}\nVersion: 1.0\n", encoding="utf-8"
    )
    (info / "entry_points.txt").write_text(
        "[blockfilter]\n"
        f"{RECORDER_ENTRY_POINT} = tests.support.recorder_plugin\n"
        f"{BROKEN_ENTRY_POINT} = tests.support.broken_plugin\n",
        encoding="utf-8",
    )
    return directory


@dataclass
class Stack:
    """One test's simulator, app, workers and records."""

    kind: str
    broker: str
    tmp: Path
    plugin_dir: Path
    unique: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    workers: list[Worker] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.queue = f"bftest.{self.unique}"
        self.deferred_queue = f"bftest.{self.unique}.deferred"
        self.keyprefix = f"bftest:{self.unique}:"
        self.record_key = f"{self.keyprefix}records"
        self.fail_key = f"{self.keyprefix}fail-dispatch"  # calls of the dispatch hook to fail
        self.visibility_timeout = 5.0 if self.kind == "redis" else None
        self.redis = redis.Redis.from_url(REDIS_URL)
        self.simulator = Simulator(sid=TEST_SID, api_key=TEST_KEY).start()
        self.app: Celery = make_app(
            broker=self.broker,
            backend=REDIS_URL,
            queue=self.queue,
            deferred_queue=self.deferred_queue,
            keyprefix=self.keyprefix,
            visibility_timeout=self.visibility_timeout,
        )

    # -- workers -----------------------------------------------------------------------------

    def worker_env(self) -> dict[str, str]:
        env = subprocess_env(
            self.simulator,
            path=[self.plugin_dir],
            strip=("BFTEST_",),
            **WORKER_SETTINGS,
            BFTEST_BROKER_URL=self.broker,
            BFTEST_RESULT_BACKEND=REDIS_URL,
            BFTEST_QUEUE=self.queue,
            BFTEST_DEFERRED_QUEUE=self.deferred_queue,
            BFTEST_KEYPREFIX=self.keyprefix,
            BFTEST_RECORD_URL=REDIS_URL,
            BFTEST_RECORD_KEY=self.record_key,
            BFTEST_FAIL_KEY=self.fail_key,
        )
        if self.visibility_timeout is not None:
            env["BFTEST_VISIBILITY_TIMEOUT"] = str(self.visibility_timeout)
        return env

    def make_worker(
        self, *, env: dict[str, str] | None = None, queue: str | None = None, **options: Any
    ) -> Worker:
        """A worker of this stack, not started yet (``options``: see :class:`Worker`)."""
        index = len(self.workers)
        worker = Worker(
            self.worker_env() if env is None else env,
            queue or self.queue,
            self.tmp / f"worker-{index}.log",
            f"bftest-{self.unique}-{index}",
            **options,
        )
        self.workers.append(worker)
        return worker

    def start_worker(self, **options: Any) -> Worker:
        return self.make_worker(**options).start()

    # -- what the test plugin recorded -------------------------------------------------------

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(row) for row in self.redis.lrange(self.record_key, 0, -1)]

    def wait_records(
        self,
        done: Callable[[list[dict[str, Any]]], bool],
        timeout: float,
        what: str,
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            records = self.records()
            if done(records):
                return records
            if time.monotonic() > deadline:
                logs = "\n".join(w.log_text()[-3000:] for w in self.workers)
                raise AssertionError(
                    f"timed out waiting for {what}: {len(records)} records; worker logs:\n{logs}"
                )
            time.sleep(0.2)

    # -- the deferred queue ------------------------------------------------------------------

    def queue_length(self, name: str) -> int:
        if self.kind == "redis":
            # kombu's passive declare misses keys under a global_keyprefix: ask Redis.
            return int(self.redis.llen(self.keyprefix + name))
        with self.app.connection_for_write() as connection:
            channel = connection.default_channel
            try:
                return int(channel.queue_declare(queue=name, passive=True).message_count)
            except Exception:  # not declared (yet): empty
                return 0

    def settled_queue_length(self, name: str, expected: int, timeout: float = 5.0) -> int:
        """The queue's length once it equals ``expected`` or ``timeout`` passed.

        A broker counts a message published on another connection a moment later.
        """
        deadline = time.monotonic() + timeout
        length = self.queue_length(name)
        while length != expected and time.monotonic() < deadline:
            time.sleep(0.1)
            length = self.queue_length(name)
        return length

    def peek_deferred(self, expected: int, timeout: float = 10.0) -> list[Any]:
        """The bodies on the deferred queue, left there (fetched, never acknowledged)."""
        from blockfilter.tasks import deferred_queue

        bodies: list[Any] = []
        with self.app.connection_for_read() as connection:
            inbox = connection.SimpleQueue(deferred_queue(self.app))
            deadline = time.monotonic() + timeout
            try:
                while len(bodies) < expected and time.monotonic() < deadline:
                    try:
                        bodies.append(inbox.get(block=True, timeout=0.5).decode())
                    except inbox.Empty:
                        continue
                if len(bodies) == expected:
                    with contextlib.suppress(inbox.Empty):  # one more would be one too many
                        bodies.append(inbox.get(block=True, timeout=0.5).decode())
            finally:
                inbox.close()  # unacknowledged: back on the queue
        return bodies

    # -- teardown ----------------------------------------------------------------------------

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.simulator.stop()
        try:
            if self.kind == "amqp":
                with self.app.connection_for_write() as connection:
                    channel = connection.default_channel
                    for name in (self.queue, self.deferred_queue):
                        try:
                            channel.queue_delete(queue=name)
                        except Exception:
                            channel = connection.channel()
                    with contextlib.suppress(Exception):
                        channel.exchange_delete(exchange=self.queue)
        finally:
            for key in self.redis.scan_iter(match=f"{self.keyprefix}*", count=500):
                self.redis.delete(key)
            self.redis.close()
            self.app.close()
