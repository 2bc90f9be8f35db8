"""Fail closed when the status cache loses data: nothing lost may ever read as "clean".

A number is ``allowed`` (or ``rerouted`` onto a channel) only if a source answered "not
blocklisted" for it on that channel within the TTL and that answer is still known whole. The
faults here are the ways a Redis cache loses data or answers without it, each on a private
``redis-server`` of the test's own (never the machine's shared one):

1. eviction (``allkeys-lru``, ``volatile-lru``) by another tenant of the server, after a sync;
   and ``blockfilter sync`` refusing a server that may evict at all;
2. a restart of the server in the middle of ``blockfilter sync``;
3. the server frozen (SIGSTOP) for a few seconds at a random moment of a campaign;
4. two workers sharing one server with different TTLs, one of them 0;
5. a worker whose clock runs an hour ahead or behind;
6. any interleaving of lookups, syncs, evictions, restarts, read failures and blocklist
   changes, against a model that knows the truth at every moment.

Every case asserts what a user would check: no blocklisted number comes out ``allowed``, or
``rerouted`` onto a channel where it is blocklisted; and every message gets exactly one
verdict, in input order. Looking a number up again or deferring it is always fine: that is
what failing closed costs. The truth is the simulator's blocklist, which the tests set.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, example, given, note, settings
from hypothesis import strategies as st

from blockfilter.config import Settings, load_settings
from blockfilter.engine.filter import Filter
from blockfilter.kaleyra.source import KaleyraSource
from blockfilter.store.cache import open_cache
from blockfilter.testing.simulator import Simulator
from tests.support.env import TEST_KEY, TEST_SID, subprocess_env
from tests.support.private_servers import PrivateRedis, Tenant, running_redis

VERDICTS = frozenset({"allowed", "rerouted", "blocked", "invalid", "deferred"})
LET_THROUGH = frozenset({"allowed", "rerouted"})
CHANNEL, FALLBACK = "sms", "whatsapp"
SYNCED = (CHANNEL, FALLBACK)
# Small enough that another tenant fills it in a moment, big enough for the synced lists.
MAXMEMORY = 8 * 1024 * 1024
EVICTING_POLICIES = (
    "allkeys-lru",
    "allkeys-lfu",
    "allkeys-random",
    "volatile-lru",
    "volatile-lfu",
    "volatile-random",
    "volatile-ttl",
)
HOUR = 3600.0

# Private servers and subprocesses, as in test_restarts: out of the pre-commit hook's run.
pytestmark = pytest.mark.slow


# -- the truth, and the two checks -------------------------------------------------------------


@dataclass
class Campaign:
    """Messages on ``sms``, a third of them with ``whatsapp`` as a fallback, and the
    blocklist the simulator holds for their numbers (what the checks call the truth)."""

    messages: list[dict[str, Any]]
    blocked: dict[str, set[str]] = field(default_factory=dict)

    @property
    def numbers(self) -> list[str]:
        return [m["to"] for m in self.messages]

    def blocked_messages(self) -> int:
        return sum(1 for m in self.messages if m["to"] in self.blocked.get(CHANNEL, ()))


def distinct_numbers(count: int, rng: random.Random) -> list[str]:
    found: dict[str, None] = {}
    while len(found) < count:
        found[f"+9196{rng.randrange(10**8):08d}"] = None
    return list(found)


def make_campaign(seed: int, size: int = 2000, blocked: int = 200) -> Campaign:
    """``size`` messages to distinct numbers, ``blocked`` of them blocklisted on sms; half of
    those are blocklisted on whatsapp too (so a fallback onto it would be a leak as well),
    and a few numbers are blocklisted on whatsapp only."""
    rng = random.Random(seed)
    pool = distinct_numbers(size, rng)
    on_sms = rng.sample(pool, blocked)
    listed = set(on_sms)
    clean = [n for n in pool if n not in listed]
    on_whatsapp = on_sms[: blocked // 2] + rng.sample(clean, blocked // 4)
    messages: list[dict[str, Any]] = []
    for i, number in enumerate(pool):
        message: dict[str, Any] = {"id": f"m{i}", "channel": CHANNEL, "to": number}
        if i % 3 == 0:
            message["fallback"] = [FALLBACK]
        messages.append(message)
    return Campaign(messages, {CHANNEL: set(on_sms), FALLBACK: set(on_whatsapp)})


def clean_part(campaign: Campaign) -> Campaign:
    """The campaign's messages whose number is on no blocklist, without fallbacks."""
    listed = set().union(*campaign.blocked.values())
    messages = [
        {"id": m["id"], "channel": m["channel"], "to": m["to"]}
        for m in campaign.messages
        if m["to"] not in listed
    ]
    return Campaign(messages, campaign.blocked)


