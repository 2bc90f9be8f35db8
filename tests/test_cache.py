"""The status cache, memory:// and a real Redis (127.0.0.1:6379), through one suite.

Redis tests share the server with other test runs: each cache gets a random key namespace and
only keys under it are removed afterwards (never FLUSHDB).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import multiprocessing
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from blockfilter.config import Settings
from blockfilter.errors import BlockfilterError, ConfigError
from blockfilter.kaleyra.cache_access import CacheAccess
from blockfilter.store.cache import (
    CachedStatus,
    CacheUnavailable,
    MemoryCache,
    RedisCache,
    StatusCache,
    SyncInfo,
    cache_secret,
    open_cache,
)
from blockfilter.store.redis import NumberHasher
from tests.fakes import FakeTime
from tests.support.env import REDIS_HOST, REDIS_PORT, redis_up

REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"
API_KEY = "test-key-0123456789"

A = "+919812345678"
B = "+919812345679"
C = "+919812345680"


needs_redis = pytest.mark.skipif(
    not redis_up(), reason=f"no Redis server at {REDIS_HOST}:{REDIS_PORT}"
)


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "api_key": API_KEY,
        "cache_url": REDIS_URL,
        "cache_ttl": 600.0,
        "cache_ttl_blocked": 3600.0,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def raw_redis() -> Iterator[redis.Redis]:
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=0)
    yield client
    client.close()


@pytest.fixture
def namespace() -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"bftest:{uuid.uuid4().hex}:"
    yield prefix
    if redis_up():
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=0)
        keys = list(set(client.scan_iter(match=f"{prefix}*", count=10_000)))
        for start in range(0, len(keys), 10_000):
            client.delete(*keys[start : start + 10_000])
        client.close()


class CacheFactory:
    """Makes caches of one kind, and says how time passes for them.

    ``memory://`` runs on a fake clock: :meth:`pass_time` moves it, without waiting. Redis
    measures ages by its own clock (``TIME``) and expires keys itself (``PX``), which no
    clock of ours can move: there, :meth:`pass_time` really waits (the TTLs are short).
    Redis caches made by one test share a namespace, so two of them see each other as two
    workers would.
    """

    def __init__(self, kind: str, namespace: str) -> None:
        self.kind = kind
        self.namespace = namespace
        self.made: list[StatusCache] = []
        self._fake = FakeTime(now=time.time())

    def __call__(self, **overrides: Any) -> StatusCache:
        settings = make_settings(**overrides)
        cache: StatusCache
        if self.kind == "memory":
            cache = MemoryCache(settings, clock=self._fake.clock)
        else:
            cache = RedisCache(settings, namespace=self.namespace)
        self.made.append(cache)
        return cache

    def now(self) -> float:
        """The caches' time now (epoch seconds): what an answer fetched now is stamped with."""
        return self._fake.clock() if self.kind == "memory" else time.time()

    def pass_time(self, seconds: float) -> None:
        if self.kind == "memory":
            self._fake.sleep(seconds)
        else:
            time.sleep(seconds)


@pytest.fixture(params=["memory", pytest.param("redis", marks=needs_redis)])
def make_cache(request: pytest.FixtureRequest, namespace: str) -> Iterator[CacheFactory]:
    """Makes caches of the parametrised kind (see :class:`CacheFactory`)."""
    factory = CacheFactory(request.param, namespace)
    yield factory
    for cache in factory.made:
        cache.close()


@pytest.fixture
def make_redis(namespace: str) -> Iterator[Callable[..., RedisCache]]:
    if not redis_up():
        pytest.skip(f"no Redis server at {REDIS_HOST}:{REDIS_PORT}")
    made: list[RedisCache] = []

    def factory(*, clock: Callable[[], float] | None = None, **overrides: Any) -> RedisCache:
        cache = RedisCache(make_settings(**overrides), namespace=namespace, clock=clock)
        made.append(cache)
        return cache

    yield factory
    for cache in made:
        cache.close()


# -- both backends ---------------------------------------------------------------------------


def test_round_trip_keeps_status_and_fetch_time(make_cache: CacheFactory) -> None:
    cache = make_cache()
    fetched_at = time.time() - 5.25
    cache.set_many("sms", blocked={A}, clean=[B], fetched_at=fetched_at)

    found = cache.get_many("sms", [C, B, A, B])

    assert found == {
        A: CachedStatus(blocked=True, fetched_at=fetched_at),
        B: CachedStatus(blocked=False, fetched_at=fetched_at),
    }
    # Channels are separate: blocklisted on SMS says nothing about WhatsApp.
    assert cache.get_many("whatsapp", [A, B]) == {}


