"""The filter's decisions, with in-process blocklist sources (the kind a pipeline plugs in).

The Kaleyra path over HTTP is covered in test_filter_http.py; here the sources are plain
functions so each rule of the contract can be pinned down exactly.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest

from blockfilter.config import load_settings
from blockfilter.engine.filter import Filter
from blockfilter.sources import BaseSource, CheckOutcome, FunctionSource, SourceStats

A = "+919812345678"
B = "+919812345679"
C = "+919812345680"


class Blocklist:
    """A blocklist source that records what it was asked."""

    def __init__(self, blocked: dict[str, set[str]], failing: set[str] | None = None) -> None:
        self.blocked = blocked
        self.failing = failing or set()
        self.calls: list[tuple[str, list[str]]] = []

    def __call__(self, channel: str, numbers: list[str]) -> set[str]:
        self.calls.append((channel, sorted(numbers)))
        if channel in self.failing:
            raise ConnectionError("the source is down")
        return {n for n in numbers if n in self.blocked.get(channel, set())}


def run(messages: list[Any], blocklist: Blocklist, **options: Any) -> list[dict[str, Any]]:
    settings = load_settings(environ={})
    engine = Filter(settings, sources=[FunctionSource("test", blocklist)], **options)
    results = list(engine.run(messages))
    run.summary = engine.summary.as_dict()  # type: ignore[attr-defined]
    return results


def msg(id_: str, to: str, channel: str = "sms", **extra: Any) -> dict[str, Any]:
    return {"id": id_, "channel": channel, "to": to, **extra}


def test_each_message_gets_one_verdict_in_input_order() -> None:
    blocklist = Blocklist({"sms": {B}})
    messages = [msg("1", A), msg("2", B), msg("3", "not a number"), msg("4", A, "WhatsApp")]
    results = run(messages, blocklist)
    assert [r["id"] for r in results] == ["1", "2", "3", "4"]
    assert [r["verdict"] for r in results] == ["allowed", "blocked", "invalid", "allowed"]
    assert results[1]["reason"] == "blocklisted"
    assert results[2]["reason"] == "invalid_number"
    assert results[0]["e164"] == A and results[0]["checked_at"].endswith("Z")
    assert run.summary["total"] == 4  # type: ignore[attr-defined]
    assert run.summary["verdicts"] == {"allowed": 2, "blocked": 1, "invalid": 1}  # type: ignore[attr-defined]


def test_each_distinct_pair_is_asked_once() -> None:
    blocklist = Blocklist({})
    messages = [msg(str(i), [A, B][i % 2]) for i in range(50)] + [msg("x", A, "voice")]
    run(messages, blocklist)
    assert sorted(blocklist.calls) == [("sms", [A, B]), ("voice", [A])]


def test_national_format_with_region_and_spaces() -> None:
    blocklist = Blocklist({"sms": {A}})
    results = run([msg("1", "098123 45678", region="IN"), msg("2", "+91 98123-45678")], blocklist)
    assert [r["e164"] for r in results] == [A, A]
    assert [r["verdict"] for r in results] == ["blocked", "blocked"]
    assert results[0]["to"] == "098123 45678"  # the given field is carried through untouched


class SkipsSome:
    """A plugin source that breaks its contract: it never answers for some (channel, number)
    pairs, neither clean nor with an error."""

    name = "skips-some"

    def __init__(self, blocked: dict[str, set[str]], skipped: set[tuple[str, str]]) -> None:
        self.blocked, self.skipped = blocked, skipped
        self.asked: list[tuple[str, str]] = []

    def check_many(self, wanted: Mapping[str, Sequence[str]]) -> Iterator[CheckOutcome]:
        for channel, numbers in wanted.items():
            self.asked.extend((channel, n) for n in numbers)
            answered = [n for n in numbers if (channel, n) not in self.skipped]
            listed = frozenset(n for n in answered if n in self.blocked.get(channel, set()))
            yield CheckOutcome(channel, answered, listed, time.time())

    def stats(self) -> SourceStats:
        return SourceStats()


@pytest.mark.timeout(20)
def test_a_number_a_source_skips_is_unchecked_and_asked_once() -> None:
    source = SkipsSome({"sms": {A, B}}, skipped={("sms", C), ("whatsapp", A)})
    messages = [
        msg("1", A, fallback=["whatsapp", "voice"]),  # its first fallback goes unanswered
        msg("2", B, fallback=["whatsapp"]),
        msg("3", C, fallback=["whatsapp"]),  # its own channel goes unanswered
    ]
    engine = Filter(load_settings(environ={}), sources=[source])
    results = list(engine.run(messages))
    assert [(r["verdict"], r.get("reason"), r["channel"]) for r in results] == [
        ("deferred", "check_failed", "sms"),  # fail closed: not rerouted to voice either
        ("rerouted", None, "whatsapp"),
        ("deferred", "check_failed", "sms"),
    ]
    assert sorted(source.asked) == sorted(
        [("sms", A), ("sms", B), ("sms", C), ("whatsapp", A), ("whatsapp", B)]
    )


def test_reroute_takes_the_first_fallback_that_is_not_blocklisted() -> None:
    blocklist = Blocklist({"sms": {A, B, C}, "whatsapp": {B, C}, "voice": {C}})
    messages = [
        msg("1", A, fallback=["whatsapp", "voice"]),
        msg("2", B, fallback=["WhatsApp", "voice"]),
        msg("3", C, fallback=["whatsapp", "voice"]),
    ]
    results = run(messages, blocklist)
    assert [(r["verdict"], r["channel"]) for r in results] == [
        ("rerouted", "whatsapp"),
        ("rerouted", "voice"),
        ("blocked", "sms"),
    ]
    assert results[0]["original_channel"] == "sms"
    assert "original_channel" not in results[2]
    # One round for the channels, one for the first fallbacks, one for the second.
    assert blocklist.calls == [
        ("sms", [A, B, C]),
        ("whatsapp", [A, B, C]),
        ("voice", [B, C]),
    ]
    assert run.summary["channels"] == {  # type: ignore[attr-defined]
        "whatsapp": {"rerouted": 1},
        "voice": {"rerouted": 1},
        "sms": {"blocked": 1},
    }


def test_fallbacks_of_clean_messages_are_never_asked() -> None:
    blocklist = Blocklist({})
    run([msg("1", A, fallback=["voice"])], blocklist)
    assert blocklist.calls == [("sms", [A])]


def test_an_unknown_fallback_channel_makes_the_message_invalid() -> None:
    results = run([msg("1", A, fallback=["fax"]), msg("2", A, fallback="voice")], Blocklist({}))
    assert [(r["verdict"], r["reason"]) for r in results] == [
        ("invalid", "unknown_channel"),
        ("invalid", "unknown_channel"),
    ]


@pytest.mark.parametrize("missing", ["id", "channel", "to"], ids=lambda name: f"missing {name}")
def test_a_missing_field_is_invalid(missing: str) -> None:
    message = msg("1", A)
    del message[missing]
    (result,) = run([message], Blocklist({}))
    assert (result["verdict"], result["reason"]) == ("invalid", "missing_field")


def test_unknown_channel_and_non_objects_are_invalid() -> None:
    results = run([msg("1", A, "pigeon"), ["not", "an", "object"], 42], Blocklist({}))
    assert [r["reason"] for r in results] == ["unknown_channel", "malformed_line", "malformed_line"]
    assert [r["id"] for r in results[1:]] == ["2", "3"]


def test_later_copies_of_an_id_are_invalid() -> None:
    results = run([msg("1", A), msg("1", B), msg("2", B), msg("1", C)], Blocklist({}))
    assert [r["verdict"] for r in results] == ["allowed", "invalid", "allowed", "invalid"]
    assert results[1]["reason"] == "duplicate_id"


@pytest.mark.parametrize(
    ("policy", "verdict", "reason"),
    [
        ("defer", "deferred", "check_failed"),
        ("allow", "allowed", "unchecked"),
        ("drop", "blocked", "unchecked"),
    ],
)
def test_on_error_policy_when_the_check_fails(policy: str, verdict: str, reason: str) -> None:
    blocklist = Blocklist({}, failing={"sms"})
    (result,) = run([msg("1", A)], blocklist, on_error=policy)
    assert (result["verdict"], result["reason"]) == (verdict, reason)
    assert result["e164"] == A


def test_a_failed_fallback_check_is_not_a_clean_fallback() -> None:
    blocklist = Blocklist({"sms": {A}}, failing={"whatsapp"})
    (deferred,) = run([msg("1", A, fallback=["whatsapp"])], blocklist)
    assert deferred["verdict"] == "deferred" and deferred["channel"] == "sms"
    (rerouted,) = run([msg("1", A, fallback=["whatsapp"])], blocklist, on_error="allow")
    assert (rerouted["verdict"], rerouted["channel"], rerouted["reason"]) == (
        "rerouted",
        "whatsapp",
        "unchecked",
    )


def test_sources_are_joined_and_fail_closed() -> None:
    kaleyra = Blocklist({"sms": {A}})
    opt_outs = Blocklist({"sms": {B}})
    broken = Blocklist({}, failing={"sms"})
    settings = load_settings(environ={})
    sources = [FunctionSource("kaleyra", kaleyra), FunctionSource("optouts", opt_outs)]
    results = list(Filter(settings, sources=sources).run([msg("1", A), msg("2", B), msg("3", C)]))
    assert [r["verdict"] for r in results] == ["blocked", "blocked", "allowed"]
    sources = [FunctionSource("kaleyra", kaleyra), FunctionSource("broken", broken)]
    results = list(Filter(settings, sources=sources).run([msg("1", A), msg("3", C)]))
    # Blocklisted by one source is blocklisted, whatever another could not say.
    assert [r["verdict"] for r in results] == ["blocked", "deferred"]


def test_other_fields_come_through_untouched() -> None:
    extra = {"big": 2**80, "text": "नमस्ते 👋", "nested": {"a": [1, 2.5, None]}}
    (result,) = run([msg("1", A, **extra)], Blocklist({}))
    for name, value in extra.items():
        assert result[name] == value


def lines(*messages: Any) -> list[bytes]:
    return [(m if isinstance(m, str) else json.dumps(m)).encode() + b"\n" for m in messages]


def run_lines(raw: list[bytes], blocklist: Blocklist, **options: Any) -> list[bytes]:
    engine = Filter(load_settings(environ={}), sources=[FunctionSource("t", blocklist)], **options)
    return list(engine.run_lines(lambda: iter(raw)))


def test_lines_keep_each_message_byte_for_byte() -> None:
    original = (
        '{"id": "1", "channel": "sms", "to": "+919812345678", '
        '"big": 123456789012345678901234567890, "ratio": 1.10, "s": "\\u00e9"}'
    )
    (out,) = run_lines([original.encode() + b"\n"], Blocklist({}))
    assert out.startswith(original[:-1].encode())
    record = json.loads(out)
    assert record["big"] == 123456789012345678901234567890
    assert record["verdict"] == "allowed"


def test_lines_rerouted_replace_the_channel_and_keep_big_integers() -> None:
    raw = lines(msg("1", A, fallback=["voice"], big=2**100))
    (out,) = run_lines(raw, Blocklist({"sms": {A}}))
    record = json.loads(out)
    assert out.count(b'"channel"') == 1
    assert (record["verdict"], record["channel"], record["big"]) == ("rerouted", "voice", 2**100)


def test_lines_malformed_blank_and_earlier_verdicts() -> None:
    raw = lines(
        msg("1", A),
        "{not json",
        "",
        "[1, 2]",
        msg("5", B, verdict="allowed", reason="old"),
        msg("1", B),
    )
    out = [json.loads(line) for line in run_lines(raw, Blocklist({"sms": {B}}))]
    assert [(r["id"], r["verdict"]) for r in out] == [
        ("1", "allowed"),
        ("2", "invalid"),
        ("4", "invalid"),
        ("5", "blocked"),
        ("1", "invalid"),
    ]
    assert [r.get("reason") for r in out] == [
        None,
        "malformed_line",
        "malformed_line",
        "blocklisted",
        "duplicate_id",
    ]


class Explains:
    """A source that says something of its answers: its provenance, and fields it has no
    business setting."""

    name = "explains"

    def check_many(self, wanted: Mapping[str, Sequence[str]]) -> Iterator[CheckOutcome]:
        for channel, numbers in wanted.items():
            yield CheckOutcome(
                channel,
                list(numbers),
                frozenset(n for n in numbers if n == B and channel == "sms"),
                time.time() - 30,
                origin="cache",
                provenance={"age_s": 30.0, "verdict": "allowed", "to": "+10000000000", "x": 1},
            )

    def stats(self) -> SourceStats:
        return SourceStats()


def test_a_verdict_carries_its_sources_provenance_and_nothing_else_of_it() -> None:
    messages = [
        msg("1", A),
        msg("2", B),
        msg("3", A, age_s=1, ledger_event="forged"),
        msg("4", B, fallback=["whatsapp"]),
    ]
    engine = Filter(load_settings(environ={}), sources=[Explains()])
    results = list(engine.run(messages))
    assert [(r["verdict"], r["source"], r["age_s"]) for r in results] == [
        ("allowed", "cache", 30.0),
        ("blocked", "cache", 30.0),  # a source cannot turn its own answer around
        ("allowed", "cache", 30.0),
        ("rerouted", "cache", 30.0),  # the fallback channel's status
    ]
    assert [r["to"] for r in results] == [A, B, A, B]
    assert all("x" not in r for r in results)
    assert "ledger_event" not in results[2]  # a message's own copy is no provenance
    out = list(engine.run_lines(lambda: iter(lines(*messages))))
    records = [json.loads(line) for line in out]
    assert [(r["verdict"], r["age_s"], r["to"]) for r in records] == [
        ("allowed", 30.0, A),
        ("blocked", 30.0, B),
        ("allowed", 30.0, A),
        ("rerouted", 30.0, B),
    ]
    assert out[2].count(b'"age_s"') == 1 and b"forged" not in out[2]


class _HandOverLog(BaseSource):
    """A source whose stream notes, at each hand-over, how many lines had been read."""

    name = "log"

    def __init__(self, lines_read: list[int]) -> None:
        self.lines_read = lines_read
        self.handed: list[tuple[int, int]] = []  # (lines read by then, numbers so far)
        self.asked: list[str] = []

    def check_many(self, wanted: Mapping[str, Sequence[str]]) -> Iterator[CheckOutcome]:
        raise AssertionError("the stream answers")

    def stream(self) -> Any:
        source = self

        class Stream:
            def add(self, channel: str, numbers: Sequence[str]) -> None:
                source.asked.extend(numbers)
                source.handed.append((source.lines_read[0], len(source.asked)))

            def completed(self) -> Iterator[CheckOutcome]:
                return iter(())

            def finish(self) -> Iterator[CheckOutcome]:
                yield CheckOutcome("sms", list(source.asked), frozenset(), time.time())

        return Stream()


def test_numbers_seen_early_are_handed_over_before_the_pass_ends() -> None:
    # 1,000 numbers, each met in the first 1,000 lines, then 60,000 lines repeating them:
    # every number must reach the source long before the first pass ends, so that its
    # requests are in flight while the rest is read (they used to wait for the last line).
    numbers = [f"+9198{n:08d}" for n in range(1000)]
    raw = lines(*(msg(str(i), numbers[i % 1000]) for i in range(61_000)))
    lines_read = [0]

    def counted() -> Iterator[bytes]:
        for line in raw:
            lines_read[0] += 1
            yield line

    source = _HandOverLog(lines_read)
    engine = Filter(load_settings(environ={}), sources=[source])
    out = list(engine.run_lines(counted))
    assert len(out) == 61_000
    assert all(json.loads(line)["verdict"] == "allowed" for line in out[:1000])
    assert sorted(source.asked) == numbers  # each asked once
    by_then = [read for read, asked in source.handed if asked == 1000]
    assert by_then and by_then[0] <= 1000 + 2 * 4096, source.handed
