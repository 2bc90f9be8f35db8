"""JSON Lines: reading an input line, the output line that carries its verdict, and the plan
that lets the filter read a file several times while decoding most lines only once.

The filter reads its input more than once (see :mod:`blockfilter.engine`). Decoding a line is
most of what a pass costs, so the first pass writes down, for every line, what it found: a
*route* number for the usual line (a JSON object whose channel, number, region and fallback
list are those of an earlier line), or "blank", or "look again" for anything unusual. The
verdict pass then splices a route's verdict onto the line's own bytes without decoding it.
Past a number of routes, a valid line is coded by its channels alone and its number kept in
8 bytes beside the codes (a *compact* line): a campaign of a million distinct numbers is not
decoded twice either.
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from functools import partial
from itertools import chain, count, repeat
from types import MappingProxyType
from typing import IO, Any, Final, TypeVar

import orjson

from ..errors import InputChanged
from ..model import VERDICT_FIELDS, Invalid, Parsed, parse_fields, parse_message

MAX_LINE_BYTES = 1 << 20  # a message is small; a bigger line is malformed, not a memory hazard

_BOM = b"\xef\xbb\xbf"


def strip_bom(line: bytes) -> bytes:
    """The first line without a UTF-8 byte order mark: spreadsheet exports ("CSV UTF-8",
    "Unicode text") start with one, and it is not part of the JSON."""
    return line[3:] if line.startswith(_BOM) else line


class MalformedLine(dict):  # type: ignore[type-arg]
    """Stands in for a line that is not a JSON object: its record is ``{"id": "<line>"}``."""

    def __init__(self, line_number: int) -> None:
        super().__init__(id=str(line_number))


def decode_line(line: bytes, line_number: int) -> tuple[Any, Parsed | Invalid] | None:
    """Decode one input line; ``None`` for a blank line."""
    if len(line) > MAX_LINE_BYTES:
        return MalformedLine(line_number), Invalid(
            "malformed_line", f"line {line_number} is longer than {MAX_LINE_BYTES} bytes"
        )
    try:
        message = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        if not line.strip():
            return None
        return MalformedLine(line_number), Invalid(
            "malformed_line", f"line {line_number} is not JSON: {str(exc)[:120]}"
        )
    if type(message) is not dict:
        return MalformedLine(line_number), Invalid(
            "malformed_line", f"line {line_number} is not a JSON object"
        )
    if repeats_a_key(line, message):
        return MalformedLine(line_number), repeated_key(line_number)
    return message, parse_message(message)


def repeated_key(line_number: int) -> Invalid:
    """Why a line that repeats a key is malformed: see :func:`repeats_a_key`."""
    return Invalid("malformed_line", f"line {line_number} repeats a key")


def repeats_a_key(line: bytes, message: dict[str, Any]) -> bool:
    """Whether some object of ``line`` (``message`` is what orjson made of it) has a key twice.

    orjson keeps the last of two equal keys, other parsers the first: a line that repeats
    ``channel`` would be checked on one channel and sent on another. Exact, and cheap on the
    usual line, because every key written in the line is followed by a colon: the colons of
    the line are its keys (repeats too) plus the colons inside its strings, while
    ``orjson.dumps(message)`` has one colon a key it kept plus the same colons in strings.
    The counts are equal only when nothing was dropped; a line they cannot settle (a colon
    written ``\\u003a``, nesting deeper than orjson writes) gets the standard library's look
    at every object's keys.
    """
    colons = line.count(b":")
    if colons == len(message):  # a colon a top-level key and none anywhere else
        return False
    return _repeats_past_the_top(line, message, colons)


def _repeats_past_the_top(line: bytes, message: dict[str, Any], colons: int) -> bool:
    """:func:`repeats_a_key` for a line of ``colons`` colons, more than ``message`` has keys."""
    # The keys kept at the top and one level down: at most the keys written, which are at
    # most the colons. Equal counts settle it without encoding the message again (objects
    # deeper down, or colons inside strings, leave the counts apart: the look below).
    kept = len(message)
    for value in message.values():
        if type(value) is dict:
            kept += len(value)
    if colons == kept:
        return False
    if b"\\u003" not in line:  # so each string has the colons it is written with
        try:
            if colons == orjson.dumps(message).count(b":"):
                return False
        except orjson.JSONEncodeError:  # nested deeper than orjson writes
            pass
    return text_repeats_a_key(line)


class _RepeatedKey(Exception):
    pass


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    decoded = dict(pairs)
    if len(decoded) != len(pairs):
        raise _RepeatedKey
    return decoded


def text_repeats_a_key(text: bytes | str) -> bool:
    """Whether some object of the JSON ``text`` has a key twice, by the standard library's
    look at every object's keys (slow and exact). Text it cannot read counts as repeating:
    it is not a message every parser reads the same way."""
    loads = partial(json.loads, object_pairs_hook=_no_repeated_keys)
    try:
        _with_room_to_recurse(loads, text.decode() if isinstance(text, bytes) else text)
    except _RepeatedKey:
        return True
    except ValueError:  # not UTF-8, or not JSON to the standard library
        return True
    return False


_BLOCK_BYTES = 1 << 20


def file_lines(handle: IO[bytes]) -> Iterator[bytes]:
    """The lines of a binary file, each at most ``MAX_LINE_BYTES`` + a block long: a longer
    line is cut short to ``MAX_LINE_BYTES + 1`` bytes (malformed whatever it holds, so only
    its length matters; reading a 1 GB line whole would cost 1 GB of memory).

    Blocks of whole lines are split in C: a ``readline`` call a line is a good share of
    the time a pass takes.
    """
    return lines_of(line_blocks(handle))


def lines_of(blocks: Iterable[bytes]) -> Iterator[bytes]:
    """The lines of ``blocks`` of whole lines, split in C: a reader that must look at its
    file between blocks (:func:`line_blocks`) does it without a generator's step a line."""
    return chain.from_iterable(map(io.BytesIO, blocks))


