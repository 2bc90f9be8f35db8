"""Kaleyra as a blocklist source: the fewest requests that answer a campaign, many in flight.

For each channel a campaign needs, numbers go through these steps:

1. **The cache** answers what it can prove: fresh entries, and the channel's snapshot (a
   synced whole list) while it is whole and young enough (see :mod:`blockfilter.cache`). A
   failed read answers nothing: its numbers go on to the next steps.
2. **The strategy**: looking the misses up costs ``ceil(misses / 100)`` requests; paging the
   whole blocklist into the cache costs ``size // 100 + 1`` pages, ``size`` being what the last
   sync found. The cheaper one is used (ties go to lookups, which give fresher answers). With
   no size known, numbers are looked up, unless the source was made with ``strategy="sync"``.
3. **Coalescing**: a number some other filter of this process is already asking about is
   waited for instead of asked again; so is one whose Redis lease another process holds
   (``StatusCache.acquire_leases``). Only then are the numbers packed 100 to a request, so
   the numbers dropped do not leave requests half empty.
4. **Requests** run on a bounded thread pool (``BLOCKFILTER_CONCURRENCY``), paced by the
   fleet-wide rate limit (:mod:`blockfilter.ratelimit`), and outcomes are yielded as they
   complete.

A waited-for number whose owner gave up (its lease vanished without an answer, or the wait
outlived the lease) is looked up after all: coalescing saves requests, it never costs an
answer.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Final, TypeVar

from ..config import CHANNELS, Settings
from ..errors import ConfigError, CredentialsRefused, RequestBudgetExhausted
from ..model import MAX_NUMBERS_PER_REQUEST, channel_named
from ..sources import BaseSource, CheckOutcome, SourceStats
from ..store.cache import (
    CachedStatus,
    CacheUnavailable,
    Clock,
    MemoryCache,
    StatusCache,
    open_cache,
)
from ..store.ratelimit import build_limiter
from .client import KaleyraClient, RequestLimiter
from .sync import SyncProgress, SyncResult, check_eviction_policy, sync_channel, sync_pages

log = logging.getLogger("blockfilter.kaleyra")

# Seconds a status cache that failed is left alone before it is tried again.
CACHE_RETRY_AFTER_S = 5.0
# How many cache entries one round trip asks for: big enough to amortise a Redis round trip,
# small enough that a million-number campaign does not hold them all at once.
_CACHE_CHUNK = 10_000
# Added to the longest a request can take (its retry budget plus one attempt) to get how long
# a lease is held: covers the wait in the submission queue and a slow cache write.
_LEASE_SLACK = 5.0
# The lease of a whole-list sync: a sync takes many requests, and others wait for it.
_SYNC_LEASE_MIN = 60.0
# What a sync's lease is taken on: a name no phone number can have (it is hashed anyway).
_SYNC_LEASE = "#sync"
# How often a stream looks at what it waits for when nothing else wakes it.
_POLL = 0.02

STRATEGIES: Final = ("auto", "lookup", "sync")

# Caches whose eviction policy was reported, so a long-lived process says it once.
_POLICY_REPORTED: set[str] = set()

T = TypeVar("T")


class RequestBudget:
    """A limiter that lets at most ``limit`` API requests (attempts) through, then refuses.

    Backs ``blockfilter filter --max-requests N``: requests past N are not made, and the
    numbers they would have checked are deferred.
    """

    def __init__(self, limit: int, then: RequestLimiter | None = None) -> None:
        self.limit = limit
        self._then = then
        self._used = 0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            if self._used >= self.limit:
                raise RequestBudgetExhausted(f"the request budget of {self.limit} is spent")
            self._used += 1
        if self._then is not None:
            self._then.acquire()

    def penalize(self, seconds: float) -> None:
        if self._then is not None:
            self._then.penalize(seconds)


# -- in-process coalescing -----------------------------------------------------------------


class _Flight:
    """Numbers one stream claimed to look up; others in the process wait for it to land."""

    __slots__ = ("done", "left", "results")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.left = 0
        # number -> the outcome of the request that answered it (shared per request).
        self.results: dict[str, CheckOutcome] = {}


class _InFlight:
    """What the process is asking about right now, shared by every source on one cache.

    A (channel, number) is in here from the moment a stream claims it until its answer is in
    the cache; a whole-list sync of a channel, until it ends.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._claims: dict[tuple[str, str], _Flight] = {}
        self.syncs: dict[str, Future[SyncResult]] = {}

    def claim(
        self, channel: str, numbers: Iterable[str]
    ) -> tuple[_Flight, list[str], dict[_Flight, list[str]]]:
        """Claim the numbers nobody in the process is asking about; group the others by the
        flight that will answer them."""
        flight = _Flight()
        mine: list[str] = []
        theirs: dict[_Flight, list[str]] = {}
        claims = self._claims
        with self.lock:
            for number in numbers:
                key = (channel, number)
                other = claims.get(key)
                if other is None:
                    claims[key] = flight
                    mine.append(number)
                else:
                    theirs.setdefault(other, []).append(number)
            flight.left = len(mine)
            if not mine:
                flight.done.set()
        return flight, mine, theirs

    def answer(self, channel: str, numbers: Iterable[str], outcome: CheckOutcome) -> None:
        """The answer for claimed numbers is known: wake those waiting for it. The claims stay
        until :meth:`forget`, so that a newcomer waits for the answer instead of asking again
        while it is on its way into the cache."""
        claims = self._claims
        with self.lock:
            for number in numbers:
                flight = claims.get((channel, number))
                if flight is None or number in flight.results:
                    continue
                flight.results[number] = outcome
                flight.left -= 1
                if flight.left <= 0:
                    flight.done.set()

    def forget(self, channel: str, numbers: Iterable[str]) -> None:
        """The answer is in the cache (or could not be put there): drop the claims."""
        claims = self._claims
        with self.lock:
            for number in numbers:
                claims.pop((channel, number), None)

    def resolve(self, channel: str, numbers: Sequence[str], outcome: CheckOutcome) -> None:
        """:meth:`answer` and :meth:`forget` at once, for answers already in the cache."""
        self.answer(channel, numbers, outcome)
        self.forget(channel, numbers)


