"""A hostile Kaleyra upstream for tests: a real HTTP server whose every answer the test decides.

It imports nothing from ``blockfilter``, on purpose: a misreading of the API that the client
and the project's own simulator share would pass every test against the simulator. Here the
test writes the answers itself, so the client meets what a real upstream may send.

Use it through the ``hostile_upstream`` fixture (``tests/conftest.py``), which stops every
server it started and fails the test if an answer function raised::

    def test_x(hostile_upstream):
        upstream = hostile_upstream(blocklist({"sms": ["+919812345678"]}, rewrite=no_plus))
        ...  # point KALEYRA_BASE_URL (or Settings.base_url) at upstream.base_url
        assert len(upstream.requests) == 1

or as a context manager: ``with HostileUpstream(answer) as upstream: ...``.

**The answer function** is ``answer(path, query, headers) -> (status, headers, body)``:

* ``path``: the request path without its query (``/v1/<SID>/contacts/blocklisted``);
* ``query``: each parameter's decoded value (a raw ``+`` decodes to a space, as on a real
  server); a parameter given twice keeps its first value, :attr:`Request.raw_query` has all;
* ``headers``: the request's headers, names in lower case;
* it returns the status, the response headers and the body: ``bytes``, or a :class:`Trickle`
  to send it slowly. ``Content-Length`` is set from the body unless the headers give one.

**Helpers** for the usual cases:

* :func:`blocklist`: Kaleyra's "Get Blocklist" over per-channel lists: lookups (``mobile``)
  answer the listed numbers among those asked, each written by ``rewrite`` (:func:`as_written`,
  :func:`no_plus`, :func:`spaced`, :func:`dashed`, :func:`national`), plus ``extra`` numbers
  never asked; whole-list pages by ``limit``/``offset`` in a ``paging`` mode (:data:`PAGING`);
* :func:`always` (one fixed answer), :func:`sequence` (answers in turn, the last repeats),
  :func:`redirect`, :func:`no_content`;
* bodies: :func:`kaleyra_body` (a success body), :func:`deep_body` (nesting deep enough to
  break a recursive parser), :class:`Trickle` (a body sent a byte at a time).

**Requests** are recorded in arrival order (:attr:`HostileUpstream.requests`), before they are
answered, so a test can assert counts. **Stopping**: :meth:`HostileUpstream.stop` (the fixture
and the context manager call it) closes the listener and every open connection and ends any
trickle; a server nobody stops stops itself after ``lifetime`` seconds. All its threads are
daemons, so a hung test never keeps the interpreter alive.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

__all__ = [
    "PAGING",
    "Answer",
    "AnswerFunction",
    "HostileUpstream",
    "Request",
    "Trickle",
    "always",
    "as_written",
    "blocklist",
    "dashed",
    "deep_body",
    "kaleyra_body",
    "national",
    "no_content",
    "no_plus",
    "redirect",
    "sequence",
    "spaced",
]


@dataclass(frozen=True)
class Trickle:
    """A body sent one byte every ``seconds_per_byte`` (``Content-Length`` announces it all)."""

    body: bytes
    seconds_per_byte: float = 0.2


Answer = tuple[int, Mapping[str, str], "bytes | Trickle"]
AnswerFunction = Callable[[str, dict[str, str], dict[str, str]], Answer]


@dataclass(frozen=True)
class Request:
    """One request as the server received it."""

    method: str
    path: str
    query: dict[str, str]
    raw_query: str
    headers: dict[str, str]
    body: bytes = b""

    @property
    def mobiles(self) -> list[str]:
        """The numbers a lookup asked (``mobile`` split on commas); empty for a page."""
        value = self.query.get("mobile")
        return value.split(",") if value else []


class HostileUpstream:
    """A threaded HTTP/1.1 server on 127.0.0.1, on a free port, answering with ``answer``.

    :param answer: the answer function (see the module docs).
    :param lifetime: seconds after which the server stops by itself.
    """

    def __init__(self, answer: AnswerFunction, *, lifetime: float = 300.0) -> None:
        self._answer = answer
        self._lock = threading.Lock()
        self._requests: list[Request] = []
        self._connections: set[socket.socket] = set()
        self.errors: list[BaseException] = []  #: what the answer function raised
        self._stopping = threading.Event()
        self._stopped = False
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="hostile-upstream",
            daemon=True,
        )
        self._thread.start()
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()

    @property
    def requests(self) -> list[Request]:
        """Every request received so far, in arrival order (a copy)."""
        with self._lock:
            return list(self._requests)

    def stop(self) -> None:
        """Stop serving, close every connection, end trickles. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            connections = list(self._connections)
        self._stopping.set()
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by the other side
                connection.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> HostileUpstream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- serving -------------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with upstream._lock:
                    upstream._connections.add(self.connection)

            def finish(self) -> None:
                with upstream._lock:
                    upstream._connections.discard(self.connection)
                with contextlib.suppress(OSError):  # the client went away mid-answer
                    super().finish()

            def do_GET(self) -> None:
                upstream._serve(self)

            do_POST = do_GET

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # the request line carries numbers; tests read .requests instead

        return Handler

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        split = urlsplit(handler.path)
        query: dict[str, str] = {}
        for name, value in parse_qsl(split.query, keep_blank_values=True):
            query.setdefault(name, value)
        headers = {name.lower(): value for name, value in handler.headers.items()}
        length = int(headers.get("content-length") or 0)
        body = handler.rfile.read(length) if length else b""
        with self._lock:
            self._requests.append(
                Request(handler.command, split.path, query, split.query, headers, body)
            )
        try:
            status, answer_headers, answer_body = self._answer(split.path, dict(query), headers)
        except Exception as exc:  # a bug of the test: answer, and let the fixture report it
            with self._lock:
                self.errors.append(exc)
            status, answer_headers, answer_body = 500, {}, b"hostile upstream: answer failed"
        try:
            self._write(handler, status, answer_headers, answer_body)
        except OSError:
            handler.close_connection = True  # the client hung up; nothing to tell it

    def _write(
        self,
        handler: BaseHTTPRequestHandler,
        status: int,
        headers: Mapping[str, str],
        body: bytes | Trickle,
    ) -> None:
        payload = body.body if isinstance(body, Trickle) else body
        handler.send_response(status)
        given = {name.lower() for name in headers}
        bodiless = status in (204, 304) or 100 <= status < 200
        if "content-length" not in given and not bodiless:
            handler.send_header("Content-Length", str(len(payload)))
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.end_headers()
        if not isinstance(body, Trickle):
            handler.wfile.write(payload)
            return
        handler.wfile.flush()
        for index in range(len(payload)):
            if self._stopping.wait(body.seconds_per_byte):
                handler.close_connection = True
                return
            handler.wfile.write(payload[index : index + 1])
            handler.wfile.flush()


