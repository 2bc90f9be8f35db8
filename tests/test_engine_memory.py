"""What the engine's pieces hold per distinct number: the same answers from compact
structures, and (by tracemalloc, at a modest size) no temporary copy of a whole pass."""

from __future__ import annotations

import tracemalloc
from array import array

import pytest

from blockfilter.engine.lines import DuplicateIds

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