def test_a_number_given_as_both_is_stored_blocked(make_cache: CacheFactory) -> None:
    cache = make_cache()
    cache.set_many("sms", blocked=[A], clean=[A, B], fetched_at=time.time())
    assert cache.get_many("sms", [A])[A].blocked is True


def test_newer_answer_replaces_older(make_cache: CacheFactory) -> None:
    cache = make_cache()
    cache.set_many("sms", blocked=[], clean=[A], fetched_at=time.time() - 10)
    now = time.time()
    cache.set_many("sms", blocked=[A], clean=[], fetched_at=now)
    assert cache.get_many("sms", [A]) == {A: CachedStatus(True, now)}


def test_ttl_is_counted_from_fetch_time_and_differs_by_kind(make_cache: CacheFactory) -> None:
    cache = make_cache(cache_ttl=600.0, cache_ttl_blocked=3600.0)
    # Fetched 1000 s ago: past the clean TTL, within the blocked one.
    cache.set_many("sms", blocked=[A], clean=[B], fetched_at=time.time() - 1000)
    assert set(cache.get_many("sms", [A, B])) == {A}
    # Fetched 4000 s ago: past both.
    cache.set_many("sms", blocked=[C], clean=[], fetched_at=time.time() - 4000)
    assert cache.get_many("sms", [C]) == {}


def test_entries_expire(make_cache: CacheFactory) -> None:
    cache = make_cache(cache_ttl=0.3, cache_ttl_blocked=1.0)
    cache.set_many("sms", blocked=[A], clean=[B], fetched_at=make_cache.now())
    assert set(cache.get_many("sms", [A, B])) == {A, B}
    make_cache.pass_time(0.4)
    assert set(cache.get_many("sms", [A, B])) == {A}


def test_ttl_zero_caches_nothing_of_that_kind(make_cache: CacheFactory) -> None:
    cache = make_cache(cache_ttl=0.0, cache_ttl_blocked=3600.0)
    cache.set_many("sms", blocked=[A], clean=[B], fetched_at=time.time())
    assert set(cache.get_many("sms", [A, B])) == {A}
    # A is now clean: with clean statuses not cached, the old "blocked" must not linger.
    cache.set_many("sms", blocked=[], clean=[A], fetched_at=time.time())
    assert cache.get_many("sms", [A]) == {}


def write_snapshot(cache: StatusCache, channel: str, numbers: list[str]) -> float:
    writer = cache.begin_snapshot(channel)
    writer.add(numbers)
    assert writer.commit(len(numbers)) is True
    return writer.synced_at


def test_snapshot_round_trip(make_cache: CacheFactory) -> None:
    cache = make_cache(cache_ttl_blocked=3600.0)
    assert cache.snapshot_info("sms") is None
    synced_at = write_snapshot(cache, "sms", [A, B])
    assert abs(synced_at - time.time()) < 5
    assert cache.snapshot_info("sms") == SyncInfo(synced_at=synced_at, size=2)
    # Listed numbers are blocked, every other one clean, as of the sync's start.
    assert cache.get_many("sms", [A, B, C]) == {
        A: CachedStatus(True, synced_at, "snapshot"),
        B: CachedStatus(True, synced_at, "snapshot"),
        C: CachedStatus(False, synced_at, "snapshot"),
    }
    assert cache.snapshot_info("voice") is None
    assert cache.get_many("voice", [A]) == {}
    cache.clear_snapshot("sms")
    assert cache.snapshot_info("sms") is None
    assert cache.get_many("sms", [A, C]) == {}


def test_an_empty_list_is_a_snapshot_too(make_cache: CacheFactory) -> None:
    cache = make_cache()
    synced_at = write_snapshot(cache, "sms", [])
    assert cache.snapshot_info("sms") == SyncInfo(synced_at, 0)
    assert cache.get_many("sms", [A]) == {A: CachedStatus(False, synced_at, "snapshot")}


def test_a_snapshot_answers_each_kind_for_its_ttl(make_cache: CacheFactory) -> None:
    cache = make_cache(cache_ttl=0.3, cache_ttl_blocked=0.8)
    write_snapshot(cache, "sms", [A])
    assert set(cache.get_many("sms", [A, B])) == {A, B}
    make_cache.pass_time(0.45)
    # Clean answers are trusted for the clean TTL only: B is unknown again, A still blocked.
    assert {n: s.blocked for n, s in cache.get_many("sms", [A, B]).items()} == {A: True}
    make_cache.pass_time(0.5)
    assert cache.get_many("sms", [A, B]) == {}


