"""A stream of checks against Kaleyra: cache first, then the cheaper strategy, many in flight.

The stream holds what one campaign run has on its way (its plans per channel, the requests it
submitted, what it waits for others to answer); everything shared by the streams of a source
(the cache, the thread pools, the client) it reaches through :class:`StreamSource`.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from queue import Empty, SimpleQueue
from typing import Any, Protocol

from ..errors import RequestBudgetExhausted
from ..model import MAX_NUMBERS_PER_REQUEST
from ..sources import CheckOutcome
from ..store.cache import CachedStatus
from .coalesce import Flight, InFlight
from .strategy import Plan
from .sync import SyncResult

__all__ = ["KaleyraStream", "StreamSource"]

log = logging.getLogger("blockfilter.kaleyra")

# How often a stream looks at what it waits for when nothing else wakes it.
_POLL = 0.02

#: What other processes answered while this one waited: (their answers, the numbers left).
RemoteAnswers = tuple[dict[str, CachedStatus], list[str]]


class StreamSource(Protocol):
    """What a stream asks of its source."""

    def answer_from_cache(
        self, channel: str, numbers: Sequence[str]
    ) -> tuple[list[CheckOutcome], list[str]]:
        """(what the cache proves, counted as cache hits; the misses)."""

    def count_hits(self, count: int) -> None:
        """``count`` numbers were answered without a request of this source."""

    def plan(self, channel: str) -> Plan:
        """A new plan for ``channel``, as the strategy and the cache's knowledge say."""

    def start_sync(self, channel: str) -> Future[SyncResult]:
        """Sync ``channel``'s whole list into the cache, off the stream's thread."""

    def lease(self, channel: str, numbers: list[str]) -> set[str] | None:
        """Lease the numbers against other processes: those this one now holds; ``None`` when
        no other process shares the cache, or it could not be asked."""

    def wait_for_others(self, channel: str, numbers: list[str]) -> Future[RemoteAnswers]:
        """Wait, off the stream's thread, for numbers other processes hold the leases of."""

    def submit(self, channel: str, batch: list[str]) -> Future[CheckOutcome]:
        """Ask the API about one request's numbers, and put the answer in the cache."""

    def stored(
        self, channel: str, numbers: list[str], blocked: frozenset[str], fetched_at: float
    ) -> CheckOutcome:
        """The outcome of statuses read from the cache, with their age now."""

    def flush_writes(self) -> None:
        """Wait until every answer received so far is in the cache (or given up on)."""


