"""The HTTP client of Kaleyra's "Get Blocklist" API.

One :class:`KaleyraClient` per process is the intended use. It sends every attempt through a
*transport* (:mod:`blockfilter.kaleyra.transport`): by default a pool of urllib3 keep-alive
connections, made on first use (never at import, since Celery imports this module in every
worker) and made again when the process id changes, so prefork children never share their
parent's sockets. Proxy and CA variables (``HTTPS_PROXY``, ``NO_PROXY``,
``REQUESTS_CA_BUNDLE``...) are read when the client is made, by requests' rules. Handed a
function instead (``transport=answer``, ``answer(request) -> response``, as httpx's
``MockTransport``), the client asks that function and opens no socket: unit tests use it.

Every request is one *logical* request (at most 100 numbers, or one page of the whole
blocklist) tried within a retry budget: at most ``retry_attempts`` attempts, none started (and
no backoff slept) later than ``retry_deadline`` seconds after the first. Each attempt has a
*total* deadline (``request_timeout``), so a server trickling a byte a second cannot hold a
worker hostage. Every documented answer is mapped to a typed error of
:mod:`blockfilter.errors`: :class:`~blockfilter.errors.FinalUpstreamError` subclasses are
raised at once, :class:`~blockfilter.errors.TransientUpstreamError` ones are retried and, once
the budget is spent, wrapped in :class:`~blockfilter.errors.RetryBudgetExhausted`.

Answers are matched by number, not by string: an entry written another way (no ``+``,
spaces, national format) is read as every number it can mean, and an entry that means none of
the numbers asked makes the whole answer a transient ``bad_answer``, never "not blocklisted".
A body is read one way or not at all: one that is not strict UTF-8 JSON, or that holds a
repeated key, ``NaN``, an absurd number or nesting deeper than Python recurses, is a transient
``bad_body``. What the upstream answered wrongly (those two, redirects, which are never
followed, a ``204``, an unknown status) is logged as one warning per problem a minute.

The API key is sent in the ``api-key`` header and nowhere else: it is never logged, never put
into an exception message, never shown by ``repr``. Phone numbers are never put into exception
messages either (they are personal data); logs only ever show counts.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from .. import metrics
from ..config import CHANNELS, Settings, load_settings
from ..errors import (
    BadRequest,
    CredentialsRefused,
    FinalUpstreamError,
    RetryBudgetExhausted,
    TransientUpstreamError,
    UpstreamError,
)
from ..model import MAX_NUMBERS_PER_REQUEST, MAX_PAGE_SIZE, channel_named
from ..numbers import normalize_answer, regions_of
from ..redact import guard_library_logs
from .transport import (
    BodyTooLarge,
    NetworkEnvironment,
    Request,
    Response,
    Transport,
    TransportError,
    TransportTimeout,
    Urllib3Transport,
)

__all__ = [
    "MAX_NUMBERS_PER_REQUEST",
    "MAX_PAGE_SIZE",
    "ClientStats",
    "KaleyraClient",
    "RequestLimiter",
    "parse_retry_after",
]

log = logging.getLogger("blockfilter.client")


# Kaleyra codes that mean "this account cannot check anything until a human acts".
_REFUSED_CODES = frozenset({"RBC001", "WA401", "WA-401", "E110"})
# Kaleyra codes that mean "try again later".
_TRANSIENT_CODES = frozenset({"WA500", "CNT195", "WA202"})
# A full answer of 100 entries is a few kilobytes; anything far bigger is not an answer.
_MAX_BODY_BYTES = 4 * 1024 * 1024
# fullmatch: "$" would also match before a trailing newline. A number that matches needs no
# percent-encoding but its "+" (%2B: a raw "+" decodes to a space).
_NUMBER = re.compile(r"\+[0-9]{1,15}")
# No field of an answer needs a longer integer; a longer one is not Kaleyra's answer.
_MAX_INTEGER_DIGITS = 64
# A problem already logged is not logged again for this long (per client), so a broken
# upstream costs one line a minute, not one per request.
_REPEAT_WARNING_AFTER_S = 60.0

_T = TypeVar("_T")
# The ``data`` of an answer: its entries, each a dict with a string ``mobile``.
_Data = list[dict[str, Any]]


class RequestLimiter(Protocol):
    """Paces the client's requests; a fleet-wide (Redis) rate limiter plugs in here."""

    def acquire(self) -> None:
        """Block until one request may be sent (called before every attempt)."""

    def penalize(self, seconds: float) -> None:
        """A 429 told us to slow down for ``seconds``: slow the whole fleet down."""


