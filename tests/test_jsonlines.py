"""Reading JSON Lines: the plan the first pass makes, so later passes need not decode lines
again, must never change a verdict.

The oracle is :meth:`Filter.run`, which holds the decoded messages in memory and has no plan:
for any file, ``run_lines`` must give each line the verdict ``run`` gives its message, with
every plan size (routes spilling past the route limit, codes spilling to disk) and with a
fallback policy that looks at the whole message.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from blockfilter import cli
from blockfilter.engine import filter as filter_module
from blockfilter.engine import lines as jsonlines
from blockfilter.engine.filter import Filter
from blockfilter.engine.lines import STILL_READING, LinePlan
from blockfilter.errors import InputChanged
from blockfilter.model import Parsed
from blockfilter.testing.simulator import Simulator
from tests.support.env import subprocess_env
from tests.test_hostile_input import VALID, any_messages, good_messages, make_filter

# -- run_lines against run ---------------------------------------------------------------------

line_endings = st.sampled_from([b"\n", b"\r\n", b"  \n"])
spacings = st.sampled_from([(", ", ": "), (",", ":")])


@st.composite
def campaign_files(draw: st.DrawFn) -> list[bytes]:
    """Lines as exporters write them: mostly good messages from a small pool (so routes,
    numbers and ids repeat), some odd ones, junk, blank lines, mixed endings, maybe a BOM."""
    pool = draw(st.lists(good_messages, min_size=1, max_size=6))
    lines: list[bytes] = []
    for _ in range(draw(st.integers(min_value=0, max_value=30))):
        kind = draw(st.sampled_from(["pool", "pool", "pool", "any", "junk", "blank"]))
        if kind == "junk":
            junk = [b"{not json", b"[1, 2]", b"1e400", b"{}", b"{ }", b"{\t}", b'"x"']
            lines.append(draw(st.sampled_from(junk)))
        elif kind == "blank":
            lines.append(draw(st.sampled_from([b"", b"   "])))
        else:
            if kind == "pool":
                message = dict(draw(st.sampled_from(pool)))
                if draw(st.booleans()):  # a fresh id, or the pool's (a duplicate)
                    message["id"] = f"n{len(lines)}"
            else:
                message = draw(any_messages)
            separators = draw(spacings)
            lines.append(json.dumps(message, separators=separators).encode())
        lines[-1] += draw(line_endings)
    if lines and draw(st.booleans()):
        lines[-1] = lines[-1].rstrip(b"\r\n")  # no newline at the end of the file
    if lines and draw(st.booleans()):
        lines[0] = b"\xef\xbb\xbf" + lines[0]
    return lines


def oracle(lines: list[bytes], **options: Any) -> list[dict[str, Any]]:
    """What ``Filter.run`` says of the same messages."""
    messages: list[Any] = []
    for line in lines:
        line = line.removeprefix(b"\xef\xbb\xbf")
        if not line.strip():
            continue
        try:
            orjson.loads(line)  # what run_lines accepts
        except orjson.JSONDecodeError:
            messages.append(None)  # run() gives it malformed_line, as run_lines does
        else:
            messages.append(json.loads(line))  # integers of any size, as run_lines keeps them
    return list(make_filter(**options).run(messages))


VERDICT_VIEW = ("verdict", "reason", "e164", "channel", "original_channel")


def view(record: Mapping[str, Any]) -> tuple[Any, ...]:
    """What a user checks of a record, except the ids run() makes up for malformed lines and
    for messages without a usable id (their positions: run() skips no blank line)."""
    shown = tuple(record.get(name) for name in VERDICT_VIEW)
    if record.get("reason") == "malformed_line":
        return shown
    made_up = ("id",) if record.get("reason") == "missing_field" else ()
    carried = {
        k: v
        for k, v in record.items()
        if k not in VERDICT_VIEW and k != "checked_at" and k not in made_up
    }
    return (*shown, json.dumps(carried, sort_keys=True))


def vip_fallbacks(message: Mapping[str, Any], parsed: Parsed) -> Sequence[str]:
    """A policy that looks at the whole message (so verdicts cannot be shared by route)."""
    assert parsed.id == message["id"], "the policy was shown another message's parse"
    return parsed.fallback if message.get("payload") is None else parsed.fallback[:1]


# Hundreds of whole runs: ten seconds of CPU, so the slow tier runs it (the fast tier, in
# parallel, would wait for it at its end).
@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=campaign_files(),
    route_limit=st.sampled_from([jsonlines.ROUTE_LIMIT, 1, 0]),
    chunk=st.sampled_from([LinePlan._CHUNK, 3]),
    whole_message_policy=st.booleans(),
    group_limit=st.sampled_from([jsonlines.GROUP_LIMIT, 1, 0]),
    parser_process=st.sampled_from(["off", "always"]),
)
# A fallback past 64 bits: orjson decodes it as a float, the stdlib as an int; the detail of
# its `unknown_channel` verdict must not tell them apart.
@example(
    lines=[b'{"id":"0","channel":"sms","to":"+919812345678","fallback":[-9223372036854775809]}\n'],
    route_limit=jsonlines.ROUTE_LIMIT,
    chunk=LinePlan._CHUNK,
    whole_message_policy=False,
    group_limit=jsonlines.GROUP_LIMIT,
    parser_process="off",
)
# Past the route limit, a line's id is checked for repeats once: the first of two equal ids
# is not a duplicate of itself, blocklisted (so decoded again) or not.
@example(
    lines=[b'{"id": "1", "channel": "sms", "to": "+919812345678"}\n'] * 2,
    route_limit=0,
    chunk=LinePlan._CHUNK,
    whole_message_policy=False,
    group_limit=jsonlines.GROUP_LIMIT,
    parser_process="off",
)
def test_run_lines_gives_each_line_the_verdict_run_gives_its_message(
    lines: list[bytes],
    route_limit: int,
    chunk: int,
    whole_message_policy: bool,
    group_limit: int,
    parser_process: str,
) -> None:
    # parser_process "always": past the first line, a forked process reads the first pass
    # (where the platform forks and routes share verdicts; elsewhere this process does).
    options: dict[str, Any] = {"fallback_policy": vip_fallbacks} if whole_message_policy else {}
    expected = oracle(lines, **options)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jsonlines, "ROUTE_LIMIT", route_limit)
        patch.setattr(jsonlines, "GROUP_LIMIT", group_limit)
        patch.setattr(LinePlan, "_CHUNK", chunk)
        engine = make_filter(**options)
        out = list(engine.run_lines(lambda: iter(lines), parser_process=parser_process))
    got = [json.loads(line) for line in out]
    assert all(line.endswith(b"\n") and line.count(b"\n") == 1 for line in out)
    assert [view(r) for r in got] == [view(r) for r in expected]
    summary = engine.summary.as_dict()
    assert summary["total"] == len(got)
    assert summary["verdicts"] == dict(_count(r["verdict"] for r in got))


@st.composite
def lines_with_repeats(draw: st.DrawFn) -> list[bytes]:
    """Campaign lines, some of them made to repeat a key at the top or one level down, or to
    nest an object: what the first pass's cheap key counts must tell apart."""
    lines = draw(campaign_files())
    edits = ["as is", "as is", "top", "nested", "deeper", "colon", "verdict", "field"]
    for index, line in enumerate(lines):
        kind = draw(st.sampled_from(edits))
        head, brace, tail = line.rpartition(b"}")
        if kind == "as is" or not brace or head.lstrip().startswith(b"["):
            continue
        if kind == "field":  # a known route's line, but one field is not what a route has
            try:
                message = json.loads(line.removeprefix(b"\xef\xbb\xbf"))
            except ValueError:
                continue
            if type(message) is dict:
                name, value = draw(
                    st.sampled_from(
                        [("id", 5), ("id", ""), ("to", 919812345678), ("fallback", "sms")]
                        + [("channel", ["sms"]), ("region", {}), ("fallback", [["sms"]])]
                    )
                )
                message[name] = value
                lines[index] = json.dumps(message).encode() + b"\n"
            continue
        extra = {
            "top": b', "channel": "voice"',  # a repeat orjson drops: the last one wins
            "nested": b', "p": {"k": 1, "k": 2}',
            "deeper": b', "p": {"q": {"k": 1, "k": 2}}',
            "colon": b', "p": {"k": "a:b"}',
            "verdict": b', "verdict": "allowed"',
        }[kind]
        lines[index] = head + extra + brace + tail
    return lines


