"""What Celery's stores and monitoring keep of blockfilter's tasks: summaries, never messages.

A task's arguments travel three ways besides the task itself, and each would show the
messages (numbers, text) to whoever watches the broker or the workers:

* ``argsrepr`` / ``kwargsrepr``, the text ``celery inspect``, events, Flower and the worker's
  log lines show. The producer writes them: :class:`BlockfilterTask` sets a summary
  (``[120 messages]``) on every send through the task, and :func:`hide_published_arguments`
  (a ``before_task_publish`` handler, connected when this module is imported, which
  ``blockfilter.tasks`` does) on every send by name (``app.send_task(...)``) from a process
  that imported the tasks. A worker does not trust the producer: its requests
  (:class:`MaskedRequest`) replace whatever came with the summary, and ``celery inspect
  active`` gets the summary even when asked for the raw arguments.
* The result backend, with ``result_extended = True``, stores a task's arguments with each
  state; :func:`hide_stored_arguments` (``task_prerun``) puts the summary in their place
  before the first state is stored. The tasks never report ``STARTED``.
* The exceptions stored with ``RETRY`` and ``FAILURE``: the tasks mask them
  (:func:`blockfilter.redact.masked_exception`) before Celery sees them.

Known gap: with ``task_send_sent_event = True``, a ``task-sent`` event of a send *by name*
carries the repr Celery made before any handler runs; send through the task
(``collect.delay(message)``) or pass ``argsrepr=`` yourself to keep it out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from celery import Task
from celery.signals import before_task_publish, task_prerun
from celery.worker.request import Request

#: Every task whose name starts with this is the library's (``blockfilter.filter_messages``,
#: ``blockfilter.collect``, and those of the ledger).
TASK_PREFIX: Final = "blockfilter."


def _describe(value: Any) -> str:
    """What an argument is, without a word of what it holds."""
    if isinstance(value, (list, tuple)):
        n = len(value)
        return f"{n} message" if n == 1 else f"{n} messages"
    if isinstance(value, Mapping):
        return "1 message"
    if value is None:
        return "None"
    return type(value).__name__


def describe_arguments(args: Any, kwargs: Any) -> tuple[str, str]:
    """``(argsrepr, kwargsrepr)`` for a blockfilter task: ``[120 messages]``, ``{'carried_summary':
    dict}``. Only counts and type names: no number, no text, whatever the arguments are."""
    positional: Sequence[Any] = args if isinstance(args, (list, tuple)) else ()
    argsrepr = "[" + ", ".join(_describe(a) for a in positional) + "]"
    keywords: Mapping[str, Any] = kwargs if isinstance(kwargs, Mapping) else {}
    kwargsrepr = "{" + ", ".join(f"{str(k)!r}: {_describe(v)}" for k, v in keywords.items()) + "}"
    return argsrepr, kwargsrepr


def is_library_task(name: Any) -> bool:
    return isinstance(name, str) and name.startswith(TASK_PREFIX)


# -- producers -------------------------------------------------------------------------------


@before_task_publish.connect(weak=False, dispatch_uid="blockfilter.hide_published_arguments")
def hide_published_arguments(
    sender: Any = None, body: Any = None, headers: Any = None, **_: Any
) -> None:
    """Put the summary in a blockfilter task message's ``argsrepr`` / ``kwargsrepr`` headers.

    Celery calls it with the headers it is about to publish; a change made here is what the
    broker gets. Protocol 1 messages (no such headers) are left alone.
    """
    if not is_library_task(sender) or not isinstance(headers, dict):
        return
    if not isinstance(body, (list, tuple)) or len(body) < 2:
        return
    headers["argsrepr"], headers["kwargsrepr"] = describe_arguments(body[0], body[1])


class BlockfilterTask(Task):  # type: ignore[misc]
    """The base of the library's tasks: summaries for monitoring, masked stored exceptions.

    ``track_started`` is off: a ``STARTED`` state would be stored before anything else runs.
    """

    abstract = True
    Request = "blockfilter.pipeline.monitoring:MaskedRequest"
    track_started = False

    def apply_async(self, args: Any = None, kwargs: Any = None, *more: Any, **options: Any) -> Any:
        # Set here rather than only in the publish handler: Celery builds the task-sent
        # event from these before any handler runs.
        argsrepr, kwargsrepr = describe_arguments(args or (), kwargs or {})
        options.setdefault("argsrepr", argsrepr)
        options.setdefault("kwargsrepr", kwargsrepr)
        return super().apply_async(args, kwargs, *more, **options)


# -- workers ---------------------------------------------------------------------------------


class MaskedRequest(Request):  # type: ignore[misc]
    """A worker's request of a blockfilter task: the summary wherever the arguments show.

    The summary is computed from the arguments themselves, so a producer that never imported
    blockfilter (a plain ``send_task`` from another service) cannot make the worker show them.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        argsrepr, kwargsrepr = describe_arguments(self.args, self.kwargs)
        self._argsrepr, self._kwargsrepr = argsrepr, kwargsrepr
        request: dict[str, Any] = self.request_dict
        request["argsrepr"], request["kwargsrepr"] = argsrepr, kwargsrepr
        # What the pool is handed and logs at DEBUG (the task reads its arguments from the
        # message body), and what a worker-lost failure stores with result_extended.
        request["args"], request["kwargs"] = [argsrepr], {}

    def info(self, safe: bool = False) -> Any:
        # `celery inspect active` asks for the raw arguments (safe=False): never give them.
        return super().info(safe=True)


@task_prerun.connect(weak=False, dispatch_uid="blockfilter.hide_stored_arguments")
def hide_stored_arguments(sender: Any = None, task: Any = None, **_: Any) -> None:
    """Put the summary in place of the arguments in a blockfilter task's request context.

    With ``result_extended = True`` the result backend stores ``request.args`` and
    ``request.kwargs`` with every state of the task; the task itself gets its arguments
    from the call, not from there.
    """
    task = task or sender
    if task is None or not is_library_task(getattr(task, "name", None)):
        return
    request = task.request
    argsrepr, kwargsrepr = describe_arguments(request.args, request.kwargs)
    request.args, request.kwargs = [argsrepr, kwargsrepr], {}