@dataclass
class ClientStats:
    """Counters of what a client did, safe to update from many threads.

    ``requests`` counts HTTP attempts (every retry included) and ``numbers_asked`` the numbers
    they carried, so both match what the server saw. ``failures_by_code`` counts failed
    attempts by error code (``WA500``, ``timeout``, ``rate_limited``...).
    """

    requests: int = 0
    retries: int = 0
    numbers_asked: int = 0
    failures_by_code: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )

    def count_attempt(self, numbers: int) -> None:
        with self._lock:
            self.requests += 1
            self.numbers_asked += numbers

    def count_retry(self) -> None:
        with self._lock:
            self.retries += 1

    def count_failure(self, code: str) -> None:
        with self._lock:
            self.failures_by_code[code] = self.failures_by_code.get(code, 0) + 1

    def snapshot(self) -> ClientStats:
        """A consistent copy, for reports."""
        with self._lock:
            return ClientStats(
                requests=self.requests,
                retries=self.retries,
                numbers_asked=self.numbers_asked,
                failures_by_code=dict(self.failures_by_code),
            )


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP-date.

    Returns ``None`` when the header is absent or unreadable, and never a negative number.
    Fractional seconds are accepted (not in the RFC, but harmless and handy for tests).
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # an HTTP-date is GMT even when it fails to say so
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


@dataclass(frozen=True)
class _Shape:
    """What one logical request asks, for logs and error messages (never the numbers)."""

    channel: str
    numbers: int  # 0 for a page of the whole blocklist
    offset: int | None = None

    def describe(self) -> str:
        if self.offset is not None:
            return f"channel {self.channel}, blocklist page at offset {self.offset}"
        return f"channel {self.channel}, {self.numbers} numbers"


def _transient(
    message: str, code: str, status: int | None = None, retry_after: float | None = None
) -> TransientUpstreamError:
    return TransientUpstreamError(message, status=status, code=code, retry_after=retry_after)


class _Untrusted(TransientUpstreamError):
    """A 200 that is no answer to trust (``bad_body``, ``bad_answer``): retried like any
    transient failure. ``problem`` names what is wrong without counts, so that the warning
    is logged once per kind of wrong, not once per request."""

    def __init__(self, message: str, *, code: str, status: int, problem: str) -> None:
        super().__init__(message, status=status, code=code)
        self.problem = problem


