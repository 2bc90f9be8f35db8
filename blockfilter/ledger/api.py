"""The three ways an opt-out reaches the ledger, as Python functions.

Each returns once the change is committed *and* every dispatch that could have missed it has
finished (see :mod:`blockfilter.ledger.store`): from then on no filter, cache or synced list
lets the number through on that channel, in any process sharing the ledger. What they return
holds counts and codes, never a number or a message's text, so a Celery task can return it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..config import CHANNELS, Settings, load_settings
from ..numbers import InvalidNumber, normalize
from ..redact import mask_numbers_in
from .events import (
    ALL_CHANNELS,
    EVENT_CHANNELS,
    SOURCE_IMPORT,
    SOURCE_INBOUND,
    SOURCE_OPERATOR,
    SOURCE_SEND_RESULT,
    event_time,
)
from .keywords import ALL_CHANNEL_KEYWORDS, OPT_IN, OPT_OUT, Keywords
from .ledger import Change, Ledger, Recorded, shared_ledger
from .mappings import codes_of

log = logging.getLogger("blockfilter.ledger")


def _context(
    settings: Settings | None, ledger: Ledger | None, pm: Any
) -> tuple[Settings, Ledger, Any]:
    settings = settings or load_settings()
    if pm is None:
        from ..plugins.manager import get_plugin_manager

        pm = get_plugin_manager(settings)
    return settings, ledger or shared_ledger(settings), pm


def _after_record(settings: Settings, ledger: Ledger, recorded: Sequence[Recorded]) -> None:
    if ledger.write_back and ledger.auto_flush and any(r.changed for r in recorded):
        from .writeback import kick_write_back

        kick_write_back(settings, ledger)


# -- send results ----------------------------------------------------------------------------


@dataclass
class SendResultsReport:
    """What :func:`report_send_results` did with a batch (counts only).

    :ivar opted_out: results recorded as opt-outs. :ivar ignored: results whose code means
        nothing to the ledger (delivered, failed for another reason). :ivar duplicates: results
        recorded before (same provider message ``id``). :ivar invalid: results that could not be
        read; ``errors`` says which (by index) and why.
    """

    total: int = 0
    opted_out: int = 0
    ignored: int = 0
    duplicates: int = 0
    invalid: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _channel(value: Any, *, allow_all: bool = False) -> str:
    channel = str(value or "").strip().lower()
    allowed = EVENT_CHANNELS if allow_all else CHANNELS
    if channel not in allowed:
        raise ValueError(f"channel must be one of {', '.join(allowed)}")
    return channel


def report_send_results(
    results: Iterable[Mapping[str, Any]],
    *,
    settings: Settings | None = None,
    ledger: Ledger | None = None,
    pm: Any = None,
) -> SendResultsReport:
    """Record what the provider said of sent messages: the opt-outs go to the ledger.

    Each result is a dict: ``to`` (the number; national format with ``region``), ``channel``,
    ``provider`` (``kaleyra``, ``twilio``, ``telnyx``, ``vonage``...), the provider's ``code``
    (Kaleyra's ``NOT-SENT/OPT-OUT`` or just ``OPT-OUT``; Twilio's ``21610``...; also read from
    ``error_code`` and ``status``), optionally ``at`` (when the provider said it: epoch
    seconds or ISO 8601; default now) and ``id`` (the message's id: a result reported twice is
    recorded once). Codes are mapped by the built-in table and the ``blockfilter_optout_codes``
    hook; any other code is recorded nowhere.

    :raises LedgerUnavailable: the ledger could not be written: nothing of the batch was
        recorded; report it again (the task retries).
    """
    settings, ledger, pm = _context(settings, ledger, pm)
    from .source import optout_codes

    report = SendResultsReport()
    changes: list[Change] = []
    mappings: dict[str, dict[str, bool]] = {}
    for index, result in enumerate(results):
        report.total += 1
        try:
            if not isinstance(result, Mapping):
                raise ValueError("a send result is a JSON object")
            provider = str(result.get("provider") or "").strip().lower()
            if not provider:
                raise ValueError("missing provider")
            codes = mappings.get(provider)
            if codes is None:
                codes = mappings[provider] = optout_codes(pm, provider)
            matched = next((c for c in codes_of(result) if c in codes), None)
            if matched is None:
                report.ignored += 1
                continue
            channel = _channel(result.get("channel"))
            number = normalize(result.get("to"), result.get("region"))
            ref = result.get("id")
            changes.append(
                Change(
                    number=number,
                    channel=channel,
                    opted_out=True,
                    occurred_at=event_time(result.get("at")),
                    source=SOURCE_SEND_RESULT,
                    provider=provider,
                    code=matched,
                    actor="provider",
                    ref=f"{provider}\0{ref}\0{matched}" if ref not in (None, "") else None,
                )
            )
        except (ValueError, InvalidNumber) as exc:
            report.invalid += 1
            report.errors.append({"index": index, "reason": _reason(exc)})
    recorded = ledger.record(changes)
    for item in recorded:
        if item.duplicate:
            report.duplicates += 1
        else:
            report.opted_out += 1
    _after_record(settings, ledger, recorded)
    return report


def _reason(exc: Exception) -> str:
    if isinstance(exc, InvalidNumber):
        return "invalid_number"
    text = str(exc)
    return text if len(text) < 120 else text[:120]


# -- inbound replies -------------------------------------------------------------------------


@dataclass
class InboundResult:
    """What :func:`inbound` made of a reply.

    :ivar action: ``opt_out``, ``opt_in`` or ``None`` (not a consent message).
    :ivar keyword: the keyword matched (``STOP``), or ``intent`` when a plugin read free text.
    :ivar channel: the channel the change applies to (``all`` for STOPALL).
    :ivar recorded: a change was written (not a duplicate of a reply seen before).
    :ivar confirm: a confirmation may be sent now: the reply changed the number's state. A
        repeated STOP, a replay of the same reply, or a second worker handling the same one
        all get ``False``: one confirmation, as the TCPA allows, never two.
    """

    action: str | None = None
    keyword: str | None = None
    channel: str | None = None
    recorded: bool = False
    confirm: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def keywords_for(settings: Settings) -> Keywords:
    return Keywords.from_settings(settings.optout_keywords, settings.optin_keywords)


def inbound(
    message: Mapping[str, Any],
    *,
    settings: Settings | None = None,
    ledger: Ledger | None = None,
    pm: Any = None,
) -> InboundResult:
    """Read a reply: an opt-out or opt-in keyword is recorded in the ledger.

    :param message: ``from`` (the sender's number; ``region`` for a national format),
        ``channel``, ``text``; optionally ``locale``, ``at`` (when it was received) and ``id``
        (a reply handled twice is recorded once). The text is read, never stored.
    :raises ValueError: the message lacks ``from``/``channel``/``text`` or they are unusable.
    :raises LedgerUnavailable: the ledger could not be written.
    """
    settings, ledger, pm = _context(settings, ledger, pm)
    if not isinstance(message, Mapping):
        raise ValueError("an inbound message is a JSON object")
    channel = _channel(message.get("channel"))
    text = message.get("text")
    if not isinstance(text, str):
        raise ValueError("an inbound message needs its text")
    try:
        number = normalize(message.get("from"), message.get("region"))
    except InvalidNumber:
        raise ValueError("the inbound message's 'from' is not a valid number") from None
    locale = message.get("locale") if isinstance(message.get("locale"), str) else None
    matched = keywords_for(settings).match(text, locale)
    if matched is None:
        from ..plugins.manager import PluginHooks

        intent = PluginHooks(pm).inbound_intent(text, channel, locale)
        if intent not in (OPT_OUT, OPT_IN):
            if intent is not None:
                log.warning("blockfilter_inbound_intent returned an unknown intent; ignored")
            return InboundResult()
        matched = (intent, "intent")
    action, keyword = matched
    scope = ALL_CHANNELS if keyword in ALL_CHANNEL_KEYWORDS else channel
    ref = message.get("id")
    recorded = ledger.record(
        [
            Change(
                number=number,
                channel=scope,
                opted_out=action == OPT_OUT,
                occurred_at=event_time(message.get("at")),
                source=SOURCE_INBOUND,
                code=keyword,
                actor="recipient",
                ref=f"{channel}\0{ref}" if ref not in (None, "") else None,
            )
        ]
    )[0]
    _after_record(settings, ledger, [recorded])
    return InboundResult(
        action=action,
        keyword=keyword,
        channel=scope,
        recorded=not recorded.duplicate,
        confirm=recorded.changed,
    )


def answer_inbound(
    message: Any, *, settings: Settings | None = None, ledger: Ledger | None = None, pm: Any = None
) -> dict[str, Any]:
    """:func:`inbound` as a plain dict, for a task's result or a line of output: an unusable
    message is no error to retry but an answer whose ``error`` says why."""
    try:
        return inbound(message, settings=settings, ledger=ledger, pm=pm).as_dict()
    except ValueError as exc:
        return {"action": None, "recorded": False, "confirm": False, "error": str(exc)}


# -- operators -------------------------------------------------------------------------------


def _operator_changes(
    numbers: Iterable[str],
    channel: str,
    opted_out: bool,
    *,
    region: str | None,
    by: str | None,
    reason: str | None,
    at: Any,
    source: str,
) -> tuple[list[Change], list[dict[str, Any]]]:
    channel = _channel(channel, allow_all=True)
    occurred_at = event_time(at)
    # Free text an operator typed is stored in clear and shown in every verdict it decides:
    # a number quoted in it ("complaint from +91...") is masked like one in a log.
    reason = mask_numbers_in(reason) if reason else reason
    by = mask_numbers_in(by) if by else by
    changes, errors = [], []
    for index, raw in enumerate(numbers):
        try:
            number = normalize(raw, region)
        except InvalidNumber:
            errors.append({"index": index, "reason": "invalid_number"})
            continue
        changes.append(
            Change(number, channel, opted_out, occurred_at, source, code=reason, actor=by)
        )
    return changes, errors


def add_optouts(
    numbers: Iterable[str],
    channel: str,
    *,
    by: str | None = None,
    reason: str | None = None,
    region: str | None = None,
    at: Any = None,
    imported: bool = False,
    settings: Settings | None = None,
    ledger: Ledger | None = None,
) -> dict[str, Any]:
    """Record that these numbers opted out of ``channel`` (``all``: every channel), on an
    operator's word (a complaint, a letter, an import of another system's list).

    :return: ``{"recorded": n, "changed": n, "invalid": n, "errors": [...]}``.
    """
    return _operator(numbers, channel, True, by, reason, region, at, imported, settings, ledger)


def remove_optouts(
    numbers: Iterable[str],
    channel: str,
    *,
    by: str | None = None,
    reason: str | None = None,
    region: str | None = None,
    at: Any = None,
    settings: Settings | None = None,
    ledger: Ledger | None = None,
) -> dict[str, Any]:
    """Record that these numbers opted back in on ``channel``. This lifts only what the
    ledger itself recorded: Kaleyra's own blocklist still applies (unless write-back is on,
    which removes them from it too)."""
    return _operator(numbers, channel, False, by, reason, region, at, False, settings, ledger)


def _operator(
    numbers: Iterable[str],
    channel: str,
    opted_out: bool,
    by: str | None,
    reason: str | None,
    region: str | None,
    at: Any,
    imported: bool,
    settings: Settings | None,
    ledger: Ledger | None,
) -> dict[str, Any]:
    settings = settings or load_settings()
    ledger = ledger or shared_ledger(settings)
    source = SOURCE_IMPORT if imported else SOURCE_OPERATOR
    changes, errors = _operator_changes(
        numbers, channel, opted_out, region=region, by=by, reason=reason, at=at, source=source
    )
    recorded = ledger.record(changes)
    _after_record(settings, ledger, recorded)
    return {
        "recorded": sum(1 for r in recorded if not r.duplicate),
        "changed": sum(1 for r in recorded if r.changed),
        "invalid": len(errors),
        "errors": errors,
    }
