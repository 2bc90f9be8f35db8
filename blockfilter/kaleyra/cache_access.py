"""The status cache as the pieces of a Kaleyra source use it.

Every call goes through the source's circuit breaker (:mod:`blockfilter.store.guard`): a
failed read answers nothing, so its numbers are asked of the API. Leases are only taken where
other processes share the cache; the process's coalescing registry is the cache's.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final, Protocol, runtime_checkable

from ..sources import CheckOutcome
from ..store.cache import CachedStatus, Clock, MemoryCache, StatusCache, SyncInfo
from ..store.guard import CacheGuard
from .coalesce import registry_for

__all__ = ["CacheAccess", "ReadsAhead"]

# How many cache entries one round trip asks for: big enough to amortise a Redis round trip,
# small enough that a million-number campaign does not hold them all at once.
_CACHE_CHUNK: Final = 10_000


class _ChannelRead(Protocol):
    found: dict[str, CachedStatus]
    trust: dict[CachedStatus, float]
    snapshot: SyncInfo | None


@runtime_checkable
class ReadsAhead(Protocol):
    """A cache that reads several channels in one round trip and says how long each status
    it gives may still be trusted (:meth:`blockfilter.store.redis.RedisCache.read_ahead`)."""

    def read_ahead(self, wanted: Mapping[str, Sequence[str]]) -> Mapping[str, _ChannelRead]: ...


@dataclass(frozen=True, slots=True)
class _Ahead:
    """One channel's read-ahead: the numbers read, what was found, until when each status
    may be trusted (by the monotonic clock), and the channel's snapshot as read."""

    asked: frozenset[str]
    found: dict[str, CachedStatus]
    until: dict[CachedStatus, float]
    snapshot: SyncInfo | None
    syncs: int  # the channel's syncs by this process before the read


class _Hits:
    """Numbers answered by the cache, grouped by the status object that answers them (a read
    shares one among the numbers it holds for), then by fetch: one outcome per fetch keeps
    ``checked_at`` exact without an object per number."""

    __slots__ = ("_groups",)

    def __init__(self) -> None:
        self._groups: dict[int, tuple[CachedStatus, list[str]]] = {}

    def add(self, number: str, status: CachedStatus) -> None:
        group = self._groups.get(id(status))
        if group is None:
            group = self._groups[id(status)] = (status, [])
        group[1].append(number)

    def outcomes(self, access: CacheAccess, channel: str) -> list[CheckOutcome]:
        by_fetch: dict[tuple[float, str], tuple[list[str], list[str]]] = {}
        for status, numbers in self._groups.values():
            numbers_of, blocked = by_fetch.setdefault((status.fetched_at, status.origin), ([], []))
            numbers_of.extend(numbers)
            if status.blocked:
                blocked.extend(numbers)
        return [
            access.stored(channel, numbers, frozenset(blocked), *at)
            for at, (numbers, blocked) in by_fetch.items()
        ]