@settings(max_examples=200, deadline=None)
@given(lines=lines_with_repeats(), chunk=st.sampled_from([LinePlan._CHUNK, 3]))
def test_the_first_pass_loop_reads_each_line_as_read_does(lines: list[bytes], chunk: int) -> None:
    # read_lines codes the usual line of a known route in its own loop: the plan it makes
    # must be the one read() makes a line at a time, whatever the line.
    def plan_of(read_all: bool) -> tuple[Any, ...]:
        plan = LinePlan(share_verdicts=True)
        if read_all:
            read = plan.read_lines(iter(lines))
            shown = [item for item in read if item is not STILL_READING]
        else:
            items = (plan.read(line, n) for n, line in enumerate(lines, 1))
            shown = [item for item in items if item is not None]
        hashes = list(plan.ids.first_pass_hashes)
        plan.finish_first_pass()
        codes = [code for _, _, code in plan.lines(iter(lines))]
        plan.close()
        return shown, codes, plan.routes, hashes, plan.valid_unrouted, plan.line_count

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LinePlan, "_CHUNK", chunk)
        assert plan_of(read_all=True) == plan_of(read_all=False)


def _count(values: Iterator[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def test_lines_past_the_route_limit_get_their_verdict_without_a_second_decode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A campaign to a number each, past the route limit: only the blocklisted lines (whose
    fallbacks decide) are decoded again; every record and the summary are still right."""
    numbers = [f"+9198{index:08d}" for index in range(3_000)]
    blocked = set(numbers[::7])

    def lookup(channel: str, asked: list[str]) -> set[str]:
        return blocked & set(asked) if channel == "sms" else set()

    from blockfilter.config import load_settings
    from blockfilter.sources import FunctionSource

    lines = [
        json.dumps(
            {"id": f"m{i}", "channel": "sms", "to": number, "fallback": ["whatsapp"]}
        ).encode()
        + b"\n"
        for i, number in enumerate(numbers)
    ]
    decoded_again: list[int] = []
    decode = filter_module._decode_again

    def counting(line: bytes, line_number: int, is_duplicate: Any) -> Any:
        decoded_again.append(line_number)
        return decode(line, line_number, is_duplicate)

    monkeypatch.setattr(jsonlines, "ROUTE_LIMIT", 100)
    monkeypatch.setattr(filter_module, "_decode_again", counting)
    engine = Filter(load_settings(environ={}), sources=[FunctionSource("one", lookup)])
    out = [json.loads(line) for line in engine.run_lines(lambda: iter(lines))]

    assert [r["id"] for r in out] == [f"m{i}" for i in range(3_000)]
    assert [r["e164"] for r in out] == numbers
    assert [r["verdict"] for r in out] == [
        "rerouted" if number in blocked else "allowed" for number in numbers
    ]
    assert {r["channel"] for r in out if r["verdict"] == "allowed"} == {"sms"}
    past_the_limit_blocked = [i + 1 for i, n in enumerate(numbers) if n in blocked and i >= 100]
    assert decoded_again == past_the_limit_blocked
    assert engine.summary.verdicts == {"allowed": 3_000 - len(blocked), "rerouted": len(blocked)}


def test_repeated_routes_are_decided_once_and_asked_once() -> None:
    """A campaign of 30,000 lines over 3 numbers: 3 numbers asked, every line right."""
    asked: list[str] = []

    def lookup(channel: str, numbers: list[str]) -> set[str]:
        asked.extend(numbers)
        return {VALID[1]}

    from blockfilter.config import load_settings
    from blockfilter.sources import FunctionSource

    lines = [
        json.dumps({"id": f"m{i}", "channel": "sms", "to": VALID[i % 3]}).encode() + b"\n"
        for i in range(30_000)
    ]
    engine = Filter(load_settings(environ={}), sources=[FunctionSource("one", lookup)])
    out = [json.loads(line) for line in engine.run_lines(lambda: iter(lines))]
    assert sorted(asked) == sorted(VALID[:3])
    assert [r["id"] for r in out] == [f"m{i}" for i in range(30_000)]
    assert [r["verdict"] for r in out[:3]] == ["allowed", "blocked", "allowed"]
    assert engine.summary.verdicts == {"allowed": 20_000, "blocked": 10_000}


def test_a_route_keeps_its_verdict_only_once_it_has_a_second_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Routes of one line keep no verdict; routes of more keep one: the same records and
    summary as Filter.run either way, reroutes included."""
    alive = [0, 0]  # verdicts alive now, and at most

    class Counted(filter_module._Shared):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            alive[0] += 1
            alive[1] = max(alive)

        def __del__(self) -> None:
            alive[0] -= 1

    monkeypatch.setattr(filter_module, "_Shared", Counted)
    once = [
        {"id": f"o{i}", "channel": "sms", "to": f"+9198{i:08d}", "fallback": ["voice"]}
        for i in range(300)
    ]
    repeated = [{"id": f"r{i}", "channel": "sms", "to": VALID[i % 3]} for i in range(30)]
    messages = [m for pair in zip(once, [*repeated, *[None] * 270], strict=True) for m in pair]
    lines = [json.dumps(m).encode() + b"\n" for m in messages if m is not None]
    engine = make_filter()
    got = [json.loads(line) for line in engine.run_lines(lambda: iter(lines))]
    assert alive[1] <= 3 + 1  # the repeated routes' three, and the line at hand's
    assert [view(r) for r in got] == [view(r) for r in oracle(lines)]
    reference = make_filter()
    list(reference.run(json.loads(line) for line in lines))
    summary, expected = engine.summary.as_dict(), reference.summary.as_dict()
    del summary["elapsed_s"], expected["elapsed_s"]
    assert summary == expected


# -- an input that changes under the filter ---------------------------------------------------


def test_an_input_with_other_lines_on_a_later_pass_is_an_error() -> None:
    first = [json.dumps({"id": str(i), "channel": "sms", "to": VALID[0]}).encode() for i in (1, 2)]
    for later in (first[:1], [*first, first[0]]):
        passes = iter([first, later])
        with pytest.raises(InputChanged, match="changed while it was being filtered"):
            list(make_filter().run_lines(lambda: iter(next(passes))))  # noqa: B023


def test_a_file_edited_during_a_run_stops_it_and_writes_nothing(
    sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command line checks the file is the same on every pass, so a line edited in place
    (same number of lines) cannot get the verdict meant for what was there before."""
    from blockfilter import hookimpl
    from blockfilter.plugins.manager import get_plugin_manager, reset_plugin_manager

    for name, value in subprocess_env(sim).items():
        if name.startswith(("KALEYRA_", "BLOCKFILTER_")):
            monkeypatch.setenv(name, value)
    path = tmp_path / "campaign.jsonl"
    path.write_text(
        json.dumps({"id": "1", "channel": "sms", "to": VALID[0]})
        + "\n"
        + json.dumps({"id": "2", "channel": "sms", "to": VALID[1]})
        + "\n"
    )

    class EditsTheFile:
        @hookimpl
        def blockfilter_blocklisted(self, channel: str, numbers: list[str]) -> list[str]:
            text = path.read_text()
            path.write_text(text.replace(VALID[1], VALID[2]))  # same lines, another number
            return []

    reset_plugin_manager()
    try:
        get_plugin_manager().register(EditsTheFile())
        code = cli.main(["filter", str(path), "--quiet", "--out", str(tmp_path / "out.jsonl")])
    finally:
        reset_plugin_manager()
    assert code == cli.EXIT_ERROR
    assert not (tmp_path / "out.jsonl").exists()


# -- splitting a file into lines ----------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(
        st.sampled_from([b"\n", b"{}", b"ab", b"x" * 7, b"\r", b"\r\n", b"y" * 13]), max_size=40
    ),
    block=st.integers(min_value=1, max_value=16),
    max_line=st.integers(min_value=1, max_value=12),
)
def test_line_blocks_give_the_lines_readline_gives(
    pieces: list[bytes], block: int, max_line: int
) -> None:
    """Every line up to the limit byte for byte, in order; each longer one as one line over
    the limit (so it is ``malformed_line``), never longer than the limit plus a block."""
    import io

    content = b"".join(pieces)
    expected = [
        line if len(line) <= max_line else b"LONG" for line in io.BytesIO(content).readlines()
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jsonlines, "_BLOCK_BYTES", block)
        patch.setattr(jsonlines, "MAX_LINE_BYTES", max_line)
        got = list(jsonlines.file_lines(io.BytesIO(content)))
    assert all(len(line) <= max_line + block for line in got)
    assert [line if len(line) <= max_line else b"LONG" for line in got] == expected