def leaked(campaign: Campaign, results: Sequence[dict[str, Any]]) -> list[str]:
    """Ids of the messages let through onto a channel where their number is blocklisted
    (ids, not numbers: a failing test's report shows no phone number)."""
    out = []
    for result in results:
        if result.get("verdict") in LET_THROUGH:
            channel = str(result["channel"]).lower()
            if result["to"] in campaign.blocked.get(channel, ()):
                out.append(str(result["id"]))
    return out


def assert_one_verdict_each(campaign: Campaign, results: Sequence[dict[str, Any]]) -> None:
    assert [r.get("id") for r in results] == [m["id"] for m in campaign.messages], (
        "not exactly one result a message, in input order"
    )
    odd = [r["id"] for r in results if r.get("verdict") not in VERDICTS]
    assert not odd, f"results without a verdict: {odd[:10]}"


def assert_fail_closed(campaign: Campaign, results: Sequence[dict[str, Any]], when: str) -> None:
    assert_one_verdict_each(campaign, results)
    through = leaked(campaign, results)
    assert not through, (
        f"{when}: {len(through)} of {campaign.blocked_messages()} blocklisted messages let "
        f"through, e.g. {through[:8]}"
    )


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def simulator() -> Iterator[Simulator]:
    with Simulator(sid=TEST_SID, api_key=TEST_KEY) as sim:
        yield sim


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Callable[..., PrivateRedis]]:
    """Starts private ``redis-server``s (options as :class:`PrivateRedis` takes them);
    every one is stopped after the test."""
    with contextlib.ExitStack() as servers:
        made = 0

        def start(**options: Any) -> PrivateRedis:
            nonlocal made
            made += 1
            return servers.enter_context(running_redis(tmp_path / f"redis-{made}", **options))

        yield start


# -- blockfilter as a user runs it -------------------------------------------------------------


# The command-line runs here: no installed plugin, a retry budget a little longer than the
# support's default (FAST_RETRIES).
CLI_BUDGET = {
    "BLOCKFILTER_LOAD_PLUGINS": "",
    "BLOCKFILTER_BACKOFF_MAX": "0.05",
    "BLOCKFILTER_REQUEST_TIMEOUT": "2",
    "BLOCKFILTER_RETRY_DEADLINE": "4",
}


def cli_env(simulator: Simulator, cache: PrivateRedis, **extra: str) -> dict[str, str]:
    return subprocess_env(simulator, **{**CLI_BUDGET, "BLOCKFILTER_CACHE_URL": cache.url, **extra})