_REGISTRIES: weakref.WeakKeyDictionary[Any, _InFlight] = weakref.WeakKeyDictionary()
_REGISTRIES_LOCK = threading.Lock()


def _registry_for(cache: StatusCache) -> _InFlight:
    # Keyed by the cache object: sources sharing a cache (the shared one and a --max-requests
    # one) coalesce with each other.
    with _REGISTRIES_LOCK:
        registry = _REGISTRIES.get(cache)
        if registry is None:
            registry = _REGISTRIES[cache] = _InFlight()
        return registry


def _ceil_div(count: int, size: int = MAX_NUMBERS_PER_REQUEST) -> int:
    return -(-count // size)


# -- the source ----------------------------------------------------------------------------


class KaleyraSource(BaseSource):
    """Checks numbers against Kaleyra's blocklist, through the status cache.

    :param settings: the effective settings (credentials are required).
    :param client: an existing client to share; made from ``settings`` when omitted.
    :param cache: an existing status cache; opened from ``settings.cache_url`` when omitted.
    :param max_requests: stop making API requests after this many (``--max-requests``).
    :param limiter: paces the client's requests; built from ``settings`` when omitted (the
        fleet-wide ``BLOCKFILTER_RATE_LIMIT`` and 429 pause, see
        :func:`~blockfilter.ratelimit.build_limiter`).
    :param strategy: ``auto`` (the cheaper of lookup and sync, lookup while the list's size is
        unknown), ``lookup`` (never sync) or ``sync`` (page the whole list for any miss).
    :param remember: ``False``: answers are not written to a ``memory://`` cache. For a
        process that runs one campaign and ends (``blockfilter filter``): a run never asks
        about a (channel, number) twice, and a million-number campaign would otherwise hold
        some 220 MB of entries nobody reads. A shared (Redis) cache is always written: other
        processes read it.
    :param clock: epoch seconds now, for the times answers are stamped with (tests inject one);
        handed to the cache it opens.

    :meth:`close` stops its threads, and closes the client when the source made it.
    """

    name = "kaleyra"

    def __init__(
        self,
        settings: Settings,
        *,
        client: KaleyraClient | None = None,
        cache: StatusCache | None = None,
        max_requests: int | None = None,
        limiter: RequestLimiter | None = None,
        strategy: str = "auto",
        remember: bool = True,
        clock: Clock | None = None,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
        self.settings = settings
        self.strategy = strategy
        if limiter is None and client is None:
            limiter = build_limiter(settings)
        if max_requests is not None:
            limiter = RequestBudget(max_requests, then=limiter)
        self._owns_client = client is None
        self.client = client or KaleyraClient(settings, limiter=limiter)
        self.clock: Clock = clock or time.time
        self.cache = cache if cache is not None else open_cache(settings, clock=clock)
        # Leases only mean something when other processes share the cache.
        self._shared_cache = not isinstance(self.cache, MemoryCache)
        self._remember = remember
        self._inflight = _registry_for(self.cache)
        # While the cache is down (monotonic time until which it is left alone): a worker
        # lives long, so a Redis blip must not turn the shared cache off for good.
        self._cache_down_until = 0.0
        self._requests_before = self.client.stats.requests
        self._cache_hits = 0
        self._refused: CredentialsRefused | None = None
        self._sizes: dict[str, int] = {}  # list sizes learnt from syncs, per channel
        self._sync_safe: bool | None = None  # whether the cache keeps a snapshot once written
        self._pool: ThreadPoolExecutor | None = None
        self._waiters: ThreadPoolExecutor | None = None
        self._syncers: ThreadPoolExecutor | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._writes: set[Future[None]] = set()
        self._lock = threading.Lock()

    @property
    def refused(self) -> CredentialsRefused | None:
        """The refusal of the credentials or the account this source met, if any: it then
        answers every later number with it, without asking."""
        return self._refused

    def renewed(self) -> KaleyraSource:
        """A source that asks again (a refusal is remembered for a source's whole life), on
        this one's client and cache; the client becomes the new source's to close."""
        fresh = KaleyraSource(
            self.settings, client=self.client, cache=self.cache, strategy=self.strategy
        )
        fresh._owns_client, self._owns_client = self._owns_client, False
        return fresh

    def with_budget(self, max_requests: int) -> KaleyraSource:
        """A source of its own that makes at most ``max_requests`` API requests. The budget
        lives in the client, so it gets a client of its own; the status cache and the rate
        limiter are this one's."""
        return KaleyraSource(
            self.settings,
            cache=self.cache,
            max_requests=max_requests,
            limiter=self.client.limiter,
            strategy=self.strategy,
            clock=self.clock,
        )

    def one_shot(self) -> None:
        # A one-shot run never reads back a memory:// cache: the filter already holds every
        # answer once. (A shared Redis cache is written all the same.)
        self.remember = False

    @property
    def remember(self) -> bool:
        """Whether answers are written to the cache (always, to a shared one); settable, so a
        one-shot command can turn it off on a source it did not make."""
        return self._remember or self._shared_cache

    @remember.setter
    def remember(self, value: bool) -> None:
        self._remember = value

    # -- the cache, which the filter must survive losing -----------------------------------

    @property
    def _cache_ok(self) -> bool:
        return time.monotonic() >= self._cache_down_until

    def _cache_call(self, what: str, call: Callable[[], T], default: T) -> T:
        if not self._cache_ok:
            return default
        try:
            return call()
        except CacheUnavailable as exc:
            # Going on without the cache costs requests, never correctness: every number it
            # would have answered is asked of the API instead. It is tried again after a
            # while; the threads that fail together report it once.
            with self._lock:
                first = self._cache_ok
                self._cache_down_until = time.monotonic() + CACHE_RETRY_AFTER_S
            if first:
                log.warning(
                    "status cache unavailable (%s); going on without it for %.0f s: %s",
                    what,
                    CACHE_RETRY_AFTER_S,
                    exc,
                )
            return default

    def known_size(self, channel: str) -> int | None:
        """The channel's blocklist size as the last sync found it, if any sync is known."""
        snapshot = self._cache_call("snapshot", lambda: self.cache.snapshot_info(channel), None)
        if snapshot is not None:
            self._sizes[channel] = snapshot.size
            return snapshot.size
        return self._sizes.get(channel)

    def _from_cache(
        self, channel: str, numbers: Sequence[str]
    ) -> tuple[list[CheckOutcome], list[str]]:
        """(what the cache proves, the misses). Every number of a chunk whose read fails is a
        miss: nothing read earlier (a snapshot seen a moment ago) stands in for it."""
        hits: dict[tuple[float, str], list[str]] = defaultdict(list)
        hits_blocked: dict[tuple[float, str], set[str]] = defaultdict(set)
        misses: list[str] = []
        for start in range(0, len(numbers), _CACHE_CHUNK):
            chunk = numbers[start : start + _CACHE_CHUNK]
            found = self._cached_statuses(channel, chunk)
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
            self._stored(channel, group, frozenset(hits_blocked.get(at, ())), *at)
            for at, group in hits.items()
        ]
        return outcomes, misses

    def _stored(
        self,
        channel: str,
        numbers: list[str],
        blocked: frozenset[str],
        fetched_at: float,
        origin: str = "cache",
    ) -> CheckOutcome:
        """The outcome of statuses read from the cache (``origin`` ``cache`` or ``snapshot``),
        with their age now: how old the answer is that a verdict relies on."""
        age = round(max(0.0, self.clock() - fetched_at), 3)
        return CheckOutcome(
            channel, numbers, blocked, fetched_at, origin=origin, provenance={"age_s": age}
        )

    def _cached_statuses(self, channel: str, numbers: Sequence[str]) -> dict[str, CachedStatus]:
        return self._cache_call("get", lambda: self.cache.get_many(channel, numbers), {})

    def _count_hits(self, count: int) -> None:
        with self._lock:
            self._cache_hits += count

    # -- the strategy ------------------------------------------------------------------------

    def can_sync(self) -> bool:
        """Whether a sync can answer anything: the cache works, keeps both kinds, and keeps a
        snapshot once written (its eviction policy)."""
        return (
            self._cache_ok
            and self.settings.cache_ttl > 0
            and self.settings.cache_ttl_blocked > 0
            and self._keeps_snapshots()
        )

    def _keeps_snapshots(self) -> bool:
        if self._sync_safe is None:
            try:
                check_eviction_policy(self.cache)
            except CacheUnavailable:
                return False  # asked again next time
            except ConfigError as exc:
                self._sync_safe = False
                where = repr(self.cache)
                if where not in _POLICY_REPORTED:
                    _POLICY_REPORTED.add(where)
                    log.warning("not syncing whole lists: %s; numbers are looked up", exc)
            else:
                self._sync_safe = True
        return self._sync_safe

    def sync_cost(self, channel: str) -> int | None:
        """Pages a sync of ``channel`` would take, or ``None`` when the strategy would never
        choose one (lookups only, the size unknown in ``auto``, or the cache cannot keep it)."""
        if self.strategy == "lookup" or not self.can_sync():
            return None
        size = self.known_size(channel)
        if size is None:
            # Forced with no size known: the least a sync can cost.
            return sync_pages(0) if self.strategy == "sync" else None
        return sync_pages(size)

    def _cost(self, channel: str, misses: int) -> int:
        if misses == 0:
            return 0
        lookups = _ceil_div(misses)
        pages = self.sync_cost(channel)
        if pages is None:
            return lookups
        if self.strategy == "sync":
            return pages
        return min(lookups, pages)

    def estimate_requests(self, wanted: Mapping[str, Sequence[str]]) -> int:
        """The requests :meth:`check_many` would make for ``wanted`` now: per channel, the
        cache's misses packed 100 to a request, or the pages of a sync if that is cheaper.
        Reads the cache; asks the API nothing. Exact while the cache and the blocklist's size
        stay as they are and no other process is asking about the same numbers."""
        total = 0
        for channel, numbers in wanted.items():
            _, misses = self._from_cache(channel, numbers)
            total += self._cost(channel, len(misses))
        return total

    # -- the whole-list sync -----------------------------------------------------------------

    def sync(self, channel: str, *, progress: SyncProgress | None = None) -> SyncResult:
        """Page ``channel``'s whole blocklist into the cache now (``blockfilter sync``).

        Coalesced: a sync of the channel already running in this process is joined, and one
        running in another process (it holds the channel's sync lease) is waited for; its
        result is then read from its mark, with ``pages == 0``.

        :raises UpstreamError: a page failed; :raises RequestBudgetExhausted: as any request.
        """
        channel = channel_named(channel)
        registry = self._inflight
        with registry.lock:
            running = registry.syncs.get(channel)
            if running is not None and not running.done():
                mine = False
            else:
                running = registry.syncs[channel] = Future()
                mine = True
        if not mine:
            return running.result()
        try:
            result = self._sync_across_processes(channel, progress)
        except BaseException as exc:
            running.set_exception(exc)
            raise
        else:
            running.set_result(result)
            return result
        finally:
            with registry.lock:
                if registry.syncs.get(channel) is running:
                    del registry.syncs[channel]

    def _sync_lease_seconds(self) -> float:
        return max(_SYNC_LEASE_MIN, 2 * self._lease_seconds())

    def _sync_across_processes(self, channel: str, progress: SyncProgress | None) -> SyncResult:
        cache = self.cache
        before = self._cache_call("snapshot", lambda: cache.snapshot_info(channel), None)
        lease_s = self._sync_lease_seconds()
        deadline = time.monotonic() + lease_s
        while self._shared_cache:
            held = self._cache_call(
                "lease", lambda: cache.acquire_leases(channel, [_SYNC_LEASE], lease_s), None
            )
            # Another process may be paging this list right now, or have just finished (and
            # let go of the lease): its mark then answers for us.
            mark = self._cache_call("snapshot", lambda: cache.snapshot_info(channel), None)
            if mark is not None and (before is None or mark.synced_at > before.synced_at):
                if held:
                    self._cache_call(
                        "release", lambda: cache.release_leases(channel, [_SYNC_LEASE]), None
                    )
                self._sizes[channel] = mark.size
                return SyncResult(mark.synced_at, mark.size, channel=channel, marked=True)
            if held is None or _SYNC_LEASE in held:
                break
            if time.monotonic() >= deadline:
                break  # its lease should have run out: sync ourselves
            time.sleep(0.1)
        try:
            result = self._sync_now(channel, progress)
        finally:
            if self._shared_cache:
                self._cache_call(
                    "release", lambda: cache.release_leases(channel, [_SYNC_LEASE]), None
                )
        return result

    def _sync_now(self, channel: str, progress: SyncProgress | None) -> SyncResult:
        try:
            result = sync_channel(
                self.client,
                self.cache,
                channel,
                expected_size=self.known_size(channel),
                executor=self._executor(),
                progress=progress,
            )
        except CredentialsRefused as exc:
            self._refused = exc
            raise
        self._sizes[channel] = result.size
        return result

    # -- requests ------------------------------------------------------------------------

    def _lease_seconds(self) -> float:
        """How long a lease on numbers is held: the longest one request can take, plus the
        wait of a full submission queue at the rate limit."""
        settings = self.settings
        queued = 0.0
        if settings.rate_limit:
            queued = settings.concurrency * 4 / settings.rate_limit
        return settings.retry_deadline + settings.request_timeout + _LEASE_SLACK + queued

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=self.settings.concurrency, thread_name_prefix="blockfilter-check"
                )
            return self._pool

    def _wait_executor(self) -> ThreadPoolExecutor:
        # Waiting for other processes' answers is kept off the request pool: a full pool of
        # waiters would stall the requests they wait for.
        with self._lock:
            if self._waiters is None:
                self._waiters = ThreadPoolExecutor(
                    max_workers=4, thread_name_prefix="blockfilter-wait"
                )
            return self._waiters

    def _sync_executor(self) -> ThreadPoolExecutor:
        # A sync waits for its pages on the request pool, so it must not run on it.
        with self._lock:
            if self._syncers is None:
                self._syncers = ThreadPoolExecutor(
                    max_workers=len(CHANNELS), thread_name_prefix="blockfilter-sync"
                )
            return self._syncers

    def _fetch(self, channel: str, batch: list[str]) -> CheckOutcome:
        outcome = self._ask(channel, batch)
        self._inflight.answer(channel, batch, outcome)
        if self._shared_cache and self._write_later(channel, batch, outcome):
            return outcome
        self._write(channel, batch, outcome)
        return outcome

    def _write_later(self, channel: str, batch: list[str], outcome: CheckOutcome) -> bool:
        """Hand the cache write to the writer thread, so this request thread goes back to
        asking at once (a Redis write costs a millisecond or two of a request's cycle); or
        ``False`` when the writer is behind, and the caller writes itself."""
        with self._lock:
            if len(self._writes) >= self.settings.concurrency * 4:
                return False
            if self._writer is None:
                self._writer = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="blockfilter-write"
                )
            future = self._writer.submit(self._write, channel, batch, outcome)
            self._writes.add(future)
        future.add_done_callback(self._written)
        return True

    def _written(self, future: Future[None]) -> None:
        with self._lock:
            self._writes.discard(future)

    def flush_writes(self) -> None:
        """Wait until every answer received so far is in the cache (or given up on)."""
        with self._lock:
            pending = list(self._writes)
        wait(pending)

    def _write(self, channel: str, batch: list[str], outcome: CheckOutcome) -> None:
        stored = False
        try:
            if outcome.error is None and self.remember:
                blocked_set = outcome.blocked
                clean = [n for n in batch if n not in blocked_set]
                at = outcome.checked_at or self.clock()
                stored = self._cache_call(
                    "set", lambda: self._store(channel, blocked_set, clean, at), False
                )
            if self._shared_cache and not stored:
                # With the answers in the cache, the leases are moot (those waiting see the
                # answers first, and the leases run out long before the answers do): giving
                # them back would only cost a round trip per request. Without answers, others
                # must know at once that they have to ask themselves.
                self._cache_call("release", lambda: self.cache.release_leases(channel, batch), None)
        except Exception:  # a bug here must not lose the answer, which is already given
            log.exception("writing %d answers on %s to the cache failed", len(batch), channel)
        finally:
            self._inflight.forget(channel, batch)

    def _store(self, channel: str, blocked: frozenset[str], clean: list[str], at: float) -> bool:
        """Write a request's answers; whether every one of them is now in the cache."""
        self.cache.set_many(channel, blocked, clean, at)
        settings = self.settings
        return (not clean or settings.cache_ttl > 0) and (
            not blocked or settings.cache_ttl_blocked > 0
        )

    def _ask(self, channel: str, batch: list[str]) -> CheckOutcome:
        if self._refused is not None:
            # The account is refused: asking again would only be refused again.
            return CheckOutcome(channel, batch, error=self._refused)
        try:
            blocked = self.client.blocked_batch(channel, batch)
        except CredentialsRefused as exc:
            self._refused = exc
            return CheckOutcome(channel, batch, error=exc)
        except Exception as exc:  # every failure marks the batch unchecked; the filter decides
            return CheckOutcome(channel, batch, error=exc)
        return CheckOutcome(channel, batch, frozenset(blocked), self.clock(), origin="api")

    def _wait_remote(
        self, channel: str, numbers: list[str]
    ) -> tuple[dict[str, CachedStatus], list[str]]:
        """Wait for numbers other processes hold the leases of: (what appeared, the rest)."""
        found: dict[str, CachedStatus] = self._cache_call(
            "wait", lambda: self.cache.wait_for(channel, numbers, self._lease_seconds()), {}
        )
        return found, [n for n in numbers if n not in found]

    def stream(self) -> _KaleyraStream:
        """A stream: cache hits answered at once, misses sent 100 at a time as they come."""
        return _KaleyraStream(self)

    def check_many(self, wanted: Mapping[str, Sequence[str]]) -> Iterator[CheckOutcome]:
        stream = self.stream()
        for channel, numbers in wanted.items():
            stream.add(channel, numbers)
            yield from stream.completed()
        yield from stream.finish()

    def stats(self) -> SourceStats:
        return SourceStats(
            requests=self.client.stats.requests - self._requests_before,
            cache_hits=self._cache_hits,
        )

    def close(self) -> None:
        with self._lock:
            pools = [self._pool, self._waiters, self._syncers]
            self._pool = self._waiters = self._syncers = None
            writer, self._writer = self._writer, None
        for pool in pools:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        if writer is not None:
            writer.shutdown(wait=True)  # answers already paid for are not thrown away
        if self._owns_client:
            self.client.close()

    def __repr__(self) -> str:
        return f"KaleyraSource({self.client!r}, strategy={self.strategy!r})"


