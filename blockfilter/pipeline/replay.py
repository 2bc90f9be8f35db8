"""Replay: send the messages parked on ``blockfilter.deferred`` through the filter again.

When the blocklist API was down longer than the task's retries (see :mod:`blockfilter.tasks`),
the messages it could not check were suppressed as ``deferred`` and parked, as their original
dicts, on the ``blockfilter.deferred`` queue of the broker. Once the API is back::

    blockfilter replay --app mypipeline.celery:app      # your app: its broker, routes, settings
    blockfilter replay --broker amqp://guest@rabbit//   # a bare app on that broker

drains the queue into ``blockfilter.filter_messages`` tasks. A queue message is acknowledged
only after the task carrying it was sent, so a crash of the replay loses nothing; it may send
a message twice (same ``id``), which the hooks' at-least-once contract allows.

The tasks go where the app routes ``blockfilter.filter_messages`` (a bare ``--broker`` app:
the queue ``celery``), or to ``--queue``. A queue nobody consumes keeps them safe but runs
nothing, so the replay says when it finds no consumer on its target queue.

``blockfilter deferred`` (:func:`deferred_report`) shows what is parked, by reason and age,
from the messages' headers alone: no body is printed, no number shown.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from celery import Celery
from celery.app.utils import find_app
from kombu.message import Message

from .. import metrics
from ..engine.lines import text_repeats_a_key
from ..errors import ConfigError
from .deferred import deferred_queue
from .monitoring import describe_arguments
from .tasks import TASK_NAME

log = logging.getLogger("blockfilter.replay")


def replay_deferred(
    app: Celery,
    *,
    limit: int | None = None,
    batch_size: int = 500,
    timeout: float = 1.0,
    queue: str | None = None,
) -> int:
    """Drain the deferred queue into ``blockfilter.filter_messages`` tasks, in batches.

    :param app: the Celery app whose broker holds the queue; tasks are sent through it, so
        its ``task_routes`` apply.
    :param limit: replay at most this many messages (default: until the queue is empty).
    :param batch_size: messages per task.
    :param timeout: seconds to wait for the next message before taking the queue as drained.
    :param queue: send the tasks to this queue instead of where the app routes them.
    :return: how many messages were sent back through the filter.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    parked = deferred_queue(app)
    route: dict[str, Any] = {"queue": queue} if queue else {}
    replayed = 0
    with app.connection_for_read() as connection:
        # A Queue (not a name) so the consumer declares it exactly as the task publishes it.
        inbox: Any = connection.SimpleQueue(parked)  # type: ignore[arg-type]
        try:
            # Hold no more unacknowledged messages than one batch: the rest stay on the queue
            # for another consumer (or the next replay).
            inbox.consumer.qos(prefetch_count=batch_size)
            # kombu decodes on receipt and would raise on a corrupt entry, stopping the replay
            # for good; take it as it is instead (see _body).
            inbox.consumer.on_decode_error = lambda message, exc: inbox.buffer.append(message)
            while limit is None or replayed < limit:
                wanted = batch_size if limit is None else min(batch_size, limit - replayed)
                batch = _take(inbox, wanted, timeout)
                if not batch:
                    break
                messages = [_body(m) for m in batch]
                argsrepr, kwargsrepr = describe_arguments((messages,), {})
                app.send_task(
                    TASK_NAME,
                    args=(messages,),
                    argsrepr=argsrepr,
                    kwargsrepr=kwargsrepr,
                    **route,
                )
                # Only now is the batch safe elsewhere: acknowledge it.
                for message in batch:
                    message.ack()
                replayed += len(batch)
                metrics.count_replayed(len(batch))
                log.info("replayed %d message(s) from %s", replayed, parked.name)
                if len(batch) < wanted:
                    break  # the queue ran dry while filling this batch
        finally:
            # Messages fetched but not acknowledged go back to the queue here.
            inbox.close()
    return replayed