def test_a_newer_lookup_beats_the_snapshot_and_a_tie_is_blocked(make_cache: CacheFactory) -> None:
    cache = make_cache()
    synced_at = write_snapshot(cache, "sms", [A])
    # Looked up after the sync: A was unblocked since, B blocked since.
    later = synced_at + 0.5
    cache.set_many("sms", blocked=[B], clean=[A], fetched_at=later)
    found = cache.get_many("sms", [A, B])
    assert found == {A: CachedStatus(False, later), B: CachedStatus(True, later)}
    # Answers older than the snapshot lose to it.
    cache.set_many("sms", blocked=[], clean=[C], fetched_at=synced_at - 30)
    write_snapshot(cache, "sms", [C])
    assert cache.get_many("sms", [C])[C].blocked is True


def test_entry_writes_never_shorten_a_snapshot(make_cache: CacheFactory) -> None:
    # A worker that caches nothing of either kind (TTL 0) deletes entries as it writes; it
    # must not take the synced list's blocked numbers with them.
    cache = make_cache()
    forgetful = make_cache(cache_ttl=0.0, cache_ttl_blocked=0.0)
    write_snapshot(cache, "sms", [A, B])
    forgetful.set_many("sms", blocked=[A], clean=[B], fetched_at=time.time())
    assert {n: s.blocked for n, s in cache.get_many("sms", [A, B, C]).items()} == {
        A: True,
        B: True,
        C: False,
    }


def test_a_replaced_snapshot_answers_by_the_new_list(make_cache: CacheFactory) -> None:
    cache = make_cache()
    write_snapshot(cache, "sms", [A, B])
    write_snapshot(cache, "sms", [C])
    assert {n: s.blocked for n, s in cache.get_many("sms", [A, B, C]).items()} == {
        A: False,
        B: False,
        C: True,
    }


def test_an_aborted_snapshot_leaves_the_last_one(make_cache: CacheFactory) -> None:
    cache = make_cache()
    synced_at = write_snapshot(cache, "sms", [A])
    writer = cache.begin_snapshot("sms")
    writer.add([B])
    writer.abort()
    assert cache.snapshot_info("sms") == SyncInfo(synced_at, 1)
    assert {n: s.blocked for n, s in cache.get_many("sms", [A, B]).items()} == {A: True, B: False}


def test_hundred_thousand_entries_round_trip(make_cache: CacheFactory) -> None:
    # Many chunks of one call: every number comes back with its own status. (How fast is
    # measured by benchmarks/bench_scale.py, not here: a loaded machine would make it flaky.)
    cache = make_cache()
    numbers = [f"+9180{i:08d}" for i in range(100_000)]
    blocked = set(numbers[::10])
    clean = [n for n in numbers if n not in blocked]
    cache.set_many("sms", blocked=blocked, clean=clean, fetched_at=time.time())
    found = cache.get_many("sms", numbers)
    assert len(found) == 100_000
    assert {n for n, s in found.items() if s.blocked} == blocked


def test_leases_are_given_back(make_cache: CacheFactory) -> None:
    cache = make_cache()
    assert cache.acquire_leases("sms", [A, B], seconds=5) == {A, B}
    cache.release_leases("sms", [A, B])
    assert cache.acquire_leases("sms", [A, B], seconds=5) == {A, B}
    cache.release_leases("sms", [A, B])


# -- memory:// ---------------------------------------------------------------------------


def test_memory_cache_is_bounded_and_evicts_oldest() -> None:
    cache = open_cache(make_settings(cache_url="memory://?max_entries=3"))
    assert isinstance(cache, MemoryCache)
    now = time.time()
    cache.set_many("sms", blocked=[], clean=["+911000000001", "+911000000002"], fetched_at=now)
    cache.set_many("sms", blocked=[], clean=["+911000000003"], fetched_at=now)
    # Rewriting an entry makes it the newest.
    cache.set_many("sms", blocked=[], clean=["+911000000001"], fetched_at=now)
    cache.set_many("sms", blocked=[], clean=["+911000000004"], fetched_at=now)
    assert len(cache) == 3
    found = cache.get_many("sms", [f"+91100000000{i}" for i in range(1, 5)])
    assert set(found) == {"+911000000001", "+911000000003", "+911000000004"}


