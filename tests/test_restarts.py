"""Servers that go away mid-run: the broker restarts, the status cache dies or hangs.

Every server stopped here is a private one started by the test (its own RabbitMQ node, its
own ``redis-server``) on free ports; the machine's shared RabbitMQ and Redis are never
stopped. What a user relies on:

* a RabbitMQ restart in the middle of a campaign loses no message: every one reaches a hook,
  repeats (redelivered batches) only with the same ``id`` and the same verdict;
* the status cache going away (killed, or hung) mid-run does not stop the filter and changes
  no verdict: the filter goes on without it, asking the API instead, and says so once
  (the designed behaviour, documented in :mod:`blockfilter.store.cache` and
  :mod:`blockfilter.kaleyra`); a run that starts with the cache already down completes too.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockfilter.config import Settings, load_settings
from blockfilter.engine.filter import Filter
from blockfilter.tasks import filter_campaign, merge_summaries
from blockfilter.testing.simulator import Simulator
from tests.support.campaigns import DISPATCHED, Campaign, make_campaign
from tests.support.env import TEST_KEY, TEST_SID, subprocess_env
from tests.support.harness import (
    require_broker,
)
from tests.support.private_servers import (
    PrivateRabbit,
    PrivateRedis,
    running_redis,
)
from tests.support.tuned import TunedStack

pytestmark = pytest.mark.slow

CACHE_WARNING = "status cache unavailable"


def big_campaign(tag: str, parts: int, base: int) -> Campaign:
    """``parts`` campaigns of 60 messages (see ``make_campaign``) as one."""
    pieces = [make_campaign(f"{tag}{k}", base=base + k * 1000) for k in range(parts)]
    campaign = Campaign([m for piece in pieces for m in piece.messages])
    for piece in pieces:
        for channel, numbers in piece.blocked.items():
            campaign.blocked[channel] |= numbers
    return campaign


def load_blocklist(simulator: Simulator, campaign: Campaign) -> None:
    for channel, numbers in campaign.blocked.items():
        if numbers:
            simulator.block(channel, *numbers)


def expected_by_id(campaign: Campaign) -> dict[str, set[tuple[str, str, str]]]:
    """id -> the (hook, verdict, final channel) its messages may reach."""
    expected: dict[str, set[tuple[str, str, str]]] = defaultdict(set)
    for message_id, verdict, channel in campaign.truth():
        hook = "dispatch" if verdict in DISPATCHED else "suppressed"
        expected[message_id].add((hook, verdict, channel))
    return expected


def seen_by_id(records: list[dict[str, Any]]) -> dict[str, set[tuple[str, str, str]]]:
    seen: dict[str, set[tuple[str, str, str]]] = defaultdict(set)
    for r in records:
        seen[r["id"]].add((r["hook"], r["verdict"], str(r["channel"]).lower()))
    return seen


def assert_outcome_is_the_truth(outcome: list[tuple[str, str, str]], campaign: Campaign) -> None:
    got = Counter((i, v, c.lower()) for i, v, c in outcome)
    assert got == Counter(campaign.truth())


# -- RabbitMQ restarts mid-campaign ----------------------------------------------------------


@pytest.mark.timeout(240)
def test_rabbitmq_restart_mid_campaign_loses_nothing(
    private_rabbit: PrivateRabbit, plugin_dir: Path, tmp_path: Path
) -> None:
    stack = TunedStack("amqp", private_rabbit.url, tmp_path, plugin_dir)
    try:
        first = big_campaign("before", parts=20, base=10_000_000)
        after = big_campaign("after", parts=5, base=20_000_000)
        load_blocklist(stack.simulator, first)
        load_blocklist(stack.simulator, after)
        stack.simulator.set_latency(0.3)  # batches in flight when the broker goes
        stack.start_worker()

        pending = [filter_campaign(first.messages, chunk_size=100, app=stack.app)]
        stack.wait_records(lambda rs: len(rs) > 0, timeout=30, what="the first batch")
        # Slower answers from now on, so that stopping the broker (which takes seconds) cannot
        # come after the whole campaign is done, however fast the workers are.
        stack.simulator.set_latency(2.0)
        private_rabbit.stop()  # with batches running, prefetched and waiting on the queue
        done_during_outage = {r["id"] for r in stack.records()}
        private_rabbit.start()  # the same node and Mnesia directory: durable queues survive
        assert len(done_during_outage) < len(first.ids), "the restart came too late"
        stack.simulator.set_latency(0.3)

        # The producer reconnects too: more of the campaign after the restart.
        pending.append(filter_campaign(after.messages, chunk_size=100, app=stack.app))

        wanted = set(first.ids) | set(after.ids)
        records = stack.wait_records(
            lambda rs: {r["id"] for r in rs} >= wanted,
            timeout=120,
            what="every message after the restart",
        )
        expected = expected_by_id(first) | expected_by_id(after)
        for message_id, seen in seen_by_id(records).items():
            # Repeats only of the same message, with the same verdict.
            assert seen == expected[message_id], (message_id, seen)
        for result, campaign in zip(pending, (first, after), strict=True):
            assert merge_summaries(result.get(timeout=60))["total"] == len(campaign.messages)
        assert not [r for r in records if r["verdict"] == "deferred"]
    finally:
        stack.close()


# -- the status cache going away -------------------------------------------------------------


@pytest.fixture
def simulator() -> Iterator[Simulator]:
    with Simulator(sid=TEST_SID, api_key=TEST_KEY) as sim:
        yield sim


@pytest.fixture
def cache_server(tmp_path: Path) -> Iterator[PrivateRedis]:
    with running_redis(tmp_path / "cache") as server:
        yield server


def cache_settings(base_url: str, cache_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "sid": TEST_SID,
        "api_key": TEST_KEY,
        "base_url": base_url,
        "cache_url": cache_url,
        "concurrency": 2,
        "retry_attempts": 2,
        "retry_deadline": 3.0,
        "backoff_base": 0.01,
        "backoff_max": 0.05,
        "request_timeout": 1.0,
        "connect_timeout": 1.0,
    }
    values.update(overrides)
    return load_settings(environ={}, **values)


def run_filter(settings: Settings, campaign: Campaign) -> tuple[list[tuple[str, str, str]], Any]:
    with Filter(settings) as engine:
        results = list(engine.run(campaign.messages))
        summary = engine.summary.as_dict()
    outcome = [(r["id"], r["verdict"], str(r["channel"])) for r in results]
    return outcome, summary


def cache_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if CACHE_WARNING in r.getMessage()]


def cache_goes_away_mid_run(
    simulator: Simulator,
    cache_server: PrivateRedis,
    settings: Settings,
    campaign: Campaign,
    how: str,
) -> tuple[list[tuple[str, str, str]], dict[str, Any], float, int]:
    """Run ``campaign``; once the API has seen 3 requests, kill (or hang) the cache.

    Returns the outcome, the summary, the run's seconds and the requests before the cache
    went away.
    """
    simulator.set_latency(0.05)
    simulator.reset_stats()
    gone_after: list[int] = []

    def take_the_cache_away() -> None:
        deadline = time.monotonic() + 20
        while simulator.snapshot(records=False).requests < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        gone_after.append(simulator.snapshot(records=False).requests)
        if how == "killed":
            cache_server.kill()
        else:
            cache_server.pause()

    saboteur = threading.Thread(target=take_the_cache_away, daemon=True)
    saboteur.start()
    started = time.monotonic()
    outcome, summary = run_filter(settings, campaign)
    elapsed = time.monotonic() - started
    saboteur.join(timeout=5)
    assert gone_after and gone_after[0] < summary["requests"], "the cache went too late"
    return outcome, summary, elapsed, gone_after[0]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["killed", "hung"])
def test_filter_goes_on_when_the_cache_goes_away_mid_run(
    how: str,
    simulator: Simulator,
    cache_server: PrivateRedis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = cache_settings(simulator.base_url, cache_server.url)
    warm = big_campaign("warm", parts=10, base=30_000_000)
    cold = big_campaign("cold", parts=50, base=31_000_000)
    load_blocklist(simulator, warm)
    load_blocklist(simulator, cold)

    # With the cache: every verdict right, and a second run answered from the cache.
    outcome, summary = run_filter(settings, warm)
    assert_outcome_is_the_truth(outcome, warm)
    outcome, summary = run_filter(settings, warm)
    assert_outcome_is_the_truth(outcome, warm)
    assert summary["requests"] == 0 and summary["cache_hits"] > 0

    # A campaign of cached and new numbers; the cache goes away once requests are flowing.
    campaign = Campaign(warm.messages + cold.messages, warm.blocked)
    for channel, numbers in cold.blocked.items():
        campaign.blocked[channel] = campaign.blocked[channel] | numbers
    caplog.clear()
    caplog.set_level(logging.WARNING, logger="blockfilter")
    outcome, summary, elapsed, _ = cache_goes_away_mid_run(
        simulator, cache_server, settings, campaign, how
    )

    # Same verdicts, none deferred: the API answered what the cache could not.
    assert_outcome_is_the_truth(outcome, campaign)
    assert summary["total"] == len(campaign.messages)
    # Said, but not once per number or per request (once per thread caught in the act at
    # most: see test_a_cache_that_goes_away_is_reported_once).
    assert 1 <= len(cache_warnings(caplog)) <= settings.concurrency + 1, cache_warnings(caplog)
    # A hung cache costs a few socket timeouts (2 s, one retry), not a stall per call.
    assert elapsed < 25, elapsed


@pytest.mark.timeout(60)
def test_a_cache_that_goes_away_is_reported_once(
    simulator: Simulator,
    cache_server: PrivateRedis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = cache_settings(simulator.base_url, cache_server.url, concurrency=4)
    campaign = big_campaign("once", parts=50, base=37_000_000)
    load_blocklist(simulator, campaign)
    caplog.set_level(logging.WARNING, logger="blockfilter")
    # Hung, so that the calls in flight all fail together, as on a real network partition.
    outcome, _, _, _ = cache_goes_away_mid_run(simulator, cache_server, settings, campaign, "hung")
    assert_outcome_is_the_truth(outcome, campaign)
    assert len(cache_warnings(caplog)) == 1, cache_warnings(caplog)


@pytest.mark.timeout(60)
def test_filter_runs_with_the_cache_down_from_the_start(
    simulator: Simulator,
    cache_server: PrivateRedis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    campaign = big_campaign("down", parts=10, base=32_000_000)
    load_blocklist(simulator, campaign)
    cache_server.kill()
    caplog.set_level(logging.WARNING, logger="blockfilter")

    outcome, summary = run_filter(cache_settings(simulator.base_url, cache_server.url), campaign)

    assert_outcome_is_the_truth(outcome, campaign)
    assert summary["requests"] == campaign.logical_requests()  # all asked of the API
    assert summary["cache_hits"] == 0
    assert len(cache_warnings(caplog)) == 1


@pytest.mark.timeout(60)
def test_cli_filter_with_the_cache_down_exits_0(
    simulator: Simulator, cache_server: PrivateRedis, tmp_path: Path
) -> None:
    campaign = big_campaign("cli", parts=5, base=33_000_000)
    load_blocklist(simulator, campaign)
    cache_server.kill()
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(m) + "\n" for m in campaign.messages), encoding="utf-8")
    env = subprocess_env(
        simulator, BLOCKFILTER_CACHE_URL=cache_server.url, BLOCKFILTER_LOAD_PLUGINS=""
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "blockfilter",
            "filter",
            str(source),
            "--out",
            str(tmp_path / "out.jsonl"),
            "--summary-json",
            str(tmp_path / "summary.json"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert_outcome_is_the_truth([(r["id"], r["verdict"], r["channel"]) for r in results], campaign)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["total"] == len(campaign.messages) and summary["cache_hits"] == 0
    assert done.stderr.count(CACHE_WARNING) == 1, done.stderr[-2000:]


@pytest.mark.timeout(60)
def test_a_long_lived_process_uses_the_cache_again_once_it_is_back(
    simulator: Simulator, cache_server: PrivateRedis
) -> None:
    """The path of a worker: sources shared for the process's life (``build_filter``)."""
    from blockfilter.plugins.builtin import SHARED_SOURCES
    from blockfilter.plugins.manager import build_filter, get_plugin_manager, reset_plugin_manager

    settings = cache_settings(simulator.base_url, cache_server.url, load_plugins=[])
    blip = big_campaign("blip", parts=2, base=34_000_000)
    later = big_campaign("later", parts=2, base=35_000_000)
    load_blocklist(simulator, blip)
    load_blocklist(simulator, later)

    def run(campaign: Campaign) -> dict[str, Any]:
        with build_filter(settings, get_plugin_manager(settings)) as engine:
            outcome = [(r["id"], r["verdict"], r["channel"]) for r in engine.run(campaign.messages)]
            summary: dict[str, Any] = engine.summary.as_dict()
        assert_outcome_is_the_truth(outcome, campaign)
        return summary

    try:
        cache_server.kill()
        run(blip)  # the cache is down: answered by the API
        cache_server.start()  # back, on the same port (empty)
        # As long as the rate limiter leaves a broken Redis alone (blockfilter.ratelimit), and
        # a little more.
        deadline = time.monotonic() + 8
        while True:
            run(later)
            if run(later)["cache_hits"] > 0 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert run(later)["requests"] == 0, "the cache is back but this process never uses it"
    finally:
        SHARED_SOURCES.clear()
        reset_plugin_manager()


