"""The status cache in Redis (``redis://``, ``rediss://``, ``unix://``): shared by every worker.

The interface and the rules every cache keeps (what an answer is, how long it is trusted, the
invariant that nothing unproven reads as clean) are :mod:`blockfilter.store.cache`'s; this is
how Redis keeps them: keyed hashes instead of numbers, Lua scripts so a chunk of numbers is one
call, and Redis' own clock (``TIME``) for every age.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

from ..config import Settings
from ..errors import CacheUnavailable, ConfigError
from ..redact import redact
from .cache import (
    REDIS_CHUNK,
    CachedStatus,
    Clock,
    SnapshotWriter,
    SyncInfo,
    by_kind,
    cache_secret,
    chunks,
    newest,
    seconds_left,
    snapshot_status,
    ttl_for,
    unique,
)

if TYPE_CHECKING:
    import redis

__all__ = ["ChannelRead", "NumberHasher", "RedisCache"]

log = logging.getLogger("blockfilter.cache")

# Short on purpose: a cache that does not answer within a couple of seconds is worth less
# than the API requests it would save, and the caller goes on without it.
REDIS_CONNECT_TIMEOUT = 1.0
REDIS_SOCKET_TIMEOUT = 2.0
# How often wait_for polls: short enough to add little latency to a coalesced lookup, long
# enough that a hundred waiting workers do not hammer Redis.
POLL_FIRST = 0.02
POLL_MAX = 0.05
# How long a snapshot being written may sit unfinished before Redis drops it: a sync that
# died half-way must not leave its pages behind for ever.
SNAPSHOT_STAGING_S = 3600.0

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
_UNSEEN: Any = object()

Stamped = tuple[CachedStatus, float]


class ChannelRead:
    """What one read proved of a channel: ``found`` (number -> status), ``trust`` (status ->
    seconds it may still be trusted, by Redis' clock, as of the read) and the channel's
    ``snapshot`` as the read saw it."""

    __slots__ = ("found", "memo", "snapshot", "trust")

    def __init__(self) -> None:
        self.found: dict[str, CachedStatus] = {}
        self.trust: dict[CachedStatus, float] = {}
        self.snapshot: SyncInfo | None = None
        self.memo: dict[bytes, Stamped | None] = {}


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


class NumberHasher:
    """The first 32 hex digits of HMAC-SHA256(secret, channel + ":" + number).

    HMAC as RFC 2104 defines it, from the two padded key states hashed once: a number then
    costs two copies of a sha256 state (C), where copying an ``hmac`` object goes through its
    Python wrapper and took twice as long (hashing was a third of a warm read's CPU). The
    tests check it against :func:`hmac.new`, digit for digit.
    """

    _BLOCK = 64  # SHA-256's block size, in bytes

    def __init__(self, secret: bytes) -> None:
        key = secret if len(secret) <= self._BLOCK else hashlib.sha256(secret).digest()
        key = key.ljust(self._BLOCK, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))
        self._inner_by_channel: dict[str, Any] = {}

    def hash(self, channel: str, number: str) -> str:
        inner = self._inner_by_channel.get(channel)
        if inner is None:
            inner = self._inner.copy()
            inner.update(f"{channel}:".encode())
            self._inner_by_channel[channel] = inner
        inner = inner.copy()
        inner.update(number.encode())
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()[:32]


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
            for chunk in chunks(fields, cache.chunk_size):
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
        self._hasher = NumberHasher(secret)
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
        return self._hasher.hash(channel, number)

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
        read = ChannelRead()
        snapshot_key = self._snapshot_key(channel)
        with self._guard("get"):
            self._redis()
            for chunk in chunks(unique(numbers), self.chunk_size):
                keys = [snapshot_key, *self._status_keys(channel, chunk)]
                self._take(read, chunk, self._get(keys=keys))
        return read.found

    def read_ahead(self, wanted: Mapping[str, Sequence[str]]) -> dict[str, ChannelRead]:
        """:meth:`get_many` of every channel of ``wanted`` in one round trip, each status
        with the seconds it may still be trusted as of the read, and each channel's snapshot
        as the same read saw it (a channel with no numbers: only its snapshot)."""
        from redis.exceptions import NoScriptError

        reads = {channel: ChannelRead() for channel in wanted}
        asked: list[tuple[ChannelRead, Sequence[str], list[str]]] = []
        for channel, numbers in wanted.items():
            snapshot_key = self._snapshot_key(channel)
            for chunk in chunks(unique(numbers), self.chunk_size) if numbers else [()]:
                keys = [snapshot_key, *self._status_keys(channel, chunk)]
                asked.append((reads[channel], chunk, keys))
        with self._guard("get"):
            client = self._redis()
            for attempt in (1, 2):
                pipe = client.pipeline(transaction=False)
                for _, _, keys in asked:
                    # EVALSHA queued by hand: a Script queued on a pipeline first asks
                    # SCRIPT EXISTS, a round trip of its own.
                    pipe.evalsha(self._get.sha, len(keys), *keys)
                try:
                    replies = pipe.execute()
                    break
                except NoScriptError:
                    if attempt == 2:
                        raise
                    # Flushed, or the server restarted: load it, and ask once more.
                    client.script_load(_GET_SCRIPT)
        for (read, chunk, _), reply in zip(asked, replies, strict=True):
            self._take(read, chunk, reply)
        return reads

    def _status_keys(self, channel: str, numbers: Sequence[str]) -> list[str]:
        prefix = f"{self.namespace}bf:s:{channel}:"
        hash_number = self._hasher.hash
        return [prefix + hash_number(channel, n) for n in numbers]

    def _take(self, read: ChannelRead, chunk: Sequence[str], reply: Any) -> None:
        """Add what one ``_GET_SCRIPT`` reply proves about ``chunk`` to ``read``."""
        settings = self.settings
        seconds, micros, meta, count, listed, raws = reply
        now = _server_now(seconds, micros)
        whole = _decode_meta(meta, int(count))
        read.snapshot = None if whole is None else SyncInfo(*whole)
        found = read.found
        trust = read.trust
        # Statuses are shared by every number whose entry holds the same value: each
        # distinct value is decoded, and its freshness checked, once a read.
        fresh: dict[Any, CachedStatus | None] = {None: None}
        for raw in raws:
            if raw not in fresh:
                status = None
                stamped = _decode(raw, read.memo)
                if stamped is not None:
                    entry, stamp = stamped
                    left = seconds_left(ttl_for(settings, entry.blocked), stamp, now)
                    if left > 0:
                        status = entry
                        trust[entry] = min(left, trust.get(entry, left))
                fresh[raw] = status
        if whole is None or listed is None or len(listed) != len(chunk):
            for number, raw in zip(chunk, raws, strict=True):
                status = fresh[raw]
                if status is not None:
                    found[number] = status
            return
        by_list = []
        for in_list in (False, True):
            status = snapshot_status(settings, whole[0], in_list, now)
            if status is not None:
                left = seconds_left(ttl_for(settings, in_list), whole[0], now)
                trust[status] = min(left, trust.get(status, left))
            by_list.append(status)
        combined: dict[tuple[Any, int], CachedStatus | None] = {}
        for number, raw, bit in zip(chunk, raws, listed, strict=True):
            status = combined.get((raw, bit), _UNSEEN)
            if status is _UNSEEN:
                status = combined[raw, bit] = newest(fresh[raw], by_list[bit == 49])
            if status is not None:
                found[number] = status

    def set_many(
        self, channel: str, blocked: Collection[str], clean: Collection[str], fetched_at: float
    ) -> None:
        fetched_at = float(fetched_at)
        age_ms = max(0, math.floor((self.clock() - fetched_at) * 1000))
        values = {kind: _encode(kind, fetched_at) for kind in (False, True)}
        ttl_ms = {kind: math.ceil(ttl_for(self.settings, kind) * 1000) for kind in (False, True)}
        pairs = list(by_kind(blocked, clean))
        with self._guard("set"):
            self._redis()
            for chunk in chunks(pairs, self.chunk_size):
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
            for chunk in chunks(unique(numbers), self.chunk_size):
                got = self._lease(
                    keys=[self._lease_key(channel, number) for number in chunk],
                    args=[self._token, ms],
                )
                held.update(number for number, one in zip(chunk, got, strict=True) if one)
        return held

    def release_leases(self, channel: str, numbers: Sequence[str]) -> None:
        with self._guard("release"):
            self._redis()
            for chunk in chunks(unique(numbers), self.chunk_size):
                keys = [self._lease_key(channel, n) for n in chunk]
                self._release(keys=keys, args=[self._token])

    def wait_for(
        self, channel: str, numbers: Sequence[str], timeout: float
    ) -> dict[str, CachedStatus]:
        deadline = time.monotonic() + timeout
        pending = unique(numbers)
        found: dict[str, CachedStatus] = {}
        pause = POLL_FIRST
        memo: dict[bytes, Stamped | None] = {}
        settings = self.settings
        with self._guard("wait"):
            client = self._redis()
            while True:
                still: list[str] = []
                for chunk in chunks(pending, self.chunk_size):
                    pipe = client.pipeline(transaction=False)
                    pipe.time()
                    pipe.mget([self._status_key(channel, n) for n in chunk])
                    pipe.mget([self._lease_key(channel, n) for n in chunk])
                    (seconds, micros), raws, leases = pipe.execute()
                    now = _server_now(seconds, micros)
                    for number, raw, lease in zip(chunk, raws, leases, strict=True):
                        stamped = _decode(raw, memo)
                        if stamped is not None and (
                            seconds_left(ttl_for(settings, stamped[0].blocked), stamped[1], now) > 0
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
