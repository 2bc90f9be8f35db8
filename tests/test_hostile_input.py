"""Hostile and odd input: the contract's ``invalid`` reasons or a clear error, never a crash,
never a hang, memory bounded.

Property-based tests (hypothesis) throw arbitrary JSON-ish messages and arbitrary bytes at the
message parser, the number normaliser and the filter; a corpus of odd files goes through the
command line as a user runs it, against the simulator over HTTP.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockfilter import model as messages_module
from blockfilter.config import CHANNELS, load_settings
from blockfilter.engine.filter import Filter
from blockfilter.engine.lines import MAX_LINE_BYTES, text_repeats_a_key
from blockfilter.model import VERDICT_FIELDS, Invalid, Parsed, has_usable_id, parse_message
from blockfilter.numbers import InvalidNumber, normalize
from blockfilter.sources import FunctionSource
from blockfilter.testing.simulator import Simulator
from tests.support.env import subprocess_env
from tests.test_cli import blockfilter, numbers

REASONS = {
    "blocklisted",
    "invalid_number",
    "unknown_channel",
    "missing_field",
    "malformed_line",
    "duplicate_id",
    "check_failed",
    "credentials_refused",
    "unchecked",
}
INVALID_REASONS = {"invalid_number", "unknown_channel", "missing_field", "malformed_line"}
VERDICTS = {"allowed", "rerouted", "blocked", "invalid", "deferred"}
E164 = re.compile(r"\+[1-9][0-9]{6,14}")

# Valid numbers, and the same numbers as people and spreadsheets write them.
VALID = ["+919812345678", "+919812345679", "+447400123456", "+14155550123", "+918020000052"]
SPELLINGS = [
    "+91 98123 45678",
    "+91-98123-45678",
    "+91 (98123) 45678",
    "＋９１９８１２３４５６７８",  # fullwidth
    "+٩١٩٨١٢٣٤٥٦٧٨",  # Arabic-Indic
    "+९१९८१२३४५६७८",  # Devanagari
]

# -- strategies ---------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
channels = st.sampled_from(["sms", "SMS", "WhatsApp", "voice", "Voice ", "fax", "", "rcs"])
phone_text = st.text(alphabet="+0123456789 -().٠١٢٣٤٥٦٧٨٩０１２３Oo", max_size=18)
numbers_ = st.sampled_from(VALID + SPELLINGS + ["098123 45678", "12", "+999123456789"]) | phone_text
regions = st.sampled_from(["IN", "in", "US", "GB", "ZZ", "", "ın", "india"])
message_fields = {
    "id": st.text(min_size=0, max_size=4) | json_values,
    "channel": channels | json_values,
    "to": numbers_ | json_values,
    "region": regions | json_values,
    "fallback": st.lists(channels | json_values, max_size=3) | json_values,
    "payload": json_values,
    "verdict": json_values,
}
odd_messages = st.fixed_dictionaries({}, optional=message_fields)
# Mostly usable messages, so verdicts other than invalid are exercised too.
good_messages = st.fixed_dictionaries(
    {
        "id": st.text(alphabet="abc123", min_size=1, max_size=3),
        "channel": st.sampled_from(["sms", "whatsapp", "voice", "SMS"]),
        "to": st.sampled_from(VALID + SPELLINGS),
    },
    optional={
        "fallback": st.lists(st.sampled_from(CHANNELS), max_size=3),
        "payload": json_values,
    },
)
any_messages = st.one_of(good_messages, odd_messages, json_values)


def blocked_on(channel: str, e164: str) -> bool:
    """The test blocklist: a fixed rule per channel, so every verdict can be recomputed."""
    digit = int(e164[-1])
    return {"sms": digit % 2 == 0, "whatsapp": digit % 4 == 0, "voice": digit == 8}[channel]


def lookup(channel: str, batch: list[str]) -> set[str]:
    return {number for number in batch if blocked_on(channel, number)}


def make_filter(**options: Any) -> Filter:
    return Filter(load_settings(environ={}), sources=[FunctionSource("rule", lookup)], **options)


# -- the parser ------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=st.one_of(odd_messages, good_messages, json_values))
def test_parse_message_never_raises_and_answers_with_the_contract(message: Any) -> None:
    result = parse_message(message)
    assert isinstance(result, (Parsed, Invalid))
    if isinstance(result, Invalid):
        assert result.reason in INVALID_REASONS and isinstance(result.detail, str)
        if not isinstance(message, dict):
            assert result.reason == "malformed_line"
        elif any(message.get(name) is None for name in ("id", "channel", "to")):
            assert result.reason == "missing_field"
    else:
        assert isinstance(message, dict)
        assert result.id == message["id"] and isinstance(result.id, str) and result.id
        assert result.channel == message["channel"].lower() and result.channel in CHANNELS
        assert E164.fullmatch(result.e164) and result.key == int(result.e164[1:])
        assert result.e164 == normalize(message["to"], message.get("region"))
        assert result.fallback == tuple(c.lower() for c in message.get("fallback") or ())
        assert set(result.fallback) <= set(CHANNELS)
    # The parser remembers recent answers: a remembered answer is the answer.
    messages_module._routes.clear()
    fresh = parse_message(message)
    if isinstance(result, Parsed):
        assert fresh == result
    else:
        assert isinstance(fresh, Invalid) and fresh.reason == result.reason


def test_a_remembered_list_fallback_does_not_validate_a_tuple() -> None:
    """Found by the property above's reasoning: (1,) == [1] as memo keys once made a tuple
    fallback (not JSON, but the Python API takes dicts) reuse a list's answer."""
    listed = {"id": "a", "channel": "sms", "to": VALID[0], "fallback": ["voice"]}
    tupled = {"id": "b", "channel": "sms", "to": VALID[0], "fallback": ("voice",)}
    assert isinstance(parse_message(listed), Parsed)
    assert parse_message(tupled) == Invalid(
        "unknown_channel", "'fallback' must be a list of channel names"
    )
    messages_module._routes.clear()
    assert isinstance(parse_message(tupled), Invalid)
    assert isinstance(parse_message(listed), Parsed)


