"""How the Kaleyra client's requests reach the network, and the seam that replaces the network.

A *transport* is any callable that takes a :class:`Request` and returns a :class:`Response`,
as httpx's ``MockTransport`` takes a function.
:class:`~blockfilter.kaleyra.client.KaleyraClient` sends every attempt through one
(``KaleyraClient(settings, transport=answer)``), so unit tests answer from a function, with no
socket; a transport reports a failed exchange by raising :class:`TransportTimeout` or
:class:`TransportFailed`, which the client retries like any transient failure.

The default, :class:`Urllib3Transport`, keeps keep-alive connections of urllib3 per origin and
sends the request target as the client built it: urllib3's pool would percent-encode a
1.7 KB URL again on every request (what cost most of the client's CPU). Proxies and CA
bundles follow requests' rules (``HTTPS_PROXY``, ``NO_PROXY``, ``REQUESTS_CA_BUNDLE``...),
read once into a :class:`NetworkEnvironment` rather than on every request; a request through
a proxy goes through urllib3's ``ProxyManager``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.client import HTTPException
from typing import Any
from urllib.parse import unquote, urlsplit
from urllib.request import proxy_bypass_environment  # type: ignore[attr-defined]

import urllib3
from urllib3 import BaseHTTPResponse, PoolManager
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import NewConnectionError
from urllib3.exceptions import SSLError as Urllib3SSLError
from urllib3.exceptions import TimeoutError as Urllib3Timeout
from urllib3.util import create_urllib3_context, parse_url

from ..errors import (
    BodyTooLarge,
    ConfigError,
    TransportError,
    TransportFailed,
    TransportTimeout,
)

__all__ = [
    "NetworkEnvironment",
    "Request",
    "Response",
    "Transport",
    "TransportError",
    "TransportFailed",
    "TransportTimeout",
    "BodyTooLarge",
    "Urllib3Transport",
]

log = logging.getLogger("blockfilter.transport")

_READ_CHUNK = 64 * 1024
# What the network, http.client and urllib3 raise when an exchange fails; anything else is a
# bug, and is not passed off as a failed connection.
_NETWORK_ERRORS = (OSError, HTTPException, Urllib3Error)


@dataclass(frozen=True)
class Request:
    """One HTTP exchange to make. ``url`` is absolute and already percent-encoded: it is sent
    as it is. The URL, headers and body hold phone numbers and the API key, so ``repr`` shows
    none of them."""

    method: str
    url: str = field(repr=False)
    headers: Mapping[str, str] = field(repr=False)
    body: bytes | None = field(default=None, repr=False)
    #: Seconds to open a connection, within ``timeout``.
    connect_timeout: float = 10.0
    #: Seconds the whole exchange may take, the last byte of the body included.
    timeout: float = 30.0
    #: A body longer than this is not read (:class:`BodyTooLarge`).
    max_body_bytes: int = 4 * 1024 * 1024


@dataclass(frozen=True)
class Response:
    """A whole answer: the status, the headers (names in lower case) and the body."""

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""

    def __post_init__(self) -> None:
        object.__setattr__(self, "headers", {k.lower(): v for k, v in self.headers.items()})

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


#: What the client sends its requests through.
Transport = Callable[[Request], Response]


# -- the environment ---------------------------------------------------------------------------

_CA_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR")


@dataclass(frozen=True)
class NetworkEnvironment:
    """The proxy and CA variables, read once, and requests' rules for them.

    Proxies: ``<scheme>_proxy`` and ``all_proxy`` (lower case wins over upper case; under CGI,
    ``REQUEST_METHOD`` set, ``HTTP_PROXY`` is ignored), bypassed for hosts ``no_proxy`` names
    (suffixes, ``host:port``, CIDR blocks for IPv4 addresses, ``*``). CA certificates:
    ``REQUESTS_CA_BUNDLE`` or ``CURL_CA_BUNDLE`` (a file or a directory), else OpenSSL's
    ``SSL_CERT_FILE``/``SSL_CERT_DIR``, else certifi's bundle (requests' default), else the
    system's. Verification itself is never turned off.
    """

    #: ``scheme`` (or ``all``, ``no``) -> value, as :func:`urllib.request.getproxies` has them.
    proxies: Mapping[str, str] = field(default_factory=dict, repr=False)
    ca_file: str | None = None
    ca_dir: str | None = None

    @classmethod
    def read(cls, environ: Mapping[str, str] | None = None) -> NetworkEnvironment:
        """The variables of ``environ`` (default ``os.environ``); a CA variable naming
        nothing is a :class:`~blockfilter.errors.ConfigError` (requests failed every request
        on it)."""
        env = os.environ if environ is None else environ
        return cls(proxies=_environ_proxies(env), **_ca_locations(env))

    def proxy_for(self, url: str) -> str | None:
        """The proxy URL requests would use for ``url``, or ``None`` to connect directly."""
        parts = urlsplit(url)
        host = parts.hostname
        if host is None or self._bypassed(host, parts.port):
            return None
        for key in (f"{parts.scheme}://{host}", parts.scheme, f"all://{host}", "all"):
            proxy = self.proxies.get(key)
            if proxy:
                return proxy if "://" in proxy else f"http://{proxy}"
        return None

    def _bypassed(self, host: str, port: int | None) -> bool:
        entries = [e for e in self.proxies.get("no", "").replace(" ", "").split(",") if e]
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            address = None
        if isinstance(address, ipaddress.IPv4Address):
            for entry in entries:
                if "/" in entry:
                    try:
                        if address in ipaddress.ip_network(entry, strict=False):
                            return True
                    except ValueError:
                        continue
                elif entry == host:
                    return True
        else:
            with_port = f"{host}:{port}" if port else host
            if any(host.endswith(e) or with_port.endswith(e) for e in entries):
                return True
        return bool(proxy_bypass_environment(host, dict(self.proxies)))


def _environ_proxies(env: Mapping[str, str]) -> dict[str, str]:
    # urllib.request.getproxies_environment, over a given mapping.
    proxies: dict[str, str] = {}
    for name, value in env.items():
        if value and name.lower().endswith("_proxy"):
            proxies[name.lower()[:-6]] = value
    if "REQUEST_METHOD" in env:
        proxies.pop("http", None)
    for name, value in env.items():
        if name.endswith("_proxy"):  # lower case names win
            if value:
                proxies[name[:-6].lower()] = value
            else:
                proxies.pop(name[:-6].lower(), None)
    return proxies


def _ca_locations(env: Mapping[str, str]) -> dict[str, str | None]:
    for variable in _CA_VARIABLES[:2]:
        path = env.get(variable)
        if path:
            if os.path.isdir(path):
                return {"ca_file": None, "ca_dir": path}
            if os.path.isfile(path):
                return {"ca_file": path, "ca_dir": None}
            raise ConfigError(f"{variable} names no CA bundle file or directory")
    ca_file, ca_dir = env.get("SSL_CERT_FILE") or None, env.get("SSL_CERT_DIR") or None
    if ca_file or ca_dir:
        return {"ca_file": ca_file, "ca_dir": ca_dir}
    try:
        import certifi
    except ImportError:  # the system's store, as OpenSSL finds it
        return {"ca_file": None, "ca_dir": None}
    return {"ca_file": certifi.where(), "ca_dir": None}


# -- the default transport ---------------------------------------------------------------------


class Urllib3Transport:
    """Sends requests with urllib3 connections, kept alive and reused per origin.

    :param maxsize: idle connections kept per origin: one per concurrent request, so none is
        opened and thrown away per call.
    :param environment: proxies and CA settings (default: read from ``os.environ`` now).

    Nothing is retried and no redirect is followed: the client's retry budget is the only one,
    and a redirect would carry the API key elsewhere. Thread-safe; not to be shared across a
    fork (the client makes one per process).
    """

    def __init__(self, *, maxsize: int = 10, environment: NetworkEnvironment | None = None) -> None:
        self.maxsize = maxsize
        self.environment = environment or NetworkEnvironment.read()
        self._lock = threading.Lock()
        self._origins: dict[str, _Origin] = {}
        self._proxy_of: dict[str, str | None] = {}
        self._proxies: dict[str, PoolManager] = {}
        self._ssl_context: ssl.SSLContext | None = None

    @property
    def ssl_context(self) -> ssl.SSLContext:
        """The TLS settings of every HTTPS connection: certificates and host names verified,
        against the CA certificates of :attr:`environment` (loaded once, on first use)."""
        with self._lock:
            if self._ssl_context is None:
                context = create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED)
                env = self.environment
                if env.ca_file or env.ca_dir:
                    context.load_verify_locations(cafile=env.ca_file, capath=env.ca_dir)
                else:
                    context.load_default_certs()
                self._ssl_context = context
            return self._ssl_context

    def __call__(self, request: Request) -> Response:
        origin, target = _split(request.url)
        proxy = self._proxy_of.get(origin, "")
        if proxy == "":
            proxy = self._proxy_of[origin] = self.environment.proxy_for(origin)
        deadline = time.monotonic() + request.timeout
        if proxy is None:
            return self._origin(origin).exchange(target, request, deadline)
        return self._via_proxy(proxy, request, deadline)

    def close(self) -> None:
        """Close every idle connection; the transport may still be used, it reconnects."""
        with self._lock:
            origins, self._origins = self._origins, {}
            proxies, self._proxies = self._proxies, {}
        for pool in origins.values():
            pool.close()
        for manager in proxies.values():
            manager.clear()

    def _origin(self, origin: str) -> _Origin:
        pool = self._origins.get(origin)
        if pool is None:
            with self._lock:
                pool = self._origins.setdefault(origin, _Origin(origin, self))
        return pool

    def _via_proxy(self, proxy: str, request: Request, deadline: float) -> Response:
        # Rare enough to take urllib3's whole path: CONNECT tunnels, HTTPS and SOCKS proxies.
        try:
            manager = self._proxy_manager(proxy)
            raw = manager.urlopen(
                request.method,
                request.url,
                body=request.body,
                headers=dict(request.headers),
                retries=False,
                redirect=False,
                assert_same_host=False,
                preload_content=False,
                timeout=urllib3.Timeout(
                    connect=min(request.connect_timeout, request.timeout), read=request.timeout
                ),
            )
        except _NETWORK_ERRORS as exc:
            raise _failure(exc) from None
        sock = getattr(getattr(raw, "connection", None), "sock", None)
        complete = False
        try:
            body = _read_body(raw, sock, deadline, request.max_body_bytes)
            complete = True
        finally:
            if not complete:
                # Unread bytes would be taken for the next answer: the connection goes.
                raw.close()
            raw.release_conn()
        return Response(raw.status, raw.headers, body)

    def _proxy_manager(self, proxy: str) -> PoolManager:
        with self._lock:
            manager = self._proxies.get(proxy)
        if manager is not None:
            return manager
        parts = urlsplit(proxy)
        options: dict[str, Any] = {"num_pools": 4, "maxsize": self.maxsize}
        options["ssl_context"] = self.ssl_context
        if parts.scheme.startswith("socks"):
            try:
                from urllib3.contrib.socks import SOCKSProxyManager
            except ImportError:  # requests also needed PySocks for them
                raise TransportFailed("a SOCKS proxy needs PySocks installed") from None
            manager = SOCKSProxyManager(proxy, **options)
        else:
            if parts.username is not None:
                options["proxy_headers"] = urllib3.make_headers(
                    proxy_basic_auth=f"{unquote(parts.username)}:{unquote(parts.password or '')}"
                )
            manager = urllib3.ProxyManager(proxy, **options)
        with self._lock:
            return self._proxies.setdefault(proxy, manager)


class _Origin:
    """Keep-alive connections to one ``scheme://host:port``, the last returned lent first (as
    urllib3's pool keeps them)."""

    def __init__(self, origin: str, transport: Urllib3Transport) -> None:
        url = parse_url(origin)
        self.scheme = url.scheme or "http"
        self.host = url.host or ""
        self.port = url.port
        self._transport = transport
        self._idle: list[HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False

    def exchange(self, target: str, request: Request, deadline: float) -> Response:
        conn = self._lend()
        complete = False
        try:
            try:
                if conn.sock is None:
                    conn.timeout = min(request.connect_timeout, request.timeout)
                else:
                    conn.sock.settimeout(_left(deadline))
                conn.request(
                    request.method,
                    target,
                    body=request.body,
                    headers=request.headers,
                    preload_content=False,
                )
                sock = conn.sock
                if sock is not None:
                    sock.settimeout(_left(deadline))
                raw = conn.getresponse()
            except (BrokenPipeError, ConnectionResetError) as exc:
                # The server may close early yet have answered (urllib3 reads on too): an
                # answer that is there is read; none is a failed connection.
                try:
                    raw = conn.getresponse()
                except _NETWORK_ERRORS:
                    raise _failure(exc) from None
                sock = conn.sock
            except _NETWORK_ERRORS as exc:
                raise _failure(exc) from None
            # urllib3's pool logs this line; -vv shows it (its numbers masked, as every
            # record of the library's loggers is).
            log.debug(
                '%s://%s:%s "%s %s" %s %s',
                self.scheme,
                self.host,
                self.port,
                request.method,
                target,
                raw.status,
                raw.length_remaining,
            )
            body = _read_body(raw, sock, deadline, request.max_body_bytes)
            complete = True
        finally:
            if complete:
                self._take_back(conn)
            else:
                conn.close()  # unread bytes would be taken for the next answer
        return Response(raw.status, raw.headers, body)

    def _lend(self) -> HTTPConnection:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            return self._new()
        if not conn.is_connected:
            conn.close()  # dropped while idle: it reconnects when used
        return conn

    def _new(self) -> HTTPConnection:
        if self.scheme == "https":
            return HTTPSConnection(self.host, self.port, ssl_context=self._transport.ssl_context)
        return HTTPConnection(self.host, self.port)

    def _take_back(self, conn: HTTPConnection) -> None:
        maxsize = self._transport.maxsize
        with self._lock:
            if not self._closed and len(self._idle) < maxsize:
                self._idle.append(conn)
                return
        if not self._closed:
            # urllib3's own words: the tests (and operators) know them.
            log.warning(
                "Connection pool is full, discarding connection: %s. Connection pool size: %s",
                self.host,
                maxsize,
            )
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _split(url: str) -> tuple[str, str]:
    """``scheme://host:port`` and the request target, without re-encoding anything."""
    start = url.find("://") + 3
    slash = url.find("/", start)
    if slash < 0:
        return url, "/"
    return url[:slash], url[slash:]


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.001)


