"""Verdicts encoded once for many numbers: the verdict pass of a campaign to a number each.

Every number of one answer shares its status (see :mod:`~blockfilter.engine.table`), and the
verdict fields of an allowed or unchecked message differ from number to number only by its
``e164``. So for each (channel, status) the fields are encoded once, with a placeholder for the
number, and a line's output is its own bytes, that encoding and its number spliced in: no
verdict dict, no encoding, no route object a line. A blocklisted number's verdict depends on
its fallbacks: those lines take the usual way (:meth:`NumberTemplates.render` says no).
"""

from __future__ import annotations

from typing import Any

import orjson

from ..model import Parsed
from .lines import splice
from .summary import Summary
from .table import FAILED, FAILED_CHECK, StatusTable
from .verdicts import Verdicts

# Stands for the number while the fields are encoded: no E.164 number starts with a 0.
_PLACEHOLDER = "+0"
_ENCODED_PLACEHOLDER = orjson.dumps(_PLACEHOLDER)
_UNASKED = (FAILED, FAILED_CHECK)  # a number no source answered: unchecked, as the verdicts say


class _Template:
    __slots__ = ("head", "tail", "count_key", "lines")

    def __init__(self, head: bytes, tail: bytes, count_key: tuple[str, str, Any]) -> None:
        self.head = head  # the fields up to the number's digits, after its "+"
        self.tail = tail  # from the number's closing quote to the closing brace and newline
        self.count_key = count_key
        self.lines = 0


class NumberTemplates:
    """The verdicts of one pass's lines that a route does not share (``render``), counted
    into the summary at the end (``count``)."""

    def __init__(self, verdicts: Verdicts, table: StatusTable) -> None:
        self._verdicts = verdicts
        self._table = table
        # Per channel: a status's index -> its template, or None when a line of that status
        # must take the usual way.
        self._made: dict[str, dict[int, _Template | None]] = {}

    def render(self, line: bytes, channel: str, key: int) -> bytes | None:
        """``line`` (a routed line: a valid message without verdict fields, to the number
        ``key`` on ``channel``) with its verdict; ``None`` if it takes the usual way."""
        index = self._table.status_index(channel, key)
        made = self._made.get(channel)
        if made is None:
            made = self._made[channel] = {}
        template = made.get(index, _Template)  # the class: not made yet
        if template is _Template:
            template = made[index] = self._make(channel, index)
        if template is None:
            return None
        assert isinstance(template, _Template)
        template.lines += 1
        digits = b"%d" % key  # the number's E.164 form is "+" and these: see table._key
        if line.endswith(b"}\n"):  # a routed line has an id, so it is never "{}"
            return line[:-2] + template.head + digits + template.tail
        return splice(line, template.head[1:] + digits + template.tail[:-1])

    def count(self, summary: Summary) -> None:
        """Count every line rendered so far in ``summary``."""
        for made in self._made.values():
            for template in made.values():
                if template is not None and template.lines:
                    summary.counts[template.count_key] += template.lines
                    template.lines = 0

    def _make(self, channel: str, index: int) -> _Template | None:
        status = self._table.status_at(index) if index >= 0 else _UNASKED
        # The one verdict every message of this status gets on this channel, its number
        # left out (its fallbacks are not looked at: a blocklisted status has no template).
        settled = self._verdicts.settled(Parsed("", channel, _PLACEHOLDER, (), 0), status)
        if settled is None:
            return None
        fields, final = settled
        if final != channel or "original_channel" in fields or "id" in fields:
            return None  # a field of the line would be replaced: the usual way re-encodes
        encoded = orjson.dumps(fields)
        if encoded.count(_ENCODED_PLACEHOLDER) != 1:
            return None  # another field holds the placeholder's text: keep to the usual way
        head, tail = encoded[1:].split(_ENCODED_PLACEHOLDER)
        return _Template(
            b"," + head + b'"+',
            b'"' + tail + b"\n",
            (fields["verdict"], final, fields.get("source")),
        )
