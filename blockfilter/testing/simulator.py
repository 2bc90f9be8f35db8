"""A Kaleyra-compatible "Get Blocklist" server for tests, demos and benchmarks.

The simulator is a real HTTP/1.1 server (keep-alive, one daemon thread per connection) that
answers ``GET /v1/<SID>/contacts/blocklisted`` the way Kaleyra documents it, and can be told to
misbehave the way real networks do: 5xx, 429 with ``Retry-After``, 202 "accepted", refused
credentials, garbled bodies, silent connections, resets and slow trickles. It counts what it is
asked (requests, numbers per request, requests in flight) so tests and benchmarks can check how a
client batches and how hard it pushes.

What it answers is :mod:`blockfilter.testing.kaleyra_api` (:class:`SimulatedKaleyra`, whose
``transport`` answers the client without a socket); this module carries it over sockets. Use
it in-process (:class:`Simulator`), from another process through its admin HTTP API
(:class:`RemoteSimulator`), or from the command line (``blockfilter simulator``, which calls
:func:`run_simulator`). The fault rules are described in :mod:`blockfilter.testing.kaleyra_api`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..config import is_loopback
from ..redact import mask_numbers_in
from .kaleyra_api import (
    CHANNEL_TYPES,
    DEFAULT_FAULT_SECONDS,
    FAULT_KINDS,
    MAX_NUMBERS_PER_REQUEST,
    MAX_PAGE_SIZE,
    MAX_RECORDS,
    Exchange,
    FaultRule,
    SimulatedKaleyra,
    SimulatorStats,
    _check_entry,
    _error,
    _json_response,
    _Response,
    parse_fault_spec,
    read_blocklist_file,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CHANNEL_TYPES",
    "DEFAULT_FAULT_SECONDS",
    "FAULT_KINDS",
    "MAX_NUMBERS_PER_REQUEST",
    "MAX_PAGE_SIZE",
    "MAX_RECORDS",
    "FaultRule",
    "RemoteSimulator",
    "SimulatedKaleyra",
    "Simulator",
    "SimulatorStats",
    "parse_fault_spec",
    "read_blocklist_file",
    "run_simulator",
]

# An idle keep-alive connection is closed after this long, so abandoned clients cannot pin
# threads forever; pooled clients reconnect transparently.
_IDLE_TIMEOUT_S = 60.0
# Admin request bodies (blocklist uploads) larger than this are refused.
_MAX_ADMIN_BODY = 64 * 1024 * 1024


# --------------------------------------------------------------------------------------------
# The simulator
# --------------------------------------------------------------------------------------------


class Simulator(SimulatedKaleyra):
    """A Kaleyra "Get Blocklist" server on a real socket, with fault injection and counters.

    :param host: the address to listen on; :param port: its port (0: any free one).
    The other parameters are :class:`SimulatedKaleyra`'s (the blocklist, ``sid``,
    ``api_key``, ``latency``, ``faults``, ``seed``).

    Use it as a context manager, or call :meth:`start` and :meth:`stop`. ``base_url`` (for
    ``KALEYRA_BASE_URL``) is valid once started.
    """

    def __init__(
        self,
        blocked: Mapping[str, Iterable[str]] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        **options: Any,
    ) -> None:
        super().__init__(blocked, **options)
        self.host = host
        self.port = port
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.base_url = ""

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


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):  # listening everywhere: loopback is the address to call
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


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
        body = self._read_body() if method == "POST" else None
        if body is None:
            self._drain_body()
        # The request is counted as answered just before its last byte goes out, so a client
        # that has its answer always finds it in the stats.
        self._settle = settle = sim.counted(method, query, body)
        status, outcome = 0, "aborted"
        try:
            exchange = sim.exchange(method, path, query, self.headers.get("api-key"), body)
            status, outcome = self._play(exchange)
        finally:
            settle(status, outcome)
            self._settle = None

    def _play(self, exchange: Exchange) -> tuple[int, str]:
        """Carry an exchange over this connection; returns (status sent or 0, outcome)."""
        if exchange.reset:
            return self._reset(exchange.outcome)
        if exchange.answer is None:
            if exchange.silence:
                self.sim._stopping.wait(exchange.silence)
            return self._abandon(exchange.outcome)
        return self._send(exchange.answer, trickle_seconds=exchange.trickle)

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
        if not is_loopback(self.client_address[0]):
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
def _stop_on_signals() -> Iterator[Callable[[], bool]]:
    """Turn SIGTERM and SIGINT into a flag while serving; yields the function that reads it.

    The handler only sets a flag: a handler runs between two bytecodes of the main thread,
    which may be holding a lock at that moment (an ``Event``'s, say), and taking a lock there
    could wait for ever. For the same reason Ctrl-C is not left to raise KeyboardInterrupt
    wherever the main thread happens to be. Off the main thread no handler can be installed:
    the flag then never rises, and KeyboardInterrupt does the stopping.
    """
    raised = [False]

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raised[0] = True

    if threading.current_thread() is not threading.main_thread():
        yield lambda: raised[0]
        return
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield lambda: raised[0]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
    with _stop_on_signals() as stopped, simulator:
        ready(simulator.base_url)
        try:
            while not stopped():
                time.sleep(0.1)
        except KeyboardInterrupt:
            pass
