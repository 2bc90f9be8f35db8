"""Celery tasks: filter batches of messages inside the user's own Celery workers.

Register them in your app the usual way (the library never creates an app of its own, nor
declares or changes your queues)::

    app = Celery("pipeline", broker="amqp://...")
    app.autodiscover_tasks(["blockfilter"])        # or: import blockfilter.tasks

    filter_campaign(messages, app=app).get()       # or app.send_task("blockfilter.filter_messages",
                                                    #                   args=[messages])

Settings come from the environment and, taking precedence, from the app's lower-case
``kaleyra_*`` / ``blockfilter_*`` keys (``app.conf.blockfilter_on_error = "defer"``).

What one ``blockfilter.filter_messages`` task does with its batch (steps 1, 2 and the parking
of 4 are the batch core it shares with the collector, :mod:`blockfilter.pipeline.batch`; the
deferred queue is :mod:`blockfilter.pipeline.deferred`):

1. Runs the filter (:func:`blockfilter.plugins.build_filter`): one verdict per message.
2. Calls the observers (``blockfilter_verdicts``), then ``blockfilter_dispatch`` with the
   ``allowed`` and ``rerouted`` results and ``blockfilter_suppressed`` with the ``blocked`` and
   ``invalid`` ones.
3. Messages whose check failed (``deferred``, only possible with ``BLOCKFILTER_ON_ERROR=defer``)
   are *not* dispatched. While the task has retries left it is retried, after an exponential
   backoff with jitter (``BLOCKFILTER_TASK_RETRY_BACKOFF`` doubled per retry), carrying only
   those messages, so nothing already dispatched is dispatched again, and the counts so far
   (the returned summary accumulates over the retries).
4. Once the retries are spent, the deferred messages go to ``blockfilter_suppressed`` (verdict
   ``deferred``) and their original dicts are published to the queue ``blockfilter.deferred``
   on the same broker, from which ``blockfilter replay`` (:func:`blockfilter.replay.
   replay_deferred`) sends them through the filter again once the API is back. Should the
   broker not take them (eager mode with no broker), they are still suppressed, and the task
   fails with :class:`DeferredNotParked` once the hooks ran.

Retry budget. Each API request is tried ``BLOCKFILTER_RETRY_ATTEMPTS`` times by the client
(within ``BLOCKFILTER_RETRY_DEADLINE``); each task runs at most ``1 + BLOCKFILTER_TASK_MAX_RETRIES``
times. So an unanswered number is asked about up to ``RETRY_ATTEMPTS x (1 + TASK_MAX_RETRIES)``
times (5 x 4 = 20 with the defaults) over roughly ``TASK_RETRY_BACKOFF x (2^TASK_MAX_RETRIES -
1)`` seconds of task backoff (5 + 10 + 20 = 35 s by default, each countdown jittered to between
half and all of it) before it is parked on ``blockfilter.deferred``. Refused credentials
(``RBC001``, ``WA401``, ``WA-401``, ``E110``) are final at once: no task retry, since only a
human can fix them; the task logs an ERROR naming the refusal and what to fix, and parks the
messages with reason ``credentials_refused``. In eager mode the retries run in the task
itself, without waiting their countdown (as Celery's own eager retries).

What monitoring and the result backend see of a batch is a summary, never the messages:
see :mod:`blockfilter.pipeline.monitoring`.

The retries are the task's own rather than Celery's ``autoretry_for``: an automatic retry
would run the whole batch again and dispatch a second time what already went out.

Failures that are not about the check: a hook that raises (``blockfilter_dispatch`` or
``blockfilter_suppressed``) has the whole batch retried, as the hook specification promises;
when retries are spent, or when anything else goes wrong (a configuration error, a bug), the
batch's original messages are parked on ``blockfilter.deferred`` before the error is raised, so
a failed task never loses its messages.

Idempotency. The task is ``acks_late`` with ``reject_on_worker_lost``: a worker killed in the
middle of a batch (OOM, SIGKILL, a lost machine) has its message redelivered and the batch
filtered again, by another worker or the same one restarted. A hook may therefore see a
message more than once (also after a replay, or a hook failure), always with the same ``id``:
pipelines must use the ``id`` as their idempotency key. On the Redis broker, redelivery of an
abandoned batch waits for the transport's ``visibility_timeout`` (one hour by default); keep
that longer than your longest task *and* its longest retry countdown, or a batch is run twice.

Sizing. :func:`filter_campaign` splits a large campaign with :func:`split_campaign` into tasks
of about ``chunk_size`` messages whose requests are full (100 numbers each), and runs them as a
Celery ``group``; :func:`merge_summaries` adds up the summaries the tasks return.
"""

from __future__ import annotations