def blockfilter(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blockfilter", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def start_blockfilter(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "blockfilter", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def sync_args(*channels: str) -> list[str]:
    args = ["sync", "--json", "--quiet"]
    for channel in channels:
        args += ["--channel", channel]
    return args


def cli_filter(
    env: dict[str, str], campaign: Campaign, tmp_path: Path, name: str = "campaign"
) -> list[dict[str, Any]]:
    """``blockfilter filter`` over the campaign; its records. Exit 0 or 4 (some deferred)
    are both a finished run."""
    source = tmp_path / f"{name}.jsonl"
    out = tmp_path / f"{name}.out.jsonl"
    source.write_text("".join(json.dumps(m) + "\n" for m in campaign.messages), encoding="utf-8")
    done = blockfilter("filter", str(source), "--out", str(out), "--quiet", env=env)
    assert done.returncode in (0, 4), f"exit {done.returncode}: {done.stderr[-2000:]}"
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


# -- blockfilter in process, where the test needs a hand on the timing -------------------------


def settings_for(simulator: Simulator, cache: PrivateRedis, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "sid": TEST_SID,
        "api_key": TEST_KEY,
        "base_url": simulator.base_url,
        "cache_url": cache.url,
        "concurrency": 4,
        "retry_attempts": 2,
        "retry_deadline": 4.0,
        "backoff_base": 0.01,
        "backoff_max": 0.05,
        "request_timeout": 2.0,
        "connect_timeout": 1.0,
        "load_plugins": [],
    }
    values.update(overrides)
    return load_settings(environ={}, **values)


def close_source(source: KaleyraSource) -> None:
    source.close()
    source.client.close()
    source.cache.close()


@contextlib.contextmanager
def kaleyra_source(settings: Settings, **options: Any) -> Iterator[KaleyraSource]:
    source = KaleyraSource(settings, **options)
    try:
        yield source
    finally:
        close_source(source)


def filter_with(source: KaleyraSource, messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    with Filter(source.settings, sources=[source]) as engine:
        return list(engine.run(messages))


def filter_in_process(settings: Settings, campaign: Campaign) -> list[dict[str, Any]]:
    with kaleyra_source(settings) as source:
        return filter_with(source, campaign.messages)


def sync_with(source: KaleyraSource, channels: Sequence[str] = SYNCED) -> None:
    for channel in channels:
        source.sync(channel)


def sync_in_process(settings: Settings, channels: Sequence[str] = SYNCED) -> None:
    with kaleyra_source(settings, strategy="sync") as source:
        sync_with(source, channels)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


# -- 1. eviction after a sync ------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("policy", EVICTING_POLICIES)
def test_sync_refuses_a_server_that_may_evict(
    policy: str, simulator: Simulator, redis_server: Callable[..., PrivateRedis], tmp_path: Path
) -> None:
    campaign = make_campaign(seed=10, size=300, blocked=40)
    simulator.block_all(campaign.blocked)
    cache = redis_server(maxmemory=MAXMEMORY, maxmemory_policy=policy)
    env = cli_env(simulator, cache)

    done = blockfilter(*sync_args(*SYNCED), env=env)

    assert done.returncode == 2, f"exit {done.returncode}: {done.stderr[-2000:]}"
    said = done.stderr
    assert "maxmemory-policy" in said and "noeviction" in said and policy in said, said
    assert "Traceback" not in said, said
    # A configuration error, found before a single page is paid for.
    assert simulator.snapshot(records=False).requests == 0
    # Nothing was synced, so the campaign is looked up, and comes out right.
    assert_fail_closed(campaign, cli_filter(env, campaign, tmp_path), "after a refused sync")


def fill_up(cache: PrivateRedis) -> None:
    """Another tenant fills the server while it does not evict: big values, until the
    server refuses one (its memory is full)."""
    with Tenant(cache, value_bytes=256 * 1024, pace=0.0) as filler:
        wait_until(lambda: filler.refused > 0, timeout=60, what="the server to be full")


def evict_half(cache: PrivateRedis, tenant: Tenant, ours: int) -> None:
    """Let the tenant write small values (each one evicts a few keys) until the server has
    evicted half of the keys the sync left in database 0, or, for a design that keeps its
    data in a few keys, until it has written the server's memory over again."""
    wait_until(
        lambda: cache.keys_in(0) <= ours // 2 or tenant.written_bytes >= MAXMEMORY,
        timeout=120,
        what="the tenant to make the server evict",
    )


@pytest.mark.timeout(300)
@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-lru"])
def test_entries_evicted_after_a_sync_never_read_as_clean(
    policy: str, simulator: Simulator, redis_server: Callable[..., PrivateRedis], tmp_path: Path
) -> None:
    campaign = make_campaign(seed=1)
    simulator.block_all(campaign.blocked)
    cache = redis_server(maxmemory=MAXMEMORY, maxmemory_policy="noeviction")
    env = cli_env(simulator, cache)
    done = blockfilter(*sync_args(*SYNCED), env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    # Workers keep reading the synced lists a while later, for campaigns of numbers nobody
    # blocklisted: whatever those reads touch is hot, and the entries of the blocklisted
    # numbers nobody messaged since are what an LRU policy evicts first. (Redis counts idle
    # time in whole seconds: the pause makes the difference visible to it.)
    time.sleep(2.0)
    warm = clean_part(campaign)
    assert_fail_closed(warm, cli_filter(env, warm, tmp_path, name="warm"), "before eviction")
    ours = cache.keys_in(0)
    assert ours > 0

    # Another tenant fills the server; someone makes it evict; the tenant writes on until
    # half of what the sync left is gone. (Were it to go on, it would evict the rest, the
    # hot keys included, within milliseconds: every key of ours is older than every one of
    # its own.)
    fill_up(cache)
    cache.config_set("maxmemory-policy", policy)
    with Tenant(cache, value_bytes=2048, pace=0.002) as tenant:
        evict_half(cache, tenant, ours)
    results = cli_filter(env, campaign, tmp_path)
    assert int(cache.info("stats")["evicted_keys"]) > 0, "nothing was evicted: no fault"

    assert_fail_closed(campaign, results, f"{policy} eviction after a sync")


# -- 2. a restart in the middle of a sync ------------------------------------------------------


@pytest.mark.timeout(300)
def test_a_restart_in_the_middle_of_a_sync_leaves_no_number_clean(
    simulator: Simulator, redis_server: Callable[..., PrivateRedis], tmp_path: Path
) -> None:
    campaign = make_campaign(seed=2, size=2000, blocked=600)
    simulator.block_all(campaign.blocked)
    cache = redis_server()
    # Slow pages, two at a time: the sync of 600 + 450 entries takes seconds, so the restart
    # lands with pages already written and pages still to come.
    simulator.set_latency(0.4)
    env = cli_env(simulator, cache, BLOCKFILTER_CONCURRENCY="2")
    sync = start_blockfilter(*sync_args(*SYNCED), env=env)
    try:
        wait_until(
            lambda: simulator.snapshot(records=False).requests >= 3 or sync.poll() is not None,
            timeout=60,
            what="the sync's third page",
        )
        assert sync.poll() is None, "the sync ended before the restart"
        cache.restart()  # empty: no persistence
        pages_before = simulator.snapshot(records=False).requests
        _, err = sync.communicate(timeout=120)
    finally:
        if sync.poll() is None:
            sync.kill()
            sync.wait(timeout=10)
    assert simulator.snapshot(records=False).requests > pages_before, (
        f"the restart came after the last page: {err[-1000:]}"
    )
    simulator.set_latency(0.0)

    # However the sync ended, what it wrote before the restart is gone: a number on one of
    # those pages must not read as clean.
    assert_fail_closed(
        campaign, cli_filter(env, campaign, tmp_path), "a restart in the middle of a sync"
    )


# -- 3. a frozen server at a random moment of a campaign ---------------------------------------

FREEZE_TRIALS = 20


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("shortest", "longest"),
    # 2-4 s: longer than a Redis client's socket timeout (2 s today), though a client that
    # retries once (today's does) outwaits it. 4.5-6 s: longer than a read and its retry.
    [(2.0, 4.0), (4.5, 6.0)],
    ids=["2-4s", "4.5-6s"],
)
def test_a_cache_frozen_at_any_moment_of_a_campaign_never_reads_as_clean(
    shortest: float,
    longest: float,
    simulator: Simulator,
    redis_server: Callable[..., PrivateRedis],
) -> None:
    campaign = make_campaign(seed=3, size=3000, blocked=200)
    simulator.block_all(campaign.blocked)
    cache = redis_server()
    settings = settings_for(simulator, cache)

    # How long a campaign after a sync takes on this machine, fault-free: the moments of the
    # freezes are drawn from it. It must come out right too.
    sync_in_process(settings)
    spans = []
    for _ in range(3):  # the first is slower (imports, first connections): the shortest
        with kaleyra_source(settings) as source:
            started = time.monotonic()
            assert_fail_closed(campaign, filter_with(source, campaign.messages), "no fault")
            spans.append(time.monotonic() - started)
    span = min(spans)

    rng = random.Random(3)
    outcomes: list[str] = []
    failures = 0
    for trial in range(FREEZE_TRIALS):
        cache.flushall()
        sync_in_process(settings)
        delay, seconds = rng.uniform(0.0, span), rng.uniform(shortest, longest)
        with kaleyra_source(settings) as source:
            # The moment is counted from the start of the run itself.
            started = time.monotonic()
            freezer = cache.freeze_later(delay, seconds)
            try:
                results = filter_with(source, campaign.messages)
            finally:
                took = time.monotonic() - started
                freezer.join(timeout=30)
        assert_one_verdict_each(campaign, results)
        through = leaked(campaign, results)
        deferred = sum(1 for r in results if r["verdict"] == "deferred")
        outcomes.append(
            f"trial {trial}: a {seconds:.1f} s freeze at {delay:.3f} s of a run that took "
            f"{took:.3f} s: {len(through)} let through, {deferred} deferred"
        )
        failures += bool(through)
    assert failures == 0, (
        f"{failures} of {FREEZE_TRIALS} trials let blocklisted messages through "
        f"({campaign.blocked_messages()} blocklisted):\n" + "\n".join(outcomes)
    )


# -- 4. workers with different TTLs on one server ----------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("short", "past_short"),
    [
        ({"cache_ttl": 0.0, "cache_ttl_blocked": 0.0}, 0.5),
        ({"cache_ttl": 600.0, "cache_ttl_blocked": 0.0}, 0.5),
        ({"cache_ttl": 1.0, "cache_ttl_blocked": 1.0}, 1.5),
        ({"cache_ttl": 0.0, "cache_ttl_blocked": 1.0}, 1.5),
    ],
    ids=["ttl0-blocked0", "ttl600-blocked0", "ttl1-blocked1", "ttl0-blocked1"],
)
def test_a_worker_with_short_ttls_never_makes_another_read_a_synced_number_as_clean(
    short: dict[str, float],
    past_short: float,
    simulator: Simulator,
    redis_server: Callable[..., PrivateRedis],
) -> None:
    """``past_short``: seconds past the short worker's TTLs, so it trusts nothing of the
    sync and writes what it learns anew."""
    campaign = make_campaign(seed=4, size=1500, blocked=200)
    simulator.block_all(campaign.blocked)
    cache = redis_server()
    patient = settings_for(simulator, cache)  # the defaults: 600 s clean, 6 h blocklisted
    brief = settings_for(simulator, cache, **short)

    sync_in_process(patient)
    time.sleep(past_short)
    # The short-TTL worker looks the whole campaign up and writes what it learnt, with its
    # own TTLs, blocklisted numbers included.
    assert_fail_closed(campaign, filter_in_process(brief, campaign), "the short-TTL worker")
    time.sleep(past_short)
    # The other worker's sync is still fresh by its TTLs: its blocklisted numbers must still
    # be known as blocklisted.
    assert_fail_closed(
        campaign,
        filter_in_process(patient, campaign),
        f"the patient worker after one with {short}",
    )


@pytest.mark.timeout(300)
def test_two_cli_workers_with_different_ttls_at_once(
    simulator: Simulator, redis_server: Callable[..., PrivateRedis], tmp_path: Path
) -> None:
    """The same, as processes that run at the same time: one syncs and filters, the other
    (TTLs of 0) filters over and over meanwhile."""
    campaign = make_campaign(seed=5, size=1500, blocked=200)
    simulator.block_all(campaign.blocked)
    cache = redis_server()
    patient = cli_env(simulator, cache)
    brief = cli_env(simulator, cache, BLOCKFILTER_CACHE_TTL="0", BLOCKFILTER_CACHE_TTL_BLOCKED="0")
    done = blockfilter(*sync_args(*SYNCED), env=patient)
    assert done.returncode == 0, done.stderr[-2000:]
    source = tmp_path / "campaign.jsonl"
    source.write_text("".join(json.dumps(m) + "\n" for m in campaign.messages), encoding="utf-8")
    for round_ in range(3):
        meanwhile = start_blockfilter("filter", str(source), "--quiet", env=brief)
        try:
            results = cli_filter(patient, campaign, tmp_path, name=f"patient-{round_}")
            out, err = meanwhile.communicate(timeout=120)
        finally:
            if meanwhile.poll() is None:
                meanwhile.kill()
                meanwhile.wait(timeout=10)
        assert meanwhile.returncode in (0, 4), err[-2000:]
        brief_results = [json.loads(line) for line in out.splitlines()]
        assert_fail_closed(campaign, brief_results, f"the TTL-0 worker, round {round_}")
        assert_fail_closed(campaign, results, f"the patient worker, round {round_}")
    # Once the TTL-0 worker has written, the patient one reads again: still nothing through.
    assert_fail_closed(campaign, cli_filter(patient, campaign, tmp_path, name="last"), "after")


# -- 5. a skewed clock -------------------------------------------------------------------------

SKEWS = [(HOUR, 0.0), (0.0, -HOUR), (HOUR, -HOUR), (-HOUR, HOUR), (HOUR, HOUR), (-HOUR, -HOUR)]
SKEW_IDS = ["ahead-then-true", "true-then-behind", "ahead-then-behind", "behind-then-ahead"]
SKEW_IDS += ["ahead-alone", "behind-alone"]
# Short, so the tests can wait past it; the blocklisted statuses outlive it on purpose.
SKEW_TTL = 2.0


def skewed_clock(offset: float) -> Callable[[], float]:
    return lambda: time.time() + offset


@contextlib.contextmanager
def skewed_source(settings: Settings, offset: float, **options: Any) -> Iterator[KaleyraSource]:
    """A worker whose clock is ``offset`` seconds off, for the source and its cache alike."""
    clock = skewed_clock(offset)
    cache = open_cache(settings, clock=clock)
    source = KaleyraSource(settings, cache=cache, clock=clock, **options)
    try:
        yield source
    finally:
        close_source(source)


def block_late(simulator: Simulator, campaign: Campaign, count: int, seed: int) -> None:
    """Blocklist ``count`` more of the campaign's numbers on sms, now (the truth moves)."""
    rng = random.Random(seed)
    clean = [n for n in campaign.numbers if n not in campaign.blocked[CHANNEL]]
    late = rng.sample(clean, count)
    simulator.block(CHANNEL, *late)
    campaign.blocked[CHANNEL] |= set(late)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("syncer", "reader"), SKEWS, ids=SKEW_IDS)