def test_the_parse_memo_rests_through_distinct_numbers_and_keeps_repeated_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Remembering answers only slows a campaign of distinct numbers down: a memo that filled
    up with no hit remembers nothing for seven fills' worth of messages, then tries again.
    A memo that is read keeps remembering. Each answer is the parse's either way."""
    monkeypatch.setattr(messages_module, "_ROUTES_MEMO_LIMIT", 40)
    monkeypatch.setattr(messages_module, "_memo_hits", 0)
    monkeypatch.setattr(messages_module, "_memo_resting", 0)
    messages_module._routes.clear()

    def message(index: int) -> dict[str, str]:
        return {"id": f"m{index}", "channel": "sms", "to": f"+9198{index:08d}"}

    for index in range(41 + 7 * 40):  # a fill, the message that finds it cold, the rest
        parsed = parse_message(message(index))
        assert isinstance(parsed, Parsed) and parsed.key == 919800000000 + index
    assert not messages_module._routes and messages_module._memo_resting == 0
    for index in range(1000, 1009):
        assert isinstance(parse_message(message(index)), Parsed)
    assert len(messages_module._routes) == 9  # it remembers again

    messages_module._routes.clear()
    monkeypatch.setattr(messages_module, "_memo_hits", 0)
    for index in range(2000, 2041):  # each number twice: one hit every two answers
        for _ in range(2):
            assert parse_message(message(index)) == Parsed(
                f"m{index}", "sms", f"+9198{index:08d}", (), 919800000000 + index
            )
    assert messages_module._memo_resting == 0
    assert len(messages_module._routes) == 1  # full with hits: cleared, and filling again


