"""The filter: messages in, exactly one verdict each out, in input order.

How a run goes (the same for the Python API, the command line and the Celery task):

1. **Plan**: read every message once, normalise its number, and collect the distinct
   (channel, number) pairs to look up.
2. **Check**: ask the sources (Kaleyra, through the cache, plus any a plugin adds) about every
   pair at once, so requests are full (100 numbers) and run concurrently.
3. **Fallbacks**: go over the messages again (over JSON Lines, over their distinct routes);
   for those blocklisted on their channel, collect the first fallback channel whose status is
   not known yet and check those in one more round (repeated only while a fallback was itself
   blocklisted).
4. **Verdicts**: read the messages a last time and give each its verdict.

Reading the input several times is what keeps memory in proportion to the distinct numbers
rather than to the messages: the command line re-reads its (spooled) file instead of holding it.
Over JSON Lines, the first pass also writes down what each line holds (a
:class:`~blockfilter.engine.lines.LinePlan`), so the later passes splice each verdict onto the
line's own bytes without decoding the line again.

This module orchestrates the passes; what it learns goes in the status table
(:mod:`~blockfilter.engine.table`), the verdicts are decided by
:mod:`~blockfilter.engine.verdicts`, and the counts kept by :mod:`~blockfilter.engine.summary`.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import chain
from typing import TYPE_CHECKING, Any, ClassVar

import orjson

from ..config import (
    CHANNELS,
    ON_ERROR_POLICIES,
    PARSER_PROCESS_CHOICES,
    Settings,
    load_settings,
)
from ..errors import CheckFailed, CredentialsRefused
from ..model import (
    VERDICT_FIELDS,
    Invalid,
    Parsed,
    channel_named,
    parse_message,
)
from ..numbers import normalize
from ..redact import guard_library_logs, mask_numbers_in
from ..sources import BaseSource, BlocklistSource, CheckOutcome, CheckStream, as_source
from .lines import (
    BLANK,
    COMPACT,
    NO_MESSAGE,
    PAST_END,
    LinePlan,
    MalformedLine,
    decode_again,
    decode_line,
    load_record,
    read_pass,
    reencode,
    render_line,
    splice,
)
from .summary import Summary
from .table import ASKED, BLOCKED, FAILED, StatusTable, _key
from .templates import NumberTemplates
from .verdicts import FallbackPolicy, Verdicts

if TYPE_CHECKING:
    import pluggy

log = logging.getLogger("blockfilter.engine")

# Distinct numbers handed to the sources at a time during the first pass: enough for a few
# full requests and one cache round trip, few enough that the first request leaves early.
_STREAM_CHUNK = 500
# The first hand-over is one full request's worth, so the first request leaves as soon as it
# is full; each later one doubles, up to _STREAM_CHUNK (a source sends full requests only, so
# the smaller hand-overs add no request).
_FIRST_CHUNK = 100

# Results shown to the blockfilter_verdicts observers at a time (as `blockfilter filter` did).
_OBSERVED_BATCH = 500


def message_independent(policy: FallbackPolicy) -> FallbackPolicy:
    """Mark a fallback policy whose answer depends only on the parsed message (its channel,
    number and ``fallback``), not on its other fields: the filter may then reuse one verdict
    for every message that shares those, instead of deciding each afresh."""
    policy.message_independent = True  # type: ignore[attr-defined]
    return policy


@message_independent
def default_fallback_policy(message: Mapping[str, Any], parsed: Parsed) -> Sequence[str]:
    """The message's own ``fallback`` list, in order."""
    return parsed.fallback


_DUPLICATE = Invalid("duplicate_id", "an earlier message in this run has the same id")
_NOT_AN_OBJECT = Invalid("malformed_line", "a message is a JSON object")

Replay = Callable[[], Iterator[tuple[Any, "Parsed | Invalid"]]]


