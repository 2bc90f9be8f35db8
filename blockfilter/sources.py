"""Blocklist sources: where the filter learns whether a number is blocklisted on a channel.

Kaleyra's API is one source (:mod:`blockfilter.kaleyra`); a pipeline may add its own (an
opt-out table, say) through the ``blockfilter_blocklist_sources`` hook. The filter joins them:
a number is blocklisted when any source says so, and it counts as checked only when every
source answered for it (fail closed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger("blockfilter.sources")


@dataclass(slots=True)
class CheckOutcome:
    """What a source learnt about some numbers of one channel.

    :ivar numbers: every number this outcome covers, blocklisted or not.
    :ivar blocked: those of ``numbers`` that are blocklisted.
    :ivar checked_at: epoch seconds when the answer was obtained from the source (for a cache
        hit: when it was fetched); ``None`` when ``error`` is set.
    :ivar error: why ``numbers`` could not be checked, or ``None``.
    :ivar origin: what answered, for the verdict's ``source``: ``api`` (a live answer),
        ``cache``, ``snapshot`` (a synced list), ``ledger``; ``None``: the source's name.
    :ivar provenance: more fields for the verdicts this outcome decides, beside ``source``:
        what an auditor needs to trace the answer (the cache's ``age_s``, the ledger's
        ``ledger_event``). Shared by every number of the outcome; never holds a number.
    """

    channel: str
    numbers: Sequence[str]
    blocked: frozenset[str] = frozenset()
    checked_at: float | None = None
    error: BaseException | None = None
    origin: str | None = None
    provenance: Mapping[str, Any] | None = None


@dataclass
class SourceStats:
    """Counters a source keeps for the run summary."""

    requests: int = 0
    cache_hits: int = 0
    numbers_checked: int = 0
    extra: dict[str, int] = field(default_factory=dict)


@runtime_checkable
class BlocklistSource(Protocol):
    """Anything that can say which numbers are blocklisted, many channels at a time."""

    name: str

    def check_many(self, wanted: Mapping[str, Sequence[str]]) -> Iterator[CheckOutcome]:
        """Check every number of ``wanted`` (channel -> distinct E.164 numbers).

        Yields outcomes as answers arrive, in any order, and covers every number exactly
        once: a number that could not be checked comes back in an outcome with ``error`` set.
        Must not raise for upstream failures.
        """
        ...

    def stats(self) -> SourceStats:
        """Counters since the source was made."""
        ...


class CheckStream(Protocol):
    """Numbers fed to a source while the input is still being read, so the first requests go
    out before the last message is parsed. Made by a source's optional ``stream()`` method.
    """

    def add(self, channel: str, numbers: Sequence[str]) -> None:
        """More distinct numbers to check on ``channel`` (never one already added)."""
        ...

    def completed(self) -> Iterator[CheckOutcome]:
        """Outcomes ready now, without waiting."""
        ...

    def finish(self) -> Iterator[CheckOutcome]:
        """Check what is left and yield every outcome not yet taken, waiting for them."""
        ...


class BufferedStream:
    """The stream of a source that has none of its own: checks everything at :meth:`finish`."""

    def __init__(self, source: BlocklistSource) -> None:
        self._source = source
        self._wanted: dict[str, list[str]] = {}

    def add(self, channel: str, numbers: Sequence[str]) -> None:
        self._wanted.setdefault(channel, []).extend(numbers)

    def completed(self) -> Iterator[CheckOutcome]:
        return iter(())

    def finish(self) -> Iterator[CheckOutcome]:
        wanted, self._wanted = self._wanted, {}
        return self._source.check_many(wanted)


def open_stream(source: BlocklistSource) -> CheckStream:
    """The source's own stream if it has one, else a :class:`BufferedStream`."""
    stream = getattr(source, "stream", None)
    return stream() if stream is not None else BufferedStream(source)


class FunctionSource:
    """Adapts a plain function ``(channel, numbers) -> blocklisted numbers`` to a source.

    This is how a pipeline's own opt-out table joins the check: the function is called with up
    to ``chunk_size`` numbers at a time; an exception marks those numbers unchecked.
    """

    def __init__(
        self,
        name: str,
        lookup: Callable[[str, list[str]], Iterable[str] | None],
        *,
        chunk_size: int = 1000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self._lookup = lookup
        self._chunk_size = chunk_size
        self._clock = clock
        self._stats = SourceStats()

    def check_many(self, wanted: Mapping[str, Sequence[str]]) -> Iterator[CheckOutcome]:
        for channel, numbers in wanted.items():
            for start in range(0, len(numbers), self._chunk_size):
                chunk = list(numbers[start : start + self._chunk_size])
                try:
                    found = self._lookup(channel, chunk) or ()
                    asked = set(chunk)
                    blocked = frozenset(n for n in found if n in asked)
                except Exception as exc:  # a plugin's failure must fail closed, not crash
                    log.warning("blocklist source %r failed: %s", self.name, type(exc).__name__)
                    yield CheckOutcome(channel, chunk, error=exc)
                    continue
                self._stats.numbers_checked += len(chunk)
                yield CheckOutcome(channel, chunk, blocked, self._clock())

    def stats(self) -> SourceStats:
        return self._stats

    def __repr__(self) -> str:
        return f"FunctionSource({self.name!r})"