# -- the number normaliser ------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(raw=st.text(max_size=40) | numbers_, region=st.none() | regions)
def test_normalize_gives_e164_or_invalid_number_and_nothing_else(
    raw: str, region: str | None
) -> None:
    try:
        e164 = normalize(raw, region)
    except InvalidNumber as exc:
        assert exc.reason == "invalid_number" and exc.detail
        digits = re.sub(r"\D", "", raw)
        if len(digits) >= 8:
            assert digits not in exc.detail  # a refused number is not echoed whole
        return
    assert E164.fullmatch(e164)
    assert normalize(e164) == e164  # idempotent
    assert not any(char.isalpha() for char in raw)


_DIGIT_ZEROS = [0x30, 0xFF10, 0x660, 0x6F0, 0x966, 0x9E6, 0xE50]


@settings(max_examples=200, deadline=None)
@given(
    number=st.sampled_from(VALID),
    zero=st.sampled_from(_DIGIT_ZEROS),
    separators=st.lists(st.sampled_from(["", " ", "-", ".", "\u00a0"]), min_size=15, max_size=15),
)
def test_any_script_of_digits_and_separators_gives_the_same_number(
    number: str, zero: int, separators: list[str]
) -> None:
    spelled = "+" + "".join(
        chr(zero + int(digit)) + separator
        for digit, separator in zip(number[1:], separators, strict=False)
    )
    assert normalize(spelled.rstrip(" -.\u00a0")) == number


@settings(max_examples=200, deadline=None)
@given(number=st.sampled_from(VALID), letter=st.characters(categories=["Lu", "Ll", "Lo"]))
def test_a_letter_anywhere_makes_it_invalid(number: str, letter: str) -> None:
    for position in (1, 5, len(number)):
        with pytest.raises(InvalidNumber):
            normalize(number[:position] + letter + number[position:])


# -- the filter on decoded messages ------------------------------------------------------------


def check_verdicts(
    items: list[Any], results: list[dict[str, Any]], summary: Mapping[str, Any]
) -> None:
    """Every message exactly one verdict, in order, its fields carried through, and every
    verdict the one the test blocklist calls for."""
    assert len(results) == len(items)
    kept_ids: Counter[str] = Counter()
    for item, result in zip(items, results, strict=True):
        verdict = result["verdict"]
        assert verdict in VERDICTS
        assert result.get("reason", "blocklisted") in REASONS
        if not isinstance(item, Mapping):  # not a JSON object: its record says so
            assert (result["verdict"], result["reason"]) == ("invalid", "malformed_line")
            continue
        if not has_usable_id(item):  # named by its position instead: the callers check it
            assert (result["verdict"], result["reason"]) == ("invalid", "missing_field")
        for key, value in item.items():
            if key in VERDICT_FIELDS or (key == "channel" and verdict == "rerouted"):
                continue
            if key == "id" and not has_usable_id(item):
                continue
            assert result[key] == value, f"{key!r} was not carried through"
        if verdict == "invalid":
            continue
        kept_ids[item["id"]] += 1
        parsed = parse_message(item)
        assert isinstance(parsed, Parsed)
        assert result["e164"] == parsed.e164
        channel, e164 = parsed.channel, parsed.e164
        if verdict == "allowed":
            assert not blocked_on(channel, e164)
        elif verdict == "rerouted":
            assert blocked_on(channel, e164)
            new = result["channel"]
            tried = parsed.fallback[: parsed.fallback.index(new)]
            assert all(blocked_on(c, e164) for c in tried) and not blocked_on(new, e164)
            assert result["original_channel"] == channel
        elif verdict == "blocked":
            assert result["reason"] == "blocklisted"
            assert all(blocked_on(c, e164) for c in (channel, *parsed.fallback))
        else:  # deferred: only a failing source defers, and this one never fails
            raise AssertionError(f"deferred without a failure: {result}")
    assert all(n == 1 for n in kept_ids.values()), "an id got two usable verdicts"
    counted = Counter(result["verdict"] for result in results)
    assert summary["total"] == len(items)
    assert summary["verdicts"] == dict(counted)
    assert set(summary["channels"]) <= {*CHANNELS, "unknown"}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=st.lists(any_messages, max_size=25))