def test_a_skewed_clock_never_stretches_a_synced_list(
    syncer: float,
    reader: float,
    simulator: Simulator,
    redis_server: Callable[..., PrivateRedis],
) -> None:
    campaign = make_campaign(seed=6, size=1000, blocked=100)
    simulator.block_all(campaign.blocked)
    cache = redis_server()
    settings = settings_for(simulator, cache, cache_ttl=SKEW_TTL, cache_ttl_blocked=60.0)
    with skewed_source(settings, syncer, strategy="sync") as source:
        sync_with(source)
    # Opted out after the sync: a list older than the clean TTL must not answer for them.
    block_late(simulator, campaign, 50, seed=6)
    time.sleep(SKEW_TTL + 0.5)
    with skewed_source(settings, reader) as source:
        results = filter_with(source, campaign.messages)
    assert_fail_closed(
        campaign, results, f"synced at {syncer:+.0f} s, read at {reader:+.0f} s of skew"
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("writer", "reader"), SKEWS, ids=SKEW_IDS)
def test_a_skewed_clock_never_stretches_cached_entries(
    writer: float,
    reader: float,
    simulator: Simulator,
    redis_server: Callable[..., PrivateRedis],
) -> None:
    campaign = make_campaign(seed=7, size=1000, blocked=100)
    simulator.block_all(campaign.blocked)
    cache = redis_server()
    settings = settings_for(simulator, cache, cache_ttl=SKEW_TTL, cache_ttl_blocked=60.0)
    with skewed_source(settings, writer, strategy="lookup") as source:
        assert_fail_closed(campaign, filter_with(source, campaign.messages), "the writer")
    block_late(simulator, campaign, 50, seed=7)
    time.sleep(SKEW_TTL + 0.5)
    with skewed_source(settings, reader, strategy="lookup") as source:
        results = filter_with(source, campaign.messages)
    assert_fail_closed(
        campaign, results, f"written at {writer:+.0f} s, read at {reader:+.0f} s of skew"
    )


