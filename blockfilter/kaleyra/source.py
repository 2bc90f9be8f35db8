"""Kaleyra as a blocklist source: the fewest requests that answer a campaign, many in flight.

For each channel a campaign needs, numbers go through these steps:

1. **The cache** answers what it can prove: fresh entries, and the channel's snapshot (a
   synced whole list) while it is whole and young enough (see :mod:`blockfilter.store.cache`).
   A failed read answers nothing: its numbers go on to the next steps.
2. **The strategy**: looking the misses up costs ``ceil(misses / 100)`` requests; paging the
   whole blocklist into the cache costs ``size // 100 + 1`` pages, ``size`` being what the last
   sync found. The cheaper one is used (ties go to lookups, which give fresher answers). With
   no size known, numbers are looked up, unless the source was made with ``strategy="sync"``.
3. **Coalescing**: a number some other filter of this process is already asking about is
   waited for instead of asked again; so is one whose Redis lease another process holds
   (``StatusCache.acquire_leases``). Only then are the numbers packed 100 to a request, so
   the numbers dropped do not leave requests half empty.
4. **Requests** run on a bounded thread pool (``BLOCKFILTER_CONCURRENCY``), paced by the
   fleet-wide rate limit (:mod:`blockfilter.store.ratelimit`), and outcomes are yielded as
   they complete.

A waited-for number whose owner gave up (its lease vanished without an answer, or the wait
outlived the lease) is looked up after all: coalescing saves requests, it never costs an
answer.

This module wires together pieces that live in modules of their own: the cost model
(:mod:`.strategy`), the stream (:mod:`.stream`), coalescing (:mod:`.coalesce`, and
:mod:`.shared_sync` for whole-list syncs), the cache as they use it (:mod:`.cache_access`,
behind the breaker of :mod:`blockfilter.store.guard`), the cache writes
(:mod:`.write_behind`) and the thread pools (:mod:`.pools`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager

from ..config import Settings
from ..errors import CacheUnavailable, ConfigError, CredentialsRefused
from ..model import channel_named
from ..sources import BaseSource, CheckOutcome, SourceStats
from ..store.cache import Clock, StatusCache, open_cache
from ..store.guard import CACHE_RETRY_AFTER_S
from ..store.ratelimit import RequestBudget, build_limiter
from . import strategy as cost_model
from .cache_access import CacheAccess
from .client import KaleyraClient, RequestLimiter
from .coalesce import lease_seconds
from .pools import Pools
from .shared_sync import SharedSync
from .strategy import STRATEGIES, Plan
from .stream import KaleyraStream, RemoteAnswers
from .sync import SyncProgress, SyncResult, check_eviction_policy, sync_channel
from .write_behind import WriteBehind

__all__ = ["CACHE_RETRY_AFTER_S", "STRATEGIES", "KaleyraSource", "RequestBudget"]

log = logging.getLogger("blockfilter.kaleyra")

# Caches whose eviction policy was reported, so a long-lived process says it once.
_POLICY_REPORTED: set[str] = set()


class KaleyraSource(BaseSource):
    """Checks numbers against Kaleyra's blocklist, through the status cache.

    :param settings: the effective settings (credentials are required).
    :param client: an existing client to share; made from ``settings`` when omitted.
    :param cache: an existing status cache; opened from ``settings.cache_url`` when omitted.
    :param max_requests: stop making API requests after this many (``--max-requests``).
    :param limiter: paces the client's requests; built from ``settings`` when omitted (the
        fleet-wide ``BLOCKFILTER_RATE_LIMIT`` and 429 pause, see
        :func:`~blockfilter.store.ratelimit.build_limiter`).
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
        self._access = CacheAccess(self.cache, clock=self.clock)
        self._writes = WriteBehind(settings, self._access, remember=remember, clock=self.clock)
        self._sizes: dict[str, int] = {}  # list sizes learnt from syncs, per channel
        self._syncs = SharedSync(settings, self._access, sizes=self._sizes)
        self._pools = Pools(settings.concurrency)
        self._requests_before = self.client.stats.requests
        self._cache_hits = 0
        self._refused: CredentialsRefused | None = None
        self._sync_safe: bool | None = None  # whether the cache keeps a snapshot once written
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

    def reading_ahead(self, wanted: Mapping[str, Sequence[str]]) -> AbstractContextManager[None]:
        """Within the block, the cache's answers for ``wanted`` (and the snapshots of its
        channels) come from one round trip made now (see
        :meth:`.cache_access.CacheAccess.reading_ahead`)."""
        return self._access.reading_ahead(wanted)

    def one_shot(self) -> None:
        # A one-shot run never reads back a memory:// cache: the filter already holds every
        # answer once. (A shared Redis cache is written all the same.)
        self.remember = False

    @property
    def remember(self) -> bool:
        """Whether answers are written to the cache (always, to a shared one); settable, so a
        one-shot command can turn it off on a source it did not make."""
        return self._writes.writes

    @remember.setter
    def remember(self, value: bool) -> None:
        self._writes.remember = value

    # -- the cache, which the filter must survive losing -----------------------------------

    def known_size(self, channel: str) -> int | None:
        """The channel's blocklist size as the last sync found it, if any sync is known."""
        # Only a cost: a snapshot read ahead a moment ago plans as well as one read now.
        read, snapshot = self._access.snapshot_read_ahead(channel)
        if not read:
            snapshot = self._access.snapshot(channel)
        if snapshot is not None:
            self._sizes[channel] = snapshot.size
            return snapshot.size
        return self._sizes.get(channel)

    # -- the strategy ------------------------------------------------------------------------

    def can_sync(self) -> bool:
        """Whether a sync can answer anything: the cache works, keeps both kinds, and keeps a
        snapshot once written (its eviction policy)."""
        return (
            self._access.guard.ok
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
        if not cost_model.may_sync(self.strategy) or not self.can_sync():
            return None
        return cost_model.sync_cost(self.strategy, self.known_size(channel))

    def estimate_requests(self, wanted: Mapping[str, Sequence[str]]) -> int:
        """The requests :meth:`check_many` would make for ``wanted`` now: per channel, the
        cache's misses packed 100 to a request, or the pages of a sync if that is cheaper.
        Reads the cache; asks the API nothing. Exact while the cache and the blocklist's size
        stay as they are and no other process is asking about the same numbers."""
        total = 0
        for channel, numbers in wanted.items():
            _, misses = self._access.answers(channel, numbers)
            pages = self.sync_cost(channel) if misses else None
            total += cost_model.cost(self.strategy, len(misses), pages)
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
        try:
            return self._syncs.run(channel, lambda: self._sync_now(channel, progress))
        finally:
            self._access.synced(channel)

    def _sync_now(self, channel: str, progress: SyncProgress | None) -> SyncResult:
        try:
            result = sync_channel(
                self.client,
                self.cache,
                channel,
                expected_size=self.known_size(channel),
                executor=self._pools.requests,
                progress=progress,
            )
        except CredentialsRefused as exc:
            self._refused = exc
            raise
        self._sizes[channel] = result.size
        return result

    # -- requests ------------------------------------------------------------------------

    def _fetch(self, channel: str, batch: list[str]) -> CheckOutcome:
        outcome = self._ask(channel, batch)
        self._access.inflight.answer(channel, batch, outcome)
        self._writes.put(channel, batch, outcome)
        return outcome

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

    def _wait_remote(self, channel: str, numbers: list[str]) -> RemoteAnswers:
        """Wait for numbers other processes hold the leases of: (what appeared, the rest)."""
        found = self._access.wait_for(channel, numbers, self._lease_seconds())
        return found, [n for n in numbers if n not in found]

    def _lease_seconds(self) -> float:
        return lease_seconds(self.settings)

    # -- what a stream asks of its source (blockfilter.kaleyra.stream.StreamSource) ----------

    def answer_from_cache(
        self, channel: str, numbers: Sequence[str]
    ) -> tuple[list[CheckOutcome], list[str]]:
        hits, misses = self._access.answers(channel, numbers)
        if hits:
            self.count_hits(sum(len(outcome.numbers) for outcome in hits))
        return hits, misses

    def count_hits(self, count: int) -> None:
        with self._lock:
            self._cache_hits += count

    def plan(self, channel: str) -> Plan:
        return Plan.for_channel(self.strategy, self.sync_cost(channel))

    def start_sync(self, channel: str) -> Future[SyncResult]:
        return self._pools.syncers.submit(self.sync, channel)

    def lease(self, channel: str, numbers: list[str]) -> set[str] | None:
        return self._access.lease(channel, numbers, self._lease_seconds())

    def wait_for_others(self, channel: str, numbers: list[str]) -> Future[RemoteAnswers]:
        return self._pools.waiters.submit(self._wait_remote, channel, numbers)

    def submit(self, channel: str, batch: list[str]) -> Future[CheckOutcome]:
        return self._pools.requests.submit(self._fetch, channel, batch)

    def stored(
        self, channel: str, numbers: list[str], blocked: frozenset[str], fetched_at: float
    ) -> CheckOutcome:
        return self._access.stored(channel, numbers, blocked, fetched_at)

    def flush_writes(self) -> None:
        """Wait until every answer received so far is in the cache (or given up on)."""
        self._writes.flush()

    # -- the BlocklistSource protocol --------------------------------------------------------

    def stream(self) -> KaleyraStream:
        """A stream: cache hits answered at once, misses sent 100 at a time as they come."""
        return KaleyraStream(
            self,
            self._access.inflight,
            window=self.settings.concurrency * 4,
            lease_s=self._lease_seconds(),
        )

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
        self._pools.close()
        self._writes.close()
        if self._owns_client:
            self.client.close()

    def __repr__(self) -> str:
        return f"KaleyraSource({self.client!r}, strategy={self.strategy!r})"