def test_filter_run_gives_every_message_one_verdict(items: list[Any]) -> None:
    with make_filter() as engine:
        results = list(engine.run(items))
        check_verdicts(items, results, engine.summary.as_dict())
    for index, (item, result) in enumerate(zip(items, results, strict=True), 1):
        if not isinstance(item, Mapping) or not has_usable_id(item):
            assert result["id"] == str(index)  # named by its position


# -- the filter on JSON Lines --------------------------------------------------------------------


def encoded(message: Any) -> bytes:
    # The standard library: integers of any size, as other tools write them.
    return json.dumps(message, ensure_ascii=False).encode()


raw_lines = st.one_of(
    good_messages.map(encoded),
    odd_messages.map(encoded),
    json_values.map(encoded),
    st.binary(max_size=40),
    st.text(max_size=30).map(str.encode),
    st.sampled_from([b"", b"   ", b"\r", b"{", b"}", b"[]", b"{}", b"null", b"\xef\xbb\xbf{}"]),
).map(lambda line: line.replace(b"\n", b" "))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(raw_lines, max_size=25), bom=st.booleans(), crlf=st.booleans())
def test_run_lines_gives_every_line_one_valid_json_record(
    lines: list[bytes], bom: bool, crlf: bool
) -> None:
    ending = b"\r\n" if crlf else b"\n"
    data = [line + ending for line in lines]
    if bom and data:
        data[0] = b"\xef\xbb\xbf" + data[0]
    with make_filter() as engine:
        out = list(engine.run_lines(lambda: iter(data)))
        summary = engine.summary.as_dict()
    # A byte order mark starting the file is not part of the first line (spreadsheet exports).
    effective = [raw.removesuffix(ending) for raw in data]
    if effective:
        effective[0] = effective[0].removeprefix(b"\xef\xbb\xbf")
    expected_lines = [
        (number, line) for number, line in enumerate(effective, 1) if line.strip() != b""
    ]
    assert len(out) == len(expected_lines)
    items: list[Any] = []
    results: list[dict[str, Any]] = []
    for (number, line), output in zip(expected_lines, out, strict=True):
        assert output.endswith(b"\n") and output.count(b"\n") == 1 and b"\r" not in output
        record = json.loads(output)  # the standard library: strict JSON, any integer
        try:
            message = orjson.loads(line)
        except orjson.JSONDecodeError:
            message = None
        if isinstance(message, dict) and not text_repeats_a_key(line):
            items.append(json.loads(line))
            if not has_usable_id(message):
                assert record["id"] == str(number)  # named by its line number
        else:
            assert record["id"] == str(number)  # named by its line number
            items.append(None)
        results.append(record)
    check_verdicts(items, results, summary)


# -- the command line: a corpus of odd files ------------------------------------------------------


def parse_records(output: bytes) -> list[dict[str, Any]]:
    """The output records; the standard library for exact integers, orjson for the records
    nested deeper than the standard library's recursion limit allows here."""
    parsed = []
    for raw in output.splitlines():
        try:
            parsed.append(json.loads(raw))
        except RecursionError:
            parsed.append(orjson.loads(raw))
    return parsed


def run_file(
    sim: Simulator, tmp_path: Path, data: bytes, *args: str
) -> tuple[subprocess.CompletedProcess[bytes], list[dict[str, Any]], dict[str, Any]]:
    path = tmp_path / "input.jsonl"
    path.write_bytes(data)
    summary = tmp_path / "summary.json"
    done = blockfilter(
        "filter", str(path), "--summary-json", str(summary), *args, env=subprocess_env(sim)
    )
    assert b"Traceback" not in done.stderr, done.stderr.decode()
    found = json.loads(summary.read_text()) if summary.exists() else {}
    return done, parse_records(done.stdout), found


def line(**fields: Any) -> bytes:
    return json.dumps(fields, ensure_ascii=False).encode() + b"\n"


BLOCKED = VALID[0]


