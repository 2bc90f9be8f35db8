"""Full-list sync: page a channel's whole blocklist into the status cache.

Looking numbers up costs one request per 100 *numbers of the campaign*; paging the whole
blocklist costs one request per 100 *blocklisted numbers* (plus one last, short page). For a
campaign bigger than the blocklist, the sync is the cheaper way to answer it:

* every blocklisted number goes into the cache as blocked (trusted for
  ``BLOCKFILTER_CACHE_TTL_BLOCKED``, counted from the moment the sync started);
* the channel gets a *sync mark* (``StatusCache.set_sync``): while it is younger than
  ``BLOCKFILTER_CACHE_TTL``, a number absent from the cache is clean as of the sync, since a
  clean status is never trusted longer than the clean TTL. The mark itself lives as long as
  the blocked entries it vouches for, so the list's size is remembered for the next choice
  between lookup and sync (:func:`sync_pages`).

Pages are fetched concurrently: with the size known from the last sync, every page it
predicts is asked at once and only a list that grew is paged further one page at a time; with
no size known, pages are asked in growing rounds (1, 2, 4... up to ``concurrency``), which may
ask a few empty pages past the end.

No mark is set when the sync cannot vouch for absent numbers: a page failed, the cache lost a
write, an entry came back in a form other than ``+`` and digits (it could not be matched
against the campaign's E.164 numbers), or a ``memory://`` cache is too small to hold the list.
The entries written stay: each is a true blocked status.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from .cache import CacheUnavailable, MemoryCache, StatusCache, SyncInfo
from .client import MAX_PAGE_SIZE, KaleyraClient
from .config import CHANNELS
from .numbers import InvalidNumber, normalize

__all__ = ["SyncResult", "sync_channel", "sync_pages"]

log = logging.getLogger("blockfilter.sync")

_PLUS_DIGITS = re.compile(r"^\+[0-9]+$")

#: ``progress(pages_done, pages_expected)``: called after every page; the expected count is
#: ``None`` while the size is unknown.
SyncProgress = Callable[[int, "int | None"], None]


def sync_pages(size: int) -> int:
    """Requests a sync of a blocklist of ``size`` numbers makes: the API says the list has
    ended with a short page, so a list that is a multiple of 100 costs one empty page more."""
    return size // MAX_PAGE_SIZE + 1


@dataclass(frozen=True, slots=True)
class SyncResult(SyncInfo):
    """A finished sync: :class:`~blockfilter.cache.SyncInfo` (``synced_at``, ``size``) and what
    it cost.

    :ivar channel: the channel synced.
    :ivar pages: API requests made (pages asked, retries not counted).
    :ivar marked: whether the cache now answers absent numbers as clean (see the module docs
        for when it cannot).
    :ivar elapsed_s: how long it took.
    """

    channel: str = ""
    pages: int = 0
    marked: bool = False
    elapsed_s: float = 0.0


class _Pager:
    """Fetches pages concurrently and writes each into the cache as it arrives."""

    def __init__(
        self,
        client: KaleyraClient,
        cache: StatusCache,
        channel: str,
        synced_at: float,
        progress: SyncProgress | None,
        expected_pages: int | None,
    ) -> None:
        self.client = client
        self.cache = cache
        self.channel = channel
        self.synced_at = synced_at
        self.progress = progress
        self.expected_pages = expected_pages
        self.lock = threading.Lock()
        self.size = 0
        self.pages = 0
        self.vouches = True  # False once anything makes absent numbers unsafe to call clean
        self.end: int | None = None  # index of the first short page seen

    def fetch(self, index: int) -> int:
        """Fetch page ``index``, cache its numbers; returns how many entries it held."""
        data = self.client.blocklist_page(self.channel, index * MAX_PAGE_SIZE)
        numbers: list[str] = []
        unmatchable = 0
        for raw in data:
            if not _PLUS_DIGITS.match(raw):
                unmatchable += 1
                continue
            try:
                numbers.append(normalize(raw))
            except InvalidNumber:
                # "+" and digits, yet no valid number: no message can carry it (an invalid
                # number is never looked up), so leaving it out changes no verdict.
                continue
        written = True
        if numbers:
            try:
                self.cache.set_many(self.channel, numbers, (), self.synced_at)
            except CacheUnavailable as exc:
                log.warning("sync of %s: the cache lost a page: %s", self.channel, exc)
                written = False
        with self.lock:
            self.pages += 1
            self.size += len(data)
            if unmatchable or not written:
                self.vouches = False
            if len(data) < MAX_PAGE_SIZE and (self.end is None or index < self.end):
                self.end = index
            done, expected = self.pages, self.expected_pages
        if unmatchable:
            log.warning(
                "sync of %s: %d blocklist entries are not '+' and digits; absent numbers "
                "will still be looked up",
                self.channel,
                unmatchable,
            )
        if self.progress is not None:
            self.progress(done, expected)
        return len(data)


def sync_channel(
    client: KaleyraClient,
    cache: StatusCache,
    channel: str,
    *,
    expected_size: int | None = None,
    executor: ThreadPoolExecutor | None = None,
    concurrency: int | None = None,
    progress: SyncProgress | None = None,
) -> SyncResult:
    """Page ``channel``'s whole blocklist into ``cache`` and mark the channel synced.

    :param client: the API client (its retry budget and rate limiter apply to every page).
    :param cache: where the blocked entries and the mark go.
    :param expected_size: the list's size at the last sync, if known: its pages are asked
        all at once.
    :param executor: a pool to fetch pages on (a source's own); one of ``concurrency``
        threads is made for the sync otherwise.
    :param concurrency: pages in flight at once; default ``client.settings.concurrency``.
    :param progress: ``progress(pages_done, pages_expected)`` after every page.
    :raises ValueError: an unknown channel.
    :raises UpstreamError: a page failed (credentials refused, retries spent); no mark is set.
    :raises RequestBudgetExhausted: ``--max-requests`` ran out mid-sync; no mark is set.
    """
    channel = channel.strip().lower()
    if channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel!r}; expected one of {', '.join(CHANNELS)}")
    started = time.monotonic()
    # The sync vouches for "absent means clean" as of its *start*: a number blocklisted while
    # the pages were read may have been missed, and is then caught when the mark expires.
    synced_at = time.time()
    width = max(1, concurrency or client.settings.concurrency)
    expected_pages = sync_pages(expected_size) if expected_size is not None else None
    pager = _Pager(client, cache, channel, synced_at, progress, expected_pages)
    own_pool = executor is None
    pool = executor or ThreadPoolExecutor(max_workers=width, thread_name_prefix="blockfilter-sync")
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
    finally:
        if own_pool:
            pool.shutdown(wait=True)
    size = pager.size
    marked = pager.vouches and _room_for(cache, size)
    if marked:
        try:
            # The mark lives as long as the blocked entries (so the size is remembered for the
            # next choice); readers trust "absent means clean" only for the clean TTL.
            cache.set_sync(channel, synced_at, size, client.settings.cache_ttl_blocked)
            marked = cache.get_sync(channel) is not None
        except CacheUnavailable as exc:
            log.warning("sync of %s: could not mark the channel synced: %s", channel, exc)
            marked = False
    result = SyncResult(
        synced_at=synced_at,
        size=size,
        channel=channel,
        pages=pager.pages,
        marked=marked,
        elapsed_s=time.monotonic() - started,
    )
    log.info(
        "synced %s: %d blocklisted numbers in %d pages, %.2fs%s",
        channel,
        size,
        result.pages,
        result.elapsed_s,
        "" if marked else " (not marked: absent numbers are still looked up)",
    )
    return result


def _room_for(cache: StatusCache, size: int) -> bool:
    # A memory cache evicts its oldest entries past max_entries: a list bigger than that loses
    # its first pages before the mark is set, and they would read as clean.
    if isinstance(cache, MemoryCache):
        return size <= cache.max_entries
    return True
