"""The ledger as a built-in blocklist source, and the dispatch gate.

The built-in ``ledger`` plugin gives every filter a :class:`LedgerSource`. The filter joins
sources so that "blocklisted" from any of them wins, so an opt-out in the ledger beats a clean
answer from Kaleyra live, from the cache or from a synced list. Its numbers are read when the
filter drains its sources, after Kaleyra's lookups: as late in the run as possible.

A Celery task reads the ledger once more, under the fence, right before it hands messages to
``blockfilter_dispatch`` (:func:`dispatch_gate`): an opt-out reported while the task was
checking turns its message ``blocked`` there, and a report waits for the gates open when it
was written. Hence: no dispatch of a number starts after its report returned.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ..config import Settings
from ..errors import ConfigError
from ..model import PROVENANCE_FIELDS, Verdict
from ..plugins.hookspecs import hookimpl
from ..sources import (
    BaseSource,
    BufferedStream,
    CheckOutcome,
    CheckStream,
    SourceStats,
    sources_never_alone,
)
from .events import iso
from .mappings import BUILTIN_CODES, merge_codes

log = logging.getLogger("blockfilter.ledger")

LEDGER = "ledger"


class LedgerSource(BaseSource):
    """Answers, for every number asked, whether the ledger holds it opted out.

    A failed read (the store is down, no key for a non-empty ledger, a key missing) leaves
    every number unchecked: their messages are deferred, never allowed (fail closed). It
    knows only the numbers reported to it, so it never stands alone, and it answers only the
    numbers it holds opted out: a clean answer of its own would change nothing the other
    sources say (they decide whether a number is checked at all), and joining one for every
    number of a campaign cost a warm worker a tenth of its time.
    """

    name = LEDGER
    stands_alone = False

    def __init__(self, ledger: Any) -> None:
        self.ledger = ledger
        self._stats = SourceStats()

    def stream(self) -> CheckStream:
        return _LedgerStream(self)

    def check_many(self, wanted: Mapping[str, Sequence[str]]) -> Iterator[CheckOutcome]:
        try:
            found = self.ledger.opted_out(wanted)
        except Exception as exc:  # the store, the keys: fail closed, never crash the run
            log.warning("opt-out ledger unavailable: %s", exc)
            for channel, numbers in wanted.items():
                yield CheckOutcome(channel, list(numbers), error=exc)
            return
        now = time.time()
        for channel, numbers in wanted.items():
            hits = found.get(channel, {})
            self._count(len(numbers), len(hits))
            # Each opted-out number names the event that put it there: its own outcome.
            for number, event in hits.items():
                yield CheckOutcome(
                    channel,
                    [number],
                    frozenset((number,)),
                    now,
                    origin=LEDGER,
                    provenance=provenance_of(event),
                )

    def holds_nothing(self) -> bool:
        """Whether the ledger is known to hold no event at all (never written): then it has
        no opt-out to answer, and its numbers need not even be read. ``False`` when that
        cannot be told: the read then says what is wrong."""
        try:
            return not self.ledger.ever_written()
        except Exception:
            return False

    def _count(self, numbers: int, opted_out: int) -> None:
        self._stats.numbers_checked += numbers
        self._stats.extra["opted_out"] = self._stats.extra.get("opted_out", 0) + opted_out

    def stats(self) -> SourceStats:
        return self._stats

    def __repr__(self) -> str:
        return f"LedgerSource({self.ledger!r})"


class _LedgerStream(BufferedStream):
    """The default stream, read at the end as before; a ledger that holds nothing then is
    not asked (its numbers would only be turned back into strings to find nothing)."""

    def __init__(self, source: LedgerSource) -> None:
        super().__init__(source)
        self._ledger_source = source

    def finish(self) -> Iterator[CheckOutcome]:
        source = self._ledger_source
        if source.holds_nothing():
            source._count(sum(len(held) for held in self._take_wanted().values()), 0)
            return iter(())
        return super().finish()


def provenance_of(event: Any) -> dict[str, Any]:
    """What a verdict the ledger decided carries of the event that decided it: its id
    (``event``), its own time (``at``), the way in (``source``: ``send_result``, ``inbound``,
    ``operator``, ``import``), the provider and its code if any; never the number."""
    return {"ledger_event": event.describe()}


class LedgerPlugin:
    """The built-in ``ledger`` plugin: the opt-out ledger as a blocklist source, and the
    built-in provider codes."""

    def __init__(self) -> None:
        self._sources: dict[int, LedgerSource] = {}

    @hookimpl(trylast=True)
    @sources_never_alone
    def blockfilter_blocklist_sources(self, settings: Settings) -> list[Any]:
        # The same source for the same ledger: one object per process, as the hook asks.
        ledger = self.ledger(settings)
        source = self._sources.get(id(ledger))
        if source is None or source.ledger is not ledger:
            source = self._sources[id(ledger)] = LedgerSource(ledger)
        return [source]

    @hookimpl(trylast=True)
    def blockfilter_optout_codes(self, provider: str) -> Mapping[str, bool] | None:
        return BUILTIN_CODES.get(provider)

    def ledger(self, settings: Settings) -> Any:
        from .ledger import shared_ledger

        return shared_ledger(settings)


def ledger_blocked(settings: Settings, channel: str, numbers: Sequence[str]) -> set[str]:
    """The numbers the ledger holds opted out on ``channel`` (``blockfilter check``).

    :raises LedgerUnavailable: the ledger cannot be read (or its keys are not ours).
    """
    from .ledger import shared_ledger

    return set(shared_ledger(settings).opted_out({channel: list(numbers)})[channel])


def ledger_plugin(pm: Any) -> LedgerPlugin | None:
    plugin = pm.get_plugin(LEDGER)
    return plugin if isinstance(plugin, LedgerPlugin) else None


def optout_codes(pm: Any, provider: str) -> dict[str, bool]:
    """The effective code mapping of ``provider`` (built-ins and the plugins' hook)."""
    from ..plugins.manager import PluginHooks

    results = PluginHooks(pm).optout_codes(provider)
    if ledger_plugin(pm) is None:  # the built-in is disabled: its table still applies
        results = [*results, BUILTIN_CODES.get(provider)]
    return merge_codes(provider, results)


# -- the dispatch gate -----------------------------------------------------------------------

_DISPATCHED = Verdict.DISPATCHED


@contextlib.contextmanager
def dispatch_gate(
    pm: Any, settings: Settings, results: list[dict[str, Any]], summary: dict[str, Any]
) -> Iterator[None]:
    """Hold the ledger's fence for the block, after one last look at the ledger: every
    ``allowed`` or ``rerouted`` result whose number is now opted out on the channel it would
    go out on becomes ``blocked`` (``reason: blocklisted``, ``source: ledger``, with the
    ``ledger_event`` that decided it and the ``checked_at`` of this read), in place, and
    ``summary`` is corrected to match.

    :raises LedgerUnavailable: the ledger cannot be read: the caller must not dispatch.
    """
    plugin = ledger_plugin(pm)
    if plugin is None:
        yield
        return
    ledger = plugin.ledger(settings)
    with ledger.gate():
        # Looked at under the fence: a report that returned before it was taken wrote the
        # store first. A ledger never written has nothing to stop, and a worker without
        # opt-outs need not go over its results for it.
        outgoing = _outgoing(results) if ledger.ever_written() else []
        if outgoing:
            wanted: dict[str, list[str]] = defaultdict(list)
            for result in outgoing:
                wanted[str(result["channel"])].append(result["e164"])
            found = ledger.opted_out(wanted)
            read_at = time.time()
            for result in outgoing:
                event = found.get(str(result["channel"]), {}).get(result["e164"])
                if event is not None:
                    _block(result, event, read_at, summary)
        yield


def _outgoing(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in results if r.get("verdict") in _DISPATCHED and r.get("e164")]


def _block(result: dict[str, Any], event: Any, checked_at: float, summary: dict[str, Any]) -> None:
    old_verdict, old_channel = result["verdict"], result["channel"]
    old_source = result.get("source")
    if "original_channel" in result:
        result["channel"] = result.pop("original_channel")
    result["verdict"] = Verdict.BLOCKED
    result["reason"] = "blocklisted"
    # What the other source said of its answer no longer explains the verdict: the ledger,
    # read just now, decided it.
    for name in PROVENANCE_FIELDS:
        result.pop(name, None)
    result["checked_at"] = iso(checked_at)
    result["source"] = LEDGER
    result.update(provenance_of(event))
    _move(summary, old_verdict, old_channel, Verdict.BLOCKED, result["channel"], old_source)
    log.info("ledger: an opt-out reported during the check stopped a dispatch")


def _move(
    summary: dict[str, Any],
    verdict: str,
    channel: str,
    new: str,
    new_channel: str,
    old_source: str | None = None,
) -> None:
    verdicts = summary.setdefault("verdicts", {})
    verdicts[verdict] = verdicts.get(verdict, 0) - 1
    if not verdicts[verdict]:
        del verdicts[verdict]
    verdicts[new] = verdicts.get(new, 0) + 1
    channels = summary.setdefault("channels", {})
    counts = channels.setdefault(channel, {})
    counts[verdict] = counts.get(verdict, 0) - 1
    if not counts[verdict]:
        del counts[verdict]
    if not counts:
        del channels[channel]
    target = channels.setdefault(new_channel, {})
    target[new] = target.get(new, 0) + 1
    sources = summary.get("sources")
    if isinstance(sources, dict):
        old = sources.get(old_source) if old_source else None
        if isinstance(old, dict) and old.get(verdict):
            old[verdict] -= 1
            if not old[verdict]:
                del old[verdict]
            if not old:
                del sources[old_source]
        ledger_counts = sources.setdefault(LEDGER, {})
        ledger_counts[new] = ledger_counts.get(new, 0) + 1


def require_key(settings: Settings) -> None:
    """A clear error now, rather than a failed write later, when the key is missing."""
    if not settings.optout_key:
        from .crypto import KEY_SETTING

        raise ConfigError(
            f"{KEY_SETTING} is not set: the opt-out ledger needs a key of its own "
            "(`blockfilter optout keygen` makes one)"
        )
