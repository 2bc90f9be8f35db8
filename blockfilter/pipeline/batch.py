"""One batch through the filter and the hooks: the core both Celery tasks share, without Celery.

``blockfilter.filter_messages`` (:mod:`.tasks`) and ``blockfilter.collect`` (:mod:`.collector`)
differ in where a batch comes from and in what becomes of the messages to be tried again (the
task retries itself with them; the collector hands them to ``filter_messages``). Everything
else is the same, and is here, in this order:

1. :func:`check_batch`: the settings (the environment and the app's ``conf``), the plugin
   manager, the filter: one verdict per message, and the run's metrics.
2. :meth:`CheckedBatch.park_final`: the deferred messages whose deferral is final (no retry
   left, or refused credentials) are parked first, so that a hook failure cannot lose them.
3. :meth:`CheckedBatch.hand_to_hooks`: the observers, then ``blockfilter_dispatch`` and
   ``blockfilter_suppressed``, under the ledger's dispatch gate; then the verdict metrics.

Parking is handed in as a function (the tasks publish to their app's broker), so nothing here
needs a Celery app and the steps can be read, and tested, on their own.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import pluggy

from .. import metrics
from ..config import CHANNELS, Settings, load_settings
from ..errors import CredentialsRefused
from ..gcpacing import paced_collections
from ..ledger.source import dispatch_gate
from ..model import Reason, Verdict
from ..plugins.manager import build_filter, dispatch_results, get_plugin_manager, notify_verdicts

#: Parks messages whose deferral is final; ``refused`` says why (their credentials were
#: refused, or their check failed). Returns the error when the broker would not take them.
ParkFinal = Callable[[Sequence[Any], bool], "Exception | None"]


@dataclass(frozen=True)
class CheckedBatch:
    """A batch's messages with their verdicts, and what decides what becomes of them."""

    messages: list[Any]
    results: list[dict[str, Any]]
    #: the run's summary (the contract's format), of this attempt only
    summary: dict[str, Any]
    settings: Settings
    plugins: pluggy.PluginManager
    #: the first refusal of the credentials or the account the filter saw, if any
    refusal: CredentialsRefused | None
    #: indexes of the messages whose check could not be made
    deferred: list[int]
    #: Kaleyra refused the credentials: only a human can fix that, so no retry helps
    refused: bool
    #: the task may still try again
    retries_left: bool

    @property
    def final(self) -> bool:
        """The verdicts are final: nothing deferred, refused credentials, or no retry left."""
        return not self.deferred or self.refused or not self.retries_left

    @property
    def to_retry(self) -> list[int]:
        """Indexes of the deferred messages another attempt is to decide (none once final)."""
        return [] if self.final else self.deferred

    @property
    def handled(self) -> list[int]:
        """Indexes of the messages whose verdict the hooks get now."""
        retried = set(self.to_retry)
        return [index for index in range(len(self.results)) if index not in retried]

    @property
    def refusal_to_report(self) -> CredentialsRefused | None:
        """The refusal to log, once its messages are parked as ``credentials_refused``."""
        return self.refusal if self.deferred and self.refused else None

    def park_final(self, park: ParkFinal) -> Exception | None:
        """Park the deferred messages if their deferral is final; the error if that failed."""
        if not (self.deferred and self.final):
            return None
        return park([self.messages[index] for index in self.deferred], self.refused)

    def hand_to_hooks(self) -> None:
        """The observers, then the dispatch hooks, with the handled results.

        One last ledger read under its fence first: an opt-out reported during the check
        stops the dispatch, and the report waits for this block (blockfilter.ledger.source).
        Raises what a hook raised: the hook specification's "raise to have the batch retried".
        """
        handled = [self.results[index] for index in self.handled]
        with dispatch_gate(self.plugins, self.settings, handled, self.summary):
            if handled:
                notify_verdicts(self.plugins, handled)
            dispatch_results(self.plugins, handled, deferred_final=True)
        metrics.count_verdicts(handled)


_LOOKS_E164 = re.compile(r"\+[1-9][0-9]{7,14}").fullmatch
_CHANNEL_NAMES = {name: name for name in CHANNELS} | {name.upper(): name for name in CHANNELS}


def route_as_written(message: Any) -> tuple[str, str] | None:
    """(channel, number) of a message whose ``to`` is already written in E.164 on a known
    channel, read without parsing it; ``None`` for any other (it is then parsed). What the
    filter makes of such a number is what is written, or the message is ``invalid``: a
    guess good enough to plan by (what to read ahead, how to split), never a verdict."""
    if type(message) is not dict or "region" in message:
        return None
    channel, to = message.get("channel"), message.get("to")
    if type(channel) is not str or type(to) is not str or not _LOOKS_E164(to):
        return None
    name = _CHANNEL_NAMES.get(channel)
    if name is None:
        name = _CHANNEL_NAMES.get(channel.lower())
        if name is None:
            return None
    return name, to


def numbers_to_read_ahead(messages: Sequence[Any]) -> dict[str, list[str]]:
    """The numbers a batch will ask about, per channel, guessed cheaply
    (:func:`route_as_written`); every other channel with none (its snapshot is read ahead,
    for the fallback rounds). A guess only costs: a number the filter normalises otherwise is
    not asked about as guessed, and is read when it is.

    A warm task then reads its statuses in one round trip instead of one per 500 numbers
    and one per channel's sync mark."""
    wanted: dict[str, list[str]] = {channel: [] for channel in CHANNELS}
    for message in messages:
        route = route_as_written(message)
        if route is not None:
            wanted[route[0]].append(route[1])
    return wanted


def check_batch(
    messages: Sequence[Any],
    conf: Mapping[str, Any] | None,
    *,
    retries_left: Callable[[Settings], bool],
) -> CheckedBatch:
    """Run the filter on ``messages`` with the settings of ``conf`` (a Celery ``app.conf``).

    :param retries_left: whether the task may try again, given the settings (its retry budget
        is one of them).
    :raises Exception: whatever kept the batch from being filtered (bad settings, a broken
        source plugin, a bug): not about a check, so the caller parks the whole batch.
    """
    messages = list(messages)
    settings = load_settings(celery_conf=conf)
    plugins = get_plugin_manager(settings)
    with paced_collections(), build_filter(settings, plugins) as engine, ExitStack() as stack:
        wanted = numbers_to_read_ahead(messages)
        for source in engine.sources:
            stack.enter_context(source.reading_ahead(wanted))
        results = list(engine.run(messages))
        summary = engine.summary.as_dict()
        refusal = engine.refusal
        metrics.count_run(engine)
    deferred = [
        index for index, result in enumerate(results) if result["verdict"] == Verdict.DEFERRED
    ]
    refused = bool(summary.get("credentials_refused")) or any(
        results[index].get("reason") == Reason.CREDENTIALS_REFUSED for index in deferred
    )
    return CheckedBatch(
        messages=messages,
        results=results,
        summary=summary,
        settings=settings,
        plugins=plugins,
        refusal=refusal,
        deferred=deferred,
        refused=refused,
        retries_left=retries_left(settings),
    )