class KaleyraClient:
    """Asks Kaleyra which numbers are blocklisted on a channel.

    :param settings: the effective settings; the SID and key are required
        (:class:`~blockfilter.errors.ConfigError` naming the missing variable otherwise).
    :param limiter: paces every attempt (``acquire``) and hears about 429s (``penalize``).
    :param sleep: how to wait between attempts (tests inject a fake).
    :param clock: the monotonic clock of the retry budget (tests inject a fake).
    :param rng: the source of backoff jitter (tests inject a seeded one).
    :param transport: what sends each attempt, ``(Request) -> Response``
        (:mod:`blockfilter.kaleyra.transport`); default: urllib3 connections, one pool per process.

    Thread-safe: :meth:`blocked` itself runs requests on a thread pool, and many threads may
    share one client.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        limiter: RequestLimiter | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        transport: Transport | None = None,
    ) -> None:
        self._sid, self._api_key = settings.require_credentials()
        # urllib3's own debug lines carry the request URL: mask its numbers, guard the key.
        guard_library_logs(self._api_key)
        self.settings = settings
        self.limiter = limiter
        self._sleep = sleep
        self._clock = clock
        self._rng = rng or random.Random()
        self.stats = ClientStats()
        self.endpoint = f"{settings.api_root}/v1/{self._sid}/contacts/blocklisted"
        # Built once: a request only appends its numbers (or its page) to these.
        self._lookup_urls = {
            channel: f"{self.endpoint}?limit={MAX_PAGE_SIZE}&offset=0&channel={channel}&mobile="
            for channel in CHANNELS
        }
        from .. import __version__  # late: the package root may import this module

        self._headers = {
            "api-key": self._api_key,
            "User-Agent": f"blockfilter/{__version__}",
            "Accept": "application/json",
            # No content coding asked (http.client sends "identity"): an answer is a few
            # kilobytes, and decompressing it would cost more CPU than it saves on the wire.
        }
        self._post_headers = {**self._headers, "Content-Type": "application/json"}
        self._given_transport = transport
        # Read now, once: requests re-read the proxy variables on every request.
        self._network = NetworkEnvironment.read() if transport is None else None
        self._transport: Urllib3Transport | None = None
        self._transport_pid: int | None = None
        self._transport_lock = threading.Lock()
        self._warned: dict[tuple[object, ...], float] = {}
        self._warned_lock = threading.Lock()

    @classmethod
    def from_env(cls) -> KaleyraClient:
        """A client configured from the ``KALEYRA_*`` / ``BLOCKFILTER_*`` variables."""
        return cls(load_settings())

    def __repr__(self) -> str:
        # The SID is an account identifier, not a secret; the key never appears.
        return (
            f"KaleyraClient(api_root={self.settings.api_root!r}, "
            f"region={self.settings.region!r}, sid={self._sid!r})"
        )

    def __enter__(self) -> KaleyraClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the transport -------------------------------------------------------------------------

    def _http(self) -> Transport:
        """The transport handed in, or this process's pooled one, made on first use and again
        after a fork."""
        if self._given_transport is not None:
            return self._given_transport
        pid = os.getpid()
        with self._transport_lock:
            if self._transport is None or self._transport_pid != pid:
                # After a fork the inherited connections are the parent's too: closing them
                # here could cut the parent's, so they are just abandoned.
                self._transport = Urllib3Transport(
                    # One connection per concurrent request, none opened and thrown away.
                    maxsize=max(self.settings.concurrency, 10),
                    environment=self._network,
                )
                self._transport_pid = pid
            return self._transport

    def close(self) -> None:
        """Close the pooled connections. The client may still be used; it reconnects. A
        transport handed in is its owner's to close."""
        with self._transport_lock:
            transport, self._transport = self._transport, None
            if transport is not None and self._transport_pid == os.getpid():
                transport.close()
            self._transport_pid = None

    def _send(self, request: Request, shape: _Shape) -> Response:
        """One exchange through the transport; its failures as the client's transient errors
        (no cause attached: an exception of the HTTP stack may show the URL, and with it the
        numbers asked)."""
        try:
            return self._http()(request)
        except TransportTimeout:
            raise _transient(
                f"Kaleyra did not answer in time ({shape.describe()})", "timeout"
            ) from None
        except BodyTooLarge:
            raise _transient(
                f"Kaleyra's answer is implausibly large ({shape.describe()})", "bad_body"
            ) from None
        except TransportError as exc:
            raise _transient(
                f"connection to Kaleyra failed: {exc} ({shape.describe()})", "connection"
            ) from None

    def _request_of(
        self, method: str, url: str, timeout: float, body: bytes | None = None
    ) -> Request:
        return Request(
            method,
            url,
            self._headers if body is None else self._post_headers,
            body,
            connect_timeout=min(self.settings.connect_timeout, timeout),
            timeout=timeout,
            max_body_bytes=_MAX_BODY_BYTES,
        )

    # -- the public calls ----------------------------------------------------------------------

    def blocked_batch(self, channel: str, numbers: Sequence[str]) -> set[str]:
        """Which of at most 100 E.164 numbers are blocklisted on ``channel``.

        One logical request, retried within the budget. Duplicates are asked once; an empty
        batch asks nothing (an absent ``mobile`` would ask for the whole blocklist).

        :raises ValueError: more than 100 distinct numbers, an unknown channel, or a number
            that is not ``+`` and digits.
        :raises CredentialsRefused: ``RBC001``, ``WA401``, ``WA-401``, ``E110``.
        :raises FinalUpstreamError: ``WA400`` (:class:`BadRequest`) or another final answer.
        :raises RetryBudgetExhausted: every attempt the budget allowed failed transiently.
        """
        channel = channel_named(channel)
        unique = list(dict.fromkeys(numbers))
        if len(unique) > MAX_NUMBERS_PER_REQUEST:
            raise ValueError(
                f"at most {MAX_NUMBERS_PER_REQUEST} numbers per request, got {len(unique)}"
            )
        if not unique:
            return set()
        if not _all_numbers(unique):
            bad = sum(1 for n in unique if not isinstance(n, str) or not _NUMBER.fullmatch(n))
            raise ValueError(f"{bad} of {len(unique)} numbers are not E.164 ('+' and digits)")
        # limit=100 with every batch: should the API page mobile queries too, one page still
        # holds every number of a batch, so none can be missed. '+' travels as %2B (a raw '+'
        # decodes to a space); nothing else of a checked number needs encoding.
        url = self._lookup_urls[channel] + ",".join(unique).replace("+", "%2B")
        shape = _Shape(channel, len(unique))
        return self._request(url, shape, lambda data: _match_answer(data, unique, shape))

    def blocked(self, channel: str, numbers: Iterable[str]) -> set[str]:
        """Which of any number of E.164 numbers are blocklisted on ``channel``.

        The numbers are deduplicated, split into requests of at most 100 and asked
        concurrently, at most ``BLOCKFILTER_CONCURRENCY`` at once. The first error of any
        request is raised once the others are cancelled or finished.
        """
        channel = channel_named(channel)
        unique = list(dict.fromkeys(numbers))
        batches = [
            unique[start : start + MAX_NUMBERS_PER_REQUEST]
            for start in range(0, len(unique), MAX_NUMBERS_PER_REQUEST)
        ]
        if len(batches) <= 1:
            return self.blocked_batch(channel, batches[0]) if batches else set()
        workers = min(self.settings.concurrency, len(batches))
        result: set[str] = set()
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="blockfilter-api") as pool:
            futures: list[Future[set[str]]] = [
                pool.submit(self.blocked_batch, channel, batch) for batch in batches
            ]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for future in pending:
                future.cancel()  # those not started yet; running ones finish on their own
            for future in futures:
                failure = future.exception() if future in done else None
                if failure is not None:
                    raise failure
            for future in futures:
                result |= future.result()
        return result

    def iter_blocklist(self, channel: str, page_size: int = MAX_PAGE_SIZE) -> Iterator[str]:
        """Every number blocklisted on ``channel``, page by page (``mobile`` omitted).

        Pages are asked with ``limit``/``offset`` until a page comes back short; a blocklist
        that is an exact multiple of ``page_size`` costs one last, empty page. The list may
        change while it is paged: a number may then be missed or seen twice.
        """
        offset = 0
        while True:
            page = self.blocklist_page(channel, offset, page_size)
            yield from page
            if len(page) < page_size:
                return
            offset += page_size

    def blocklist_page(
        self, channel: str, offset: int, page_size: int = MAX_PAGE_SIZE
    ) -> list[str]:
        """One page of the blocklist of ``channel``: up to ``page_size`` numbers from
        ``offset`` (one logical request, within the retry budget). A page shorter than
        ``page_size`` is the last; pages can be fetched concurrently."""
        channel = channel_named(channel)
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be 1..{MAX_PAGE_SIZE}, got {page_size}")
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        url = f"{self.endpoint}?limit={page_size}&offset={offset}&channel={channel}"
        return self._request(url, _Shape(channel, 0, offset), _mobiles)

    # -- one logical request: the retry budget -------------------------------------------------

    def _request(self, url: str, shape: _Shape, read: Callable[[_Data], _T]) -> _T:
        """``read`` of the ``data`` of the first good answer; ``read`` may raise a transient
        error to have an answer that is not good enough retried like any other."""
        return self._retrying(
            "request", shape, lambda timeout: self._attempt(url, shape, timeout, read)
        )

    def _retrying(self, what: str, shape: _Shape, attempt_once: Callable[[float], _T]) -> _T:
        """``attempt_once(timeout)`` until it succeeds, within the retry budget: transient
        errors are retried after a full-jitter backoff (at least their ``Retry-After``); no
        attempt starts, nor outlives, the budget's deadline."""
        settings = self.settings
        started = self._clock()
        budget_ends = started + settings.retry_deadline
        attempt = 0
        error: TransientUpstreamError | None = None
        while True:
            if self.limiter is not None:
                self.limiter.acquire()
            remaining = budget_ends - self._clock()
            if error is not None and remaining <= 0:
                # The limiter held us past the budget: no attempt starts after it.
                raise self._exhausted(error, attempt, started, shape)
            attempt += 1
            # The attempt may not outlive the budget: the budget is a promise to the caller.
            attempt_timeout = max(min(settings.request_timeout, remaining), 0.001)
            try:
                return attempt_once(attempt_timeout)
            except TransientUpstreamError as exc:
                error = exc
            retry_after = error.retry_after
            if retry_after is not None:
                retry_after = min(retry_after, settings.retry_after_max)
            ceiling = min(settings.backoff_max, settings.backoff_base * 2 ** (attempt - 1))
            wait_s = self._rng.uniform(0.0, ceiling)  # full jitter: retries do not march in step
            if retry_after is not None:
                wait_s = max(wait_s, retry_after)
            if error.code == "rate_limited" and self.limiter is not None:
                self.limiter.penalize(wait_s)
            if attempt >= settings.retry_attempts or self._clock() + wait_s >= budget_ends:
                raise self._exhausted(error, attempt, started, shape)
            log.warning(
                "Kaleyra %s failed with %s (%s); retry %d in %.2fs",
                what,
                error.code,
                shape.describe(),
                attempt,
                wait_s,
            )
            self.stats.count_retry()
            if wait_s > 0:
                self._sleep(wait_s)

    def _exhausted(
        self, error: TransientUpstreamError, attempts: int, started: float, shape: _Shape
    ) -> RetryBudgetExhausted:
        return RetryBudgetExhausted(
            f"Kaleyra request gave up after {attempts} attempt(s) in "
            f"{self._clock() - started:.1f}s ({shape.describe()}); last error: {error.code}"
            + (f" (HTTP {error.status})" if error.status else ""),
            last_error=error,
            attempts=attempts,
        )

    # -- one attempt ---------------------------------------------------------------------------

    def _attempt(
        self,
        url: str,
        shape: _Shape,
        timeout: float,
        read: Callable[[_Data], _T],
    ) -> _T:
        """One HTTP exchange within ``timeout`` seconds in total; ``read`` of its ``data``."""
        self.stats.count_attempt(shape.numbers)
        started = time.monotonic()
        status: int | None = None
        outcome = "error"  # for the metrics: "ok", the error code, or this (a bug of ours)
        try:
            # No redirect is followed: it would carry the api-key header wherever it points.
            response = self._send(self._request_of("GET", url, timeout), shape)
            status = response.status
            data = read(_interpret(status, response.header("Retry-After"), response.body, shape))
            outcome = "ok"
            return data
        except UpstreamError as exc:
            outcome = exc.code or "unknown"
            self.stats.count_failure(outcome)
            problem = _problem(exc)
            if problem is not None:
                self._warn_once(problem, str(exc))
            raise
        finally:
            metrics.observe_api_request(outcome, time.monotonic() - started)
            log.debug(
                "GET blocklisted %s: status %s in %.3fs",
                shape.describe(),
                status if status is not None else "-",
                time.monotonic() - started,
            )

    def _warn_once(self, problem: tuple[object, ...], message: str) -> None:
        """Log ``message`` unless ``problem`` was logged in the last minute.

        ``message`` is an error's text, built from codes and the request shape only: never a
        number, the key or the SID.
        """
        now = self._clock()
        with self._warned_lock:
            last = self._warned.get(problem)
            if last is not None and now - last < _REPEAT_WARNING_AFTER_S:
                return
            self._warned[problem] = now
        log.warning("%s", message)

    # -- "Change Blocklist Status for Number" (the ledger's write-back) -------------------------

    def change_blocklist(
        self, channel: str, *, add: Sequence[str] = (), remove: Sequence[str] = ()
    ) -> None:
        """Add ``add`` to and remove ``remove`` from ``channel``'s blocklist: one POST of at
        most 100 numbers, tried within the same retry budget, limiter and error mapping as a
        lookup. A 2xx with a JSON body is success (the body is not documented).

        :raises ValueError: more than 100 numbers, none, a number in both lists, or one that is
            not E.164.
        :raises CredentialsRefused, FinalUpstreamError, RetryBudgetExhausted: as for a lookup.
        """
        channel = channel_named(channel)
        add, remove = list(dict.fromkeys(add)), list(dict.fromkeys(remove))
        count = len(add) + len(remove)
        if not 0 < count <= MAX_NUMBERS_PER_REQUEST:
            raise ValueError(f"1 to {MAX_NUMBERS_PER_REQUEST} numbers per request, got {count}")
        if set(add) & set(remove):
            raise ValueError("a number cannot be added and removed in one request")
        if not _all_numbers(add + remove):
            raise ValueError("numbers must be E.164 ('+' and digits)")
        contacts = [
            {"blocklist_status": status, "numbers": numbers}
            for status, numbers in ((1, add), (0, remove))
            if numbers
        ]
        body = json.dumps({"channel": channel, "contacts": contacts}).encode()
        shape = _Shape(channel, count)
        self._retrying(
            "blocklist change", shape, lambda timeout: self._post_attempt(body, shape, timeout)
        )

    def _post_attempt(self, body: bytes, shape: _Shape, timeout: float) -> None:
        self.stats.count_attempt(shape.numbers)
        try:
            response = self._send(self._request_of("POST", self.endpoint, timeout, body), shape)
            status, answer = response.status, response.body
            if 200 <= status < 300:
                try:
                    json.loads(answer)
                    return
                except (ValueError, UnicodeDecodeError):
                    raise _transient(
                        f"Kaleyra's answer was not JSON (HTTP {status})", "bad_body", status
                    ) from None
            _interpret(status, response.header("Retry-After"), answer, shape)
            raise FinalUpstreamError(  # pragma: no cover - _interpret raises for non-2xx
                f"Kaleyra answered HTTP {status}", status=status
            )
        except UpstreamError as exc:
            self.stats.count_failure(exc.code or "unknown")
            raise


