"""The ledger's Celery tasks: ``blockfilter.send_results``, ``blockfilter.inbound`` and
``blockfilter.optout`` (an operator's word), one for each way in.

Registered in the user's app with the other tasks (``blockfilter.tasks`` imports this
module). All are idempotent (a result or reply with an ``id`` is recorded once; an operator's
opt-out recorded twice leaves the same state), so they are ``acks_late`` with
``reject_on_worker_lost``: a worker killed mid-task has it redelivered.
A ledger that cannot be written is retried with backoff for as long as it takes (an opt-out
must not be dropped because the database was restarting). Their results hold counts and codes
only, and their arguments are hidden from Celery's monitoring (``argsrepr``).
"""

from __future__ import annotations

from typing import Any, Final

from celery import shared_task
from celery.signals import before_task_publish

from ..config import load_settings
from .store import LedgerUnavailable

SEND_RESULTS_TASK: Final = "blockfilter.send_results"
INBOUND_TASK: Final = "blockfilter.inbound"
OPTOUT_TASK: Final = "blockfilter.optout"
_HIDDEN: Final = frozenset({SEND_RESULTS_TASK, INBOUND_TASK, OPTOUT_TASK})


@before_task_publish.connect(weak=False)
def _hide_arguments(sender: Any = None, headers: Any = None, **_: Any) -> None:
    # Numbers and reply texts would otherwise show in Flower, `celery inspect` and task
    # events, whoever sent the task (apply_async or send_task, in a process that imported us).
    if sender in _HIDDEN and isinstance(headers, dict):
        headers["argsrepr"] = "(...)"
        headers["kwargsrepr"] = "{}"


# Every task: redelivered after a worker crash (a report must not be lost), and retried for as
# long as the ledger is away, backing off to five minutes.
_LEDGER_TASK_OPTIONS: dict[str, Any] = {
    "bind": True,
    "acks_late": True,
    "reject_on_worker_lost": True,
    "autoretry_for": (LedgerUnavailable,),
    "retry_backoff": 1,
    "retry_backoff_max": 300,
    "retry_jitter": True,
    "max_retries": None,
}


def _context(task: Any) -> tuple[Any, Any]:
    from ..plugins.manager import get_plugin_manager

    settings = load_settings(celery_conf=task.app.conf)
    return settings, get_plugin_manager(settings)


@shared_task(name=SEND_RESULTS_TASK, **_LEDGER_TASK_OPTIONS)
def send_results(self: Any, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Record what the provider said of sent messages (see
    :func:`blockfilter.ledger.report_send_results`); returns the counts."""
    from .api import report_send_results

    if not isinstance(results, (list, tuple)):
        raise TypeError(f"send_results takes a list of send results, not {type(results)}")
    settings, pm = _context(self)
    return report_send_results(results, settings=settings, pm=pm).as_dict()


@shared_task(name=INBOUND_TASK, **_LEDGER_TASK_OPTIONS)
def inbound_reply(self: Any, message: dict[str, Any]) -> dict[str, Any]:
    """Read one reply (see :func:`blockfilter.ledger.inbound`); returns what it made of it,
    ``confirm`` included. An unusable message is not retried: ``error`` says why."""
    from .api import answer_inbound

    settings, pm = _context(self)
    return answer_inbound(message, settings=settings, pm=pm)


@shared_task(name=OPTOUT_TASK, **_LEDGER_TASK_OPTIONS)
def operator_optout(
    self: Any,
    numbers: list[str],
    channel: str,
    opted_out: bool = True,
    by: str | None = None,
    reason: str | None = None,
    region: str | None = None,
) -> dict[str, Any]:
    """An operator's word, as a task (see :func:`blockfilter.ledger.add_optouts`): these
    numbers opted out of ``channel`` (``all``: every channel), or back in with
    ``opted_out=False``. Returns the counts; bad entries are named by index, never by number.
    An unknown channel is not retried: ``error`` says why."""
    from .api import add_optouts, remove_optouts

    if isinstance(numbers, str) or not isinstance(numbers, (list, tuple)):
        raise TypeError(f"optout takes a list of numbers, not {type(numbers)}")
    settings = load_settings(celery_conf=self.app.conf)
    record = add_optouts if opted_out else remove_optouts
    try:
        return record(numbers, channel, by=by, reason=reason, region=region, settings=settings)
    except ValueError as exc:
        return {"recorded": 0, "changed": 0, "invalid": len(numbers), "error": str(exc)}