def test_memory_cache_evicting_entries_leaves_the_snapshot_whole() -> None:
    cache = MemoryCache(make_settings(cache_url="memory://"), max_entries=2)
    synced_at = write_snapshot(cache, "sms", [A, B])
    now = time.time()
    cache.set_many("sms", blocked=[], clean=["+911000000001", "+911000000002"], fetched_at=now)
    cache.set_many("sms", blocked=[], clean=["+911000000003"], fetched_at=now)
    assert len(cache) == 2
    assert cache.snapshot_info("sms") == SyncInfo(synced_at, 2)
    assert {n: s.blocked for n, s in cache.get_many("sms", [A, B]).items()} == {A: True, B: True}


def test_memory_cache_distrusts_answers_from_its_future() -> None:
    now = [1_000_000.0]
    cache = MemoryCache(make_settings(cache_url="memory://"), clock=lambda: now[0])
    cache.set_many("sms", blocked=[], clean=[A], fetched_at=now[0] + 0.5)
    cache.set_many("sms", blocked=[], clean=[B], fetched_at=now[0] + 30)
    # Half a second is jitter; thirty seconds is a clock that went back: B is not trusted.
    assert set(cache.get_many("sms", [A, B])) == {A}


def test_memory_snapshot_ages_by_the_injected_clock() -> None:
    now = [1_000_000.0]
    settings = make_settings(cache_url="memory://", cache_ttl=600.0, cache_ttl_blocked=3600.0)
    cache = MemoryCache(settings, clock=lambda: now[0])
    write_snapshot(cache, "sms", [A])
    now[0] += 599
    assert set(cache.get_many("sms", [A, B])) == {A, B}
    now[0] += 2
    assert set(cache.get_many("sms", [A, B])) == {A}
    now[0] += 3000
    assert cache.get_many("sms", [A, B]) == {}
    assert cache.snapshot_info("sms") is None


def test_memory_leases_are_always_granted() -> None:
    # In-process coalescing is the caller's job; the memory cache never makes anyone wait.
    cache = MemoryCache(make_settings(cache_url="memory://"))
    assert cache.acquire_leases("sms", [A], 5) == {A}
    assert cache.acquire_leases("sms", [A], 5) == {A}
    assert cache.wait_for("sms", [A], timeout=5) == {}


def test_open_cache_rejects_what_it_cannot_use() -> None:
    with pytest.raises(ConfigError, match="BLOCKFILTER_CACHE_URL"):
        open_cache(make_settings(cache_url="memcached://127.0.0.1"))
    with pytest.raises(ConfigError, match="max_entries"):
        open_cache(make_settings(cache_url="memory://?max_entries=lots"))
    with pytest.raises(ConfigError, match="max_entries"):
        open_cache(make_settings(cache_url="memory://?max_entries=0"))
    with pytest.raises(ConfigError, match="BLOCKFILTER_CACHE_URL"):
        open_cache(make_settings(cache_url="redis://:hunter2@127.0.0.1:port/0"))


def test_redis_needs_a_secret() -> None:
    with pytest.raises(ConfigError, match="BLOCKFILTER_CACHE_SECRET") as caught:
        open_cache(make_settings(api_key=None, cache_secret=None))
    assert "KALEYRA_API_KEY" in str(caught.value)
    assert isinstance(open_cache(make_settings(api_key=None, cache_secret="s3")), RedisCache)
    assert isinstance(
        open_cache(make_settings(cache_url="rediss://example.com:6380/1")), RedisCache
    )


# -- Redis -------------------------------------------------------------------------------

KEY_PATTERN = re.compile(r"bf:(s:sms:[0-9a-f]{32}|l:[0-9a-f]{32}|n:sms:[0-9a-f]{32})")


@needs_redis
def test_no_plain_number_in_redis(
    make_redis: Callable[..., RedisCache], raw_redis: redis.Redis, namespace: str
) -> None:
    cache = make_redis(cache_secret="a-secret-of-ours")
    numbers = [A, B, C]
    cache.set_many("sms", blocked=[A], clean=[B, C], fetched_at=time.time())
    cache.acquire_leases("sms", numbers, seconds=30)
    write_snapshot(cache, "sms", numbers)

    # A set: SCAN may return a key twice while the server rehashes.
    keys: set[bytes] = set(raw_redis.scan_iter(match=f"{namespace}*"))
    assert len(keys) == 7
    for key in keys:
        name = key.decode()[len(namespace) :]
        assert KEY_PATTERN.fullmatch(name), name
        value: Any
        if raw_redis.type(key) == b"hash":
            value = b"".join(k + v for k, v in raw_redis.hgetall(key).items())
        else:
            value = raw_redis.get(key)
        assert value is not None
        text = name + value.decode("latin-1")
        for number in numbers:
            assert number not in text and number[1:] not in text
            assert number[-8:] not in text
        assert "a-secret-of-ours" not in text


