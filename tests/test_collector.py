"""The collector (``blockfilter.collect``): messages sent one at a time, filtered in full batches.

Fast tests cover its settings and the per-channel count. The slow ones run a real ``celery
worker`` process (prefork, unlimited prefetch as documented) on RabbitMQ against the
simulator, send messages one task each, and check what reached the test plugin's hooks
(recorded in Redis) and what the simulator was asked.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from queue import Queue
from types import SimpleNamespace
from typing import Any

import pytest

# The collector is the blockfilter[collector] extra (celery-batches pins Celery below 5.7).
pytest.importorskip("celery_batches", reason="blockfilter[collector] is not installed")

from celery import Celery
from celery.concurrency.solo import TaskPool as SoloPool
from celery_batches import Batches
from kombu.asynchronous.timer import Timer

from blockfilter.config import load_settings
from blockfilter.errors import ConfigError
from blockfilter.pipeline.batches_private import (
    check_supported,
    flush_everything,
    install_buffer,
    pending_count,
)
from blockfilter.pipeline.collector import (
    COLLECT_TASK_NAME,
    BatchFill,
    CollectorTask,
    CollectSettings,
    collect_settings,
    message_of,
    route_of,
)
from blockfilter.testing.simulator import FaultRule
from tests.support.campaigns import mixed_campaign
from tests.support.factory import make_app
from tests.support.harness import (
    RETRY_ATTEMPTS,
    Stack,
    require_broker,
)
from tests.support.private_servers import (
    PrivateRabbit,
)
from tests.support.workers import Worker

# -- fast: settings and counting -------------------------------------------------------------


def test_settings_come_from_conf_then_environment_then_defaults() -> None:
    assert collect_settings({}, {}) == CollectSettings(100, 1.0, 1000)
    env = {"BLOCKFILTER_COLLECT_FLUSH_INTERVAL": "2.5", "BLOCKFILTER_COLLECT_MAX_BUFFER": "50"}
    conf = {"blockfilter_collect_flush_interval": 0.25, "blockfilter_collect_flush_every": "40"}
    assert collect_settings(conf, env) == CollectSettings(40, 0.25, 50)
    with pytest.raises(ConfigError, match="BLOCKFILTER_COLLECT_FLUSH_EVERY"):
        collect_settings({}, {"BLOCKFILTER_COLLECT_FLUSH_EVERY": "0"})
    with pytest.raises(ConfigError, match="BLOCKFILTER_COLLECT_FLUSH_INTERVAL"):
        collect_settings({"blockfilter_collect_flush_interval": "soon"}, {})


def test_collector_settings_are_rows_of_the_one_settings_table() -> None:
    loaded = load_settings(environ={"BLOCKFILTER_COLLECT_FLUSH_EVERY": "40"})
    assert (loaded.collect_flush_every, loaded.sources["collect_flush_every"]) == (
        40,
        "env BLOCKFILTER_COLLECT_FLUSH_EVERY",
    )
    rows = {variable: (value, source) for variable, value, source in loaded.describe()}
    assert rows["BLOCKFILTER_COLLECT_MAX_BUFFER"] == ("1000", "default")
    # Finite and in range, as every numeric setting; an empty one is the default, as before.
    with pytest.raises(ConfigError, match="BLOCKFILTER_COLLECT_FLUSH_INTERVAL"):
        collect_settings({}, {"BLOCKFILTER_COLLECT_FLUSH_INTERVAL": "inf"})
    assert collect_settings({"blockfilter_collect_max_buffer": ""}, {}).max_buffer == 1000
    assert collect_settings({}, {"BLOCKFILTER_COLLECT_FLUSH_EVERY": ""}).flush_every == 100


def worker_consumer(timer: Timer | None = None) -> Any:
    """What a task's Strategy() is given of a worker's consumer: a solo pool and a timer of
    its own (ticked by hand), no events."""
    return SimpleNamespace(
        pool=SoloPool(),
        hostname="bftest@here",
        connection_errors=(),
        event_dispatcher=None,
        timer=Timer() if timer is None else timer,  # an empty Timer is falsy
    )


def deliver(app: Celery, handler: Any, task_name: str, messages: list[Any]) -> None:
    """Send ``messages`` one task each through ``app``'s memory:// broker, and hand each
    delivered broker message to ``handler`` (a strategy), as the worker's consumer does."""
    queue_name = f"bftest.delivered.{id(app)}"
    with app.connection_for_read() as connection:
        inbox = connection.SimpleQueue(queue_name)
        try:
            for message in messages:
                app.send_task(task_name, args=[message], queue=queue_name)
                handler(inbox.get(timeout=5), None, lambda *a: None, lambda *a: None, set())
        finally:
            inbox.close()