# -- 6. any interleaving, against a model ------------------------------------------------------

MODEL_TTL = 3.0  # the clean TTL of the property test: a wait can outlast it
# How far "within the TTL" may stretch: Redis expires keys by the millisecond, rounded up,
# and a run's start and end are taken around the engine, not inside it.
MODEL_SLACK = 0.3
MODEL_POOL = 240
# A freeze that a client retrying once after a 2 s timeout (today's) outwaits, and one it
# does not.
MODEL_FREEZES = (2.5, 4.5)
MODEL_DOWN = 0.3  # seconds a server that died mid-run stays down before it is back, empty


@pytest.fixture
def model_cache(redis_server: Callable[..., PrivateRedis]) -> PrivateRedis:
    """One server for every example of the property test (hypothesis enters a test's
    fixtures once for all its examples); each example empties it first."""
    return redis_server()


class Model:
    """The blocklist at every moment of one example: for each (channel, number), the times
    its status changed. Nothing else: the model knows nothing of caches."""

    def __init__(self, blocked: dict[str, set[str]], numbers: Sequence[str]) -> None:
        self.numbers = list(numbers)
        self.history: dict[tuple[str, str], list[tuple[float, bool]]] = {
            (channel, n): [(-math.inf, n in blocked.get(channel, set()))]
            for channel in SYNCED
            for n in numbers
        }

    def change(self, channel: str, number: str, blocked: bool, at: float) -> None:
        self.history[(channel, number)].append((at, blocked))

    def clean_within(self, channel: str, number: str, since: float, until: float) -> bool:
        """Whether the number was clean on the channel at some moment of [since, until]."""
        changes = self.history[(channel, number)]
        for index, (start, blocked) in enumerate(changes):
            end = changes[index + 1][0] if index + 1 < len(changes) else math.inf
            if not blocked and start <= until and end >= since:
                return True
        return False


