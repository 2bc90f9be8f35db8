"""Kaleyra's blocklist API as a function, for tests and demos: what it answers, no socket.

:class:`SimulatedKaleyra` holds a blocklist per channel, a fault schedule and counters, and
turns one request (method, path, query, ``api-key``, body) into an :class:`Exchange`: the
answer Kaleyra documents for "Get Blocklist" and "Change Blocklist Status for Number", or a
fault in its place. :mod:`blockfilter.testing.simulator` serves it over real HTTP;
:meth:`SimulatedKaleyra.transport` hands it to the Kaleyra client directly.

Faults are *rules*, checked in order for every API request; the first that fires answers the
request in its place::

    sim.set_faults([FaultRule("rate_limit", first=2, seconds=0.2), FaultRule("wa500", every=5)])
    sim.set_faults([parse_fault_spec("reset:probability=0.05")])

Each rule counts the API requests it is checked against (those on its channel, when it has
one) from the moment the schedule was set, whether or not an earlier rule fired: ``every=3``
fires on that rule's requests 3, 6, 9... and ``first=2`` on its requests 1 and 2. Faults fire
before authentication and validation, as an overloaded gateway in front of the API would.
"""

from __future__ import annotations

import collections
import json
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..config import CHANNELS
from ..kaleyra.transport import Request, Response, TransportFailed, TransportTimeout
from ..model import MAX_NUMBERS_PER_REQUEST, MAX_PAGE_SIZE

#: The opaque ``channel_type`` Kaleyra puts on each blocklisted entry. Its meaning is not
#: documented, so clients must not depend on it; the values only have to be stable.
CHANNEL_TYPES: dict[str, str] = {"sms": "3", "whatsapp": "5", "voice": "2"}

#: Every fault a rule can inject, with what the client sees.
FAULT_KINDS: dict[str, str] = {
    "wa500": "500, JSON code WA500",
    "cnt195": "500, JSON code CNT195 (unable to fetch)",
    "http500": "500 with an HTML body",
    "rate_limit": "429 with a Retry-After header (seconds, default 1)",
    "accepted": "202, JSON code WA202 with a message_id",
    "e110": "400, JSON code E110 (low balance)",
    "rbc001": "401, JSON code RBC001 (wrong SID or key)",
    "wa401": "401, JSON code WA401 (account not allowed)",
    "wa-401": "401, JSON code WA-401 (number not allowed)",
    "wa400": "400, JSON code WA400 (bad payload)",
    "non_json": "200 with a text/html body",
    "bad_shape": "200 JSON whose data is a string",
    "timeout": "nothing at all for N seconds (default 30), then the connection closes",
    "reset": "the connection is reset (RST) without a response",
    "trickle": "the real answer, sent a few bytes at a time over N seconds (default 5)",
}

#: Default ``seconds`` of the faults that take one.
DEFAULT_FAULT_SECONDS: dict[str, float] = {"rate_limit": 1.0, "timeout": 30.0, "trickle": 5.0}

#: Per-request records kept for benchmarks; older ones are dropped first.
MAX_RECORDS = 200_000

_E164 = re.compile(r"^\+[0-9]{8,15}$")
_DIGITS = re.compile(r"^[0-9]{1,9}$")
_API_PATH = re.compile(r"^/v1/([^/]*)/contacts/blocklisted/?$")

# --------------------------------------------------------------------------------------------
# Fault rules
# --------------------------------------------------------------------------------------------