def test_the_corpus_of_odd_lines(sim: Simulator, tmp_path: Path) -> None:
    sim.block("sms", BLOCKED)
    deep_field = b"[" * 1000 + b"]" * 1000
    corpus: list[tuple[bytes, str, str | None]] = [
        # (line, expected verdict, expected reason)
        (line(id="ok", channel="sms", to=VALID[1]), "allowed", None),
        (
            b"\xef\xbb\xbf" + line(id="bom-later", channel="sms", to=VALID[1]),
            "invalid",
            "malformed_line",
        ),
        (b"[" * 100_000 + b"\n", "invalid", "malformed_line"),
        (
            b'{"id":"deep","channel":"sms","to":"'
            + BLOCKED.encode()
            + b'","fallback":["voice"],"x":'
            + deep_field
            + b"}\n",
            "rerouted",
            None,
        ),
        (
            b'{"id":"latin1","channel":"sms","to":"' + VALID[1].encode() + b'","name":"Jos\xe9"}\n',
            "invalid",
            "malformed_line",
        ),
        (b'{"id":"nul\x00","channel":"sms"}\n', "invalid", "malformed_line"),
        (
            b'{"id":"inf","channel":"sms","to":"' + VALID[1].encode() + b'","x":1e400}\n',
            "invalid",
            "malformed_line",
        ),
        (
            b'{"id":"bigint","channel":"sms","to":"'
            + VALID[1].encode()
            + b'","x":'
            + str(10**40).encode()
            + b"}\n",
            "allowed",
            None,
        ),
        (
            b'{"id":"dupkey","channel":"sms","channel":"fax","to":"' + VALID[1].encode() + b'"}\n',
            "invalid",
            "malformed_line",  # a repeated key: parsers differ on which channel it has
        ),
        (line(id="fw", channel="sms", to="＋９１９８１２３４５６７９"), "allowed", None),
        (line(id="arabic", channel="sms", to="+٩١٩٨١٢٣٤٥٦٧٩"), "allowed", None),
        (line(id="letters", channel="sms", to="+91 98123 4567O"), "invalid", "invalid_number"),
        (
            line(id="vanity", channel="sms", to="1-800-FLOWERS", region="US"),
            "invalid",
            "invalid_number",
        ),
        (line(id="tel", channel="sms", to="tel:" + VALID[1]), "invalid", "invalid_number"),
        (line(id="long-to", channel="sms", to="9" * 100_000), "invalid", "invalid_number"),
        (line(id="int-to", channel="sms", to=919812345678), "invalid", "invalid_number"),
        (line(channel="sms", to=VALID[1]), "invalid", "missing_field"),
        (line(id=None, channel="sms", to=VALID[1]), "invalid", "missing_field"),
        (line(id="", channel="sms", to=VALID[1]), "invalid", "missing_field"),
        (line(id=7, channel="sms", to=VALID[1]), "invalid", "missing_field"),
        (line(id="no-channel", to=VALID[1]), "invalid", "missing_field"),
        (line(id="no-to", channel="sms"), "invalid", "missing_field"),
        (
            line(id="fb-str", channel="sms", to=VALID[1], fallback="whatsapp"),
            "invalid",
            "unknown_channel",
        ),
        (
            line(id="fb-null", channel="sms", to=VALID[1], fallback=[None]),
            "invalid",
            "unknown_channel",
        ),
        (
            line(id="fb-fax", channel="sms", to=VALID[1], fallback=["fax"]),
            "invalid",
            "unknown_channel",
        ),
        (
            line(id="fb-obj", channel="sms", to=VALID[1], fallback=[{"x": 1}]),
            "invalid",
            "unknown_channel",
        ),
        (line(id="fb-dict", channel="sms", to=VALID[1], fallback={}), "invalid", "unknown_channel"),
        (line(id="fb-empty", channel="sms", to=BLOCKED, fallback=[]), "blocked", "blocklisted"),
        (line(id="fb-case", channel="sms", to=BLOCKED, fallback=["WHATSAPP"]), "rerouted", None),
        (
            line(id="rg-zz", channel="sms", to="098123 45678", region="ZZ"),
            "invalid",
            "invalid_number",
        ),
        (
            line(id="rg-int", channel="sms", to="098123 45678", region=5),
            "invalid",
            "invalid_number",
        ),
        (
            line(id="rg-empty", channel="sms", to="098123 45678", region=""),
            "invalid",
            "invalid_number",
        ),
        (
            line(id="rg-list", channel="sms", to="098123 45678", region=["IN"]),
            "invalid",
            "invalid_number",
        ),
        (
            line(id="rg-dotless", channel="sms", to="098123 45678", region="ın"),
            "invalid",
            "invalid_number",
        ),
        (line(id="rg-lower", channel="sms", to="098123 45679", region="in"), "allowed", None),
        (line(id="ch-list", channel=["sms"], to=VALID[1]), "invalid", "unknown_channel"),
        (
            line(id="prior", channel="sms", to=BLOCKED, verdict="allowed", reason="x"),
            "blocked",
            "blocklisted",
        ),
        (line(id="ok", channel="sms", to=VALID[2]), "invalid", "duplicate_id"),
        (line(id="OK", channel="sms", to=VALID[2]), "allowed", None),
        (b"[]\n", "invalid", "malformed_line"),
        (b'"a string"\n', "invalid", "malformed_line"),
        (b"null\n", "invalid", "malformed_line"),
        (b"{'single': 'quotes'}\n", "invalid", "malformed_line"),
        (b"x" * (MAX_LINE_BYTES + 10) + b"\n", "invalid", "malformed_line"),
        (line(id="after-huge", channel="sms", to=VALID[1]), "allowed", None),
    ]
    data = b"".join(raw for raw, _, _ in corpus)
    done, out, summary = run_file(sim, tmp_path, data)
    assert done.returncode == 0, done.stderr
    assert len(out) == len(corpus)
    for number, ((raw, verdict, reason), record) in enumerate(zip(corpus, out, strict=True), 1):
        got = (record["verdict"], record.get("reason"))
        assert got == (verdict, reason), (number, raw[:80], record)
        if reason == "malformed_line":
            assert record["id"] == str(number) and record.get("detail")
    by_id = {record.get("id"): record for record in out}
    # Kept as given: unicode digits, big integers, the deep structure.
    assert by_id["fw"]["to"] == "＋９１９８１２３４５６７９" and by_id["fw"]["e164"] == VALID[1]
    assert by_id["bigint"]["x"] == 10**40
    assert by_id["deep"]["channel"] == "voice" and by_id["deep"]["original_channel"] == "sms"
    depth, value = 0, by_id["deep"]["x"]
    while isinstance(value, list) and value:
        depth, value = depth + 1, value[0]
    assert depth == 999
    assert by_id["fb-case"]["channel"] == "whatsapp"
    # Earlier verdict fields are replaced, not repeated.
    (prior,) = [raw for raw in done.stdout.splitlines() if raw.startswith(b'{"id":"prior"')]
    assert prior.count(b'"verdict"') == 1 and prior.count(b'"reason"') == 1
    huge = next(n for n, (raw, _, _) in enumerate(corpus, 1) if len(raw) > MAX_LINE_BYTES)
    assert "longer than" in by_id[str(huge)]["detail"]
    assert summary["total"] == len(corpus)
    assert summary["verdicts"] == dict(Counter(r["verdict"] for r in out))
    # One request for the sms numbers, one per fallback channel of the blocklisted one.
    assert sim.stats.requests == 3


