"""The deferred queue: where a message goes when it cannot be checked now, for a later replay.

Both tasks park here (``blockfilter.filter_messages`` once its retries are spent,
``blockfilter.collect`` for refused credentials and failed batches), and ``blockfilter
replay`` (:mod:`blockfilter.pipeline.replay`) drains it. A parked message is its original
dict, with headers saying why and when it was parked; never a verdict.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, Final

from celery import Celery
from kombu import Exchange, Queue

from .. import metrics
from ..errors import DeferredNotParked  # noqa: F401  (the tasks and the collector raise it)
from ..model import Reason

# The tasks' logger: parking is what a task does, and its log lines were always the tasks'.
log = logging.getLogger("blockfilter.tasks")

#: The library's own queue of messages whose check could not be made; see :func:`deferred_queue`.
DEFERRED_QUEUE: Final = "blockfilter.deferred"
#: ``app.conf`` key naming another deferred queue (several pipelines sharing one broker).
DEFERRED_QUEUE_SETTING: Final = "blockfilter_deferred_queue"

# The reasons a message is parked on the deferred queue (its ``x-blockfilter-reason`` header).
PARKED_CHECK_FAILED: Final = Reason.CHECK_FAILED
PARKED_CREDENTIALS_REFUSED: Final = Reason.CREDENTIALS_REFUSED
PARKED_TASK_FAILED: Final = Reason.TASK_FAILED


def deferred_queue(app: Celery) -> Queue:
    """The queue deferred messages are parked on: durable, on the broker's default exchange.

    Named ``blockfilter.deferred`` unless ``app.conf.blockfilter_deferred_queue`` says
    otherwise. Publishing through the default exchange (routing key = queue name) declares no
    exchange and binds nothing, so the user's own topology is left alone.
    """
    name = app.conf.get(DEFERRED_QUEUE_SETTING) or DEFERRED_QUEUE
    return Queue(name, Exchange(""), routing_key=name, durable=True)


def park_deferred(
    app: Celery,
    messages: Sequence[Any],
    *,
    reason: str,
    task_id: str | None = None,
) -> int:
    """Publish ``messages`` (original dicts, JSON), one queue message each, to the deferred queue.

    Persistent messages on a durable queue, with publish retries for a passing broker hiccup.
    Returns how many were published.
    """
    if not messages:
        return 0
    queue = deferred_queue(app)
    parked_at = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    headers = {"x-blockfilter-reason": reason, "x-blockfilter-parked-at": parked_at}
    if task_id:
        headers["x-blockfilter-task-id"] = task_id
    with app.producer_or_acquire() as producer:
        for message in messages:
            producer.publish(
                message,
                exchange=queue.exchange,
                routing_key=queue.routing_key,
                # The queue must exist before a message goes to the default exchange, or the
                # broker drops it; kombu declares it once per connection, not per message.
                declare=[queue],
                serializer="json",
                delivery_mode="persistent",
                headers=headers,
                retry=True,
                retry_policy={"max_retries": 5, "interval_start": 0.2, "interval_step": 0.5},
            )
    metrics.count_parked(reason, len(messages))
    log.warning(
        "parked %d message(s) on queue %s (%s); replay them with `blockfilter replay`",
        len(messages),
        queue.name,
        reason,
    )
    return len(messages)


def park_final_deferred(
    app: Celery, messages: Sequence[Any], *, refused: bool, task_id: str | None = None
) -> Exception | None:
    """Park messages whose deferral is final; the error when the broker would not take them.

    The caller then still hands them to ``blockfilter_suppressed`` (they are final) and fails
    loudly afterwards: a message always reaches a hook or the deferred queue, and here both
    were wanted and only one is possible.
    """
    reason = PARKED_CREDENTIALS_REFUSED if refused else PARKED_CHECK_FAILED
    try:
        park_deferred(app, messages, reason=reason, task_id=task_id)
    except Exception as exc:
        log.error(
            "could not park %d deferred message(s) on queue %s (%s: %s); they go to "
            "blockfilter_suppressed as deferred, and the task fails",
            len(messages),
            deferred_queue(app).name,
            type(exc).__name__,
            exc,
        )
        return exc
    return None
