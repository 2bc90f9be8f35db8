"""Fewer requests: a shared Redis cache across processes, coalescing, full-list sync, estimates.

Everything talks to a real simulator over HTTP and a real Redis (127.0.0.1:6379).

Isolation on a shared Redis server: in-process tests give their cache a random key namespace.
The command line has no namespace setting, so each of its tests gets a ``redis-server`` of its
own (:func:`cli_redis`): nothing another test, or another run of the suite, does to a shared
database can delete its entries or its rate limit's pause while it runs.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from blockfilter.config import Settings, load_settings
from blockfilter.engine.filter import Filter
from blockfilter.kaleyra.coalesce import lease_seconds
from blockfilter.kaleyra.source import KaleyraSource
from blockfilter.kaleyra.sync import sync_pages
from blockfilter.store.cache import MemoryCache, RedisCache
from blockfilter.store.ratelimit import RateLimiter
from blockfilter.testing.simulator import Simulator
from tests.support.env import REDIS_HOST, REDIS_PORT, redis_up, subprocess_env
from tests.support.private_servers import running_redis

pytestmark = pytest.mark.skipif(not redis_up(), reason=f"no Redis at {REDIS_HOST}:{REDIS_PORT}")


def make_numbers(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    found: dict[str, None] = {}
    while len(found) < count:
        found[f"+9198{rng.randrange(10**8):08d}"] = None
    return list(found)


def campaign_file(path: Path, numbers: list[str], channel: str = "sms") -> Path:
    path.write_text(
        "".join(
            json.dumps({"id": f"m{i}", "channel": channel, "to": n}) + "\n"
            for i, n in enumerate(numbers)
        )
    )
    return path


def verdicts(output: bytes) -> dict[str, str]:
    return {r["to"]: r["verdict"] for r in map(json.loads, output.splitlines())}


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def simulator() -> Iterator[Simulator]:
    # Any SID and key are accepted, so each test can be an account of its own.
    with Simulator() as sim:
        yield sim


@pytest.fixture
def namespace() -> Iterator[str]:
    """A key prefix of this test's own (db 0); its keys are deleted afterwards."""
    prefix = f"bftest:{uuid.uuid4().hex}:"
    yield prefix
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=0)
    keys = list(client.scan_iter(match=f"{prefix}*", count=10_000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def cli_redis(tmp_path: Path) -> Iterator[redis.Redis]:
    """A client of the command-line test's own Redis server (empty, gone afterwards)."""
    with (
        running_redis(tmp_path / "cli-redis") as server,
        contextlib.closing(server.client()) as client,
    ):
        yield client


def cli_env(sim: Simulator, cache: redis.Redis, **extra: str) -> dict[str, str]:
    """A user's environment: this simulator, an account of the test's own, the ``cache``
    server (:func:`cli_redis`)."""
    port = cache.connection_pool.connection_kwargs["port"]
    own = {
        "KALEYRA_SID": f"T{uuid.uuid4().hex[:12]}",
        "BLOCKFILTER_CACHE_URL": f"redis://127.0.0.1:{port}/0",
        "BLOCKFILTER_CACHE_SECRET": uuid.uuid4().hex,
        "BLOCKFILTER_REQUEST_TIMEOUT": "2",
        "BLOCKFILTER_RETRY_DEADLINE": "3",
    }
    return subprocess_env(sim, **{**own, **extra})


def blockfilter(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "blockfilter", *args], capture_output=True, env=env, timeout=120
    )


def start(*args: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "blockfilter", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def estimate(campaign: Path, env: dict[str, str]) -> int:
    done = blockfilter("filter", str(campaign), "--estimate", env=env)
    assert done.returncode == 0, done.stderr
    match = re.fullmatch(rb"(\d+) API requests\n", done.stdout)
    assert match, done.stdout
    return int(match.group(1))


def settings_for(sim: Simulator, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "sid": "TESTSID",
        "api_key": "test-key-0123456789",
        "base_url": sim.base_url,
        "cache_url": f"redis://{REDIS_HOST}:{REDIS_PORT}/0",
        "retry_attempts": 2,
        "retry_deadline": 3.0,
        "backoff_base": 0.01,
        "backoff_max": 0.02,
        "request_timeout": 2.0,
    }
    values.update(overrides)
    return load_settings(environ={}, **values)


def redis_source(settings: Settings, namespace: str, **kwargs: Any) -> KaleyraSource:
    """A Kaleyra source on a namespaced Redis cache and rate limiter, as a worker has."""
    cache = RedisCache(settings, namespace=namespace)
    limiter = RateLimiter(
        settings.rate_limit,
        account=settings.sid or "",
        redis_url=settings.cache_url,
        namespace=namespace,
    )
    return KaleyraSource(settings, cache=cache, limiter=limiter, **kwargs)


def run(source: KaleyraSource, numbers: list[str], channel: str = "sms") -> dict[str, str]:
    messages = [{"id": str(i), "channel": channel, "to": n} for i, n in enumerate(numbers)]
    with Filter(source.settings, sources=[source]) as engine:
        return {r["to"]: r["verdict"] for r in engine.run(messages)}


# -- across processes, through Redis -------------------------------------------------------


def test_the_second_process_asks_nothing_the_first_learnt(
    simulator: Simulator, cli_redis: redis.Redis, tmp_path: Path
) -> None:
    pool = make_numbers(400, seed=1)
    blocked = set(pool[::7])
    simulator.block("sms", *blocked)
    env = cli_env(simulator, cli_redis)
    first = campaign_file(tmp_path / "first.jsonl", pool[:300])
    # The second campaign shares 200 numbers with the first and brings 100 new ones.
    second = campaign_file(tmp_path / "second.jsonl", pool[100:400])

    assert estimate(first, env) == 3
    done = blockfilter("filter", str(first), env=env)
    assert done.returncode == 0, done.stderr
    assert simulator.stats.requests == 3

    simulator.reset_stats()
    assert estimate(second, env) == 1
    done = blockfilter("filter", str(second), env=env)
    assert done.returncode == 0, done.stderr
    stats = simulator.stats
    assert (stats.requests, stats.numbers_asked) == (1, 100)
    assert verdicts(done.stdout) == {
        n: "blocked" if n in blocked else "allowed" for n in pool[100:400]
    }


@pytest.mark.slow
def test_two_processes_at_once_ask_each_number_once(
    simulator: Simulator, cli_redis: redis.Redis, tmp_path: Path
) -> None:
    pool = make_numbers(1200, seed=2)
    blocked = set(pool[::5])
    simulator.block("sms", *blocked)
    # Slow answers and few in flight: each process alone would take seconds, so the two
    # overlap even if one starts a few hundred milliseconds late.
    simulator.set_latency(0.3)
    env = cli_env(simulator, cli_redis, BLOCKFILTER_CONCURRENCY="4")
    summaries = [tmp_path / "a.json", tmp_path / "b.json"]
    # The same numbers, in different orders, so each process leases some before the other.
    campaigns = [
        campaign_file(tmp_path / "a.jsonl", pool),
        campaign_file(tmp_path / "b.jsonl", pool[::-1]),
    ]
    processes = [
        start("filter", str(c), "--summary-json", str(s), env=env)
        for c, s in zip(campaigns, summaries, strict=True)
    ]
    outputs = [p.communicate(timeout=60) for p in processes]
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err
        assert verdicts(out) == {n: "blocked" if n in blocked else "allowed" for n in pool}
    stats = simulator.stats
    # Should it ever fail, say why: a cache the processes had to go on without warns so.
    said = [err.decode(errors="replace") for _, err in outputs]
    assert stats.numbers_asked == len(pool), said
    assert stats.max_numbers_per_request <= 100
    counts = [json.loads(s.read_text()) for s in summaries]
    assert sum(c["requests"] for c in counts) == stats.requests
    # Every number either asked by a process or answered to it by the other.
    assert sum(c["cache_hits"] for c in counts) == len(pool)


@pytest.mark.slow
def test_two_syncs_at_once_page_the_list_once(simulator: Simulator, cli_redis: redis.Redis) -> None:
    simulator.block("whatsapp", *make_numbers(450, seed=3))
    simulator.set_latency(0.3)
    env = cli_env(simulator, cli_redis)
    processes = [start("sync", "--channel", "whatsapp", "--json", env=env) for _ in range(2)]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        results.append(json.loads(out)["channels"]["whatsapp"])
    assert [r["size"] for r in results] == [450, 450]
    # One of them paged the list; the other waited for its mark. (No size was known, so the
    # pages went out in rounds of 1, 2, 4: 7 pages for a list that needs 5.)
    assert sorted(r["pages"] for r in results)[0] == 0
    assert simulator.stats.requests == sum(r["pages"] for r in results)


def test_after_a_sync_a_campaign_makes_no_lookup(
    simulator: Simulator, cli_redis: redis.Redis, tmp_path: Path
) -> None:
    pool = make_numbers(1000, seed=4)
    blocked = set(pool[:250])
    simulator.block("sms", *blocked)
    env = cli_env(simulator, cli_redis)
    done = blockfilter("sync", "--channel", "sms", "--json", env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)["channels"]["sms"]
    assert (result["size"], result["marked"]) == (250, True)
    assert simulator.stats.requests == result["pages"] and simulator.stats.numbers_asked == 0

    simulator.reset_stats()
    campaign = campaign_file(tmp_path / "c.jsonl", pool)
    assert estimate(campaign, env) == 0
    done = blockfilter("filter", str(campaign), env=env)
    assert done.returncode == 0, done.stderr
    assert simulator.stats.requests == 0
    assert verdicts(done.stdout) == {n: "blocked" if n in blocked else "allowed" for n in pool}


def test_sync_of_every_channel_prints_the_sizes(
    simulator: Simulator, cli_redis: redis.Redis
) -> None:
    simulator.block("sms", *make_numbers(120, seed=5))
    simulator.block("voice", *make_numbers(100, seed=6))
    done = blockfilter("sync", env=cli_env(simulator, cli_redis))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.decode().splitlines()
    assert [line.split(":")[0] for line in lines] == ["sms", "whatsapp", "voice"]
    assert "120 blocklisted numbers" in lines[0]
    assert "0 blocklisted numbers" in lines[1]
    # 100 entries and no size known: a full page, then a round of two empty ones.
    assert "100 blocklisted numbers, 3 requests" in lines[2]


def test_no_plain_number_in_redis_after_runs(
    simulator: Simulator, cli_redis: redis.Redis, tmp_path: Path
) -> None:
    pool = make_numbers(300, seed=7)
    simulator.block("sms", *pool[:40])
    simulator.block("voice", *pool[40:60])
    env = cli_env(simulator, cli_redis, BLOCKFILTER_RATE_LIMIT="50")
    assert blockfilter("sync", "--channel", "voice", env=env).returncode == 0
    done = blockfilter("filter", str(campaign_file(tmp_path / "c.jsonl", pool)), env=env)
    assert done.returncode == 0, done.stderr
    made = [key for key in cli_redis.scan_iter(count=10_000)]
    assert len(made) >= 300  # the statuses, the sync mark and the rate limit are all there
    texts = []
    for key in made:
        kind = cli_redis.type(key)
        if kind == b"string":
            texts.append(key + b"=" + (cli_redis.get(key) or b""))
        elif kind == b"list":
            texts.append(key + b"=" + b",".join(cli_redis.lrange(key, 0, -1)))
        else:
            texts.append(key)
    blob = b"\n".join(texts)
    for number in pool:
        # Neither the number nor its national digits, in any key or value.
        assert number[1:].encode() not in blob
        assert number[3:].encode() not in blob


# -- the strategy --------------------------------------------------------------------------


def test_auto_strategy_syncs_when_the_campaign_outgrows_the_list(
    simulator: Simulator, namespace: str
) -> None:
    pool = make_numbers(1500, seed=8)
    blocked = set(pool[:150])
    simulator.block("sms", *blocked)
    # A clean status is trusted for two seconds: after that the sync mark still tells the
    # list's size, but no longer answers for absent numbers.
    settings = settings_for(simulator, cache_ttl=2.0)
    source = redis_source(settings, namespace)
    assert source.sync("sms").size == 150
    time.sleep(2.05)

    # 1000 numbers: 10 lookups against a sync of 2 pages.
    campaign = pool[200:1200]
    assert source.estimate_requests({"sms": campaign}) == sync_pages(150) == 2
    simulator.reset_stats()
    assert run(source, campaign) == {n: "allowed" for n in campaign}
    stats = simulator.stats
    assert (stats.requests, stats.numbers_asked) == (2, 0)

    # 150 new numbers once the mark is stale again: 2 lookups against a sync of 2 pages: the
    # tie goes to lookups. The blocklisted numbers are still in the cache, fresh.
    time.sleep(2.05)
    small = pool[1300:1450]
    assert source.estimate_requests({"sms": small + pool[:150]}) == 2
    simulator.reset_stats()
    assert run(source, small + pool[:150]) == {
        n: "blocked" if n in blocked else "allowed" for n in small + pool[:150]
    }
    assert (simulator.stats.requests, simulator.stats.numbers_asked) == (2, 150)
    source.close()


def test_a_forced_sync_answers_a_cold_campaign(simulator: Simulator) -> None:
    pool = make_numbers(600, seed=9)
    blocked = set(pool[:120])
    simulator.block("voice", *blocked)
    settings = settings_for(simulator, cache_url="memory://")
    source = KaleyraSource(settings, strategy="sync")
    assert run(source, pool, channel="voice") == {
        n: "blocked" if n in blocked else "allowed" for n in pool
    }
    # No size known: pages in rounds of 1 and 2; the second round's last page is short.
    assert (simulator.stats.requests, simulator.stats.numbers_asked) == (3, 0)
    source.close()


def test_expired_entries_are_looked_up_again(simulator: Simulator, namespace: str) -> None:
    pool = make_numbers(250, seed=10)
    simulator.block("sms", *pool[:30])
    settings = settings_for(simulator, cache_ttl=1.0, cache_ttl_blocked=1.0)
    source = redis_source(settings, namespace)
    run(source, pool)
    assert simulator.stats.requests == 3
    run(source, pool)
    assert simulator.stats.requests == 3  # all fresh: answered by the cache
    time.sleep(1.1)
    assert source.estimate_requests({"sms": pool}) == 3
    run(source, pool)
    assert (simulator.stats.requests, simulator.stats.numbers_asked) == (6, 500)
    source.close()


def test_answers_that_expire_before_their_leases_give_the_leases_back(
    simulator: Simulator, namespace: str
) -> None:
    # With a TTL shorter than a lease, a number's answer is gone while its lease still runs:
    # a later lookup of it, here or in another worker, would wait the lease out for nothing.
    pool = make_numbers(150, seed=14)
    settings = settings_for(simulator, cache_ttl=1.0, cache_ttl_blocked=1.0)
    assert lease_seconds(settings) > settings.cache_ttl
    source = redis_source(settings, namespace)
    run(source, pool)
    source.flush_writes()
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=0)
    try:
        assert list(client.scan_iter(match=f"{namespace}bf:l:*", count=10_000)) == []
    finally:
        client.close()
        source.close()


def test_a_sync_mark_answers_only_for_the_clean_ttl(simulator: Simulator, namespace: str) -> None:
    pool = make_numbers(300, seed=11)
    simulator.block("sms", *pool[:10])
    settings = settings_for(simulator, cache_ttl=1.0, cache_ttl_blocked=60.0)
    source = redis_source(settings, namespace, strategy="lookup")
    source.sync("sms")
    simulator.reset_stats()
    assert run(source, pool)[pool[20]] == "allowed"
    assert simulator.stats.requests == 0
    # A number blocklisted since the sync is caught once the clean TTL is over.
    simulator.block("sms", pool[20])
    time.sleep(1.1)
    assert run(source, pool)[pool[20]] == "blocked"
    # The blocklisted entries of the sync are still fresh; only the 290 others are asked.
    assert (simulator.stats.requests, simulator.stats.numbers_asked) == (3, 290)
    source.close()


def test_estimate_is_exact_for_a_campaign_without_fallbacks(
    simulator: Simulator, namespace: str
) -> None:
    pool = make_numbers(2000, seed=12)
    simulator.block("sms", *pool[:300])
    simulator.block("whatsapp", *pool[:50])
    settings = settings_for(simulator)
    source = redis_source(settings, namespace)
    wanted = {"sms": pool[:1234], "whatsapp": pool[:345]}
    cases = [
        wanted,  # cold
        {"sms": pool[1000:1800], "whatsapp": pool[300:700]},  # partly warm
    ]
    for case in cases:
        expected = source.estimate_requests(case)
        before = simulator.stats.requests
        messages = [
            {"id": f"{channel}{i}", "channel": channel, "to": n}
            for channel, numbers in case.items()
            for i, n in enumerate(numbers)
        ]
        with Filter(settings, sources=[source]) as engine:
            list(engine.run(messages))
        assert simulator.stats.requests - before == expected
    assert [source.estimate_requests(case) for case in cases] == [0, 0]
    source.close()


# -- within one process ----------------------------------------------------------------------


def test_two_filters_in_one_process_ask_each_number_once(simulator: Simulator) -> None:
    pool = make_numbers(900, seed=13)
    blocked = set(pool[::9])
    simulator.block("sms", *blocked)
    simulator.set_latency(0.2)
    settings = settings_for(simulator, cache_url="memory://", concurrency=4)
    shared = KaleyraSource(settings)
    # A second source on the same cache, as a --max-requests run gets.
    budgeted = KaleyraSource(settings, cache=shared.cache, max_requests=1000)
    results: list[dict[str, str]] = []

    def worker(source: KaleyraSource, numbers: list[str]) -> None:
        results.append(run(source, numbers))

    threads = [
        threading.Thread(target=worker, args=(shared, pool)),
        threading.Thread(target=worker, args=(shared, pool[::-1])),
        threading.Thread(target=worker, args=(budgeted, pool[300:] + pool[:300])),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    expected = {n: "blocked" if n in blocked else "allowed" for n in pool}
    assert results == [expected] * 3
    assert simulator.stats.numbers_asked == len(pool)
    assert isinstance(shared.cache, MemoryCache)
    shared.close()
    budgeted.close()