# -- answers -------------------------------------------------------------------------------


def always(
    status: int, body: bytes | Trickle = b"", headers: Mapping[str, str] | None = None
) -> AnswerFunction:
    """The same answer to every request."""
    fixed: Answer = (status, dict(headers or {}), body)

    def answer(path: str, query: dict[str, str], request_headers: dict[str, str]) -> Answer:
        return fixed

    return answer


def sequence(*answers: AnswerFunction) -> AnswerFunction:
    """The first request answered by the first function, the second by the second...; the
    last one answers every request after."""
    if not answers:
        raise ValueError("sequence() needs at least one answer function")
    turn = iter(range(len(answers) - 1))
    lock = threading.Lock()

    def answer(path: str, query: dict[str, str], headers: dict[str, str]) -> Answer:
        with lock:
            index = next(turn, len(answers) - 1)
        return answers[index](path, query, headers)

    return answer


def redirect(status: int = 302, location: str = "http://127.0.0.1:9/elsewhere") -> AnswerFunction:
    """A redirect (``Location`` given) with a small JSON body that a careless client could
    even take for an answer."""
    return always(status, kaleyra_body([]), {"Location": location})


def no_content() -> AnswerFunction:
    """``204 No Content``: a success status with no answer in it."""
    return always(204)


def kaleyra_body(mobiles: Iterable[str], code: str = "CNT196") -> bytes:
    """A "Get Blocklist" success body listing ``mobiles`` exactly as given."""
    data = [{"mobile": mobile, "channel_type": "3"} for mobile in mobiles]
    return json.dumps({"code": code, "data": data, "error": {}}).encode()


def deep_body(depth: int = 100_000, where: str = "top", mobile: str = "+919812345678") -> bytes:
    """A body nested ``depth`` lists deep: the whole body (``top``), the value of ``data``
    (``data``), or a field of an otherwise good entry naming ``mobile`` (``entry``)."""
    nested = "[" * depth + "]" * depth
    if where == "top":
        text = nested
    elif where == "data":
        text = f'{{"code":"CNT196","data":{nested},"error":{{}}}}'
    elif where == "entry":
        entry = f'{{"mobile":{json.dumps(mobile)},"channel_type":"3","x":{nested}}}'
        text = f'{{"code":"CNT196","data":[{entry}],"error":{{}}}}'
    else:
        raise ValueError(f"where must be top, data or entry, not {where!r}")
    return text.encode()