class RecordingBatches(Batches):  # type: ignore[misc]
    """A plain Batches task whose flush() (its public override point) records the batch."""

    abstract = True
    flush_every = 1000
    flush_interval = 3600

    def flush(self, requests: Sequence[Any]) -> None:
        self.flushed.append([request.id for request in requests])


def test_the_private_parts_of_celery_batches_the_collector_relies_on_are_there() -> None:
    """Fails when an installed celery-batches changes what batches_private.py relies on."""
    app = Celery("bftest-batches-private", broker="memory://", set_as_current=False)

    @app.task(base=RecordingBatches, bind=True, name="bftest.batched", shared=False)
    def batched(self: Any, requests: list[Any]) -> None:  # pragma: no cover - never run
        pass

    task = app.tasks["bftest.batched"]
    task.flushed = []
    check_supported(task)
    buffer: Queue[Any] = Queue()
    install_buffer(task, buffer)
    handler = task.Strategy(task, app, worker_consumer())
    deliver(app, handler, "bftest.batched", [{"id": "1"}])
    # Batches' handler put the request into the buffer installed before Strategy() ...
    assert buffer.qsize() == 1 and pending_count(task) == 0
    request_id = buffer.queue[0].id
    # ... and its flush of everything hands the waiting requests to flush().
    flush_everything(task)
    assert task.flushed == [[request_id]] and buffer.empty()


class RecordingCollector(CollectorTask):  # type: ignore[misc]
    """The collector's buffering, with a flush() that records the ids of each batch."""

    abstract = True

    def flush(self, requests: Sequence[Any]) -> None:
        self.flushed.append([message_of(request)["id"] for request in requests])


def buffering_collector(
    conf: dict[str, Any],
) -> tuple[Any, Callable[[list[dict[str, Any]]], None]]:
    """A collector task of a memory:// app, its strategy built as a worker builds it, and a
    function that delivers messages to it one task each, through the broker."""
    app = Celery(f"bftest-buffering-{id(conf)}", broker="memory://", set_as_current=False)
    app.conf.update(conf)

    @app.task(base=RecordingCollector, bind=True, name="bftest.collect", shared=False)
    def buffered(self: Any, requests: list[Any]) -> None:  # pragma: no cover - never run
        pass

    task = app.tasks["bftest.collect"]
    task.flushed = []
    handler = task.Strategy(task, app, worker_consumer())
    return task, functools.partial(deliver, app, handler, "bftest.collect")


def test_the_collector_flushes_a_channel_at_full_requests_the_rest_by_age_or_count() -> None:
    task, send = buffering_collector(
        {
            "blockfilter_collect_flush_every": 2,
            "blockfilter_collect_flush_interval": 0.05,
            "blockfilter_collect_max_buffer": 5,
        }
    )
    sms = [f"+91982000010{i}" for i in range(3)]
    send(
        [
            {"id": "s1", "channel": "sms", "to": sms[0]},
            {"id": "s1-again", "channel": "sms", "to": sms[0]},  # a repeat fills nothing
            {"id": "w1", "channel": "whatsapp", "to": sms[1]},
            {"id": "bad", "channel": "fax", "to": sms[1]},  # no request: leaves with any
        ]
    )
    assert task.flushed == [], "no channel has 2 numbers yet, and 4 messages wait, not 5"
    send([{"id": "s2", "channel": "sms", "to": sms[1]}])
    # The SMS request is full: the SMS messages leave, with the unusable one.
    assert task.flushed == [["s1", "s1-again", "bad", "s2"]]
    task._tick()
    assert task.flushed[1:] == [], "the WhatsApp message is not due yet"
    time.sleep(0.06)
    task._tick()
    assert task.flushed[1:] == [["w1"]], "due after FLUSH_INTERVAL"

    task.flushed.clear()
    send([{"id": f"r{i}", "channel": "voice", "to": sms[2]} for i in range(5)])
    assert task.flushed == [[f"r{i}" for i in range(5)]], "MAX_BUFFER messages of one number"


