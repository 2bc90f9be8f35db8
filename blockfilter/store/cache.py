"""The status cache: what the API said about a (channel, number), and when.

Every API request costs money and time, and a campaign asks about the same numbers again and
again, so statuses are kept for a while behind one interface, :class:`StatusCache`:

* ``memory://`` (:class:`MemoryCache`): per process, thread-safe, bounded
  (``memory://?max_entries=N``, default 1,000,000; the oldest entries go first).
* ``redis://host:port/db``, ``rediss://...``, ``unix://...`` (:class:`RedisCache`): shared by
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
  (:mod:`blockfilter.sync`). A snapshot is the only thing that can answer "clean" for a number
  nobody looked up, so it is kept whole or not at all: it is one object (one Redis key, a hash
  of keyed number hashes that holds its own member count and sync time), written aside and put
  in place only once every page is in it and the count proves it. Evicted, expired or lost in a
  restart, it vanishes whole, and its numbers are looked up again. No entry write can shorten
  or delete it.

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

import hashlib
import hmac
import logging
import math
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast, runtime_checkable
from urllib.parse import parse_qs, urlsplit

from ..config import Settings
from ..errors import CacheUnavailable, ConfigError
from ..redact import redact

if TYPE_CHECKING:
    import redis

log = logging.getLogger("blockfilter.cache")

DEFAULT_MAX_ENTRIES = 1_000_000
# Numbers per Redis round trip: a 10k-key read is a few hundred kB each way, which amortises
# the round trip without making one reply huge. A million numbers take 100 round trips.
REDIS_CHUNK = 10_000
# Short on purpose: a cache that does not answer within a couple of seconds is worth less
# than the API requests it would save, and the caller goes on without it.
REDIS_CONNECT_TIMEOUT = 1.0
REDIS_SOCKET_TIMEOUT = 2.0
# How often wait_for polls: short enough to add little latency to a coalesced lookup, long
# enough that a hundred waiting workers do not hammer Redis.
POLL_FIRST = 0.02
POLL_MAX = 0.05
#: Seconds an answer's time may lie in the reader's future before the answer is distrusted: a
#: clock that went back must not stretch a TTL, and a little jitter must not cost lookups.
CLOCK_TOLERANCE_S = 1.0
# How long a snapshot being written may sit unfinished before Redis drops it: a sync that
# died half-way must not leave its pages behind for ever.
SNAPSHOT_STAGING_S = 3600.0

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


def _ttl(settings: Settings, blocked: bool) -> float:
    return settings.cache_ttl_blocked if blocked else settings.cache_ttl


def _remaining(ttl: float, fetched_at: float, now: float) -> float:
    """Seconds an answer given at ``fetched_at`` may still be trusted (<= 0: not at all).
    An answer from the future (a clock that went back, or skew between hosts) is trusted not
    at all past :data:`CLOCK_TOLERANCE_S`, and never for more than ``ttl``."""
    if ttl <= 0 or fetched_at - now > CLOCK_TOLERANCE_S:
        return 0.0
    return min(ttl, ttl - (now - fetched_at))


def _fresh(settings: Settings, status: CachedStatus, now: float) -> bool:
    return _remaining(_ttl(settings, status.blocked), status.fetched_at, now) > 0


def _snapshot_status(
    settings: Settings, synced_at: float, listed: bool, now: float
) -> CachedStatus | None:
    """What a whole snapshot says of one number: listed means blocked, absent means clean,
    each for its kind's TTL counted from the sync's start."""
    status = CachedStatus(listed, synced_at, "snapshot")
    return status if _fresh(settings, status, now) else None


def _newest(entry: CachedStatus | None, snapshot: CachedStatus | None) -> CachedStatus | None:
    # Both are answers of the API; the later one is the truth. A tie goes to blocked.
    if entry is None or snapshot is None:
        return entry or snapshot
    if entry.fetched_at != snapshot.fetched_at:
        return entry if entry.fetched_at > snapshot.fetched_at else snapshot
    return entry if entry.blocked else snapshot


def _unique(numbers: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(numbers))


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _by_kind(blocked: Collection[str], clean: Collection[str]) -> Iterator[tuple[bool, str]]:
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
            listed_status = _snapshot_status(settings, snapshot.synced_at, True, now)
            absent_status = _snapshot_status(settings, snapshot.synced_at, False, now)
        # Chunked so a million-number read does not keep other threads out for its duration.
        for chunk in _chunks(numbers, REDIS_CHUNK):
            with self._lock:
                for number in chunk:
                    key = (channel, number)
                    status = entries.get(key)
                    if status is not None and not _fresh(settings, status, now):
                        del entries[key]
                        status = None
                    if snapshot is not None:
                        from_snapshot = (
                            listed_status if number in snapshot.numbers else absent_status
                        )
                        status = _newest(status, from_snapshot)
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
            kind: _remaining(_ttl(self.settings, kind), fetched_at, now) > 0
            for kind in (False, True)
        }
        entries = self._entries
        pairs = list(_by_kind(blocked, clean))
        for chunk in _chunks(pairs, REDIS_CHUNK):
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


# -- redis:// ------------------------------------------------------------------------------

# One call a chunk instead of one command a number: with redis-py, building and parsing a
# command costs more CPU than Redis spends on it, and a cold campaign of 10^5 numbers would
# otherwise spend seconds of its own time on them (time its requests wait for the GIL).
_LEASE_SCRIPT = """
local held = {}
for i, key in ipairs(KEYS) do
  held[i] = redis.call('SET', key, ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
end
return held
"""

# Writes entries stamped with the server's clock. KEYS: status keys; ARGV[1]: one letter a
# key, "b" blocked or "c" clean; ARGV[2]: how old the answer already is (ms, by the writer's
# own clock, which only has to agree with itself); ARGV[3..6]: the clean value and TTL (ms),
# the blocked value and TTL. An entry with no TTL left is deleted, never left stale.
_SET_SCRIPT = """
local t = redis.call('TIME')
local age = tonumber(ARGV[2])
local stamp = string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1e6 - age / 1000)
local values = {ARGV[3] .. ':' .. stamp, ARGV[5] .. ':' .. stamp}
local pxs = {tonumber(ARGV[4]) - age, tonumber(ARGV[6]) - age}
local kinds = ARGV[1]
for i, key in ipairs(KEYS) do
  local kind = (string.byte(kinds, i) == 98) and 2 or 1
  if pxs[kind] > 0 then
    redis.call('SET', key, values[kind], 'PX', string.format('%d', pxs[kind]))
  else
    redis.call('DEL', key)
  end
