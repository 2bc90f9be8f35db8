"""Kaleyra as a blocklist source: the status cache first, then full requests, many in flight.

Cache hits are taken out *before* numbers are packed into requests of 100, so every request
that goes out is as full as it can be. Requests run on a bounded thread pool
(``BLOCKFILTER_CONCURRENCY``) and outcomes are yielded as they complete.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from .cache import CacheUnavailable, StatusCache, open_cache
from .client import KaleyraClient, RequestLimiter
from .config import Settings
from .errors import CredentialsRefused, RequestBudgetExhausted
from .sources import CheckOutcome, SourceStats

log = logging.getLogger("blockfilter.kaleyra")

MAX_NUMBERS_PER_REQUEST = 100
# How many cache entries one round trip asks for: big enough to amortise a Redis round trip,
# small enough that a million-number campaign does not hold them all at once.
_CACHE_CHUNK = 10_000


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


class KaleyraSource:
    """Checks numbers against Kaleyra's blocklist, through the status cache.

    :param settings: the effective settings (credentials are required).
    :param client: an existing client to share; made from ``settings`` when omitted.
    :param cache: an existing status cache; opened from ``settings.cache_url`` when omitted.
    :param max_requests: stop making API requests after this many (``--max-requests``).
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
    ) -> None:
        self.settings = settings
        if max_requests is not None:
            limiter = RequestBudget(max_requests, then=limiter)
        self.client = client or KaleyraClient(settings, limiter=limiter)
        self.cache = cache if cache is not None else open_cache(settings)
        self._cache_ok = True
        self._requests_before = self.client.stats.requests
        self._cache_hits = 0
        self._refused: CredentialsRefused | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    # -- the cache, which the filter must survive losing -----------------------------------

    def _cache_call(self, what: str, call, default):  # type: ignore[no-untyped-def]
        if not self._cache_ok:
            return default
        try:
            return call()
        except CacheUnavailable as exc:
            # Going on without the cache costs requests, never correctness: every number it
            # would have answered is asked of the API instead.
            self._cache_ok = False
            log.warning("status cache unavailable (%s); going on without it: %s", what, exc)
            return default

    def _from_cache(
        self, channel: str, numbers: Sequence[str]
    ) -> tuple[list[CheckOutcome], list[str]]:
        hits: dict[float, list[str]] = defaultdict(list)
        hits_blocked: dict[float, set[str]] = defaultdict(set)
        misses: list[str] = []
        for start in range(0, len(numbers), _CACHE_CHUNK):
            chunk = numbers[start : start + _CACHE_CHUNK]
            found = self._cache_call("get", lambda c=chunk: self.cache.get_many(channel, c), {})
            for number in chunk:
                status = found.get(number)
                if status is None:
                    misses.append(number)
                    continue
                # Entries fetched together share a timestamp: one outcome per fetch keeps
                # checked_at exact without an object per number.
                hits[status.fetched_at].append(number)
                if status.blocked:
                    hits_blocked[status.fetched_at].add(number)
        outcomes = [
            CheckOutcome(channel, group, frozenset(hits_blocked.get(at, ())), at)
            for at, group in hits.items()
        ]
        return outcomes, misses

    # -- requests ------------------------------------------------------------------------

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=self.settings.concurrency, thread_name_prefix="blockfilter-check"
                )
            return self._pool

    def _fetch(self, channel: str, batch: list[str]) -> CheckOutcome:
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
        fetched_at = time.time()
        blocked_set = frozenset(blocked)
        clean = [n for n in batch if n not in blocked_set]
        self._cache_call(
            "set", lambda: self.cache.set_many(channel, blocked_set, clean, fetched_at), None
        )
        return CheckOutcome(channel, batch, blocked_set, fetched_at)

    def stream(self) -> _KaleyraStream:
        """A stream: cache hits answered at once, misses sent 100 at a time as they come."""
        return _KaleyraStream(self)

    def check_many(self, wanted: Mapping[str, Sequence[str]]) -> Iterator[CheckOutcome]:
        stream = self.stream()
        for channel, numbers in wanted.items():
            stream.add(channel, numbers)
            yield from stream.completed()
        yield from stream.finish()

    def estimate_requests(self, wanted: Mapping[str, Sequence[str]]) -> int:
        """The requests :meth:`check_many` would make for ``wanted`` now: the cache's misses,
        packed 100 to a request. Reads the cache; asks the API nothing."""
        total = 0
        for channel, numbers in wanted.items():
            _, misses = self._from_cache(channel, numbers)
            total += -(-len(misses) // MAX_NUMBERS_PER_REQUEST)
        return total

    def stats(self) -> SourceStats:
        return SourceStats(
            requests=self.client.stats.requests - self._requests_before,
            cache_hits=self._cache_hits,
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __repr__(self) -> str:
        return f"KaleyraSource({self.client!r})"


class _KaleyraStream:
    """Packs cache misses into full requests while numbers keep arriving.

    Misses are carried over between :meth:`add` calls so only the last request of a channel
    can be short. At most a few requests per pool thread are queued ahead: past that,
    :meth:`add` waits, which keeps a million-number campaign from holding every batch at once.
    """

    def __init__(self, source: KaleyraSource) -> None:
        self._source = source
        self._carry: dict[str, list[str]] = defaultdict(list)
        self._pending: set[Future[CheckOutcome]] = set()
        self._ready: list[CheckOutcome] = []
        self._window = source.settings.concurrency * 4

    def add(self, channel: str, numbers: Sequence[str]) -> None:
        hits, misses = self._source._from_cache(channel, numbers)
        for outcome in hits:
            self._source._cache_hits += len(outcome.numbers)
        self._ready.extend(hits)
        carry = self._carry[channel]
        carry.extend(misses)
        while len(carry) >= MAX_NUMBERS_PER_REQUEST:
            self._submit(channel, carry[:MAX_NUMBERS_PER_REQUEST])
            del carry[:MAX_NUMBERS_PER_REQUEST]

    def _submit(self, channel: str, batch: list[str]) -> None:
        while len(self._pending) >= self._window:
            done, self._pending = wait(self._pending, return_when=FIRST_COMPLETED)
            self._ready.extend(future.result() for future in done)
        self._pending.add(self._source._executor().submit(self._source._fetch, channel, batch))

    def completed(self) -> Iterator[CheckOutcome]:
        done = {future for future in self._pending if future.done()}
        self._pending -= done
        ready, self._ready = self._ready, []
        ready.extend(future.result() for future in done)
        return iter(ready)

    def finish(self) -> Iterator[CheckOutcome]:
        for channel, carry in self._carry.items():
            if carry:
                self._submit(channel, list(carry))
        self._carry.clear()
        yield from self.completed()
        while self._pending:
            done, self._pending = wait(self._pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
