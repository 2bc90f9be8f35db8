"""Write-back: the ledger's changes sent to Kaleyra's blocklist (``BLOCKFILTER_WRITE_BACK=1``).

Each change of state the ledger records (a number newly opted out, or back in, on a channel)
is queued in the store's outbox, in the same transaction as its event, as the *state* to
write (``blocklist_status`` 1 or 0), one row per number and channel: a later change replaces
an unsent one, so the order of sends cannot leave Kaleyra with a stale state. A flush claims
due rows (a lease, so two processes do not send the same rows), sends them per channel, at
most 100 numbers a request, through the shared client (its retry budget and the fleet's rate
limit), and deletes what was sent unless it changed meanwhile. A failed batch stays queued and
is tried again later, with backoff. None of this delays the local effect: the event is
committed, and in force, before anything is sent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from typing import Any

from ..config import Settings
from ..errors import BlockfilterError
from .store import OutboxItem

log = logging.getLogger("blockfilter.ledger.writeback")

BATCH = 100
#: Seconds a flush holds the rows it claimed.
LEASE_S = 120.0
#: Backoff of a failed batch: 5 s, doubled per failure, at most 10 minutes.
RETRY_BASE_S, RETRY_MAX_S = 5.0, 600.0


def _backoff(attempts: int) -> float:
    return min(RETRY_MAX_S, RETRY_BASE_S * 2 ** min(attempts, 20))


def flush_write_back(
    settings: Settings,
    ledger: Any = None,
    *,
    client: Any = None,
    limit: int = 1000,
    clock: Any = time.time,
) -> dict[str, int]:
    """Send what is due in the outbox now; returns ``{"sent", "requests", "failed", "left"}``
    (numbers sent, POSTs made, numbers whose batch failed, rows still queued)."""
    from .ledger import shared_ledger

    ledger = ledger or shared_ledger(settings)
    if client is None:
        from ..plugins.builtin import SHARED_SOURCES

        client = SHARED_SOURCES.get(settings).client
    sealer = ledger._require_sealer()
    items = ledger.store.claim_outbox(clock(), LEASE_S, limit)
    by_channel: dict[str, list[OutboxItem]] = defaultdict(list)
    for item in items:
        by_channel[item.channel].append(item)
    sent = requests = failed = 0
    for channel, queued in by_channel.items():
        for start in range(0, len(queued), BATCH):
            batch = queued[start : start + BATCH]
            add = [sealer.decrypt(i.number_enc) for i in batch if i.blocklisted]
            remove = [sealer.decrypt(i.number_enc) for i in batch if not i.blocklisted]
            requests += 1
            try:
                client.change_blocklist(channel, add=add, remove=remove)
            except (BlockfilterError, ValueError) as exc:
                failed += len(batch)
                attempts = max(i.attempts for i in batch)
                ledger.store.retry_outbox(batch, clock() + _backoff(attempts))
                log.warning(
                    "write-back of %d number(s) on %s failed (%s); queued for a retry",
                    len(batch),
                    channel,
                    type(exc).__name__,
                )
                continue
            ledger.store.finish_outbox(batch)
            sent += len(batch)
    return {
        "sent": sent,
        "requests": requests,
        "failed": failed,
        "left": ledger.store.outbox_size(),
    }


_lock = threading.Lock()
_running: set[int] = set()


def kick_write_back(settings: Settings, ledger: Any) -> None:
    """Flush the outbox on a background thread (one at a time per ledger), and again later
    while a failed batch waits for its retry."""
    key = id(ledger)
    with _lock:
        if key in _running:
            return
        _running.add(key)

    def run() -> None:
        result: dict[str, int] = {}
        try:
            result = flush_write_back(settings, ledger)
        except Exception as exc:  # a write-back never breaks the caller
            log.warning("write-back failed: %s", type(exc).__name__)
        finally:
            with _lock:
                _running.discard(key)
        if result.get("failed") or result.get("left"):
            timer = threading.Timer(RETRY_BASE_S, kick_write_back, args=(settings, ledger))
            timer.daemon = True
            timer.start()

    threading.Thread(target=run, name="blockfilter-write-back", daemon=True).start()