@needs_redis
def test_redis_ttl_is_set_on_the_key(
    make_redis: Callable[..., RedisCache], raw_redis: redis.Redis, namespace: str
) -> None:
    cache = make_redis(cache_ttl=600.0, cache_ttl_blocked=3600.0)
    fetched_at = time.time() - 500
    cache.set_many("sms", blocked=[A], clean=[B], fetched_at=fetched_at)
    ttls = {
        raw_redis.get(key)[:1]: raw_redis.pttl(key)  # type: ignore[index]
        for key in raw_redis.scan_iter(match=f"{namespace}bf:s:*")
    }
    # Counted from fetched_at: 500 s of each TTL are already spent, and the time the test
    # took since (a busy machine may take a second or more).
    spent_ms = (time.time() - fetched_at) * 1000 + 1
    assert 600_000 - spent_ms < ttls[b"0"] <= 100_000
    assert 3_600_000 - spent_ms < ttls[b"1"] <= 3_100_000


@needs_redis
def test_a_worker_with_shorter_ttls_does_not_trust_longer_entries(
    make_redis: Callable[..., RedisCache],
) -> None:
    writer = make_redis(cache_ttl=600.0)
    reader = make_redis(cache_ttl=60.0)
    writer.set_many("sms", blocked=[], clean=[A], fetched_at=time.time() - 120)
    assert set(writer.get_many("sms", [A])) == {A}
    assert reader.get_many("sms", [A]) == {}


@needs_redis
def test_workers_sharing_a_secret_share_entries_others_do_not(
    make_redis: Callable[..., RedisCache],
) -> None:
    first = make_redis(cache_secret="fleet-secret")
    same = make_redis(cache_secret="fleet-secret", api_key="another-key")
    other = make_redis(cache_secret=None)  # derived from the API key instead
    first.set_many("sms", blocked=[A], clean=[], fetched_at=time.time())
    assert set(same.get_many("sms", [A])) == {A}
    assert other.get_many("sms", [A]) == {}


@needs_redis
def test_leases_are_exclusive_between_workers(make_redis: Callable[..., RedisCache]) -> None:
    one, two = make_redis(), make_redis()
    assert one.acquire_leases("sms", [A, B], seconds=30) == {A, B}
    assert two.acquire_leases("sms", [B, C], seconds=30) == {C}
    # A worker cannot release what it does not hold.
    two.release_leases("sms", [A, B])
    assert two.acquire_leases("sms", [A], seconds=30) == set()
    one.release_leases("sms", [A, B])
    assert two.acquire_leases("sms", [A, B], seconds=30) == {A, B}
    # Leases are per channel.
    assert one.acquire_leases("voice", [A], seconds=30) == {A}


@needs_redis
def test_an_abandoned_lease_expires(make_redis: Callable[..., RedisCache]) -> None:
    one, two = make_redis(), make_redis()
    assert one.acquire_leases("sms", [A], seconds=0.2) == {A}
    assert two.acquire_leases("sms", [A], seconds=5) == set()
    time.sleep(0.3)
    assert two.acquire_leases("sms", [A], seconds=5) == {A}


def _race_for_leases(cache: RedisCache, numbers: list[str], start: Any, out: Any) -> None:
    start.wait(10)
    held = cache.acquire_leases("sms", numbers, seconds=30)
    out.put(sorted(held))


