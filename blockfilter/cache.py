"""The status cache: what the API said about a (channel, number), and when.

Every API request costs money and time, and a campaign asks about the same numbers again and
again, so statuses are kept for a while behind one interface, :class:`StatusCache`:

* ``memory://`` (:class:`MemoryCache`): per process, thread-safe, bounded
  (``memory://?max_entries=N``, default 1,000,000; the oldest entries go first).
* ``redis://host:port/db``, ``rediss://...``, ``unix://...`` (:class:`RedisCache`): shared by
  every worker of a fleet. Keys and values hold no phone number: a number is only ever stored
  as a keyed hash (HMAC-SHA256 with ``BLOCKFILTER_CACHE_SECRET``, or a key derived from
  ``KALEYRA_API_KEY``).

How long an entry is trusted is counted from the moment the API answered (``fetched_at``):
``BLOCKFILTER_CACHE_TTL`` seconds for a clean number (short: an opt-out must take effect
soon), ``BLOCKFILTER_CACHE_TTL_BLOCKED`` for a blocklisted one. A TTL of 0 means "do not cache
that kind". Freshness is checked again on every read with the reader's own TTLs, so a worker
configured with shorter TTLs never trusts an entry longer than it was told to.

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
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast, runtime_checkable
from urllib.parse import parse_qs, urlsplit

from .config import Settings
from .errors import BlockfilterError, ConfigError
from .redact import redact

if TYPE_CHECKING:
    import redis

log = logging.getLogger("blockfilter.cache")

DEFAULT_MAX_ENTRIES = 1_000_000
# Numbers per Redis round trip: a 10k-key MGET is a few hundred kB each way, which amortises
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

_SECRET_DERIVATION_LABEL = b"blockfilter-cache-v1"

T = TypeVar("T")


class CacheUnavailable(BlockfilterError):
    """The cache could not be reached or did not answer. The message names the server (without
    credentials) and the operation, never a secret or a phone number. The caller may go on
    without the cache."""


@dataclass(frozen=True, slots=True)
class CachedStatus:
    """A status the API gave: blocklisted or clean, and when (epoch seconds)."""

    blocked: bool
    fetched_at: float


@dataclass(frozen=True, slots=True)
class SyncInfo:
    """A channel's whole blocklist was loaded into the cache at ``synced_at`` (``size``
    entries): while this holds, a number absent from the cache is clean as of ``synced_at``."""

    synced_at: float
    size: int


@runtime_checkable
class StatusCache(Protocol):
    """What the filter needs from a status cache; :func:`open_cache` picks the backend."""

    def get_many(self, channel: str, numbers: Sequence[str]) -> dict[str, CachedStatus]:
        """The fresh entries among ``numbers`` (expired and unknown ones are absent)."""
        ...

    def set_many(
        self, channel: str, blocked: Collection[str], clean: Collection[str], fetched_at: float
    ) -> None:
        """Store what the API said at ``fetched_at``. A number in both collections is stored
        as blocked. A number whose status cannot be stored (its kind's TTL is 0, or it is
        already older than the TTL) loses any entry it had, so the cache never contradicts
        the newest answer."""
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

    def set_sync(self, channel: str, synced_at: float, size: int, ttl: float) -> None:
        """Record that the channel's whole blocklist (``size`` entries, stored with
        :meth:`set_many` at ``synced_at``) is in the cache, for ``ttl`` seconds at most. The
        mark never outlives the blocklisted entries it vouches for."""
        ...

    def get_sync(self, channel: str) -> SyncInfo | None:
        """The channel's sync mark, if it still holds."""
        ...

    def clear_sync(self, channel: str) -> None:
        """Forget the channel's sync mark (absent numbers are unknown again)."""
        ...

    def close(self) -> None:
        """Release connections; the cache may be used again afterwards (it reconnects)."""
        ...


# -- shared rules --------------------------------------------------------------------------


def _ttl(settings: Settings, blocked: bool) -> float:
    return settings.cache_ttl_blocked if blocked else settings.cache_ttl


def _remaining(ttl: float, fetched_at: float, now: float) -> float:
    """Seconds an entry fetched at ``fetched_at`` may still be trusted (<= 0: not at all).
    A fetched_at in the future (clock skew between hosts) never extends the TTL."""
    if ttl <= 0:
        return 0.0
    return min(ttl, ttl - (now - fetched_at))


def _fresh(settings: Settings, status: CachedStatus, now: float) -> bool:
    return _remaining(_ttl(settings, status.blocked), status.fetched_at, now) > 0


def _sync_remaining(settings: Settings, synced_at: float, ttl: float, now: float) -> float:
    # The mark says "absent means clean"; that is only true while the blocklisted entries
    # loaded by the sync are still there, so it never outlives them.
    return _remaining(min(ttl, settings.cache_ttl_blocked), synced_at, now)


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


