"""The collector's buffer: how a worker holds ``blockfilter.collect`` messages until a batch leaves.

The buffering half of :mod:`blockfilter.pipeline.collector` (read its documentation first):
:class:`CollectorTask` runs in the worker's main process, counts the distinct numbers waiting
per channel as messages arrive (:class:`BatchFill`), and sends a channel's messages to the pool
when they fill a request, everything once the oldest message is due or ``MAX_BUFFER`` are
waiting, and acknowledges a batch only once it was handled. When a batch leaves is set by the
collector's settings (:class:`CollectSettings`). What it needs of celery-batches beyond its
public API is in :mod:`.batches_private`.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from queue import Queue
from typing import Any, Final

from celery_batches import Batches, SimpleRequest
from celery_batches.trace import apply_batches_task

from ..config import MAX_SECONDS, Settings, load_settings
from ..errors import ConfigError
from ..model import MAX_NUMBERS_PER_REQUEST, Parsed, parse_message
from .batches_private import check_supported, flush_everything, install_buffer, pending_count
from .monitoring import BlockfilterTask

# The collector's logger: the buffer is half of the collector, and its lines always were.
log = logging.getLogger("blockfilter.collector")

COLLECT_TASK_NAME: Final = "blockfilter.collect"

#: The flush timer looks at the oldest waiting message this many times per FLUSH_INTERVAL.
TICKS_PER_INTERVAL: Final = 5

Route = tuple[str, str]  # (channel, E.164 number)

# -- settings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CollectSettings:
    """When the collector flushes a batch (see the module documentation): the collector's
    three settings of :class:`~blockfilter.config.Settings`, where they are read and checked."""

    #: distinct numbers waiting on one channel that flush that channel's messages
    flush_every: int
    #: seconds after which everything waiting is flushed
    flush_interval: float
    #: messages waiting that flush everything
    max_buffer: int

    @classmethod
    def of(cls, settings: Settings) -> CollectSettings:
        return cls(
            settings.collect_flush_every,
            settings.collect_flush_interval,
            settings.collect_max_buffer,
        )


def collect_settings(
    conf: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> CollectSettings:
    """The collector's settings, as :func:`~blockfilter.config.load_settings` reads them:
    ``conf`` (lower-case keys), then the environment, then the defaults.

    :raises ConfigError: a setting is not a positive number in its range (naming it).
    """
    return CollectSettings.of(load_settings(environ, celery_conf=conf))


# -- what is waiting -------------------------------------------------------------------------


class BatchFill:
    """The distinct numbers waiting, per channel: says when a channel can fill a request."""

    def __init__(self, flush_every: int = MAX_NUMBERS_PER_REQUEST) -> None:
        self.flush_every = flush_every
        self._numbers: dict[str, set[str]] = defaultdict(set)

    def add(self, route: Route | None) -> bool:
        """Count a waiting message; true when its channel now has ``flush_every`` numbers.

        ``route`` is ``None`` for a message that makes no request (it is invalid).
        """
        if route is None:
            return False
        numbers = self._numbers[route[0]]
        numbers.add(route[1])
        return len(numbers) >= self.flush_every

    def waiting(self) -> dict[str, int]:
        """Distinct numbers waiting, per channel."""
        return {channel: len(numbers) for channel, numbers in self._numbers.items() if numbers}

    def clear(self) -> None:
        self._numbers.clear()


def message_of(request: Any) -> Any:
    """The message a ``collect`` request carries (``collect(message)`` or ``message=``)."""
    args = getattr(request, "args", None) or ()
    if args:
        return args[0]
    kwargs = getattr(request, "kwargs", None) or {}
    return kwargs.get("message")


def route_of(message: Any) -> Route | None:
    """The (channel, number) the message will be checked on first, or ``None`` if invalid."""
    parsed = parse_message(message)
    return (parsed.channel, parsed.e164) if isinstance(parsed, Parsed) else None


# -- the task class --------------------------------------------------------------------------


class _WatchedBuffer(Queue):  # type: ignore[type-arg]
    """Batches' buffer, telling the collector about each message as it is buffered."""

    def __init__(
        self, lock: threading.RLock, on_put: Callable[[Any], Callable[[], None] | None]
    ) -> None:
        super().__init__()
        self._collector_lock = lock
        self._on_put = on_put

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        with self._collector_lock:
            super().put(item, block, timeout)
            flush = self._on_put(item)
        if flush is not None:
            flush()

    def put_back(self, item: Any) -> None:
        """Put without counting (the collector counts what it puts back itself)."""
        super().put(item)