def test_an_empty_file_gives_no_records_and_exit_0(sim: Simulator, tmp_path: Path) -> None:
    for data in (b"", b"\n\n", b"  \r\n\t\n"):
        done, out, summary = run_file(sim, tmp_path, data)
        assert (done.returncode, out) == (0, [])
        assert summary["total"] == 0 and summary["requests"] == 0
    assert sim.stats.requests == 0


def test_a_spreadsheet_export_with_a_bom_and_crlf(sim: Simulator, tmp_path: Path) -> None:
    messages = [
        {"id": str(i), "channel": "sms", "to": number, "note": "é"}
        for i, number in enumerate(numbers(5, seed=21))
    ]
    data = "\r\n".join(json.dumps(m, ensure_ascii=False) for m in messages).encode("utf-8-sig")
    done, out, _ = run_file(sim, tmp_path, data + b"\r\n")
    assert done.returncode == 0, done.stderr
    assert [(r["id"], r["verdict"], r["note"]) for r in out] == [
        (m["id"], "allowed", "é") for m in messages
    ]
    assert not done.stdout.startswith(b"\xef\xbb\xbf") and b"\r" not in done.stdout
    # --estimate reads the same file the same way.
    estimate = blockfilter(
        "filter", str(tmp_path / "input.jsonl"), "--estimate", env=subprocess_env(sim)
    )
    assert estimate.stdout.split()[0] == b"1"


