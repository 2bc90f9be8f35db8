"""Phone numbers to E.164, the only form the blocklist API and the cache know.

:func:`normalize` accepts a number written in E.164 (``+918020000052``) or, when a region is
given, in that region's national format (``080 2000 0052`` with ``IN``), with the spaces, dashes,
dots and parentheses people write. The `phonenumbers` library does the real work; this module
adds two things on top:

* **Strictness.** A number must be *valid* (``phonenumbers.is_valid_number``), not merely
  *possible*: the blocklist only holds real, assigned numbers, so a typo or an unassigned range is
  reported as ``invalid_number`` instead of costing an API lookup and then being sent to. Letters
  are refused too (phonenumbers would read ``1-800-FLOWERS`` or ``tel:`` URIs), because a message
  recipient with letters in it is a data error far more often than a vanity number.
* **A fast path for E.164 input**, which is what nearly every message carries. A full
  ``phonenumbers.parse`` spends most of its time finding a number inside free text; for a plain
  ``+`` and ASCII digits we go straight to the country calling code and decide validity with one
  precompiled regular expression per (calling code, length), built lazily from phonenumbers' own
  metadata. The answer is the same as the slow path's, by construction and by test; the few
  inputs where replicating phonenumbers would mean copying more of its logic (a national prefix
  after the country code, ``+`` followed by an unknown calling code with a region given) take the
  slow path. No cache: a cold number is as cheap as a hot one, and memory stays flat.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Collection, Iterable
from typing import Final

import phonenumbers
from phonenumbers import (
    COUNTRY_CODE_TO_REGION_CODE,
    NumberParseException,
    PhoneMetadata,
    PhoneNumberDesc,
    PhoneNumberFormat,
    PhoneNumberType,
)

from .errors import InvalidNumber
from .redact import mask_number

__all__ = [
    "MAX_INPUT_LENGTH",
    "InvalidNumber",
    "is_known_region",
    "normalize",
    "normalize_answer",
    "regions_of",
]

log = logging.getLogger("blockfilter.numbers")

# Longer input is refused before any parsing: a formatted number is ~20 characters, and
# phonenumbers' own limit is 250. Keeps a 100 kB garbage field from costing anything.
MAX_INPUT_LENGTH: Final = 100

# E.164 as the fast path takes it: "+" and 8 to 15 ASCII digits. Not \d, which also matches
# Arabic-Indic or fullwidth digits; those go to the slow path, which normalises them.
_E164_ASCII: Final = re.compile(r"\+[0-9]{8,15}").fullmatch

# phonenumbers never holds a national significant number longer than this.
_MAX_NSN_LENGTH: Final = 17


def _calling_codes_by_first_digits() -> dict[str, tuple[int, int]]:
    """Every 3-digit start -> (calling code, its length), as phonenumbers extracts it: the
    shortest prefix (1 to 3 digits) that is a known code. One slice and one lookup per number."""
    table = {}
    for start in range(1000):
        digits = f"{start:03d}"
        for size in (1, 2, 3):
            code = int(digits[:size])
            if digits[0] != "0" and code in COUNTRY_CODE_TO_REGION_CODE:
                table[digits] = (code, size)
                break
    return table


_CALLING_CODES: Final = _calling_codes_by_first_digits()


def is_known_region(region: str) -> bool:
    """Whether phonenumbers has numbering data for ``region`` (ISO 3166 alpha-2, any case)."""
    # isascii(): "ın".upper() == "IN" (Turkish dotless i), and that is not a region code.
    return (
        isinstance(region, str)
        and region.isascii()
        and region.upper() in phonenumbers.SUPPORTED_REGIONS
    )


def normalize(raw: object, region: str | None = None) -> str:
    """The E.164 form (``+918020000052``) of ``raw``, or :class:`InvalidNumber`.

    :param raw: the number, in E.164 or, with ``region``, in that region's national format.
        Anything else (``None``, an int, a list, a 100 kB string) raises :class:`InvalidNumber`.
    :param region: ISO 3166 alpha-2 code, case-insensitive, used to read national formats.
        An E.164 number is read the same with or without it; an unknown region is an error
        even then, because a wrong region on a message is worth hearing about.
    :raises InvalidNumber: not a number, letters in it, or a number phonenumbers does not deem
        *valid* (``is_valid_number``: a real, assigned range of the right length), not just
        *possible*. The blocklist holds real numbers only, so anything else is a typo.
    """
    text, region_code = _checked(raw, region)
    if _E164_ASCII(text):
        e164 = _normalize_e164_fast(text, region_given=region_code is not None)
        if e164 is not None:
            return e164
    return _parse(text, region_code)


def normalize_answer(raw: object, regions: Collection[str] = ()) -> frozenset[str]:
    """Every E.164 number an entry of an API answer (its ``mobile``) can mean; empty if none.

    The API is documented to answer E.164, but may write a number another way; read wrongly,
    a blocklisted number would match nothing asked and pass as clean. So the entry is read
    with the same :func:`normalize` as the input, every way it can be meant:

    * as written (``+91 98123 45678``, ``+91-98123-45678``);
    * as E.164 that lost its ``+``, when it is only digits and separators (``919812345678``);
    * in the national format of each of ``regions`` (``098123 45678`` with ``IN``): pass the
      regions of the numbers asked (:func:`regions_of`).

    A caller must treat every meaning as blocklisted (an entry that could mean several asked
    numbers blocks them all) and an entry with no meaning among the numbers asked as a bad
    answer, never as "not blocklisted". Never raises: anything unreadable means nothing.
    """
    if not isinstance(raw, str) or len(raw) > MAX_INPUT_LENGTH:
        return frozenset()
    meanings: set[str] = set()
    _add_meaning(meanings, raw, None)
    digits = _ANSWER_SEPARATORS.sub("", raw)
    if digits.isascii() and digits.isdigit():
        _add_meaning(meanings, "+" + digits, None)
    for region in regions:
        _add_meaning(meanings, raw, region)
    return frozenset(meanings)


def regions_of(numbers: Iterable[str]) -> frozenset[str]:
    """The regions (ISO 3166 alpha-2) of E.164 numbers, for :func:`normalize_answer`.

    Numbers of no region (non-geographic ``+800``..., invalid ones) add none: they have no
    national format to read.
    """
    regions: set[str] = set()
    for number in numbers:
        try:
            region = phonenumbers.region_code_for_number(phonenumbers.parse(number, None))
        except NumberParseException:
            continue
        if region and is_known_region(region):
            regions.add(region)
    return frozenset(regions)


# What may stand between the digits of an E.164 number written without its "+".
_ANSWER_SEPARATORS: Final = re.compile(r"[\s\-().]")


def _add_meaning(meanings: set[str], text: str, region: str | None) -> None:
    with contextlib.suppress(InvalidNumber):
        meanings.add(normalize(text, region))


def _normalize_slow(raw: object, region: str | None = None) -> str:
    """:func:`normalize` without the fast path: the reference it must agree with (tests)."""
    return _parse(*_checked(raw, region))


# -- the checks both paths share ------------------------------------------------------------


def _checked(raw: object, region: object) -> tuple[str, str | None]:
    """Refuse what neither path should see; return the number and the upper-case region."""
    if not isinstance(raw, str):
        raise InvalidNumber(f"the number must be a string, not {type(raw).__name__}")
    if len(raw) > MAX_INPUT_LENGTH:
        raise InvalidNumber(
            f"too long to be a phone number ({len(raw)} characters, at most {MAX_INPUT_LENGTH})"
        )
    if region is None:
        return raw, None
    if not isinstance(region, str):
        raise InvalidNumber(f"the region must be a string, not {type(region).__name__}")
    if not is_known_region(region):
        raise InvalidNumber(
            f"unknown region {region[:20]!r}: expected an ISO 3166 alpha-2 code such as 'IN'"
        )
    return raw, region.upper()


def _not_valid(e164: str) -> InvalidNumber:
    return InvalidNumber(
        f"{mask_number(e164)} is not a valid number (unassigned range or wrong length)"
    )


# -- the slow path: phonenumbers.parse --------------------------------------------------------


_E164_MAX_LENGTH = 16  # "+" and 15 digits


def _parse(raw: str, region_code: str | None) -> str:
    if not raw.strip():
        raise InvalidNumber("the number is empty")
    if any(char.isalpha() for char in raw):
        raise InvalidNumber("letters in the number: give digits, spaces, dashes and '+' only")
    try:
        number = phonenumbers.parse(raw, region_code)
    except NumberParseException as exc:
        raise InvalidNumber(_parse_error_detail(exc, raw)) from None
    e164 = phonenumbers.format_number(number, PhoneNumberFormat.E164)
    # E.164 allows 15 digits at most; phonenumbers' metadata deems some longer ones valid
    # (+49 30000000000000), which the API could never be asked about.
    if len(e164) > _E164_MAX_LENGTH or not phonenumbers.is_valid_number(number):
        raise _not_valid(e164)
    return e164


def _parse_error_detail(exc: NumberParseException, raw: str) -> str:
    # Built from the error type, never from exc's text, so no digits of the input leak through.
    kind = exc.error_type
    if kind == NumberParseException.INVALID_COUNTRY_CODE:
        # phonenumbers reads the number from its first digit or plus sign; a plus there means
        # a calling code was written but is unknown, else none was written and no region given.
        start = next((char for char in raw if char in "+＋" or char.isdigit()), "")
        if start not in "+＋":
            return "no country code: write the number as +<country code>... or give a region"
        return "unknown country calling code after '+'"
    if kind in (NumberParseException.TOO_SHORT_NSN, NumberParseException.TOO_SHORT_AFTER_IDD):
        return "too short to be a phone number"
    if kind == NumberParseException.TOO_LONG:
        return "too long to be a phone number"
    return "not a phone number"


# -- the fast path: "+" and ASCII digits --------------------------------------------------------

_Check = Callable[[str], bool]


def _normalize_e164_fast(raw: str, *, region_given: bool) -> str | None:
    """What :func:`_parse` gives for ``raw`` (already known to be ``+`` and 8..15 ASCII
    digits), or ``None`` when this input must take the slow path.

    Mirrors ``phonenumbers.parse`` for such input: the country calling code is the shortest
    prefix (1 to 3 digits) that is one; the rest is the national significant number unless the
    country's national prefix pattern matches it (``+44 07400...``), which we leave to parse.
    The E.164 form is then the input itself.
    """
    found = _CALLING_CODES.get(raw[1:4])
    if found is None:
        if region_given:
            # parse then retries the digits as a national number of that region.
            return None
        raise InvalidNumber("unknown country calling code after '+'")
    code, size = found
    plan = _PLANS.get(code, _UNBUILT)
    if plan is _UNBUILT:
        plan = _plan_for(code)
    if plan is None:
        return None
    national = raw[1 + size :]
    if plan.national_prefix is not None and plan.national_prefix(national):
        return None
    if plan.is_valid(national):
        return raw
    raise _not_valid(raw)


class _Plan:
    """What the fast path needs to know about one country calling code."""

    __slots__ = ("is_valid", "national_prefix")

    def __init__(self, national_prefix: Callable[[str], object] | None, is_valid: _Check) -> None:
        self.national_prefix = national_prefix
        self.is_valid = is_valid


# Built on first use of each calling code. A race only builds a plan twice; dict writes are
# atomic, so no lock is needed.
_PLANS: dict[int, _Plan | None] = {}
_UNBUILT: Final = _Plan(None, lambda national: False)


def _plan_for(code: int) -> _Plan | None:
    plan = _build_plan(code)
    if plan is not None and not _plan_agrees_with_parse(code, plan):
        # A phonenumbers release changed how it validates: stay correct, if slower.
        log.warning("fast path disabled for +%d: it disagrees with phonenumbers", code)
        plan = None
    _PLANS[code] = plan
    return plan


def _build_plan(code: int) -> _Plan | None:
    main_region = phonenumbers.region_code_for_country_code(code)
    metadata = PhoneMetadata.metadata_for_region_or_calling_code(code, main_region)
    if metadata is None:
        return None
    prefix = metadata.national_prefix_for_parsing
    national_prefix = re.compile(prefix).match if prefix else None
    regions = COUNTRY_CODE_TO_REGION_CODE[code]
    if len(regions) == 1:
        return _Plan(national_prefix, _valid_for_region(code, regions[0]))
    return _Plan(national_prefix, _valid_for_shared_code(code, regions))


def _valid_for_shared_code(code: int, regions: tuple[str, ...]) -> _Check:
    """``is_valid_number`` for a calling code several regions share (+1, +7, +44...).

    phonenumbers first picks the region: the first one whose ``leading_digits`` match, or, for
    a region without them, whose patterns the number matches; it is then valid only if valid
    for that region.
    """
    choices: list[tuple[Callable[[str], object] | None, _Check, _Check]] = []
    for region in regions:
        metadata = PhoneMetadata.metadata_for_region(region.upper(), None)
        if metadata is None:
            continue
        leading_digits = metadata.leading_digits
        leading = None if leading_digits is None else re.compile(leading_digits).match
        matches_type = _matches_some_type(metadata)
        choices.append((leading, matches_type, _valid_for_region(code, region, matches_type)))

    def is_valid(national: str) -> bool:
        for leading, matches_type, valid_in_region in choices:
            if leading is not None:
                if leading(national):
                    return valid_in_region(national)
            elif matches_type(national):
                # The usual case: the region's own patterns, just matched.
                return valid_in_region is matches_type or valid_in_region(national)
        return False

    return is_valid


def _never(national: str) -> bool:
    return False


def _valid_for_region(code: int, region: str, built: _Check | None = None) -> _Check:
    """``is_valid_number_for_region`` for numbers with calling code ``code``.

    ``built``: the matcher already built for this region's metadata, to reuse (and, being the
    same object, to let the caller skip a second identical check)."""
    metadata = PhoneMetadata.metadata_for_region_or_calling_code(code, region.upper())
    if metadata is None:
        return _never
    if region != phonenumbers.REGION_CODE_FOR_NON_GEO_ENTITY and (
        code != phonenumbers.country_code_for_valid_region(region)
    ):
        return _never
    if built is not None and metadata is PhoneMetadata.metadata_for_region(region.upper(), None):
        return built
    return _matches_some_type(metadata)


def _matches_some_type(metadata: PhoneMetadata) -> _Check:
    """``number_type(...) != UNKNOWN`` for a national significant number, as one regex.

    phonenumbers checks the general description, then each number type in turn, each by its
    possible lengths and then its pattern. For a given length that is: the general pattern
    matches the whole number, and so does one of the type patterns allowed at that length;
    a lookahead and an alternation say exactly that, in one call.
    """
    general = metadata.general_desc
    types = [
        metadata.premium_rate,
        metadata.toll_free,
        metadata.shared_cost,
        metadata.voip,
        metadata.personal_number,
        metadata.pager,
        metadata.uan,
        metadata.voicemail,
        metadata.fixed_line,
    ]
    # phonenumbers only looks at mobile when its pattern differs from fixed line's.
    if not metadata.same_mobile_and_fixed_line_pattern:
        types.append(metadata.mobile)
    by_length: dict[int, Callable[[str], object]] = {}
    if general is None or not general.national_number_pattern:
        return _never
    for length in range(1, _MAX_NSN_LENGTH + 1):
        if not _allows_length(general, length):
            continue
        alternatives = [
            f"(?:{desc.national_number_pattern})"
            for desc in types
            if desc is not None and desc.national_number_pattern and _allows_length(desc, length)
        ]
        if alternatives:
            pattern = f"(?=(?:{general.national_number_pattern})\\Z)(?:{'|'.join(alternatives)})"
            by_length[length] = re.compile(pattern).fullmatch

    def matches(national: str) -> bool:
        fullmatch = by_length.get(len(national))
        return fullmatch is not None and fullmatch(national) is not None

    return matches


def _allows_length(desc: PhoneNumberDesc, length: int) -> bool:
    # No possible lengths listed means "as the general description", already checked.
    return not desc.possible_length or length in desc.possible_length


def _plan_agrees_with_parse(code: int, plan: _Plan) -> bool:
    """Spot-check a new plan against the slow path on phonenumbers' example numbers of every
    type in every region of ``code``, and on near misses of them (a digit changed, added,
    dropped). Runs once per calling code per process: a few milliseconds."""
    examples: list[phonenumbers.PhoneNumber | None] = []
    for region in COUNTRY_CODE_TO_REGION_CODE[code]:
        for kind in _NUMBER_TYPES:
            if region == phonenumbers.REGION_CODE_FOR_NON_GEO_ENTITY:
                examples.append(phonenumbers.example_number_for_non_geo_entity(code))
            else:
                examples.append(phonenumbers.example_number_for_type(region, kind))
    candidates: set[str] = set()
    for example in examples:
        if example is None:
            continue
        e164 = phonenumbers.format_number(example, PhoneNumberFormat.E164)
        last = "5" if e164[-1] != "5" else "6"
        candidates.update((e164, e164[:-1] + last, e164 + "0", e164[:-1]))
    for candidate in candidates:
        if not _E164_ASCII(candidate):
            continue
        national = candidate[1 + len(str(code)) :]
        if plan.national_prefix is not None and plan.national_prefix(national):
            continue
        try:
            expected = _parse(candidate, None) == candidate
        except InvalidNumber:
            expected = False
        if plan.is_valid(national) != expected:
            return False
    return True


_NUMBER_TYPES: Final = tuple(
    value
    for name, value in vars(PhoneNumberType).items()
    if name.isupper() and isinstance(value, int) and name != "UNKNOWN"
)