# -- a Celery worker whose cache dies mid-campaign --------------------------------------------


@pytest.mark.timeout(120)
def test_worker_goes_on_when_its_cache_dies_mid_campaign(
    cache_server: PrivateRedis, plugin_dir: Path, tmp_path: Path
) -> None:
    stack = TunedStack(
        "amqp",
        require_broker("amqp"),
        tmp_path,
        plugin_dir,
        overrides={"BLOCKFILTER_CACHE_URL": cache_server.url},
    )
    try:
        campaign = big_campaign("wcache", parts=20, base=36_000_000)
        load_blocklist(stack.simulator, campaign)
        stack.simulator.set_latency(0.2)
        worker = stack.start_worker()

        result = filter_campaign(campaign.messages, chunk_size=100, app=stack.app)
        stack.wait_records(lambda rs: len(rs) > 0, timeout=30, what="the first batch")
        cache_server.kill()
        assert len(stack.records()) < len(campaign.messages), "the cache died too late"

        summaries = result.get(timeout=90)
        records = stack.records()
        # No batch failed or ran twice because of the cache: each message once, verdict right.
        assert Counter(r["id"] for r in records) == campaign.ids
        expected = expected_by_id(campaign)
        for message_id, seen in seen_by_id(records).items():
            assert seen <= expected[message_id], (message_id, seen)
        assert merge_summaries(summaries)["total"] == len(campaign.messages)
        log = worker.log_text()
        assert CACHE_WARNING in log
        assert "Traceback" not in log, log[-3000:]
    finally:
        stack.close()
