"""Blocklist sources: where the filter learns whether a number is blocklisted on a channel.

Kaleyra's API is one source (:mod:`blockfilter.kaleyra`); a pipeline may add its own (an
opt-out table, say) through the ``blockfilter_blocklist_sources`` hook. The filter joins them:
a number is blocklisted when any source says so, and it counts as checked only when every
source answered for it (fail closed).

:class:`BlocklistSource` is the least a source has; :class:`BaseSource` adds the optional
capabilities (a stream, a cost estimate, a request budget...) with their defaults, and
:func:`as_source` gives the former the latter, once, where the filter receives its sources.
The filter asks every source the same questions: none is special.
"""

from __future__ import annotations

import logging
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

log = logging.getLogger("blockfilter.sources")

Hook = TypeVar("Hook", bound=Callable[..., object])

# The mark of sources_never_alone, on a hook implementation.
NEVER_ALONE = "blockfilter_sources_never_alone"


def sources_never_alone(hook: Hook) -> Hook:
    """Mark a ``blockfilter_blocklist_sources`` implementation whose sources never stand alone
    (:attr:`BaseSource.stands_alone` is ``False``), so that a plugin manager with no other
    source refuses to start before any source is made."""
    setattr(hook, NEVER_ALONE, True)
    return hook


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
    """The least a blocklist source has: a name, :meth:`check_many` and :meth:`stats`.

    This is what ``blockfilter_blocklist_sources`` may return. The filter adapts such an object
    once, when it receives it (:func:`as_source`), to a :class:`BaseSource`: what it does not
    implement of the optional capabilities gets their defaults.
    """

    name: str

    def check_many(self, wanted: Mapping[str, Sequence[str]]) -> Iterator[CheckOutcome]:
        """Check every number of ``wanted`` (channel -> distinct E.164 numbers).

        Yields outcomes as answers arrive, in any order, and covers every number exactly
        once: a number that could not be checked comes back in an outcome with ``error`` set.
        A source that never stands alone (:attr:`BaseSource.stands_alone`) may leave out the
        numbers it does not blocklist: it only adds to what the others answer, and a number
        no source answered stays unchecked. Must not raise for upstream failures.
        """
        ...

    def stats(self) -> SourceStats:
        """Counters since the source was made."""
        ...


class CheckStream(Protocol):
    """Numbers fed to a source while the input is still being read, so the first requests go
    out before the last message is parsed. Made by :meth:`BaseSource.stream`.
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


class BaseSource:
    """A blocklist source with every capability the filter may use, each at its default.

    Subclass it, set :attr:`name` and implement :meth:`check_many`; override a capability
    where the source can do better than its default. The filter asks every source the same
    questions, so nothing depends on which source is which:

    * :meth:`stream`: numbers handed over while the input is read (default: all checked at
      the end, with :meth:`check_many`);
    * :meth:`estimate_requests`: what a check would cost (``--estimate``; default ``None``,
      it costs nothing);
    * :meth:`with_budget`: a request budget (``--max-requests``; default: the source makes no
      requests to count, and is used as it is);
    * :meth:`reading_ahead`: the numbers a batch will ask about, told before it asks
      (default: nothing to do);
    * :meth:`one_shot`: the process runs one campaign and ends (default: nothing to do);
    * :meth:`close`: release what the source holds (default: nothing);
    * :attr:`stands_alone`: whether the source may be the only one.

    :ivar name: what the verdict's ``source`` names when an outcome has no ``origin``.
    """

    name: str

    #: ``False`` for a source that only adds opt-outs to what another one says (the ledger,
    #: which knows only the numbers reported to it): alone, it would let every other number
    #: through unchecked, so a filter whose sources all say ``False`` refuses to run.
    stands_alone: ClassVar[bool] = True

    def check_many(self, wanted: Mapping[str, Sequence[str]]) -> Iterator[CheckOutcome]:
        """See :meth:`BlocklistSource.check_many`."""
        raise NotImplementedError

    def stats(self) -> SourceStats:
        """Counters since the source was made (default: none kept)."""
        return SourceStats()

    def stream(self) -> CheckStream:
        """A stream to feed numbers to while the input is read."""
        return BufferedStream(self)

    def estimate_requests(self, wanted: Mapping[str, Sequence[str]]) -> int | None:
        """The paid requests :meth:`check_many` would make for ``wanted`` now, without making
        any; ``None`` when the source costs nothing (a local table)."""
        return None

    def with_budget(self, max_requests: int) -> BaseSource:
        """A source that makes at most ``max_requests`` requests and leaves the numbers past
        them unchecked (:class:`~blockfilter.errors.RequestBudgetExhausted`). A new one is the
        caller's, to :meth:`close`; ``self`` when the source makes no requests to count."""
        return self

    def reading_ahead(self, wanted: Mapping[str, Sequence[str]]) -> AbstractContextManager[None]:
        """Told, around a batch, which numbers it will ask about (a guess: the batch may ask
        fewer, or others), so a source with a remote cache can read them in one round trip;
        channels with no numbers may still be asked about (fallbacks). Default: nothing."""
        return nullcontext()

    def one_shot(self) -> None:
        """Told by a process that runs one campaign and ends (``blockfilter filter``): what
        only a later run would read back need not be kept."""

    def close(self) -> None:
        """Release what the source holds (threads, connections); called by whoever made it."""


