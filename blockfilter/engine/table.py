"""What a run has learnt about each number, per channel: the status table the sources fill.

A status is a small tuple: ``(kind, value)`` while a number is unchecked (``value``: why), or
``(kind, checked_at, origin, provenance)`` once a source answered; numbers refer to their
status by its index in flat arrays, so the table costs bytes, not objects, a number.
:class:`StatusTable` joins the answers of several sources, failing closed (see its
documentation).
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable, Mapping
from typing import Any, Final

from ..config import CHANNELS
from ..errors import CredentialsRefused, RequestBudgetExhausted
from ..model import PROVENANCE_FIELDS, Reason
from ..sources import CheckOutcome

# Why a number could not be checked; interned so a million failures share three strings.
FAILED_CHECK: Final = Reason.CHECK_FAILED
FAILED_CREDENTIALS: Final = Reason.CREDENTIALS_REFUSED
FAILED_BUDGET: Final = "request_budget"

CLEAN, BLOCKED, FAILED = 0, 1, 2
# The status of a number handed to the sources and not answered (yet): unchecked.
ASKED: Final = (FAILED, FAILED_CHECK)
# Which status a later answer of another source may replace: blocklisted anywhere wins, then
# a failure (unchecked), then clean.
_RANK = {CLEAN: 0, FAILED: 1, BLOCKED: 2}


def _key(e164: str) -> int:
    # E.164 never starts with a 0 after the "+", so the digits as an int are a lossless,
    # compact key: a small int takes half the memory of the string.
    return int(e164[1:])


# A key's first slot: Fibonacci hashing spreads keys that differ only in some digits
# (numbers of one range) over the whole table; the top bits scaled to the table's size.
_MIX: Final = 0x9E3779B97F4A7C15
_MASK64: Final = (1 << 64) - 1
_EMPTY: Final = 0  # no E.164 key is 0
_MAX_KEY: Final = (1 << 63) - 1  # what an array("q") slot holds
# A size hint above this is not trusted up front: the table grows as it fills instead.
_EXPECTED_AT_MOST: Final = 1 << 16


class _Slots:
    """One channel's statuses: an open-addressing hash table of two flat arrays, a key's
    slot holding its key (8 bytes) and the index of its status (4 bytes), where a dict would
    cost an int object, a key slot and an entry (about 80 bytes a number). Keys outside
    ``(0, 2**63)`` (none an E.164 number makes) go in a dict beside it."""

    __slots__ = ("keys", "values", "count", "_capacity", "_odd")

    def __init__(self, expected: int = 0) -> None:
        self.count = 0
        # Room for ``expected`` keys at most three quarters full: a table sized up front does
        # not grow (a worker's batch of 1,000 grew thirteen times from 8).
        self._capacity = max(8, expected + expected // 3 + 1)
        self.keys = array("q", bytes(8 * self._capacity))
        self.values = array("i", bytes(4 * self._capacity))
        self._odd: dict[int, int] = {}

    def find(self, key: int) -> int:
        """The slot of ``key`` (in range): where it is, or the empty one where it would go."""
        keys = self.keys
        capacity = self._capacity
        slot = (((key * _MIX) & _MASK64) * capacity) >> 64
        while True:
            found = keys[slot]
            if found in (key, _EMPTY):
                return slot
            slot += 1
            if slot == capacity:
                slot = 0

    def get(self, key: int) -> int:
        """The status index of ``key``; -1 if it has none."""
        if 0 < key <= _MAX_KEY:
            keys = self.keys
            capacity = self._capacity
            slot = (((key * _MIX) & _MASK64) * capacity) >> 64  # find(), inlined: hot
            while True:
                found = keys[slot]
                if found == key:
                    return self.values[slot]
                if found == _EMPTY:
                    return -1
                slot += 1
                if slot == capacity:
                    slot = 0
        return self._odd.get(key, -1)

    def add(self, key: int) -> bool:
        """Give ``key`` the status index 0 if it has none; false if it had one."""
        if not 0 < key <= _MAX_KEY:
            if key in self._odd:
                return False
            self._odd[key] = 0
            return True
        keys = self.keys
        capacity = self._capacity
        slot = (((key * _MIX) & _MASK64) * capacity) >> 64  # find(), inlined: hot
        while True:
            found = keys[slot]
            if found == key:
                return False
            if found == _EMPTY:
                break
            slot += 1
            if slot == capacity:
                slot = 0
        count = self.count = self.count + 1
        if 4 * count > 3 * capacity:  # at most three quarters full
            self._grow()
            slot = self.find(key)
            keys = self.keys
        keys[slot] = key  # its value is 0 already: a free slot holds 0
        return True

    def set(self, key: int, value: int) -> int:
        """Give ``key`` the status ``value``; its index before, -1 if it had none."""
        if not 0 < key <= _MAX_KEY:
            old = self._odd.get(key, -1)
            self._odd[key] = value
            return old
        slot = self.find(key)
        if self.keys[slot] == key:
            old = self.values[slot]
            self.values[slot] = value
            return old
        self._insert(slot, key, value)
        return -1

    def _insert(self, slot: int, key: int, value: int) -> None:
        """Put ``key``, which the table lacks, in ``slot`` (where find() stopped)."""
        self.count += 1
        if 4 * self.count > 3 * self._capacity:  # at most three quarters full
            self._grow()
            slot = self.find(key)
        self.keys[slot] = key
        self.values[slot] = value

    def _grow(self) -> None:
        old_keys, old_values = self.keys, self.values
        capacity = self._capacity = self._capacity + self._capacity // 2
        keys = self.keys = array("q", bytes(8 * capacity))
        values = self.values = array("i", bytes(4 * capacity))
        # find(), inlined: a growing table moves every key it holds.
        for key, value in zip(old_keys, old_values, strict=True):
            if key != _EMPTY:
                slot = (((key * _MIX) & _MASK64) * capacity) >> 64
                while keys[slot] != _EMPTY:
                    slot += 1
                    if slot == capacity:
                        slot = 0
                keys[slot] = key
                values[slot] = value


class StatusTable:
    """What the run has learnt, per channel and number: clean, blocklisted or unchecked.

    A status is one of few tuples (every number of one answer shares its answer's), kept once
    in a list; each channel maps a number's key to its status's index in flat arrays
    (:class:`_Slots`), so a million numbers cost some 16 to 24 bytes each. A number handed to
    the sources is marked :data:`ASKED` first (so it is never handed over twice), which reads
    as unchecked until an answer replaces it: a source that skips a number leaves it
    unchecked (fail closed), and it is not asked again.

    Sources are joined here: blocklisted anywhere wins; otherwise a failure anywhere leaves the
    number unchecked; a clean or blocklisted status keeps the oldest time any source gave.
    """

    def __init__(self, expected: int = 0) -> None:
        """:param expected: about how many numbers a channel will hold (a hint: the table
        grows past it)."""
        # (kind, value) when unchecked; (kind, checked_at, origin, provenance) when answered.
        self._statuses: list[tuple[Any, ...]] = [ASKED]
        # The statuses of failures, once a reason. Not ASKED's, even for the same reason: a
        # failure is an answer a later clean one must not replace (ASKED is by identity).
        self._failures: dict[str, int] = {}
        expected = min(expected, _EXPECTED_AT_MOST)
        self._slots: dict[str, _Slots] = {c: _Slots(expected) for c in CHANNELS}
        # The keys of each channel's blocklisted numbers, in the order they became so (a
        # status blocklisted stays so): the fallback rounds look at these few, not at the
        # status of every message.
        self._blocked: dict[str, array[int]] = {c: array("q") for c in CHANNELS}
        self._blocked_odd: set[tuple[str, int]] = set()

    def want(self, channel: str, key: int) -> bool:
        """Mark a number as asked; false if it was asked (or known) already."""
        return self._slots[channel].add(key)  # index 0: ASKED

    def wanting(self) -> dict[str, Callable[[int], bool]]:
        """:meth:`want` of each channel, for a caller that asks a number at a time."""
        return {channel: slots.add for channel, slots in self._slots.items()}

    def record(self, outcome: CheckOutcome, origin: str) -> None:
        """Join ``outcome`` in; ``origin`` names what answered (the verdict's ``source``)."""
        slots = self._slots[outcome.channel]
        statuses = self._statuses
        if outcome.error is not None:
            failed = self._failure(_failure_reason(outcome.error))
            for number in outcome.numbers:
                key = _key(number)
                was = slots.get(key)
                if was < 0 or statuses[was][0] != BLOCKED:
                    slots.set(key, failed)
            return
        checked_at = outcome.checked_at if outcome.checked_at is not None else time.time()
        provenance = _provenance(outcome.provenance)
        # Each answer's two statuses, added to the list the first time a number takes one.
        given = {CLEAN: -1, BLOCKED: -1}
        blocked = outcome.blocked
        blocked_keys = self._blocked[outcome.channel]
        keys, values, find = slots.keys, slots.values, slots.find
        for number in outcome.numbers:
            key = int(number[1:])  # _key(), inlined
            kind = BLOCKED if number in blocked else CLEAN
            # One probe a number: the slot is read and written in place (every number of an
            # answer was asked, so it is there; one that was not goes through set()).
            slot = find(key) if 0 < key <= _MAX_KEY else -1
            if slot >= 0 and keys[slot] == key:
                old_index = values[slot]
            else:
                slot, old_index = -1, slots.get(key)
            old = statuses[old_index] if old_index >= 0 else ASKED
            if (
                old is ASKED
                or _RANK[kind] > _RANK[old[0]]
                or (kind == old[0] and checked_at < old[1])  # the same answer, learnt earlier
            ):
                if kind == BLOCKED and (old is ASKED or old[0] != BLOCKED):
                    if 0 < key <= _MAX_KEY:
                        blocked_keys.append(key)
                    else:  # no E.164 key: one a source gave, beyond what the array holds
                        self._blocked_odd.add((outcome.channel, key))
                new = given[kind]
                if new < 0:
                    new = given[kind] = len(statuses)
                    statuses.append((kind, checked_at, origin, provenance))
                if slot >= 0:
                    values[slot] = new
                else:
                    slots.set(key, new)  # may grow the table: its arrays are new
                    keys, values = slots.keys, slots.values

    def blocked_keys(self, channel: str) -> set[int]:
        """The keys of the numbers blocklisted on ``channel`` so far."""
        keys = set(self._blocked[channel])
        keys.update(key for named, key in self._blocked_odd if named == channel)
        return keys

    def lookup(self, channel: str, key: int) -> tuple[Any, ...] | None:
        """The number's status; ``None`` if it was never asked."""
        index = self._slots[channel].get(key)
        return self._statuses[index] if index >= 0 else None

    def status_index(self, channel: str, key: int) -> int:
        """Where the number's status is in the table (:meth:`status_at`); -1 if it was never
        asked. Numbers of one answer share an index."""
        return self._slots[channel].get(key)

    def status_at(self, index: int) -> tuple[Any, ...]:
        """The status at ``index``, one :meth:`status_index` gave."""
        return self._statuses[index]

    def _failure(self, reason: str) -> int:
        index = self._failures.get(reason)
        if index is None:
            index = self._failures[reason] = len(self._statuses)
            self._statuses.append((FAILED, reason))
        return index


def _failure_reason(error: BaseException) -> str:
    if isinstance(error, CredentialsRefused):
        return FAILED_CREDENTIALS
    if isinstance(error, RequestBudgetExhausted):
        return FAILED_BUDGET
    return FAILED_CHECK


def _provenance(given: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The fields of a source's provenance a verdict may carry (once per outcome)."""
    if not given:
        return None
    kept = {name: value for name, value in given.items() if name in PROVENANCE_FIELDS}
    return kept or None
