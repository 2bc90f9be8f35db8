"""A Kaleyra-compatible "Get Blocklist" server for tests, demos and benchmarks.

The simulator is a real HTTP/1.1 server (keep-alive, one daemon thread per connection) that
answers ``GET /v1/<SID>/contacts/blocklisted`` the way Kaleyra documents it, and can be told to
misbehave the way real networks do: 5xx, 429 with ``Retry-After``, 202 "accepted", refused
credentials, garbled bodies, silent connections, resets and slow trickles. It counts what it is
asked (requests, numbers per request, requests in flight) so tests and benchmarks can check how a
client batches and how hard it pushes.

Use it in-process (:class:`Simulator`), from another process through its admin HTTP API
(:class:`RemoteSimulator`), or from the command line (``blockfilter simulator``, which calls
:func:`run_simulator`).

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
import contextlib
import ipaddress
import json
import logging
import math
import os
import random
import re
import signal
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..config import CHANNELS
from ..redact import mask_numbers_in

logger = logging.getLogger(__name__)

__all__ = [
    "CHANNEL_TYPES",
    "FAULT_KINDS",
    "FaultRule",
    "RemoteSimulator",
    "Simulator",
    "SimulatorStats",
    "parse_fault_spec",
    "read_blocklist_file",
    "run_simulator",
]

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

MAX_NUMBERS_PER_REQUEST = 100
MAX_PAGE_SIZE = 100
#: Per-request records kept for benchmarks; older ones are dropped first.
MAX_RECORDS = 200_000

_E164 = re.compile(r"^\+[0-9]{8,15}$")
_DIGITS = re.compile(r"^[0-9]{1,9}$")
_API_PATH = re.compile(r"^/v1/([^/]*)/contacts/blocklisted/?$")
# An idle keep-alive connection is closed after this long, so abandoned clients cannot pin
# threads forever; pooled clients reconnect transparently.
_IDLE_TIMEOUT_S = 60.0
# Admin request bodies (blocklist uploads) larger than this are refused.
_MAX_ADMIN_BODY = 64 * 1024 * 1024


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
# The simulator
# --------------------------------------------------------------------------------------------


class Simulator:
    """A Kaleyra "Get Blocklist" server on a real socket, with fault injection and counters.

    :param blocked: channel -> numbers blocklisted on it (E.164).
    :param sid: when given, the only SID accepted; otherwise any non-empty SID is.
    :param api_key: when given, the only ``api-key`` accepted; otherwise any non-empty key is.
    :param latency: seconds added before every API answer.
    :param faults: the initial fault schedule (see the module docs).
    :param seed: seeds the RNG of ``probability`` rules, so a schedule replays identically.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`. ``base_url`` (for
    ``KALEYRA_BASE_URL``) is valid once started.
    """

    def __init__(
        self,
        blocked: Mapping[str, Iterable[str]] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        sid: str | None = None,
        api_key: str | None = None,
        latency: float = 0.0,
        faults: Sequence[FaultRule] = (),
        seed: int = 0,
    ) -> None:
        self.host = host
        self.port = port
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
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.base_url = ""
        if blocked:
            for channel, numbers in blocked.items():
                self.block(channel, *numbers)
        self.set_faults(faults)
        self.set_latency(latency)

    def __repr__(self) -> str:
        state = self.base_url or "not started"
        return f"<Simulator {state} sid={self.sid!r}>"

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> Simulator:
        """Bind, start serving in a daemon thread, and return ``self``."""
        if self._server is not None:
            raise RuntimeError("simulator already started")
        self._stopping.clear()
        server = _Server(self.host, self.port, self)
        self._server = server
        bound_host, bound_port = server.server_address[:2]
        self.port = int(bound_port)
        self.base_url = f"http://{_url_host(str(bound_host))}:{self.port}"
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"kaleyra-simulator-{self.port}",
            daemon=True,
        )
        self._thread.start()
        logger.debug("Kaleyra simulator listening on %s", self.base_url)
        return self

    def stop(self) -> None:
        """Stop serving, promptly, even while faults hold connections open. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        # Wake slow handlers (timeout, trickle, latency) first, then drop idle keep-alive
        # connections so no handler thread keeps answering on a pooled connection.
        self._stopping.set()
        server.shutdown()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Simulator:
        return self.start() if self._server is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None

    # -- blocklist -----------------------------------------------------------------------------

    def block(self, channel: str, *numbers: str) -> None:
        """Blocklist ``numbers`` on ``channel`` (takes effect for the next request)."""
        entries = [_check_entry(channel, n) for n in numbers]
        with self._lock:
            for ch, number in entries:
                self._blocked[ch].add(number)
                self._sorted[ch] = None

    def unblock(self, channel: str, *numbers: str) -> None:
        """Remove ``numbers`` from ``channel``'s blocklist; absent ones are ignored."""
        entries = [_check_entry(channel, n) for n in numbers]
        with self._lock:
            for ch, number in entries:
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

    def _answer(self, sid: str, api_key: str | None, query: str) -> _Response:
        """The genuine answer to an API request (no faults)."""
        if not sid or not api_key:
            return _error(401, "RBC001", "Authentication failed", "Missing SID or api-key")
        if (self.sid is not None and sid != self.sid) or (
            self._api_key is not None and api_key != self._api_key
        ):
            return _error(401, "RBC001", "Authentication failed", "Invalid API key or SID")
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
        if not sid or not api_key:
            return _error(401, "RBC001", "Authentication failed", "Missing SID or api-key")
        if (self.sid is not None and sid != self.sid) or (
            self._api_key is not None and api_key != self._api_key
        ):
            return _error(401, "RBC001", "Authentication failed", "Invalid API key or SID")
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


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):  # listening everywhere: loopback is the address to call
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool((mapped or address).is_loopback)


def _request_shape(query: str) -> tuple[str, int]:
    """(channel, numbers asked) of a request, for counters and channel-limited rules."""
    params = parse_qs(query, keep_blank_values=True)
    channel = params.get("channel", [""])[0]
    mobile = params.get("mobile", [""])[0]
    return channel, (len(mobile.split(",")) if mobile else 0)


# --------------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Benchmarks open dozens of connections at once; the default backlog (5) would make
    # some of them wait for a SYN retransmit and skew every latency number.
    request_queue_size = 256

    def __init__(self, host: str, port: int, simulator: Simulator) -> None:
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.simulator = simulator
        super().__init__((host, port), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-answer is part of the job (timeouts, trickles): no traceback.
        logger.debug(
            "simulator connection from %s ended with an error", client_address, exc_info=True
        )


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so pooled clients reuse connections
    server_version = "KaleyraSimulator/1.0"
    timeout = _IDLE_TIMEOUT_S
    # Buffer writes so headers and body go out together: two small writes would meet Nagle's
    # algorithm and the client's delayed ACK, adding ~40 ms to every answer.
    wbufsize = 64 * 1024
    server: _Server
    _settle: Callable[[int, str], None] | None = None

    @property
    def sim(self) -> Simulator:
        return self.server.simulator

    def setup(self) -> None:
        super().setup()
        with contextlib.suppress(OSError):  # trickled chunks must leave at once
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.sim._lock:
            self.sim._connections.add(self.connection)

    def finish(self) -> None:
        with self.sim._lock:
            self.sim._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        # Request lines carry phone numbers: mask them, and keep quiet unless asked.
        logger.debug("simulator %s: %s", self.address_string(), mask_numbers_in(format % args))

    # -- dispatch ------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        if parts.path.startswith("/_sim/"):
            self._admin(method, parts.path, parts.query)
        else:
            self._api(method, parts.path, parts.query)

    # -- the API -------------------------------------------------------------------------------

    def _api(self, method: str, path: str, query: str) -> None:
        sim = self.sim
        arrived_at = time.time()
        body = self._read_body() if method == "POST" else None
        channel, count = _request_shape(query) if body is None else _change_shape(body)
        with sim._lock:
            generation = sim._counters.arrive(channel, count)
        settled = False

        def settle(status: int, outcome: str) -> None:
            nonlocal settled
            if not settled:
                settled = True
                with sim._lock:
                    sim._counters.depart(generation, arrived_at, channel, count, status, outcome)

        # The request is counted as answered just before its last byte goes out, so a client
        # that has its answer always finds it in the stats.
        self._settle = settle
        status, outcome = 0, "aborted"
        try:
            status, outcome = self._api_exchange(method, path, query, channel, body)
        finally:
            settle(status, outcome)
            self._settle = None

    def _api_exchange(
        self, method: str, path: str, query: str, channel: str, body: bytes | None = None
    ) -> tuple[int, str]:
        """Answer one API request; returns (status sent or 0, outcome)."""
        sim = self.sim
        if body is None:
            self._drain_body()
        match = _API_PATH.match(path)
        if match is None:
            return self._send(_error(404, "404", "Not found", "No such endpoint", "not_found"))
        if method not in ("GET", "POST"):
            response = _error(
                405, "405", "Method not allowed", "Use GET or POST", "method_not_allowed"
            )
            response.headers["Allow"] = "GET, POST"
            return self._send(response)
        if method == "POST":
            return self._change_exchange(match.group(1), channel, body or b"")
        rule = sim._pick_fault(channel)
        latency = sim.latency
        if latency and sim._stopping.wait(latency):
            return self._abandon("aborted")
        if rule is None:
            return self._send(sim._answer(match.group(1), self.headers.get("api-key"), query))
        outcome = f"fault:{rule.kind}"
        if rule.kind == "timeout":
            # Say nothing; a client without a read timeout waits the whole time.
            sim._stopping.wait(rule.effective_seconds)
            return self._abandon(outcome)
        if rule.kind == "reset":
            return self._reset(outcome)
        if rule.kind == "trickle":
            # The genuine answer, only slow.
            response = sim._answer(match.group(1), self.headers.get("api-key"), query)
            response.outcome = outcome
            return self._send(response, trickle_seconds=rule.effective_seconds)
        return self._send(_fault_response(rule))

    def _change_exchange(self, sid: str, channel: str, body: bytes) -> tuple[int, str]:
        """Answer "Change Blocklist Status for Number"; faults apply as to a lookup."""
        sim = self.sim
        rule = sim._pick_fault(channel)
        latency = sim.latency
        if latency and sim._stopping.wait(latency):
            return self._abandon("aborted")
        if rule is None:
            return self._send(sim._change(sid, self.headers.get("api-key"), body))
        outcome = f"fault:{rule.kind}"
        if rule.kind == "timeout":
            sim._stopping.wait(rule.effective_seconds)
            return self._abandon(outcome)
        if rule.kind == "reset":
            return self._reset(outcome)
        if rule.kind == "trickle":
            response = sim._change(sid, self.headers.get("api-key"), body)
            response.outcome = outcome
            return self._send(response, trickle_seconds=rule.effective_seconds)
        return self._send(_fault_response(rule))

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(min(length, _MAX_ADMIN_BODY)) if length > 0 else b""

    def _drain_body(self) -> None:
        # A stray request body must not be parsed as the next request on this connection.
        length = int(self.headers.get("Content-Length") or 0)
        if length > 0:
            self.rfile.read(min(length, _MAX_ADMIN_BODY))

    def _settled(self, status: int, outcome: str) -> None:
        if self._settle is not None:
            self._settle(status, outcome)

    def _abandon(self, outcome: str) -> tuple[int, str]:
        self._settled(0, outcome)
        self.close_connection = True
        return 0, outcome

    def _reset(self, outcome: str) -> tuple[int, str]:
        """Close with RST: SO_LINGER 0 and a close before anything else touches the socket."""
        self._settled(0, outcome)
        self.close_connection = True
        conn = self.connection
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            # rfile and wfile hold references to the socket; the fd closes with the last one.
            self.rfile.close()
            self.wfile.close()
            conn.close()
        return 0, outcome

    def _send(self, response: _Response, trickle_seconds: float | None = None) -> tuple[int, str]:
        try:
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
            for name, value in response.headers.items():
                self.send_header(name, value)
            if self.sim._stopping.is_set():
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()  # into wfile's buffer: headers and body leave in one segment
            last: bytes | None = response.body
            if trickle_seconds is not None:
                self.wfile.flush()
                last = self._trickle(response.body, trickle_seconds)
            if last is None:
                self._settled(0, response.outcome)
                return 0, response.outcome
            self._settled(response.status, response.outcome)
            self.wfile.write(last)
            self.wfile.flush()
        except OSError:  # the client hung up
            self._settled(0, response.outcome)
            self.close_connection = True
            return 0, response.outcome
        return response.status, response.outcome

    def _trickle(self, body: bytes, seconds: float) -> bytes | None:
        """Send ``body`` a few bytes at a time over ``seconds``, all but its last chunk.

        Returns the last chunk for the caller to send, or ``None`` if the simulator stopped.
        """
        # At most ~20 chunks a second keeps large bodies from turning into thousands of writes.
        wanted = max(1, min(math.ceil(len(body) / 4), max(2, int(seconds * 20))))
        size = max(1, math.ceil(len(body) / wanted))
        chunks = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
        interval = seconds / len(chunks)
        for index, chunk in enumerate(chunks):
            if self.sim._stopping.wait(interval):
                self.close_connection = True
                return None
            if index == len(chunks) - 1:
                return chunk
            self.wfile.write(chunk)
            self.wfile.flush()
        return b""  # pragma: no cover - the loop always returns

    # -- the admin API -------------------------------------------------------------------------

    def _admin(self, method: str, path: str, query: str) -> None:
        if not _is_loopback(self.client_address[0]):
            self._send(_error(403, "403", "Forbidden", "The admin API is loopback only"))
            return
        try:
            if method == "POST":
                body = self._read_json()
            else:
                self._drain_body()
                body = {}
            payload = self._admin_action(method, path, query, body)
        except (ValueError, TypeError, KeyError) as exc:
            self._send(_error(400, "400", "Bad admin request", str(exc)))
            return
        if payload is None:
            self._send(_error(404, "404", "Not found", "No such admin endpoint"))
            return
        self._send(_json_response(200, payload, "admin"))

    def _read_json(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_ADMIN_BODY:
            raise ValueError("admin request body too large")
        raw = self.rfile.read(length) if length else b""
        return json.loads(raw) if raw.strip() else {}

    def _admin_action(self, method: str, path: str, query: str, body: Any) -> dict[str, Any] | None:
        sim = self.sim
        route = (method, path.rstrip("/"))
        if route == ("GET", "/_sim/stats"):
            records = parse_qs(query).get("records", ["0"])[0] not in ("0", "", "false")
            return sim.snapshot(records=records).to_dict(records=records)
        if route == ("GET", "/_sim/faults"):
            return {"rules": [r.to_dict() for r in sim.faults], "latency": sim.latency}
        if route == ("POST", "/_sim/faults"):
            if not isinstance(body, dict):
                raise ValueError("expected a JSON object")
            rules = [FaultRule.from_any(r) for r in body.get("rules", [])]
            if "latency" in body and body["latency"] is not None:
                sim.set_latency(float(body["latency"]))
            sim.set_faults(rules)
            return {"rules": [r.to_dict() for r in rules], "latency": sim.latency}
        if route == ("POST", "/_sim/reset"):
            sim.reset_stats()
            return {"reset": True}
        if route == ("POST", "/_sim/blocklist"):
            if not isinstance(body, dict):
                raise ValueError("expected a JSON object")
            add = [_check_entry(str(c), str(n)) for c, n in body.get("add", [])]
            remove = [_check_entry(str(c), str(n)) for c, n in body.get("remove", [])]
            for channel, number in add:
                sim.block(channel, number)
            for channel, number in remove:
                sim.unblock(channel, number)
            return {"added": len(add), "removed": len(remove)}
        return None


# --------------------------------------------------------------------------------------------
# Driving a simulator in another process
# --------------------------------------------------------------------------------------------


class RemoteSimulator:
    """Drive a simulator in another process (``blockfilter simulator``) via its admin API.

    Offers the same controls as :class:`Simulator`: faults, latency, blocklist, stats.
    """

    def __init__(self, base_url: str, *, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"<RemoteSimulator {self.base_url}>"

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(  # noqa: S310 - the URL is the caller's simulator
            self.base_url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as reply:  # noqa: S310
                return json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise RuntimeError(f"simulator admin {method} {path}: {exc.code} {detail}") from None

    def set_faults(
        self,
        rules: Sequence[FaultRule | Mapping[str, Any] | str],
        *,
        latency: float | None = None,
    ) -> None:
        payload: dict[str, Any] = {"rules": [FaultRule.from_any(r).to_dict() for r in rules]}
        if latency is not None:
            payload["latency"] = latency
        self._call("POST", "/_sim/faults", payload)

    def clear_faults(self) -> None:
        self.set_faults([])

    def faults(self) -> list[FaultRule]:
        reply = self._call("GET", "/_sim/faults")
        return [FaultRule.from_any(r) for r in reply["rules"]]

    def set_latency(self, seconds: float) -> None:
        """Set the latency, keeping the current fault rules."""
        self.set_faults(self.faults(), latency=seconds)

    def reset_stats(self) -> None:
        self._call("POST", "/_sim/reset", {})

    @property
    def stats(self) -> SimulatorStats:
        """The counters, without the per-request records (see :meth:`fetch_stats`)."""
        return self.fetch_stats()

    def fetch_stats(self, *, records: bool = False) -> SimulatorStats:
        suffix = "?records=1" if records else ""
        return SimulatorStats.from_dict(self._call("GET", "/_sim/stats" + suffix))

    def block(self, channel: str, *numbers: str) -> None:
        self._call("POST", "/_sim/blocklist", {"add": [[channel, n] for n in numbers]})

    def unblock(self, channel: str, *numbers: str) -> None:
        self._call("POST", "/_sim/blocklist", {"remove": [[channel, n] for n in numbers]})


# --------------------------------------------------------------------------------------------
# The command line entry
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _stop_on_sigterm(stop: threading.Event) -> Iterator[None]:
    """Turn SIGTERM into ``stop`` while serving (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_simulator(
    host: str,
    port: int,
    blocked_file: str | Path | None,
    faults: list[str],
    latency: float,
    ready: Callable[[str], None],
    *,
    seed: int = 0,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Serve until Ctrl-C or SIGTERM; call ``ready(base_url)`` once listening.

    ``KALEYRA_SID``/``KALEYRA_API_KEY``, when set (in ``environ``, default ``os.environ``),
    are the only credentials accepted; otherwise any non-empty pair is. Bad fault specs or a
    bad blocklist file raise :class:`ValueError` before anything listens.
    """
    env = os.environ if environ is None else environ
    rules = [parse_fault_spec(spec) for spec in faults]
    simulator = Simulator(
        host=host,
        port=port,
        sid=env.get("KALEYRA_SID") or None,
        api_key=env.get("KALEYRA_API_KEY") or None,
        latency=latency,
        faults=rules,
        seed=seed,
    )
    if blocked_file is not None:
        simulator.load_blocklist_file(blocked_file)
    stop = threading.Event()
    with _stop_on_sigterm(stop), simulator:
        ready(simulator.base_url)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