class _Shared:
    """A verdict shared by every line of one route, encoded once."""

    __slots__ = ("count_key", "requested", "_fields", "tail")

    def __init__(self, fields: dict[str, Any], channel: str) -> None:
        self.count_key = (fields["verdict"], channel, fields.get("source"))
        self.requested: str | None = fields.get("original_channel")
        self._fields = fields
        #: What the usual line's closing brace and newline give way to; None when a field of
        #: the line must be replaced (a reroute changes the channel).
        self.tail = (
            None if "original_channel" in fields else b"," + orjson.dumps(fields)[1:] + b"\n"
        )

    def count(self, summary: Summary, lines: int) -> None:
        """Count ``lines`` lines of this verdict in ``summary``."""
        summary.counts[self.count_key] += lines
        if self.requested is not None:
            summary.reroutes[self.requested, self.count_key[1]] += lines

    def render(self, line: bytes) -> bytes:
        """``line``, a routed line (a valid message without verdict fields), with the verdict."""
        tail = self.tail
        if tail is None:
            return reencode(line, self._fields)
        if line.endswith(b"}\n"):  # it has an id: never "{}"
            return line[:-2] + tail
        return splice(line, tail[1:-1])


class Filter:
    """Runs messages through the blocklist check and gives each a verdict.

    >>> with Filter() as f:                                     # doctest: +SKIP
    ...     for result in f.run([{"id": "1", "channel": "sms", "to": "+918020000052"}]):
    ...         print(result["verdict"])

    By default the filter is the one ``blockfilter filter`` and the Celery tasks run: the
    installed plugins' (:func:`blockfilter.plugins.get_plugin_manager`) blocklist sources,
    Kaleyra's and the opt-out ledger's among them, their reroute policy
    (``blockfilter_fallback_channels``), and their observers (``blockfilter_verdicts``), shown
    every result of :meth:`run` and
    :meth:`run_lines`. It sends nothing: ``blockfilter_dispatch`` and ``blockfilter_suppressed``
    are the Celery tasks' to call.

    :param settings: the configuration; read from the environment when omitted.
    :param sources: blocklist sources to join, in place of the plugins': no plugin is consulted
        then (neither for sources, nor reroutes, nor observers).
    :param plugins: ``True`` (the default, unless ``sources`` is given): this process's plugin
        manager, built from ``settings``; a :class:`pluggy.PluginManager`: that one; ``False``:
        no plugin at all: Kaleyra (through the status cache, a source of this filter's own) and
        the opt-out ledger, and the message's own ``fallback`` list.
    :param on_error: ``defer``, ``allow`` or ``drop``; default ``settings.on_error``.
    :param max_requests: make at most this many API requests; defer what is left unchecked.
        Every source that makes requests gets this budget
        (:meth:`~blockfilter.sources.BaseSource.with_budget`): Kaleyra's, and any other that
        counts its own.
    :param fallback_policy: ``(message, parsed) -> channels`` to try, in order, when the
        message's channel is blocklisted; default: the plugins' ``blockfilter_fallback_channels``
        (without plugins: the message's ``fallback`` list).

    Sources are made on first use (so missing credentials surface then, clearly). The Kaleyra
    source the plugins give is shared by the filters of a process, like a worker's (its
    connections and ``memory://`` cache outlive the filter); :meth:`close` releases what this
    filter made for itself alone. After a run, :attr:`summary` holds its counts.

    :ivar plugin_manager: the plugin manager the filter consults; ``None`` without plugins.
    :raises PluginError: a plugin cannot be used
        (:func:`blockfilter.plugins.make_plugin_manager`).
    """

    # Whether run() and run_lines() show their results to the plugins' observers. Hosts that
    # hand results to the hooks themselves (the Celery tasks: final results only) turn it off.
    _calls_observers: ClassVar[bool] = True

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        sources: Sequence[BlocklistSource] | None = None,
        plugins: bool | pluggy.PluginManager | None = None,
        on_error: str | None = None,
        max_requests: int | None = None,
        fallback_policy: FallbackPolicy | None = None,
        progress: Callable[[str, int, int | None], None] | None = None,
    ) -> None:
        self.settings = settings or load_settings()
        # urllib3 logs every request's URL, numbers and all, at DEBUG: mask them (and the key)
        # in the records of the library's loggers whichever handler the host attaches.
        guard_library_logs(self.settings.api_key, self.settings.cache_secret)
        self.on_error = (on_error or self.settings.on_error).lower()
        if self.on_error not in ON_ERROR_POLICIES:
            raise ValueError(f"on_error must be defer, allow or drop, not {on_error!r}")
        if sources is not None and plugins not in (None, False):
            raise TypeError(
                "Filter() takes sources= or plugins=, not both: sources= replaces the plugins"
            )
        self.plugin_manager = (
            None if sources is not None or plugins is False else self._manager(plugins)
        )
        self._given_sources = list(sources) if sources is not None else None
        self._sources: list[BaseSource] | None = None
        self._owned: list[BaseSource] = []  # made for this filter alone, closed by close()
        self.max_requests = max_requests
        if fallback_policy is None:
            if self.plugin_manager is None:
                fallback_policy = default_fallback_policy
            else:
                from ..plugins.manager import make_fallback_policy

                fallback_policy = make_fallback_policy(self.plugin_manager)
        self.fallback_policy = fallback_policy
        self._progress = progress
        self.summary = Summary()
        #: The first refusal of the credentials or the account seen (``RBC001``...), if any:
        #: what a worker tells its operator (the summary only says that there was one).
        self.refusal: CredentialsRefused | None = None
        #: Distinct (channel, number) pairs handed to the sources so far: with the summary's
        #: ``cache_hits``, what the cache could not answer (the metrics' cache misses).
        self.numbers_looked_up = 0
        self._verdicts = Verdicts(self.on_error)

    # -- plugins and sources ---------------------------------------------------------------
    # blockfilter.plugins builds on this module (build_filter, PluginFilter): it is imported
    # inside the methods that need it, when a filter first does, never while a module loads.

    def _manager(self, plugins: bool | pluggy.PluginManager | None) -> pluggy.PluginManager:
        if plugins is None or plugins is True:
            from ..plugins.manager import get_plugin_manager

            return get_plugin_manager(self.settings)
        import pluggy

        if not isinstance(plugins, pluggy.PluginManager):
            raise TypeError(f"plugins must be True, False or a plugin manager, not {plugins!r}")
        return plugins

    @property
    def sources(self) -> list[BaseSource]:
        """The sources the filter joins, each adapted once to the whole protocol
        (:func:`~blockfilter.sources.as_source`): what they are is never asked again."""
        if self._sources is None:
            self._sources = self._budgeted([as_source(source) for source in self._made_sources()])
        return self._sources

    def _made_sources(self) -> Sequence[BlocklistSource | BaseSource]:
        # The plugins (or, without them, the built-ins) supply the sources: the engine knows
        # none of them by name.
        if self._given_sources is not None:
            return self._given_sources
        if self.plugin_manager is None:
            from ..plugins.builtin import sources_without_plugins

            sources, owned = sources_without_plugins(self.settings)
            self._owned.extend(owned)
            return sources
        from ..plugins.manager import sources_from_plugins

        return sources_from_plugins(self.plugin_manager, self.settings)

    def _budgeted(self, sources: list[BaseSource]) -> list[BaseSource]:
        """``sources`` with the request budget, if any: a source that counts its requests is
        replaced by a budgeted one of this filter's own."""
        if self.max_requests is None:
            return sources
        budgeted = []
        for source in sources:
            own = source.with_budget(self.max_requests)
            if own is not source:
                self._owned.append(own)
            budgeted.append(own)
        if all(own is source for own, source in zip(budgeted, sources, strict=True)):
            log.warning(
                "max_requests=%d: no blocklist source makes requests to count "
                "(is the built-in 'kaleyra' plugin disabled?)",
                self.max_requests,
            )
        return budgeted

    def close(self) -> None:
        """Release what the filter made for itself (thread pools, connections); the sources
        given to it and those the plugins share stay open."""
        owned, self._owned = self._owned, []
        for source in owned:
            source.close()

    def __enter__(self) -> Filter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _observer(self) -> Callable[[list[dict[str, Any]]], None] | None:
        """What shows results to the plugins' observers; ``None`` when nobody listens."""
        pm = self.plugin_manager
        if pm is None or not self._calls_observers:
            return None
        from ..plugins.manager import PluginHooks

        hooks = PluginHooks(pm)
        return hooks.verdicts if hooks.has_observers() else None

    # -- the public entry points -----------------------------------------------------------

    def run(self, messages: Iterable[Mapping[str, Any]]) -> Iterator[dict[str, Any]]:
        """Filter decoded messages; yields one new dict a message, in input order.

        The messages are held in memory for the run (the command line streams files instead).
        Each result is a copy of its message with the verdict fields added. With observers
        (``blockfilter_verdicts``), results are shown to them a batch at a time, each batch
        before it is yielded.
        """
        items: list[Any] = [
            # A dict is asked first: the Mapping check is an ABC's, several times slower.
            m if type(m) is dict or isinstance(m, Mapping) else MalformedLine(index)
            for index, m in enumerate(messages, 1)
        ]
        parsed: list[Parsed | Invalid] = [
            _NOT_AN_OBJECT if isinstance(m, MalformedLine) else parse_message(m) for m in items
        ]
        seen: set[str] = set()
        for index, p in enumerate(parsed):
            if isinstance(p, Parsed):
                if p.id in seen:
                    parsed[index] = _DUPLICATE
                else:
                    seen.add(p.id)
        del seen

        def replay() -> Iterator[tuple[Any, Parsed | Invalid]]:
            return zip(items, parsed, strict=True)

        started = time.monotonic()
        before = self._source_counters()
        table = self._resolve(replay(), replay, expected=len(items))
        observe = self._observer()
        batch: list[dict[str, Any]] = []
        for position, (message, p) in enumerate(replay(), 1):
            fields, channel = self._verdicts.verdict(
                message, p, table, self.fallback_policy, position
            )
            self.summary.count(
                fields["verdict"], channel, fields.get("source"), fields.get("original_channel")
            )
            if type(message) is dict and VERDICT_FIELDS.isdisjoint(message):
                result = message.copy()  # the usual message: copied in C
            else:
                result = {k: v for k, v in message.items() if k not in VERDICT_FIELDS}
            result.update(fields)
            if observe is None:
                yield result
                continue
            batch.append(result)
            if len(batch) >= _OBSERVED_BATCH:
                observe(batch)
                yield from batch
                batch = []
        if batch and observe is not None:
            observe(batch)
            yield from batch
        self._finish(before, started)

    def run_lines(
        self, open_lines: Callable[[], Iterable[bytes]], *, parser_process: str = "off"
    ) -> Iterator[bytes]:
        """Filter JSON Lines; yields one output line (bytes, ``\\n``-terminated) a message.

        ``open_lines`` is called once per pass and must give the same lines each time (a
        file opened anew, say). Blank lines are skipped; a line that is not a JSON object
        becomes an ``invalid`` record (``malformed_line``) whose ``id`` is its line number.
        Each message's own bytes are kept as they were; the verdict fields are appended.
        With observers, each batch of lines is decoded again for them before it is yielded.

        ``parser_process``: ``auto`` or ``always`` to read most of the first pass in a forked
        process, on the other core (:mod:`~blockfilter.engine.reader`; Linux, and a fallback
        policy that looks only at the parsed message): ``auto`` past the first 4,096 lines,
        ``always`` past the first. Only for lines that a forked copy of this process can go
        on reading (a file's, as ``blockfilter filter`` reads them), not a thread's.
        """
        if parser_process not in PARSER_PROCESS_CHOICES:
            raise ValueError(
                f"parser_process must be one of {', '.join(PARSER_PROCESS_CHOICES)}, "
                f"not {parser_process!r}"
            )
        # With a policy that looks only at the parsed message, every line of a route shares
        # one verdict: a route's later lines are then neither shown to _resolve nor decoded
        # again, and its verdict is decided and encoded once.
        share = getattr(self.fallback_policy, "message_independent", False)
        plan = LinePlan(share_verdicts=share)
        observe = self._observer()
        try:
            lines = self._run_planned(open_lines, plan, parser_process)
            yield from lines if observe is None else observed_lines(lines, observe)
        finally:
            plan.close()

    def _run_planned(
        self, open_lines: Callable[[], Iterable[bytes]], plan: LinePlan, parser_process: str
    ) -> Iterator[bytes]:
        def first_pass() -> Iterator[tuple[Any, Parsed | Invalid | None]]:
            if parser_process != "off" and plan.share_verdicts:
                # Imported here: a run that reads in one process (every Celery task) does
                # not load pickle and the rest at start-up.
                from . import reader

                if reader.forking_supported():
                    after = 1 if parser_process == "always" else reader.AUTO_AFTER_LINES
                    yield from reader.first_pass_in_child(
                        plan, read_pass(open_lines), after_lines=after
                    )
                    return
            yield from plan.read_lines(read_pass(open_lines))
            plan.finish_first_pass()

        def look_again(every_line: bool) -> Iterator[tuple[Any, Parsed | Invalid]]:
            """The messages decoded again: every one, or those of lines without a route."""
            is_duplicate = plan.ids.pass_checker()
            lines_read = 0
            for lines_read, line, code in plan.lines(read_pass(open_lines)):
                if code == BLANK or (code >= 0 and not every_line):
                    continue
                if code == PAST_END:
                    break
                yield _decode_again(line, lines_read, is_duplicate)
            plan.check_line_count(lines_read)

        def fallback_candidates() -> Iterator[tuple[Any, Parsed | Invalid]]:
            if not plan.share_verdicts:
                yield from look_again(every_line=True)
                return
            for route in plan.routes:
                yield NO_MESSAGE, route
            for route in plan.compact_routes():
                yield NO_MESSAGE, route
            if plan.valid_unrouted:
                yield from look_again(every_line=False)

        def passes() -> Iterator[Iterator[bytes]]:
            started = time.monotonic()
            before = self._source_counters()
            table = self._resolve(first_pass(), fallback_candidates)
            yield self._verdict_lines(open_lines, plan, table)
            self._finish(before, started)

        # The verdict pass's lines pass through chain, in C: a generator's step a line here
        # cost a third of what splicing the line does.
        return chain.from_iterable(passes())

    def _verdict_lines(
        self, open_lines: Callable[[], Iterable[bytes]], plan: LinePlan, table: StatusTable
    ) -> Iterator[bytes]:
        """The last pass: each line with its verdict spliced on."""
        progress = self._progress
        routes = plan.routes
        groups = plan.groups
        # A route's verdict is kept from its second line on: a route of one line (every route
        # of a campaign to a number each) would keep a verdict nobody reads again. Its first
        # line, and every compact line, is rendered from a template when its status settles
        # its verdict.
        shared: list[_Shared | None] = [None] * len(routes)
        seen = bytearray(len(routes))  # 1: the route had a line, which kept no verdict
        route_lines = [0] * len(routes)  # lines given each route's shared verdict
        # What the usual line's closing brace gives way to, for the routes whose shared
        # verdict is spliced on (not a reroute): the line is the hot path of the pass.
        tails: list[bytes | None] = [None] * len(routes)
        templates = NumberTemplates(self._verdicts, table)
        share = plan.share_verdicts
        is_duplicate = plan.ids.pass_checker()
        compact_keys = plan.compact_keys()
        loads = orjson.loads
        lines_read = 0
        for lines_read, line, code in plan.lines(read_pass(open_lines)):
            if progress is not None and lines_read % 1000 == 0:
                progress("verdicts", 1000, None)
            # A routed or compact line is a valid message without verdict fields. Its id is
            # only looked at when some id of the run was seen twice.
            if code >= 0 and share:
                if is_duplicate is None or not is_duplicate(loads(line)["id"]):
                    tail = tails[code]
                    if tail is not None and line.endswith(b"}\n"):  # _Shared.render, inlined
                        route_lines[code] += 1
                        yield line[:-2] + tail
                        continue
                    verdict = shared[code]
                    if verdict is not None:
                        route_lines[code] += 1
                        yield verdict.render(line)
                        continue
                    route = routes[code]
                    if not seen[code]:  # its first line, which keeps no verdict
                        seen[code] = 1
                        rendered = templates.render(line, route.channel, route.key)
                        if rendered is None:
                            verdict = self._shared_verdict(route, table)
                            verdict.count(self.summary, 1)
                            rendered = verdict.render(line)
                        yield rendered
                        continue
                    verdict = shared[code] = self._shared_verdict(route, table)
                    tails[code] = verdict.tail
                    route_lines[code] += 1
                    yield verdict.render(line)
                    continue
            elif code <= COMPACT:
                key = next(compact_keys)
                if is_duplicate is None or not is_duplicate(loads(line)["id"]):
                    rendered = templates.render(line, groups[COMPACT - code][0], key)
                    if rendered is not None:
                        yield rendered
                        continue
                    # Known not to be a duplicate: asking again would find its own id seen.
                    yield self._verdict_line(line, lines_read, None, table)
                    continue
            elif code == BLANK:
                continue
            elif code == PAST_END:
                break
            yield self._verdict_line(line, lines_read, is_duplicate, table)
        plan.check_line_count(lines_read)
        templates.count(self.summary)
        for verdict, lines in zip(shared, route_lines, strict=True):
            if verdict is not None:
                verdict.count(self.summary, lines)

    def _shared_verdict(self, route: Parsed, table: StatusTable) -> _Shared:
        return _Shared(*self._verdicts.verdict(NO_MESSAGE, route, table, self.fallback_policy))

    def _verdict_line(
        self,
        line: bytes,
        line_number: int,
        is_duplicate: Callable[[str], bool] | None,
        table: StatusTable,
    ) -> bytes:
        """A line decoded again, with its verdict."""
        message, parsed = _decode_again(line, line_number, is_duplicate)
        fields, channel = self._verdicts.verdict(
            message, parsed, table, self.fallback_policy, line_number
        )
        self.summary.count(
            fields["verdict"], channel, fields.get("source"), fields.get("original_channel")
        )
        return render_line(line, message, fields)

    def estimate(self, open_lines: Callable[[], Iterable[bytes]]) -> tuple[int, int]:
        """How many API requests :meth:`run_lines` would make: ``(at least, at most)``.

        Exact (both equal) when no message has a fallback: the fallback round depends on
        which numbers turn out blocklisted. No API request is made; the cache is read.
        """
        wanted: dict[str, set[int]] = defaultdict(set)
        fallback_wanted: dict[str, set[int]] = defaultdict(set)
        for line_number, line in enumerate(read_pass(open_lines), 1):
            decoded = decode_line(line, line_number)
            if decoded is None:
                continue
            message, parsed = decoded
            if not isinstance(parsed, Parsed):
                continue
            wanted[parsed.channel].add(parsed.key)
            for channel in self.fallback_policy(message, parsed):
                fallback_wanted[channel].add(parsed.key)
        low = self._estimate_requests(_as_numbers(wanted))
        for channel, keys in fallback_wanted.items():
            keys -= wanted.get(channel, set())
        high = low + self._estimate_requests(_as_numbers(fallback_wanted))
        return low, high

    def _estimate_requests(self, wanted: Mapping[str, Sequence[str]]) -> int:
        # Every source that costs requests is asked, and their requests add up: each source
        # is asked about every number.
        estimates = (source.estimate_requests(wanted) for source in self.sources)
        return sum(estimate for estimate in estimates if estimate is not None)

    def blocklisted(self, channel: str, numbers: Iterable[str]) -> list[str]:
        """Which of ``numbers`` are blocklisted on ``channel``: what ``blockfilter check`` says.

        Every source is asked, as in a run, and a number is blocklisted when any of them says
        so. No partial answer is given: when a number could not be checked (and no source
        blocklists it) the call fails, since leaving it out would mean "not blocklisted".

        :param channel: ``sms``, ``whatsapp`` or ``voice``, in any case.
        :param numbers: E.164 numbers; a repeat is asked once.
        :return: the blocklisted numbers, each once, in the order given.
        :raises ValueError: an unknown channel; a number that is not valid E.164
            (:class:`~blockfilter.numbers.InvalidNumber`).
        :raises CredentialsRefused: the upstream refused the credentials or the account.
        :raises CheckFailed: some number could not be checked.
        """
        lowered = channel_named(channel)
        asked = list(dict.fromkeys(normalize(number) for number in numbers))
        if not asked:
            return []
        table = StatusTable()
        for number in asked:
            table.want(lowered, _key(number))
        started = time.monotonic()
        before = self._source_counters()
        streams = [(source, source.stream()) for source in self.sources]
        for _, stream in streams:
            stream.add(lowered, asked)
        failures: list[tuple[str, BaseException]] = []
        for source, stream in streams:
            name = source.name
            for outcome in stream.finish():
                self._record(table, outcome, name)
                if outcome.error is not None:
                    failures.append((name, outcome.error))
        self._finish(before, started)
        blocked: list[str] = []
        unchecked = 0
        for number in asked:
            kind = (table.lookup(lowered, _key(number)) or ASKED)[0]
            if kind == BLOCKED:
                blocked.append(number)
            elif kind == FAILED:
                unchecked += 1
        if unchecked:
            raise _check_failure(unchecked, len(asked), failures)
        return blocked

    # -- the run ---------------------------------------------------------------------------

    def _source_counters(self) -> tuple[int, int]:
        requests = cache_hits = 0
        for source in self.sources:
            stats = source.stats()
            requests += stats.requests
            cache_hits += stats.cache_hits
        return requests, cache_hits

    def _finish(self, before: tuple[int, int], started: float) -> None:
        requests, cache_hits = self._source_counters()
        self.summary.requests += requests - before[0]
        self.summary.cache_hits += cache_hits - before[1]
        self.summary.elapsed_s += time.monotonic() - started

    def _resolve(
        self,
        first_pass: Iterable[tuple[Any, Parsed | Invalid | None]],
        fallback_candidates: Replay,
        expected: int = 0,
    ) -> StatusTable:
        """What the sources say of every message's number, then of the fallback channels of
        the blocklisted ones. ``first_pass`` gives every message (or at least one of each
        route), and may give :data:`~blockfilter.engine.lines.STILL_READING` while it reads
        on; ``fallback_candidates`` gives them again for each fallback round; ``expected``:
        about how many numbers a channel will hold, when known."""
        table = StatusTable(expected)
        streams = [(source.stream(), source.name) for source in self.sources]
        # Numbers go to the sources while the input is still being read, so requests are in
        # flight during the first pass instead of after it.
        fresh: dict[str, list[str]] = {channel: [] for channel in CHANNELS}
        has_fallbacks = False
        policy = self.fallback_policy
        wants = table.wanting()
        chunk = _FIRST_CHUNK
        for message, parsed in first_pass:
            if type(parsed) is not Parsed:  # not a subclass: the parser makes these
                if parsed is None:
                    # STILL_READING: lines of numbers already handed over. What is held goes
                    # now, so its full requests leave rather than wait for the pass to end
                    # (a source sends full requests only: a request's last part still waits).
                    for channel, batch in fresh.items():
                        if batch:
                            self._feed(streams, table, channel, batch)
                            fresh[channel] = []
                continue
            if wants[parsed.channel](parsed.key):
                batch = fresh[parsed.channel]
                batch.append(parsed.e164)
                if len(batch) >= chunk:
                    self._feed(streams, table, parsed.channel, batch)
                    fresh[parsed.channel] = []
                    chunk = min(chunk * 2, _STREAM_CHUNK)
            if not has_fallbacks:
                # The default policy's answer is the parse's own field: no call a message.
                own = policy is default_fallback_policy
                has_fallbacks = bool(parsed.fallback if own else policy(message, parsed))
        for channel, batch in fresh.items():
            if batch:
                self._feed(streams, table, channel, batch)
        self._drain(streams, table)
        # Each round asks, for every message still blocklisted everywhere known, its next
        # fallback channel. Rounds end when nothing is left to ask; there are at most as many
        # rounds as there are channels, since a number is never asked twice on a channel.
        while has_fallbacks:
            wanted: dict[str, set[int]] = defaultdict(set)
            own = policy is default_fallback_policy  # then a message without one has none
            # Only a message blocklisted on its own channel has a fallback to check: the few
            # keys blocklisted there are asked first, not the status of every message.
            blocked = {channel: table.blocked_keys(channel) for channel in CHANNELS}
            for message, parsed in fallback_candidates():
                if (
                    isinstance(parsed, Parsed)
                    and (parsed.fallback or not own)
                    and parsed.key in blocked[parsed.channel]
                ):
                    fallback = self._next_fallback_to_check(message, parsed, table)
                    if fallback is not None:
                        wanted[fallback].add(parsed.key)
            if not wanted:
                break
            self._check(table, wanted)
        return table

    def _feed(
        self,
        streams: list[tuple[CheckStream, str]],
        table: StatusTable,
        channel: str,
        numbers: list[str],
    ) -> None:
        self.numbers_looked_up += len(numbers)
        for stream, name in streams:
            stream.add(channel, numbers)
            for outcome in stream.completed():
                self._record(table, outcome, name)

    def _drain(self, streams: list[tuple[CheckStream, str]], table: StatusTable) -> None:
        for stream, name in streams:
            for outcome in stream.finish():
                self._record(table, outcome, name)

    def _record(self, table: StatusTable, outcome: CheckOutcome, name: str) -> None:
        table.record(outcome, outcome.origin or name)
        if isinstance(outcome.error, CredentialsRefused):
            self.summary.credentials_refused = True
            if self.refusal is None:
                self.refusal = outcome.error
        if self._progress is not None:
            self._progress("numbers", len(outcome.numbers), None)

    def _verdict(
        self, message: Any, parsed: Parsed | Invalid, table: StatusTable, position: int = 0
    ) -> tuple[dict[str, Any], str]:
        # The policy is read at each verdict: it is a public attribute a caller may replace.
        return self._verdicts.verdict(message, parsed, table, self.fallback_policy, position)

    def _next_fallback_to_check(
        self, message: Any, parsed: Parsed, table: StatusTable
    ) -> str | None:
        status = table.lookup(parsed.channel, parsed.key)
        if status is None or status[0] != BLOCKED:
            return None
        for channel in self.fallback_policy(message, parsed):
            status = table.lookup(channel, parsed.key)
            if status is None:
                return channel
            if status[0] != BLOCKED:
                return None
        return None

    def _check(self, table: StatusTable, wanted: Mapping[str, set[int]]) -> None:
        streams = [(source.stream(), source.name) for source in self.sources]
        for channel, keys in wanted.items():
            numbers = [f"+{key}" for key in keys if table.want(channel, key)]
            if numbers:
                self._feed(streams, table, channel, numbers)
        self._drain(streams, table)