# -- the blocklist -------------------------------------------------------------------------

Rewrite = Callable[[str], str]

#: How :func:`blocklist` answers whole-list pages: ``honest`` (``limit`` numbers from
#: ``offset``, a short page at the end), ``same_page`` (the first page whatever the offset: a
#: list of at least ``limit`` numbers never ends), ``never_short`` (every page full, the list
#: read round and round; needs a non-empty list).
PAGING = ("honest", "same_page", "never_short")


def as_written(number: str) -> str:
    """E.164, as the API is documented to answer."""
    return number


def no_plus(number: str) -> str:
    """``+919812345678`` -> ``919812345678``."""
    return _e164_digits(number)


def spaced(number: str) -> str:
    """``+919812345678`` -> ``+91 98123 45678``: the first two digits, then groups of five."""
    digits = _e164_digits(number)
    return "+" + " ".join(_groups(digits))


def dashed(number: str) -> str:
    """``+919812345678`` -> ``+91-98123-45678``."""
    digits = _e164_digits(number)
    return "+" + "-".join(_groups(digits))


def national(calling_code: str, trunk: str = "0") -> Rewrite:
    """A rewrite into national format: ``national("91")`` turns ``+919812345678`` into
    ``098123 45678`` (the trunk prefix, then the national number in two groups)."""

    def rewrite(number: str) -> str:
        digits = _e164_digits(number)
        if not digits.startswith(calling_code):
            raise ValueError(f"a number of another country than +{calling_code}")
        rest = digits[len(calling_code) :]
        return f"{trunk}{rest[:5]} {rest[5:]}"

    return rewrite


def blocklist(
    lists: Mapping[str, Iterable[str]],
    *,
    rewrite: Rewrite = as_written,
    extra: Iterable[str] = (),
    paging: str = "honest",
) -> AnswerFunction:
    """Kaleyra's "Get Blocklist" over ``lists`` (channel -> E.164 numbers; later changes to
    the iterables are not seen).

    A lookup (``mobile`` given) answers the listed numbers among those asked, in the order
    asked, each written by ``rewrite``, then every number of ``extra`` as given (numbers never
    asked, whatever the channel). A page (no ``mobile``) answers ``limit`` (default 100)
    numbers from ``offset`` (default 0) of the channel's list, rewritten, as ``paging`` says.
    A path not ending in ``/contacts/blocklisted`` is a 404; an unknown channel a 400 ``WA400``.
    Credentials are not checked.
    """
    if paging not in PAGING:
        raise ValueError(f"paging must be one of {', '.join(PAGING)}, not {paging!r}")
    listed = {channel: list(dict.fromkeys(numbers)) for channel, numbers in lists.items()}
    members = {channel: set(numbers) for channel, numbers in listed.items()}
    extras = list(extra)

    def answer(path: str, query: dict[str, str], headers: dict[str, str]) -> Answer:
        if not path.endswith("/contacts/blocklisted"):
            return 404, {}, b"not found"
        channel = query.get("channel", "")
        if channel not in ("sms", "whatsapp", "voice"):
            return 400, {}, json.dumps({"code": "WA400", "data": [], "error": {}}).encode()
        numbers = listed.get(channel, [])
        if "mobile" in query:
            asked = query["mobile"].split(",")
            found = [rewrite(n) for n in asked if n in members.get(channel, ())]
            return 200, {"Content-Type": "application/json"}, kaleyra_body(found + extras)
        limit = int(query.get("limit") or 100)
        offset = int(query.get("offset") or 0)
        page = _page(numbers, limit, offset, paging)
        return 200, {"Content-Type": "application/json"}, kaleyra_body(rewrite(n) for n in page)

    return answer


def _page(numbers: Sequence[str], limit: int, offset: int, paging: str) -> list[str]:
    if paging == "honest":
        return list(numbers[offset : offset + limit])
    if paging == "same_page":
        return list(numbers[:limit])
    if not numbers:
        raise ValueError("never_short paging needs a non-empty list")
    return [numbers[(offset + index) % len(numbers)] for index in range(limit)]


def _e164_digits(number: str) -> str:
    if not (number.startswith("+") and number[1:].isdigit()):
        raise ValueError("rewrites take E.164 numbers ('+' and digits)")
    return number[1:]


def _groups(digits: str) -> list[str]:
    return [part for part in (digits[:2], digits[2:7], digits[7:]) if part]