def _all_numbers(values: Sequence[object]) -> bool:
    # map() keeps the loop in C: this runs on every request.
    try:
        return all(map(_NUMBER.fullmatch, values))  # type: ignore[arg-type]
    except TypeError:  # not a string
        return False


def _mobiles(data: _Data) -> list[str]:
    return [entry["mobile"] for entry in data]


# More distinct entries not written as asked than this is not an answer to 100 numbers, and
# reading each costs a few parses: the cap bounds the work a hostile answer can cause.
_MAX_RESPELT_ENTRIES = 10 * MAX_NUMBERS_PER_REQUEST


def _match_answer(data: _Data, asked: Sequence[str], shape: _Shape) -> set[str]:
    """The asked numbers the entries of an answer name, matched by number, not by string.

    An entry written as asked is a set lookup. Any other is read every way it can be meant
    (:func:`~blockfilter.numbers.normalize_answer`, in the regions of the numbers asked), and
    every asked number it can mean counts as blocklisted. An entry that means none of them
    shows the answer is not one to these numbers (a page of the whole list, another account's
    answer, a number misread): the whole answer is refused, so that no number it leaves out
    can pass as clean.
    """
    wanted = set(asked)
    found: set[str] = set()
    respelt: dict[str, bool] = {}  # an entry not written as asked -> whether it matched
    regions: frozenset[str] | None = None
    for entry in data:
        mobile = entry["mobile"]
        if mobile in wanted:
            found.add(mobile)
            continue
        if mobile in respelt:
            continue
        if len(respelt) == _MAX_RESPELT_ENTRIES:
            respelt[mobile] = False
            break
        if regions is None:
            regions = regions_of(wanted)
        meanings = normalize_answer(mobile, regions) & wanted
        found |= meanings
        respelt[mobile] = bool(meanings)
    unmatched = sum(1 for matched in respelt.values() if not matched)
    if unmatched:
        many = "at least " if len(respelt) > _MAX_RESPELT_ENTRIES else ""
        raise _Untrusted(
            f"Kaleyra's answer names numbers that were not asked: {many}{unmatched} of its "
            f"{len(data)} entries match none ({shape.describe()}); the whole answer is refused",
            code="bad_answer",
            status=200,
            problem=f"unmatched entries on {shape.channel}",
        )
    return found


