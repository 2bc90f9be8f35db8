"""Opt-out events and the state derived from them.

The ledger only ever appends events; whether a number is opted out now is *derived*: of the
events that apply to a channel, the newest by its own time (when the provider, the person or
the operator said it, not when it reached the ledger) wins. So a late event about the past
cannot undo a newer one, whatever order workers write them in. Two events at the same instant
resolve to "opted out" (the safe side), then by the order they were written.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Final

from ..config import CHANNELS

#: An event's channel may also be this: it applies to every channel.
ALL_CHANNELS: Final = "all"
EVENT_CHANNELS: Final = (*CHANNELS, ALL_CHANNELS)
SCOPES: Final = ("channel", "all")

# Where an event came from.
SOURCE_SEND_RESULT: Final = "send_result"
SOURCE_INBOUND: Final = "inbound"
SOURCE_OPERATOR: Final = "operator"
SOURCE_IMPORT: Final = "import"
SOURCES: Final = (SOURCE_SEND_RESULT, SOURCE_INBOUND, SOURCE_OPERATOR, SOURCE_IMPORT)

# An event time this far ahead of the ledger's clock is taken as now: a future-dated opt-in
# would otherwise outrank every real opt-out until that date.
MAX_CLOCK_SKEW_S: Final = 300.0
# Nothing about a phone number's consent predates this (2000-01-01): an earlier time is a bug.
_EARLIEST: Final = 946684800.0


@dataclass(frozen=True, slots=True)
class Event:
    """One stored event (the number itself stays sealed in the store).

    :ivar seq: the store's own order of writing.
    :ivar channel: ``sms``, ``whatsapp``, ``voice`` or ``all``.
    :ivar opted_out: ``True``: opted out; ``False``: opted back in.
    :ivar occurred_at: epoch seconds at which it happened (the event's own time).
    :ivar recorded_at: epoch seconds at which the ledger wrote it.
    :ivar source: ``send_result``, ``inbound``, ``operator`` or ``import``.
    :ivar provider: the provider that reported it (``kaleyra``, ``twilio``...), if any.
    :ivar code: the provider's code or the keyword that meant it (``OPT-OUT``, ``STOP``).
    :ivar actor: by whom (an operator's name, ``recipient``, ``provider``).
    """

    seq: int
    channel: str
    opted_out: bool
    occurred_at: float
    recorded_at: float
    source: str
    provider: str | None
    code: str | None
    actor: str | None

    def describe(self) -> dict[str, Any]:
        """The event as provenance: what a verdict, ``optout show`` or a log may carry (no
        number)."""
        return {
            "event": self.seq,
            "action": "opt_out" if self.opted_out else "opt_in",
            "channel": self.channel,
            "source": self.source,
            "provider": self.provider,
            "code": self.code,
            "by": self.actor,
            "at": iso(self.occurred_at),
            "recorded_at": iso(self.recorded_at),
        }


def iso(epoch: float) -> str:
    return (
        datetime.fromtimestamp(epoch, timezone.utc)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def _rank(event: Event) -> tuple[float, bool, int]:
    return event.occurred_at, event.opted_out, event.seq


def applies(event_channel: str, channel: str, scope: str) -> bool:
    """Whether an event on ``event_channel`` speaks for ``channel`` under ``scope``."""
    return scope == "all" or event_channel in (ALL_CHANNELS, channel)


def deciding_event(events: Iterable[Event], channel: str, scope: str) -> Event | None:
    """The newest event that applies to ``channel``; ``None`` when none does."""
    newest: Event | None = None
    for event in events:
        if applies(event.channel, channel, scope) and (
            newest is None or _rank(event) > _rank(newest)
        ):
            newest = event
    return newest


def opted_out_by(events: Iterable[Event], channel: str, scope: str) -> Event | None:
    """The event that keeps the number opted out on ``channel``, or ``None`` if it is not."""
    event = deciding_event(events, channel, scope)
    return event if event is not None and event.opted_out else None


def event_time(value: Any, *, now: float | None = None) -> float:
    """An event's own time from what a caller gave: ``None`` (now), epoch seconds, a
    :class:`datetime` or an ISO 8601 string. A time in the future (beyond a few minutes of
    skew) is taken as now.

    :raises ValueError: not a time, not finite, or before 2000.
    """
    now = time.time() if now is None else now
    if value is None:
        return now
    if isinstance(value, bool):
        raise ValueError("an event time is epoch seconds or ISO 8601, not a boolean")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, datetime):
        seconds = (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"not an ISO 8601 time: {value[:40]!r}") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        seconds = parsed.timestamp()
    else:
        raise ValueError(f"an event time is epoch seconds or ISO 8601, not {type(value).__name__}")
    if not math.isfinite(seconds) or seconds < _EARLIEST:
        raise ValueError("an event time must be a finite time after 2000-01-01")
    return min(seconds, now) if seconds > now + MAX_CLOCK_SKEW_S else seconds