def _take(inbox: Any, wanted: int, timeout: float) -> list[Message]:
    batch: list[Message] = []
    while len(batch) < wanted:
        try:
            batch.append(inbox.get(block=True, timeout=timeout))
        except inbox.Empty:
            break
    return batch


def _body(message: Message) -> Any:
    """The parked message dict; an undecodable body is passed on as text.

    The filter gives a non-object an ``invalid`` verdict, so even a corrupt queue entry ends in
    ``blockfilter_suppressed`` rather than blocking the queue or vanishing. So does a JSON body
    that repeats a key: decoded, it would keep one of the two values where another parser
    keeps the other (a message checked on one channel and sent on another).
    """
    raw = message.body
    if (
        message.content_type == "application/json"
        and isinstance(raw, (bytes, str))
        and text_repeats_a_key(raw)
    ):
        return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    try:
        return message.decode()
    except Exception:  # any decode error: the serializer's own types vary
        raw = message.body
        return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


def load_app(app_path: str | None, broker: str | None) -> Celery:
    """The app to replay through: ``module:attr`` (as ``celery -A`` finds it) or a bare one.

    A bare app (``broker`` only) uses Celery's defaults: tasks go to the queue ``celery`` and
    the deferred queue is ``blockfilter.deferred``; use ``app_path`` when your app routes
    ``blockfilter.filter_messages`` elsewhere or renames the deferred queue.
    """
    if app_path:
        try:
            app = find_app(app_path)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"cannot load the Celery app {app_path!r}: {exc}") from None
        if not isinstance(app, Celery):
            raise ConfigError(f"{app_path!r} is a {type(app).__name__}, not a Celery app")
    elif broker:
        app = Celery("blockfilter-replay", broker=broker, set_as_current=False)
    else:
        raise ConfigError("replay needs a Celery app (--app MODULE:APP) or a broker (--broker URL)")
    import blockfilter.tasks  # noqa: F401 - registers the tasks in the app, for its routes

    return app


def target_queue(app: Celery, queue: str | None = None) -> str:
    """The queue ``blockfilter.filter_messages`` tasks sent through ``app`` land on."""
    if queue:
        return queue
    routed = app.amqp.router.route({}, TASK_NAME, (), {})
    target = routed.get("queue")
    return str(getattr(target, "name", target) or app.conf.task_default_queue)


def consumers_of(app: Celery, queue: str, timeout: float = 1.0) -> int | None:
    """How many consumers ``queue`` has, or ``None`` when that cannot be told.

    RabbitMQ says it when the queue is declared passively (a queue that does not exist has
    none). Other transports (Redis) do not know their consumers: the workers are asked
    instead (``celery inspect active_queues``), which needs their remote control on.
    """
    with app.connection_for_write() as connection:
        if connection.transport.driver_type == "amqp":
            channel: Any = connection.channel()
            try:
                return int(channel.queue_declare(queue=queue, passive=True).consumer_count)
            except connection.channel_errors:  # NOT_FOUND: nobody declared it, nobody reads it
                return 0
            finally:
                try:
                    channel.close()
                except Exception:  # a channel the broker closed already
                    log.debug("closing the inspection channel failed")
    replies = app.control.inspect(timeout=timeout).active_queues()
    if not replies:
        return None  # no worker answered: none runs, or their remote control is off
    return sum(1 for queues in replies.values() for q in queues if q.get("name") == queue)


def main_replay(
    app_path: str | None, broker: str | None, limit: int | None, queue: str | None = None
) -> int:
    """What ``blockfilter replay`` runs: load the app, drain the queue, return the count."""
    app = load_app(app_path, broker)
    return replay_deferred(app, limit=limit, queue=queue)


# -- what is parked --------------------------------------------------------------------------

#: Age buckets of ``blockfilter deferred``, in seconds (upper bounds) and their labels.
AGE_BUCKETS: tuple[tuple[float, str], ...] = (
    (3600.0, "< 1 h"),
    (86400.0, "1 h - 1 d"),
    (7 * 86400.0, "1 d - 7 d"),
    (float("inf"), ">= 7 d"),
)
UNKNOWN = "unknown"