def _read_body(raw: BaseHTTPResponse, sock: Any, deadline: float, limit: int) -> bytes:
    """The whole body by ``deadline``, read in chunks of whatever has arrived (``read1``) with
    the socket's timeout set to the time left before each read, so a server sending a byte a
    second cannot stretch the exchange past its deadline."""
    chunks: list[bytes] = []
    size = 0
    # Without a content coding, the last byte Content-Length announced ends the body: no
    # further read is needed to learn it (with one, the decoder may still hold some).
    plain = "content-encoding" not in raw.headers
    while True:
        if deadline - time.monotonic() <= 0:
            raise TransportTimeout("the answer did not arrive in time")
        if sock is not None and sock.fileno() != -1:  # -1: closed, the answer is all read
            sock.settimeout(_left(deadline))
        try:
            chunk = raw.read1(_READ_CHUNK, decode_content=True)
        except _NETWORK_ERRORS as exc:
            raise _failure(exc) from None
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"the body is longer than {limit} bytes")
        chunks.append(chunk)
        if plain and raw.length_remaining == 0:
            return b"".join(chunks)


def _failure(exc: BaseException) -> TransportError:
    """What an exception of urllib3, http.client or the socket means, named by its class
    only: urllib3's messages carry the full URL, and with it the phone numbers asked."""
    name = type(exc).__name__
    if isinstance(exc, NewConnectionError):
        return TransportFailed(name)
    if isinstance(exc, (TimeoutError, Urllib3Timeout)):
        return TransportTimeout(name)
    if isinstance(exc, (ssl.SSLError, ssl.CertificateError, Urllib3SSLError)):
        return TransportFailed("SSLError")
    return TransportFailed(name)