def line_blocks(handle: IO[bytes]) -> Iterator[bytes]:
    """The content of ``handle`` in blocks of whole lines; a line cut short comes as a block
    of its own."""
    pending = b""  # the start of a line whose end has not been read yet
    skipping = False  # in the rest of a long line that was cut short
    while True:
        block = handle.read(_BLOCK_BYTES)
        if not block:
            if pending:
                yield pending  # the last line, without a newline
            return
        if skipping:
            end = block.find(b"\n")
            if end < 0:
                continue
            block, skipping = block[end + 1 :], False
        data = pending + block if pending else block
        cut = data.rfind(b"\n") + 1
        if cut:
            yield data[:cut]  # its lines are at most MAX_LINE_BYTES + a block long
            data = data[cut:]
        if len(data) > MAX_LINE_BYTES:
            yield data[: MAX_LINE_BYTES + 1]
            pending, skipping = b"", True
        else:
            pending = data


def read_pass(open_lines: Callable[[], Iterable[bytes]]) -> Iterator[bytes]:
    """The lines of one pass over the input, with any byte order mark taken off the first."""
    lines = iter(open_lines())
    first = next(lines, None)
    return chain(() if first is None else (strip_bom(first),), lines)


def decode_again(line: bytes, line_number: int) -> tuple[Any, Parsed | Invalid]:
    """Decode a line a later pass knows is not blank."""
    decoded = decode_line(line, line_number)
    if decoded is None:
        raise InputChanged("the input changed while it was being filtered")
    return decoded


def render_line(
    line: bytes, message: dict[str, Any], fields: dict[str, Any], encoded: bytes | None = None
) -> bytes:
    """The output line: the input's own bytes with the verdict fields appended.

    Splicing instead of re-encoding keeps every field exactly as given (big integers, number
    spelling, unicode escapes) and is faster. When a field must be *replaced* (a reroute
    changes ``channel``; an unusable ``id`` gives way to the line number; an input that
    already has verdict fields), the line is re-encoded with the standard library, which
    keeps integers of any size. ``encoded`` is ``orjson.dumps(fields)[1:]`` when the caller
    has it already.
    """
    if type(message) is MalformedLine:
        return orjson.dumps({**message, **fields}) + b"\n"
    if (
        "original_channel" not in fields  # a reroute replaces the channel
        and ("id" not in fields or "id" not in message)  # an unusable id is replaced
        and VERDICT_FIELDS.isdisjoint(message)
    ):
        if encoded is None:
            encoded = orjson.dumps(fields)[1:]
        return splice(line, encoded)
    return reencode(line, fields)