class MemoryCache:
    """An in-process cache, shared by the threads of one process.

    Bounded: past ``max_entries`` the oldest-written entries are evicted. Expired entries are
    purged when read. Leases are not needed across processes here, so every lease is granted
    (the caller coalesces lookups within the process itself).
    """

    def __init__(self, settings: Settings, *, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ConfigError(f"memory cache max_entries must be >= 1, got {max_entries}")
        self.settings = settings
        self.max_entries = max_entries
        # Keyed by (channel, number) in write order, so the oldest entry is the first one.
        self._entries: OrderedDict[tuple[str, str], CachedStatus] = OrderedDict()
        self._syncs: dict[str, tuple[SyncInfo, float]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get_many(self, channel: str, numbers: Sequence[str]) -> dict[str, CachedStatus]:
        found: dict[str, CachedStatus] = {}
        now = time.time()
        entries = self._entries
        # Chunked so a million-number read does not keep other threads out for its duration.
        for chunk in _chunks(numbers, REDIS_CHUNK):
            with self._lock:
                for number in chunk:
                    key = (channel, number)
                    status = entries.get(key)
                    if status is None:
                        continue
                    if _fresh(self.settings, status, now):
                        found[number] = status
                    else:
                        del entries[key]
        return found

    def set_many(
        self, channel: str, blocked: Collection[str], clean: Collection[str], fetched_at: float
    ) -> None:
        now = time.time()
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
                        self._drop(key)
                        continue
                    entries[key] = statuses[kind]
                    entries.move_to_end(key)
                while len(entries) > self.max_entries:
                    self._evict_oldest()

    def _drop(self, key: tuple[str, str]) -> None:
        old = self._entries.pop(key, None)
        if old is not None and old.blocked:
            # A sync mark vouches for its blocklisted entries; a gap would read as "clean".
            self._syncs.pop(key[0], None)

    def _evict_oldest(self) -> None:
        (channel, _number), status = self._entries.popitem(last=False)
        if status.blocked:
            self._syncs.pop(channel, None)

    def acquire_leases(self, channel: str, numbers: Sequence[str], seconds: float) -> set[str]:
        return set(numbers)

    def release_leases(self, channel: str, numbers: Sequence[str]) -> None:
        return None

    def wait_for(
        self, channel: str, numbers: Sequence[str], timeout: float
    ) -> dict[str, CachedStatus]:
        # No process but this one writes here and it holds every lease: nothing to wait for.
        return self.get_many(channel, numbers)

    def set_sync(self, channel: str, synced_at: float, size: int, ttl: float) -> None:
        now = time.time()
        remaining = _sync_remaining(self.settings, synced_at, ttl, now)
        with self._lock:
            if remaining <= 0:
                self._syncs.pop(channel, None)
            else:
                self._syncs[channel] = (SyncInfo(float(synced_at), int(size)), now + remaining)

    def get_sync(self, channel: str) -> SyncInfo | None:
        with self._lock:
            held = self._syncs.get(channel)
            if held is None:
                return None
            info, expires_at = held
            if time.time() >= expires_at:
                del self._syncs[channel]
                return None
            return info

    def clear_sync(self, channel: str) -> None:
        with self._lock:
            self._syncs.pop(channel, None)

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
            self._syncs.clear()

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

# KEYS: status keys; ARGV[1]: one letter a key, "b" blocked or "c" clean; ARGV[2..5]: the
# clean value and expiry (ms), the blocked value and expiry. An expiry of 0 deletes the key.
_SET_SCRIPT = """
local kinds = ARGV[1]
for i, key in ipairs(KEYS) do
  local value, px = ARGV[2], tonumber(ARGV[3])
  if string.byte(kinds, i) == 98 then value, px = ARGV[4], tonumber(ARGV[5]) end
  if px > 0 then redis.call('SET', key, value, 'PX', px) else redis.call('DEL', key) end
end
return #KEYS
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


def _encode(blocked: bool, fetched_at: float) -> bytes:
    return f"{1 if blocked else 0}:{fetched_at!r}".encode()


def _decode(raw: bytes | None, memo: dict[bytes, CachedStatus | None]) -> CachedStatus | None:
    if raw is None:
        return None
    # Entries written together share a value: decode it once, share the object.
    if raw in memo:
        return memo[raw]
    status: CachedStatus | None
    try:
        flag, _, at = raw.partition(b":")
        status = CachedStatus(flag == b"1", float(at)) if flag in (b"0", b"1") else None
    except ValueError:
        status = None  # not ours, or damaged: treated as absent, so looked up again
    memo[raw] = status
    return status


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


class RedisCache:
    """A cache in Redis, shared by every worker of a fleet.

    Keys: ``bf:s:<channel>:<hash>`` (status, value ``1:<fetched_at>`` or ``0:<fetched_at>``,
    expiring by ``PX``), ``bf:l:<hash>`` (lease, value a per-process token),
    ``bf:y:<channel>:<hash>`` (sync mark, keyed by the secret so accounts never share one).
    ``<hash>`` is the first 32 hex digits of HMAC-SHA256(secret, channel + ":" + number).
    The client is made on first use and made again in a forked child (a connection
    shared across processes mixes up replies).

    Use a server whose ``maxmemory-policy`` is ``noeviction`` (or with room to spare) if you use
    the full-list sync: an evicted blocklisted entry would then read as clean.

    :param settings: TTLs, ``cache_url`` and the secret come from here.
    :param url: overrides ``settings.cache_url``.
    :param namespace: prefix of every key (tests use a random one to share a server).
    :param chunk_size: numbers per round trip.
    :raises ConfigError: no secret to hash numbers with, or a malformed URL.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        url: str | None = None,
        namespace: str = "",
        chunk_size: int = REDIS_CHUNK,
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
        self._client: redis.Redis | None = None
        self._release: Any = None
        self._lease: Any = None
        self._set: Any = None
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

    def _sync_key(self, channel: str) -> str:
        # Keyed like the entries (by the secret, so by the account): one account's sync mark
        # must never make another account's unlisted numbers read as clean.
        return f"{self.namespace}bf:y:{channel}:{self._hash(channel, '#sync')}"

    # -- statuses ----------------------------------------------------------------------

    def get_many(self, channel: str, numbers: Sequence[str]) -> dict[str, CachedStatus]:
        found: dict[str, CachedStatus] = {}
        now = time.time()
        memo: dict[bytes, CachedStatus | None] = {}
        with self._guard("get"):
            client = self._redis()
            for chunk in _chunks(_unique(numbers), self.chunk_size):
                raws: list[bytes | None] = cast(Any, client.mget)(
                    [self._status_key(channel, n) for n in chunk]
                )
                for number, raw in zip(chunk, raws, strict=True):
                    status = _decode(raw, memo)
                    if status is not None and _fresh(self.settings, status, now):
                        found[number] = status
        return found

    def set_many(
        self, channel: str, blocked: Collection[str], clean: Collection[str], fetched_at: float
    ) -> None:
        now = time.time()
        fetched_at = float(fetched_at)
        values = {kind: _encode(kind, fetched_at) for kind in (False, True)}
        px = {
            kind: math.ceil(_remaining(_ttl(self.settings, kind), fetched_at, now) * 1000)
            for kind in (False, True)
        }
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
                        values[False],
                        max(px[False], 0),
                        values[True],
                        max(px[True], 0),
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
        memo: dict[bytes, CachedStatus | None] = {}
        with self._guard("wait"):
            client = self._redis()
            while True:
                now = time.time()
                still: list[str] = []
                for chunk in _chunks(pending, self.chunk_size):
                    pipe = client.pipeline(transaction=False)
                    pipe.mget([self._status_key(channel, n) for n in chunk])
                    pipe.mget([self._lease_key(channel, n) for n in chunk])
                    raws, leases = pipe.execute()
                    for number, raw, lease in zip(chunk, raws, leases, strict=True):
                        status = _decode(raw, memo)
                        if status is not None and _fresh(self.settings, status, now):
                            found[number] = status
                        elif lease is not None:
                            still.append(number)
                        # else: the holder gave up without an answer; the caller asks itself.
                pending = still
                left = deadline - time.monotonic()
                if not pending or left <= 0:
                    return found
                time.sleep(min(pause, left))
                pause = min(pause * 1.5, POLL_MAX)

    # -- full-list sync ----------------------------------------------------------------

    def set_sync(self, channel: str, synced_at: float, size: int, ttl: float) -> None:
        remaining = _sync_remaining(self.settings, synced_at, ttl, time.time())
        with self._guard("sync"):
            client = self._redis()
            if remaining <= 0:
                client.delete(self._sync_key(channel))
            else:
                value = f"{float(synced_at)!r}:{int(size)}".encode()
                client.set(self._sync_key(channel), value, px=math.ceil(remaining * 1000))

    def get_sync(self, channel: str) -> SyncInfo | None:
        with self._guard("sync"):
            raw: bytes | None = cast(Any, self._redis().get)(self._sync_key(channel))
        if raw is None:
            return None
        try:
            at, _, size = raw.partition(b":")
            info = SyncInfo(float(at), int(size))
        except ValueError:
            return None
        # Checked again with this worker's TTL: the blocklisted entries may expire sooner here.
        if _sync_remaining(self.settings, info.synced_at, math.inf, time.time()) <= 0:
            return None
        return info

    def clear_sync(self, channel: str) -> None:
        with self._guard("sync"):
            self._redis().delete(self._sync_key(channel))

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


def _open_memory(settings: Settings) -> StatusCache:
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
    return MemoryCache(settings, max_entries=max_entries)


def open_cache(settings: Settings) -> StatusCache:
    """The cache ``settings.cache_url`` names: ``memory://[?max_entries=N]``,
    ``redis://[:password@]host[:port][/db]``, ``rediss://...`` or ``unix:///path``.

    :raises ConfigError: an unknown scheme, a malformed URL, or Redis without a secret.
    """
    scheme = urlsplit(settings.cache_url).scheme.lower()
    if scheme == "memory":
        return _open_memory(settings)
    if scheme in ("redis", "rediss", "unix"):
        return RedisCache(settings)
    raise ConfigError(
        "BLOCKFILTER_CACHE_URL must be memory:// or redis://host:port/db (rediss:// for TLS), "
        f"got a URL with scheme {scheme!r}"
    )