@needs_redis
def test_leases_are_exclusive_between_processes(make_redis: Callable[..., RedisCache]) -> None:
    cache = make_redis()
    # The parent has a live client before forking: each child must make its own.
    assert cache.get_many("sms", [A]) == {}
    numbers = [f"+9180{i:08d}" for i in range(300)]
    context = multiprocessing.get_context("fork")
    start, out = context.Barrier(4), context.Queue()
    workers = [
        context.Process(target=_race_for_leases, args=(cache, numbers, start, out))
        for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    results = [set(out.get(timeout=20)) for _ in workers]
    for worker in workers:
        worker.join(10)
        assert worker.exitcode == 0
    assert set().union(*results) == set(numbers)
    assert sum(len(held) for held in results) == len(numbers), "a number was leased twice"
    # The parent's own client still works after the children used theirs.
    assert cache.acquire_leases("sms", numbers[:1], seconds=1) == set()


@needs_redis
def test_wait_for_sees_another_workers_answer(make_redis: Callable[..., RedisCache]) -> None:
    looking, waiting = make_redis(), make_redis()
    assert looking.acquire_leases("sms", [A, B], seconds=30) == {A, B}
    fetched_at = time.time()

    def answer() -> None:
        time.sleep(0.2)
        looking.set_many("sms", blocked=[A], clean=[B], fetched_at=fetched_at)
        looking.release_leases("sms", [A, B])

    thread = threading.Thread(target=answer)
    thread.start()
    started = time.monotonic()
    found = waiting.wait_for("sms", [A, B], timeout=10)
    elapsed = time.monotonic() - started
    thread.join()
    assert found == {A: CachedStatus(True, fetched_at), B: CachedStatus(False, fetched_at)}
    assert 0.15 < elapsed < 2


@needs_redis
def test_wait_for_stops_when_the_lease_goes_without_an_answer(
    make_redis: Callable[..., RedisCache],
) -> None:
    looking, waiting = make_redis(), make_redis()
    looking.acquire_leases("sms", [A], seconds=30)
    timer = threading.Timer(0.2, looking.release_leases, args=("sms", [A]))
    timer.start()
    started = time.monotonic()
    assert waiting.wait_for("sms", [A], timeout=10) == {}
    assert time.monotonic() - started < 2
    timer.join()


@needs_redis
def test_wait_for_gives_up_at_the_timeout(make_redis: Callable[..., RedisCache]) -> None:
    looking, waiting = make_redis(), make_redis()
    looking.acquire_leases("sms", [A, B], seconds=30)
    looking.set_many("sms", blocked=[], clean=[B], fetched_at=time.time())
    started = time.monotonic()
    found = waiting.wait_for("sms", [A, B], timeout=0.3)
    elapsed = time.monotonic() - started
    assert set(found) == {B}
    assert 0.25 < elapsed < 1.5


@needs_redis
def test_a_snapshot_that_lost_pages_while_written_is_not_put_in_place(
    make_redis: Callable[..., RedisCache], raw_redis: redis.Redis, namespace: str
) -> None:
    cache = make_redis()
    synced_at = write_snapshot(cache, "sms", [C])
    writer = cache.begin_snapshot("sms")
    writer.add([A])
    # What a restart without persistence, or an eviction, does to the pages written so far.
    for key in raw_redis.scan_iter(match=f"{namespace}bf:w:*"):
        raw_redis.delete(key)
    writer.add([B])
    assert writer.commit(2) is False
    # The last whole list still answers; nothing of the half-written one does.
    assert cache.snapshot_info("sms") == SyncInfo(synced_at, 1)
    assert {n: s.blocked for n, s in cache.get_many("sms", [A, B, C]).items()} == {
        A: False,
        B: False,
        C: True,
    }
    assert list(raw_redis.scan_iter(match=f"{namespace}bf:w:*")) == []


@needs_redis
def test_a_snapshot_missing_a_member_answers_nothing(
    make_redis: Callable[..., RedisCache], raw_redis: redis.Redis, namespace: str
) -> None:
    cache = make_redis()
    write_snapshot(cache, "sms", [A, B])
    (key,) = raw_redis.scan_iter(match=f"{namespace}bf:n:*")
    member = next(field for field in raw_redis.hkeys(key) if field != b"#")
    raw_redis.hdel(key, member)
    assert cache.snapshot_info("sms") is None
    assert cache.get_many("sms", [A, B, C]) == {}


@needs_redis
def test_snapshot_and_entries_age_by_the_servers_clock_not_the_workers(
    make_redis: Callable[..., RedisCache],
) -> None:
    ahead = make_redis(cache_ttl=0.5, cache_ttl_blocked=0.5, clock=lambda: time.time() + 3600)
    behind = make_redis(cache_ttl=0.5, cache_ttl_blocked=0.5, clock=lambda: time.time() - 3600)
    write_snapshot(ahead, "sms", [A])
    # Each worker stamps its answers by its own clock; only how old they were counts.
    ahead.set_many("sms", blocked=[], clean=[B], fetched_at=ahead.clock())
    behind.set_many("sms", blocked=[], clean=[C], fetched_at=behind.clock())
    for reader in (ahead, behind):
        assert set(reader.get_many("sms", [A, B, C, "+919812345681"])) == {
            A,
            B,
            C,
            "+919812345681",
        }
    time.sleep(0.7)
    for reader in (ahead, behind):
        assert reader.get_many("sms", [A, B, C, "+919812345681"]) == {}


@needs_redis
def test_entries_of_an_older_version_are_not_trusted(
    make_redis: Callable[..., RedisCache], raw_redis: redis.Redis, namespace: str
) -> None:
    cache = make_redis()
    cache.set_many("sms", blocked=[], clean=[A], fetched_at=time.time())
    (key,) = raw_redis.scan_iter(match=f"{namespace}bf:s:*")
    raw_redis.set(key, f"0:{time.time()!r}".encode(), px=60_000)  # no server stamp
    assert cache.get_many("sms", [A]) == {}


@needs_redis
def test_eviction_policy_is_read_from_the_server(
    make_redis: Callable[..., RedisCache], raw_redis: redis.Redis
) -> None:
    policy = raw_redis.config_get("maxmemory-policy")["maxmemory-policy"]
    assert make_redis().eviction_policy() == policy


# -- Redis away ------------------------------------------------------------------------------


def _every_call(cache: StatusCache) -> list[Callable[[], object]]:
    return [
        lambda: cache.get_many("sms", [A]),
        lambda: cache.set_many("sms", blocked=[A], clean=[B], fetched_at=time.time()),
        lambda: cache.acquire_leases("sms", [A], 5),
        lambda: cache.release_leases("sms", [A]),
        lambda: cache.wait_for("sms", [A], 1),
        lambda: cache.begin_snapshot("sms"),
        lambda: cache.snapshot_info("sms"),
        lambda: cache.clear_snapshot("sms"),
        lambda: cache.eviction_policy(),
    ]


def test_unreachable_redis_raises_cache_unavailable() -> None:
    cache = open_cache(make_settings(cache_url="redis://:hunter2@127.0.0.1:1/0"))
    started = time.monotonic()
    for call in _every_call(cache):
        with pytest.raises(CacheUnavailable) as caught:
            call()
        message = str(caught.value)
        assert isinstance(caught.value, BlockfilterError)
        assert "127.0.0.1:1" in message
        for secret in ("hunter2", API_KEY, A, A[1:]):
            assert secret not in message
    assert time.monotonic() - started < 5
    assert "hunter2" not in repr(cache)
    cache.close()


class TcpRelay:
    """A TCP relay to Redis that can be cut, as a server going away mid-run would be."""

    def __init__(self, port: int) -> None:
        self._upstream = port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._upstream))
            with self._lock:
                self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass

    def cut(self) -> None:
        # shutdown() first: on Linux, close() alone leaves a thread blocked in accept()
        # listening on.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