def reencode(line: bytes, fields: dict[str, Any]) -> bytes:
    """``line`` with ``fields`` set, replacing any of the same name: decoded and encoded
    again with the standard library, which keeps integers of any size."""
    return _with_room_to_recurse(_reencode, line, fields)


# What may come right before an object's closing brace when it holds no field: the usual
# path would put a comma after the opening brace.
_NO_VALUE_BEFORE = frozenset({b"{", b" ", b"\t", b"\r", b"\n", b""})


def splice(line: bytes, encoded: bytes) -> bytes:
    """``line`` (a JSON object, maybe an empty one) with ``encoded`` (verdict fields as JSON,
    without the opening brace) appended before its closing brace."""
    if line.endswith(b"}\n") and line[-3:-2] not in _NO_VALUE_BEFORE:
        return line[:-2] + b"," + encoded + b"\n"  # the usual line: a value, then "}"
    head = line.rstrip()[:-1].rstrip()  # orjson took it as an object: it ends with "}"
    separator = b"" if head.endswith(b"{") else b","
    return head + separator + encoded + b"\n"


def load_record(line: bytes) -> Any:
    """Decode an output line with the standard library (integers of any size), however
    deep it nests: the input was accepted by orjson, so at most 1024 levels."""
    return _with_room_to_recurse(json.loads, line)


_ORJSON_MAX_DEPTH = 1024
_T = TypeVar("_T")


def _with_room_to_recurse(call: Callable[..., _T], *args: Any) -> _T:
    try:
        return call(*args)
    except RecursionError:
        # orjson took the line, so it nests at most 1024 deep; the standard library needs a
        # deeper recursion limit than the default for that. Raised for this one call only.
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(limit + 4 * _ORJSON_MAX_DEPTH)
        try:
            return call(*args)
        finally:
            sys.setrecursionlimit(limit)


