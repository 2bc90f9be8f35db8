"""What the engine's pieces hold per distinct number: the same answers from compact
structures, and (by tracemalloc, at a modest size) no temporary copy of a whole pass."""

from __future__ import annotations

import random
import tracemalloc
from array import array
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest

from blockfilter.config import CHANNELS
from blockfilter.engine.lines import DuplicateIds
from blockfilter.engine.table import ASKED, BLOCKED, CLEAN, FAILED, StatusTable
from blockfilter.sources import BaseSource, BufferedStream, CheckOutcome

A = "+919812345678"

MiB = 1 << 20


def duplicates_found(hashes: list[int]) -> list[bool]:
    ids = DuplicateIds()
    ids.first_pass_hashes.extend(hashes)
    ids.close_first_pass()
    assert not ids.first_pass_hashes  # emptied: the later passes need only the suspects
    checker = ids.pass_checker()
    if checker is None:
        return [False] * len(hashes)
    # Each "id" is its own hash here, so a repeat of a hash is a repeat of an id.
    return [checker(_id_with_hash(value)) for value in hashes]


class _id_with_hash(str):
    """A string whose hash is given, so that a test can pick hashes that meet."""

    def __new__(cls, value: int) -> _id_with_hash:
        made = super().__new__(cls, str(value))
        made._hash = value
        return made

    def __hash__(self) -> int:
        return self._hash


@pytest.mark.parametrize("sort_at_once", [DuplicateIds.SORT_AT_ONCE, 5])
def test_repeated_ids_are_found_whether_hashes_are_sorted_whole_or_split(
    monkeypatch: pytest.MonkeyPatch, sort_at_once: int
) -> None:
    monkeypatch.setattr(DuplicateIds, "SORT_AT_ONCE", sort_at_once)
    monkeypatch.setattr(DuplicateIds, "_SLICE", 3)
    # Values that share their low bits (one share) and values that do not, negative ones too.
    hashes = [1, 65, 129, 1, -7, 2**62, -7, 64 * 5 + 1, 3, 2**62, 2**62]
    assert duplicates_found(hashes) == [
        False, False, False, True, False, False, True, False, False, True, True,
    ]  # fmt: skip
    assert duplicates_found(list(range(40))) == [False] * 40


def test_the_duplicate_check_sorts_no_list_of_every_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    count = 200_000
    monkeypatch.setattr(DuplicateIds, "SORT_AT_ONCE", 1 << 12)
    ids = DuplicateIds()
    ids.first_pass_hashes.extend(array("q", range(0, count * 7919, 7919)))
    tracemalloc.start()
    try:
        ids.close_first_pass()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert ids.pass_checker() is None
    # The hashes themselves (1.6 MB) move into their shares; a sorted list of them all would
    # add some 8 MB (an int object and a pointer a hash).
    assert peak < 3 * MiB


# -- the status table ------------------------------------------------------------------------


class DictTable:
    """The status table as it was, a dict a channel: what the compact one must answer."""

    def __init__(self) -> None:
        self.status: dict[tuple[str, int], tuple[Any, ...]] = {}

    def want(self, channel: str, key: int) -> bool:
        if (channel, key) in self.status:
            return False
        self.status[channel, key] = ASKED
        return True

    def record(self, outcome: CheckOutcome, origin: str) -> None:
        rank = {CLEAN: 0, FAILED: 1, BLOCKED: 2}
        for number in outcome.numbers:
            key = (outcome.channel, int(number[1:]))
            old = self.status.get(key, ASKED)
            if outcome.error is not None:
                if old[0] != BLOCKED:
                    self.status[key] = (FAILED, "check_failed")
                continue
            kind = BLOCKED if number in outcome.blocked else CLEAN
            new = (kind, outcome.checked_at, origin, None)
            learnt_earlier = kind == old[0] and new[1] < old[1]
            if old is ASKED or rank[kind] > rank[old[0]] or learnt_earlier:
                self.status[key] = new

    def lookup(self, channel: str, key: int) -> tuple[Any, ...] | None:
        return self.status.get((channel, key))


@pytest.mark.parametrize("expected", [0, 5, 10_000])
def test_the_status_table_answers_as_a_dict_of_every_number_would(expected: int) -> None:
    # Sized up front or not, and whether the hint is right: the same answers.
    rng = random.Random(7)
    # Few distinct numbers, so that numbers are asked, answered and answered again; some of
    # them one apart, or far apart with equal low digits.
    numbers = [
        f"+91{9800000000 + rng.choice([0, 1, 2, 10**6, 2**20, 2**30]) + i}" for i in range(60)
    ]
    compact, reference = StatusTable(expected), DictTable()
    for step in range(3000):
        channel = rng.choice(CHANNELS)
        picked = rng.sample(numbers, rng.randint(1, 8))
        if rng.random() < 0.4:
            for number in picked:
                key = int(number[1:])
                assert compact.want(channel, key) == reference.want(channel, key)
            continue
        kind = rng.random()
        if kind < 0.2:
            outcome = CheckOutcome(channel, picked, error=ConnectionError("down"))
        else:
            blocked = frozenset(n for n in picked if rng.random() < 0.3)
            outcome = CheckOutcome(channel, picked, blocked, float(rng.randint(1, 50)))
        origin = f"source{step % 3}"
        compact.record(outcome, origin)
        reference.record(outcome, origin)
    for channel in CHANNELS:
        for number in [*numbers, "+919999999999"]:
            key = int(number[1:])
            assert compact.lookup(channel, key) == reference.lookup(channel, key), number
        # What the fallback rounds look at first: exactly the numbers blocklisted there.
        blocked = {
            key
            for (named, key), status in reference.status.items()
            if named == channel and status[0] == BLOCKED
        }
        assert compact.blocked_keys(channel) == blocked, channel