def test_a_strategy_built_again_keeps_the_buffer_and_arms_a_new_ticker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What a broker reconnect does: Celery clears the timer and builds the strategy again."""
    task, send = buffering_collector({"blockfilter_collect_flush_interval": 0.05})
    send([{"id": "kept", "channel": "sms", "to": "+919820000101"}])
    timer = Timer()
    with caplog.at_level(logging.WARNING, logger="blockfilter.collector"):
        task.Strategy(task, task.app, worker_consumer(timer))
    assert "the flush timer is armed again (celery-batches #107), 1 buffered" in caplog.text
    assert len(timer.queue) == 1, "the collector's ticker, on the new timer"
    time.sleep(0.06)
    timer.queue[0].entry()  # the tick, as the worker's timer runs it
    assert task.flushed == [["kept"]]


def test_a_worker_started_without_the_check_buffers_by_default_on_a_bad_setting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its batches fail on the bad setting and are parked; its other tasks keep running."""
    with caplog.at_level(logging.ERROR, logger="blockfilter.collector"):
        task, _ = buffering_collector(
            {"blockfilter_collect_max_buffer": 5, "blockfilter_cache_ttl": "nan"}
        )
    assert task._settings == CollectSettings(100, 1.0, 1000)
    assert "BLOCKFILTER_CACHE_TTL" in caplog.text and "default settings" in caplog.text


def test_batch_fill_counts_distinct_numbers_per_channel() -> None:
    fill = BatchFill(flush_every=3)
    sms = [("sms", f"+9198200000{i:02d}") for i in range(3)]
    assert not fill.add(sms[0]) and not fill.add(sms[0]), "a repeat fills nothing"
    assert not fill.add(("whatsapp", sms[1][1])) and not fill.add(None)
    assert not fill.add(sms[1])
    assert fill.waiting() == {"sms": 2, "whatsapp": 1}
    assert fill.add(sms[2]), "the third distinct SMS number fills the request"
    fill.clear()
    assert fill.waiting() == {}


def test_route_of_normalises_and_rejects() -> None:
    assert route_of({"id": "1", "channel": "SMS", "to": "+91 98200 00001"}) == (
        "sms",
        "+919820000001",
    )
    assert route_of({"id": "2", "channel": "fax", "to": "+919820000001"}) is None
    assert route_of("not a message") is None


def test_registered_in_the_users_app_with_late_acks() -> None:
    app = make_app(
        broker="memory://", backend="cache+memory://", queue="q", deferred_queue="", keyprefix=""
    )
    task = app.tasks[COLLECT_TASK_NAME]
    assert task.acks_late and task.ignore_result


# -- slow: a real worker ---------------------------------------------------------------------

COLLECTOR_APP = """\
# The test app, configured as the collector's worker must be: unlimited prefetch.
from tests.support.app import app

app.conf.worker_prefetch_multiplier = {prefetch}
app.autodiscover_tasks(["blockfilter"], related_name="collector")
"""


class CollectorStack(Stack):
    """A :class:`Stack` whose workers run the collector with the given settings."""

    def collector_env(self, prefetch: int = 0, **settings: str) -> dict[str, str]:
        """The worker environment with the collector's app module on the path."""
        app_dir = self.tmp / f"collector_app_{prefetch}"
        app_dir.mkdir(exist_ok=True)
        (app_dir / "collector_app.py").write_text(
            COLLECTOR_APP.format(prefetch=prefetch), encoding="utf-8"
        )
        env = self.worker_env()
        env["PYTHONPATH"] = f"{app_dir}:{env['PYTHONPATH']}"
        env.update(settings)
        return env

    def start_collector(
        self, prefetch: int = 0, *, queue: str | None = None, **settings: str
    ) -> Worker:
        """A collector worker (the collector's app: unlimited prefetch) on ``queue``."""
        env = self.collector_env(prefetch, **settings)
        return self.start_worker(env=env, queue=queue, app="collector_app")

    def send_one_at_a_time(self, messages: list[dict[str, Any]]) -> float:
        """One ``collect`` task per message, as a pipeline emits them; returns the seconds."""
        started = time.monotonic()
        with self.app.producer_or_acquire() as producer:
            for message in messages:
                self.app.send_task(COLLECT_TASK_NAME, args=[message], producer=producer)
        return time.monotonic() - started

    def log_text(self) -> str:
        return "\n".join(w.log_text() for w in self.workers)