class CollectorTask(Batches, BlockfilterTask):  # type: ignore[misc]
    """celery-batches' :class:`~celery_batches.Batches`, flushing per channel at full requests.

    Batches buffers requests in the worker's main process and flushes on a count and a timer;
    this class counts distinct numbers per channel as requests arrive, flushes a channel's
    messages when they fill a request, flushes everything once the oldest message is due or
    ``MAX_BUFFER`` are waiting, and acknowledges a batch only once it was handled. What it
    needs of Batches beyond its public API is in :mod:`.batches_private`.
    :class:`~blockfilter.pipeline.monitoring.BlockfilterTask` gives it the summaries monitoring
    shows in place of the messages.
    """

    abstract = True
    # Batches' own triggers flush everything, on a count of messages and on a plain period:
    # at a steady rate its timer would cut a partial batch each period, and a count of
    # messages is not one of numbers. The collector's buffer and ticker decide instead
    # (see Strategy), so Batches' are set out of reach.
    flush_every = sys.maxsize
    flush_interval = MAX_SECONDS

    def Strategy(  # type: ignore[override]  # noqa: N802
        self, task: Any, app: Any, consumer: Any
    ) -> Callable[..., None]:
        check_supported(self)
        # Celery builds the strategies again after every broker reconnect, on the same task:
        # the buffer and what it counts are kept (the requests waiting in it, too).
        rebuilt = hasattr(self, "_watched")
        if not rebuilt:
            self._lock = threading.RLock()
            self._fill = BatchFill()
            self._arrived: dict[int, float] = {}  # id(request) -> when it was buffered
            self._watched = _WatchedBuffer(self._lock, self._buffered)
            self._first_seen = False
        else:
            self._stop_ticker()
        self._settings = _collect_settings_of(app.conf)
        self._fill.flush_every = self._settings.flush_every
        self._consumer_pool = consumer.pool
        # Every worker of the app builds this strategy, also those that never see a collect
        # message: the settings are logged, and the prefetch checked, on the first message.
        self._prefetch_limit = int(getattr(consumer, "initial_prefetch_count", 0) or 0)
        install_buffer(self, self._watched)  # before Batches' strategy binds its put()
        handler: Callable[..., None] = super().Strategy(task, app, consumer)  # type: ignore[operator]
        # Ticking a few times per interval, and flushing only once the oldest message is
        # FLUSH_INTERVAL old, keeps steady traffic in full batches and still bounds the wait
        # (at most FLUSH_INTERVAL and a tick). Armed at every build: a reconnect clears the
        # worker's timers (celery-batches 0.11 never arms its own again: its issue #107).
        self._ticker = consumer.timer.call_repeatedly(
            self._settings.flush_interval / TICKS_PER_INTERVAL, self._tick
        )
        if rebuilt:
            waiting = self._watched.qsize()
            log.warning(
                "%s: the broker connection was restarted; the flush timer is armed again "
                "(celery-batches #107)%s",
                COLLECT_TASK_NAME,
                f", {waiting} buffered message(s) kept" if waiting else "",
            )
        return handler

    def _stop_ticker(self) -> None:
        try:
            self._ticker.cancel()
        except Exception:  # an entry of a timer that is gone: nothing to cancel
            log.debug("%s: the old flush timer could not be cancelled", COLLECT_TASK_NAME)

    # The methods below run in the worker's main process: the message handler and the flush
    # timer (a thread of its own with transports that have no event loop), under self._lock.

    def _buffered(self, request: Any) -> Callable[[], None] | None:
        """Count a request just buffered; the flush it calls for, if any."""
        if not self._first_seen:
            self._first_seen = True
            _describe(self._settings, self._prefetch_limit)
        self._arrived[id(request)] = time.monotonic()
        # A later ETA: it waits in Batches' pending queue, not in a request.
        route = None if request.eta is not None else route_of(message_of(request))
        if route is not None and self._fill.add(route):
            return functools.partial(self._flush_channel, route[0])
        if self._watched.qsize() + pending_count(self) >= self._settings.max_buffer:
            return self._flush_all
        return None

    def _flush_channel(self, channel: str) -> None:
        """Flush the messages of ``channel`` (and the invalid ones); the rest keep waiting."""
        with self._lock:
            taken: list[Any] = []
            kept: list[tuple[Any, Route | None]] = []
            while not self._watched.empty():
                request = self._watched.get_nowait()
                route = None if request.eta is not None else route_of(message_of(request))
                if request.eta is None and (route is None or route[0] == channel):
                    taken.append(request)
                    self._arrived.pop(id(request), None)
                else:
                    kept.append((request, route))
            self._fill.clear()
            for request, route in kept:
                self._watched.put_back(request)
                if request.eta is None:
                    self._fill.add(route)
        if taken:
            self.flush(taken)

    def _tick(self) -> None:
        """Flush everything once the oldest message waiting is due (or only ETAs wait)."""
        with self._lock:
            waiting = self._watched.qsize()
            pending = pending_count(self)
            oldest = min(self._arrived.values(), default=None)
            due = (
                (waiting == 0 and pending > 0)  # Batches' flush lets the ETAs that are due go
                or waiting + pending >= self._settings.max_buffer
                or (
                    oldest is not None
                    and time.monotonic() - oldest >= self._settings.flush_interval
                )
            )
            if due:
                self._flush_all()

    def _flush_all(self) -> None:
        with self._lock:
            self._fill.clear()
            self._arrived.clear()
            flush_everything(self)

    def flush(self, requests: Sequence[Any]) -> Any:
        """Run a batch in the pool; acknowledge it once handled, requeue it if that failed.

        Batches' ``flush()`` acknowledges a late-acknowledged batch when its function
        returns, whatever happened in it. Here a batch that raised (the batch function
        returns ``None`` then) or whose process died is rejected with requeue instead, and a
        message delivered twice (kept from before a reconnect, then redelivered) is filtered
        once: the filter would call the second copy a ``duplicate_id``, and a pipeline would
        see one message with two verdicts.
        """
        requests, copies = _without_redeliveries(requests)
        acks_late = [r for r in requests if r.task.acks_late]
        acks_early = [r for r in requests if not r.task.acks_late]
        # SimpleRequests pickle, for the prefork pool.
        simple = ([SimpleRequest.from_request(r) for r in requests],)

        def on_accepted(pid: int, time_accepted: float) -> None:
            for request in acks_early:
                request.acknowledge()

        def on_return(result: Any) -> None:
            if result is None:
                _requeue(acks_late, "the batch failed")
                for copy in copies:  # the requeued one stands for it
                    copy.reject(requeue=False)
                return
            for request in acks_late + copies:
                request.acknowledge()

        def on_error(*_: Any) -> None:
            _requeue(acks_late, "the process running the batch was lost")
            for copy in copies:
                copy.reject(requeue=False)

        return self._consumer_pool.apply_async(
            apply_batches_task,
            (self, simple, 0, None),
            accept_callback=on_accepted,
            callback=on_return,
            error_callback=on_error,
        )


