"""The status cache: what the API said about a (channel, number), and when.

Every API request costs money and time, and a campaign asks about the same numbers again and
again, so statuses are kept for a while behind one interface, :class:`StatusCache`:

* ``memory://`` (:class:`MemoryCache`): per process, thread-safe, bounded
  (``memory://?max_entries=N``, default 1,000,000; the oldest entries go first).
* ``redis://host:port/db``, ``rediss://...``, ``unix://...`` (:class:`RedisCache`, in
  :mod:`blockfilter.store.redis`, with its Lua scripts; importable from here too): shared by
  every worker of a fleet. Keys and values hold no phone number: a number is only ever stored
  as a keyed hash (HMAC-SHA256 with ``BLOCKFILTER_CACHE_SECRET``, or a key derived from
  ``KALEYRA_API_KEY``).

It holds two kinds of answers:

* **Entries**, one a (channel, number): what a lookup said. How long an entry is trusted is
  counted from the moment the API answered: ``BLOCKFILTER_CACHE_TTL`` seconds for a clean
  number (short: an opt-out must take effect soon), ``BLOCKFILTER_CACHE_TTL_BLOCKED`` for a
  blocklisted one. A TTL of 0 means "do not cache that kind". Freshness is checked again on
  every read with the reader's own TTLs, so a worker configured with shorter TTLs never trusts
  an entry longer than it was told to. An entry losing itself (evicted, expired, a restart)
  only costs a lookup.
* **Snapshots**, one a channel: the channel's whole blocklist as a full-list sync read it
  (:mod:`blockfilter.kaleyra.sync`). A snapshot is the only thing that can answer "clean" for
  a number nobody looked up, so it is kept whole or not at all: it is one object (one Redis
  key, a hash of keyed number hashes that holds its own member count and sync time), written
  aside and put in place only once every page is in it and the count proves it. Evicted,
  expired or lost in a restart, it vanishes whole, and its numbers are looked up again. No
  entry write can shorten or delete it.

**The invariant**: :meth:`StatusCache.get_many` answers a number only from an entry or a
snapshot that is still there, whole, within the reader's TTL for its kind, as proven by the
same read; everything else is absent, which the caller turns into a lookup. A failed read raises
:class:`CacheUnavailable`: nothing read before it is reused to fill the gap.

Ages in Redis are measured by Redis' own clock (``TIME``), never a worker's: entries carry the
server time at which they were written (less how old the answer already was), snapshots the
server time at which their sync started. A time in the future beyond :data:`CLOCK_TOLERANCE_S`
(a clock that went back) makes the answer untrusted.

Leases coalesce lookups across processes: before asking the API, a worker takes a short lease
on each number (``SET NX PX``); numbers whose lease another worker holds are waited for
(:meth:`StatusCache.wait_for`) instead of being asked twice.

A Redis server that goes away turns every call into :class:`CacheUnavailable`, so the caller
can go on without the cache (it costs requests, never correctness).
"""

from __future__ import annotations

import hmac
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable
from urllib.parse import parse_qs, urlsplit

from ..config import Settings
from ..errors import CacheUnavailable, ConfigError  # noqa: F401  (raised by the caches)

if TYPE_CHECKING:
    # Where it is defined; importable from here too, as it was (see __getattr__ below).
    from .redis import RedisCache as RedisCache

DEFAULT_MAX_ENTRIES = 1_000_000
# Numbers per Redis round trip (and per hold of the memory cache's lock): a 10k-key read is a
# few hundred kB each way, which amortises the round trip without making one reply huge. A
# million numbers take 100 round trips.
REDIS_CHUNK = 10_000
#: Seconds an answer's time may lie in the reader's future before the answer is distrusted: a
#: clock that went back must not stretch a TTL, and a little jitter must not cost lookups.
CLOCK_TOLERANCE_S = 1.0

_SECRET_DERIVATION_LABEL = b"blockfilter-cache-v1"

T = TypeVar("T")

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class CachedStatus:
    """A status the API gave: blocklisted or clean, when (epoch seconds), and how the cache
    knows it: ``cache`` (an entry, from a lookup) or ``snapshot`` (a synced whole list)."""

    blocked: bool
    fetched_at: float
    origin: str = "cache"


