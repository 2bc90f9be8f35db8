"""The status cache as the pieces of a Kaleyra source use it.

Every call goes through the source's circuit breaker (:mod:`blockfilter.store.guard`): a
failed read answers nothing, so its numbers are asked of the API. Leases are only taken where
other processes share the cache; the process's coalescing registry is the cache's.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Final

from ..sources import CheckOutcome
from ..store.cache import CachedStatus, Clock, MemoryCache, StatusCache, SyncInfo
from ..store.guard import CacheGuard
from .coalesce import registry_for

__all__ = ["CacheAccess"]

# How many cache entries one round trip asks for: big enough to amortise a Redis round trip,
# small enough that a million-number campaign does not hold them all at once.
_CACHE_CHUNK: Final = 10_000


class CacheAccess:
    """``cache`` behind a breaker of its own, with the registry of what the process asks.

    :param clock: epoch seconds now, to tell the age of a stored answer.
    """

    def __init__(self, cache: StatusCache, *, clock: Clock) -> None:
        self.cache = cache
        self.guard = CacheGuard()
        self.inflight = registry_for(cache)
        # Leases only mean something when other processes share the cache.
        self.shared = not isinstance(cache, MemoryCache)
        self._clock = clock

    def answers(self, channel: str, numbers: Sequence[str]) -> tuple[list[CheckOutcome], list[str]]:
        """(what the cache proves, the misses). Every number of a chunk whose read fails is a
        miss: nothing read earlier (a snapshot seen a moment ago) stands in for it."""
        hits: dict[tuple[float, str], list[str]] = defaultdict(list)
        hits_blocked: dict[tuple[float, str], set[str]] = defaultdict(set)
        misses: list[str] = []
        for start in range(0, len(numbers), _CACHE_CHUNK):
            chunk = numbers[start : start + _CACHE_CHUNK]
            found = self.statuses(channel, chunk)
            if not found:  # a cold cache: no number of the chunk to look at one by one
                misses.extend(chunk)
                continue
            for number in chunk:
                status = found.get(number)
                if status is None:
                    misses.append(number)
                    continue
                # Entries fetched together share a timestamp: one outcome per fetch keeps
                # checked_at exact without an object per number.
                key = (status.fetched_at, status.origin)
                hits[key].append(number)
                if status.blocked:
                    hits_blocked[key].add(number)
        outcomes = [
            self.stored(channel, group, frozenset(hits_blocked.get(at, ())), *at)
            for at, group in hits.items()
        ]
        return outcomes, misses

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

    def statuses(self, channel: str, numbers: Sequence[str]) -> dict[str, CachedStatus]:
        return self.guard.call("get", lambda: self.cache.get_many(channel, numbers), {})

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
