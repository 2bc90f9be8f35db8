"""A circuit breaker for the status cache: a cache that failed is left alone for a while.

A worker lives long, so a Redis blip must not turn the shared cache off for good; nor may a
cache that is down cost every lookup a connect timeout. Going on without the cache costs
requests, never correctness: every number it would have answered is asked of the API instead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from ..errors import CacheUnavailable

__all__ = ["CACHE_RETRY_AFTER_S", "CacheGuard"]

log = logging.getLogger("blockfilter.kaleyra")

# Seconds a status cache that failed is left alone before it is tried again.
CACHE_RETRY_AFTER_S = 5.0

T = TypeVar("T")


class CacheGuard:
    """Runs calls to a status cache, and answers their defaults while the cache is down.

    :param retry_after: seconds after a failure during which the cache is not called.
    :param clock: monotonic seconds now (tests inject one).
    """

    def __init__(
        self,
        retry_after: float = CACHE_RETRY_AFTER_S,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.retry_after = retry_after
        self._clock = clock
        self._down_until = 0.0
        self._lock = threading.Lock()

    @property
    def ok(self) -> bool:
        """Whether the cache is to be called now (it has not failed within ``retry_after``)."""
        return self._clock() >= self._down_until

    def call(self, what: str, call: Callable[[], T], default: T) -> T:
        """``call()``, or ``default`` when the cache is down or the call finds it down
        (:class:`CacheUnavailable`); ``what`` names the call in the warning."""
        if not self.ok:
            return default
        try:
            return call()
        except CacheUnavailable as exc:
            # The threads that fail together report it once.
            with self._lock:
                first = self.ok
                self._down_until = self._clock() + self.retry_after
            if first:
                log.warning(
                    "status cache unavailable (%s); going on without it for %.0f s: %s",
                    what,
                    self.retry_after,
                    exc,
                )
            return default
