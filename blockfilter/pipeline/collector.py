"""The collector: a Celery task that gathers messages sent one at a time into full batches.

A pipeline that emits messages one by one (a transactional SMS per order, say) cannot call
``blockfilter.filter_messages`` per message: every message would cost an API request of one
number, where a request holds 100. ``blockfilter.collect(message)`` takes one message; the
worker holds the messages it receives (celery-batches' :class:`~celery_batches.Batches`) and
runs the filter on them together when

* one channel has ``BLOCKFILTER_COLLECT_FLUSH_EVERY`` distinct numbers waiting (default 100:
  one full API request; a request asks about one channel, so numbers are counted per channel
  and only that channel's messages leave, with any unusable ones; the other channels keep
  filling), or
* the oldest message waiting has waited ``BLOCKFILTER_COLLECT_FLUSH_INTERVAL`` seconds
  (default 1.0; looked at five times per interval, so none waits more than 1.2 intervals):
  everything waiting leaves. Thin traffic still goes out within about a second, and steady
  traffic is not cut into a partial batch every period, as Batches' plain timer would; or
* ``BLOCKFILTER_COLLECT_MAX_BUFFER`` messages are waiting (default 1000; repeats of a few
  numbers fill no request, but must not wait or pile up either).

They are settings like the others (:data:`blockfilter.config.SPECS`, read by
:func:`~blockfilter.config.load_settings`): from the worker app's ``conf`` in lower case
(``app.conf.blockfilter_collect_flush_interval = 0.5``), the environment, then the default,
when the worker starts, and ``blockfilter config`` shows them. They are blockfilter's settings
rather than ``Batches``' ``flush_every``/``flush_interval`` task options because the task is
the library's: a user cannot pass options to its decorator, and ``flush_every`` counts
messages, not numbers.

The results go to the hooks exactly as ``blockfilter.filter_messages`` hands them over (the
same batch core, :mod:`blockfilter.pipeline.batch`): observers, then ``blockfilter_dispatch``
(``allowed``, ``rerouted``) and ``blockfilter_suppressed`` (``blocked``, ``invalid``).
Messages whose check failed (``deferred``), and a whole batch whose hook raised, are handed to a
``blockfilter.filter_messages`` task published to the queue the messages came from (so the
collector's worker runs it, even where no worker consumes the app's default queue), with a
backoff and counted as its first retry (in eager mode it runs at once): from there they
follow that task's retries and end on the deferred queue once the retries are spent.
Refused credentials are final at once (suppressed, parked on the deferred queue). A
flush that fails for any other reason parks its messages on the deferred queue.

Usage: route the task to a queue of its own and give that queue a worker of its own::

    # pipeline.py
    app.autodiscover_tasks(["blockfilter"], related_name="collector")  # or: import it
    app.conf.task_routes = {"blockfilter.collect": {"queue": "blockfilter.collect"}}

    # pipeline_collector.py: the collector worker's app
    from pipeline import app
    app.conf.worker_prefetch_multiplier = 0

    app.send_task("blockfilter.collect", args=[message])      # or collect.delay(message)

    celery -A pipeline_collector worker -Q blockfilter.collect -c 4

Worker settings, and why:

* Prefetch. The worker can only batch the messages the broker has given it, and with late
  acknowledgement a message counts against the prefetch limit until its batch is done. So the
  limit (``worker_prefetch_multiplier`` x concurrency) must hold a filling buffer plus the
  batches being filtered: up to ``(concurrency + 1) x MAX_BUFFER`` messages, or no limit,
  ``worker_prefetch_multiplier = 0`` (celery-batches' own advice). Set it in the app's conf:
  on the command line Celery 5 reads ``--prefetch-multiplier=0`` as "not given" and keeps
  the conf's value (a large multiplier, ``--prefetch-multiplier=500``, works there). Below
  ``FLUSH_EVERY``, batches only ever leave on the timer; the worker logs a warning when its
  first collect message arrives. No limit means the worker takes every message queued: mind
  the backlog you let build up.
* Its own queue. The prefetch setting is the worker's, for every queue it consumes: a
  ``filter_messages`` campaign on the same unlimited worker would all be taken by one
  worker. The hand-offs above are published to the collector's own route, so its worker
  must also have ``blockfilter.filter_messages`` (importing this module imports it).
* Pool. Batches are filtered in the pool (prefork by default, ``threads`` works too); the
  buffering happens in the worker's main process, so a batch waits for a free pool slot.
* Redis broker: a message stays unacknowledged while it waits and while its batch runs;
  keep the transport's ``visibility_timeout`` well above ``FLUSH_INTERVAL`` plus a batch's
  longest run, or Redis hands it to another worker meanwhile.

Acknowledgement (``acks_late``). celery-batches acknowledges a late-acknowledged batch when
its function returns, whatever happened in it. The collector acknowledges a batch only once
its messages were handed to the hooks, handed off, or parked; a batch that raised (a broker
that would not take the hand-off or the parking either) or whose pool process died is
rejected and requeued, as ``acks_late`` + ``reject_on_worker_lost`` do for
``filter_messages``. So delivery is at least once: a message may reach a hook again, with the
same ``id``. A message that was received but whose batch has not run yet (the buffer) is not
acknowledged: if the worker dies, the broker redelivers it.

Batch fill is recorded per flush: the return value of each batch (also sent with Celery's
``task_success`` signal) and an INFO log line give the messages, the distinct numbers per
channel and the API requests made; :func:`collector_stats` adds them up for this process.
Nothing of a message is stored as a result, however it was sent (``send_task`` asks for
results by default): the hooks are the output. A message handed off has its verdict counted
in the summary its ``filter_messages`` task returns.

Broker reconnects. After a broker connection is lost and made again, Celery clears the
worker's timers and builds the task strategies anew; celery-batches 0.11 then never arms
its flush timer again (its issue #107) and the worker would hold its buffer for ever. The
collector flushes on a ticker of its own, armed again at every build of its strategy, and
keeps what was buffered (a copy the broker redelivers meanwhile is filtered once), and says
so in a WARNING line.

celery-batches. The collector uses :class:`~celery_batches.Batches`' public points (its
strategy, ``flush()``, ``SimpleRequest``, ``apply_batches_task``) and three private parts,
all in :mod:`blockfilter.pipeline.batches_private`, which says why each is needed; a worker
whose celery-batches lacks them refuses to build the collector's strategy.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from celery import shared_task
from celery_batches import SimpleRequest

from .. import metrics
from ..config import Settings
from ..model import MAX_NUMBERS_PER_REQUEST
from .batch import check_batch
from .buffering import (  # noqa: F401  (the collector's names, importable from here as before)
    COLLECT_TASK_NAME,
    TICKS_PER_INTERVAL,
    BatchFill,
    CollectorTask,
    CollectSettings,
    Route,
    collect_settings,
    message_of,
    route_of,
)
from .deferred import PARKED_TASK_FAILED, DeferredNotParked, park_deferred, park_final_deferred
from .tasks import TASK_NAME, retry_countdown
from .worker import report_refusal

log = logging.getLogger("blockfilter.collector")

#: The queue name the documentation suggests for the collector (the routing is the user's).
COLLECT_QUEUE: Final = "blockfilter.collect"


# -- batch fill, per process -----------------------------------------------------------------


@dataclass
class CollectorStats:
    """Counters of the batches this process filtered (prefork: each pool process its own).

    ``channel_batches`` counts (batch, channel) pairs with at least one number: each made at
    least one first-round API request, so ``numbers / channel_batches`` is the mean fill of
    those requests (100 when every batch was full).
    """

    batches: int = 0
    messages: int = 0
    numbers: int = 0
    channel_batches: int = 0
    requests: int = 0
    numbers_by_channel: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, report: Mapping[str, Any]) -> None:
        with self._lock:
            self.batches += 1
            self.messages += int(report["messages"])
            numbers: Mapping[str, int] = report["numbers"]
            self.numbers += sum(numbers.values())
            self.channel_batches += sum(
                math.ceil(n / MAX_NUMBERS_PER_REQUEST) for n in numbers.values()
            )
            self.requests += int(report["requests"])
            self.numbers_by_channel.update(numbers)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "batches": self.batches,
                "messages": self.messages,
                "numbers": self.numbers,
                "requests": self.requests,
                "numbers_by_channel": dict(self.numbers_by_channel),
                "mean_messages_per_batch": self.messages / self.batches if self.batches else 0.0,
                "mean_fill": self.numbers / self.channel_batches if self.channel_batches else 0.0,
            }

    def reset(self) -> None:
        with self._lock:
            self.batches = self.messages = self.numbers = self.channel_batches = 0
            self.requests = 0
            self.numbers_by_channel = Counter()


COLLECTOR_STATS = CollectorStats()


def collector_stats() -> dict[str, Any]:
    """This process's batch fill so far: batches, messages, numbers, requests, mean fill."""
    return COLLECTOR_STATS.snapshot()