@dataclass
class FaultRule:
    """One fault-injection rule.

    :param kind: one of :data:`FAULT_KINDS`.
    :param every: fire on this rule's requests N, 2N, 3N...
    :param first: fire on this rule's first N requests, then never.
    :param probability: fire with this probability (drawn from the simulator's seeded RNG).
    :param channel: only consider requests on this channel.
    :param seconds: for ``timeout`` and ``trickle`` how long, for ``rate_limit`` the
        ``Retry-After`` value (a fraction is sent as a decimal, handy for fast tests).

    With none of ``every``/``first``/``probability`` the rule fires always.
    """

    kind: str
    every: int | None = None
    first: int | None = None
    probability: float | None = None
    channel: str | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        self.kind = self.kind.strip().lower()
        if self.kind not in FAULT_KINDS:
            raise ValueError(
                f"unknown fault kind {self.kind!r}; expected one of {', '.join(FAULT_KINDS)}"
            )
        modes = [m for m in ("every", "first", "probability") if getattr(self, m) is not None]
        if len(modes) > 1:
            raise ValueError(f"a fault rule takes at most one of every/first/probability: {modes}")
        if self.every is not None and self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        if self.first is not None and self.first < 0:
            raise ValueError(f"first must be >= 0, got {self.first}")
        if self.probability is not None and not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be between 0 and 1, got {self.probability}")
        if self.channel is not None:
            self.channel = self.channel.strip().lower()
            if self.channel not in CHANNELS:
                raise ValueError(
                    f"fault channel must be one of {', '.join(CHANNELS)}, got {self.channel!r}"
                )
        if self.seconds is not None and self.seconds < 0:
            raise ValueError(f"seconds must be >= 0, got {self.seconds}")

    @property
    def effective_seconds(self) -> float:
        """``seconds``, or the kind's default."""
        if self.seconds is not None:
            return self.seconds
        return DEFAULT_FAULT_SECONDS.get(self.kind, 0.0)

    def to_dict(self) -> dict[str, Any]:
        """The rule as JSON for the admin API, without unset fields."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_any(cls, value: FaultRule | Mapping[str, Any] | str) -> FaultRule:
        """A rule from itself, a dict (admin API JSON) or a spec string (CLI)."""
        if isinstance(value, FaultRule):
            return value
        if isinstance(value, str):
            return parse_fault_spec(value)
        if isinstance(value, Mapping):
            # "always" is the default mode; accepted so JSON can say it explicitly.
            fields_given = {k: v for k, v in value.items() if k != "always"}
            unknown = set(fields_given) - {
                "kind",
                "every",
                "first",
                "probability",
                "channel",
                "seconds",
            }
            if unknown:
                raise ValueError(f"unknown fault rule fields: {', '.join(sorted(unknown))}")
            if "kind" not in fields_given:
                raise ValueError("a fault rule needs a kind")
            return cls(**fields_given)
        raise ValueError(f"cannot make a fault rule from {value!r}")


def parse_fault_spec(text: str) -> FaultRule:
    """Parse a rule written as ``KIND[:OPTION,...]``.

    Options: ``always``, ``every=N``, ``first=N``, ``probability=P`` (alias ``p=P``),
    ``channel=C``, ``seconds=S``. Examples: ``wa500:every=3``,
    ``rate_limit:first=2,seconds=1``, ``timeout:always,seconds=2``, ``reset:probability=0.05``.
    """
    kind, _, rest = text.strip().partition(":")
    values: dict[str, Any] = {}
    for raw_option in rest.split(","):
        option = raw_option.strip()
        if not option or option == "always":
            continue
        name, eq, value = option.partition("=")
        name, value = name.strip().lower(), value.strip()
        if not eq or not value:
            raise ValueError(f"fault option {option!r} in {text!r} needs a value (name=value)")
        try:
            if name in ("every", "first"):
                values[name] = int(value)
            elif name in ("probability", "p"):
                values["probability"] = float(value)
            elif name == "seconds":
                values["seconds"] = float(value)
            elif name == "channel":
                values["channel"] = value
            else:
                raise ValueError(f"unknown fault option {name!r} in {text!r}")
        except ValueError as exc:
            if "unknown fault option" in str(exc):
                raise
            raise ValueError(f"fault option {option!r} in {text!r}: {exc}") from None
    return FaultRule(kind=kind, **values)


# --------------------------------------------------------------------------------------------
# Blocklist files
# --------------------------------------------------------------------------------------------


def _check_entry(channel: str, number: str) -> tuple[str, str]:
    channel = channel.strip().lower()
    number = number.strip()
    if channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel!r}; expected one of {', '.join(CHANNELS)}")
    if not _E164.match(number):
        raise ValueError(f"not an E.164 number ('+' then 8 to 15 digits): {number!r}")
    return channel, number


def read_blocklist_file(path: str | Path) -> dict[str, set[str]]:
    """Read lines ``channel,+E164``; blank lines and ``#`` comments are skipped.

    A bad line raises :class:`ValueError` naming the file and its line number.
    """
    blocked: dict[str, set[str]] = {channel: set() for channel in CHANNELS}
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            channel, comma, number = text.partition(",")
            try:
                if not comma:
                    raise ValueError("expected 'channel,+E164'")
                channel, number = _check_entry(channel, number)
            except ValueError as exc:
                raise ValueError(f"{path}, line {lineno}: {exc}") from None
            blocked[channel].add(number)
    return blocked


# --------------------------------------------------------------------------------------------
# Stats
# --------------------------------------------------------------------------------------------

#: One API request: (arrival time.time(), channel as asked, numbers asked, HTTP status or 0
#: when no response was sent).
Record = tuple[float, str, int, int]


@dataclass
class SimulatorStats:
    """A snapshot of the simulator's counters.

    ``by_outcome`` keys: ``ok`` (a 200 answer), a Kaleyra code for a genuine rejection
    (``RBC001``, ``WA400``), ``not_found``/``method_not_allowed`` for a wrong path or method,
    and ``fault:<kind>`` for an injected fault. ``mean_in_flight`` is the time-weighted mean of
    requests in flight from the first arrival to the last response since the last reset.
    """

    requests: int = 0
    numbers_asked: int = 0
    max_numbers_per_request: int = 0
    requests_by_channel: dict[str, int] = field(default_factory=dict)
    by_outcome: dict[str, int] = field(default_factory=dict)
    by_status: dict[int, int] = field(default_factory=dict)
    in_flight: int = 0
    max_in_flight: int = 0
    mean_in_flight: float = 0.0
    records: list[Record] = field(default_factory=list)

    def to_dict(self, *, records: bool = False) -> dict[str, Any]:
        data = asdict(self)
        data["by_status"] = {str(k): v for k, v in self.by_status.items()}
        if records:
            data["records"] = [list(r) for r in self.records]
        else:
            data.pop("records")
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SimulatorStats:
        return cls(
            requests=int(data["requests"]),
            numbers_asked=int(data["numbers_asked"]),
            max_numbers_per_request=int(data["max_numbers_per_request"]),
            requests_by_channel=dict(data["requests_by_channel"]),
            by_outcome=dict(data["by_outcome"]),
            by_status={int(k): int(v) for k, v in data["by_status"].items()},
            in_flight=int(data["in_flight"]),
            max_in_flight=int(data["max_in_flight"]),
            mean_in_flight=float(data["mean_in_flight"]),
            records=[(float(t), str(c), int(n), int(s)) for t, c, n, s in data.get("records", [])],
        )


class _Counters:
    """The mutable counters behind :class:`SimulatorStats`; the caller holds the lock."""

    def __init__(self) -> None:
        self.generation = 0
        self.in_flight = 0
        self._clear(time.monotonic())

    def _clear(self, now: float) -> None:
        self.requests = 0
        self.numbers_asked = 0
        self.max_numbers = 0
        self.by_channel: collections.Counter[str] = collections.Counter()
        self.by_outcome: collections.Counter[str] = collections.Counter()
        self.by_status: collections.Counter[int] = collections.Counter()
        self.records: collections.deque[Record] = collections.deque(maxlen=MAX_RECORDS)
        # Requests still in flight across a reset keep counting from the reset on.
        self.max_in_flight = self.in_flight
        self.area = 0.0  # integral of in_flight over time, request-seconds
        self.first_arrival: float | None = now if self.in_flight else None
        self.last_response: float | None = None
        self.last_change = now

    def reset(self) -> None:
        self.generation += 1
        self._clear(time.monotonic())

    def _advance(self, now: float) -> None:
        self.area += self.in_flight * (now - self.last_change)
        self.last_change = now

    def arrive(self, channel: str, count: int) -> int:
        now = time.monotonic()
        self._advance(now)
        if self.first_arrival is None:
            self.first_arrival = now
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.requests += 1
        self.by_channel[channel] += 1
        self.numbers_asked += count
        self.max_numbers = max(self.max_numbers, count)
        return self.generation

    def depart(
        self,
        generation: int,
        arrived_at: float,
        channel: str,
        count: int,
        status: int,
        outcome: str,
    ) -> None:
        now = time.monotonic()
        self._advance(now)
        self.in_flight -= 1
        # A request that began before reset_stats() is not part of the new window's results.
        if generation != self.generation:
            return
        self.last_response = now
        self.by_outcome[outcome] += 1
        self.by_status[status] += 1
        self.records.append((arrived_at, channel, count, status))

    def snapshot(self, *, records: bool) -> SimulatorStats:
        now = time.monotonic()
        area = self.area + self.in_flight * (now - self.last_change)
        mean = 0.0
        if self.first_arrival is not None:
            end = now if self.in_flight else (self.last_response or self.first_arrival)
            span = end - self.first_arrival
            mean = area / span if span > 0 else float(self.in_flight)
        return SimulatorStats(
            requests=self.requests,
            numbers_asked=self.numbers_asked,
            max_numbers_per_request=self.max_numbers,
            requests_by_channel=dict(self.by_channel),
            by_outcome=dict(self.by_outcome),
            by_status=dict(self.by_status),
            in_flight=self.in_flight,
            max_in_flight=self.max_in_flight,
            mean_in_flight=mean,
            records=list(self.records) if records else [],
        )


# --------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------


@dataclass
class _Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    outcome: str = "ok"


@dataclass
class Exchange:
    """What the simulated API does with one request, before any socket is involved: an
    answer, or how the connection misbehaves instead (``answer`` is then ``None``)."""

    answer: _Response | None
    outcome: str = ""
    #: Seconds of silence before the connection closes without an answer (``timeout``).
    silence: float = 0.0
    #: The connection is reset without an answer (``reset``).
    reset: bool = False
    #: The answer goes out a few bytes at a time over these seconds (``trickle``).
    trickle: float | None = None

    def __post_init__(self) -> None:
        if not self.outcome and self.answer is not None:
            self.outcome = self.answer.outcome


def _json_response(status: int, payload: Mapping[str, Any], outcome: str) -> _Response:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return _Response(status, body, outcome=outcome)


def _error(
    status: int, code: str, message: str, detail: str, outcome: str | None = None
) -> _Response:
    """Kaleyra's error shape: ``{"code", "message", "data": [], "error": {...}}``."""
    payload = {"code": code, "message": message, "data": [], "error": {"error": detail}}
    return _json_response(status, payload, outcome or code)


