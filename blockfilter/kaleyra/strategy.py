"""The cost model: whether a channel's misses are looked up or its whole list is synced.

Looking ``misses`` numbers up costs ``ceil(misses / 100)`` requests; paging the whole list
into the cache costs ``size // 100 + 1`` pages (:func:`~blockfilter.kaleyra.sync.sync_pages`),
``size`` being what the last sync found. The cheaper one is used, and ties go to lookups,
which give fresher answers. With no size known numbers are looked up, unless the strategy is
``sync``. Everything here is arithmetic on numbers: the source says what the cache knows.
"""

from __future__ import annotations

import enum
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Final

from ..model import MAX_NUMBERS_PER_REQUEST
from .sync import SyncResult, sync_pages

__all__ = ["STRATEGIES", "Mode", "Plan", "cost", "lookup_requests", "may_sync", "sync_cost"]

#: ``auto`` (the cheaper of lookup and sync, lookup while the list's size is unknown),
#: ``lookup`` (never sync) or ``sync`` (page the whole list for any miss).
STRATEGIES: Final = ("auto", "lookup", "sync")


def lookup_requests(misses: int) -> int:
    """Requests that look ``misses`` numbers up, 100 to a request."""
    return -(-misses // MAX_NUMBERS_PER_REQUEST)


def may_sync(strategy: str) -> bool:
    """Whether ``strategy`` ever syncs a whole list."""
    return strategy != "lookup"


def sync_cost(strategy: str, size: int | None) -> int | None:
    """Pages a sync would take for a list of ``size`` numbers (``None``: not known), or
    ``None`` when ``strategy`` would not choose one; for a cache that can keep a snapshot."""
    if not may_sync(strategy):
        return None
    if size is None:
        # Forced with no size known: the least a sync can cost.
        return sync_pages(0) if strategy == "sync" else None
    return sync_pages(size)


def cost(strategy: str, misses: int, pages: int | None) -> int:
    """Requests that answer ``misses`` numbers of a channel whose sync would take ``pages``
    (``None``: no sync is possible)."""
    if misses == 0:
        return 0
    lookups = lookup_requests(misses)
    if pages is None:
        return lookups
    if strategy == "sync":
        return pages
    return min(lookups, pages)


class Mode(enum.Enum):
    LOOKUP = "lookup"  # every miss is looked up as it comes
    UNDECIDED = "undecided"  # misses are held until their count says which is cheaper
    SYNCING = "syncing"  # a sync is running; it answers the misses held meanwhile


@dataclass(slots=True, eq=False)
class Plan:
    """How one stream answers one channel: the decision and the misses it holds for it."""

    mode: Mode
    #: pages a sync would take (``0``: the first miss starts one); ``None``: never a sync.
    pages: int | None
    #: the ``sync`` strategy: every decision goes to a sync.
    forced: bool = False
    buffer: list[str] = field(default_factory=list)  # misses not yet given to a strategy
    carry: list[str] = field(default_factory=list)  # claimed misses waiting for a full request
    held: list[str] = field(default_factory=list)  # misses the running sync will answer
    sync: Future[SyncResult] | None = None

    @classmethod
    def for_channel(cls, strategy: str, pages: int | None) -> Plan:
        """The plan of a channel whose sync would take ``pages`` (see :func:`sync_cost`)."""
        if pages is None:
            return cls(Mode.LOOKUP, None)
        if strategy == "sync":
            return cls(Mode.UNDECIDED, 0, forced=True)  # any miss starts the sync
        return cls(Mode.UNDECIDED, pages)

    def take(self, misses: list[str]) -> list[str]:
        """Take the cache's misses: those to look up now are returned, the others held."""
        if self.mode is Mode.LOOKUP:
            return misses
        if self.mode is Mode.SYNCING:
            self.held.extend(misses)
        else:
            self.buffer.extend(misses)
        return []

    @property
    def wants_sync(self) -> bool:
        """Whether looking the held misses up would now cost more than a sync."""
        return (
            self.mode is Mode.UNDECIDED
            and self.pages is not None
            and lookup_requests(len(self.buffer)) > self.pages
        )

    def begin_sync(self) -> None:
        self.mode = Mode.SYNCING
        self.held, self.buffer = self.buffer, []

    def sync_ended(self) -> list[str]:
        """The sync ended: go on by lookups; the misses it held are returned."""
        held, self.held = self.held, []
        self.mode = Mode.LOOKUP
        return held

    def sync_answered(self, size: int) -> None:
        """The sync answered every held miss: its mark answers misses for the clean TTL, and
        a campaign that outlasts it may need another sync, chosen as the first was."""
        if self.pages is None:
            return
        self.mode = Mode.UNDECIDED
        if not self.forced:
            self.pages = sync_pages(size)

    def settle(self) -> list[str]:
        """The campaign ended before lookups cost more than a sync: the held misses, to look
        up."""
        if self.mode is not Mode.UNDECIDED:
            return []
        self.mode = Mode.LOOKUP
        buffered, self.buffer = self.buffer, []
        return buffered
