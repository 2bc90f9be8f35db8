"""Phone number normalisation: what users write in `to`, and the E.164 fast path's exactness."""

from __future__ import annotations

import re

import phonenumbers
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from phonenumbers import PhoneNumberFormat

from blockfilter.numbers import (
    MAX_INPUT_LENGTH,
    InvalidNumber,
    _normalize_e164_fast,
    _normalize_slow,
    _Plan,
    _plan_agrees_with_parse,
    _plan_for,
    is_known_region,
    normalize,
)


def outcome(function, raw, region=None):
    """A comparable result: the E.164 string, or ("invalid", detail)."""
    try:
        return function(raw, region)
    except InvalidNumber as exc:
        return ("invalid", exc.detail)


# phonenumbers' example number of every type in every region it supports (and the non-
# geographic calling codes): (region or None, E.164, national format).
EXAMPLES: list[tuple[str | None, str, str]] = []
for _region in sorted(phonenumbers.SUPPORTED_REGIONS):
    for _kind in range(11):
        _example = phonenumbers.example_number_for_type(_region, _kind)
        if _example is not None:
            EXAMPLES.append(
                (
                    _region,
                    phonenumbers.format_number(_example, PhoneNumberFormat.E164),
                    phonenumbers.format_number(_example, PhoneNumberFormat.NATIONAL),
                )
            )
for _code in sorted(phonenumbers.COUNTRY_CODES_FOR_NON_GEO_REGIONS):
    _example = phonenumbers.example_number_for_non_geo_entity(_code)
    if _example is not None:
        _e164 = phonenumbers.format_number(_example, PhoneNumberFormat.E164)
        EXAMPLES.append((None, _e164, _e164))


# -- what users write -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "region", "expected"),
    [
        # India: landline and mobile, national and E.164, with the usual separators.
        ("+918020000052", None, "+918020000052"),
        ("+91 80 2000 0052", None, "+918020000052"),
        ("+91-80-2000-0052", None, "+918020000052"),
        ("080 2000 0052", "IN", "+918020000052"),
        ("080-2000-0052", "in", "+918020000052"),
        ("98765 43210", "IN", "+919876543210"),
        ("+918020000052", "IN", "+918020000052"),
        # US: parentheses and dots.
        ("(201) 555-0123", "US", "+12015550123"),
        ("201.555.0123", "us", "+12015550123"),
        ("+1 201 555 0123", None, "+12015550123"),
        # UK: the national trunk 0, also when written after the country code.
        ("07400 123456", "GB", "+447400123456"),
        ("+44 7400 123456", None, "+447400123456"),
        ("+44 (0) 7400 123456", None, "+447400123456"),
        ("+4407400123456", None, "+447400123456"),
        # Singapore: no trunk prefix.
        ("8123 4567", "SG", "+6581234567"),
        ("+65 8123 4567", "sg", "+6581234567"),
        # An E.164 number is read the same whatever (known) region the message names.
        ("+447400123456", "IN", "+447400123456"),
        # Surrounding whitespace.
        ("  +918020000052\n", None, "+918020000052"),
        # Digits of other scripts, which phonenumbers normalises: Arabic-Indic, Devanagari,
        # fullwidth, and a mix with ASCII.
        ("٠٨٠٢٠٠٠٠٠٥٢", "IN", "+918020000052"),
        ("+९१८०२०००००५२", None, "+918020000052"),
        ("+９１８０２０００００５２", None, "+918020000052"),
        ("+91８0２0000052", None, "+918020000052"),
    ],
)
def test_normalize_gives_e164(raw: str, region: str | None, expected: str) -> None:
    assert normalize(raw, region) == expected
    assert _normalize_slow(raw, region) == expected


