"""The thread pools of a Kaleyra source, each made on first use.

Three pools, because work that waits must not wait on the pool it waits for: requests run on
one of ``BLOCKFILTER_CONCURRENCY`` threads; waiting for other processes' answers is kept off
it (a full pool of waiters would stall the requests they wait for), and so is a whole-list
sync (it waits for its pages on the request pool).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from ..config import CHANNELS

__all__ = ["Pools"]

_WAITERS = 4


class Pools:
    def __init__(self, concurrency: int) -> None:
        self._sizes = {"check": concurrency, "wait": _WAITERS, "sync": len(CHANNELS)}
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._lock = threading.Lock()

    @property
    def requests(self) -> ThreadPoolExecutor:
        return self._pool("check")

    @property
    def waiters(self) -> ThreadPoolExecutor:
        return self._pool("wait")

    @property
    def syncers(self) -> ThreadPoolExecutor:
        return self._pool("sync")

    def close(self) -> None:
        """Stop the threads; work not started yet is cancelled."""
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)

    def _pool(self, kind: str) -> ThreadPoolExecutor:
        with self._lock:
            pool = self._pools.get(kind)
            if pool is None:
                pool = self._pools[kind] = ThreadPoolExecutor(
                    max_workers=self._sizes[kind], thread_name_prefix=f"blockfilter-{kind}"
                )
            return pool