@needs_redis
def test_redis_going_away_mid_run_raises_cache_unavailable(namespace: str) -> None:
    relay = TcpRelay(REDIS_PORT)
    cache = RedisCache(
        make_settings(cache_url=f"redis://127.0.0.1:{relay.port}/0"), namespace=namespace
    )
    cache.set_many("sms", blocked=[A], clean=[], fetched_at=time.time())
    assert set(cache.get_many("sms", [A])) == {A}
    relay.cut()
    started = time.monotonic()
    for call in _every_call(cache):
        with pytest.raises(CacheUnavailable, match="unavailable"):
            call()
    assert time.monotonic() - started < 5
    cache.close()


# -- reading ahead (one round trip for a whole batch) ----------------------------------------


def test_the_number_hasher_is_hmac_sha256_digit_for_digit() -> None:
    # The keys every worker of a fleet agrees on: a worker of this version must find what
    # one of the last version wrote, and the other way round.
    for secret in (b"k", b"x" * 64, b"y" * 65, bytes(range(200)), cache_secret(make_settings())):
        assert secret is not None
        hasher = NumberHasher(secret)
        for channel, number in (("sms", A), ("whatsapp", B), ("voice", ""), ("sms", "#snapshot")):
            message = f"{channel}:{number}".encode()
            expected = hmac.new(secret, message, hashlib.sha256).hexdigest()[:32]
            assert hasher.hash(channel, number) == expected