end
return #KEYS
"""

# Reads entries and the channel's snapshot in one atomic step, with the server's clock: a
# snapshot half-read, or read at another moment than the entries, could not be proven whole.
# KEYS[1]: the snapshot; KEYS[2..]: status keys, whose last 32 characters (the number's
# hash) are the number's field in the snapshot, so nothing else needs sending. Returns the
# server time, the snapshot's meta and field count (nil, 0 without one), a string of '1'/'0'
# (listed or not, one a number; nil without a snapshot) and the entries.
_GET_SCRIPT = """
local t = redis.call('TIME')
local meta = redis.call('HGET', KEYS[1], '#')
local count = 0
local listed = false
if meta then
  count = redis.call('HLEN', KEYS[1])
  local bits = {}
  for s = 2, #KEYS, 1000 do
    local fields = {}
    for i = s, math.min(s + 999, #KEYS) do fields[#fields + 1] = string.sub(KEYS[i], -32) end
    local got = redis.call('HMGET', KEYS[1], unpack(fields))
    for i = 1, #got do bits[#bits + 1] = got[i] and '1' or '0' end
  end
  listed = table.concat(bits)
end
local values = {}
for s = 2, #KEYS, 1000 do
  local got = redis.call('MGET', unpack(KEYS, s, math.min(s + 999, #KEYS)))
  for i = 1, #got do values[#values + 1] = got[i] end
end
return {t[1], t[2], meta, count, listed, values}
"""

# Puts a written snapshot in place only if every field written is still there (a restart or
# an eviction mid-sync leaves fewer), stamped with its meta and expiring with the writer's
# longest TTL counted from the sync's start. KEYS: staging, live; ARGV: fields expected, meta,
# synced_at (server seconds), life (ms).
_COMMIT_SCRIPT = """
local expected = tonumber(ARGV[1])
if redis.call('HLEN', KEYS[1]) ~= expected then
  redis.call('DEL', KEYS[1])
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local px = tonumber(ARGV[4]) - (now - tonumber(ARGV[3])) * 1000
if px <= 0 then
  redis.call('DEL', KEYS[1])
  return 0
end
redis.call('HSET', KEYS[1], '#', ARGV[2])
redis.call('RENAME', KEYS[1], KEYS[2])
redis.call('PEXPIRE', KEYS[2], string.format('%d', px))
return 1
"""

# Deletes each lease only if it still holds our token: a lease that expired and was taken by
# another worker must not be released by us.
_RELEASE_SCRIPT = """
local released = 0
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('DEL', key)
    released = released + 1
  end
end
return released
"""

_META_FIELD = b"#"

Stamped = tuple[CachedStatus, float]


def _encode(blocked: bool, fetched_at: float) -> bytes:
    # The server appends ":<stamp>", its own time of the answer, when it writes the entry.
    return f"{1 if blocked else 0}:{fetched_at!r}".encode()


def _decode(raw: bytes | None, memo: dict[bytes, Stamped | None]) -> Stamped | None:
    """An entry's status and its server stamp; ``None`` for no entry, or one not ours or
    damaged (including an older version's entries, which carry no stamp): looked up again."""
    if raw is None:
        return None
    # Entries written together share a value: decode it once, share the object.
    if raw in memo:
        return memo[raw]
    decoded: Stamped | None = None
    parts = raw.split(b":")
    if len(parts) == 3 and parts[0] in (b"0", b"1"):
        try:
            fetched_at, stamp = float(parts[1]), float(parts[2])
        except ValueError:
            pass
        else:
            if math.isfinite(fetched_at) and math.isfinite(stamp):
                decoded = (CachedStatus(parts[0] == b"1", fetched_at), stamp)
    memo[raw] = decoded
    return decoded


def _server_now(seconds: Any, microseconds: Any) -> float:
    return int(seconds) + int(microseconds) / 1e6


def _decode_meta(meta: bytes | None, count: int) -> tuple[float, int] | None:
    """A snapshot's (synced_at, listed), if its meta is ours and its field count proves it
    whole: every member it was committed with, and the meta field itself."""
    if meta is None:
        return None
    try:
        synced, members, listed = meta.split(b" ")
        synced_at, member_count, listed_count = float(synced), int(members), int(listed)
    except ValueError:
        return None
    if not math.isfinite(synced_at) or count != member_count + 1:
        return None
    return synced_at, listed_count


def _where(url: str) -> str:
    """The server as shown in messages: scheme, host, port and db, never the credentials."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    try:
        port = parts.port or 6379
    except ValueError:
        port = 0
    return f"{parts.scheme}://{parts.hostname or 'localhost'}:{port}{parts.path or '/0'}"


class _RedisSnapshotWriter:
    def __init__(self, cache: RedisCache, channel: str) -> None:
        self._cache = cache
        self._channel = channel
        self._staging = cache._staging_key(channel)
        self._fields: set[str] = set()
        with cache._guard("snapshot"):
            self.synced_at = _server_now(*cache._redis().time())

    def add(self, numbers: Collection[str]) -> None:
        cache = self._cache
        fields = [cache._hash(self._channel, number) for number in numbers]
        if not fields:
            return
        with cache._guard("snapshot"):
            pipe = cache._redis().pipeline(transaction=False)
            for chunk in _chunks(fields, cache.chunk_size):
                pipe.hset(self._staging, mapping=dict.fromkeys(chunk, b"1"))
            pipe.pexpire(self._staging, math.ceil(SNAPSHOT_STAGING_S * 1000))
            pipe.execute()
        self._fields.update(fields)

    def commit(self, listed: int) -> bool:
        cache = self._cache
        settings = cache.settings
        life_ms = math.ceil(max(settings.cache_ttl, settings.cache_ttl_blocked) * 1000)
        meta = f"{self.synced_at:.6f} {len(self._fields)} {int(listed)}".encode()
        with cache._guard("snapshot"):
            cache._redis()
            done = cache._commit(
                keys=[self._staging, cache._snapshot_key(self._channel)],
                args=[len(self._fields), meta, f"{self.synced_at:.6f}", life_ms],
            )
        return bool(done)

    def abort(self) -> None:
        cache = self._cache
        try:
            with cache._guard("snapshot"):
                cache._redis().delete(self._staging)
        except CacheUnavailable:
            pass  # it expires on its own, and was never in place


class RedisCache:
    """A cache in Redis, shared by every worker of a fleet.

    Keys: ``bf:s:<channel>:<hash>`` (entry, value ``<1|0>:<fetched_at>:<server stamp>``,
    expiring by ``PX``), ``bf:l:<hash>`` (lease, value a per-process token),
    ``bf:n:<channel>:<hash>`` (the channel's snapshot: a hash whose fields are the numbers'
    keyed hashes and whose field ``#`` holds the sync time, member count and listed size),
    ``bf:w:<channel>:<token>`` (a snapshot being written). ``<hash>`` is the first 32 hex
    digits of HMAC-SHA256(secret, channel + ":" + number), the snapshot's fields too. The
    client is made on first use and made again in a forked child (a connection shared across
    processes mixes up replies).

    Eviction cannot make a snapshot lie: it removes a snapshot whole (one key), and a read
    proves the rest whole by its field count. ``blockfilter sync`` still wants a server whose
    ``maxmemory-policy`` is ``noeviction``: elsewhere a sync can be undone by the next burst of
    writes, and its requests are wasted.

    :param settings: TTLs, ``cache_url`` and the secret come from here.
    :param url: overrides ``settings.cache_url``.
    :param namespace: prefix of every key (tests use a random one to share a server).
    :param chunk_size: numbers per round trip.
    :param clock: the worker's epoch seconds, used only to tell how old an answer already is
        when it is written (ages are otherwise Redis' own).
    :raises ConfigError: no secret to hash numbers with, or a malformed URL.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        url: str | None = None,
        namespace: str = "",
        chunk_size: int = REDIS_CHUNK,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self._url = url if url is not None else settings.cache_url
        self.where = _where(self._url)
        try:
            from redis.connection import parse_url

            parse_url(self._url)
        except ValueError as exc:
            password = urlsplit(self._url).password
            raise ConfigError(
                f"BLOCKFILTER_CACHE_URL is not a usable Redis URL: {redact(str(exc), password)}"
            ) from None
        secret = cache_secret(settings)
        if secret is None:
            raise ConfigError(
                "BLOCKFILTER_CACHE_URL points at Redis, where phone numbers are stored only as "
                "keyed hashes, and there is no key to hash them with: set "
                "BLOCKFILTER_CACHE_SECRET (the same on every worker) or KALEYRA_API_KEY"
            )
        # A prepared HMAC per channel is copied per number: twice as fast as hmac.new().
        self._hmac_base = hmac.new(secret, digestmod=hashlib.sha256)
        self._hmac_by_channel: dict[str, Any] = {}
        self.namespace = namespace
        self.chunk_size = chunk_size
        self.clock: Clock = clock or time.time
        self._client: redis.Redis | None = None
        self._release: Any = None
        self._lease: Any = None
        self._set: Any = None
        self._get: Any = None
        self._commit: Any = None
        self._pid = 0
        self._token = b""
        self._lock = threading.Lock()

    # -- plumbing ----------------------------------------------------------------------

    def _redis(self) -> redis.Redis:
        client = self._client
        if client is not None and self._pid == os.getpid():
            return client
        with self._lock:
            if self._client is None or self._pid != os.getpid():
                import redis
                from redis.backoff import NoBackoff
                from redis.retry import Retry

                # Not closing a client inherited over fork: its sockets belong to the parent.
                self._client = redis.Redis.from_url(
                    self._url,
                    socket_connect_timeout=REDIS_CONNECT_TIMEOUT,
                    socket_timeout=REDIS_SOCKET_TIMEOUT,
                    # One immediate retry covers a pooled connection the server has since
                    # closed; redis-py's default (3 retries, backoff up to seconds) would
                    # stall every call of a run once the server is gone.
                    retry=Retry(NoBackoff(), 1),
                    health_check_interval=30,
                )
                self._release = self._client.register_script(_RELEASE_SCRIPT)
                self._lease = self._client.register_script(_LEASE_SCRIPT)
                self._set = self._client.register_script(_SET_SCRIPT)
                self._get = self._client.register_script(_GET_SCRIPT)
                self._commit = self._client.register_script(_COMMIT_SCRIPT)
                self._token = secrets.token_hex(16).encode()
                self._pid = os.getpid()
                log.debug("redis cache client made for %s (pid %d)", self.where, self._pid)
            return self._client

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        import redis

        try:
            yield
        except (redis.RedisError, OSError) as exc:
            # The redis-py message names host and port at most; never a key (they are hashes
            # anyway), never the password.
            detail = str(exc).splitlines()[0] if str(exc) else ""
            raise CacheUnavailable(
                f"Redis cache at {self.where} unavailable ({what}): "
                f"{type(exc).__name__}{': ' + detail if detail else ''}"
            ) from exc

    def _hash(self, channel: str, number: str) -> str:
        base = self._hmac_by_channel.get(channel)
        if base is None:
            base = self._hmac_base.copy()
            base.update(f"{channel}:".encode())
            self._hmac_by_channel[channel] = base
        digest = base.copy()
        digest.update(number.encode())
        return str(digest.hexdigest()[:32])

    def _status_key(self, channel: str, number: str) -> str:
        return f"{self.namespace}bf:s:{channel}:{self._hash(channel, number)}"

    def _lease_key(self, channel: str, number: str) -> str:
        return f"{self.namespace}bf:l:{self._hash(channel, number)}"

    def _snapshot_key(self, channel: str) -> str:
        # Keyed like the entries (by the secret, so by the account): one account's snapshot
        # must never make another account's unlisted numbers read as clean.
        return f"{self.namespace}bf:n:{channel}:{self._hash(channel, '#snapshot')}"

    def _staging_key(self, channel: str) -> str:
        return f"{self.namespace}bf:w:{channel}:{secrets.token_hex(16)}"

    # -- statuses ----------------------------------------------------------------------

    def get_many(self, channel: str, numbers: Sequence[str]) -> dict[str, CachedStatus]:
        found: dict[str, CachedStatus] = {}
        settings = self.settings
        memo: dict[bytes, Stamped | None] = {}
        prefix = f"{self.namespace}bf:s:{channel}:"
        snapshot_key = self._snapshot_key(channel)
        with self._guard("get"):
            self._redis()
            for chunk in _chunks(_unique(numbers), self.chunk_size):
                keys = [snapshot_key, *(prefix + self._hash(channel, n) for n in chunk)]
                seconds, micros, meta, count, listed, raws = self._get(keys=keys)
                now = _server_now(seconds, micros)
                whole = _decode_meta(meta, int(count))
                in_list = out_of_list = None
                if whole is not None and listed is not None and len(listed) == len(chunk):
                    in_list = _snapshot_status(settings, whole[0], True, now)
                    out_of_list = _snapshot_status(settings, whole[0], False, now)
                else:
                    listed = None
                for i, (number, raw) in enumerate(zip(chunk, raws, strict=True)):
                    status: CachedStatus | None = None
                    stamped = _decode(raw, memo)
                    if stamped is not None:
                        entry, stamp = stamped
                        if _remaining(_ttl(settings, entry.blocked), stamp, now) > 0:
                            status = entry
                    if listed is not None:
                        status = _newest(status, in_list if listed[i] == 49 else out_of_list)
                    if status is not None:
                        found[number] = status
        return found

    def set_many(
        self, channel: str, blocked: Collection[str], clean: Collection[str], fetched_at: float
    ) -> None:
        fetched_at = float(fetched_at)
        age_ms = max(0, math.floor((self.clock() - fetched_at) * 1000))
        values = {kind: _encode(kind, fetched_at) for kind in (False, True)}
        ttl_ms = {kind: math.ceil(_ttl(self.settings, kind) * 1000) for kind in (False, True)}
        pairs = list(_by_kind(blocked, clean))
        with self._guard("set"):
            self._redis()
            for chunk in _chunks(pairs, self.chunk_size):
                # A number in both is written twice in one chunk, clean then blocked (the
                # script writes in order), or blocked in a later chunk: blocked wins.
                self._set(
                    keys=[self._status_key(channel, number) for _, number in chunk],
                    args=[
                        "".join("b" if kind else "c" for kind, _ in chunk),
                        age_ms,
                        values[False],
                        ttl_ms[False],
                        values[True],
                        ttl_ms[True],
                    ],
                )

    # -- leases ------------------------------------------------------------------------

    def acquire_leases(self, channel: str, numbers: Sequence[str], seconds: float) -> set[str]:
        ms = max(1, math.ceil(seconds * 1000))
        held: set[str] = set()
        with self._guard("lease"):
            self._redis()
            for chunk in _chunks(_unique(numbers), self.chunk_size):
                got = self._lease(
                    keys=[self._lease_key(channel, number) for number in chunk],
                    args=[self._token, ms],
                )
                held.update(number for number, one in zip(chunk, got, strict=True) if one)
        return held

    def release_leases(self, channel: str, numbers: Sequence[str]) -> None:
        with self._guard("release"):
            self._redis()
            for chunk in _chunks(_unique(numbers), self.chunk_size):
                keys = [self._lease_key(channel, n) for n in chunk]
                self._release(keys=keys, args=[self._token])

    def wait_for(
        self, channel: str, numbers: Sequence[str], timeout: float
    ) -> dict[str, CachedStatus]:
        deadline = time.monotonic() + timeout
        pending = _unique(numbers)
        found: dict[str, CachedStatus] = {}
        pause = POLL_FIRST
        memo: dict[bytes, Stamped | None] = {}
        settings = self.settings
        with self._guard("wait"):
            client = self._redis()
            while True:
                still: list[str] = []
                for chunk in _chunks(pending, self.chunk_size):
                    pipe = client.pipeline(transaction=False)
                    pipe.time()
                    pipe.mget([self._status_key(channel, n) for n in chunk])
                    pipe.mget([self._lease_key(channel, n) for n in chunk])
                    (seconds, micros), raws, leases = pipe.execute()
                    now = _server_now(seconds, micros)
                    for number, raw, lease in zip(chunk, raws, leases, strict=True):
                        stamped = _decode(raw, memo)
                        if stamped is not None and (
                            _remaining(_ttl(settings, stamped[0].blocked), stamped[1], now) > 0
                        ):
                            found[number] = stamped[0]
                        elif lease is not None:
                            still.append(number)
                        # else: the holder gave up without an answer; the caller asks itself.
                pending = still
                left = deadline - time.monotonic()
                if not pending or left <= 0:
                    return found
                time.sleep(min(pause, left))
                pause = min(pause * 1.5, POLL_MAX)

    # -- snapshots ---------------------------------------------------------------------

    def begin_snapshot(self, channel: str) -> SnapshotWriter:
        return _RedisSnapshotWriter(self, channel)

    def snapshot_info(self, channel: str) -> SyncInfo | None:
        key = self._snapshot_key(channel)
        with self._guard("snapshot"):
            pipe = self._redis().pipeline(transaction=True)
            pipe.hget(key, _META_FIELD)
            pipe.hlen(key)
            meta, count = pipe.execute()
        whole = _decode_meta(meta, int(count))
        return None if whole is None else SyncInfo(*whole)

    def clear_snapshot(self, channel: str) -> None:
        with self._guard("snapshot"):
            self._redis().delete(self._snapshot_key(channel))

    def eviction_policy(self) -> str | None:
        with self._guard("info"):
            info: dict[str, Any] = cast(Any, self._redis().info)("memory")
        # A server that hides it (some managed ones) is taken as the worst case.
        return str(info.get("maxmemory_policy", "unknown"))

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
            if client is not None and self._pid == os.getpid():
                client.close()

    def __enter__(self) -> RedisCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RedisCache({self.where!r}, namespace={self.namespace!r})"


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
        return RedisCache(settings, clock=clock)
    raise ConfigError(
        "BLOCKFILTER_CACHE_URL must be memory:// or redis://host:port/db (rediss:// for TLS), "
        f"got a URL with scheme {scheme!r}"
    )