# -- the task --------------------------------------------------------------------------------


@shared_task(
    name=COLLECT_TASK_NAME,
    base=CollectorTask,
    bind=True,
    acks_late=True,
    # Nothing of a message is ever stored as a result, however the task is sent: a sender's
    # ignore_result=False (send_task's default) is not looked at. The hooks are the output.
    ignore_result=True,
)
def collect(self: Any, requests: list[SimpleRequest]) -> dict[str, Any]:
    """Filter a batch of collected messages and hand the results to the hooks.

    Call it with one message: ``collect.delay(message)``; the worker calls it with the batch.

    :param requests: the batch's requests (celery-batches' ``SimpleRequest``), one message
        each, as ``args[0]`` or ``kwargs["message"]``.
    :return: the batch's report: ``messages``, ``numbers`` (distinct numbers per channel),
        ``requests`` (API requests made), ``handed_off``, ``parked`` and ``summary``: counts
        only (it goes to Celery's ``task_success`` signal, never to the result backend).
    """
    started = time.monotonic()
    messages = [message_of(request) for request in requests]
    try:
        # The collector is a message's first attempt, and a task always has a retry left
        # (BLOCKFILTER_TASK_MAX_RETRIES >= 1): only refused credentials make a deferral final.
        batch = check_batch(messages, self.app.conf, retries_left=lambda settings: True)
    except Exception:
        # Not about a check (bad settings, a broken source plugin, a bug): keep the batch.
        # Should parking fail too, the exception leaves and the batch is requeued.
        log.exception("%s: a batch of %d message(s) failed", COLLECT_TASK_NAME, len(messages))
        parked = park_deferred(self.app, messages, reason=PARKED_TASK_FAILED)
        return _report(messages, None, started, parked=parked)

    not_parked = batch.park_final(
        lambda found, refused: park_final_deferred(self.app, found, refused=refused)
    )
    parked = len(batch.deferred) if batch.final and not_parked is None else 0
    if batch.refusal_to_report is not None:
        report_refusal(
            batch.refusal_to_report,
            batch.settings,
            messages=len(batch.deferred),
            task=COLLECT_TASK_NAME,
        )
    handed_off: set[int] = set()
    if batch.to_retry:
        _hand_off(self, batch.settings, requests, messages, batch.to_retry, "check failed")
        handed_off.update(batch.to_retry)
    try:
        batch.hand_to_hooks()
    except Exception as exc:
        # The hook specification: "Raise to have the batch retried", hence all of it.
        log.warning(
            "%s: a dispatch hook failed (%s); the batch goes to %s for a retry",
            COLLECT_TASK_NAME,
            type(exc).__name__,
            TASK_NAME,
        )
        _hand_off(self, batch.settings, requests, messages, batch.handled, "hook failed")
        handed_off.update(batch.handled)
    if not_parked is not None:
        raise DeferredNotParked.of(len(batch.deferred), not_parked, quote_error=False)
    return _report(messages, batch.summary, started, handed_off=len(handed_off), parked=parked)