class RoundTrips:
    """Counts what redis-py sends: one call a round trip (a pipeline is sent at once)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        send = redis.connection.Connection.send_packed_command

        def counting(connection: Any, command: Any, check_health: bool = True) -> None:
            self.count += 1
            send(connection, command, check_health)

        monkeypatch.setattr(redis.connection.Connection, "send_packed_command", counting)


def test_a_read_ahead_reads_every_channel_at_once_and_says_how_long_each_status_holds(
    make_redis: Callable[..., RedisCache], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = make_redis(cache_ttl=600.0, cache_ttl_blocked=3600.0)
    cache.chunk_size = 2
    fetched = time.time() - 100
    cache.set_many("sms", blocked=[B], clean=[A], fetched_at=fetched)
    writer = cache.begin_snapshot("whatsapp")
    writer.add([B])
    assert writer.commit(listed=1)
    cache.get_many("sms", [A])  # the script loaded, as after any earlier read
    trips = RoundTrips(monkeypatch)
    reads = cache.read_ahead({"sms": [A, B, C], "whatsapp": [A, B], "voice": []})
    assert trips.count == 1  # three channels, two chunks of sms: one round trip
    sms, whatsapp, voice = reads["sms"], reads["whatsapp"], reads["voice"]
    assert sms.found == {A: CachedStatus(False, fetched), B: CachedStatus(True, fetched)}
    assert 490 < sms.trust[sms.found[A]] <= 500
    assert 3490 < sms.trust[sms.found[B]] <= 3500
    assert sms.snapshot is None and voice.found == {} and voice.snapshot is None
    assert whatsapp.snapshot is not None and whatsapp.snapshot.size == 1
    assert whatsapp.found[A].origin == "snapshot" and not whatsapp.found[A].blocked
    assert whatsapp.found[B].blocked
    assert 590 < whatsapp.trust[whatsapp.found[A]] <= 600
    # What get_many says of the same numbers is what the read-ahead found.
    assert cache.get_many("sms", [A, B, C]) == sms.found


def test_a_read_ahead_loads_its_script_again_when_redis_lost_it(
    make_redis: Callable[..., RedisCache], raw_redis: redis.Redis
) -> None:
    cache = make_redis()
    cache.set_many("sms", blocked=[], clean=[A], fetched_at=time.time())
    cache.get_many("sms", [A])
    raw_redis.script_flush()
    assert set(cache.read_ahead({"sms": [A, B]})["sms"].found) == {A}


def test_a_read_ahead_of_an_unreachable_redis_raises_cache_unavailable() -> None:
    cache = open_cache(make_settings(cache_url="redis://127.0.0.1:1/0"))
    assert isinstance(cache, RedisCache)
    with pytest.raises(CacheUnavailable):
        cache.read_ahead({"sms": [A]})


def _access(cache: StatusCache, monotonic: FakeTime) -> CacheAccess:
    return CacheAccess(cache, clock=time.time, monotonic=monotonic.clock)


def test_answers_read_ahead_are_trusted_only_as_long_as_the_read_proved_them(
    make_redis: Callable[..., RedisCache], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = make_redis(cache_ttl=600.0)
    cache.set_many("sms", blocked=[], clean=[A, B], fetched_at=time.time() - 100)
    monotonic = FakeTime(now=50.0)
    access = _access(cache, monotonic)
    with access.reading_ahead({"sms": [A, B, C]}):
        trips = RoundTrips(monkeypatch)
        hits, misses = access.answers("sms", [A, B, C])
        assert trips.count == 0  # read ahead: no round trip
        assert {n for outcome in hits for n in outcome.numbers} == {A, B} and misses == [C]
        # Redis loses B: a status read a moment ago is still an answer of its time...
        cache.set_many("sms", blocked=[], clean=[B], fetched_at=time.time() - 10_000)
        assert access.answers("sms", [B])[1] == []
        # ...but not past the TTL it had left then: it is read again, and is gone.
        monotonic.sleep(500.5)
        before = trips.count
        hits, misses = access.answers("sms", [A, B])
        assert trips.count == before + 1
        assert {n for outcome in hits for n in outcome.numbers} == {A} and misses == [B]
    # Out of the block nothing is read ahead.
    assert access.answers("sms", [B])[1] == [B]


def test_a_failed_read_ahead_answers_nothing() -> None:
    cache = open_cache(make_settings(cache_url="redis://127.0.0.1:1/0"))
    access = _access(cache, FakeTime())
    with access.reading_ahead({"sms": [A]}):
        # Nothing read ahead, nothing invented: A is a miss, which the caller looks up.
        assert access.answers("sms", [A]) == ([], [A])


def test_what_a_read_ahead_missed_is_read_again_once_its_channel_is_synced(
    make_redis: Callable[..., RedisCache],
) -> None:
    cache = make_redis()
    access = _access(cache, FakeTime())
    with access.reading_ahead({"sms": [A]}):
        cache.set_many("sms", blocked=[], clean=[A], fetched_at=time.time())
        assert access.answers("sms", [A]) == ([], [A])  # read a moment ago, not there
        # A sync that ends here (it put the channel's whole list in the cache) is what the
        # filter then reads instead of asking the API.
        access.synced("sms")
        hits, misses = access.answers("sms", [A])
        assert [n for outcome in hits for n in outcome.numbers] == [A] and misses == []