class CacheAccess:
    """``cache`` behind a breaker of its own, with the registry of what the process asks.

    :param clock: epoch seconds now, to tell the age of a stored answer.
    :param monotonic: the clock read-ahead statuses expire by.
    """

    def __init__(
        self, cache: StatusCache, *, clock: Clock, monotonic: Clock = time.monotonic
    ) -> None:
        self.cache = cache
        self.guard = CacheGuard()
        self.inflight = registry_for(cache)
        # Leases only mean something when other processes share the cache.
        self.shared = not isinstance(cache, MemoryCache)
        self._clock = clock
        self._monotonic = monotonic
        # Per thread: a worker's threads each run a task of their own.
        self._local = threading.local()
        self._syncs: defaultdict[str, int] = defaultdict(int)

    # -- reading ahead ---------------------------------------------------------------------

    @contextmanager
    def reading_ahead(self, wanted: Mapping[str, Sequence[str]]) -> Iterator[None]:
        """Within the block, :meth:`answers` answers the numbers of ``wanted`` from one read
        made now, in one round trip for every channel (a channel with no numbers: only its
        snapshot, for :meth:`snapshot`). A status read is used only while the read proved it
        fresh (its TTL left as of the read, counted on the monotonic clock from before the
        read); a number the read did not find is a miss (it goes to the API) until a sync of
        its channel ends here; a number not read ahead is read as usual. A failed read reads
        nothing ahead. Without a shared cache that can do it, nothing is read ahead: a
        process's own cache costs no round trip."""
        cache = self.cache
        if not (self.shared and isinstance(cache, ReadsAhead) and wanted):
            yield
            return
        started = self._monotonic()
        reads = self.guard.call("get", lambda: cache.read_ahead(wanted), None)
        ahead: dict[str, _Ahead] = {}
        for channel, read in (reads or {}).items():
            until = {status: started + left for status, left in read.trust.items()}
            asked = frozenset(wanted[channel])
            syncs = self._syncs[channel]
            ahead[channel] = _Ahead(asked, read.found, until, read.snapshot, syncs)
        before = getattr(self._local, "ahead", None)
        self._local.ahead = ahead
        try:
            yield
        finally:
            self._local.ahead = before

    def synced(self, channel: str) -> None:
        """This process synced ``channel`` (or waited for another's sync): what was read
        ahead of it misses the snapshot just written, and is read again."""
        self._syncs[channel] += 1

    def _ahead(self, channel: str) -> _Ahead | None:
        ahead: dict[str, _Ahead] | None = getattr(self._local, "ahead", None)
        read = None if ahead is None else ahead.get(channel)
        if read is None or read.syncs != self._syncs[channel]:
            return None
        return read

    def snapshot_read_ahead(self, channel: str) -> tuple[bool, SyncInfo | None]:
        """(whether the channel's snapshot was read ahead, what the read saw)."""
        ahead = self._ahead(channel)
        return (False, None) if ahead is None else (True, ahead.snapshot)

    def _answer_ahead(
        self, channel: str, numbers: Sequence[str], hits: _Hits, misses: list[str]
    ) -> Sequence[str]:
        """Sort ``numbers`` by what the read-ahead still proves: hits, misses (read a moment
        ago and not there), and the numbers to read now, returned."""
        ahead = self._ahead(channel)
        if ahead is None:
            return numbers
        now = self._monotonic()
        asked, found = ahead.asked, ahead.found
        # By identity: the read shares one status object among the numbers it holds for, and
        # hashing a status a number would cost more than the rest of the loop.
        trusted = {id(status) for status, until in ahead.until.items() if until > now}
        unread: list[str] = []
        for number in numbers:
            status = found.get(number)  # only numbers asked are found
            if status is None:
                (misses if number in asked else unread).append(number)
            elif id(status) in trusted:
                hits.add(number, status)
            else:
                unread.append(number)  # trusted no longer: read again
        return unread

    def answers(self, channel: str, numbers: Sequence[str]) -> tuple[list[CheckOutcome], list[str]]:
        """(what the cache proves, the misses). Every number of a chunk whose read fails is a
        miss: nothing read earlier (a snapshot seen a moment ago) stands in for it. A number
        read ahead was read by a read that did not fail, and is answered from it while that
        read proves it (:meth:`reading_ahead`)."""
        hits = _Hits()
        misses: list[str] = []
        unread = self._answer_ahead(channel, numbers, hits, misses)
        for start in range(0, len(unread), _CACHE_CHUNK):
            chunk = unread[start : start + _CACHE_CHUNK]
            found = self._read(channel, chunk)
            if not found:  # a cold cache: no number of the chunk to look at one by one
                misses.extend(chunk)
                continue
            for number in chunk:
                status = found.get(number)
                if status is None:
                    misses.append(number)
                else:
                    hits.add(number, status)
        return hits.outcomes(self, channel), misses

    def stored(
        self,
        channel: str,
        numbers: list[str],
        blocked: frozenset[str],
        fetched_at: float,
        origin: str = "cache",
    ) -> CheckOutcome:
        """The outcome of statuses read from the cache (``origin`` ``cache`` or ``snapshot``),
        with their age now: how old the answer is that a verdict relies on."""
        age = round(max(0.0, self._clock() - fetched_at), 3)
        return CheckOutcome(
            channel, numbers, blocked, fetched_at, origin=origin, provenance={"age_s": age}
        )

    def _read(self, channel: str, numbers: Sequence[str]) -> dict[str, CachedStatus]:
        nothing: dict[str, CachedStatus] = {}
        return self.guard.call("get", lambda: self.cache.get_many(channel, numbers), nothing)

    def snapshot(self, channel: str) -> SyncInfo | None:
        return self.guard.call("snapshot", lambda: self.cache.snapshot_info(channel), None)

    def lease(self, channel: str, numbers: Sequence[str], seconds: float) -> set[str] | None:
        """The numbers whose lease this process now holds; ``None`` when no other process
        shares the cache, or it could not be asked."""
        if not self.shared:
            return None
        return self.guard.call(
            "lease", lambda: self.cache.acquire_leases(channel, numbers, seconds), None
        )

    def release(self, channel: str, numbers: Sequence[str]) -> None:
        self.guard.call("release", lambda: self.cache.release_leases(channel, numbers), None)

    def wait_for(
        self, channel: str, numbers: Sequence[str], timeout: float
    ) -> dict[str, CachedStatus]:
        return self.guard.call("wait", lambda: self.cache.wait_for(channel, numbers, timeout), {})