def observed_lines(
    lines: Iterable[bytes], observe: Callable[[list[dict[str, Any]]], None]
) -> Iterator[bytes]:
    """``lines`` as they come, each batch shown to ``observe`` (decoded) before it is yielded.
    Decoding every output line again is only worth it for someone who listens."""
    batch: list[bytes] = []
    for line in lines:
        batch.append(line)
        if len(batch) >= _OBSERVED_BATCH:
            observe([load_record(line) for line in batch])
            yield from batch
            batch = []
    if batch:
        observe([load_record(line) for line in batch])
        yield from batch


def _decode_again(
    line: bytes, line_number: int, is_duplicate: Callable[[str], bool] | None
) -> tuple[Any, Parsed | Invalid]:
    """A line a later pass decodes again; a valid message whose id came earlier in the pass
    is a duplicate (``is_duplicate`` is that pass's checker)."""
    message, parsed = decode_again(line, line_number)
    if is_duplicate is not None and type(parsed) is Parsed and is_duplicate(parsed.id):
        return message, _DUPLICATE
    return message, parsed


def _check_failure(
    unchecked: int, asked: int, failures: Sequence[tuple[str, BaseException]]
) -> Exception:
    """The error of a :meth:`Filter.blocklisted` call that could not check every number."""
    for _, error in failures:
        if isinstance(error, CredentialsRefused):
            return error  # only a human can fix it: the command line says so (exit 3)
    what = f"{unchecked} of {asked} numbers could not be checked"
    if not failures:
        return CheckFailed(f"{what}: a blocklist source left them unanswered")
    name, error = failures[0]
    # A plugin's message may quote the numbers it was asked about.
    detail = mask_numbers_in(str(error))[:300]
    return CheckFailed(f"{what}: {name}: {type(error).__name__}: {detail}")


def _as_numbers(wanted: Mapping[str, set[int]]) -> dict[str, list[str]]:
    return {channel: [f"+{key}" for key in keys] for channel, keys in wanted.items() if keys}
