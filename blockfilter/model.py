"""The facts every part shares: verdict names, reasons, the request size, a message's parts.

A message is a JSON object with ``id``, ``channel`` and ``to`` (plus an optional ``region`` for
national numbers and ``fallback``). Everything else is carried through untouched. Its record
gets a :class:`Verdict` and, for some verdicts, a reason (:class:`Reason` for the deferrals,
``invalid``'s codes from :func:`parse_message`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, cast

from .config import CHANNELS
from .numbers import MAX_INPUT_LENGTH, InvalidNumber, normalize
from .redact import mask_numbers_in

# What a source may say of its answer, beside ``source``: the age of a cached status or a
# synced snapshot, the ledger's event. Any other key a source gives is not carried: a source
# must not be able to set a verdict's own fields.
PROVENANCE_FIELDS = frozenset({"age_s", "ledger_event"})

#: Kaleyra's "Get Blocklist" and "Change Blocklist Status for Number" take at most this many
#: numbers a request: the filter's requests, the tasks' and the collector's batches, and the
#: ledger's write-backs are cut to it.
MAX_NUMBERS_PER_REQUEST: Final = 100
#: The largest ``limit`` the API takes when paging through a whole blocklist.
MAX_PAGE_SIZE: Final = 100


class Verdict:
    """The verdict names of the contract. Records carry them as plain strings."""

    ALLOWED: Final = "allowed"
    REROUTED: Final = "rerouted"
    BLOCKED: Final = "blocked"
    INVALID: Final = "invalid"
    DEFERRED: Final = "deferred"
    #: Every verdict, in the order summaries list them.
    ALL: Final = (ALLOWED, REROUTED, BLOCKED, INVALID, DEFERRED)
    #: Handed to ``blockfilter_dispatch``: they go out (on their final channel).
    DISPATCHED: Final = frozenset({ALLOWED, REROUTED})
    #: Handed to ``blockfilter_suppressed`` at once (``deferred`` only once final).
    SUPPRESSED: Final = frozenset({BLOCKED, INVALID})


class Reason:
    """Why a message was deferred: its number could not be checked."""

    CHECK_FAILED: Final = "check_failed"
    CREDENTIALS_REFUSED: Final = "credentials_refused"
    #: A task failed for good with the message still in it (it is parked for a replay).
    TASK_FAILED: Final = "task_failed"


def channel_named(value: Any) -> str:
    """``value`` as one of :data:`~blockfilter.config.CHANNELS` (any case, spaces around it
    ignored): what every function that takes a channel name from its caller checks first.

    :raises ValueError: not a known channel.
    """
    if isinstance(value, str):
        name = value.strip().lower()
        if name in _KNOWN_CHANNELS:
            return name
    # Masked: a number passed where the channel goes must not reach a log in clear.
    shown = mask_numbers_in(str(value)[:40])
    raise ValueError(f"unknown channel {shown!r}; expected one of {', '.join(CHANNELS)}")


# The fields a verdict adds. A message that already carries one of them (a file of earlier
# output fed back in, say) gets them replaced, never duplicated.
VERDICT_FIELDS = frozenset(
    {"verdict", "e164", "checked_at", "reason", "detail", "original_channel", "source"}
    | PROVENANCE_FIELDS
)

_KNOWN_CHANNELS = frozenset(CHANNELS)
_CHANNEL_NAMES = {name: name for name in CHANNELS}


@dataclass(slots=True)
class Parsed:
    """The parts of a valid message the filter needs."""

    id: str
    channel: str
    e164: str
    fallback: tuple[str, ...]
    # The number's digits as an int: the compact key the filter's status table uses (E.164
    # never starts with a 0 after the "+", so nothing is lost).
    key: int


@dataclass(slots=True)
class Invalid:
    """Why a message cannot be used; ``reason`` is one of the contract's stable codes."""

    reason: str
    detail: str


def channel_of(message: Any) -> str:
    """The message's channel in lower case if it is a known one, else ``"unknown"``.

    Used for the per-channel counts of the summary, which must not grow with junk input.
    """
    if isinstance(message, dict):
        channel = message.get("channel")
        if isinstance(channel, str) and channel.lower() in _KNOWN_CHANNELS:
            return channel.lower()
    return "unknown"


# Campaigns repeat numbers, and a run reads each message more than once: remembering the last
# fifty thousand (channel, to, region, fallback) answers makes the second read nearly
# free. Bounded, so a campaign of a million distinct numbers does not keep them all.
_ROUTES_MEMO_LIMIT = 50_000
_routes: dict[tuple[Any, ...], tuple[str, str, tuple[str, ...], int] | Invalid] = {}
# A memo that fills up while it is seldom read is a campaign of distinct numbers, which it
# only slows down (storing an answer costs a quarter of a parse): it then rests, remembering
# nothing for seven times as many messages, and fills again after (so at most an eighth of
# such a campaign pays for the memo). Counts shared by threads may race; a
# lost count only moves when the memo rests, never what a parse answers.
_memo_hits = 0  # since the memo was last cleared
_memo_resting = 0  # answers still not to remember


def parse_message(message: Any) -> Parsed | Invalid:
    """Validate one decoded message. Never raises: bad input is an :class:`Invalid`."""
    if not isinstance(message, dict):
        return Invalid(
            "malformed_line", f"a message is a JSON object, not {type(message).__name__}"
        )
    get = message.get
    return parse_fields(get("id"), get("channel"), get("to"), get("region"), get("fallback"))