def test_many_unknown_channel_names_do_not_grow_the_summary(sim: Simulator, tmp_path: Path) -> None:
    data = b"".join(
        line(id=str(i), channel=f"junk-{i}", to=VALID[1], fallback=[f"more-junk-{i}"])
        for i in range(5000)
    )
    done, out, summary = run_file(sim, tmp_path, data)
    assert done.returncode == 0
    assert {(r["verdict"], r["reason"]) for r in out} == {("invalid", "unknown_channel")}
    assert summary["channels"] == {"unknown": {"invalid": 5000}}
    assert max(len(r.get("detail", "")) for r in out) < 200
    assert sim.stats.requests == 0


def test_repeated_ids_keep_the_first_only(sim: Simulator, tmp_path: Path) -> None:
    pool = numbers(3, seed=22)
    data = b"".join(
        line(id=["a", "b", "a", "a", "b", "c"][i], channel="sms", to=pool[i % 3]) for i in range(6)
    )
    done, out, _ = run_file(sim, tmp_path, data)
    assert done.returncode == 0
    assert [(r["id"], r["verdict"], r.get("reason")) for r in out] == [
        ("a", "allowed", None),
        ("b", "allowed", None),
        ("a", "invalid", "duplicate_id"),
        ("a", "invalid", "duplicate_id"),
        ("b", "invalid", "duplicate_id"),
        ("c", "allowed", None),
    ]