def handoff_options(delivery_info: Mapping[str, Any] | None) -> dict[str, Any]:
    """``send_task`` options that put a hand-off on the queue its message came from.

    A message that came through the default exchange (what ``task_routes = {...: {"queue":
    Q}}`` does) has ``Q`` as its routing key: it goes back to ``queue=Q``, as Celery's own
    retries do. Passing the empty exchange instead would make Celery route it to the app's
    default queue, which a collector-only deployment never consumes. A message of a named
    exchange goes back through that exchange and routing key. A batch made by ``apply()``
    (no route) goes by the app's routing.
    """
    info = delivery_info or {}
    exchange, routing_key = info.get("exchange"), info.get("routing_key")
    if not routing_key:
        return {}
    if not exchange:
        return {"queue": routing_key}
    return {"exchange": exchange, "routing_key": routing_key}


def _hand_off(
    task: Any,
    settings: Settings,
    requests: Sequence[SimpleRequest],
    messages: Sequence[Any],
    indexes: Sequence[int],
    why: str,
) -> None:
    """Publish ``messages[indexes]`` as ``filter_messages`` tasks, as its first retry.

    Each goes back to the queue its ``collect`` message came from (:func:`handoff_options`),
    so the collector's own worker runs it. ``retries=1`` makes the task count this as its
    first retry: a message is checked at most ``1 + BLOCKFILTER_TASK_MAX_RETRIES`` times in
    all, as with ``filter_messages``. In eager mode (``task_always_eager``, ``apply()``) the
    task runs here and now, eagerly too: publishing it would need a broker, and a message
    must reach a hook or the deferred queue whatever happens.
    """
    by_route: dict[tuple[tuple[str, Any], ...], list[Any]] = defaultdict(list)
    eager = False
    for index in indexes:
        info = requests[index].delivery_info or {}
        eager = eager or bool(info.get("is_eager"))
        by_route[tuple(sorted(handoff_options(info).items()))].append(messages[index])
    countdown = retry_countdown(settings.task_retry_backoff, 0)
    for route, batch in by_route.items():
        if eager:
            task.app.tasks[TASK_NAME].apply(args=(batch,), retries=1, throw=True)
            continue
        task.app.send_task(TASK_NAME, args=(batch,), countdown=countdown, retries=1, **dict(route))
    log.info(
        "%s: %d message(s) handed to %s (%s)%s",
        COLLECT_TASK_NAME,
        len(indexes),
        TASK_NAME,
        why,
        " and run at once (eager)" if eager else f", in {countdown:.1f} s",
    )


def _report(
    messages: Sequence[Any],
    summary: Mapping[str, Any] | None,
    started: float,
    *,
    handed_off: int = 0,
    parked: int = 0,
) -> dict[str, Any]:
    """The batch's report, recorded in :data:`COLLECTOR_STATS` and logged."""
    numbers: dict[str, set[str]] = defaultdict(set)
    for message in messages:
        route = route_of(message)
        if route is not None:
            numbers[route[0]].add(route[1])
    report: dict[str, Any] = {
        "messages": len(messages),
        "numbers": {channel: len(found) for channel, found in sorted(numbers.items())},
        "requests": int(summary["requests"]) if summary else 0,
        "handed_off": handed_off,
        "parked": parked,
        "elapsed_s": round(time.monotonic() - started, 3),
        "summary": dict(summary) if summary else None,
    }
    COLLECTOR_STATS.record(report)
    metrics.observe_batch_fill(report["numbers"])
    log.info(
        "%s: batch of %d message(s), numbers %s, %d API request(s), %.3f s",
        COLLECT_TASK_NAME,
        report["messages"],
        " ".join(f"{c}={n}" for c, n in report["numbers"].items()) or "none",
        report["requests"],
        report["elapsed_s"],
    )
    return report