@pytest.mark.parametrize(
    ("raw", "region", "detail_has"),
    [
        ("", None, "empty"),
        ("   ", "IN", "empty"),
        ("+91 80 2000 005", None, "not a valid number"),  # one digit short
        ("+15550100000", None, "not a valid number"),  # 555-01xx: reserved for fiction
        ("080 2000 0052", None, "no country code"),  # national, but no region given
        ("+999 123 456 789", None, "unknown country calling code"),
        ("+91 80 2000 ABCD", None, "letters"),
        ("1-800-FLOWERS", "US", "letters"),  # vanity numbers are refused, not translated
        ("tel:+918020000052", None, "letters"),
        ("call +918020000052", None, "letters"),
        ("+", None, "not a phone number"),
        ("++--..", None, "not a phone number"),
        ("+918020000052", "ZZ", "unknown region 'ZZ'"),
        ("+918020000052", "india", "unknown region 'india'"),
        ("080 2000 0052", "", "unknown region ''"),
        ("080 2000 0052", "ın", "unknown region"),  # dotless i upper-cases to "IN"; not a code
    ],
)
def test_normalize_refuses(raw: str, region: str | None, detail_has: str) -> None:
    for function in (normalize, _normalize_slow):
        with pytest.raises(InvalidNumber) as caught:
            function(raw, region)
        assert caught.value.reason == "invalid_number"
        assert detail_has in caught.value.detail
        assert str(caught.value) == caught.value.detail


@pytest.mark.parametrize("raw", [None, 918020000052, 9.1, ["+918020000052"], b"+918020000052"])
def test_non_strings_are_invalid_not_a_crash(raw: object) -> None:
    with pytest.raises(InvalidNumber, match="must be a string, not"):
        normalize(raw)
    assert isinstance(InvalidNumber("x"), ValueError)


@pytest.mark.parametrize("region", [91, ["IN"], b"IN"])
def test_non_string_region_is_invalid(region: object) -> None:
    with pytest.raises(InvalidNumber, match="region must be a string"):
        normalize("+918020000052", region)  # type: ignore[arg-type]


def test_huge_input_is_refused_before_parsing() -> None:
    huge = "+91" + "8" * 100_000
    with pytest.raises(InvalidNumber, match="too long"):
        normalize(huge)
    assert normalize("+918020000052" + " " * (MAX_INPUT_LENGTH - 13)) == "+918020000052"
    with pytest.raises(InvalidNumber, match="too long"):
        normalize("+918020000052" + " " * (MAX_INPUT_LENGTH - 12))


def test_detail_never_holds_the_full_number() -> None:
    for raw in ("+91802000005", "+915550100000", "+4474001234567"):
        with pytest.raises(InvalidNumber) as caught:
            normalize(raw)
        detail = caught.value.detail
        assert raw not in detail and raw[1:] not in detail
        assert raw[:6] + "X" in detail  # the masked form: "+91802XXXX05"


def test_is_known_region() -> None:
    assert is_known_region("IN") and is_known_region("in") and is_known_region("Gb")
    assert not is_known_region("ZZ")
    assert not is_known_region("001")  # phonenumbers' non-geographic entity is not a region
    assert not is_known_region("")
    assert not is_known_region("ın")
    assert not is_known_region(None)  # type: ignore[arg-type]


# -- every example number of phonenumbers round-trips ---------------------------------------------


def test_every_example_number_round_trips() -> None:
    assert len(EXAMPLES) > 1000
    for region, e164, national in EXAMPLES:
        assert normalize(e164) == e164
        if region is not None:
            assert normalize(e164, region) == e164
            assert normalize(national, region) == e164
            assert normalize(national, region.lower()) == e164


@settings(max_examples=400, deadline=None)
@given(example=st.sampled_from(EXAMPLES), data=st.data())
def test_example_numbers_round_trip_in_any_format(example, data) -> None:
    region, e164, _ = example
    number = phonenumbers.parse(e164)
    style = data.draw(
        st.sampled_from(
            [PhoneNumberFormat.E164, PhoneNumberFormat.INTERNATIONAL, PhoneNumberFormat.NATIONAL]
        )
    )
    written = phonenumbers.format_number(number, style)
    if style == PhoneNumberFormat.NATIONAL and region is None:
        written = e164  # non-geographic numbers have no national format
    # Dashes for spaces, or the digits spread out: what people paste.
    written = data.draw(st.sampled_from([written, written.replace(" ", "-"), " ".join(written)]))
    given_region = (
        region
        if style == PhoneNumberFormat.NATIONAL
        else data.draw(st.sampled_from([None, region, "IN", "us"]))
    )
    assert normalize(written, given_region) == e164