def _format_seconds(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


def _fault_response(rule: FaultRule) -> _Response:
    """The canned answer of every fault that sends a normal response at once."""
    outcome = f"fault:{rule.kind}"
    kind = rule.kind
    if kind == "wa500":
        return _error(500, "WA500", "Internal server error", "Something went wrong", outcome)
    if kind == "cnt195":
        return _error(500, "CNT195", "Unable to fetch blocklisted contacts", "Try again", outcome)
    if kind == "http500":
        html = b"<html><head><title>500 Internal Server Error</title></head><body>"
        html += b"<h1>500 Internal Server Error</h1><hr><center>nginx</center></body></html>"
        return _Response(500, html, "text/html", outcome=outcome)
    if kind == "rate_limit":
        response = _error(429, "429", "Too many requests", "Rate limit exceeded", outcome)
        response.headers["Retry-After"] = _format_seconds(rule.effective_seconds)
        return response
    if kind == "accepted":
        payload = {
            "code": "WA202",
            "message": "Request accepted",
            "message_id": uuid.uuid4().hex,
            "data": [],
            "error": {},
        }
        return _json_response(202, payload, outcome)
    if kind == "e110":
        return _error(400, "E110", "Low balance", "Insufficient balance in account", outcome)
    if kind == "rbc001":
        return _error(401, "RBC001", "Authentication failed", "Invalid API key or SID", outcome)
    if kind == "wa401":
        return _error(401, "WA401", "Unauthorized", "Account is not allowed", outcome)
    if kind == "wa-401":
        return _error(401, "WA-401", "Unauthorized", "Number is not allowed", outcome)
    if kind == "wa400":
        return _error(400, "WA400", "Invalid payload", "Bad request", outcome)
    if kind == "non_json":
        html = b"<!DOCTYPE html><html><body><p>Service temporarily unavailable</p></body></html>"
        return _Response(200, html, "text/html; charset=utf-8", outcome=outcome)
    if kind == "bad_shape":
        payload = {"code": "CNT196", "data": "unexpected", "error": {}}
        return _json_response(200, payload, outcome)
    raise AssertionError(f"fault {kind!r} has no canned response")  # pragma: no cover


# --------------------------------------------------------------------------------------------
# The API
# --------------------------------------------------------------------------------------------


class SimulatedKaleyra:
    """Kaleyra's blocklist API as a function: the blocklist, the fault schedule and the counters,
    and what the API answers to a request, with no socket involved.

    :class:`~blockfilter.testing.simulator.Simulator` serves it over HTTP; :meth:`transport`
    answers the Kaleyra client in-process (``KaleyraClient(settings, transport=api.transport)``),
    the way httpx's ``MockTransport`` answers from a function. Both play the same
    :class:`Exchange`, so a test that runs without a socket sees what one over HTTP sees.

    :param blocked: channel -> numbers blocklisted on it (E.164).
    :param sid: when given, the only SID accepted; otherwise any non-empty SID is.
    :param api_key: when given, the only ``api-key`` accepted; otherwise any non-empty key is.
    :param latency: seconds added before every API answer.
    :param faults: the initial fault schedule (see the module docs).
    :param seed: seeds the RNG of ``probability`` rules, so a schedule replays identically.
    """

    def __init__(
        self,
        blocked: Mapping[str, Iterable[str]] | None = None,
        *,
        sid: str | None = None,
        api_key: str | None = None,
        latency: float = 0.0,
        faults: Sequence[FaultRule] = (),
        seed: int = 0,
    ) -> None:
        self.sid = sid
        self._api_key = api_key  # private and out of repr: it is a secret even in tests
        self._seed = seed
        self._lock = threading.Lock()
        self._blocked: dict[str, set[str]] = {channel: set() for channel in CHANNELS}
        self._sorted: dict[str, list[str] | None] = {channel: None for channel in CHANNELS}
        self._rules: list[FaultRule] = []
        self._rule_counts: list[int] = []
        self._rng = random.Random(seed)
        self._latency = 0.0
        self._counters = _Counters()
        #: (channel, numbers) of every "Change Blocklist Status" request that was applied.
        self.changes: list[tuple[str, int]] = []
        # Set to stop: wakes every wait (latency, silence, trickle) at once.
        self._stopping = threading.Event()
        self.block_all(blocked or {})
        self.set_faults(faults)
        self.set_latency(latency)

    def __repr__(self) -> str:
        return f"<SimulatedKaleyra sid={self.sid!r}>"

    def reset(self) -> None:
        """Back to a new simulator's state: no blocklist, no faults, no latency, no counts.
        Lets a test module share one simulator and still start each test afresh."""
        self.clear_faults()
        self.set_latency(0.0)
        self.reset_stats()
        with self._lock:
            for channel in CHANNELS:
                self._blocked[channel].clear()
                self._sorted[channel] = None
            self.changes.clear()

    # -- blocklist -----------------------------------------------------------------------------

    def block(self, channel: str, *numbers: str) -> None:
        """Blocklist ``numbers`` on ``channel`` (takes effect for the next request)."""
        self._set_blocked(channel, numbers, blocked=True)

    def block_all(self, blocked: Mapping[str, Iterable[str]]) -> None:
        """Blocklist every number of ``blocked`` (channel -> numbers) on its channel."""
        for channel, numbers in blocked.items():
            self.block(channel, *numbers)

    def unblock(self, channel: str, *numbers: str) -> None:
        """Remove ``numbers`` from ``channel``'s blocklist; absent ones are ignored."""
        self._set_blocked(channel, numbers, blocked=False)

    def _set_blocked(self, channel: str, numbers: Iterable[str], *, blocked: bool) -> None:
        entries = [_check_entry(channel, n) for n in numbers]  # all checked before any change
        with self._lock:
            for ch, number in entries:
                if blocked:
                    self._blocked[ch].add(number)
                else:
                    self._blocked[ch].discard(number)
                self._sorted[ch] = None

    def load_blocklist_file(self, path: str | Path) -> None:
        """Add the entries of a ``channel,+E164`` file (see :func:`read_blocklist_file`)."""
        for channel, numbers in read_blocklist_file(path).items():
            if numbers:
                self.block(channel, *numbers)

    def blocked(self, channel: str) -> set[str]:
        """A copy of ``channel``'s blocklist."""
        with self._lock:
            return set(self._blocked[channel])

    # -- faults --------------------------------------------------------------------------------

    def set_faults(self, rules: Sequence[FaultRule | Mapping[str, Any] | str]) -> None:
        """Replace the fault schedule; rule counters and the RNG start over."""
        parsed = [FaultRule.from_any(rule) for rule in rules]
        with self._lock:
            self._rules = parsed
            self._rule_counts = [0] * len(parsed)
            self._rng = random.Random(self._seed)

    def clear_faults(self) -> None:
        self.set_faults([])

    @property
    def faults(self) -> list[FaultRule]:
        with self._lock:
            return list(self._rules)

    def set_latency(self, seconds: float) -> None:
        """Seconds to wait before answering every API request."""
        if seconds < 0:
            raise ValueError(f"latency must be >= 0, got {seconds}")
        with self._lock:
            self._latency = float(seconds)

    @property
    def latency(self) -> float:
        with self._lock:
            return self._latency

    def _pick_fault(self, channel: str) -> FaultRule | None:
        """Advance every rule's counter and return the first rule that fires, if any."""
        with self._lock:
            chosen: FaultRule | None = None
            for index, rule in enumerate(self._rules):
                if rule.channel is not None and rule.channel != channel:
                    continue
                self._rule_counts[index] += 1
                seen = self._rule_counts[index]
                if rule.every is not None:
                    fires = seen % rule.every == 0
                elif rule.first is not None:
                    fires = seen <= rule.first
                elif rule.probability is not None:
                    # Drawn even when an earlier rule fired, so each rule's sequence is
                    # independent of the others'.
                    fires = self._rng.random() < rule.probability
                else:
                    fires = True
                if fires and chosen is None:
                    chosen = rule
            return chosen

    # -- stats ---------------------------------------------------------------------------------

    @property
    def stats(self) -> SimulatorStats:
        """A snapshot of the counters, per-request records included."""
        return self.snapshot(records=True)

    def snapshot(self, *, records: bool = True) -> SimulatorStats:
        with self._lock:
            return self._counters.snapshot(records=records)

    def reset_stats(self) -> None:
        with self._lock:
            self._counters.reset()

    # -- the API itself ------------------------------------------------------------------------

    def _refuse(self, sid: str, api_key: str | None) -> _Response | None:
        """The 401 for missing or wrong credentials, ``None`` when they are accepted."""
        if not sid or not api_key:
            return _error(401, "RBC001", "Authentication failed", "Missing SID or api-key")
        if (self.sid is not None and sid != self.sid) or (
            self._api_key is not None and api_key != self._api_key
        ):
            return _error(401, "RBC001", "Authentication failed", "Invalid API key or SID")
        return None

    def _answer(self, sid: str, api_key: str | None, query: str) -> _Response:
        """The genuine answer to an API request (no faults)."""
        refused = self._refuse(sid, api_key)
        if refused is not None:
            return refused
        params = parse_qs(query, keep_blank_values=True)
        repeated = sorted(name for name, values in params.items() if len(values) > 1)
        if repeated:
            return _error(400, "WA400", "Invalid payload", f"repeated parameter: {repeated[0]}")
        channel = params.get("channel", [""])[0]
        if channel not in CHANNELS:
            return _error(
                400, "WA400", "Invalid payload", f"channel must be one of {', '.join(CHANNELS)}"
            )
        limit, offset = _int_param(params, "limit", MAX_PAGE_SIZE), _int_param(params, "offset", 0)
        if limit is None or not 1 <= limit <= MAX_PAGE_SIZE:
            return _error(400, "WA400", "Invalid payload", f"limit must be 1..{MAX_PAGE_SIZE}")
        if offset is None or offset < 0:
            return _error(400, "WA400", "Invalid payload", "offset must be >= 0")
        channel_type = CHANNEL_TYPES[channel]
        if "mobile" in params:
            numbers = params["mobile"][0].split(",")
            if len(numbers) > MAX_NUMBERS_PER_REQUEST:
                return _error(
                    400,
                    "WA400",
                    "Invalid payload",
                    f"at most {MAX_NUMBERS_PER_REQUEST} numbers per request",
                )
            if not all(_E164.match(n) for n in numbers):
                return _error(400, "WA400", "Invalid payload", "mobile must be E.164 numbers")
            with self._lock:
                blocked = self._blocked[channel]
                hits = [n for n in dict.fromkeys(numbers) if n in blocked]
        else:
            with self._lock:
                ordered = self._sorted[channel]
                if ordered is None:
                    ordered = self._sorted[channel] = sorted(self._blocked[channel])
                hits = ordered[offset : offset + limit]
        data = [{"mobile": n, "channel_type": channel_type} for n in hits]
        return _json_response(200, {"code": "CNT196", "data": data, "error": {}}, "ok")

    def _change(self, sid: str, api_key: str | None, body: bytes) -> _Response:
        """The genuine answer to "Change Blocklist Status for Number" (no faults)."""
        refused = self._refuse(sid, api_key)
        if refused is not None:
            return refused
        try:
            payload = json.loads(body)
        except ValueError:
            return _error(400, "WA400", "Invalid payload", "the body must be JSON")
        channel = payload.get("channel") if isinstance(payload, dict) else None
        contacts = payload.get("contacts") if isinstance(payload, dict) else None
        if channel not in CHANNELS:
            return _error(
                400, "WA400", "Invalid payload", f"channel must be one of {', '.join(CHANNELS)}"
            )
        changes: list[tuple[int, str]] = []
        if not isinstance(contacts, list) or not contacts:
            return _error(400, "WA400", "Invalid payload", "contacts must be a non-empty list")
        for contact in contacts:
            status = contact.get("blocklist_status") if isinstance(contact, dict) else None
            numbers = contact.get("numbers") if isinstance(contact, dict) else None
            if status not in (0, 1) or isinstance(status, bool):
                return _error(400, "WA400", "Invalid payload", "blocklist_status must be 0 or 1")
            if not isinstance(numbers, list) or not all(
                isinstance(n, str) and _E164.match(n) for n in numbers
            ):
                return _error(400, "WA400", "Invalid payload", "numbers must be E.164 numbers")
            changes.extend((status, n) for n in numbers)
        if len(changes) > MAX_NUMBERS_PER_REQUEST:
            return _error(
                400,
                "WA400",
                "Invalid payload",
                f"at most {MAX_NUMBERS_PER_REQUEST} numbers per request",
            )
        with self._lock:
            for status, number in changes:
                if status:
                    self._blocked[channel].add(number)
                else:
                    self._blocked[channel].discard(number)
            self._sorted[channel] = None
            self.changes.append((channel, len(changes)))
        return _json_response(
            200, {"code": "CNT200", "data": {"updated": len(changes)}, "error": {}}, "ok"
        )

    # -- one exchange, whatever carries it -----------------------------------------------------

    def counted(self, method: str, query: str, body: bytes | None) -> Callable[[int, str], None]:
        """Count a request as arrived; the returned function counts it as answered (once)."""
        channel, count = _request_shape(query) if method != "POST" else _change_shape(body or b"")
        arrived_at = time.time()
        with self._lock:
            generation = self._counters.arrive(channel, count)
        settled = False

        def settle(status: int, outcome: str) -> None:
            nonlocal settled
            if not settled:
                settled = True
                with self._lock:
                    self._counters.depart(generation, arrived_at, channel, count, status, outcome)

        return settle

    def exchange(
        self, method: str, path: str, query: str, api_key: str | None, body: bytes | None
    ) -> Exchange:
        """What the API does with one request: the answer, or how the connection misbehaves.

        Waits the configured latency (cut short by a stop). Faults fire before authentication
        and validation, as an overloaded gateway in front of the API would.
        """
        match = _API_PATH.match(path)
        if match is None:
            return Exchange(_error(404, "404", "Not found", "No such endpoint", "not_found"))
        if method not in ("GET", "POST"):
            answer = _error(
                405, "405", "Method not allowed", "Use GET or POST", "method_not_allowed"
            )
            answer.headers["Allow"] = "GET, POST"
            return Exchange(answer)
        sid = match.group(1)
        if method == "POST":
            channel = _change_shape(body or b"")[0]

            def genuine() -> _Response:
                return self._change(sid, api_key, body or b"")
        else:
            channel = _request_shape(query)[0]

            def genuine() -> _Response:
                return self._answer(sid, api_key, query)

        rule = self._pick_fault(channel)
        latency = self.latency
        if latency and self._stopping.wait(latency):
            return Exchange(None, "aborted")
        if rule is None:
            return Exchange(genuine())
        outcome = f"fault:{rule.kind}"
        if rule.kind == "timeout":
            # Say nothing; a client without a read timeout waits the whole time.
            return Exchange(None, outcome, silence=rule.effective_seconds)
        if rule.kind == "reset":
            return Exchange(None, outcome, reset=True)
        if rule.kind == "trickle":
            answer = genuine()  # the genuine answer, only slow
            answer.outcome = outcome
            return Exchange(answer, outcome, trickle=rule.effective_seconds)
        return Exchange(_fault_response(rule))

    def transport(self, request: Request) -> Response:
        """Answer the Kaleyra client without a socket: a :data:`~blockfilter.kaleyra.transport.
        Transport` playing the same exchange the HTTP server would, within the request's
        ``timeout`` (a silence or a trickle longer than it is a :class:`TransportTimeout`, a
        reset or a closed connection a :class:`TransportFailed`)."""
        parts = urlsplit(request.url)
        api_key = next((v for k, v in request.headers.items() if k.lower() == "api-key"), None)
        settle = self.counted(request.method, parts.query, request.body)
        status, outcome = 0, "aborted"
        try:
            exchange = self.exchange(request.method, parts.path, parts.query, api_key, request.body)
            outcome = exchange.outcome
            if exchange.reset:
                raise TransportFailed("ConnectionResetError")
            wait = exchange.silence if exchange.answer is None else (exchange.trickle or 0.0)
            if wait > request.timeout:
                self._stopping.wait(request.timeout)
                raise TransportTimeout("ReadTimeoutError")
            if wait and self._stopping.wait(wait):
                raise TransportFailed("RemoteDisconnected")
            if exchange.answer is None:  # silence, then the connection closes
                raise TransportFailed("RemoteDisconnected")
            answer = exchange.answer
            status = answer.status
            headers = {"Content-Type": answer.content_type, **answer.headers}
            headers["Content-Length"] = str(len(answer.body))
            return Response(answer.status, headers, answer.body)
        finally:
            settle(status, outcome)


def _change_shape(body: bytes) -> tuple[str, int]:
    """(channel, numbers) of a "Change Blocklist Status" request, for the counters."""
    try:
        payload = json.loads(body)
        contacts = payload.get("contacts") or []
        count = sum(len(c.get("numbers") or []) for c in contacts if isinstance(c, dict))
        return str(payload.get("channel", "")), count
    except (ValueError, AttributeError, TypeError):
        return "", 0


def _int_param(params: Mapping[str, list[str]], name: str, default: int) -> int | None:
    """An integer query parameter, its default when absent, ``None`` when not an integer."""
    if name not in params:
        return default
    raw = params[name][0]
    return int(raw) if _DIGITS.match(raw) else None


def _request_shape(query: str) -> tuple[str, int]:
    """(channel, numbers asked) of a request, for counters and channel-limited rules."""
    params = parse_qs(query, keep_blank_values=True)
    channel = params.get("channel", [""])[0]
    mobile = params.get("mobile", [""])[0]
    return channel, (len(mobile.split(",")) if mobile else 0)