def parse_fields(
    message_id: Any, channel: Any, to: Any, region: Any, fallback: Any
) -> Parsed | Invalid:
    """:func:`parse_message` of a message with these fields (``None`` for a missing one), for
    a caller that has read them already."""
    global _memo_hits, _memo_resting
    memo_key: tuple[Any, ...] | None = None
    route: tuple[str, str, tuple[str, ...], int] | Invalid | None = None
    if _memo_resting:  # the memo is empty: no key to make, nothing to look up
        _memo_resting -= 1
    else:
        try:
            # Equal keys must mean equal answers: a tuple equals the list it came from, but
            # only a list is a valid fallback (and 1 == True == 1.0, their details differ).
            if type(to) is not str or (fallback is not None and type(fallback) is not list):
                raise TypeError
            memo_key = (channel, to, region, None if fallback is None else tuple(fallback))
            route = _routes.get(memo_key)
            if route is not None:
                _memo_hits += 1
        except TypeError:  # unhashable or odd values: nothing to remember, just parse
            memo_key, route = None, None
    if type(message_id) is not str or not message_id or route is None:
        problem = _missing_field(message_id, channel, to)
        if problem is not None:
            return problem
        if route is None:
            route = _route(channel, to, region, fallback)
            if memo_key is not None and _worth_remembering(route, to, region):
                _remember(memo_key, route)
    if isinstance(route, Invalid):
        return route
    return Parsed(cast(str, message_id), *route)  # a str: _missing_field checked it


def _remember(key: tuple[Any, ...], route: tuple[str, str, tuple[str, ...], int] | Invalid) -> None:
    global _memo_hits, _memo_resting
    if len(_routes) >= _ROUTES_MEMO_LIMIT:
        if _memo_hits * 8 < _ROUTES_MEMO_LIMIT:  # fewer hits than one in eight answers kept
            _memo_resting = 7 * _ROUTES_MEMO_LIMIT
        _routes.clear()
        _memo_hits = 0
        if _memo_resting:
            return
    _routes[key] = route


def _worth_remembering(route: Any, to: Any, region: Any) -> bool:
    """Whether a route may go into the memo: its key must be small, or a file of a few
    hundred junk lines of 1 MB each would be held in memory whole. A valid route's key is
    (known channels, a number of at most 100 characters, a 2-letter region); of the invalid
    ones only the bad numbers are worth remembering (a phonenumbers parse each), and only
    those whose text is as short."""
    if not isinstance(route, Invalid):
        return True
    return (
        route.reason == "invalid_number"
        and len(to) <= MAX_INPUT_LENGTH
        and (type(region) is not str or len(region) <= 8)
    )


def has_usable_id(message: Mapping[str, Any]) -> bool:
    """Whether the message's ``id`` can name its record: a non-empty string. A message without
    one is ``invalid`` (``missing_field``), and its record is named by its position instead
    (the line number in a file), so that a user can still find it."""
    message_id = message.get("id")
    return isinstance(message_id, str) and message_id != ""


def _missing_field(message_id: Any, channel: Any, to: Any) -> Invalid | None:
    for name, value in (("id", message_id), ("channel", channel), ("to", to)):
        if value is None:
            return Invalid("missing_field", f"the message has no {name!r}")
    if not isinstance(message_id, str) or not message_id:
        return Invalid("missing_field", "'id' must be a non-empty string")
    return None


def _route(
    channel: Any, to: Any, region: Any, fallback: Any
) -> tuple[str, str, tuple[str, ...], int] | Invalid:
    """Channel, E.164 number and fallback channels of a message, or why they are unusable."""
    if not isinstance(channel, str):
        return Invalid("unknown_channel", "'channel' must be a string")
    lowered = channel.lower()
    # The one string of each channel: a route kept for a run holds no copy of its own.
    channel = _CHANNEL_NAMES.get(lowered)
    if channel is None:
        return Invalid("unknown_channel", f"unknown channel {lowered[:40]!r}")
    fallback_channels: tuple[str, ...] = ()
    if fallback is not None:
        if not isinstance(fallback, list):
            return Invalid("unknown_channel", "'fallback' must be a list of channel names")
        for item in fallback:
            if not isinstance(item, str) or item.lower() not in _KNOWN_CHANNELS:
                if isinstance(item, str):
                    return Invalid("unknown_channel", f"unknown fallback channel {item[:40]!r}")
                return Invalid(
                    "unknown_channel", f"a fallback channel is a string, not {_json_kind(item)}"
                )
        fallback_channels = tuple(_CHANNEL_NAMES[item.lower()] for item in fallback)
    if region is not None and not isinstance(region, str):
        return Invalid("invalid_number", "'region' must be an ISO 3166 alpha-2 code")
    try:
        e164 = normalize(to, region)
    except InvalidNumber as exc:
        return Invalid("invalid_number", str(exc))
    return channel, e164, fallback_channels, int(e164[1:])


def _json_kind(value: Any) -> str:
    # Named as JSON names it: a big integer may decode as a float with one parser and an int
    # with another, and the same line must get the same detail on every path.
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return "a value of another kind"