def _problem(error: UpstreamError) -> tuple[object, ...] | None:
    """What a failed attempt is logged as (at most once a minute per problem), or ``None``
    when the failure is not logged here: refused credentials are reported by the callers, and
    passing failures (5xx, timeouts) by the retry loop. What is left is the upstream answering
    what no retry of ours can make right, or what cannot be trusted."""
    if isinstance(error, _Untrusted):
        return (error.code, error.problem)
    if isinstance(error, FinalUpstreamError) and not isinstance(error, CredentialsRefused):
        return (error.code, error.status)
    return None


class _BadBody(ValueError):
    """The body is not an answer; the text says why (never what it held)."""


def _refuse_constant(name: str) -> Any:
    raise _BadBody(f"a {name} literal")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INTEGER_DIGITS:
        raise _BadBody(f"an integer of more than {_MAX_INTEGER_DIGITS} digits")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _BadBody("a number too large for a float")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Parsers disagree on which copy of a repeated key counts: no copy is trusted.
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _BadBody("a repeated key")
    return result


_DECODER = json.JSONDecoder(
    object_pairs_hook=_unique_keys,
    parse_constant=_refuse_constant,
    parse_int=_bounded_int,
    parse_float=_finite_float,
)


def _decode(body: bytes) -> tuple[Any, str | None]:
    """The JSON value of a body, or ``None`` and why it is not one.

    Strict UTF-8, as RFC 8259 requires between systems; a leading BOM is ignored, as it
    allows. Anything else that is odd fails the body rather than being read one way: a
    repeated key, ``NaN``, integers too long to be meant, nesting deeper than Python recurses.
    """
    if not body:
        return None, "empty"
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None, "not UTF-8"
    try:
        return _DECODER.decode(text), None
    except _BadBody as exc:
        return None, f"JSON with {exc}"
    except RecursionError:
        return None, "nested too deeply"
    except ValueError:
        return None, "not JSON"