class KaleyraStream:
    """Answers numbers while they keep arriving: cache first, then the cheaper strategy.

    Claimed misses are carried over between :meth:`add` calls so only the last request of a
    channel can be short. At most ``window`` requests are queued ahead: past that, :meth:`add`
    waits, which keeps a million-number campaign from holding every batch at once. With the
    list's size known, misses are held until their count says which strategy is cheaper (at
    most as many as the list holds): sync as soon as lookups would cost more, lookups at
    :meth:`finish` otherwise.

    :param source: the source whose cache, pools and client the stream uses.
    :param inflight: what the process is asking about right now (coalescing).
    :param window: requests queued ahead at most.
    :param lease_s: how long a lease is held; a number waited for longer is asked again.
    """

    def __init__(
        self, source: StreamSource, inflight: InFlight, *, window: int, lease_s: float
    ) -> None:
        self._source = source
        self._inflight = inflight
        self._window = window
        self._lease_s = lease_s
        self._plans: dict[str, Plan] = {}
        # Requests submitted whose outcome is not taken in yet. Each request's future puts
        # itself in _landed when it completes (a sync's or a remote wait's puts None, to wake
        # finish()), so taking outcomes in costs one queue read each, not a look at every
        # request of the window each time.
        self._pending = 0
        self._landed: SimpleQueue[Future[CheckOutcome] | None] = SimpleQueue()
        self._remote: dict[Future[RemoteAnswers], str] = {}
        self._awaiting: list[tuple[Flight, str, list[str], float]] = []
        self._ready: list[CheckOutcome] = []

    # -- the CheckStream protocol --------------------------------------------------------

    def add(self, channel: str, numbers: Sequence[str]) -> None:
        plan = self._plan(channel)
        hits, misses = self._source.answer_from_cache(channel, numbers)
        self._ready.extend(hits)
        if not misses:
            return
        now = plan.take(misses)
        if now:
            self._lookup(channel, now)
        elif plan.wants_sync:
            self._start_sync(channel, plan)

    def completed(self) -> Iterator[CheckOutcome]:
        self._poll()
        self._take_landed(block=False)
        ready, self._ready = self._ready, []
        return iter(ready)

    def finish(self) -> Iterator[CheckOutcome]:
        for channel, plan in self._plans.items():
            buffered = plan.settle()
            if buffered:
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
            # Requests, remote waits and syncs all land in _landed; flights of other streams
            # of the process are looked at every _POLL.
            self._take_landed(block=True, timeout=_POLL if self._awaiting else None)

    # -- planning ------------------------------------------------------------------------

    def _plan(self, channel: str) -> Plan:
        plan = self._plans.get(channel)
        if plan is None:
            plan = self._plans[channel] = self._source.plan(channel)
        return plan

    def _start_sync(self, channel: str, plan: Plan) -> None:
        plan.begin_sync()
        plan.sync = self._source.start_sync(channel)
        plan.sync.add_done_callback(self._wake)

    def _syncing(self) -> bool:
        return any(plan.sync is not None for plan in self._plans.values())

    def _synced(self, channel: str, plan: Plan) -> None:
        """The channel's sync ended: answer what it held, and go on by the cache."""
        assert plan.sync is not None
        future, plan.sync = plan.sync, None
        held = plan.sync_ended()
        error = future.exception()
        if error is not None:
            if not isinstance(error, Exception):
                raise error
            # A failed sync leaves no snapshot: what it would have answered is looked up (a
            # refused account or a spent request budget then fails those lookups in turn).
            log.warning("sync of %s failed (%s); its numbers are looked up", channel, error)
            self._lookup(channel, held)
            return
        hits, misses = self._source.answer_from_cache(channel, held)
        self._ready.extend(hits)
        if misses:
            # The sync could not vouch for absent numbers (see blockfilter.kaleyra.sync):
            # look them, and every later miss, up.
            self._lookup(channel, misses)
        else:
            plan.sync_answered(future.result().size)

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
            _, mine, theirs = self._inflight.claim(channel, numbers)
            deadline = time.monotonic() + self._lease_s
            for flight, waited in theirs.items():
                self._awaiting.append((flight, channel, waited, deadline))
        if mine:
            held = source.lease(channel, mine)
            if not ours and held is not None and len(held) < len(mine):
                others = [n for n in mine if n not in held]
                mine = [n for n in mine if n in held]
                remote = source.wait_for_others(channel, others)
                self._remote[remote] = channel
                remote.add_done_callback(self._wake)
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
        while self._pending >= self._window:
            self._take_landed(block=True)
        future = self._source.submit(channel, batch)
        self._pending += 1
        future.add_done_callback(self._landed.put)

    def _take_landed(self, *, block: bool, timeout: float | None = None) -> None:
        """Take in the outcomes of the requests that landed; with ``block``, first wait (at
        most ``timeout``) for a request, a sync or a remote wait to land."""
        landed = self._landed
        try:
            future = landed.get(timeout=timeout) if block else landed.get_nowait()
            while True:
                if future is not None:
                    self._pending -= 1
                    self._ready.append(future.result())
                future = landed.get_nowait()
        except Empty:
            pass

    def _wake(self, future: Future[Any]) -> None:
        """A sync or a remote wait ended: wake finish(), which polls them."""
        self._landed.put(None)

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
                outcome = source.stored(
                    channel, group, frozenset(n for n in group if found[n].blocked), at
                )
                self._ready.append(outcome)
                # Others in this process may be waiting on our claim of these numbers.
                self._inflight.resolve(channel, group, outcome)
            source.count_hits(len(found))
        if rest:
            # The other process gave up, or its lease ran out: ours to ask, still claimed.
            self._lookup(channel, rest, ours=True)

    def _take_flight(self, channel: str, numbers: list[str], flight: Flight) -> None:
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
            self._source.count_hits(answered)
        if again:
            self._lookup(channel, again)