@dataclass(frozen=True, slots=True)
class SyncInfo:
    """A channel's whole blocklist, synced at ``synced_at`` (epoch seconds, by the cache's
    clock), listing ``size`` entries."""

    synced_at: float
    size: int


class SnapshotWriter(Protocol):
    """A snapshot being written: pages go in with :meth:`add`; :meth:`commit` puts it in place
    only if everything added is still there."""

    #: When the sync started, by the cache's clock: the snapshot vouches for the list as of then.
    synced_at: float

    def add(self, numbers: Collection[str]) -> None:
        """Add blocklisted numbers (E.164). Raises :class:`CacheUnavailable`."""
        ...

    def commit(self, listed: int) -> bool:
        """Put the snapshot in place of the channel's last one, for the writer's longest TTL.
        ``listed``: how many entries the API listed (the next sync's cost is planned on it).
        Returns ``False``, and puts nothing in place, when what was written is no longer whole
        (lost in a restart, evicted). Raises :class:`CacheUnavailable`."""
        ...

    def abort(self) -> None:
        """Throw the unfinished snapshot away (best effort: it expires on its own anyway)."""
        ...


@runtime_checkable
class StatusCache(Protocol):
    """What the filter needs from a status cache; :func:`open_cache` picks the backend."""

    def get_many(self, channel: str, numbers: Sequence[str]) -> dict[str, CachedStatus]:
        """What the cache can prove about ``numbers``: fresh entries and, for every number,
        the channel's snapshot if it is whole and young enough for the number's kind. Where
        both answer, the newer wins (blocked on a tie). Unknown numbers are absent."""
        ...

    def set_many(
        self, channel: str, blocked: Collection[str], clean: Collection[str], fetched_at: float
    ) -> None:
        """Store what the API said at ``fetched_at`` (by the caller's clock). A number in both
        collections is stored as blocked. A number whose status cannot be stored (its kind's TTL
        is 0, or it is already older than the TTL) loses any entry it had, so the cache never
        contradicts the newest answer. Snapshots are never touched."""
        ...

    def acquire_leases(self, channel: str, numbers: Sequence[str], seconds: float) -> set[str]:
        """Try to become the one process that looks these numbers up, for ``seconds``.
        Returns the numbers whose lease the caller now holds; someone else is looking up the
        others right now (wait for them with :meth:`wait_for`)."""
        ...

    def release_leases(self, channel: str, numbers: Sequence[str]) -> None:
        """Give back the caller's own leases (others' are left alone)."""
        ...

    def wait_for(
        self, channel: str, numbers: Sequence[str], timeout: float
    ) -> dict[str, CachedStatus]:
        """Poll until every number has an entry or nobody holds its lease any more, or until
        ``timeout`` seconds; return the entries that appeared."""
        ...

    def begin_snapshot(self, channel: str) -> SnapshotWriter:
        """Start writing the channel's snapshot (a full-list sync)."""
        ...

    def snapshot_info(self, channel: str) -> SyncInfo | None:
        """The channel's snapshot, if one is in place and whole (whatever its age)."""
        ...

    def clear_snapshot(self, channel: str) -> None:
        """Forget the channel's snapshot (its numbers are unknown again)."""
        ...

    def eviction_policy(self) -> str | None:
        """The server's ``maxmemory-policy``, or ``None`` where nothing is evicted behind the
        cache's back (``memory://`` evicts only entries, and only by its own rule)."""
        ...

    def close(self) -> None:
        """Release connections; the cache may be used again afterwards (it reconnects)."""
        ...


# -- shared rules --------------------------------------------------------------------------


def ttl_for(settings: Settings, blocked: bool) -> float:
    return settings.cache_ttl_blocked if blocked else settings.cache_ttl


def seconds_left(ttl: float, fetched_at: float, now: float) -> float:
    """Seconds an answer given at ``fetched_at`` may still be trusted (<= 0: not at all).
    An answer from the future (a clock that went back, or skew between hosts) is trusted not
    at all past :data:`CLOCK_TOLERANCE_S`, and never for more than ``ttl``."""
    if ttl <= 0 or fetched_at - now > CLOCK_TOLERANCE_S:
        return 0.0
    return min(ttl, ttl - (now - fetched_at))


def is_fresh(settings: Settings, status: CachedStatus, now: float) -> bool:
    return seconds_left(ttl_for(settings, status.blocked), status.fetched_at, now) > 0