@dataclass(frozen=True)
class Op:
    """One step of an example. ``seed`` draws the numbers it touches; ``amount`` is a
    fraction (evict), a delay into the run (freeze, outage), a direction (block: 1 adds to
    the blocklist, 0 removes) or seconds (wait); ``seconds`` is a freeze's length."""

    kind: str
    seed: int = 0
    amount: float = 0.0
    seconds: float = 0.0

    def __repr__(self) -> str:
        return f"Op({self.kind!r}, {self.seed}, {self.amount}, {self.seconds})"


SEEDS = st.integers(0, 2**16)
DELAYS = st.floats(0.0, 0.05)  # a run takes some tens of milliseconds here
SYNC = st.builds(Op, st.just("sync"), st.integers(0, 2))  # both channels, sms, whatsapp
# What happens between two runs, in any order: syncs (twice as likely: they are what the
# faults break), losses of data, blocklist changes.
BETWEEN = st.one_of(
    SYNC,
    SYNC,
    st.builds(Op, st.just("evict"), SEEDS, st.sampled_from([0.1, 0.3, 0.6, 1.0])),
    st.builds(Op, st.just("restart")),
    st.builds(Op, st.just("block"), SEEDS, st.sampled_from([1.0, 0.0])),
)
FILTER = st.builds(Op, st.just("filter"), SEEDS)
# A run, undisturbed (twice as likely), or with the server frozen or dying in the middle.
RUN = st.one_of(
    FILTER,
    FILTER,
    st.builds(Op, st.just("freeze"), SEEDS, DELAYS, st.sampled_from(MODEL_FREEZES)),
    st.builds(Op, st.just("outage"), SEEDS, DELAYS),
)
# After a run, mostly no pause; sometimes a short one, or one past the clean TTL.
PAUSE = st.sampled_from([(), (), (Op("wait", amount=0.5),), (Op("wait", amount=MODEL_TTL + 0.5),)])
ROUND = st.tuples(st.lists(BETWEEN, max_size=3), RUN, PAUSE).map(
    lambda parts: [*parts[0], parts[1], *parts[2]]
)
# Rounds of operations, each ending in a run: every interleaving of the operations is
# reachable, and most examples have a run right after a fault, where it matters.
INTERLEAVINGS = st.lists(ROUND, min_size=1, max_size=4).map(
    lambda rounds: [op for one in rounds for op in one]
)