def test_an_observer_sees_records_nested_as_deep_as_the_input_allows(
    sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``blockfilter_verdicts`` observer gets every record decoded, however deep."""
    from blockfilter import hookimpl
    from blockfilter.cli import main
    from blockfilter.plugins.manager import get_plugin_manager, reset_plugin_manager

    for name, value in subprocess_env(sim).items():
        if name.startswith(("KALEYRA_", "BLOCKFILTER_")):
            monkeypatch.setenv(name, value)
    deep = b"[" * 1020 + b"]" * 1020
    path = tmp_path / "deep.jsonl"
    path.write_bytes(
        b'{"id":"a","channel":"sms","to":"'
        + VALID[4].encode()
        + b'","x":'
        + deep
        + b"}\n"
        + line(id="b", channel="sms", to=VALID[3])
    )
    seen: list[dict[str, Any]] = []

    class Observer:
        @hookimpl
        def blockfilter_verdicts(self, results: list[dict[str, Any]]) -> None:
            seen.extend(results)

    reset_plugin_manager()
    try:
        get_plugin_manager().register(Observer())
        code = main(["filter", str(path), "--quiet", "--out", str(tmp_path / "out.jsonl")])
    finally:
        reset_plugin_manager()
    assert code == 0
    assert [(r["id"], r["verdict"]) for r in seen] == [("a", "allowed"), ("b", "allowed")]
    depth, value = 0, seen[0]["x"]
    while isinstance(value, list) and value:
        depth, value = depth + 1, value[0]
    assert depth == 1019


# -- memory and time, measured on a real process ----------------------------------------------

# Runs the command line as its only child and reports its peak RSS: RUSAGE_CHILDREN is the
# maximum over every child ever waited for, so the measuring process must be a fresh one.
_MEASURE = (
    "import resource, subprocess, sys\n"
    "done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
    "peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "print(peak_kib, done.returncode)\n"
    "sys.stderr.buffer.write(done.stderr)\n"
)


def peak_rss_mib(sim: Simulator, *args: str) -> tuple[float, int, bytes]:
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, sys.executable, "-m", "blockfilter", *args],
        capture_output=True,
        env=subprocess_env(sim),
        timeout=300,
    )
    peak_kib, returncode = done.stdout.split()
    return int(peak_kib) / 1024, int(returncode), done.stderr


@pytest.mark.slow
def test_a_huge_line_costs_no_memory(sim: Simulator, tmp_path: Path) -> None:
    path = tmp_path / "huge.jsonl"
    with path.open("wb") as handle:
        handle.write(line(id="a", channel="sms", to=VALID[1]))
        handle.write(b'{"id":"b","x":"')
        chunk = b"x" * (1 << 20)
        for _ in range(256):  # a 256 MiB line
            handle.write(chunk)
        handle.write(b'"}\n')
        handle.write(line(id="c", channel="sms", to=VALID[3]))
    summary = tmp_path / "summary.json"
    peak, returncode, stderr = peak_rss_mib(
        sim, "filter", str(path), "--summary-json", str(summary)
    )
    assert returncode == 0, stderr
    assert json.loads(summary.read_text())["verdicts"] == {"allowed": 2, "invalid": 1}
    assert peak < 120, f"peak RSS {peak:.0f} MiB for a 256 MiB line"


@pytest.mark.slow
def test_many_big_junk_fields_are_not_held_in_memory(sim: Simulator, tmp_path: Path) -> None:
    """Each line under the 1 MiB limit, but 240 MB of distinct junk numbers and channels:
    none of it may stay in memory once its line is read (the parser's memo once kept it)."""
    path = tmp_path / "junk.jsonl"
    filler = b"9" * 1_000_000
    with path.open("wb") as handle:
        for i in range(240):
            if i % 2:
                handle.write(b'{"id":"%d","channel":"sms","to":"%d%s"}\n' % (i, i, filler))
            else:
                handle.write(b'{"id":"%d","channel":"x%d%s","to":"+1"}\n' % (i, i, filler))
    summary = tmp_path / "summary.json"
    peak, returncode, stderr = peak_rss_mib(
        sim, "filter", str(path), "--summary-json", str(summary)
    )
    assert returncode == 0, stderr
    assert json.loads(summary.read_text())["verdicts"] == {"invalid": 240}
    assert peak < 120, f"peak RSS {peak:.0f} MiB for 240 MB of junk"


@pytest.mark.slow
def test_a_million_copies_of_one_number_make_one_request(sim: Simulator, tmp_path: Path) -> None:
    path = tmp_path / "million.jsonl"
    template = b'{"id":"%d","channel":"sms","to":"+918020000052"}\n'
    with path.open("wb") as handle:
        for start in range(0, 10**6, 100_000):
            handle.write(b"".join(template % i for i in range(start, start + 100_000)))
    out, summary = tmp_path / "out.jsonl", tmp_path / "summary.json"
    peak, returncode, stderr = peak_rss_mib(
        sim, "filter", str(path), "--out", str(out), "--summary-json", str(summary)
    )
    assert returncode == 0, stderr
    assert sim.stats.requests == 1
    result = json.loads(summary.read_text())
    assert result["total"] == 10**6 and result["verdicts"] == {"allowed": 10**6}
    with out.open("rb") as handle:
        count = 0
        for count, output in enumerate(handle, 1):  # noqa: B007 - the count is the point
            if count in (1, 10**6):
                assert json.loads(output)["id"] == str(count - 1)
    assert count == 10**6
    assert peak < 250, f"peak RSS {peak:.0f} MiB for 10^6 messages of one number"