def test_a_key_beyond_the_arrays_is_blocklisted_like_any_other() -> None:
    # No E.164 number makes one, but a source may answer with any digits.
    huge = "+" + "9" * 20
    table = StatusTable()
    table.record(CheckOutcome("sms", [huge, A], frozenset({huge, A}), 1.0), "src")
    assert table.lookup("sms", int(huge[1:]))[0] == BLOCKED  # type: ignore[index]
    assert table.blocked_keys("sms") == {int(huge[1:]), int(A[1:])}
    assert table.blocked_keys("whatsapp") == set()


def test_a_failed_check_is_not_cleared_by_a_later_clean_answer() -> None:
    table = StatusTable()
    key = int(A[1:])
    assert table.want("sms", key)
    table.record(CheckOutcome("sms", [A], error=ConnectionError("down")), "one")
    table.record(CheckOutcome("sms", [A], frozenset(), 5.0), "two")
    assert table.lookup("sms", key) == (FAILED, "check_failed")
    assert not table.want("sms", key)


def test_the_status_table_holds_a_number_in_bytes_not_objects() -> None:
    count = 100_000
    numbers = [f"+9198{i:08d}" for i in range(count)]
    answer = CheckOutcome("sms", numbers, frozenset(numbers[::20]), 1.0)
    tracemalloc.start()
    try:
        table = StatusTable()
        for number in numbers:
            table.want("sms", int(number[1:]))
        table.record(answer, "api")
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert table.lookup("sms", int(numbers[20][1:]))[0] == BLOCKED  # type: ignore[index]
    # A dict of int keys costs some 80 bytes a number (8 MB here, 10 MB at its peak); the
    # arrays at most 24 bytes, and their old copy while they grow.
    assert peak < 5 * MiB


# -- the default stream ----------------------------------------------------------------------


class Recording(BaseSource):
    name = "recording"

    def __init__(self) -> None:
        self.calls: list[dict[str, list[str]]] = []

    def check_many(self, wanted: Mapping[str, Sequence[str]]) -> Iterator[CheckOutcome]:
        self.calls.append({channel: list(numbers) for channel, numbers in wanted.items()})
        for channel, numbers in wanted.items():
            yield CheckOutcome(channel, list(numbers), frozenset(), 1.0)


def test_the_default_stream_asks_once_for_a_small_campaign_and_in_chunks_past_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sms = [f"+9198{i:08d}" for i in range(5)]
    voice = ["+14155550123", "+447400123456"]
    source = Recording()
    stream = BufferedStream(source)
    stream.add("sms", sms[:2])
    stream.add("voice", voice)
    stream.add("sms", sms[2:])
    assert [o.numbers for o in stream.finish()] == [sms, voice]
    assert source.calls == [{"sms": sms, "voice": voice}]

    monkeypatch.setattr(BufferedStream, "CHUNK", 3)
    source = Recording()
    stream = BufferedStream(source)
    stream.add("sms", sms)
    stream.add("voice", voice)
    list(stream.finish())
    assert source.calls == [
        {"sms": sms[:3]},
        {"sms": sms[3:], "voice": voice[:1]},
        {"voice": voice[1:]},
    ]
    assert list(BufferedStream(source).finish()) == [] and source.calls[-1] == {}


def test_the_default_stream_gives_back_strings_that_are_not_plain_e164_as_they_were() -> None:
    odd = [
        "+919812345678",
        "+91 98123 45679",
        "+0123",
        "919812345680",
        "+٩١٩٨١٢٣٤٥٦٧٨",
        "+919812345681",
    ]
    source = Recording()
    stream = BufferedStream(source)
    stream.add("sms", odd[:2])
    stream.add("sms", odd[2:])
    stream.add("whatsapp", odd[-1:])
    list(stream.finish())
    assert source.calls == [{"sms": odd, "whatsapp": odd[-1:]}]


def test_the_default_stream_holds_a_waiting_number_in_8_bytes() -> None:
    count = 100_000
    tracemalloc.start()
    try:
        stream = BufferedStream(Recording())
        for start in range(0, count, 500):
            stream.add("sms", [f"+9198{i:08d}" for i in range(start, start + 500)])
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # As strings, the numbers would be some 6 MB here (and 70 MB at a million).
    assert held < 2 * MiB
    assert sum(len(o.numbers) for o in stream.finish()) == count


def test_the_default_stream_gives_back_what_it_held_as_given_and_compacted_alike(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A few numbers are held as given; past AS_GIVEN every channel's are compacted to ints
    # (strings that are not plain E.164 stay strings): the source is asked the same either way.
    sms = [f"+9198{i:08d}" for i in range(4)] + ["+0123", "+919812345690"]
    voice = ["+14155550123", "+447400123456"]
    asked = []
    for as_given in (BufferedStream.AS_GIVEN, 3):
        monkeypatch.setattr(BufferedStream, "AS_GIVEN", as_given)
        source = Recording()
        stream = BufferedStream(source)
        stream.add("sms", sms[:2])
        stream.add("voice", voice)
        stream.add("sms", sms[2:])
        assert [o.numbers for o in stream.finish()] == [sms, voice]
        assert list(stream.finish()) == [] and source.calls[-1] == {}  # nothing held after
        asked.append(source.calls[0])
    assert asked == [{"sms": sms, "voice": voice}] * 2
