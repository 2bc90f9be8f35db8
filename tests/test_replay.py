"""Replaying the deferred queue: batches, limits, acknowledgement, loading the app.

The slow tests run on the real brokers (RabbitMQ, Redis) without a worker, and read the task
messages replay sent off the task queue; the full outage-then-replay story with workers is in
``test_tasks.py``.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from kombu import Exchange, Queue

from blockfilter.errors import ConfigError
from blockfilter.pipeline.replay import load_app, main_replay, replay_deferred
from blockfilter.tasks import TASK_NAME, deferred_queue, park_deferred
from tests.support.env import ROOT
from tests.support.harness import Stack, install_plugin_dist, require_broker


def parked_messages(count: int) -> list[dict[str, Any]]:
    return [
        {"id": f"p{i}", "channel": "sms", "to": f"+9198200{i:05d}", "extra": [2**70, "ü"]}
        for i in range(count)
    ]


def sent_batches(app: Celery, queue_name: str) -> list[list[Any]]:
    """The message lists of the filter tasks waiting on ``queue_name``, in order (consumed)."""
    queue = Queue(queue_name, Exchange(queue_name, type="direct"), routing_key=queue_name)
    batches = []
    with app.connection_for_read() as connection:
        inbox = connection.SimpleQueue(queue)
        try:
            while True:
                try:
                    message = inbox.get(block=True, timeout=0.5)
                except inbox.Empty:
                    break
                assert message.headers["task"] == TASK_NAME
                args, kwargs, _ = message.decode()
                batches.append(args[0])
                message.ack()
        finally:
            inbox.close()
    return batches


# -- fast ------------------------------------------------------------------------------------


def test_load_app_from_module_path_registers_the_task() -> None:
    app = load_app("tests.support.app:app", None)
    assert isinstance(app, Celery)
    assert TASK_NAME in app.tasks
    # Like `celery -A`: a module path finds its `app` attribute.
    assert load_app("tests.support.app", None) is app


def test_load_app_needs_an_app_or_a_broker() -> None:
    with pytest.raises(ConfigError, match="--app"):
        load_app(None, None)
    with pytest.raises(ConfigError, match="no_such_module"):
        load_app("no_such_module:app", None)
    with pytest.raises(ConfigError, match="not a Celery app"):
        load_app("blockfilter.tasks:TASK_NAME", None)
    bare = load_app(None, "memory://")
    assert bare.conf.broker_url == "memory://"


def test_main_replay_on_a_bare_app_drains_in_order() -> None:
    # kombu's in-memory transport is shared by every connection of this process.
    broker = "memory://localhost/bftest-replay"
    source = Celery("parker", broker=broker, set_as_current=False)
    messages = parked_messages(7)
    assert park_deferred(source, messages, reason="check_failed") == 7

    assert main_replay(None, broker, 3) == 3
    assert replay_deferred(source, batch_size=500, timeout=0.2) == 4
    assert replay_deferred(source, timeout=0.2) == 0

    batches = sent_batches(source, "celery")
    assert batches == [messages[:3], messages[3:]]
    source.close()


def test_replay_rejects_bad_arguments() -> None:
    app = Celery("x", broker="memory://", set_as_current=False)
    with pytest.raises(ValueError):
        replay_deferred(app, batch_size=0)
    with pytest.raises(ValueError):
        replay_deferred(app, limit=-1)


# -- slow: real brokers ----------------------------------------------------------------------


@pytest.fixture(params=["amqp", "redis"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    broker = require_broker(request.param)
    world = Stack(request.param, broker, tmp_path, install_plugin_dist(tmp_path / "plugins"))
    try:
        yield world
    finally:
        world.close()


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_replay_sends_batches_and_acks_only_what_it_sent(stack: Stack) -> None:
    app = stack.app
    messages = parked_messages(25)
    park_deferred(app, messages, reason="check_failed", task_id="t-1")
    # A corrupt entry (not JSON) is passed on as text, for the filter to call invalid.
    queue = deferred_queue(app)
    with app.producer_or_acquire() as producer:
        producer.publish(
            b"\xffnot json",
            exchange=queue.exchange,
            routing_key=queue.routing_key,
            declare=[queue],
            content_type="application/json",
            content_encoding="binary",
        )
    assert stack.settled_queue_length(stack.deferred_queue, 26) == 26

    assert replay_deferred(app, limit=12, batch_size=5, timeout=0.5) == 12
    assert stack.settled_queue_length(stack.deferred_queue, 14) == 14, (
        "acked more (or less) than it sent"
    )
    assert sent_batches(app, stack.queue) == [messages[:5], messages[5:10], messages[10:12]]

    assert replay_deferred(app, batch_size=10, timeout=0.5) == 14
    assert stack.settled_queue_length(stack.deferred_queue, 0) == 0
    rest = sent_batches(app, stack.queue)
    assert [len(b) for b in rest] == [10, 4]
    assert rest[0] + rest[1][:3] == messages[12:]
    assert isinstance(rest[1][3], str) and "not json" in rest[1][3]


def run_cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    """``blockfilter ARGS`` with the test app's environment (``--app tests.support.app``)."""
    return subprocess.run(
        [sys.executable, "-m", "blockfilter", *args, "--app", "tests.support.app"],
        cwd=ROOT,
        env=stack.worker_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_replay_warns_when_no_worker_consumes_its_queue(tmp_path: Path) -> None:
    stack = Stack("amqp", require_broker("amqp"), tmp_path, install_plugin_dist(tmp_path / "p"))
    target = f"{stack.queue}.replayed"
    try:
        first = parked_messages(10)
        park_deferred(stack.app, first, reason="check_failed")
        done = run_cli(stack, "replay", "--queue", target)
        assert done.returncode == 0, done.stderr
        assert f"no worker consumes queue {target!r}" in done.stderr
        assert f"10 deferred messages sent to queue {target!r}" in done.stderr
        assert stack.settled_queue_length(target, 1) == 1, "the task is not waiting there"

        # A worker on that queue runs what waited; a replay to it now says nothing alarming.
        stack.start_worker(queue=target)
        stack.wait_records(lambda rs: len(rs) >= 10, timeout=30, what="the first replay")
        park_deferred(stack.app, parked_messages(15)[10:], reason="check_failed")
        done = run_cli(stack, "replay", "--queue", target)
        assert done.returncode == 0 and "warning" not in done.stderr, done.stderr
        records = stack.wait_records(lambda rs: len(rs) >= 15, timeout=30, what="the second")
        assert sorted(r["id"] for r in records) == sorted(f"p{i}" for i in range(15))

        # Without --queue: where the app routes the task (its default queue), unconsumed here.
        park_deferred(stack.app, parked_messages(1), reason="check_failed")
        done = run_cli(stack, "replay")
        assert f"no worker consumes queue {stack.queue!r}" in done.stderr, done.stderr
    finally:
        with stack.app.connection_for_write() as connection, contextlib.suppress(Exception):
            connection.default_channel.queue_delete(queue=target)
        stack.close()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_deferred_counts_by_reason_and_age_and_shows_no_number(stack: Stack) -> None:
    from datetime import datetime, timedelta, timezone

    messages = parked_messages(9)
    park_deferred(stack.app, messages[:3], reason="check_failed")
    park_deferred(stack.app, messages[3:5], reason="credentials_refused")
    park_deferred(stack.app, messages[5:6], reason="task_failed")
    queue = deferred_queue(stack.app)
    three_days_ago = (datetime.now(timezone.utc) - timedelta(days=3)).isoformat()
    with stack.app.producer_or_acquire() as producer:
        for message, headers in (
            (messages[6], {"x-blockfilter-reason": "check_failed"}),
            (messages[7], {"x-blockfilter-reason": "check_failed"}),
            (messages[8], {}),  # parked by something else: no headers
        ):
            if headers:
                headers["x-blockfilter-parked-at"] = three_days_ago
            producer.publish(
                message,
                exchange=queue.exchange,
                routing_key=queue.routing_key,
                declare=[queue],
                serializer="json",
                headers=headers,
            )
    assert stack.settled_queue_length(stack.deferred_queue, 9) == 9

    done = run_cli(stack, "deferred", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["queue"] == stack.deferred_queue and report["total"] == 9
    reasons = report["reasons"]
    assert {r: v["count"] for r, v in reasons.items()} == {
        "check_failed": 5,
        "credentials_refused": 2,
        "task_failed": 1,
        "unknown": 1,
    }
    assert reasons["check_failed"]["ages"] == {"< 1 h": 3, "1 d - 7 d": 2}
    assert 3 * 86400 - 120 < reasons["check_failed"]["oldest_s"] < 3 * 86400 + 120
    assert reasons["unknown"]["ages"] == {"unknown": 1}

    done = run_cli(stack, "deferred")
    assert done.returncode == 0, done.stderr
    assert f"9 message(s) parked on queue {stack.deferred_queue}" in done.stdout
    assert "credentials_refused" in done.stdout and "3.0 d" in done.stdout
    for message in messages:
        assert message["to"][3:] not in done.stdout + done.stderr
    # Looking leaves everything where it was.
    assert stack.settled_queue_length(stack.deferred_queue, 9) == 9