@pytest.fixture
def stack(plugin_dir: Path, tmp_path: Path) -> Iterator[CollectorStack]:
    world = CollectorStack("amqp", require_broker("amqp"), tmp_path, plugin_dir)
    try:
        yield world
    finally:
        world.close()


def number(i: int) -> str:
    return f"+91983{i:07d}"


def make_campaign(size: int) -> tuple[list[dict[str, Any]], dict[str, set[str]]]:
    """Messages on every channel, some sharing a number (every 40th), some with fallbacks, a
    few invalid; and the blocklist to load into the simulator."""
    return mixed_campaign(size, "c", share_every=40, share_back=4, numbered=number)


def expected_outcome(
    messages: list[dict[str, Any]], blocked: dict[str, set[str]]
) -> Counter[tuple[str, str, str, str]]:
    """(hook, id, verdict, final channel) per message, computed without the filter."""
    outcome: Counter[tuple[str, str, str, str]] = Counter()
    for m in messages:
        channel = m["channel"].lower()
        if m["to"] == "12":
            outcome["suppressed", m["id"], "invalid", m["channel"]] += 1
        elif m["to"] not in blocked[channel]:
            outcome["dispatch", m["id"], "allowed", m["channel"]] += 1
        else:
            for fallback in m.get("fallback", []):
                if m["to"] not in blocked[fallback]:
                    outcome["dispatch", m["id"], "rerouted", fallback] += 1
                    break
            else:
                outcome["suppressed", m["id"], "blocked", m["channel"]] += 1
    return outcome