class Interleaving:
    """Runs one example's operations on a private server and a simulator, keeping the model
    in step, and checks every filter run against it. One long-lived source plays the worker,
    as in a Celery worker process; syncs run on a source of their own, as
    ``blockfilter sync`` does."""

    def __init__(self, simulator: Simulator, cache: PrivateRedis, rng: random.Random) -> None:
        self.simulator = simulator
        self.cache = cache
        self.settings = settings_for(simulator, cache, cache_ttl=MODEL_TTL, cache_ttl_blocked=60.0)
        pool = distinct_numbers(MODEL_POOL, rng)
        blocked = {CHANNEL: set(pool[::5]), FALLBACK: set(pool[::10]) | set(pool[1::9])}
        for channel in SYNCED:
            simulator.unblock(channel, *simulator.blocked(channel))
            simulator.block(channel, *blocked[channel])
        self.model = Model(blocked, pool)
        if not cache.running:
            cache.start()
        cache.flushall()
        self.source = KaleyraSource(self.settings)
        self.runs = 0

    def close(self) -> None:
        close_source(self.source)

    def apply(self, op: Op) -> None:
        getattr(self, f"do_{op.kind}")(op)

    def do_filter(self, op: Op, fault: Callable[[], Any] | None = None) -> None:
        """A campaign of some of the pool's numbers, half with a fallback; ``fault`` starts
        a thread that breaks the server during the run."""
        rng = random.Random(op.seed)
        numbers = rng.sample(self.model.numbers, rng.randrange(20, MODEL_POOL))
        messages = [
            {"id": f"r{self.runs}-{i}", "channel": CHANNEL, "to": n}
            | ({"fallback": [FALLBACK]} if i % 2 == 0 else {})
            for i, n in enumerate(numbers)
        ]
        self.runs += 1
        started = time.time()
        breaker = fault() if fault is not None else None
        try:
            results = filter_with(self.source, messages)
        finally:
            if breaker is not None:
                breaker.join(timeout=30)
        ended = time.time()
        assert_one_verdict_each(Campaign(messages), results)
        since = started - MODEL_TTL - MODEL_SLACK
        unproven = [
            f"{r['id']} ({r['verdict']} on {str(r['channel']).lower()})"
            for r in results
            if r["verdict"] in LET_THROUGH
            and not self.model.clean_within(str(r["channel"]).lower(), r["to"], since, ended)
        ]
        assert not unproven, (
            f"{len(unproven)} messages let through onto a channel where their number was "
            f"blocklisted for the whole TTL before the run: {unproven[:8]}"
        )

    def do_freeze(self, op: Op) -> None:
        self.do_filter(op, lambda: self.cache.freeze_later(op.amount, op.seconds))

    def do_outage(self, op: Op) -> None:
        self.do_filter(op, lambda: self.cache.restart_later(op.amount, MODEL_DOWN))

    def do_sync(self, op: Op) -> None:
        channels = [SYNCED, (CHANNEL,), (FALLBACK,)][op.seed]
        # A sync that fails (the server gone, say) is the sync's business; the model only
        # judges what the filter lets through afterwards.
        with contextlib.suppress(Exception), kaleyra_source(self.settings, strategy="sync") as s:
            sync_with(s, channels)

    def do_evict(self, op: Op) -> None:
        """What eviction and a restart without persistence do: some keys, or all, vanish."""
        rng = random.Random(op.seed)
        with contextlib.closing(self.cache.client()) as client:
            keys = sorted(client.scan_iter(count=1000))
            doomed = rng.sample(keys, math.ceil(len(keys) * op.amount)) if keys else []
            if doomed:
                client.delete(*doomed)
        note(f"evicted {len(doomed)} of {len(keys)} keys")

    def do_restart(self, op: Op) -> None:
        self.cache.restart()

    def do_block(self, op: Op) -> None:
        rng = random.Random(op.seed)
        channel = rng.choice(SYNCED)
        numbers = rng.sample(self.model.numbers, 10)
        blocked = op.amount == 1.0
        # The model changes first: for a moment it is stricter than the simulator, never
        # more lenient.
        at = time.time()
        for number in numbers:
            self.model.change(channel, number, blocked, at)
        if blocked:
            self.simulator.block(channel, *numbers)
        else:
            self.simulator.unblock(channel, *numbers)

    def do_wait(self, op: Op) -> None:
        time.sleep(op.amount)


@pytest.mark.timeout(900)
@settings(
    max_examples=20,
    deadline=None,
    derandomize=True,  # the same examples on every run: a failure is a failure of the code
    database=None,
    # No shrinking: each step costs real servers' time; the failing example is short anyway.
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=INTERLEAVINGS, seed=SEEDS)
# The faults of the issue, each as the shortest interleaving that shows it, and the TTL.
@example(ops=[Op("sync"), Op("evict", 1, 0.6), Op("filter", 1)], seed=1)
@example(ops=[Op("sync"), Op("outage", 2, 0.01), Op("filter", 2)], seed=2)
@example(
    ops=[Op("sync"), Op("block", 3, 1.0), Op("wait", amount=MODEL_TTL + 0.5), Op("filter", 3)],
    seed=3,
)
def test_no_interleaving_of_faults_lets_an_unproven_number_through(
    ops: list[Op], seed: int, simulator: Simulator, model_cache: PrivateRedis
) -> None:
    run = Interleaving(simulator, model_cache, random.Random(seed))
    try:
        for op in [*ops, Op("filter", seed)]:  # and a last look after everything
            note(repr(op))
            run.apply(op)
    finally:
        run.close()
