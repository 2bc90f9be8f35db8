"""Putting a request's answers in the status cache, off the request thread where it pays.

A Redis write costs a millisecond or two of a request's cycle, so with a shared cache the
write goes to a writer thread and the request thread goes back to asking at once; when the
writer falls behind, the request thread writes itself, which bounds what is queued.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait

from ..config import Settings
from ..sources import CheckOutcome
from ..store.cache import Clock
from .cache_access import CacheAccess
from .coalesce import lease_seconds

__all__ = ["WriteBehind"]

log = logging.getLogger("blockfilter.kaleyra")


class WriteBehind:
    """Writes answers to the cache, and then drops their in-process claims.

    Where other processes share the cache, answers are always written (they read them), by a
    writer thread, and leases are given back when the answers could not be written.

    :param remember: whether answers are written to a cache of this process alone.
    :param clock: epoch seconds now, for an answer that carries no time.
    """

    def __init__(
        self,
        settings: Settings,
        access: CacheAccess,
        *,
        remember: bool,
        clock: Clock,
    ) -> None:
        self.remember = remember
        self._settings = settings
        self._access = access
        self._shared = access.shared
        self._clock = clock
        self._writer: ThreadPoolExecutor | None = None
        self._writes: set[Future[None]] = set()
        self._lock = threading.Lock()

    @property
    def writes(self) -> bool:
        """Whether answers are written at all (always, to a shared cache)."""
        return self.remember or self._shared

    def put(self, channel: str, batch: list[str], outcome: CheckOutcome) -> None:
        """Write a request's answers (or give up its leases), now or on the writer thread."""
        if self._shared and self._write_later(channel, batch, outcome):
            return
        self._write(channel, batch, outcome)

    def flush(self) -> None:
        """Wait until every answer received so far is in the cache (or given up on)."""
        with self._lock:
            pending = list(self._writes)
        wait(pending)

    def close(self) -> None:
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.shutdown(wait=True)  # answers already paid for are not thrown away

    def _write_later(self, channel: str, batch: list[str], outcome: CheckOutcome) -> bool:
        """Hand the write to the writer thread; ``False`` when the writer is behind, and the
        caller writes itself."""
        with self._lock:
            if len(self._writes) >= self._settings.concurrency * 4:
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

    def _write(self, channel: str, batch: list[str], outcome: CheckOutcome) -> None:
        stored = False
        try:
            if outcome.error is None and self.writes:
                blocked_set = outcome.blocked
                clean = [n for n in batch if n not in blocked_set]
                at = outcome.checked_at or self._clock()
                stored = self._access.guard.call(
                    "set", lambda: self._store(channel, blocked_set, clean, at), False
                )
            if self._shared and not stored:
                # With the answers in the cache for longer than the leases, the leases are moot
                # (those waiting see the answers first, and the leases run out before the
                # answers do): giving them back would only cost a round trip per request.
                # Without answers, or with answers that expire first, others must know at
                # once that they have to ask themselves.
                self._access.release(channel, batch)
        except Exception:  # a bug here must not lose the answer, which is already given
            log.exception("writing %d answers on %s to the cache failed", len(batch), channel)
        finally:
            self._access.inflight.forget(channel, batch)

    def _store(self, channel: str, blocked: frozenset[str], clean: list[str], at: float) -> bool:
        """Write a request's answers; whether every one of them is now in the cache, for at
        least as long as the leases on them last (or the leases would outlive the answers, and
        a later lookup of an expired number would wait out a lease nobody holds)."""
        self._access.cache.set_many(channel, blocked, clean, at)
        settings = self._settings
        lease = lease_seconds(settings)
        return (not clean or settings.cache_ttl >= lease) and (
            not blocked or settings.cache_ttl_blocked >= lease
        )