class BufferedStream:
    """The default stream: checks everything at :meth:`finish`, at most :attr:`CHUNK`
    numbers a call to ``check_many`` (one call for a campaign of fewer).

    A million numbers wait here for the whole first pass: as strings they would cost some
    70 bytes each, so an E.164 number is kept as the 8-byte int of its digits until then
    (a channel given any other string keeps strings). Up to :attr:`AS_GIVEN` numbers (a
    worker's batch) are kept as the strings given, which their messages hold anyway:
    turning a few thousand numbers into ints and back cost more than checking them against
    a ledger that holds nothing.
    """

    CHUNK = 1 << 16
    AS_GIVEN = 10_000

    def __init__(self, source: BlocklistSource) -> None:
        self._source = source
        self._wanted: dict[str, array[int] | list[str]] = {}
        # The numbers as given, per channel, while they are few; None once compacted.
        self._given: dict[str, list[str]] | None = {}
        self._given_count = 0

    def add(self, channel: str, numbers: Sequence[str]) -> None:
        given = self._given
        if given is None:
            self._add_compact(channel, numbers)
            return
        given.setdefault(channel, []).extend(numbers)
        self._given_count += len(numbers)
        if self._given_count > self.AS_GIVEN:
            self._given = None
            for held_channel, held in given.items():
                self._add_compact(held_channel, held)

    def _add_compact(self, channel: str, numbers: Sequence[str]) -> None:
        held = self._wanted.setdefault(channel, array("q"))
        if isinstance(held, list):
            held.extend(numbers)
            return
        append = held.append
        for index, number in enumerate(numbers):
            key = _e164_key(number)
            if key is None:  # the channel's numbers as strings from now on, in their order
                strings = self._wanted[channel] = [f"+{key}" for key in held]
                strings.extend(numbers[index:])
                return
            append(key)

    def completed(self) -> Iterator[CheckOutcome]:
        return iter(())

    def finish(self) -> Iterator[CheckOutcome]:
        return self._check(self._take_wanted())

    def _take_wanted(self) -> Mapping[str, array[int] | list[str]]:
        """Every number held, per channel, in the order given; the stream holds none after."""
        given, wanted = self._given, self._wanted
        self._given, self._given_count, self._wanted = {}, 0, {}
        return given if given is not None else wanted

    def _check(self, wanted: Mapping[str, array[int] | list[str]]) -> Iterator[CheckOutcome]:
        group: dict[str, list[str]] = {}
        size = 0
        called = False
        for channel, held in wanted.items():
            start = 0
            while start < len(held):
                part = held[start : start + self.CHUNK - size]
                start += len(part)
                size += len(part)
                group[channel] = part if isinstance(part, list) else [f"+{key}" for key in part]
                if size == self.CHUNK:
                    yield from self._source.check_many(group)
                    group, size, called = {}, 0, True
        if group or not called:
            yield from self._source.check_many(group)


_MAX_KEY = (1 << 63) - 1  # what an array("q") holds


def _e164_key(number: str) -> int | None:
    """The digits of an E.164 number as an int, if they give it back exactly; else None."""
    try:
        key = int(number[1:])
    except ValueError:
        return None
    return key if 0 < key <= _MAX_KEY and f"+{key}" == number else None


class _AdaptedSource(BaseSource):
    """A source written to the least protocol, with the capabilities' defaults.

    ``stream()`` and ``estimate_requests()`` were optional methods of a source before they
    were capabilities: one that has them keeps them. Looked up here, once, so that nothing
    else needs to ask what a source can do.
    """

    def __init__(self, source: BlocklistSource) -> None:
        self.source = source
        self.name = str(getattr(source, "name", None) or type(source).__name__)
        self._stream: Callable[[], CheckStream] | None = getattr(source, "stream", None)
        self._estimate: Callable[[Mapping[str, Sequence[str]]], int | None] | None = getattr(
            source, "estimate_requests", None
        )

    def check_many(self, wanted: Mapping[str, Sequence[str]]) -> Iterator[CheckOutcome]:
        return self.source.check_many(wanted)

    def stats(self) -> SourceStats:
        return self.source.stats()

    def stream(self) -> CheckStream:
        return self._stream() if self._stream is not None else BufferedStream(self)

    def estimate_requests(self, wanted: Mapping[str, Sequence[str]]) -> int | None:
        return self._estimate(wanted) if self._estimate is not None else None

    def __repr__(self) -> str:
        return repr(self.source)


def as_source(source: BlocklistSource | BaseSource) -> BaseSource:
    """``source`` with every capability: itself when it is a :class:`BaseSource`, else
    adapted (its own ``check_many`` and ``stats``, the defaults for the rest)."""
    if isinstance(source, BaseSource):
        return source
    return _AdaptedSource(source)


class FunctionSource(BaseSource):
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
