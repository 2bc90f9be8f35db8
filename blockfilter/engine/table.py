"""What a run has learnt about each number, per channel: the status table the sources fill.

A status is a small tuple: ``(kind, value)`` while a number is unchecked (``value``: why), or
``(kind, checked_at, origin, provenance)`` once a source answered. :class:`StatusTable` joins
the answers of several sources, failing closed (see its documentation).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
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


class StatusTable:
    """What the run has learnt, per channel and number: clean, blocklisted or unchecked.

    One dict a channel, from a number's key to its status ``(kind, value)``; every number of
    one answer shares one status tuple, so a million numbers cost their keys and dict slots
    and little else. A number handed to the sources is marked :data:`ASKED` first (so it is
    never handed over twice), which reads as unchecked until an answer replaces it: a source
    that skips a number leaves it unchecked (fail closed), and it is not asked again.

    Sources are joined here: blocklisted anywhere wins; otherwise a failure anywhere leaves the
    number unchecked; a clean or blocklisted status keeps the oldest time any source gave.
    """

    def __init__(self) -> None:
        # (kind, value) when unchecked; (kind, checked_at, origin, provenance) when answered.
        self._status: dict[str, dict[int, tuple[Any, ...]]] = {c: {} for c in CHANNELS}

    def want(self, channel: str, key: int) -> bool:
        """Mark a number as asked; false if it was asked (or known) already."""
        statuses = self._status[channel]
        if key in statuses:
            return False
        statuses[key] = ASKED
        return True

    def record(self, outcome: CheckOutcome, origin: str) -> None:
        """Join ``outcome`` in; ``origin`` names what answered (the verdict's ``source``)."""
        statuses = self._status[outcome.channel]
        if outcome.error is not None:
            failed = (FAILED, _failure_reason(outcome.error))
            for number in outcome.numbers:
                key = _key(number)
                if statuses.get(key, ASKED)[0] != BLOCKED:
                    statuses[key] = failed
            return
        checked_at = outcome.checked_at if outcome.checked_at is not None else time.time()
        provenance = _provenance(outcome.provenance)
        clean = (CLEAN, checked_at, origin, provenance)
        blocked = (BLOCKED, checked_at, origin, provenance)
        for number in outcome.numbers:
            key = _key(number)
            new = blocked if number in outcome.blocked else clean
            old = statuses.get(key, ASKED)
            if old is ASKED or _RANK[new[0]] > _RANK[old[0]]:
                statuses[key] = new
            elif new[0] == old[0] and checked_at < old[1]:
                statuses[key] = new  # the same answer, learnt earlier

    def lookup(self, channel: str, key: int) -> tuple[Any, ...] | None:
        """The number's status; ``None`` if it was never asked."""
        return self._status[channel].get(key)


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