import logging
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, NoReturn, cast

from celery import Celery, group, shared_task
from celery.exceptions import Reject, TaskPredicate
from celery.result import GroupResult

from ..config import Settings
from ..model import MAX_NUMBERS_PER_REQUEST, Parsed, channel_of, parse_message
from ..redact import guard_library_logs, masked_exception
from .batch import check_batch, route_as_written
from .deferred import (  # noqa: F401  (importable from here, as before deferred.py)
    DEFERRED_QUEUE,
    DEFERRED_QUEUE_SETTING,
    PARKED_CHECK_FAILED,
    PARKED_CREDENTIALS_REFUSED,
    PARKED_TASK_FAILED,
    DeferredNotParked,
    deferred_queue,
    park_deferred,
    park_final_deferred,
)
from .monitoring import BlockfilterTask
from .worker import report_refusal

log = logging.getLogger("blockfilter.tasks")

# Numbers are masked in the library's log records (Celery's included) from the moment the
# tasks are registered: before any filter is built, in a worker's main process too.
guard_library_logs()

TASK_NAME: Final = "blockfilter.filter_messages"

#: No task retry waits longer than this, however many retries are configured.
MAX_RETRY_COUNTDOWN_S: Final = 600.0


# -- retries ---------------------------------------------------------------------------------


def retry_countdown(
    base: float,
    retries: int,
    *,
    maximum: float = MAX_RETRY_COUNTDOWN_S,
    rng: random.Random | None = None,
) -> float:
    """Seconds before task retry number ``retries + 1``: exponential, with "equal jitter".

    The ceiling doubles each retry (``base``, ``2 base``, ``4 base``... capped at ``maximum``);
    the countdown is drawn between half the ceiling and the ceiling, so the batches of an
    outage do not all come back at the same instant, yet none comes back right away.
    """
    ceiling = min(maximum, base * (2**retries))
    half = ceiling / 2
    return half + (rng or random).uniform(0, half)


# -- summaries -------------------------------------------------------------------------------


def merge_summaries(summaries: Iterable[Mapping[str, Any] | None]) -> dict[str, Any]:
    """Add up task summaries (the contract's format) into one.

    Counts are summed; ``elapsed_s`` is the sum of the tasks' own times (work done, not wall
    time: tasks run in parallel); ``credentials_refused`` is true when any task saw it.
    ``None`` entries (tasks whose results were ignored) are skipped.
    """
    total = requests = cache_hits = 0
    elapsed = 0.0
    refused = False
    verdicts: Counter[str] = Counter()
    channels: dict[str, Counter[str]] = defaultdict(Counter)
    requested: dict[str, Counter[str]] = defaultdict(Counter)
    for summary in summaries:
        if not summary:
            continue
        total += int(summary.get("total", 0))
        requests += int(summary.get("requests", 0))
        cache_hits += int(summary.get("cache_hits", 0))
        elapsed += float(summary.get("elapsed_s", 0.0))
        refused = refused or bool(summary.get("credentials_refused", False))
        verdicts.update(summary.get("verdicts", {}))
        for channel, counts in summary.get("channels", {}).items():
            channels[channel].update(counts)
        # A summary without it (an older worker's) asked for the channels it went out on.
        for channel, counts in summary.get(
            "requested_channels", summary.get("channels", {})
        ).items():
            requested[channel].update(counts)
    return {
        "total": total,
        "verdicts": {verdict: n for verdict, n in verdicts.items() if n},
        "channels": _nonzero(channels),
        "requested_channels": _nonzero(requested),
        "requests": requests,
        "cache_hits": cache_hits,
        "elapsed_s": round(elapsed, 3),
        "credentials_refused": refused,
    }


def _nonzero(channels: Mapping[str, Counter[str]]) -> dict[str, dict[str, int]]:
    return {
        channel: {verdict: n for verdict, n in counts.items() if n}
        for channel, counts in channels.items()
        if any(counts.values())
    }


def _without_results(summary: Mapping[str, Any], results: Sequence[Mapping[str, Any]]) -> dict:
    """``summary`` less the verdict counts of ``results`` (the deferred ones being retried).

    The retried attempt counts those messages again, with their final verdicts.
    """
    negative: Counter[str] = Counter()
    negative_channels: dict[str, Counter[str]] = defaultdict(Counter)
    for result in results:
        negative[result["verdict"]] -= 1
        negative_channels[channel_of(result)][result["verdict"]] -= 1
    # Deferred results go out on the channel they asked for: both views get the correction.
    negative_by_channel = {channel: dict(counts) for channel, counts in negative_channels.items()}
    correction = {
        "total": -len(results),
        "verdicts": dict(negative),
        "channels": negative_by_channel,
        "requested_channels": negative_by_channel,
    }
    return merge_summaries([summary, correction])


