"""The Celery task: real worker processes on real brokers (RabbitMQ and Redis), a real simulator.

The fast tests cover the pure helpers (campaign splitting, summaries, retry countdowns); the
slow ones start ``celery worker`` processes that find the test plugin through a real entry
point, and check what reached its hooks (recorded in Redis).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockfilter.model import VERDICT_FIELDS
from blockfilter.pipeline.batch import route_as_written
from blockfilter.tasks import (
    DEFERRED_QUEUE,
    TASK_NAME,
    deferred_queue,
    filter_campaign,
    merge_summaries,
    retry_countdown,
    split_campaign,
)
from blockfilter.testing.simulator import FaultRule
from tests.support.campaigns import mixed_campaign
from tests.support.factory import make_app
from tests.support.harness import (
    BROKEN_ENTRY_POINT,
    RETRY_ATTEMPTS,
    TASK_MAX_RETRIES,
    Stack,
    require_broker,
)

# -- a campaign and what should become of it -------------------------------------------------


def number(i: int) -> str:
    return f"+91982{i:07d}"


def make_campaign(size: int) -> tuple[list[dict[str, Any]], dict[str, set[str]]]:
    """Messages on every channel, some sharing a number (every 50th), some with fallbacks, a
    few invalid, an unknown channel, one repeated id; and the blocklist to load."""
    messages, blocked = mixed_campaign(
        size, "m", share_every=50, share_back=1, second_fallback_every=70, numbered=number
    )
    messages.append({"id": "fax-1", "channel": "fax", "to": number(1)})
    messages.append({"id": "m3", "channel": "voice", "to": number(3)})  # a repeated id
    return messages, blocked


def expected_outcome(
    messages: list[dict[str, Any]], blocked: dict[str, set[str]]
) -> list[tuple[str, str, str]]:
    """(id, verdict, final channel) per message, computed independently of the engine."""
    seen: set[str] = set()
    outcome = []
    for m in messages:
        channel = m["channel"].lower()
        if m["id"] in seen:
            outcome.append((m["id"], "invalid", m["channel"]))
            continue
        seen.add(m["id"])
        if channel not in ("sms", "whatsapp", "voice") or m["to"] == "12":
            outcome.append((m["id"], "invalid", m["channel"]))
        elif m["to"] not in blocked[channel]:
            outcome.append((m["id"], "allowed", m["channel"]))
        else:
            for fallback in m.get("fallback", []):
                if m["to"] not in blocked[fallback]:
                    outcome.append((m["id"], "rerouted", fallback))
                    break
            else:
                outcome.append((m["id"], "blocked", m["channel"]))
    return outcome


def hook_of(verdict: str) -> str:
    return "dispatch" if verdict in ("allowed", "rerouted") else "suppressed"


# -- fast: the helpers -----------------------------------------------------------------------


def distinct_numbers(batch: list[dict[str, Any]]) -> Counter[str]:
    """Distinct numbers per channel in a batch (valid, first-occurrence messages)."""
    per_channel: dict[str, set[str]] = defaultdict(set)
    for m in batch:
        if m["to"] != "12" and m["channel"].lower() in ("sms", "whatsapp", "voice"):
            per_channel[m["channel"].lower()].add(m["to"])
    return Counter({c: len(n) for c, n in per_channel.items()})


def test_split_campaign_keeps_every_message_once_and_fills_requests() -> None:
    messages, _ = make_campaign(3000)
    batches = split_campaign(messages, chunk_size=450)

    flat = [id(m) for batch in batches for m in batch]
    assert sorted(flat) == sorted(id(m) for m in messages), "a message was lost or repeated"
    assert len(batches) >= 6 and all(len(batch) <= 450 + 5 for batch in batches)
    # Requests are full: across the whole campaign, at most one partial request per channel.
    partial = [
        (channel, count)
        for batch in batches
        for channel, count in distinct_numbers(batch).items()
        if count % 100
    ]
    assert len(partial) <= 3, partial
    # The input order is kept within a batch.
    position = {id(m): i for i, m in enumerate(messages)}
    for batch in batches:
        assert [position[id(m)] for m in batch] == sorted(position[id(m)] for m in batch)


def test_split_campaign_keeps_a_repeated_id_behind_its_first_occurrence() -> None:
    messages, _ = make_campaign(1000)
    batches = split_campaign(messages, chunk_size=100)
    holding = [b for b in batches if any(m["id"] == "m3" for m in b)]
    assert len(holding) == 1, "both copies of m3 must be in one batch to be caught"
    copies = [m for m in holding[0] if m["id"] == "m3"]
    assert [c["channel"] for c in copies] == ["voice", "voice"]
    assert copies[1]["to"] == number(3) and copies[0] is messages[3]


def test_split_campaign_parses_only_the_numbers_not_written_in_e164(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Parsing was most of a split's time, in the process that sends the campaign.
    import blockfilter.pipeline.tasks as tasks_module

    parsed: list[Any] = []
    parse = tasks_module.parse_message

    def counting(message: Any) -> Any:
        parsed.append(message)
        return parse(message)

    monkeypatch.setattr(tasks_module, "parse_message", counting)
    as_written = [{"id": f"e{i}", "channel": "SMS", "to": f"+91982{i:07d}"} for i in range(300)]
    national = {"id": "n", "channel": "sms", "to": "098200 00007", "region": "IN"}
    spaced = {"id": "s", "channel": "sms", "to": "+91 98200 00008"}
    batches = split_campaign([*as_written, national, spaced], chunk_size=100)
    assert parsed == [national, spaced]
    # The same number written three ways is one number: its messages ride together.
    together = [b for b in batches if national in b]
    assert len(together) == 1 and spaced in together[0] and as_written[7] in together[0]
    assert as_written[8] in together[0]


def test_route_as_written_reads_only_what_needs_no_parsing() -> None:
    assert route_as_written({"channel": "WhatsApp", "to": "+919820000001"}) == (
        "whatsapp",
        "+919820000001",
    )
    for message in (
        {"channel": "sms", "to": "+91 9820000001"},
        {"channel": "sms", "to": "9820000001"},
        {"channel": "sms", "to": "+919820000001", "region": "IN"},
        {"channel": "fax", "to": "+919820000001"},
        {"channel": "sms", "to": 919820000001},
        {"channel": None, "to": "+919820000001"},
        ["sms", "+919820000001"],
    ):
        assert route_as_written(message) is None, message


def test_split_campaign_small_and_degenerate_inputs() -> None:
    assert split_campaign([]) == []
    one = [{"id": "a", "channel": "sms", "to": number(1)}]
    assert split_campaign(one) == [one]
    junk: list[Any] = ["not a message", {"id": "b"}]
    assert split_campaign(junk) == [junk]
    # Messages of one number are never split, even past chunk_size.
    same = [{"id": str(i), "channel": "sms", "to": number(9)} for i in range(25)]
    assert split_campaign(same, chunk_size=10) == [same]
    with pytest.raises(ValueError):
        split_campaign(one, chunk_size=0)


def test_merge_summaries_adds_up() -> None:
    a = {
        "total": 3,
        "verdicts": {"allowed": 2, "blocked": 1},
        "channels": {"sms": {"allowed": 2}, "voice": {"blocked": 1}},
        "requests": 2,
        "cache_hits": 1,
        "elapsed_s": 0.5,
        "credentials_refused": False,
    }
    b = {
        "total": 2,
        "verdicts": {"allowed": 1, "deferred": 1},
        "channels": {"sms": {"allowed": 1, "deferred": 1}},
        "requests": 3,
        "cache_hits": 0,
        "elapsed_s": 0.25,
        "credentials_refused": True,
    }
    assert merge_summaries([a, None, b]) == {
        "total": 5,
        "verdicts": {"allowed": 3, "blocked": 1, "deferred": 1},
        "channels": {"sms": {"allowed": 3, "deferred": 1}, "voice": {"blocked": 1}},
        "requested_channels": {"sms": {"allowed": 3, "deferred": 1}, "voice": {"blocked": 1}},
        "requests": 5,
        "cache_hits": 1,
        "elapsed_s": 0.75,
        "credentials_refused": True,
    }
    assert merge_summaries([])["total"] == 0


def test_the_summary_names_the_requested_and_the_final_channel_of_a_reroute() -> None:
    import json

    from blockfilter.config import load_settings
    from blockfilter.engine.filter import Filter
    from blockfilter.sources import FunctionSource

    # An SMS-only campaign: 29 messages rerouted to WhatsApp, one allowed.
    messages = [
        {"id": str(i), "channel": "sms", "to": number(i), "fallback": ["whatsapp"]}
        for i in range(30)
    ]
    blocked = {number(i) for i in range(29)}

    def blocklist(channel: str, numbers: list[str]) -> set[str]:
        return {n for n in numbers if n in blocked} if channel == "sms" else set()

    expected_channels = {"sms": {"allowed": 1}, "whatsapp": {"rerouted": 29}}
    expected_requested = {"sms": {"allowed": 1, "rerouted": 29}}
    # A key that is no part of a word: every key is registered with the log guard for good, and
    # a key "K" would be redacted out of every later test's "BLOCKFILTER" log lines.
    settings = load_settings(environ={}, sid="SUMMARYSID", api_key="summary-key-4d2a")
    with Filter(settings, sources=[FunctionSource("test", blocklist)]) as engine:
        list(engine.run(messages))
        summary = engine.summary.as_dict()
    assert summary["channels"] == expected_channels
    assert summary["requested_channels"] == expected_requested
    lines = [json.dumps(m).encode() + b"\n" for m in messages]  # the CLI's path
    with Filter(settings, sources=[FunctionSource("test", blocklist)]) as engine:
        list(engine.run_lines(lambda: iter(lines)))
        summary = engine.summary.as_dict()
    assert summary["channels"] == expected_channels
    assert summary["requested_channels"] == expected_requested
    assert merge_summaries([summary, summary])["requested_channels"] == {
        "sms": {"allowed": 2, "rerouted": 58}
    }


def test_retry_countdown_grows_exponentially_with_bounded_jitter() -> None:
    rng = random.Random(7)
    for retries in range(6):
        ceiling = 5.0 * 2**retries
        draws = [retry_countdown(5.0, retries, rng=rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in draws)
        assert len({round(d, 6) for d in draws}) > 100, "no jitter"
    assert retry_countdown(5.0, 30, rng=rng) <= 600.0


def test_deferred_queue_is_durable_on_the_default_exchange() -> None:
    app = make_app(
        broker="memory://",
        backend="cache+memory://",
        queue="q",
        deferred_queue="",
        keyprefix="k:",
    )
    queue = deferred_queue(app)
    assert (queue.name, queue.routing_key, queue.exchange.name) == (DEFERRED_QUEUE,) * 2 + ("",)
    assert queue.durable
    app.conf.blockfilter_deferred_queue = "mine.deferred"
    assert deferred_queue(app).name == "mine.deferred"
    # Registered in the user's app by autodiscovery, under the contract's name.
    assert TASK_NAME in app.tasks
    assert app.tasks[TASK_NAME].acks_late and app.tasks[TASK_NAME].reject_on_worker_lost


# -- slow: real workers ----------------------------------------------------------------------


@pytest.fixture(params=["amqp", "redis"])
def stack(request: pytest.FixtureRequest, plugin_dir: Path, tmp_path: Path) -> Iterator[Stack]:
    kind = request.param
    broker = require_broker(kind)
    world = Stack(kind, broker, tmp_path, plugin_dir)
    try:
        yield world
    finally:
        world.close()


@pytest.fixture
def amqp_stack(plugin_dir: Path, tmp_path: Path) -> Iterator[Stack]:
    world = Stack("amqp", require_broker("amqp"), tmp_path, plugin_dir)
    try:
        yield world
    finally:
        world.close()


def by_id(records: list[dict[str, Any]]) -> dict[str, list[tuple[str, str, str]]]:
    found: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for r in records:
        found[r["id"]].append((r["hook"], r["verdict"], r["channel"]))
    return found


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_campaign_every_message_reaches_exactly_one_hook(stack: Stack) -> None:
    messages, blocked = make_campaign(1000)
    stack.simulator.block_all(blocked)
    expected = expected_outcome(messages, blocked)
    stack.start_worker()

    result = filter_campaign(messages, chunk_size=250, app=stack.app)
    summaries = result.get(timeout=60)
    assert len(summaries) >= 4, "the campaign was not shared out"

    records = stack.wait_records(
        lambda rs: len(rs) >= len(messages), timeout=30, what="every message"
    )
    time.sleep(0.3)  # nothing more may come
    records = stack.records()
    assert len(records) == len(messages)
    got = Counter((r["id"], r["verdict"], r["channel"]) for r in records)
    assert got == Counter(expected)
    for r in records:
        assert r["hook"] == hook_of(r["verdict"]), r
        if r["verdict"] == "rerouted":
            original = next(m for m in messages if m["id"] == r["id"])
            assert r["message"]["original_channel"] == original["channel"].lower()
    # Every other field comes through untouched (big integers, unicode).
    m7 = next(r for r in records if r["id"] == "m7")["message"]
    assert m7["payload"] == {"big": 2**70 + 7, "text": "नमस्ते", "n": 7}

    merged = merge_summaries(summaries)
    assert merged["total"] == len(messages)
    assert merged["verdicts"] == dict(Counter(v for _, v, _ in expected))
    assert merged["requests"] == stack.simulator.stats.requests
    assert stack.simulator.stats.max_numbers_per_request <= 100


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_worker_killed_mid_run_loses_nothing(stack: Stack) -> None:
    messages, blocked = make_campaign(1000)
    stack.simulator.block_all(blocked)
    expected: dict[str, set[tuple[str, str, str]]] = defaultdict(set)
    for message_id, verdict, channel in expected_outcome(messages, blocked):
        expected[message_id].add((hook_of(verdict), verdict, channel))
    stack.simulator.set_latency(0.5)  # so batches are in flight when the worker dies
    worker = stack.start_worker()

    result = filter_campaign(messages, chunk_size=100, app=stack.app)
    stack.wait_records(lambda rs: len(rs) > 0, timeout=30, what="the first batch")
    # A pool process dies under its batch (OOM killer): reject_on_worker_lost gives it back.
    children = worker.children()
    assert children, "no pool process to kill"
    os.kill(children[0], signal.SIGKILL)
    time.sleep(0.7)
    # Then the whole worker dies, with batches running and prefetched.
    worker.kill()
    done_before = {r["id"] for r in stack.records()}
    assert len(done_before) < len(messages), "the kill came too late to test anything"

    stack.start_worker()
    ids = {m["id"] for m in messages}
    records = stack.wait_records(
        lambda rs: {r["id"] for r in rs} >= ids, timeout=60, what="every message after restart"
    )
    # Repeats are allowed, but always the same message (same id) with the same verdict.
    for message_id, seen in by_id(records).items():
        assert set(seen) == expected[message_id], (message_id, seen)

    merged = merge_summaries(result.get(timeout=60))
    assert merged["total"] == len(messages)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_outage_defers_parks_and_replay_completes(stack: Stack) -> None:
    from blockfilter.pipeline.replay import replay_deferred

    messages = [
        {"id": f"s{i}", "channel": "sms", "to": number(i), "payload": {"big": 2**70 + i}}
        for i in range(50)
    ]
    messages += [
        {"id": f"w{i}", "channel": "whatsapp", "to": number(100 + i), "fallback": ["sms"]}
        for i in range(30)
    ]
    messages += [
        {"id": "bad-1", "channel": "sms", "to": "12"},
        {"id": "bad-2", "channel": "x", "to": number(999)},
    ]
    stack.simulator.set_faults([FaultRule("wa500")])  # the API is down
    stack.start_worker()

    summary = stack.app.send_task(TASK_NAME, args=[messages]).get(timeout=60)
    assert summary["total"] == len(messages)
    assert summary["verdicts"] == {"deferred": 80, "invalid": 2}

    # Suppressed once, as deferred, only after the retries: no earlier attempt leaked out.
    records = stack.wait_records(lambda rs: len(rs) >= 82, timeout=20, what="suppressed")
    assert Counter((r["hook"], r["verdict"], r["reason"]) for r in records) == {
        ("suppressed", "deferred", "check_failed"): 80,
        ("suppressed", "invalid", "invalid_number"): 1,
        ("suppressed", "invalid", "unknown_channel"): 1,
    }
    # The whole budget was spent, and no more: client attempts x task attempts per request.
    by_channel = stack.simulator.stats.requests_by_channel
    attempts = RETRY_ATTEMPTS * (1 + TASK_MAX_RETRIES)
    assert by_channel == {"sms": attempts, "whatsapp": attempts}

    # Parked on the library's queue: the original messages, without verdict fields.
    parked = stack.peek_deferred(80)
    originals = [json.loads(json.dumps(m)) for m in messages[:80]]
    assert sorted(parked, key=lambda m: m["id"]) == sorted(originals, key=lambda m: m["id"])
    assert all(VERDICT_FIELDS.isdisjoint(m) for m in parked)

    # The API is back: replay.
    stack.simulator.clear_faults()
    stack.simulator.block("sms", number(0), number(1))
    assert replay_deferred(stack.app, batch_size=30, timeout=1.0) == 80
    records = stack.wait_records(lambda rs: len(rs) >= 82 + 80, timeout=30, what="replayed")
    final = {
        r["id"]: (r["hook"], r["verdict"], r["channel"])
        for r in records
        if r["verdict"] != "deferred" and not r["id"].startswith("bad")
    }
    assert len(final) == 80
    assert final["s0"] == ("suppressed", "blocked", "sms")
    assert final["s2"] == ("dispatch", "allowed", "sms")
    assert final["w0"] == ("dispatch", "allowed", "whatsapp")
    assert next(r for r in records if r["id"] == "s5" and r["verdict"] == "allowed")["message"][
        "payload"
    ] == {"big": 2**70 + 5}
    assert stack.settled_queue_length(stack.deferred_queue, 0) == 0
    assert replay_deferred(stack.app, timeout=0.3) == 0


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_retry_carries_only_the_deferred_messages(amqp_stack: Stack) -> None:
    messages = [{"id": f"s{i}", "channel": "sms", "to": number(i)} for i in range(40)]
    messages += [{"id": f"w{i}", "channel": "whatsapp", "to": number(100 + i)} for i in range(20)]
    # WhatsApp checks fail for the first task attempt (both client attempts), then recover.
    amqp_stack.simulator.set_faults([FaultRule("wa500", channel="whatsapp", first=RETRY_ATTEMPTS)])
    amqp_stack.start_worker()

    summary = amqp_stack.app.send_task(TASK_NAME, args=[messages]).get(timeout=30)

    # The summary covers the whole batch once, across the attempts.
    assert summary["total"] == 60
    assert summary["verdicts"] == {"allowed": 60}
    assert summary["channels"] == {"sms": {"allowed": 40}, "whatsapp": {"allowed": 20}}
    records = amqp_stack.records()
    assert Counter(r["id"] for r in records) == Counter(m["id"] for m in messages)
    assert {r["hook"] for r in records} == {"dispatch"}
    # The retry asked only about what was deferred: SMS once, WhatsApp 2 failures + 1.
    assert amqp_stack.simulator.stats.requests_by_channel == {
        "sms": 1,
        "whatsapp": RETRY_ATTEMPTS + 1,
    }
    assert amqp_stack.settled_queue_length(amqp_stack.deferred_queue, 0) == 0


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_refused_credentials_are_final_without_task_retry(amqp_stack: Stack) -> None:
    messages = [{"id": f"r{i}", "channel": "sms", "to": number(i)} for i in range(10)]
    amqp_stack.simulator.set_faults([FaultRule("rbc001")])
    amqp_stack.start_worker()

    summary = amqp_stack.app.send_task(TASK_NAME, args=[messages]).get(timeout=30)

    assert summary["verdicts"] == {"deferred": 10}
    assert summary["credentials_refused"] is True
    records = amqp_stack.records()
    assert Counter((r["hook"], r["verdict"], r["reason"]) for r in records) == {
        ("suppressed", "deferred", "credentials_refused"): 10
    }
    assert amqp_stack.simulator.stats.requests == 1, "a refused account was asked again"
    assert sorted(m["id"] for m in amqp_stack.peek_deferred(10)) == sorted(
        m["id"] for m in messages
    )


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_failing_dispatch_hook_retries_the_batch_then_parks_it(amqp_stack: Stack) -> None:
    from celery.exceptions import CeleryError

    messages = [{"id": f"h{i}", "channel": "sms", "to": number(i)} for i in range(8)]
    amqp_stack.start_worker()

    # Fails once: the batch is run again and dispatched, once, counted once.
    amqp_stack.redis.set(amqp_stack.fail_key, 1)
    summary = amqp_stack.app.send_task(TASK_NAME, args=[messages]).get(timeout=30)
    assert summary["total"] == 8 and summary["verdicts"] == {"allowed": 8}
    assert sorted(r["id"] for r in amqp_stack.records()) == sorted(m["id"] for m in messages)

    # Fails on every attempt: the task fails, and the batch waits on the deferred queue.
    amqp_stack.redis.set(amqp_stack.fail_key, 1 + TASK_MAX_RETRIES)
    failed = amqp_stack.app.send_task(TASK_NAME, args=[messages])
    with pytest.raises((RuntimeError, CeleryError), match="fails on purpose"):
        failed.get(timeout=30)
    assert len(amqp_stack.records()) == 8, "a failed dispatch was recorded"
    assert amqp_stack.peek_deferred(8) == messages


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_broken_plugin_does_not_stop_the_worker(amqp_stack: Stack) -> None:
    worker = amqp_stack.start_worker()
    messages = [{"id": f"b{i}", "channel": "sms", "to": number(i)} for i in range(5)]
    summary = amqp_stack.app.send_task(TASK_NAME, args=[messages]).get(timeout=30)

    assert summary["verdicts"] == {"allowed": 5}
    records = amqp_stack.wait_records(lambda rs: len(rs) >= 5, timeout=10, what="dispatches")
    assert {(r["hook"], r["id"]) for r in records} == {("dispatch", f"b{i}") for i in range(5)}
    log = worker.log_text()
    assert f"plugin {BROKEN_ENTRY_POINT!r}" in log and "fails on import, on purpose" in log
    assert "Traceback" not in log