def recorded(records: list[dict[str, Any]]) -> Counter[tuple[str, str, str, str]]:
    return Counter((r["hook"], r["id"], r["verdict"], r["channel"]) for r in records)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_thousand_messages_one_at_a_time_each_reach_one_hook_once(stack: CollectorStack) -> None:
    messages, blocked = make_campaign(1000)
    stack.simulator.block_all(blocked)
    stack.start_collector(BLOCKFILTER_COLLECT_FLUSH_INTERVAL="0.5")

    stack.send_one_at_a_time(messages)
    stack.wait_records(lambda rs: len(rs) >= len(messages), timeout=40, what="every message")
    time.sleep(1.0)  # a timer tick more: nothing else may come
    records = stack.records()
    expected = expected_outcome(messages, blocked)
    assert recorded(records) == expected
    # Every field comes through untouched, a rerouted one says where it came from.
    rerouted = next(m for m in messages if ("dispatch", m["id"], "rerouted", "voice") in expected)
    got = next(r for r in records if r["id"] == rerouted["id"])["message"]
    assert got["payload"] == rerouted["payload"]
    assert got["original_channel"] == rerouted["channel"].lower()
    # Batched: a few dozen requests for 1000 messages, none over the limit.
    stats = stack.simulator.stats
    assert stats.max_numbers_per_request == 100
    assert stats.requests < 60, stats.requests_by_channel


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_under_load_requests_are_full(stack: CollectorStack) -> None:
    interval = 3.0
    sms = [{"id": f"s{i}", "channel": "sms", "to": number(i)} for i in range(1200)]
    whatsapp = [{"id": f"w{i}", "channel": "whatsapp", "to": number(5000 + i)} for i in range(800)]
    messages = [m for pair in zip(sms, whatsapp, strict=False) for m in pair] + sms[800:]
    stack.start_collector(BLOCKFILTER_COLLECT_FLUSH_INTERVAL=str(interval))

    took = stack.send_one_at_a_time(messages)
    stack.wait_records(lambda rs: len(rs) >= len(messages), timeout=40, what="every message")
    assert Counter(r["hook"] for r in stack.records()) == {"dispatch": 2000}

    stats = stack.simulator.snapshot(records=True)
    sizes = [size for _, _, size, _ in stats.records]
    assert max(sizes) == 100 and sum(sizes) == 2000
    # Each channel fills requests of 100; only a timer tick while sending leaves partial ones
    # behind (one per channel per tick).
    ticks = math.ceil(took / interval) + 1
    assert len(sizes) <= 12 + 8 + 2 * ticks, sorted(sizes)
    assert sum(sizes) / len(sizes) >= 80, sorted(sizes)
    assert "blockfilter.collect: batch of 100 message(s)" in stack.log_text()


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_thin_traffic_flushes_within_the_interval(stack: CollectorStack) -> None:
    stack.start_collector(BLOCKFILTER_COLLECT_FLUSH_INTERVAL="0.5")
    messages = [
        {"id": "t1", "channel": "sms", "to": number(1)},
        {"id": "t2", "channel": "sms", "to": number(2)},
        {"id": "t3", "channel": "voice", "to": number(3)},
    ]
    stack.simulator.block("sms", number(2))
    sent_at = time.monotonic()
    stack.send_one_at_a_time(messages)
    records = stack.wait_records(lambda rs: len(rs) >= 3, timeout=10, what="three messages")
    waited = time.monotonic() - sent_at
    assert waited < 3.0, f"a thin trickle waited {waited:.1f} s"
    assert recorded(records) == {
        ("dispatch", "t1", "allowed", "sms"): 1,
        ("suppressed", "t2", "blocked", "sms"): 1,
        ("dispatch", "t3", "allowed", "voice"): 1,
    }
    # One batch: one request per channel.
    assert stack.simulator.stats.requests_by_channel == {"sms": 1, "voice": 1}


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_failed_checks_and_failed_hooks_are_retried_not_lost(stack: CollectorStack) -> None:
    stack.start_collector(BLOCKFILTER_COLLECT_FLUSH_INTERVAL="0.3")

    # The first SMS request fails (both client attempts): its numbers are handed to
    # filter_messages, which checks them again after a backoff.
    stack.simulator.set_faults([FaultRule("wa500", channel="sms", first=RETRY_ATTEMPTS)])
    first = [{"id": f"a{i}", "channel": "sms", "to": number(100 + i)} for i in range(30)]
    stack.send_one_at_a_time(first)
    stack.wait_records(lambda rs: len(rs) >= 30, timeout=30, what="the retried ones")
    time.sleep(0.8)
    assert recorded(stack.records()) == Counter(
        ("dispatch", m["id"], "allowed", "sms") for m in first
    )
    assert stack.simulator.stats.by_outcome.get("fault:wa500") == RETRY_ATTEMPTS
    assert "handed to blockfilter.filter_messages (check failed)" in stack.log_text()

    # The dispatch hook raises once: the whole batch is retried, and reaches it once.
    stack.simulator.clear_faults()
    stack.redis.set(stack.fail_key, 1)
    stack.redis.delete(stack.record_key)
    second = [{"id": f"b{i}", "channel": "voice", "to": number(200 + i)} for i in range(20)]
    stack.send_one_at_a_time(second)
    stack.wait_records(lambda rs: len(rs) >= 20, timeout=30, what="after the hook")
    time.sleep(0.8)
    assert recorded(stack.records()) == Counter(
        ("dispatch", m["id"], "allowed", "voice") for m in second
    )
    assert "handed to blockfilter.filter_messages (hook failed)" in stack.log_text()
    assert stack.settled_queue_length(stack.deferred_queue, 0) == 0


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_buffered_messages_survive_a_killed_worker(stack: CollectorStack) -> None:
    # A long interval and too few numbers to fill a request: the messages wait in the buffer.
    worker = stack.start_collector(BLOCKFILTER_COLLECT_FLUSH_INTERVAL="60")
    messages = [{"id": f"k{i}", "channel": "sms", "to": number(300 + i)} for i in range(40)]
    stack.send_one_at_a_time(messages)
    assert stack.settled_queue_length(stack.queue, 0, timeout=10) == 0, "not all taken"
    time.sleep(0.3)
    assert stack.records() == []
    worker.kill()  # SIGKILL: the buffer is gone, unacknowledged

    stack.start_collector(BLOCKFILTER_COLLECT_FLUSH_INTERVAL="0.3")
    stack.wait_records(lambda rs: len(rs) >= 40, timeout=30, what="the redelivered messages")
    time.sleep(0.8)
    assert recorded(stack.records()) == Counter(
        ("dispatch", m["id"], "allowed", "sms") for m in messages
    )


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_worker_that_cannot_hold_a_batch_warns_and_still_delivers(
    stack: CollectorStack,
) -> None:
    # The default prefetch (1 x 2 processes): at most 2 messages in hand, never 100.
    stack.start_collector(prefetch=1, BLOCKFILTER_COLLECT_FLUSH_INTERVAL="0.2")
    messages = [{"id": f"p{i}", "channel": "sms", "to": number(400 + i)} for i in range(10)]
    stack.send_one_at_a_time(messages)
    stack.wait_records(lambda rs: len(rs) >= 10, timeout=30, what="ten messages")
    assert recorded(stack.records()) == Counter(
        ("dispatch", m["id"], "allowed", "sms") for m in messages
    )
    assert "this worker prefetches at most 2 messages" in stack.log_text()


