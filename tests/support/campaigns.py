"""Campaigns for the failure tests, and what should become of them, computed independently.

A test that injects failures can only say "nothing wrong got through" if it knows the truth on
its own: :func:`truth` derives every message's verdict from the blocklist without the engine,
and :func:`logical_requests` counts the API requests a fault-free run needs (per channel and
fallback round, 100 numbers a request), which is what the documented retry budget multiplies.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

CHANNELS = ("sms", "whatsapp", "voice")
DISPATCHED = frozenset({"allowed", "rerouted"})
SUPPRESSED = frozenset({"blocked", "invalid", "deferred"})
NOT_A_NUMBER = "12"


def number(index: int) -> str:
    """A valid Indian mobile number, distinct for every ``index`` below 10**8."""
    return f"+9197{index:08d}"


@dataclass
class Campaign:
    """Messages, the blocklist the simulator holds for them, and the truth about each."""

    messages: list[dict[str, Any]]
    blocked: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))

    @property
    def ids(self) -> Counter[str]:
        return Counter(m["id"] for m in self.messages)

    def truth(self) -> list[tuple[str, str, str]]:
        """(id, verdict, final channel) per message (see :func:`truth`)."""
        return truth(self.messages, self.blocked)

    def logical_requests(self) -> int:
        """API requests of a fault-free run (see :func:`logical_requests`)."""
        return logical_requests(self.messages, self.blocked)


def make_campaign(tag: str, base: int, size: int = 60) -> Campaign:
    """``size`` messages on every channel, ids ``<tag>-<n>``, numbers from ``base`` up.

    Every fifth message is blocklisted on its channel (half of those have a fallback that is
    not), some on their first fallback too, some everywhere; a few share a number; one has a
    number that is not one, one an unknown channel, and the last repeats the first one's id.
    Every message carries fields that must come through untouched (a big integer, unicode).
    """
    campaign = Campaign([])
    for i in range(size):
        channel = CHANNELS[i % 3]
        to = number(base + (i - 1 if i % 15 == 1 else i))
        message: dict[str, Any] = {
            "id": f"{tag}-{i}",
            "channel": channel.upper() if i % 11 == 0 else channel,
            "to": to,
            "payload": {"big": 2**70 + i, "text": "नमस्ते", "n": i},
        }
        if i % 4 in (0, 1):
            message["fallback"] = [c for c in ("whatsapp", "voice", "sms") if c != channel]
        if i % 5 == 0:
            campaign.blocked[channel].add(to)
            fallback = message.get("fallback", [])
            if i % 15 == 0 and fallback:
                campaign.blocked[fallback[0]].add(to)
            if i % 30 == 0 and fallback:
                campaign.blocked[fallback[1]].add(to)
        if i == 7:
            message["to"] = NOT_A_NUMBER
        campaign.messages.append(message)
    campaign.messages.append({"id": f"{tag}-fax", "channel": "fax", "to": number(base)})
    campaign.messages.append({"id": f"{tag}-0", "channel": "sms", "to": number(base + 1)})
    return campaign


def _valid(message: Mapping[str, Any]) -> bool:
    return message["channel"].lower() in CHANNELS and message["to"] != NOT_A_NUMBER


def truth(
    messages: Iterable[Mapping[str, Any]], blocked: Mapping[str, set[str]]
) -> list[tuple[str, str, str]]:
    """(id, verdict, final channel) per message, in order, from the blocklist alone."""
    seen: set[str] = set()
    outcome: list[tuple[str, str, str]] = []
    for m in messages:
        channel = m["channel"].lower()
        if m["id"] in seen or not _valid(m):
            outcome.append((m["id"], "invalid", channel))
            continue
        seen.add(m["id"])
        if m["to"] not in blocked.get(channel, ()):
            outcome.append((m["id"], "allowed", channel))
            continue
        for fallback in m.get("fallback", []):
            if m["to"] not in blocked.get(fallback, ()):
                outcome.append((m["id"], "rerouted", fallback))
                break
        else:
            outcome.append((m["id"], "blocked", channel))
    return outcome


def _requests(wanted: Mapping[str, set[str]]) -> Counter[str]:
    return Counter(
        {channel: math.ceil(len(numbers) / 100) for channel, numbers in wanted.items() if numbers}
    )


def primary_requests(messages: Sequence[Mapping[str, Any]]) -> Counter[str]:
    """Requests per channel of the first round: the message's own channels."""
    wanted: dict[str, set[str]] = defaultdict(set)
    seen: set[str] = set()
    for m in messages:
        if m["id"] in seen or not _valid(m):
            continue
        seen.add(m["id"])
        wanted[m["channel"].lower()].add(m["to"])
    return _requests(wanted)


def logical_requests(messages: Sequence[Mapping[str, Any]], blocked: Mapping[str, set[str]]) -> int:
    """API requests a fault-free run with an empty cache makes: the first round, then one
    round per fallback level for the numbers still blocklisted everywhere known."""
    total = sum(primary_requests(messages).values())
    firsts: list[Mapping[str, Any]] = []
    seen: set[str] = set()
    for m in messages:
        if m["id"] not in seen and _valid(m):
            seen.add(m["id"])
            firsts.append(m)
    known: set[tuple[str, str]] = {(m["channel"].lower(), m["to"]) for m in firsts}
    while True:
        wanted: dict[str, set[str]] = defaultdict(set)
        for m in firsts:
            if m["to"] not in blocked.get(m["channel"].lower(), ()):
                continue
            for fallback in m.get("fallback", []):
                if (fallback, m["to"]) not in known:
                    wanted[fallback].add(m["to"])
                    break
                if m["to"] not in blocked.get(fallback, ()):
                    break
        if not wanted:
            return total
        total += sum(_requests(wanted).values())
        known |= {(channel, n) for channel, numbers in wanted.items() for n in numbers}


def mixed_campaign(
    size: int,
    id_prefix: str,
    *,
    share_every: int,
    share_back: int,
    second_fallback_every: int = 0,
    numbered: Callable[[int], str] = number,
) -> tuple[list[dict[str, Any]], dict[str, set[str]]]:
    """Messages on every channel, as a pipeline sends them, and the blocklist to load.

    Channel names in odd case now and then; every ``share_every``-th message shares the number
    of the one ``share_back`` before it; every 5th has fallbacks, every 7th is blocklisted on
    its channel (every 14th on its first fallback too, every ``second_fallback_every``-th on
    its second); every 97th is not a number. Payloads a JSON round trip must keep as they are.
    ``numbered`` gives the i-th number (a test module keeps to numbers of its own).
    """
    channels = ("sms", "whatsapp", "sms", "voice")
    blocked: dict[str, set[str]] = defaultdict(set)
    messages: list[dict[str, Any]] = []
    for i in range(size):
        channel = channels[i % len(channels)]
        to = numbered(i - share_back if i % share_every == share_back else i)
        message: dict[str, Any] = {
            "id": f"{id_prefix}{i}",
            "channel": channel.upper() if i % 11 == 0 else channel,
            "to": to,
            "payload": {"big": 2**70 + i, "text": "नमस्ते", "n": i},
        }
        if i % 5 == 0:
            message["fallback"] = [c for c in ("whatsapp", "voice", "sms") if c != channel]
        if i % 7 == 0:
            blocked[channel].add(to)
            if i % 14 == 0 and "fallback" in message:
                blocked[message["fallback"][0]].add(to)
            if second_fallback_every and i % second_fallback_every == 0 and "fallback" in message:
                blocked[message["fallback"][1]].add(to)
        if i % 97 == 0:
            message["to"] = NOT_A_NUMBER
        messages.append(message)
    return messages, blocked
