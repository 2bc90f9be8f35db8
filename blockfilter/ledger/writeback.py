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

A key rotation re-seals the outbox with the events (:meth:`Ledger.rotate
<blockfilter.ledger.ledger.Ledger.rotate>`), so what was queued still goes out once the old
key is dropped; a row no configured key opens waits, without holding the others back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from typing import Any

from ..config import Settings
from ..errors import BlockfilterError, ConfigError
from ..model import MAX_NUMBERS_PER_REQUEST
from .store import OutboxItem

log = logging.getLogger("blockfilter.ledger.writeback")

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
    # channel -> number -> its rows (two, when processes that differed in their key's order
    # queued it under two hashes: it is sent once, see _states).
    by_channel: dict[str, dict[str, list[OutboxItem]]] = defaultdict(lambda: defaultdict(list))
    unreadable: list[OutboxItem] = []
    for item in items:
        try:
            by_channel[item.channel][sealer.decrypt(item.number_enc)].append(item)
        except ConfigError:
            unreadable.append(item)
    sent = requests = 0
    failed = len(unreadable)
    if unreadable:
        # Kept for when the key is back; the other rows go out meanwhile.
        ledger.store.retry_outbox(unreadable, clock() + RETRY_MAX_S)
        log.warning(
            "%d write-back(s) sealed with a key no longer configured stay queued: put the old "
            "key back after the new one and run `blockfilter optout rotate`",
            len(unreadable),
        )
    for channel, by_number in by_channel.items():
        states = _states(ledger, channel, by_number)
        numbers = list(by_number)
        for start in range(0, len(numbers), MAX_NUMBERS_PER_REQUEST):
            chunk = numbers[start : start + MAX_NUMBERS_PER_REQUEST]
            batch = [item for number in chunk for item in by_number[number]]
            add = [number for number in chunk if states[number]]
            remove = [number for number in chunk if not states[number]]
            requests += 1
            try:
                client.change_blocklist(channel, add=add, remove=remove)
            except (BlockfilterError, ValueError) as exc:
                failed += len(batch)
                attempts = max(i.attempts for i in batch)
                ledger.store.retry_outbox(batch, clock() + _backoff(attempts))
                log.warning(
                    "write-back of %d number(s) on %s failed (%s); queued for a retry",
                    len(chunk),
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


def _states(ledger: Any, channel: str, by_number: dict[str, list[OutboxItem]]) -> dict[str, bool]:
    """number -> the blocklist status to write. A number whose rows disagree gets the state
    the ledger derives for it now (one read for all of them): never both in one request."""
    states = {number: rows[0].blocklisted for number, rows in by_number.items()}
    torn = [n for n, rows in by_number.items() if len({r.blocklisted for r in rows}) > 1]
    if torn:
        out = ledger.opted_out({channel: torn})[channel]
        states.update({number: number in out for number in torn})
    return states


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