# -- slow: the broker restarts under a filling buffer ----------------------------------------


def wait_for(condition: Any, timeout: float, what: str, logs: Any) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; worker logs:\n{logs()[-4000:]}")
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_a_rabbitmq_restart_with_messages_in_the_buffer_does_not_wedge_the_collector(
    private_rabbit: PrivateRabbit, plugin_dir: Path, tmp_path: Path
) -> None:
    """celery-batches issue #107: after a reconnect its flush timer was never armed again."""
    stack = CollectorStack("amqp", private_rabbit.url, tmp_path, plugin_dir)
    try:
        # Long enough that nothing leaves before the broker is gone, with fewer numbers
        # than fill a request: only the timer can flush them.
        interval = 30.0
        worker = stack.start_collector(BLOCKFILTER_COLLECT_FLUSH_INTERVAL=str(interval))
        before = [{"id": f"x{i}", "channel": "sms", "to": number(600 + i)} for i in range(30)]
        stack.send_one_at_a_time(before)
        assert stack.settled_queue_length(stack.queue, 0, timeout=10) == 0, "not all taken"

        private_rabbit.stop()
        assert stack.records() == [], "the buffer was flushed before the broker went away"
        private_rabbit.start()  # the same node: durable queue, persistent messages survive
        wait_for(
            lambda: worker.log_text().count("Connected to amqp://") >= 2,
            timeout=90,
            what="the worker to reconnect",
            logs=worker.log_text,
        )

        after = [{"id": f"y{i}", "channel": "sms", "to": number(700 + i)} for i in range(30)]
        stack.send_one_at_a_time(after)
        wanted = {m["id"] for m in before + after}
        records = stack.wait_records(
            lambda rs: {r["id"] for r in rs} >= wanted,
            timeout=3 * interval + 30,
            what="every message, before and after the restart",
        )
        # Redelivered ones may come twice, always the same message with the same verdict
        # (a copy kept from before the restart is not called a duplicate_id).
        assert {(r["hook"], r["verdict"]) for r in records} == {("dispatch", "allowed")}
        assert {r["id"] for r in records} == wanted
        assert "the flush timer is armed again (celery-batches #107)" in worker.log_text()
    finally:
        stack.close()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_hand_offs_stay_on_the_collectors_queue_in_a_collector_only_deployment(
    stack: CollectorStack,
) -> None:
    """Routed as the README shows; no worker consumes the app's default queue."""
    import json

    collect_queue = f"{stack.queue}.collect"
    routes = {COLLECT_TASK_NAME: {"queue": collect_queue}}
    stack.app.conf.task_routes = routes
    try:
        stack.start_collector(
            queue=collect_queue,
            BLOCKFILTER_COLLECT_FLUSH_INTERVAL="0.3",
            BFTEST_EXTRA_CONF=json.dumps({"task_routes": routes}),
        )
        # The first SMS request fails (both attempts): its messages are handed off.
        stack.simulator.set_faults([FaultRule("wa500", channel="sms", first=RETRY_ATTEMPTS)])
        messages = [{"id": f"o{i}", "channel": "sms", "to": number(900 + i)} for i in range(20)]
        stack.send_one_at_a_time(messages)
        stack.wait_records(lambda rs: len(rs) >= 20, timeout=40, what="the handed-off ones")
        assert recorded(stack.records()) == Counter(
            ("dispatch", m["id"], "allowed", "sms") for m in messages
        )
        assert "handed to blockfilter.filter_messages (check failed)" in stack.log_text()
        assert stack.queue_length(stack.queue) == 0, "a hand-off went to the default queue"
    finally:
        with stack.app.connection_for_write() as connection, contextlib.suppress(Exception):
            connection.default_channel.queue_delete(queue=collect_queue)


def test_handoff_options_follow_the_messages_route() -> None:
    from blockfilter.pipeline.collector import handoff_options

    assert handoff_options({"exchange": "", "routing_key": "blockfilter.collect"}) == {
        "queue": "blockfilter.collect"
    }
    assert handoff_options({"exchange": "pipeline", "routing_key": "collect.sms"}) == {
        "exchange": "pipeline",
        "routing_key": "collect.sms",
    }
    assert handoff_options({"is_eager": True, "exchange": None, "routing_key": None}) == {}
    assert handoff_options(None) == {}
