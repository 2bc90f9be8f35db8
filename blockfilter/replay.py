"""Replay: send the messages parked on ``blockfilter.deferred`` through the filter again.

When the blocklist API was down longer than the task's retries (see :mod:`blockfilter.tasks`),
the messages it could not check were suppressed as ``deferred`` and parked, as their original
dicts, on the ``blockfilter.deferred`` queue of the broker. Once the API is back::

    blockfilter replay --app mypipeline.celery:app      # your app: its broker, routes, settings
    blockfilter replay --broker amqp://guest@rabbit//   # a bare app on that broker

drains the queue into ``blockfilter.filter_messages`` tasks. A queue message is acknowledged
only after the task carrying it was sent, so a crash of the replay loses nothing; it may send
a message twice (same ``id``), which the hooks' at-least-once contract allows.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.app.utils import find_app
from kombu.message import Message

from .errors import ConfigError
from .jsonlines import text_repeats_a_key
from .tasks import TASK_NAME, deferred_queue

log = logging.getLogger("blockfilter.replay")


def replay_deferred(
    app: Celery,
    *,
    limit: int | None = None,
    batch_size: int = 500,
    timeout: float = 1.0,
) -> int:
    """Drain the deferred queue into ``blockfilter.filter_messages`` tasks, in batches.

    :param app: the Celery app whose broker holds the queue; tasks are sent through it, so
        its ``task_routes`` apply.
    :param limit: replay at most this many messages (default: until the queue is empty).
    :param batch_size: messages per task.
    :param timeout: seconds to wait for the next message before taking the queue as drained.
    :return: how many messages were sent back through the filter.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    queue = deferred_queue(app)
    replayed = 0
    with app.connection_for_read() as connection:
        # A Queue (not a name) so the consumer declares it exactly as the task publishes it.
        inbox: Any = connection.SimpleQueue(queue)  # type: ignore[arg-type]
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
                app.send_task(TASK_NAME, args=([_body(m) for m in batch],))
                # Only now is the batch safe elsewhere: acknowledge it.
                for message in batch:
                    message.ack()
                replayed += len(batch)
                log.info("replayed %d message(s) from %s", replayed, queue.name)
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


def main_replay(app_path: str | None, broker: str | None, limit: int | None) -> int:
    """What ``blockfilter replay`` runs: load the app, drain the queue, return the count."""
    app = load_app(app_path, broker)
    return replay_deferred(app, limit=limit)