def snapshot_status(
    settings: Settings, synced_at: float, listed: bool, now: float
) -> CachedStatus | None:
    """What a whole snapshot says of one number: listed means blocked, absent means clean,
    each for its kind's TTL counted from the sync's start."""
    status = CachedStatus(listed, synced_at, "snapshot")
    return status if is_fresh(settings, status, now) else None


def newest(entry: CachedStatus | None, snapshot: CachedStatus | None) -> CachedStatus | None:
    # Both are answers of the API; the later one is the truth. A tie goes to blocked.
    if entry is None or snapshot is None:
        return entry or snapshot
    if entry.fetched_at != snapshot.fetched_at:
        return entry if entry.fetched_at > snapshot.fetched_at else snapshot
    return entry if entry.blocked else snapshot


def unique(numbers: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(numbers))


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def by_kind(blocked: Collection[str], clean: Collection[str]) -> Iterator[tuple[bool, str]]:
    # Clean first, blocked last: the later write wins, so a number in both ends up blocked,
    # the safe side.
    for number in clean:
        yield False, number
    for number in blocked:
        yield True, number


def cache_secret(settings: Settings) -> bytes | None:
    """The key numbers are hashed with: ``BLOCKFILTER_CACHE_SECRET``, else one derived from
    ``KALEYRA_API_KEY`` (so every worker of one account agrees without extra setup), else
    ``None``."""
    if settings.cache_secret:
        return settings.cache_secret.encode()
    if settings.api_key:
        return hmac.digest(settings.api_key.encode(), _SECRET_DERIVATION_LABEL, "sha256")
    return None


# -- memory:// -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _MemorySnapshot:
    numbers: frozenset[str]
    synced_at: float
    size: int
    expires_at: float


class _MemorySnapshotWriter:
    def __init__(self, cache: MemoryCache, channel: str) -> None:
        self._cache = cache
        self._channel = channel
        self._numbers: set[str] = set()
        self.synced_at = cache.clock()

    def add(self, numbers: Collection[str]) -> None:
        with self._cache._lock:
            self._numbers.update(numbers)

    def commit(self, listed: int) -> bool:
        cache = self._cache
        settings = cache.settings
        life = max(settings.cache_ttl, settings.cache_ttl_blocked)
        snapshot = _MemorySnapshot(
            frozenset(self._numbers), self.synced_at, int(listed), self.synced_at + life
        )
        with cache._lock:
            cache._snapshots[self._channel] = snapshot
        return True

    def abort(self) -> None:
        self._numbers.clear()