def _interpret(status: int, retry_after_header: str | None, body: bytes, shape: _Shape) -> _Data:
    """Turn one HTTP answer into ``data``, or into the error it means.

    Kaleyra's own code decides first (it is the more specific), the HTTP status second.
    """
    payload, undecodable = _decode(body)
    code = payload.get("code") if isinstance(payload, dict) else None
    code = code if isinstance(code, str) else None
    where = shape.describe()
    http = f"HTTP {status}"

    if code in _REFUSED_CODES:
        raise CredentialsRefused(
            f"Kaleyra refused the credentials or the account ({code}, {http}); "
            "check KALEYRA_SID, KALEYRA_API_KEY and the account's balance and permissions",
            status=status,
            code=code,
        )
    if code == "WA400":
        raise BadRequest(
            f"Kaleyra rejected the request as malformed (WA400, {http}) for {where}; "
            "this is a blockfilter bug, please report it with this message",
            status=status,
            code=code,
        )
    retry_after = parse_retry_after(retry_after_header)
    if code in _TRANSIENT_CODES:
        raise _transient(
            f"Kaleyra could not answer yet ({code}, {http}) for {where}",
            code,
            status,
            retry_after=retry_after,
        )
    if status == 429:
        raise _transient(
            f"Kaleyra rate-limited the request ({http}) for {where}",
            "rate_limited",
            status,
            retry_after=retry_after,
        )
    if status == 202:
        raise _transient(
            f"Kaleyra accepted the request without answering ({http}) for {where}",
            "WA202",
            status,
            retry_after=retry_after,
        )
    if status >= 500 or status == 408:
        raise _transient(
            f"Kaleyra failed ({http}) for {where}",
            f"http_{status}",
            status,
            retry_after=retry_after,
        )
    if status in (401, 403):
        raise CredentialsRefused(
            f"Kaleyra refused the credentials ({http}, no Kaleyra code); "
            "check KALEYRA_SID, KALEYRA_API_KEY and KALEYRA_BASE_URL",
            status=status,
            code=code or f"http_{status}",
        )
    if 300 <= status < 400:
        raise FinalUpstreamError(
            f"Kaleyra answered {http}, a redirect, for {where}; redirects are not followed "
            "(they would carry the API key elsewhere): check KALEYRA_BASE_URL",
            status=status,
            code=f"http_{status}",
        )
    if status == 204:
        raise FinalUpstreamError(
            f"Kaleyra answered {http} (no content) for {where}: that is no answer, "
            "so the numbers stay unchecked",
            status=status,
            code="http_204",
        )
    if status != 200:
        # Unknown 4xx (404: a wrong base URL), anything else: retrying the same request will
        # get the same answer.
        raise FinalUpstreamError(
            f"Kaleyra answered {http}" + (f" ({code})" if code else "") + f" for {where}",
            status=status,
            code=code or f"http_{status}",
        )
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list) or not all(
        isinstance(entry, dict) and isinstance(entry.get("mobile"), str) for entry in data
    ):
        what = undecodable or "JSON of an unexpected shape"
        raise _Untrusted(
            f"Kaleyra's answer was {what} ({http}) for {where}",
            code="bad_body",
            status=status,
            problem=what,
        )
    if code not in (None, "CNT196"):
        log.debug("Kaleyra answered 200 with code %s and a valid list; accepted", code)
    return data
