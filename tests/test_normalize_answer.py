"""Reading the numbers of an API answer: every E.164 number an entry can mean."""

from __future__ import annotations

from blockfilter.numbers import normalize, normalize_answer, regions_of


def test_normalize_answer_reads_every_way_an_entry_can_be_meant() -> None:
    regions = regions_of(["+919812345678", "+12125550142", "+80012345678"])
    assert regions == {"IN", "US"}  # a non-geographic number has no national format
    expected = frozenset({"+919812345678"})
    for written in (
        "+919812345678",
        "919812345678",
        "+91 98123 45678",
        "+91-98123-45678",
        "91 (98123) 45678",
        "098123 45678",
        "9812345678",
        "0091 98123 45678",
    ):
        assert normalize_answer(written, regions) == expected, written
    assert normalize_answer("098123 45678") == frozenset()  # no region to read it in
    assert normalize_answer("2486393352", regions) == {"+12486393352", "+912486393352"}
    for nothing in ("", "abc", "+91 98123 4567x", "tel:+919812345678", "1" * 200, None, 919):
        assert normalize_answer(nothing, regions) == frozenset(), nothing


def test_every_meaning_is_what_normalize_gives_for_the_same_number() -> None:
    # The answer is read with the input's normaliser: what it finds is what a message holds.
    for number in ("+919812345678", "+12125550142", "+447400123456"):
        assert normalize_answer(number[1:], regions_of([number])) == {normalize(number)}


def test_regions_of_skips_what_has_no_region() -> None:
    assert regions_of([]) == frozenset()
    assert regions_of(["+80012345678", "+999", "not a number"]) == frozenset()
    assert regions_of(["+447400123456", "+12125550142"]) == {"GB", "US"}