class MemoryCache:
    """An in-process cache, shared by the threads of one process.

    Bounded: past ``max_entries`` the oldest-written entries are evicted (snapshots are not
    entries: each is kept whole until it expires or is replaced). Expired entries are purged
    when read. Leases are not needed across processes here, so every lease is granted (the
    caller coalesces lookups within the process itself).

    :param clock: epoch seconds now; ``time.time`` unless a test injects another.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Clock | None = None,
    ) -> None:
        if max_entries < 1:
            raise ConfigError(f"memory cache max_entries must be >= 1, got {max_entries}")
        self.settings = settings
        self.max_entries = max_entries
        self.clock: Clock = clock or time.time
        # Keyed by (channel, number) in write order, so the oldest entry is the first one.
        self._entries: OrderedDict[tuple[str, str], CachedStatus] = OrderedDict()
        self._snapshots: dict[str, _MemorySnapshot] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def _snapshot(self, channel: str, now: float) -> _MemorySnapshot | None:
        snapshot = self._snapshots.get(channel)
        if snapshot is not None and now >= snapshot.expires_at:
            del self._snapshots[channel]
            return None
        return snapshot

    def get_many(self, channel: str, numbers: Sequence[str]) -> dict[str, CachedStatus]:
        found: dict[str, CachedStatus] = {}
        now = self.clock()
        settings = self.settings
        entries = self._entries
        with self._lock:
            snapshot = self._snapshot(channel, now)
        listed_status = absent_status = None
        if snapshot is not None:
            listed_status = snapshot_status(settings, snapshot.synced_at, True, now)
            absent_status = snapshot_status(settings, snapshot.synced_at, False, now)
        # Chunked so a million-number read does not keep other threads out for its duration.
        for chunk in chunks(numbers, REDIS_CHUNK):
            with self._lock:
                for number in chunk:
                    key = (channel, number)
                    status = entries.get(key)
                    if status is not None and not is_fresh(settings, status, now):
                        del entries[key]
                        status = None
                    if snapshot is not None:
                        from_snapshot = (
                            listed_status if number in snapshot.numbers else absent_status
                        )
                        status = newest(status, from_snapshot)
                    if status is not None:
                        found[number] = status
        return found

    def set_many(
        self, channel: str, blocked: Collection[str], clean: Collection[str], fetched_at: float
    ) -> None:
        now = self.clock()
        fetched_at = float(fetched_at)
        # One shared object per kind: a million entries from one fetch cost no extra objects.
        statuses = {kind: CachedStatus(kind, fetched_at) for kind in (False, True)}
        storable = {
            kind: seconds_left(ttl_for(self.settings, kind), fetched_at, now) > 0
            for kind in (False, True)
        }
        entries = self._entries
        pairs = list(by_kind(blocked, clean))
        for chunk in chunks(pairs, REDIS_CHUNK):
            with self._lock:
                for kind, number in chunk:
                    key = (channel, number)
                    if not storable[kind]:
                        entries.pop(key, None)
                        continue
                    entries[key] = statuses[kind]
                    entries.move_to_end(key)
                while len(entries) > self.max_entries:
                    entries.popitem(last=False)

    def acquire_leases(self, channel: str, numbers: Sequence[str], seconds: float) -> set[str]:
        return set(numbers)

    def release_leases(self, channel: str, numbers: Sequence[str]) -> None:
        return None

    def wait_for(
        self, channel: str, numbers: Sequence[str], timeout: float
    ) -> dict[str, CachedStatus]:
        # No process but this one writes here and it holds every lease: nothing to wait for.
        return self.get_many(channel, numbers)

    def begin_snapshot(self, channel: str) -> SnapshotWriter:
        return _MemorySnapshotWriter(self, channel)

    def snapshot_info(self, channel: str) -> SyncInfo | None:
        with self._lock:
            snapshot = self._snapshot(channel, self.clock())
        return None if snapshot is None else SyncInfo(snapshot.synced_at, snapshot.size)

    def clear_snapshot(self, channel: str) -> None:
        with self._lock:
            self._snapshots.pop(channel, None)

    def eviction_policy(self) -> str | None:
        return None

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
            self._snapshots.clear()

    def __enter__(self) -> MemoryCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MemoryCache(entries={len(self._entries)}, max_entries={self.max_entries})"


# -- choosing one ----------------------------------------------------------------------------


def _open_memory(settings: Settings, clock: Clock | None) -> StatusCache:
    query = parse_qs(urlsplit(settings.cache_url).query)
    max_entries = DEFAULT_MAX_ENTRIES
    if "max_entries" in query:
        raw = query["max_entries"][-1]
        try:
            max_entries = int(raw)
        except ValueError:
            raise ConfigError(
                f"BLOCKFILTER_CACHE_URL: memory://?max_entries= takes a whole number, got {raw!r}"
            ) from None
    return MemoryCache(settings, max_entries=max_entries, clock=clock)


def open_cache(settings: Settings, *, clock: Clock | None = None) -> StatusCache:
    """The cache ``settings.cache_url`` names: ``memory://[?max_entries=N]``,
    ``redis://[:password@]host[:port][/db]``, ``rediss://...`` or ``unix:///path``.

    :param clock: epoch seconds now (tests inject one); ``time.time`` by default.
    :raises ConfigError: an unknown scheme, a malformed URL, or Redis without a secret.
    """
    scheme = urlsplit(settings.cache_url).scheme.lower()
    if scheme == "memory":
        return _open_memory(settings, clock)
    if scheme in ("redis", "rediss", "unix"):
        from .redis import RedisCache

        return RedisCache(settings, clock=clock)
    raise ConfigError(
        "BLOCKFILTER_CACHE_URL must be memory:// or redis://host:port/db (rediss:// for TLS), "
        f"got a URL with scheme {scheme!r}"
    )


def __getattr__(name: str) -> Any:
    # RedisCache and the rest of the Redis implementation moved to blockfilter.store.redis,
    # which imports this module: looked up there on first use, so neither imports the other
    # back at import time, and redis-py is imported only by those who use Redis.
    if name.startswith("__"):
        raise AttributeError(name)
    from . import redis

    try:
        return getattr(redis, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