# -- the task --------------------------------------------------------------------------------


@shared_task(
    name=TASK_NAME,
    bind=True,
    base=BlockfilterTask,
    # Acknowledge after the batch is handled, and give the batch back to the broker when the
    # worker process dies under it: a crash re-runs the batch rather than losing it.
    acks_late=True,
    reject_on_worker_lost=True,
    # Retries are counted against BLOCKFILTER_TASK_MAX_RETRIES (read per call, from app.conf).
    max_retries=None,
)
def filter_messages(
    self: Any,
    messages: list[dict[str, Any]],
    carried_summary: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Filter ``messages``, hand the results to the hooks and return the summary.

    :param messages: message dicts (the contract's format).
    :param carried_summary: set by the task itself when it retries: the counts of the messages
        already handled by earlier attempts, so the final return value covers the whole batch.
    :return: the summary of every message of the original batch.
    """
    while True:
        try:
            return _filter_batch(self, messages, carried_summary)
        except _EagerRetry as again:
            # Eager mode retries here: Celery's eager retry raises Retry to the caller when
            # task_eager_propagates is on. Like Celery's, it does not wait the countdown.
            messages, carried_summary = again.messages, again.carried_summary
            self.request.retries += 1
        except TaskPredicate:
            raise  # Retry, Reject, Ignore: Celery's own, carrying no message
        except Exception as exc:
            # Celery stores a failed task's exception and traceback in the result backend: a
            # hook's or a plugin's message may quote a number.
            raise masked_exception(exc) from None


class _EagerRetry(Exception):  # noqa: N818 - a signal, not an error
    def __init__(
        self, messages: list[dict[str, Any]], carried_summary: dict[str, Any] | None
    ) -> None:
        super().__init__("retry")
        self.messages = messages
        self.carried_summary = carried_summary


def _filter_batch(
    task: Any, messages: list[dict[str, Any]], carried_summary: dict[str, Any] | None
) -> dict[str, Any]:
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"filter_messages takes a list of message dicts, not {type(messages)}")
    messages = list(messages)
    request_id = task.request.id
    try:
        batch = check_batch(
            messages,
            task.app.conf,
            retries_left=lambda settings: task.request.retries < settings.task_max_retries,
        )
    except Exception:
        # Not about a check (bad settings, a broken source plugin, a bug): keep the batch.
        park_deferred(task.app, messages, reason=PARKED_TASK_FAILED, task_id=request_id)
        raise
    settings = batch.settings

    not_parked = batch.park_final(
        lambda found, refused: park_final_deferred(
            task.app, found, refused=refused, task_id=request_id
        )
    )
    if batch.refusal_to_report is not None:
        report_refusal(
            batch.refusal_to_report, settings, messages=len(batch.deferred), task=TASK_NAME
        )
    hook_failure: Exception | None = None
    try:
        batch.hand_to_hooks()
    except Exception as exc:
        # The whole batch is retried, since we cannot tell which hook got which messages;
        # repeats carry the same ids.
        if not batch.retries_left:
            # Out of retries: park what is not parked yet, so a replay can finish the job.
            parked = set(batch.deferred) if not_parked is None else set()
            park_deferred(
                task.app,
                [message for index, message in enumerate(messages) if index not in parked],
                reason=PARKED_TASK_FAILED,
                task_id=request_id,
            )
            raise
        log.warning("a dispatch hook failed (%s); retrying the batch", type(exc).__name__)
        hook_failure = exc
    if hook_failure is not None:
        # Retried outside the except block: the stored RETRY traceback would otherwise carry
        # the hook's exception unmasked, as the context of Celery's Retry.
        _retry(task, settings, messages, carried_summary, exc=masked_exception(hook_failure))
    if not_parked is not None:
        raise DeferredNotParked.of(len(batch.deferred), not_parked, quote_error=True)

    summary = batch.summary
    if batch.to_retry:
        log.info(
            "%d of %d message(s) could not be checked; retrying them (retry %d of %d)",
            len(batch.to_retry),
            len(messages),
            task.request.retries + 1,
            settings.task_max_retries,
        )
        carried = merge_summaries(
            [carried_summary, _without_results(summary, [batch.results[i] for i in batch.to_retry])]
        )
        _retry(task, settings, [messages[i] for i in batch.to_retry], carried)
    return merge_summaries([carried_summary, summary]) if carried_summary else summary


def _retry(
    task: Any,
    settings: Settings,
    messages: list[dict[str, Any]],
    carried_summary: dict[str, Any] | None,
    exc: BaseException | None = None,
) -> NoReturn:
    """Raise the task's retry with ``messages``."""
    if task.request.is_eager:
        raise _EagerRetry(messages, carried_summary)
    countdown = retry_countdown(settings.task_retry_backoff, task.request.retries)
    try:
        raise task.retry(
            args=(messages,),
            kwargs={"carried_summary": carried_summary},
            countdown=countdown,
            max_retries=settings.task_max_retries,
            exc=exc,
        )
    except Reject as reject:
        # Celery raises Reject(requeue=False) when it cannot publish the retry, which would
        # drop the batch; give the original back to the broker instead (a repeat, not a loss).
        raise Reject(getattr(reject, "reason", None), requeue=True) from None


# -- campaigns -------------------------------------------------------------------------------


def split_campaign(
    messages: Iterable[Mapping[str, Any]], chunk_size: int = 1000
) -> list[list[dict[str, Any]]]:
    """Split a campaign into batches for :func:`filter_messages`, so many workers share it.

    Each batch holds about ``chunk_size`` messages of one channel, cut where its distinct
    numbers are a multiple of 100 so that every API request it makes is full; the partial
    leftovers of the channels are packed together at the end. Messages with the same number
    stay together (one lookup), and a repeated ``id`` rides with its first occurrence so the
    filter still marks the later copies ``duplicate_id``. Within a batch, input order is kept.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    items: list[Any] = list(messages)
    first_index_of_id: dict[str, int] = {}
    riders: dict[int, list[int]] = defaultdict(list)
    # channel -> number -> indexes of its messages, in first-seen order
    by_number: dict[str, dict[str, list[int]]] = defaultdict(dict)
    loose: list[int] = []  # invalid messages: no request to fill, they go anywhere
    for index, message in enumerate(items):
        message_id = message.get("id") if isinstance(message, Mapping) else None
        if isinstance(message_id, str) and message_id:
            first = first_index_of_id.setdefault(message_id, index)
            if first != index:
                riders[first].append(index)
                continue
        # Parsing was four fifths of a split's time, spent in the process that sends the
        # campaign before any task leaves (about what a warm worker spends filtering the
        # message): a number written in E.164 is grouped as written, as the filter reads it.
        route = route_as_written(message)
        if route is not None:
            by_number[route[0]].setdefault(route[1], []).append(index)
            continue
        parsed = parse_message(message)
        if isinstance(parsed, Parsed):
            by_number[parsed.channel].setdefault(parsed.e164, []).append(index)
        else:
            loose.append(index)

    chunks: list[list[int]] = []
    leftovers: list[list[int]] = []
    for numbers in by_number.values():
        groups = list(numbers.values())
        current: list[list[int]] = []
        size = 0
        last_full = 0  # groups in `current` up to its last multiple of 100 numbers
        for group_indexes in groups:
            if size + len(group_indexes) > chunk_size and current:
                cut = last_full or len(current)
                chunks.append([i for g in current[:cut] for i in g])
                current = current[cut:]
                size = sum(len(g) for g in current)
                last_full = 0
            current.append(group_indexes)
            size += len(group_indexes)
            if len(current) % MAX_NUMBERS_PER_REQUEST == 0:
                last_full = len(current)
        if current:
            leftovers.append([i for g in current for i in g])
    leftovers.append(loose)
    # Pack the leftovers: they make partial requests anyway, so fewer, fuller tasks.
    packed: list[int] = []
    for leftover in sorted(leftovers, key=len, reverse=True):
        if packed and len(packed) + len(leftover) > chunk_size:
            chunks.append(packed)
            packed = []
        packed.extend(leftover)
    if packed:
        chunks.append(packed)

    batches = []
    for chunk in chunks:
        indexes = chunk + [r for i in chunk for r in riders.get(i, ())]
        batches.append([items[i] for i in sorted(indexes)])
    return batches


def filter_campaign(
    messages: Iterable[Mapping[str, Any]],
    chunk_size: int = 1000,
    *,
    app: Celery | None = None,
    **options: Any,
) -> GroupResult:
    """Filter a campaign on the workers: a ``group`` of :func:`filter_messages` tasks.

    :param chunk_size: about how many messages per task (see :func:`split_campaign`).
    :param app: the Celery app to send through; default: the current app.
    :param options: ``apply_async`` options for the group (``queue=``, ``priority=``...).
    :return: the group's result; ``merge_summaries(result.get())`` is the campaign's summary
        (with a result backend configured).
    """
    batches = split_campaign(messages, chunk_size)
    if app is not None:
        signatures = [app.signature(TASK_NAME, args=(batch,)) for batch in batches]
    else:
        signatures = [filter_messages.s(batch) for batch in batches]
    return cast(GroupResult, group(signatures).apply_async(**options))
