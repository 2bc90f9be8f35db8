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
:class:`~blockfilter.jsonlines.LinePlan`), so the later passes splice each verdict onto the
line's own bytes without decoding the line again.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Final, cast

import orjson

from ..config import CHANNELS, Settings, load_settings
from ..errors import CheckFailed, CredentialsRefused, RequestBudgetExhausted
from ..model import (
    PROVENANCE_FIELDS,
    VERDICT_FIELDS,
    Invalid,
    Parsed,
    Reason,
    Verdict,
    channel_named,
    channel_of,
    has_usable_id,
    parse_message,
)
from ..numbers import normalize
from ..redact import guard_library_logs, mask_numbers_in
from ..sources import BaseSource, BlocklistSource, CheckOutcome, CheckStream, as_source
from .lines import (
    BLANK,
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

if TYPE_CHECKING:
    import pluggy

log = logging.getLogger("blockfilter.engine")

# Why a number could not be checked; interned so a million failures share three strings.
FAILED_CHECK: Final = Reason.CHECK_FAILED
FAILED_CREDENTIALS: Final = Reason.CREDENTIALS_REFUSED
FAILED_BUDGET: Final = "request_budget"

CLEAN, BLOCKED, FAILED = 0, 1, 2
# The status of a number handed to the sources and not answered (yet): unchecked.
ASKED: Final = (FAILED, FAILED_CHECK)
# Which status a later answer of another source may replace: blocklisted anywhere wins, then
# a failure (unchecked), then clean.
_RANK = {CLEAN: 0, FAILED: 1, BLOCKED: 2}

# Distinct numbers handed to the sources at a time during the first pass: enough for a few
# full requests and one cache round trip, few enough that the first request leaves early.
_STREAM_CHUNK = 500

# Results shown to the blockfilter_verdicts observers at a time (as `blockfilter filter` did).
_OBSERVED_BATCH = 500

FallbackPolicy = Callable[[Mapping[str, Any], Parsed], Sequence[str]]


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


def _key(e164: str) -> int:
    # E.164 never starts with a 0 after the "+", so the digits as an int are a lossless,
    # compact key: a small int takes half the memory of the string.
    return int(e164[1:])


class StatusTable:
    """What the run has learnt, per channel and number: clean, blocklisted or unchecked.

    One dict a channel, from a number's key to its status ``(kind, value)``; every number of
    one answer shares one status tuple, so a million numbers cost their keys and dict slots
    and little else. A number handed to the sources is marked :data:`ASKED` first (so it is
    never handed over twice), which reads as unchecked until an answer replaces it: a source
    that skips a number leaves it unchecked (fail closed), and it is not asked again.

    Sources are joined here: blocklisted anywhere wins; otherwise a failure anywhere leaves the
    number unchecked; a clean or blocklisted status keeps the oldest time any source gave.
    """

    def __init__(self) -> None:
        # (kind, value) when unchecked; (kind, checked_at, origin, provenance) when answered.
        self._status: dict[str, dict[int, tuple[Any, ...]]] = {c: {} for c in CHANNELS}

    def want(self, channel: str, key: int) -> bool:
        """Mark a number as asked; false if it was asked (or known) already."""
        statuses = self._status[channel]
        if key in statuses:
            return False
        statuses[key] = ASKED
        return True

    def record(self, outcome: CheckOutcome, origin: str) -> None:
        """Join ``outcome`` in; ``origin`` names what answered (the verdict's ``source``)."""
        statuses = self._status[outcome.channel]
        if outcome.error is not None:
            failed = (FAILED, _failure_reason(outcome.error))
            for number in outcome.numbers:
                key = _key(number)
                if statuses.get(key, ASKED)[0] != BLOCKED:
                    statuses[key] = failed
            return
        checked_at = outcome.checked_at if outcome.checked_at is not None else time.time()
        provenance = _provenance(outcome.provenance)
        clean = (CLEAN, checked_at, origin, provenance)
        blocked = (BLOCKED, checked_at, origin, provenance)
        for number in outcome.numbers:
            key = _key(number)
            new = blocked if number in outcome.blocked else clean
            old = statuses.get(key, ASKED)
            if old is ASKED or _RANK[new[0]] > _RANK[old[0]]:
                statuses[key] = new
            elif new[0] == old[0] and checked_at < old[1]:
                statuses[key] = new  # the same answer, learnt earlier

    def lookup(self, channel: str, key: int) -> tuple[Any, ...] | None:
        """The number's status; ``None`` if it was never asked."""
        return self._status[channel].get(key)


def _failure_reason(error: BaseException) -> str:
    if isinstance(error, CredentialsRefused):
        return FAILED_CREDENTIALS
    if isinstance(error, RequestBudgetExhausted):
        return FAILED_BUDGET
    return FAILED_CHECK


@dataclass
class Summary:
    """Counts of a run, as the contract's summary JSON."""

    # (verdict, final channel, source) -> messages: one increment a message on the hot path;
    # the per-verdict, per-channel and per-source views are derived from it.
    counts: Counter[tuple[str, str, str | None]] = field(default_factory=Counter)
    # (requested channel, final channel) -> rerouted messages: so the summary can say which
    # channel they asked for as well as where they go.
    reroutes: Counter[tuple[str, str]] = field(default_factory=Counter)
    requests: int = 0
    cache_hits: int = 0
    elapsed_s: float = 0.0
    credentials_refused: bool = False

    def count(
        self, verdict: str, channel: str, source: str | None = None, requested: str | None = None
    ) -> None:
        self.counts[verdict, channel, source] += 1
        if requested is not None and requested != channel:
            self.reroutes[requested, channel] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def verdicts(self) -> Counter[str]:
        verdicts: Counter[str] = Counter()
        for (verdict, _, _), n in self.counts.items():
            verdicts[verdict] += n
        return verdicts

    @property
    def channels(self) -> dict[str, dict[str, int]]:
        channels: dict[str, dict[str, int]] = defaultdict(dict)
        for (verdict, channel, _), n in self.counts.items():
            channels[channel][verdict] = channels[channel].get(verdict, 0) + n
        return dict(channels)

    @property
    def sources(self) -> dict[str, dict[str, int]]:
        """source (``api``, ``cache``, ``snapshot``, ``ledger``, a plugin) -> verdict -> n."""
        sources: dict[str, dict[str, int]] = defaultdict(dict)
        for (verdict, _, source), n in self.counts.items():
            if source is not None:
                sources[source][verdict] = sources[source].get(verdict, 0) + n
        return dict(sources)

    @property
    def requested_channels(self) -> dict[str, dict[str, int]]:
        """Verdicts by the channel each message asked for (``channels`` is by the channel it
        goes out on: a rerouted message counts under its fallback there, under its own here)."""
        requested: dict[str, Counter[str]] = defaultdict(Counter)
        for (verdict, channel, _), n in self.counts.items():
            requested[channel][verdict] += n
        for (asked, final), n in self.reroutes.items():
            requested[final][Verdict.REROUTED] -= n
            requested[asked][Verdict.REROUTED] += n
        return {
            channel: {verdict: n for verdict, n in counts.items() if n}
            for channel, counts in requested.items()
            if any(counts.values())
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "verdicts": dict(self.verdicts),
            "channels": self.channels,
            "sources": self.sources,
            "requested_channels": self.requested_channels,
            "requests": self.requests,
            "cache_hits": self.cache_hits,
            "elapsed_s": round(self.elapsed_s, 3),
            "credentials_refused": self.credentials_refused,
        }


class _IsoTimes:
    """ISO 8601 strings of checked_at times; a batch shares one time, so memoise a few."""

    def __init__(self) -> None:
        self._memo: dict[float, str] = {}

    def __call__(self, epoch: float) -> str:
        text = self._memo.get(epoch)
        if text is None:
            if len(self._memo) > 4096:
                self._memo.clear()
            text = (
                datetime.fromtimestamp(epoch, timezone.utc)
                .isoformat(timespec="milliseconds")
                .replace("+00:00", "Z")
            )
            self._memo[epoch] = text
        return text


_DUPLICATE = Invalid("duplicate_id", "an earlier message in this run has the same id")
_NOT_AN_OBJECT = Invalid("malformed_line", "a message is a JSON object")

Replay = Callable[[], Iterator[tuple[Any, "Parsed | Invalid"]]]

# What a message-independent fallback policy is shown in place of a message.
_NO_MESSAGE: Mapping[str, Any] = MappingProxyType({})


class _Shared:
    """A verdict shared by every line of one route, encoded once."""

    __slots__ = ("count_key", "requested", "_fields", "_tail")

    def __init__(self, fields: dict[str, Any], channel: str) -> None:
        self.count_key = (fields["verdict"], channel, fields.get("source"))
        self.requested: str | None = fields.get("original_channel")
        self._fields = fields
        # What the usual line's closing brace and newline give way to; None when a field of
        # the line must be replaced (a reroute changes the channel).
        self._tail = (
            None if "original_channel" in fields else b"," + orjson.dumps(fields)[1:] + b"\n"
        )

    def render(self, line: bytes) -> bytes:
        """``line``, a routed line (a valid message without verdict fields), with the verdict."""
        tail = self._tail
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
        if self.on_error not in ("defer", "allow", "drop"):
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
        self._iso = _IsoTimes()

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
            m if isinstance(m, Mapping) else MalformedLine(index)
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
        table = self._resolve(replay(), replay)
        observe = self._observer()
        batch: list[dict[str, Any]] = []
        for position, (message, p) in enumerate(replay(), 1):
            fields, channel = self._verdict(message, p, table, position)
            self.summary.count(
                fields["verdict"], channel, fields.get("source"), fields.get("original_channel")
            )
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

    def run_lines(self, open_lines: Callable[[], Iterable[bytes]]) -> Iterator[bytes]:
        """Filter JSON Lines; yields one output line (bytes, ``\\n``-terminated) a message.

        ``open_lines`` is called once per pass and must give the same lines each time (a
        file opened anew, say). Blank lines are skipped; a line that is not a JSON object
        becomes an ``invalid`` record (``malformed_line``) whose ``id`` is its line number.
        Each message's own bytes are kept as they were; the verdict fields are appended.
        With observers, each batch of lines is decoded again for them before it is yielded.
        """
        # With a policy that looks only at the parsed message, every line of a route shares
        # one verdict: a route's later lines are then neither shown to _resolve nor decoded
        # again, and its verdict is decided and encoded once.
        share = getattr(self.fallback_policy, "message_independent", False)
        plan = LinePlan(share_verdicts=share)
        observe = self._observer()
        try:
            lines = self._run_planned(open_lines, plan)
            yield from lines if observe is None else observed_lines(lines, observe)
        finally:
            plan.close()

    def _run_planned(
        self, open_lines: Callable[[], Iterable[bytes]], plan: LinePlan
    ) -> Iterator[bytes]:
        def first_pass() -> Iterator[tuple[Any, Parsed | Invalid]]:
            read = plan.read
            for line_number, line in enumerate(read_pass(open_lines), 1):
                item = read(line, line_number)
                if item is not None:
                    yield item
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
                yield _NO_MESSAGE, route
            if plan.valid_unrouted:
                yield from look_again(every_line=False)

        started = time.monotonic()
        before = self._source_counters()
        table = self._resolve(first_pass(), fallback_candidates)
        yield from self._verdict_lines(open_lines, plan, table)
        self._finish(before, started)

    def _verdict_lines(
        self, open_lines: Callable[[], Iterable[bytes]], plan: LinePlan, table: StatusTable
    ) -> Iterator[bytes]:
        """The last pass: each line with its verdict spliced on."""
        progress = self._progress
        routes = plan.routes
        shared: list[_Shared | None] = [None] * len(routes)
        route_lines = [0] * len(routes)  # lines given each route's shared verdict
        share = plan.share_verdicts
        is_duplicate = plan.ids.pass_checker()
        loads = orjson.loads
        lines_read = 0
        for lines_read, line, code in plan.lines(read_pass(open_lines)):
            if progress is not None and lines_read % 1000 == 0:
                progress("verdicts", 1000, None)
            # A routed line is a valid message without verdict fields. Its id is only looked
            # at when some id of the run was seen twice.
            if (
                code >= 0
                and share
                and (is_duplicate is None or not is_duplicate(loads(line)["id"]))
            ):
                verdict = shared[code]
                if verdict is None:
                    verdict = shared[code] = _Shared(
                        *self._verdict(_NO_MESSAGE, routes[code], table)
                    )
                route_lines[code] += 1
                yield verdict.render(line)
            elif code == BLANK:
                continue
            elif code == PAST_END:
                break
            else:
                message, parsed = _decode_again(line, lines_read, is_duplicate)
                fields, channel = self._verdict(message, parsed, table, lines_read)
                self.summary.count(
                    fields["verdict"], channel, fields.get("source"), fields.get("original_channel")
                )
                yield render_line(line, message, fields)
        plan.check_line_count(lines_read)
        for verdict, lines in zip(shared, route_lines, strict=True):
            if verdict is not None:
                self.summary.counts[verdict.count_key] += lines
                if verdict.requested is not None:
                    self.summary.reroutes[verdict.requested, verdict.count_key[1]] += lines

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
        first_pass: Iterable[tuple[Any, Parsed | Invalid]],
        fallback_candidates: Replay,
    ) -> StatusTable:
        """What the sources say of every message's number, then of the fallback channels of
        the blocklisted ones. ``first_pass`` gives every message (or at least one of each
        route); ``fallback_candidates`` gives them again for each fallback round."""
        table = StatusTable()
        streams = [(source.stream(), source.name) for source in self.sources]
        # Numbers go to the sources while the input is still being read, so requests are in
        # flight during the first pass instead of after it.
        fresh: dict[str, list[str]] = {channel: [] for channel in CHANNELS}
        has_fallbacks = False
        policy = self.fallback_policy
        want = table.want
        for message, parsed in first_pass:
            if not isinstance(parsed, Parsed):
                continue
            if want(parsed.channel, parsed.key):
                batch = fresh[parsed.channel]
                batch.append(parsed.e164)
                if len(batch) >= _STREAM_CHUNK:
                    self._feed(streams, table, parsed.channel, batch)
                    fresh[parsed.channel] = []
            if not has_fallbacks and policy(message, parsed):
                has_fallbacks = True
        for channel, batch in fresh.items():
            if batch:
                self._feed(streams, table, channel, batch)
        self._drain(streams, table)
        # Each round asks, for every message still blocklisted everywhere known, its next
        # fallback channel. Rounds end when nothing is left to ask; there are at most as many
        # rounds as there are channels, since a number is never asked twice on a channel.
        while has_fallbacks:
            wanted: dict[str, set[int]] = defaultdict(set)
            for message, parsed in fallback_candidates():
                if isinstance(parsed, Parsed):
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

    # -- verdicts --------------------------------------------------------------------------

    def _verdict(
        self, message: Any, parsed: Parsed | Invalid, table: StatusTable, position: int = 0
    ) -> tuple[dict[str, Any], str]:
        """The verdict fields of a message and its final channel. ``position`` (1-based, the
        line number over JSON Lines) names the record of a message without a usable id."""
        if isinstance(parsed, Invalid):
            fields: dict[str, Any] = {"verdict": Verdict.INVALID, "reason": parsed.reason}
            if parsed.detail:
                fields["detail"] = parsed.detail
            if position and not has_usable_id(message):
                fields = {"id": str(position), **fields}
            return fields, channel_of(message)
        status: tuple[Any, ...] = table.lookup(parsed.channel, parsed.key) or (
            FAILED,  # a source skipped the number: treat it as unchecked
            FAILED_CHECK,
        )
        kind, value = status[0], status[1]
        if kind == CLEAN:
            return self._allowed(parsed, status), parsed.channel
        if kind == FAILED:
            return self._unchecked(parsed, value, parsed.channel)
        for channel in self.fallback_policy(message, parsed):
            fallback = table.lookup(channel, parsed.key) or (FAILED, FAILED_CHECK)
            kind, value = fallback[0], cast(Any, fallback[1])
            if kind == BLOCKED:
                continue
            if kind == CLEAN:
                return _with_provenance(
                    {
                        "verdict": Verdict.REROUTED,
                        "e164": parsed.e164,
                        "checked_at": self._iso(value),
                        "channel": channel,
                        "original_channel": parsed.channel,
                        "source": fallback[2],
                    },
                    fallback,
                ), channel
            return self._unchecked(parsed, value, channel)
        return _with_provenance(
            {
                "verdict": Verdict.BLOCKED,
                "e164": parsed.e164,
                "checked_at": self._iso(status[1]),
                "reason": "blocklisted",
                "source": status[2],
            },
            status,
        ), parsed.channel

    def _allowed(self, parsed: Parsed, status: tuple[Any, ...]) -> dict[str, Any]:
        return _with_provenance(
            {
                "verdict": Verdict.ALLOWED,
                "e164": parsed.e164,
                "checked_at": self._iso(status[1]),
                "source": status[2],
            },
            status,
        )

    def _unchecked(self, parsed: Parsed, failure: str, channel: str) -> tuple[dict[str, Any], str]:
        """The verdict for a message whose ``channel`` could not be checked."""
        if failure == FAILED_CREDENTIALS:
            # A refused account is not a passing glitch to fail open on: always deferred.
            return {
                "verdict": Verdict.DEFERRED,
                "e164": parsed.e164,
                "reason": Reason.CREDENTIALS_REFUSED,
            }, parsed.channel
        if failure == FAILED_BUDGET or self.on_error == "defer":
            fields = {
                "verdict": Verdict.DEFERRED,
                "e164": parsed.e164,
                "reason": Reason.CHECK_FAILED,
            }
            if failure == FAILED_BUDGET:
                fields["detail"] = "--max-requests reached before this number was checked"
            return fields, parsed.channel
        if self.on_error == "allow":
            if channel == parsed.channel:
                return {
                    "verdict": Verdict.ALLOWED,
                    "e164": parsed.e164,
                    "checked_at": None,
                    "reason": "unchecked",
                }, channel
            return {
                "verdict": Verdict.REROUTED,
                "e164": parsed.e164,
                "checked_at": None,
                "channel": channel,
                "original_channel": parsed.channel,
                "reason": "unchecked",
            }, channel
        return {
            "verdict": Verdict.BLOCKED,
            "e164": parsed.e164,
            "checked_at": None,
            "reason": "unchecked",
        }, parsed.channel


def _provenance(given: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The fields of a source's provenance a verdict may carry (once per outcome)."""
    if not given:
        return None
    kept = {name: value for name, value in given.items() if name in PROVENANCE_FIELDS}
    return kept or None


def _with_provenance(fields: dict[str, Any], status: tuple[Any, ...]) -> dict[str, Any]:
    """``fields`` with what the answering source said of its answer (``age_s``,
    ``ledger_event``...), which names no number."""
    provenance = status[3]
    if provenance:
        fields.update(provenance)
    return fields


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