# -- the fast path: same answers as phonenumbers.parse, faster -----------------------------------


def test_fast_path_agrees_on_every_example_and_its_near_misses() -> None:
    """The fast path decides validity from precompiled patterns; a digit changed, added or
    dropped from each example number lands on both sides of every validity boundary."""
    for _, e164, _ in EXAMPLES:
        digits = e164[1:]
        near = {e164, e164 + "0", e164[:-1], "+" + digits[:-1] + str((int(digits[-1]) + 1) % 10)}
        near.add("+" + digits[:3] + "0" + digits[3:])  # a trunk 0 after the country code
        for raw in near:
            assert outcome(normalize, raw) == outcome(_normalize_slow, raw), raw


def test_fast_path_takes_plain_e164_of_common_countries() -> None:
    """The fast path must actually answer (not hand over to parse) for everyday numbers."""
    for region in ("IN", "US", "GB", "SG", "DE", "BR", "AE", "ID", "FR", "IT", "CA", "AU"):
        kind = phonenumbers.PhoneNumberType.MOBILE
        e164 = phonenumbers.format_number(
            phonenumbers.example_number_for_type(region, kind), PhoneNumberFormat.E164
        )
        assert _normalize_e164_fast(e164, region_given=False) == e164
        assert _normalize_e164_fast(e164, region_given=True) == e164


def test_fast_path_checks_itself_against_parse() -> None:
    """A plan that disagrees with phonenumbers (a future release validating differently) is
    caught on first use, and that calling code falls back to the slow path."""
    real = _plan_for(91)
    assert real is not None and _plan_agrees_with_parse(91, real)
    accepts_everything = _Plan(real.national_prefix, lambda national: True)
    assert not _plan_agrees_with_parse(91, accepts_everything)
    rejects_everything = _Plan(None, lambda national: False)
    assert not _plan_agrees_with_parse(44, rejects_everything)


ODD_CHARS = "٠٣٩०५९０５９＋+ \u00a0\t\n-.()/xX#*;,aé"
ASCII_DIGITS = "0123456789"


def plus_and_digits() -> st.SearchStrategy[str]:
    """'+' and 0 to 20 ASCII digits: short, E.164-length and too long."""
    return st.integers(0, 20).flatmap(
        lambda size: st.text(ASCII_DIGITS, min_size=size, max_size=size).map(lambda d: "+" + d)
    )


@st.composite
def near_examples(draw: st.DrawFn) -> str:
    """An example number with up to three characters replaced, dropped or slipped in: digits
    or the odd characters people (and encodings) put in numbers."""
    chars = list(draw(st.sampled_from([e164 for _, e164, _ in EXAMPLES])))
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.integers(1, len(chars)))
        replacement = draw(st.sampled_from([*ASCII_DIGITS, *ODD_CHARS, ""]))
        if where < len(chars) and draw(st.booleans()):
            chars[where] = replacement
        else:
            chars.insert(where, replacement)
    return "".join(chars)


REGIONS = st.one_of(
    st.none(),
    st.sampled_from(["IN", "us", "GB", "SG", "AR", "IT", "BR", "RU", "KZ", "ZZ", "", "i"]),
)


@settings(max_examples=500, deadline=None)
@given(
    raw=st.one_of(
        plus_and_digits(),
        near_examples(),
        st.text(ASCII_DIGITS + ODD_CHARS, max_size=24),
        st.text(max_size=24),
    ),
    region=REGIONS,
)
@example(raw="+4930000000000000", region=None)  # 16 digits, which phonenumbers deems valid
def test_fast_path_equals_slow_path(raw: str, region: str | None) -> None:
    result = outcome(normalize, raw, region)
    assert result == outcome(_normalize_slow, raw, region)
    if isinstance(result, str):
        # Whatever was written, the answer is plain E.164: '+', ASCII digits, at most 15.
        assert re.fullmatch(r"\+[0-9]{5,15}", result)