# -- a stream ------------------------------------------------------------------------------

_LOOKUP, _UNDECIDED, _SYNCING = 0, 1, 2


class _Plan:
    """How one stream answers one channel."""

    __slots__ = ("buffer", "carry", "held", "mode", "pages", "sync")

    def __init__(self, mode: int, pages: int | None) -> None:
        self.mode = mode
        self.pages = pages
        self.buffer: list[str] = []  # misses not yet given to a strategy
        self.carry: list[str] = []  # claimed misses waiting for a full request
        self.held: list[str] = []  # misses the running sync will answer
        self.sync: Future[SyncResult] | None = None


class _KaleyraStream:
    """Answers numbers while they keep arriving: cache first, then the cheaper strategy.

    Claimed misses are carried over between :meth:`add` calls so only the last request of a
    channel can be short. At most a few requests per pool thread are queued ahead: past that,
    :meth:`add` waits, which keeps a million-number campaign from holding every batch at once.
    With the list's size known, misses are held until their count says which strategy is
    cheaper (at most as many as the list holds): sync as soon as lookups would cost more,
    lookups at :meth:`finish` otherwise.
    """

    def __init__(self, source: KaleyraSource) -> None:
        self._source = source
        self._plans: dict[str, _Plan] = {}
        self._pending: set[Future[CheckOutcome]] = set()
        self._remote: dict[Future[tuple[dict[str, CachedStatus], list[str]]], str] = {}
        self._awaiting: list[tuple[_Flight, str, list[str], float]] = []
        self._ready: list[CheckOutcome] = []
        self._window = source.settings.concurrency * 4

    # -- the CheckStream protocol --------------------------------------------------------

    def add(self, channel: str, numbers: Sequence[str]) -> None:
        source = self._source
        plan = self._plan(channel)
        hits, misses = source._from_cache(channel, numbers)
        if hits:
            source._count_hits(sum(len(outcome.numbers) for outcome in hits))
            self._ready.extend(hits)
        if not misses:
            return
        if plan.mode == _LOOKUP:
            self._lookup(channel, misses)
        elif plan.mode == _SYNCING:
            plan.held.extend(misses)
        else:
            plan.buffer.extend(misses)
            if plan.pages is not None and _ceil_div(len(plan.buffer)) > plan.pages:
                self._start_sync(channel, plan)

    def completed(self) -> Iterator[CheckOutcome]:
        self._poll()
        done = {future for future in self._pending if future.done()}
        self._pending -= done
        ready, self._ready = self._ready, []
        ready.extend(future.result() for future in done)
        return iter(ready)

    def finish(self) -> Iterator[CheckOutcome]:
        for channel, plan in self._plans.items():
            if plan.mode == _UNDECIDED:
                # The campaign ended before lookups cost more than a sync: look them up.
                plan.mode = _LOOKUP
                buffered, plan.buffer = plan.buffer, []
                self._lookup(channel, buffered)
        while True:
            self._flush()
            yield from self.completed()
            if not (self._pending or self._remote or self._awaiting or self._syncing()):
                if not any(plan.carry for plan in self._plans.values()):
                    # Every answer in the cache before the run ends: the next run, here or
                    # in another process, must find them.
                    self._source.flush_writes()
                    return
                continue
            waitables: list[Future[Any]] = [*self._pending, *self._remote]
            waitables.extend(plan.sync for plan in self._plans.values() if plan.sync is not None)
            timeout = _POLL if self._awaiting or not waitables else None
            if waitables:
                wait(waitables, timeout=timeout, return_when=FIRST_COMPLETED)
            else:
                time.sleep(_POLL)

    # -- planning ------------------------------------------------------------------------

    def _plan(self, channel: str) -> _Plan:
        plan = self._plans.get(channel)
        if plan is None:
            source = self._source
            pages = source.sync_cost(channel)
            if pages is None:
                plan = _Plan(_LOOKUP, None)
            elif source.strategy == "sync":
                plan = _Plan(_UNDECIDED, 0)  # any miss starts the sync
            else:
                plan = _Plan(_UNDECIDED, pages)
            self._plans[channel] = plan
        return plan

    def _start_sync(self, channel: str, plan: _Plan) -> None:
        plan.mode = _SYNCING
        plan.held, plan.buffer = plan.buffer, []
        source = self._source
        plan.sync = source._sync_executor().submit(source.sync, channel)

    def _syncing(self) -> bool:
        return any(plan.sync is not None for plan in self._plans.values())

    def _synced(self, channel: str, plan: _Plan) -> None:
        """The channel's sync ended: answer what it held, and go on by the cache."""
        assert plan.sync is not None
        future, plan.sync = plan.sync, None
        held, plan.held = plan.held, []
        plan.mode = _LOOKUP
        error = future.exception()
        if error is not None:
            if not isinstance(error, Exception):
                raise error
            # A failed sync leaves no snapshot: what it would have answered is looked up (a
            # refused account or a spent request budget then fails those lookups in turn).
            log.warning("sync of %s failed (%s); its numbers are looked up", channel, error)
            self._lookup(channel, held)
            return
        hits, misses = self._source._from_cache(channel, held)
        if hits:
            self._source._count_hits(sum(len(outcome.numbers) for outcome in hits))
            self._ready.extend(hits)
        if misses:
            # The sync could not vouch for absent numbers (see blockfilter.sync): look them,
            # and every later miss, up.
            self._lookup(channel, misses)
        elif plan.pages is not None:
            # The mark answers misses for the clean TTL; a campaign that outlasts it may need
            # another sync, chosen as the first was.
            result = future.result()
            plan.mode = _UNDECIDED
            if self._source.strategy != "sync":
                plan.pages = sync_pages(result.size)

    # -- lookups -------------------------------------------------------------------------

    def _lookup(self, channel: str, numbers: list[str], *, ours: bool = False) -> None:
        """Claim the numbers, lease them, and pack those that are ours into full requests.

        ``ours``: numbers this stream must ask about itself whoever else is (what others
        left unanswered); they are still leased, so that others can wait for us.
        """
        source = self._source
        if ours:
            mine = numbers
        else:
            _, mine, theirs = source._inflight.claim(channel, numbers)
            deadline = time.monotonic() + source._lease_seconds()
            for flight, waited in theirs.items():
                self._awaiting.append((flight, channel, waited, deadline))
        if source._shared_cache and mine:
            lease_s = source._lease_seconds()
            leased = mine
            held = source._cache_call(
                "lease", lambda: source.cache.acquire_leases(channel, leased, lease_s), None
            )
            if not ours and held is not None and len(held) < len(mine):
                others = [n for n in mine if n not in held]
                mine = [n for n in mine if n in held]
                waiting = source._wait_executor().submit(source._wait_remote, channel, others)
                self._remote[waiting] = channel
        carry = self._plans[channel].carry
        carry.extend(mine)
        while len(carry) >= MAX_NUMBERS_PER_REQUEST:
            self._submit(channel, carry[:MAX_NUMBERS_PER_REQUEST])
            del carry[:MAX_NUMBERS_PER_REQUEST]

    def _flush(self) -> None:
        for channel, plan in self._plans.items():
            while plan.carry:
                self._submit(channel, plan.carry[:MAX_NUMBERS_PER_REQUEST])
                del plan.carry[:MAX_NUMBERS_PER_REQUEST]

    def _submit(self, channel: str, batch: list[str]) -> None:
        while len(self._pending) >= self._window:
            done, self._pending = wait(self._pending, return_when=FIRST_COMPLETED)
            self._ready.extend(future.result() for future in done)
        source = self._source
        self._pending.add(source._executor().submit(source._fetch, channel, batch))

    # -- what others answer --------------------------------------------------------------

    def _poll(self) -> None:
        """Take in, without waiting, whatever others answered and every sync that ended."""
        for channel, plan in self._plans.items():
            if plan.sync is not None and plan.sync.done():
                self._synced(channel, plan)
        if self._remote:
            for future in [f for f in self._remote if f.done()]:
                channel = self._remote.pop(future)
                found, rest = future.result()
                self._take_remote(channel, found, rest)
        if self._awaiting:
            still = []
            now = time.monotonic()
            for item in self._awaiting:
                flight, channel, numbers, deadline = item
                if flight.done.is_set():
                    self._take_flight(channel, numbers, flight)
                elif now >= deadline:
                    # Its owner never answered (a stream abandoned mid-run): ask ourselves.
                    self._lookup(channel, numbers, ours=True)
                else:
                    still.append(item)
            self._awaiting = still

    def _take_remote(self, channel: str, found: dict[str, CachedStatus], rest: list[str]) -> None:
        source = self._source
        if found:
            by_time: dict[float, list[str]] = defaultdict(list)
            for number, status in found.items():
                by_time[status.fetched_at].append(number)
            for at, group in by_time.items():
                outcome = source._stored(
                    channel, group, frozenset(n for n in group if found[n].blocked), at
                )
                self._ready.append(outcome)
                # Others in this process may be waiting on our claim of these numbers.
                source._inflight.resolve(channel, group, outcome)
            source._count_hits(len(found))
        if rest:
            # The other process gave up, or its lease ran out: ours to ask, still claimed.
            self._lookup(channel, rest, ours=True)

    def _take_flight(self, channel: str, numbers: list[str], flight: _Flight) -> None:
        groups: dict[int, tuple[CheckOutcome, list[str]]] = {}
        again: list[str] = []
        for number in numbers:
            outcome = flight.results.get(number)
            if outcome is None or isinstance(outcome.error, RequestBudgetExhausted):
                # Unanswered, or the other filter's own --max-requests ran out: not ours.
                again.append(number)
                continue
            group = groups.get(id(outcome))
            if group is None:
                group = groups[id(outcome)] = (outcome, [])
            group[1].append(number)
        answered = 0
        for outcome, members in groups.values():
            if outcome.error is not None:
                self._ready.append(CheckOutcome(channel, members, error=outcome.error))
                continue
            blocked = frozenset(n for n in members if n in outcome.blocked)
            self._ready.append(
                CheckOutcome(
                    channel,
                    members,
                    blocked,
                    outcome.checked_at,
                    origin=outcome.origin,
                    provenance=outcome.provenance,
                )
            )
            answered += len(members)
        if answered:
            self._source._count_hits(answered)
        if again:
            self._lookup(channel, again)
