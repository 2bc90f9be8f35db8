"""The plugin contract: every hook a pipeline or an extension can implement.

Implement a hook with the ``hookimpl`` marker (``from blockfilter import hookimpl``) in a module
or class, and publish it under the ``blockfilter`` entry-point group::

    # pyproject.toml
    [project.entry-points.blockfilter]
    my-pipeline = "my_pipeline.hooks"

blockfilter always calls hooks with keyword arguments, so an implementation may take only the
arguments it needs. Arguments are added to a hook over time, never removed or renamed; do not
give an implementation's argument a default value (pluggy does not pass those).

Where one answer is needed (``firstresult``) the plugin called first wins, and pluggy calls the
plugin registered last first: blockfilter's built-ins are marked ``trylast=True`` so that any
plugin you install overrides them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pluggy

from ..config import Settings
from ..sources import BlocklistSource

PROJECT_NAME = "blockfilter"  # the pluggy project name and the entry-point group

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# -- what a pipeline implements: where messages go after the check --------------------------


@hookspec
def blockfilter_dispatch(messages: list[dict[str, Any]]) -> None:
    """Send these messages: they passed the check.

    Called by the Celery task once per batch of results, after the check and before the
    task returns; never with an empty list, and never by ``blockfilter filter`` (scrubbing a
    file sends nothing). Every implementation is called (results are not collected).

    Delivery is *at least once*: when a worker crashes, or an implementation raises and the
    task is retried, the same message may come again, always with the same ``id``. Use the
    ``id`` as the idempotency key of the send.

    :param messages: the ``allowed`` and ``rerouted`` results, in input order: each is the
        original message with the verdict fields added (``verdict``, ``e164``,
        ``checked_at``; a rerouted one has its new ``channel`` and ``original_channel``).
        Send each on its ``channel``. Do not modify them: other plugins get the same dicts.
    :return: ignored. Raise to have the batch retried (it will be dispatched again).
    """


@hookspec
def blockfilter_suppressed(messages: list[dict[str, Any]]) -> None:
    """Record the messages that will not be sent.

    Called by the Celery task once per batch, after ``blockfilter_dispatch``; never with an
    empty list, never by ``blockfilter filter``. At least once, like
    ``blockfilter_dispatch``: the ``id`` is the idempotency key.

    :param messages: the ``blocked`` and ``invalid`` results, and the ``deferred`` ones once
        they are final (the check could not be made and the task's retries are spent), in
        input order, each with its ``verdict`` and ``reason``. Deferred messages that will
        still be retried are not passed here. Do not modify them.
    :return: ignored. Raise to have the batch retried.
    """


# -- what an extension implements: how the check is made ------------------------------------


@hookspec
def blockfilter_blocklist_sources(settings: Settings) -> list[BlocklistSource] | None:
    """Give blocklist sources to join Kaleyra's (an opt-out table, a regulator's list).

    Called each time a filter is built (per run, per Celery task); return the same,
    long-lived source objects each time when they hold connections. Results are collected
    from every plugin and all sources are joined: a number is blocklisted when *any* source
    says so, and checked only when *every* source answered for it (a failing source leaves
    its numbers unchecked, which defers them: fail closed).

    The built-in ``kaleyra`` plugin implements this hook to return the Kaleyra API source;
    block it (``BLOCKFILTER_DISABLE_PLUGINS=kaleyra``) to use only your own sources. With no
    source at all, blockfilter refuses to start rather than send unchecked messages.

    For a simple lookup, implement ``blockfilter_blocklisted`` instead.

    A source needs ``name``, ``check_many()`` and ``stats()``
    (:class:`blockfilter.sources.BlocklistSource`). Subclass
    :class:`blockfilter.sources.BaseSource` to offer the optional capabilities as well: a
    stream, a cost estimate (``--estimate`` adds up every source's), a request budget
    (``--max-requests`` reaches every source that counts its requests), ``close()``.

    :param settings: the effective settings of this run.
    :return: a list of :class:`blockfilter.sources.BlocklistSource` objects, or ``None`` to
        add none.
    """


@hookspec
def blockfilter_blocklisted(channel: str, numbers: list[str]) -> Iterable[str] | None:
    """Say which of these numbers are blocklisted on ``channel``, from your own data.

    The easy form of ``blockfilter_blocklist_sources``: each implementation becomes one
    blocklist source named after its plugin, joined to the others. Called during a run with
    up to 1000 distinct numbers at a time, for each channel that has numbers to check; runs
    in different threads may call it at the same time, so keep it thread-safe. Raising marks
    those numbers unchecked on ``channel`` (so their messages are deferred, fail closed); it
    does not stop the run.

    :param channel: ``sms``, ``whatsapp`` or ``voice``.
    :param numbers: distinct E.164 numbers (``+919812345678``).
    :return: the blocklisted subset of ``numbers`` (any iterable; numbers not asked about
        are ignored), or ``None`` when none is blocklisted.
    """


@hookspec(firstresult=True)
def blockfilter_fallback_channels(
    message: dict[str, Any], channel: str, fallback: list[str]
) -> list[str] | None:
    """Choose the channels to try, in order, for a message blocklisted on its channel.

    ``firstresult``: the first plugin that returns a list (not ``None``) decides. The
    built-in ``default-reroute`` plugin returns ``fallback``, the message's own list.

    May be called for any valid message (not only blocklisted ones), several times per run
    (the filter reads its input in passes): the answer must depend only on the arguments.
    Each channel returned is itself checked against the blocklist; the message is rerouted to
    the first one that is not blocklisted, or blocked when every one is.

    :param message: the message as given (do not modify it).
    :param channel: the message's channel, lower case.
    :param fallback: the message's own ``fallback`` list, lower case (empty if it has none).
    :return: channel names (``sms``, ``whatsapp``, ``voice``) in the order to try them; an
        empty list to never reroute; ``None`` to leave the choice to the next plugin. Unknown
        names are dropped with a warning.
    """


# -- observers and life cycle ---------------------------------------------------------------


@hookspec
def blockfilter_verdicts(results: list[dict[str, Any]]) -> None:
    """Observe verdicts, for audit logs and metrics.

    Called with every batch of results wherever the filter runs (the Python API's
    :class:`blockfilter.engine.Filter`, ``blockfilter filter`` and the Celery tasks alike);
    never with an empty list.
    Every implementation is called. An exception in an observer is logged and ignored: it
    changes no verdict and stops no other observer.

    :param results: every result of the batch, in input order, each with its ``verdict``.
        Copies, shared by the observers: changing them changes no verdict.
    :return: ignored.
    """


@hookspec
def blockfilter_startup(settings: Settings) -> None:
    """Check your plugin's configuration before any message is filtered.

    Called once per process when the plugin manager is built (the first time blockfilter
    needs its plugins), after every plugin is registered. Raise (a
    :class:`blockfilter.errors.ConfigError` with a clear message, say) to refuse to start:
    blockfilter stops with a ``PluginError`` naming your plugin.

    :param settings: the effective settings.
    :return: ignored.
    """


# -- the opt-out ledger (blockfilter.ledger) ------------------------------------------------


@hookspec
def blockfilter_optout_codes(provider: str) -> Mapping[str, bool] | None:
    """Add or override the codes of ``provider`` that mean "the recipient opted out".

    Called when send results of ``provider`` are reported (``report_send_results``, the
    ``blockfilter.send_results`` task). Results are collected and merged over the built-in
    table (Kaleyra ``OPT-OUT``, ``BLACKLIST``, ``DND-NUMB``, ``CON-DND``, ``NOT-OPTIN``,
    ``OUTPUT-REJ``; Twilio ``21610``; Telnyx ``40300``; Vonage ``9``); where plugins disagree,
    the one called first wins. Codes are compared trimmed and upper-cased.

    :param provider: the provider named by the send result, lower case (``kaleyra``,
        ``twilio``, ``telnyx``, ``vonage`` or any other a pipeline uses).
    :return: code -> ``True`` (it means opted out: record it) or ``False`` (it does not, even
        if the built-in table says so); ``None`` to leave the mapping alone.
    """


@hookspec(firstresult=True)
def blockfilter_inbound_intent(text: str, channel: str, locale: str | None) -> str | None:
    """Read a reply that is not a keyword (free text such as "please stop texting me").

    Called by ``inbound()`` and the ``blockfilter.inbound`` task when the reply matched no
    opt-out or opt-in keyword. ``firstresult``: the first plugin to answer decides. The text
    is the person's own words: do not log or keep it.

    :param text: the reply's text, as received.
    :param channel: the channel it came on, lower case.
    :param locale: the reply's locale if the pipeline knows it (``en``, ``es``), else ``None``.
    :return: ``"opt_out"``, ``"opt_in"``, or ``None`` (not a consent message).
    """