def _collect_settings_of(conf: Any) -> CollectSettings:
    """The collector's settings for its worker's buffer.

    Only a worker started with ``BLOCKFILTER_STARTUP_CHECK=off`` can get here with a bad
    setting (the check refuses it otherwise): its batches fail on the same error and are
    parked, so it buffers as by default rather than take down the worker's other tasks.
    """
    try:
        return collect_settings(conf)
    except ConfigError as exc:
        log.error("%s: %s; buffering with the default settings", COLLECT_TASK_NAME, exc)
        return CollectSettings.of(Settings())


def _without_redeliveries(requests: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """``(requests to run, copies to acknowledge with them)``: of requests with the same task
    id and the same message, the last delivered runs (after a reconnect, the one whose
    acknowledgement can still reach the broker)."""
    last: dict[Any, int] = {}
    for index, request in enumerate(requests):
        last[request.id, _fingerprint(message_of(request))] = index
    if len(last) == len(requests):
        return list(requests), []
    keep = set(last.values())
    return (
        [r for i, r in enumerate(requests) if i in keep],
        [r for i, r in enumerate(requests) if i not in keep],
    )


def _fingerprint(message: Any) -> str:
    try:
        return json.dumps(message, sort_keys=True, default=repr)
    except (TypeError, ValueError):
        return repr(message)


def _requeue(requests: Sequence[Any], why: str) -> None:
    if requests:
        log.warning("%s: %s; %d message(s) requeued", COLLECT_TASK_NAME, why, len(requests))
    for request in requests:
        request.reject(requeue=True)


def _describe(settings: CollectSettings, limit: int) -> None:
    """Log how this worker batches; warn when its prefetch limit cannot fill a batch."""
    log.info(
        "%s: a batch leaves at %d distinct numbers on a channel, %d messages, or after %.2f s",
        COLLECT_TASK_NAME,
        settings.flush_every,
        settings.max_buffer,
        settings.flush_interval,
    )
    if 0 < limit < settings.flush_every:
        log.warning(
            "%s: this worker prefetches at most %d messages, fewer than the %d numbers that "
            "fill a batch: batches will only leave on the %.2f s timer. Run the collector's "
            "queue on a worker with --prefetch-multiplier=0 (or a larger multiplier)",
            COLLECT_TASK_NAME,
            limit,
            settings.flush_every,
            settings.flush_interval,
        )