@dataclass
class ReasonStats:
    """The parked messages of one reason."""

    count: int = 0
    oldest_s: float | None = None
    newest_s: float | None = None
    ages: Counter[str] = field(default_factory=Counter)

    def add(self, age: float | None) -> None:
        self.count += 1
        if age is None:
            self.ages[UNKNOWN] += 1
            return
        self.oldest_s = age if self.oldest_s is None else max(self.oldest_s, age)
        self.newest_s = age if self.newest_s is None else min(self.newest_s, age)
        self.ages[next(label for bound, label in AGE_BUCKETS if age < bound)] += 1


@dataclass
class DeferredReport:
    """What :func:`deferred_report` found on the deferred queue: counts and ages only."""

    queue: str
    total: int = 0
    reasons: dict[str, ReasonStats] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "total": self.total,
            "reasons": {
                reason: {
                    "count": stats.count,
                    "oldest_s": _rounded(stats.oldest_s),
                    "newest_s": _rounded(stats.newest_s),
                    "ages": dict(stats.ages),
                }
                for reason, stats in sorted(self.reasons.items())
            },
        }

    def lines(self) -> list[str]:
        """The report as ``blockfilter deferred`` prints it."""
        head = f"{self.total} message(s) parked on queue {self.queue}"
        if not self.total:
            return [head]
        rows = [("reason", "count", "oldest", "newest", "by age")]
        for reason, stats in sorted(self.reasons.items()):
            by_age = ", ".join(
                f"{label}: {stats.ages[label]}"
                for label in [label for _, label in AGE_BUCKETS] + [UNKNOWN]
                if stats.ages[label]
            )
            rows.append(
                (
                    reason,
                    str(stats.count),
                    _age(stats.oldest_s),
                    _age(stats.newest_s),
                    by_age,
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        return [head] + [
            "  "
            + "  ".join(
                [row[0].ljust(widths[0]), row[1].rjust(widths[1])]
                + [row[i].rjust(widths[i]) for i in (2, 3)]
                + [row[4]]
            ).rstrip()
            for row in rows
        ]


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(0.0, seconds)
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def _parked_at(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def deferred_report(
    app: Celery, *, timeout: float = 1.0, now: float | None = None
) -> DeferredReport:
    """Count the messages on the deferred queue by reason and age, leaving them there.

    Every message is fetched without being acknowledged, its ``x-blockfilter-reason`` and
    ``x-blockfilter-parked-at`` headers read, and all are given back to the queue when the
    connection closes (RabbitMQ keeps their order). Messages without the headers count as
    ``unknown``. Bodies are never looked at.

    :param timeout: seconds to wait for the next message before taking the queue as read.
    :param now: the time ages are measured from (default: the clock).
    """
    parked = deferred_queue(app)
    report = DeferredReport(parked.name)
    moment = time.time() if now is None else now
    with app.connection_for_read() as connection:
        inbox: Any = connection.SimpleQueue(parked)  # type: ignore[arg-type]
        try:
            inbox.consumer.qos(prefetch_count=0)  # every message in hand, none acknowledged
            inbox.consumer.on_decode_error = lambda message, exc: inbox.buffer.append(message)
            while True:
                try:
                    message = inbox.get(block=True, timeout=timeout)
                except inbox.Empty:
                    break
                headers = message.headers or {}
                reason = headers.get("x-blockfilter-reason")
                reason = reason if isinstance(reason, str) and reason else UNKNOWN
                at = _parked_at(headers.get("x-blockfilter-parked-at"))
                stats = report.reasons.setdefault(reason, ReasonStats())
                stats.add(None if at is None else moment - at)
                report.total += 1
        finally:
            inbox.close()  # unacknowledged: every message goes back to the queue
    return report
