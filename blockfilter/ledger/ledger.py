"""The ledger: sealed events in a store, read back as "which of these numbers are opted out".

One :class:`Ledger` per process and settings (:func:`shared_ledger`), so connections outlive a
run. Every read goes to the store: what another process recorded a moment ago is seen by the
next read, with no cache to wait out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..config import CHANNELS, Settings
from ..errors import ConfigError
from .events import ALL_CHANNELS, EVENT_CHANNELS, SCOPES, SOURCES, Event, opted_out_by
from .store import LedgerUnavailable, NewRow, QueuedRow, Store, Writer, open_store

if TYPE_CHECKING:
    from .crypto import Sealer

log = logging.getLogger("blockfilter.ledger")


@dataclass(frozen=True, slots=True)
class Change:
    """An opt-out or opt-in to record, about one number (E.164) on one channel or ``all``.

    :ivar ref: an idempotency reference (a provider's message id, an inbound message's id):
        a change whose ``source`` and ``ref`` were recorded before is not recorded again, so a
        redelivered task or a replayed webhook is harmless. Stored only as a keyed hash.
    """

    number: str
    channel: str
    opted_out: bool
    occurred_at: float
    source: str
    provider: str | None = None
    code: str | None = None
    actor: str | None = None
    ref: str | None = None

    def __post_init__(self) -> None:
        if self.channel not in EVENT_CHANNELS:
            raise ValueError(f"channel must be one of {', '.join(EVENT_CHANNELS)}")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}")


@dataclass(frozen=True, slots=True)
class Recorded:
    """What became of one :class:`Change`.

    :ivar event: the event written (``None`` for a duplicate).
    :ivar changed: whether the number's state changed on some channel: the first opt-out (or
        opt-in) after the opposite, not a repeat. Decided in the write transaction, so two
        workers recording the same STOP at once cannot both see a change.
    :ivar duplicate: its ``ref`` was recorded before; nothing was written.
    """

    event: Event | None
    changed: bool
    duplicate: bool = False


class Ledger:
    """Opt-outs: record changes, answer which numbers are opted out.

    :param store: where the events live.
    :param sealer: the keys; ``None`` when ``BLOCKFILTER_OPTOUT_KEY`` is unset, which is fine
        only while the store holds no event (reads then answer "none opted out"; a write or a
        read of a non-empty store is an error: fail closed).
    :param scope: ``channel`` (an opt-out blocks its own channel; ``all`` events block every
        channel) or ``all`` (any opt-out blocks every channel).
    :param write_back: queue every change of state for Kaleyra (see
        :mod:`blockfilter.ledger.writeback`).
    """

    def __init__(
        self,
        store: Store,
        sealer: Sealer | None,
        *,
        scope: str = "channel",
        write_back: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if scope not in SCOPES:
            raise ConfigError(f"BLOCKFILTER_OPTOUT_SCOPE must be one of {', '.join(SCOPES)}")
        self.store = store
        self.sealer = sealer
        self.scope = scope
        self.write_back = write_back
        #: Flush write-backs on a background thread after each change (``False``: a process
        #: that runs its own flushes, ``blockfilter optout writeback`` say).
        self.auto_flush = True
        self._clock = clock
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"Ledger({self.store!r}, scope={self.scope!r})"

    def _require_sealer(self) -> Sealer:
        if self.sealer is None:
            from .crypto import KEY_SETTING

            raise ConfigError(
                f"{KEY_SETTING} is not set: the opt-out ledger needs a key of its own "
                "(`blockfilter optout keygen` makes one)"
            )
        return self.sealer

    # -- reading ---------------------------------------------------------------------------

    def _check_keys(self, key_ids: set[str]) -> None:
        from .crypto import KEY_SETTING

        if not key_ids:
            return
        if self.sealer is None:
            raise LedgerUnavailable(
                f"the opt-out ledger holds opt-outs but {KEY_SETTING} is not set: "
                "they cannot be looked up"
            )
        unknown = key_ids - set(self.sealer.key_ids)
        if unknown:
            raise LedgerUnavailable(
                f"the opt-out ledger holds opt-outs sealed with a key that is not in "
                f"{KEY_SETTING} (a rotation in progress elsewhere?): they cannot be looked up"
            )

    def events_of(self, numbers: Sequence[str]) -> dict[str, list[Event]]:
        """Every event of each number (one store read)."""
        by_hash: dict[bytes, str] = self.sealer.hash_all(list(numbers)) if self.sealer else {}
        rows, key_ids = self.store.read(list(by_hash))
        self._check_keys(key_ids)
        found: dict[str, list[Event]] = defaultdict(list)
        for number_hash, event in rows:
            number = by_hash.get(number_hash)
            if number is not None:
                found[number].append(event)
        return found

    def ever_written(self) -> bool:
        """Whether the store was ever written to: a ledger never written holds no opt-out.

        :raises LedgerUnavailable: the store cannot tell.
        """
        return self.store.exists()

    def opted_out(self, wanted: Mapping[str, Sequence[str]]) -> dict[str, dict[str, Event]]:
        """channel -> {number: the event that keeps it opted out} for the numbers of
        ``wanted`` (channel -> numbers) that are opted out there. One store read.

        :raises LedgerUnavailable: the store cannot be read, or its keys are not ours.
        """
        numbers = list({n for group in wanted.values() for n in group})
        found: dict[str, dict[str, Event]] = {channel: {} for channel in wanted}
        if not numbers or not self.store.exists():
            return found
        events = self.events_of(numbers)
        if not events:
            return found
        for channel, group in wanted.items():
            hits = found[channel]
            for number in group:
                history = events.get(number)
                if history:
                    event = opted_out_by(history, channel, self.scope)
                    if event is not None:
                        hits[number] = event
        return found

    def state(self, number: str) -> dict[str, Event | None]:
        """channel -> the event that keeps ``number`` opted out there, or ``None``."""
        history = self.events_of([number]).get(number, []) if self.store.exists() else []
        return {channel: opted_out_by(history, channel, self.scope) for channel in CHANNELS}

    # -- writing ---------------------------------------------------------------------------

    def record(self, changes: Sequence[Change], *, drain: bool = True) -> list[Recorded]:
        """Append ``changes`` in one transaction; then (``drain``) wait for the dispatches in
        flight in every process, so that none that read the ledger before the write is still
        going on when this returns. A call from inside a dispatch gate (a dispatch hook that
        reports) cannot wait for itself and does not drain.

        :raises ConfigError: no key. :raises LedgerUnavailable: the write failed (nothing of
            it was recorded).
        """
        if not changes:
            return []
        sealer = self._require_sealer()
        rows = [
            NewRow(
                number_hash=sealer.hash(change.number),
                number_enc=sealer.encrypt(change.number),
                channel=change.channel,
                opted_out=change.opted_out,
                occurred_at=change.occurred_at,
                source=change.source,
                provider=change.provider,
                code=change.code,
                actor=change.actor,
                ref_hash=(
                    sealer.ref_hashes(f"{change.source}\0{change.ref}")[0] if change.ref else None
                ),
                key_id=sealer.current_key_id,
            )
            for change in changes
        ]
        by_hash = sealer.hash_all(list({c.number for c in changes}))
        scope = self.scope
        write_back = self.write_back

        def work(writer: Writer) -> list[Recorded]:
            now = self._clock()
            history: dict[str, list[Event]] = defaultdict(list)
            for number_hash, event in writer.events_for(list(by_hash)):
                history[by_hash[number_hash]].append(event)
            results: list[Recorded] = []
            for change, row in zip(changes, rows, strict=True):
                if change.ref and writer.ref_seen(
                    sealer.ref_hashes(f"{change.source}\0{change.ref}")
                ):
                    results.append(Recorded(None, False, duplicate=True))
                    continue
                events = history[change.number]
                before = {c: opted_out_by(events, c, scope) is not None for c in CHANNELS}
                seq = writer.insert(row, now)
                if seq is None:
                    results.append(Recorded(None, False, duplicate=True))
                    continue
                event = Event(
                    seq,
                    row.channel,
                    row.opted_out,
                    row.occurred_at,
                    now,
                    row.source,
                    row.provider,
                    row.code,
                    row.actor,
                )
                events.append(event)
                after = {c: opted_out_by(events, c, scope) is not None for c in CHANNELS}
                moved = [c for c in CHANNELS if before[c] != after[c]]
                if write_back:
                    for channel in moved:
                        writer.queue_write_back(
                            row.number_hash, channel, row.number_enc, after[channel], now
                        )
                results.append(Recorded(event, bool(moved)))
            return results

        results = self.store.write(work)
        if drain and not self.in_gate and not self.store.drain():
            log.warning(
                "recorded %d opt-out change(s), but dispatches in flight did not finish "
                "within the wait: one of them may still send to these numbers",
                len(changes),
            )
        return results

    # -- the dispatch fence ----------------------------------------------------------------

    @property
    def in_gate(self) -> bool:
        return getattr(self._local, "gates", 0) > 0

    @contextlib.contextmanager
    def gate(self) -> Iterator[None]:
        """Hold the fence for the block (see :mod:`blockfilter.ledger.store`)."""
        with self.store.gate():
            self._local.gates = getattr(self._local, "gates", 0) + 1
            try:
                yield
            finally:
                self._local.gates -= 1

    # -- operators: export and rotation ------------------------------------------------------

    def export(self) -> list[tuple[str, str, Event]]:
        """(number, channel, event) for every number opted out now, per channel: the numbers
        in clear, for a migration."""
        sealer = self._require_sealer()
        number_of: dict[bytes, str] = {}
        for _, number_hash, number_enc, _ in self.store.sealed_rows():
            if number_hash not in number_of:
                number_of[number_hash] = sealer.decrypt(number_enc)
        history: dict[str, list[Event]] = defaultdict(list)
        for number_hash, event in self.store.all_events():
            history[number_of[number_hash]].append(event)
        rows = []
        for number in sorted(history):
            for channel in CHANNELS:
                deciding = opted_out_by(history[number], channel, self.scope)
                if deciding is not None:
                    rows.append((number, channel, deciding))
        return rows

    def rotate(self) -> int:
        """Re-seal every event, and every queued write-back, under the newest key, in one
        write transaction; returns how many events were re-sealed. The older keys may be
        dropped from ``BLOCKFILTER_OPTOUT_KEY`` afterwards: what is queued for Kaleyra still
        goes out, with the right numbers."""
        sealer = self._require_sealer()
        current = sealer.current_key_id

        def work(writer: Writer) -> int:
            seals = [
                (seq, sealer.hash(sealer.decrypt(number_enc)), sealer.rotate(number_enc), current)
                for seq, _, number_enc, key_id in writer.seals()
                if key_id != current
            ]
            writer.reseal_events(seals)
            queued = writer.queued()
            if queued:
                writer.replace_outbox(self._resealed_outbox(writer, sealer, queued))
            writer.set_key_ids([current])
            return len(seals)

        if not self.store.exists():
            return 0
        return self.store.write(work)

    def _resealed_outbox(
        self, writer: Writer, sealer: Sealer, queued: Sequence[QueuedRow]
    ) -> list[QueuedRow]:
        """The outbox under the newest key. Rows are keyed by the number's hash, so a number
        queued under two keys (processes that differed in their key's order) had two rows:
        they become one, holding the state the ledger derives for it now."""
        groups: dict[tuple[bytes, str], list[QueuedRow]] = defaultdict(list)
        for row in queued:
            number_hash = sealer.hash(sealer.decrypt(row.number_enc))
            groups[number_hash, row.channel].append(
                replace(row, number_hash=number_hash, number_enc=sealer.rotate(row.number_enc))
            )
        twice = [hash_ for (hash_, _), rows in groups.items() if len(rows) > 1]
        history: dict[bytes, list[Event]] = defaultdict(list)
        for number_hash, event in writer.events_for(twice) if twice else ():
            history[number_hash].append(event)
        resealed = []
        for (number_hash, channel), rows in groups.items():
            if len(rows) == 1:
                resealed.append(rows[0])
                continue
            now_out = opted_out_by(history[number_hash], channel, self.scope) is not None
            resealed.append(
                replace(
                    rows[0],
                    blocklisted=now_out,
                    version=max(r.version for r in rows) + 1,
                    attempts=0,
                    due_at=min(r.due_at for r in rows),
                    claimed_until=None,
                )
            )
        return resealed

    def close(self) -> None:
        self.store.close()


def make_ledger(settings: Settings) -> Ledger:
    """A new ledger from the settings (``BLOCKFILTER_OPTOUT_*``)."""
    sealer = None
    if settings.optout_key:
        from .crypto import Sealer

        sealer = Sealer(settings.optout_key)
    return Ledger(
        open_store(settings.optout_url),
        sealer,
        scope=settings.optout_scope,
        write_back=settings.write_back,
    )


def _ledger_key(settings: Settings) -> tuple[object, ...]:
    return (
        settings.optout_url,
        settings.optout_key,
        settings.optout_scope,
        settings.write_back,
        # The default SQLite file follows the user's data directory.
        os.environ.get("XDG_DATA_HOME") if settings.optout_url is None else None,
    )


_shared: dict[tuple[object, ...], Ledger] = {}
_shared_lock = threading.Lock()


def shared_ledger(settings: Settings) -> Ledger:
    """This process's ledger for these settings, made on first use."""
    key = _ledger_key(settings)
    with _shared_lock:
        ledger = _shared.get(key)
        if ledger is None:
            ledger = _shared[key] = make_ledger(settings)
        return ledger


def forget_shared_ledgers() -> None:
    """Close and forget every shared ledger (tests)."""
    with _shared_lock:
        ledgers = list(_shared.values())
        _shared.clear()
    for ledger in ledgers:
        ledger.close()


__all__ = [
    "ALL_CHANNELS",
    "Change",
    "Ledger",
    "LedgerUnavailable",
    "Recorded",
    "make_ledger",
    "shared_ledger",
]
