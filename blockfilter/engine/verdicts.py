"""How a message's statuses become its verdict: the verdict fields and the final channel.

Pure: given the parsed message, the status table and the policies (where to fall back, what
to do with an unchecked number), the same verdict every time, whichever way the messages
came in (Python objects, JSON Lines, a Celery task).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, cast

from ..model import Invalid, Parsed, Reason, Verdict, channel_of, has_usable_id
from .table import (
    BLOCKED,
    CLEAN,
    FAILED,
    FAILED_BUDGET,
    FAILED_CHECK,
    FAILED_CREDENTIALS,
    StatusTable,
)

#: Where a message blocklisted on its channel may go instead, in order of preference.
FallbackPolicy = Callable[[Mapping[str, Any], Parsed], Sequence[str]]


class IsoTimes:
    """ISO 8601 strings of checked_at times; a batch shares one time, so memoise a few."""

    def __init__(self) -> None:
        self._memo: dict[float, str] = {}

    def __call__(self, epoch: float) -> str:
        text = self._memo.get(epoch)
        if text is None:
            if len(self._memo) > 4096:
                self._memo.clear()
            text = (
                datetime.fromtimestamp(epoch, timezone.utc)
                .isoformat(timespec="milliseconds")
                .replace("+00:00", "Z")
            )
            self._memo[epoch] = text
        return text


class Verdicts:
    """Verdicts under one on-error policy (``defer``, ``allow`` or ``drop``)."""

    def __init__(self, on_error: str) -> None:
        self.on_error = on_error
        self._iso = IsoTimes()

    def verdict(
        self,
        message: Any,
        parsed: Parsed | Invalid,
        table: StatusTable,
        fallback_policy: FallbackPolicy,
        position: int = 0,
    ) -> tuple[dict[str, Any], str]:
        """The verdict fields of a message and its final channel. ``position`` (1-based, the
        line number over JSON Lines) names the record of a message without a usable id."""
        if isinstance(parsed, Invalid):
            fields: dict[str, Any] = {"verdict": Verdict.INVALID, "reason": parsed.reason}
            if parsed.detail:
                fields["detail"] = parsed.detail
            if position and not has_usable_id(message):
                fields = {"id": str(position), **fields}
            return fields, channel_of(message)
        status: tuple[Any, ...] = table.lookup(parsed.channel, parsed.key) or (
            FAILED,  # a source skipped the number: treat it as unchecked
            FAILED_CHECK,
        )
        settled = self.settled(parsed, status)
        if settled is not None:
            return settled
        for channel in fallback_policy(message, parsed):
            fallback = table.lookup(channel, parsed.key) or (FAILED, FAILED_CHECK)
            kind, value = fallback[0], cast(Any, fallback[1])
            if kind == BLOCKED:
                continue
            if kind == CLEAN:
                return _with_provenance(
                    {
                        "verdict": Verdict.REROUTED,
                        "e164": parsed.e164,
                        "checked_at": self._iso(value),
                        "channel": channel,
                        "original_channel": parsed.channel,
                        "source": fallback[2],
                    },
                    fallback,
                ), channel
            return self._unchecked(parsed, value, channel)
        return _with_provenance(
            {
                "verdict": Verdict.BLOCKED,
                "e164": parsed.e164,
                "checked_at": self._iso(status[1]),
                "reason": "blocklisted",
                "source": status[2],
            },
            status,
        ), parsed.channel

    def settled(self, parsed: Parsed, status: tuple[Any, ...]) -> tuple[dict[str, Any], str] | None:
        """The verdict of a message whose status on its own channel is ``status``, when that
        settles it (clean, or unchecked); ``None`` when it is blocklisted there, and its
        fallbacks decide."""
        kind = status[0]
        if kind == CLEAN:
            return self._allowed(parsed, status), parsed.channel
        if kind == FAILED:
            return self._unchecked(parsed, status[1], parsed.channel)
        return None

    def _allowed(self, parsed: Parsed, status: tuple[Any, ...]) -> dict[str, Any]:
        return _with_provenance(
            {
                "verdict": Verdict.ALLOWED,
                "e164": parsed.e164,
                "checked_at": self._iso(status[1]),
                "source": status[2],
            },
            status,
        )

    def _unchecked(self, parsed: Parsed, failure: str, channel: str) -> tuple[dict[str, Any], str]:
        """The verdict for a message whose ``channel`` could not be checked."""
        if failure == FAILED_CREDENTIALS:
            # A refused account is not a passing glitch to fail open on: always deferred.
            return {
                "verdict": Verdict.DEFERRED,
                "e164": parsed.e164,
                "reason": Reason.CREDENTIALS_REFUSED,
            }, parsed.channel
        if failure == FAILED_BUDGET or self.on_error == "defer":
            fields = {
                "verdict": Verdict.DEFERRED,
                "e164": parsed.e164,
                "reason": Reason.CHECK_FAILED,
            }
            if failure == FAILED_BUDGET:
                fields["detail"] = "--max-requests reached before this number was checked"
            return fields, parsed.channel
        if self.on_error == "allow":
            if channel == parsed.channel:
                return {
                    "verdict": Verdict.ALLOWED,
                    "e164": parsed.e164,
                    "checked_at": None,
                    "reason": "unchecked",
                }, channel
            return {
                "verdict": Verdict.REROUTED,
                "e164": parsed.e164,
                "checked_at": None,
                "channel": channel,
                "original_channel": parsed.channel,
                "reason": "unchecked",
            }, channel
        return {
            "verdict": Verdict.BLOCKED,
            "e164": parsed.e164,
            "checked_at": None,
            "reason": "unchecked",
        }, parsed.channel


def _with_provenance(fields: dict[str, Any], status: tuple[Any, ...]) -> dict[str, Any]:
    """``fields`` with what the answering source said of its answer (``age_s``,
    ``ledger_event``...), which names no number."""
    provenance = status[3]
    if provenance:
        fields.update(provenance)
    return fields
