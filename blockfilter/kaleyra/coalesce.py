"""In-process coalescing: a number some other stream of this process is already asking about
is waited for instead of asked again; so is a whole-list sync of a channel already running.

One registry (:class:`InFlight`) per status cache: sources sharing a cache (the shared one and
a ``--max-requests`` one) coalesce with each other.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from typing import Any

from ..config import Settings
from ..sources import CheckOutcome
from ..store.cache import StatusCache
from .sync import SyncResult

__all__ = ["Flight", "InFlight", "lease_seconds", "registry_for"]

# Added to the longest a request can take (its retry budget plus one attempt) to get how long
# a lease is held: covers the wait in the submission queue and a slow cache write.
_LEASE_SLACK = 5.0


class Flight:
    """Numbers one stream claimed to look up; others in the process wait for it to land."""

    __slots__ = ("done", "left", "results")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.left = 0
        # number -> the outcome of the request that answered it (shared per request).
        self.results: dict[str, CheckOutcome] = {}


class InFlight:
    """What the process is asking about right now, shared by every source on one cache.

    A (channel, number) is in here from the moment a stream claims it until its answer is in
    the cache; a whole-list sync of a channel, until it ends.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # channel -> number -> the flight that claimed it (a dict per channel: no key tuple to
        # build per number on the main thread's path).
        self._claims: dict[str, dict[str, Flight]] = {}
        self.syncs: dict[str, Future[SyncResult]] = {}

    def claim(
        self, channel: str, numbers: Iterable[str]
    ) -> tuple[Flight, list[str], dict[Flight, list[str]]]:
        """Claim the numbers nobody in the process is asking about; group the others by the
        flight that will answer them."""
        flight = Flight()
        mine: list[str] = []
        theirs: dict[Flight, list[str]] = {}
        with self.lock:
            claims = self._claims.setdefault(channel, {})
            for number in numbers:
                other = claims.get(number)
                if other is None:
                    claims[number] = flight
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
        with self.lock:
            claims = self._claims.get(channel, {})
            for number in numbers:
                flight = claims.get(number)
                if flight is None or number in flight.results:
                    continue
                flight.results[number] = outcome
                flight.left -= 1
                if flight.left <= 0:
                    flight.done.set()

    def forget(self, channel: str, numbers: Iterable[str]) -> None:
        """The answer is in the cache (or could not be put there): drop the claims."""
        with self.lock:
            claims = self._claims.get(channel, {})
            for number in numbers:
                claims.pop(number, None)

    def resolve(self, channel: str, numbers: Sequence[str], outcome: CheckOutcome) -> None:
        """:meth:`answer` and :meth:`forget` at once, for answers already in the cache."""
        self.answer(channel, numbers, outcome)
        self.forget(channel, numbers)


_REGISTRIES: weakref.WeakKeyDictionary[Any, InFlight] = weakref.WeakKeyDictionary()
_REGISTRIES_LOCK = threading.Lock()


def registry_for(cache: StatusCache) -> InFlight:
    # Keyed by the cache object: sources sharing a cache (the shared one and a --max-requests
    # one) coalesce with each other.
    with _REGISTRIES_LOCK:
        registry = _REGISTRIES.get(cache)
        if registry is None:
            registry = _REGISTRIES[cache] = InFlight()
        return registry


def lease_seconds(settings: Settings) -> float:
    """How long a lease on numbers is held: the longest one request can take, plus the wait of
    a full submission queue at the rate limit."""
    queued = 0.0
    if settings.rate_limit:
        queued = settings.concurrency * 4 / settings.rate_limit
    return settings.retry_deadline + settings.request_timeout + _LEASE_SLACK + queued