def _reencode(line: bytes, fields: dict[str, Any]) -> bytes:
    original = json.loads(line)
    for name in VERDICT_FIELDS:
        original.pop(name, None)
    original.update(fields)
    return json.dumps(original, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


# -- the plan of a file ----------------------------------------------------------------------

#: A line's code in the plan: a route number (>= 0), or one of these.
BLANK: Final = -2
LOOK_AGAIN: Final = -1
PAST_END: Final = -3  # a later pass read more lines than the first

# Distinct routes a plan numbers; later new ones are looked at again like unusual lines. A
# route costs some 280 bytes for the run, so the routes stay under about 18 MB on a campaign
# of a million distinct numbers (each a route of one line, worth nothing kept), while
# campaigns of fewer (most) are all routed.
ROUTE_LIMIT = 1 << 16

# Past the route limit, when verdicts are shared, a valid message's line is coded by its
# *group* (channel and fallback channels: the same for most of a campaign) and its number
# goes to a spooled array beside the codes (8 bytes a line, on disk past a MB): the verdict
# pass then needs neither a route object nor a second decode. Group g is the code COMPACT - g.
COMPACT: Final = -16
GROUP_LIMIT = 256  # more distinct groups than this (junk, really) are looked at again

#: What a message-independent fallback policy is shown in place of a message: the routes'
#: candidates of the fallback rounds, and the messages a reader process read.
NO_MESSAGE: Final[Mapping[str, Any]] = MappingProxyType({})

#: What :meth:`LinePlan.read_lines` yields now and then while it codes lines of known routes
#: (no new message among them): a moment for the resolver to hand over the numbers it holds.
#: A campaign that repeats its numbers sees them all early; without it their last full
#: requests would leave only when the pass ends.
STILL_READING: Final = (None, None)
# Known-route lines between two of them: some 8 ms of reading.
_STILL_READING_EVERY: Final = 4096


class DuplicateIds:
    """Finds repeated ids with 8 bytes a message instead of a set of every id.

    The first pass records each id's hash; hashes seen twice are *suspects*, and only ids with
    a suspect hash are remembered (exactly) in later passes, so a hash collision can never turn
    a unique id into a duplicate.
    """

    # Up to this many hashes are sorted at once. ``sorted()`` makes a list of an int object a
    # hash (some 40 bytes each, five times the array): past it, the hashes are first split by
    # their low bits (equal hashes land together) and each share is sorted on its own.
    SORT_AT_ONCE = 1 << 18
    _SHARES = 64  # a power of two
    _SLICE = 1 << 14

    def __init__(self) -> None:
        # hash(id) of every valid message, appended to by the first pass.
        self.first_pass_hashes = array("q")
        self._suspects: frozenset[int] = frozenset()

    def close_first_pass(self) -> None:
        hashes = self.first_pass_hashes
        shares = [hashes] if len(hashes) <= self.SORT_AT_ONCE else self._split(hashes)
        suspects: set[int] = set()
        for share in shares:
            if len(set(share)) == len(share):
                # No hash twice (the usual campaign): a set is made in a third of the time
                # sorted() takes, and then there is nothing to look for.
                del share[:]
                continue
            ordered = sorted(share)
            del share[:]
            suspects.update(
                ordered[i] for i in range(1, len(ordered)) if ordered[i] == ordered[i - 1]
            )
        self._suspects = frozenset(suspects)

    def _split(self, hashes: array[int]) -> list[array[int]]:
        """``hashes`` split by their low bits, emptying ``hashes`` from its end as the shares
        fill, so that the hashes are held about once while they move."""
        shares = [array("q") for _ in range(self._SHARES)]
        appends = [share.append for share in shares]
        mask = self._SHARES - 1
        while hashes:
            tail = hashes[-self._SLICE :]
            del hashes[-self._SLICE :]
            for value in tail:
                appends[value & mask](value)
        return shares

    @property
    def suspects(self) -> frozenset[int]:
        """The hashes seen twice in the first pass (once :meth:`close_first_pass` ran)."""
        return self._suspects

    def adopt(self, suspects: frozenset[int]) -> None:
        """Take ``suspects`` as what another process's first pass found."""
        del self.first_pass_hashes[:]
        self._suspects = suspects

    def pass_checker(self) -> Callable[[str], bool] | None:
        """A fresh ``is_duplicate(id)`` for one pass over the messages, in input order;
        ``None`` when no id can be a repeat (the common case: nothing to ask per message)."""
        suspects = self._suspects
        if not suspects:
            return None
        seen: set[str] = set()

        def is_duplicate(message_id: str) -> bool:
            if hash(message_id) not in suspects:
                return False
            if message_id in seen:
                return True
            seen.add(message_id)
            return False

        return is_duplicate


class LinePlan:
    """What the first pass learnt about each line of a file, for the passes after it.

    Routes are numbered by the fields a verdict depends on (channel, to, region, fallback).
    A line gets a route only when its verdict can be spliced onto its own bytes: a JSON
    object with a valid ``id``, a valid number and no verdict fields of its own.

    With ``share_verdicts`` (the fallback policy looks only at the parsed message), all lines
    of a route share one verdict, and only a route's first line is worth showing the resolver.

    The codes (one int32 a line) go to a temporary file once past a MB: memory follows
    the distinct routes, not the messages.
    """

    _CHUNK = 1 << 16

    def __init__(self, *, share_verdicts: bool) -> None:
        self.share_verdicts = share_verdicts
        self.routes: list[Parsed] = []
        # (channel, region, fallback) as given -> {to: route}
        self._route_ids: dict[tuple[Any, ...], dict[str, int]] = {}
        self._codes = array("i")
        # Open as long as the plan; close() closes it.
        self._spool = _new_spool()
        self.ids = DuplicateIds()
        self._id_hashes = self.ids.first_pass_hashes
        self.line_count = 0  # known once the first pass is over
        # Valid messages on lines coded LOOK_AGAIN: a later pass must decode those lines.
        self.valid_unrouted = 0
        # The (channel, fallback) of each group of compact lines, and their numbers' keys.
        self.groups: list[tuple[str, tuple[str, ...]]] = []
        self._group_ids: dict[tuple[str, tuple[str, ...]], int] = {}
        self._keys = array("q")
        self._key_spool = _new_spool()

    def read(self, line: bytes, line_number: int) -> tuple[Any, Parsed | Invalid] | None:
        """Decode and code one line (the first pass, in order).

        :returns: the message and its parse for the resolver, or ``None`` when the line has
            nothing new for it: a blank line, or another line of a known route when routes
            share verdicts.
        """
        self._spill_codes()
        message: Any = None
        if len(line) <= MAX_LINE_BYTES:
            try:  # noqa: SIM105 (contextlib.suppress costs more than the decode, here)
                message = orjson.loads(line)
            except orjson.JSONDecodeError:
                pass
        return self._read_decoded(line, line_number, message)

    def read_lines(
        self, lines: Iterable[bytes], first_line_number: int = 1
    ) -> Iterator[tuple[Any, Parsed | Invalid] | tuple[None, None]]:
        """:meth:`read` of every line of the first pass (numbered from ``first_line_number``:
        1 unless the pass goes on where another call left it), yielding what is not ``None``,
        and :data:`STILL_READING` now and then among lines of known routes.

        The usual line of a campaign that repeats its numbers (another line of a known route,
        routes sharing verdicts) is coded in the loop itself: at 2 us a line, the calls and
        attribute lookups of :meth:`read` cost as much as the decoding. Any other line goes
        on to :meth:`_read_decoded`, which reads it as :meth:`read` does.
        """
        if not self.share_verdicts:  # each line is shown to the resolver: nothing to skip
            read = self.read
            for line_number, line in enumerate(lines, first_line_number):
                item = read(line, line_number)
                if item is not None:
                    yield item
            return
        loads, not_json = orjson.loads, orjson.JSONDecodeError
        no_verdict_fields = VERDICT_FIELDS.isdisjoint
        route_ids = self._route_ids
        hash_id = self._id_hashes.append
        codes = self._codes
        chunk = self._CHUNK
        every = _STILL_READING_EVERY - 1  # a power of two, less one: a mask
        for line_number, line in enumerate(lines, first_line_number):
            if len(codes) >= chunk:
                codes = self._spill_codes()
            message: Any = None
            if len(line) <= MAX_LINE_BYTES:
                try:  # noqa: SIM105 (contextlib.suppress costs more than the decode, here)
                    message = loads(line)
                except not_json:
                    pass
            if type(message) is dict and no_verdict_fields(message):
                # repeats_a_key's cheap counts: the keys at the top, then one level down;
                # a line they cannot settle goes the long way.
                colons = line.count(b":")
                kept = len(message)
                if colons != kept:
                    for value in message.values():
                        if type(value) is dict:
                            kept += len(value)
                get = message.get
                message_id, to, fallback = get("id"), get("to"), get("fallback")
                if (
                    colons == kept
                    and type(message_id) is str
                    and message_id
                    and type(to) is str
                    and (fallback is None or type(fallback) is list)
                ):
                    try:  # the key of _read_object, which numbers the routes
                        group = route_ids.get(
                            (
                                get("channel"),
                                get("region"),
                                None if fallback is None else tuple(fallback),
                            )
                        )
                    except TypeError:  # an unhashable value somewhere: not a route
                        group = None
                    route = None if group is None else group.get(to)
                    if route is not None:
                        codes.append(route)
                        hash_id(hash(message_id))
                        if not line_number & every:
                            yield STILL_READING
                        continue
            item = self._read_decoded(line, line_number, message)
            codes = self._codes
            if item is not None:
                yield item

    def _spill_codes(self) -> array[int]:
        """The codes array to append to, the full one written to the spool first."""
        self._codes = _spilled(self._spool, self._codes)
        return self._codes

    def _read_decoded(
        self, line: bytes, line_number: int, message: Any
    ) -> tuple[Any, Parsed | Invalid] | None:
        """:meth:`read` of a line orjson made ``message`` of (``None`` if it could not)."""
        codes = self._codes
        if type(message) is dict:
            # A flat line settles it here, without a call: see repeats_a_key.
            colons = line.count(b":")
            if colons != len(message) and _repeats_past_the_top(line, message, colons):
                return MalformedLine(line_number), self._unrouted(repeated_key(line_number))
            return self._read_object(message)
        decoded = decode_line(line, line_number)  # blank, not JSON, too long, or not an object
        if decoded is None:
            codes.append(BLANK)
            return None
        return decoded[0], self._unrouted(decoded[1])

    def _read_object(self, message: dict[str, Any]) -> tuple[Any, Parsed | Invalid] | None:
        codes = self._codes
        if VERDICT_FIELDS.isdisjoint(message):
            get = message.get
            message_id, to, fallback = get("id"), get("to"), get("fallback")
            # parse_message's memo makes the same type tests: equal keys, equal answers.
            if (
                type(message_id) is str
                and message_id
                and type(to) is str
                and (fallback is None or type(fallback) is list)
            ):
                channel, region = get("channel"), get("region")
                try:
                    # Routes grouped by all but their number: a route then costs a dict
                    # entry keyed by its `to`, not a tuple of its own as well.
                    key: Any = (channel, region, None if fallback is None else tuple(fallback))
                    group = self._route_ids.get(key)
                    route = None if group is None else group.get(to)
                except TypeError:  # an unhashable value somewhere: not a route
                    key, route = None, None
                if route is not None:
                    codes.append(route)
                    self._id_hashes.append(hash(message_id))
                    if self.share_verdicts:
                        return None
                    return message, replace(self.routes[route], id=message_id)
                parsed = parse_fields(message_id, channel, to, region, fallback)
                if key is not None and type(parsed) is Parsed and len(self.routes) < ROUTE_LIMIT:
                    if parsed.e164 == to:  # one string for both, kept for the run
                        parsed = Parsed(message_id, parsed.channel, to, parsed.fallback, parsed.key)
                    self._route_ids.setdefault(key, {})[to] = len(self.routes)
                    codes.append(len(self.routes))
                    self.routes.append(parsed)
                    self._id_hashes.append(hash(message_id))
                    return message, parsed
                if type(parsed) is Parsed and self.share_verdicts:
                    code = self._compact(parsed)
                    if code is not None:
                        codes.append(code)
                        self._id_hashes.append(hash(message_id))
                        return message, parsed
                return message, self._unrouted(parsed)
        return message, self._unrouted(parse_message(message))

    def _compact(self, parsed: Parsed) -> int | None:
        """The code of a compact line for ``parsed`` (its key written down); ``None`` when
        there are groups enough already."""
        group = (parsed.channel, parsed.fallback)
        index = self._group_ids.get(group)
        if index is None:
            if len(self.groups) >= GROUP_LIMIT:
                return None
            index = self._group_ids[group] = len(self.groups)
            self.groups.append(group)
        self._keys = _spilled(self._key_spool, self._keys)
        self._keys.append(parsed.key)
        return COMPACT - index

    def _unrouted(self, parsed: Parsed | Invalid) -> Parsed | Invalid:
        self._codes.append(LOOK_AGAIN)
        if type(parsed) is Parsed:
            self.valid_unrouted += 1
            self._id_hashes.append(hash(parsed.id))
        return parsed

    def finish_first_pass(self) -> None:
        self.line_count = self._spool.tell() // self._codes.itemsize + len(self._codes)
        self.ids.close_first_pass()
        self._route_ids.clear()  # only the first pass numbers routes
        self._group_ids.clear()

    # -- a first pass read by another process (see blockfilter.engine.reader) ------------

    def before_fork(self) -> None:
        """Write out what the spools hold in their buffers: a spool on disk shares its file
        (and its offset) with a forked process, and a buffer flushed by each would be
        written twice, wherever the other left the offset."""
        self._spool.flush()
        self._key_spool.flush()

    def own_spools(self) -> None:
        """Give the plan spools of its own, holding what its spools hold: a forked process
        then never writes to a file its parent may hold too (the parent, for its part, lets
        go of the spools it forked with: :meth:`start_adopting`)."""
        for name in ("_spool", "_key_spool"):
            old = getattr(self, name)
            old.seek(0)
            new = _new_spool()
            new.write(old.read())
            setattr(self, name, new)  # the old one is left open: closing is the parent's

    def first_pass_state(self) -> FirstPassState:
        """What :meth:`finish_first_pass` left that the later passes read, but the routes
        (the process that adopts it has them already, one at a time) and the codes and keys
        (:meth:`spooled_chunks`)."""
        return FirstPassState(
            line_count=self.line_count,
            valid_unrouted=self.valid_unrouted,
            groups=list(self.groups),
            suspects=self.ids.suspects,
        )

    def spooled_chunks(self) -> Iterator[tuple[bool, bytes]]:
        """The codes, then the compact keys, a chunk at a time: ``(is_code, bytes)``. A chunk
        is a spool's share at a time, so a million lines are never all in memory at once."""
        for chunk in self._code_chunks():
            yield True, chunk.tobytes()
        for chunk in _chunks(self._key_spool, self._keys):
            yield False, chunk.tobytes()

    def start_adopting(self) -> None:
        """Forget the codes and keys of the first pass so far: another process's come next
        (:meth:`adopt_chunk`), every line's from the first. The spools are new ones: a
        spool on disk shares its file offset with the forked process that copies it."""
        self._spool.close()
        self._key_spool.close()
        self._spool, self._key_spool = _new_spool(), _new_spool()
        self._codes = array("i")
        self._keys = array("q")

    def adopt_chunk(self, is_code: bool, data: bytes) -> None:
        """Append a chunk of :meth:`spooled_chunks` of another process's plan."""
        (self._spool if is_code else self._key_spool).write(data)

    def adopt_first_pass(self, state: FirstPassState) -> None:
        """Take ``state`` for this plan's first pass, as if this plan had read it (its codes
        and keys adopted already)."""
        self.line_count = state.line_count
        self.valid_unrouted = state.valid_unrouted
        self.groups = list(state.groups)
        self.ids.adopt(state.suspects)
        self._route_ids.clear()
        self._group_ids.clear()

    def lines(self, lines: Iterable[bytes]) -> Iterator[tuple[int, bytes, int]]:
        """``(line number, line, code)`` for each line of ``lines``, the input read again.

        A line past the plan's last has the code :data:`PAST_END`: a caller that meets it,
        or that got fewer lines than :attr:`line_count`, must raise :class:`InputChanged`.
        """
        codes = chain.from_iterable(self._code_chunks())
        return zip(count(1), lines, chain(codes, repeat(PAST_END)))

    def check_line_count(self, lines_read: int) -> None:
        """Raise :class:`InputChanged` if a later pass read another number of lines."""
        if lines_read != self.line_count:
            raise InputChanged(
                f"the input changed while it was being filtered: {self.line_count} lines "
                f"at first, {lines_read} lines later"
            )

    def compact_keys(self) -> Iterator[int]:
        """The keys of the compact lines, in order: a pass takes the next one at each line
        whose code is a group's (``code <= COMPACT``)."""
        return chain.from_iterable(_chunks(self._key_spool, self._keys))

    def compact_routes(self) -> Iterator[Parsed]:
        """A route for each compact line, in order (without its message's id: they stand for
        their lines only where a message-independent fallback policy looks at them)."""
        groups = self.groups
        keys = self.compact_keys()
        for chunk in self._code_chunks():
            for code in chunk:
                if code <= COMPACT:
                    channel, fallback = groups[COMPACT - code]
                    key = next(keys)
                    yield Parsed("", channel, f"+{key}", fallback, key)

    def _code_chunks(self) -> Iterator[array[int]]:
        return _chunks(self._spool, self._codes)

    def close(self) -> None:
        self._spool.close()
        self._key_spool.close()


@dataclass(frozen=True)
class FirstPassState:
    """A finished first pass, as :meth:`LinePlan.first_pass_state` gives it away."""

    line_count: int
    valid_unrouted: int
    groups: list[tuple[str, tuple[str, ...]]]
    suspects: frozenset[int]  # hashes of ids seen twice: see DuplicateIds


def _new_spool() -> IO[bytes]:
    """A temporary file for codes or keys, in memory up to a MB (closed by its plan)."""
    return tempfile.SpooledTemporaryFile(max_size=1 << 20, prefix="blockfilter-")  # noqa: SIM115


def _spilled(spool: IO[bytes], values: array[int]) -> array[int]:
    """``values``, or a new empty array of its type once it is full and written to ``spool``."""
    if len(values) < LinePlan._CHUNK:
        return values
    spool.write(values.tobytes())
    return array(values.typecode)


def _chunks(spool: IO[bytes], tail: array[int]) -> Iterator[array[int]]:
    """What was written to ``spool``, in arrays of ``tail``'s type, then ``tail`` itself."""
    spool.seek(0)
    while True:
        data = spool.read(LinePlan._CHUNK * tail.itemsize)
        if not data:
            break
        chunk = array(tail.typecode)
        chunk.frombytes(data)
        yield chunk
    yield tail
