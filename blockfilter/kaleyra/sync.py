"""Full-list sync: page a channel's whole blocklist into a snapshot in the status cache.

Looking numbers up costs one request per 100 *numbers of the campaign*; paging the whole
blocklist costs one request per 100 *blocklisted numbers* (plus one last, short page). For a
campaign bigger than the blocklist, the sync is the cheaper way to answer it.

What a sync writes is a *snapshot* (:meth:`StatusCache.begin_snapshot`): the list, written
aside page by page and put in place in one step once the list has ended and the cache proves
that every number written is still there. While it is in place, a number on it is blocked
(for ``BLOCKFILTER_CACHE_TTL_BLOCKED``) and a number absent from it is clean (for
``BLOCKFILTER_CACHE_TTL``), both counted from the moment the sync started, by the cache's
clock. A snapshot is lost whole or kept whole: there is no state in which part of the list is
gone and the rest still vouches for absent numbers.

Nothing is put in place when the sync cannot vouch for absent numbers: a page failed, the cache
lost a write (a restart or an eviction mid-sync), an entry came back that cannot be read as a
phone number, or the upstream paged past every bound (a page repeating the one before it, more
pages than the list's known size allows or than :data:`MAX_SYNC_PAGES`, or longer than
:data:`MAX_SYNC_SECONDS`). The filter then looks its numbers up.

Pages are fetched concurrently: with the size known from the last sync, every page it
predicts is asked at once and only a list that grew is paged further; with no size known, pages
are asked in growing rounds (1, 2, 4... up to ``concurrency``), which may ask a few empty pages
past the end.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from ..errors import ConfigError, SyncAborted
from ..model import channel_named
from ..numbers import InvalidNumber, normalize, normalize_answer
from ..store.cache import SnapshotWriter, StatusCache, SyncInfo
from .client import MAX_PAGE_SIZE, KaleyraClient

__all__ = ["MAX_SYNC_PAGES", "MAX_SYNC_SECONDS", "SyncResult", "sync_channel", "sync_pages"]

log = logging.getLogger("blockfilter.sync")

#: The most pages one sync reads (10 million numbers): past it the upstream is taken to be
#: paging for ever, not listing.
MAX_SYNC_PAGES = 100_000
#: The longest one sync may take; its snapshot's clean answers are dated from its start, so a
#: sync that outlives the clean TTL could not vouch for anything anyway.
MAX_SYNC_SECONDS = 900.0
# With the list's size known, a list that grew by more than this (plus the known pages again)
# during one sync is taken for an upstream that never ends.
_GROWTH_SLACK_PAGES = 100

_PLUS_DIGITS = re.compile(r"^\+[0-9]+$")

#: ``progress(pages_done, pages_expected)``: called after every page; the expected count is
#: ``None`` while the size is unknown.
SyncProgress = Callable[[int, "int | None"], None]

#: The only eviction policy under which a snapshot, once written, stays until it expires.
SAFE_EVICTION_POLICY = "noeviction"


def sync_pages(size: int) -> int:
    """Requests a sync of a blocklist of ``size`` numbers makes: the API says the list has
    ended with a short page, so a list that is a multiple of 100 costs one empty page more."""
    return size // MAX_PAGE_SIZE + 1


def check_eviction_policy(cache: StatusCache) -> None:
    """Refuse to sync into a Redis that may evict: its snapshot would vanish with the next burst
    of writes, and its requests be wasted.

    :raises ConfigError: the policy is not ``noeviction`` (or the server does not say).
    :raises CacheUnavailable: the server could not be asked.
    """
    policy = cache.eviction_policy()
    if policy is not None and policy != SAFE_EVICTION_POLICY:
        raise ConfigError(
            f"the Redis behind BLOCKFILTER_CACHE_URL has maxmemory-policy {policy!r}; a synced "
            f"blocklist needs '{SAFE_EVICTION_POLICY}' (CONFIG SET maxmemory-policy "
            f"{SAFE_EVICTION_POLICY}, or a Redis of its own), or it may be evicted at any moment"
        )


@dataclass(frozen=True, slots=True)
class SyncResult(SyncInfo):
    """A finished sync: :class:`~blockfilter.store.cache.SyncInfo` (``synced_at``, ``size``)
    and what it cost.

    :ivar channel: the channel synced.
    :ivar pages: API requests made (pages asked, retries not counted).
    :ivar marked: whether the snapshot is in place, so that the cache answers absent numbers as
        clean (see the module docs for when it cannot be).
    :ivar elapsed_s: how long it took.
    """

    channel: str = ""
    pages: int = 0
    marked: bool = False
    elapsed_s: float = 0.0


class _Pager:
    """Fetches pages concurrently, writes each into the snapshot as it arrives, and stops a
    list that does not end."""

    def __init__(
        self,
        client: KaleyraClient,
        writer: SnapshotWriter,
        channel: str,
        progress: SyncProgress | None,
        expected_pages: int | None,
        max_pages: int,
        max_seconds: float,
    ) -> None:
        self.client = client
        self.writer = writer
        self.channel = channel
        self.progress = progress
        self.expected_pages = expected_pages
        self.max_pages = max_pages
        self.max_seconds = max_seconds
        self.deadline = time.monotonic() + max_seconds
        self.lock = threading.Lock()
        self.size = 0
        self.pages = 0
        self.unreadable = 0  # entries no phone number can be read from
        self.end: int | None = None  # index of the first short page seen
        # A fingerprint of every full page: an upstream that ignores the offset answers the
        # same page again and again, and would be paged for ever.
        self._full_pages: dict[int, int] = {}

    def fetch(self, index: int) -> int:
        """Fetch page ``index``, write its numbers; returns how many entries it held."""
        if index >= self.max_pages:
            raise SyncAborted(
                f"sync of {self.channel}: the list did not end within {self.max_pages} pages; "
                "the upstream seems to page for ever",
                code="runaway_paging",
            )
        if time.monotonic() > self.deadline:
            raise SyncAborted(
                f"sync of {self.channel}: the list did not end within {self.max_seconds:g} s",
                code="runaway_paging",
            )
        data = self.client.blocklist_page(self.channel, index * MAX_PAGE_SIZE)
        if len(data) >= MAX_PAGE_SIZE:
            self._check_not_repeated(index, data)
        numbers: list[str] = []
        unreadable = 0
        for raw in data:
            try:
                numbers.append(normalize(raw))
                continue
            except InvalidNumber:
                pass
            if _PLUS_DIGITS.match(raw):
                # E.164, yet not a valid number: the same check turns such a number in a
                # message into `invalid`, never looked up, so leaving it out changes no verdict.
                continue
            # Written another way (no '+', spaces): every number it can mean is listed.
            meanings = normalize_answer(raw)
            if meanings:
                numbers.extend(meanings)
            else:
                # Nothing to match a campaign's numbers against (national format, with no
                # region to read it in): absent numbers can no longer be called clean.
                unreadable += 1
        self.writer.add(numbers)
        with self.lock:
            self.pages += 1
            self.size += len(data)
            self.unreadable += unreadable
            if len(data) < MAX_PAGE_SIZE and (self.end is None or index < self.end):
                self.end = index
            done, expected = self.pages, self.expected_pages
        if self.progress is not None:
            self.progress(done, expected)
        return len(data)

    def _check_not_repeated(self, index: int, data: list[str]) -> None:
        fingerprint = hash(tuple(data))
        with self.lock:
            self._full_pages[index] = fingerprint
            neighbours = (self._full_pages.get(index - 1), self._full_pages.get(index + 1))
        if fingerprint in neighbours:
            raise SyncAborted(
                f"sync of {self.channel}: page {index} is the same as the page next to it; the "
                "upstream seems to ignore the offset",
                code="runaway_paging",
            )


def sync_channel(
    client: KaleyraClient,
    cache: StatusCache,
    channel: str,
    *,
    expected_size: int | None = None,
    executor: ThreadPoolExecutor | None = None,
    concurrency: int | None = None,
    progress: SyncProgress | None = None,
    max_pages: int | None = None,
    max_seconds: float = MAX_SYNC_SECONDS,
) -> SyncResult:
    """Page ``channel``'s whole blocklist into a snapshot in ``cache``.

    :param client: the API client (its retry budget and rate limiter apply to every page).
    :param cache: where the snapshot goes.
    :param expected_size: the list's size at the last sync, if known: its pages are asked
        all at once, and a list that pages far past it is stopped.
    :param executor: a pool to fetch pages on (a source's own); one of ``concurrency``
        threads is made for the sync otherwise.
    :param concurrency: pages in flight at once; default ``client.settings.concurrency``.
    :param progress: ``progress(pages_done, pages_expected)`` after every page.
    :param max_pages: the most pages to read (default :data:`MAX_SYNC_PAGES`, or twice the
        known size's pages plus some slack).
    :param max_seconds: the longest the sync may take (default :data:`MAX_SYNC_SECONDS`).
    :raises ValueError: an unknown channel.
    :raises ConfigError: the cache may evict (see :func:`check_eviction_policy`).
    :raises UpstreamError: a page failed (credentials refused, retries spent), or the upstream
        paged past the bounds (:class:`~blockfilter.errors.SyncAborted`); nothing is put in
        place.
    :raises CacheUnavailable: the cache failed; nothing is put in place.
    :raises RequestBudgetExhausted: ``--max-requests`` ran out mid-sync; nothing is put in place.
    """
    channel = channel_named(channel)
    check_eviction_policy(cache)
    started = time.monotonic()
    width = max(1, concurrency or client.settings.concurrency)
    expected_pages = sync_pages(expected_size) if expected_size is not None else None
    if max_pages is None:
        max_pages = MAX_SYNC_PAGES
        if expected_pages is not None:
            max_pages = min(max_pages, 2 * expected_pages + _GROWTH_SLACK_PAGES)
    # The snapshot vouches for "absent means clean" as of the sync's *start*: a number
    # blocklisted while the pages were read may have been missed, and is caught when the
    # snapshot's clean answers expire.
    writer = cache.begin_snapshot(channel)
    pager = _Pager(client, writer, channel, progress, expected_pages, max_pages, max_seconds)
    own_pool = executor is None
    pool = executor or ThreadPoolExecutor(max_workers=width, thread_name_prefix="blockfilter-sync")
    committed = False
    try:
        next_index = 0
        # Rounds of pages asked at once, until a short page says the list has ended: first
        # every page the last sync predicts, then (the list grew, or no size is known)
        # rounds of 1, 2, 4... pages, so a few new entries cost one request, not a round of
        # empty ones.
        round_size = expected_pages if expected_pages is not None else 1
        growing = expected_pages is None
        while pager.end is None:
            futures: list[Future[int]] = [
                pool.submit(pager.fetch, index)
                for index in range(next_index, next_index + round_size)
            ]
            next_index += round_size
            _, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for future in pending:
                future.cancel()
            wait(pending)
            for future in futures:
                error = None if future.cancelled() else future.exception()
                if error is not None:
                    raise error
            round_size = min(round_size * 2, width) if growing else 1
            growing = True
        size = pager.size
        if pager.unreadable:
            log.warning(
                "sync of %s: %d blocklist entries are not phone numbers that can be read; the "
                "list is not kept, and numbers are looked up instead",
                channel,
                pager.unreadable,
            )
        else:
            committed = writer.commit(size)
            if not committed:
                log.warning(
                    "sync of %s: the cache lost part of the list while it was written (a restart "
                    "or an eviction); the list is not kept, and numbers are looked up instead",
                    channel,
                )
    finally:
        if not committed:
            writer.abort()
        if own_pool:
            pool.shutdown(wait=True)
    result = SyncResult(
        synced_at=writer.synced_at,
        size=size,
        channel=channel,
        pages=pager.pages,
        marked=committed,
        elapsed_s=time.monotonic() - started,
    )
    log.info(
        "synced %s: %d blocklisted numbers in %d pages, %.2fs%s",
        channel,
        size,
        result.pages,
        result.elapsed_s,
        "" if committed else " (not kept: absent numbers are still looked up)",
    )
    return result
