"""One whole-list sync of a channel at a time, in the process and across the fleet.

A sync of the channel already running in this process is joined; one running in another
process (it holds the channel's sync lease in the shared cache) is waited for, and its result
is then read from its mark, with ``pages == 0``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future

from ..config import Settings
from .cache_access import CacheAccess
from .coalesce import lease_seconds
from .sync import SyncResult

__all__ = ["SharedSync"]

# The lease of a whole-list sync: a sync takes many requests, and others wait for it.
_SYNC_LEASE_MIN = 60.0
# What a sync's lease is taken on: a name no phone number can have (it is hashed anyway).
_SYNC_LEASE = "#sync"
# How often a process waiting for another's sync looks at its lease and mark.
_SYNC_POLL = 0.1


class SharedSync:
    """Runs a channel's sync unless another one answers for it.

    :param sizes: the list sizes learnt per channel; a mark that answers for us updates it.
    """

    def __init__(
        self,
        settings: Settings,
        access: CacheAccess,
        *,
        sizes: dict[str, int],
    ) -> None:
        self._access = access
        self._sizes = sizes
        self._lease_s = max(_SYNC_LEASE_MIN, 2 * lease_seconds(settings))

    def run(self, channel: str, sync_now: Callable[[], SyncResult]) -> SyncResult:
        """``sync_now()``, or the result of the sync of ``channel`` that answers for it."""
        registry = self._access.inflight
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
            result = self._across_processes(channel, sync_now)
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

    def _across_processes(self, channel: str, sync_now: Callable[[], SyncResult]) -> SyncResult:
        access = self._access
        before = access.snapshot(channel)
        deadline = time.monotonic() + self._lease_s
        while access.shared:
            held = access.lease(channel, [_SYNC_LEASE], self._lease_s)
            # Another process may be paging this list right now, or have just finished (and
            # let go of the lease): its mark then answers for us.
            mark = access.snapshot(channel)
            if mark is not None and (before is None or mark.synced_at > before.synced_at):
                if held:
                    access.release(channel, [_SYNC_LEASE])
                self._sizes[channel] = mark.size
                return SyncResult(mark.synced_at, mark.size, channel=channel, marked=True)
            if held is None or _SYNC_LEASE in held:
                break
            if time.monotonic() >= deadline:
                break  # its lease should have run out: sync ourselves
            time.sleep(_SYNC_POLL)
        try:
            return sync_now()
        finally:
            if access.shared:
                access.release(channel, [_SYNC_LEASE])
