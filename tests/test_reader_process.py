"""The first pass read by a forked process (``BLOCKFILTER_PARSER_PROCESS``): the verdicts of
one process, and a run that stops, never a partial plan, when the reader fails.

The oracle is the same run with the reader off. Faults are real: the child is killed by its
own hand (``os._exit``) or fails, in the middle of its reading, through the lines it reads;
fork() is refused by a pids cgroup that holds one task; and the frames of a child that failed
half-way through writing one are bytes as they would come.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from blockfilter import cli
from blockfilter.engine import lines as jsonlines
from blockfilter.engine import reader
from blockfilter.engine.filter import Filter, message_independent
from blockfilter.errors import InputChanged, ReaderFailed
from blockfilter.model import Parsed
from blockfilter.testing.simulator import Simulator
from tests.support.env import TEST_KEY, TEST_SID, subprocess_env
from tests.test_cli import numbers
from tests.test_hostile_input import make_filter

pytestmark = pytest.mark.skipif(
    not reader.forking_supported(), reason="the reader process is Linux's only"
)


def campaign_lines(count: int, pool: Sequence[str], late: Sequence[str]) -> list[bytes]:
    """``count`` lines of every kind a campaign file holds; the numbers of ``late`` only in
    its second half (so only a forked reader reads them)."""
    rng = random.Random(count)
    lines: list[bytes] = []
    for index in range(count):
        kind = rng.random()
        number = rng.choice(late if index > count // 2 and kind < 0.2 else pool)
        message: dict[str, Any] = {"id": f"m{index}", "channel": "sms", "to": number}
        if kind < 0.05:
            lines.append(b"\n")
            continue
        if kind < 0.08:
            lines.append(b"{not json\n")
            continue
        if kind < 0.1:
            message["to"] = "12345"  # invalid_number
        elif kind < 0.12:
            message["id"] = f"m{index - 1}"  # a duplicate id
        elif kind < 0.3:
            message["fallback"] = ["whatsapp"]
        elif kind < 0.32:
            lines.append(json.dumps(message).encode()[:-1] + b', "channel": "voice"}\n')
            continue  # repeats a key
        elif kind < 0.4:
            message["to"] = number.replace("+91", "0")  # national format
            message["region"] = "IN"
        lines.append(json.dumps(message).encode() + b"\n")
    return lines


def records(output: bytes) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in json.loads(line).items() if k != "checked_at"}
        for line in output.splitlines()
    ]


def test_the_command_line_gives_the_verdicts_with_the_reader_process_it_gives_without(
    tmp_path: Path,
) -> None:
    pool, late = numbers(300, seed=1), numbers(40, seed=2)
    blocked = {"sms": pool[:30] + late[:20], "whatsapp": pool[:10] + late[:5]}
    campaign = tmp_path / "campaign.jsonl"
    campaign.write_bytes(b"".join(campaign_lines(6000, pool, late)))
    outputs, summaries = {}, {}
    with Simulator(blocked, sid=TEST_SID, api_key=TEST_KEY) as sim:
        for mode in ("off", "always", "auto"):
            out, summary = tmp_path / f"{mode}.jsonl", tmp_path / f"{mode}.json"
            done = subprocess.run(
                [sys.executable, "-m", "blockfilter", "filter", str(campaign)]
                + ["--out", str(out), "--summary-json", str(summary), "--quiet"],
                capture_output=True,
                env=subprocess_env(sim, BLOCKFILTER_PARSER_PROCESS=mode),
                timeout=120,
            )
            assert done.returncode == 0, done.stderr.decode()
            outputs[mode] = records(out.read_bytes())
            summaries[mode] = json.loads(summary.read_text())
            summaries[mode].pop("elapsed_s")
    assert outputs["always"] == outputs["off"] == outputs["auto"]
    assert summaries["always"] == summaries["off"] == summaries["auto"]
    late_blocked = [r for r in outputs["always"] if r.get("e164") in late[:20]]
    assert late_blocked, "the campaign sends to the late blocklisted numbers"
    assert all(r["verdict"] != "allowed" or r["channel"] == "whatsapp" for r in late_blocked)
    assert {r["verdict"] for r in outputs["always"]} >= {"allowed", "blocked", "invalid"}


# -- in this process: who reads which line, and the faults --------------------------------


def reading(lines: list[bytes], at: int, act: Callable[[], None]) -> Callable[[], Iterator[bytes]]:
    """``open_lines`` for ``lines``; the first pass's reader calls ``act`` at line ``at`` when
    it is not this process (a forked reader)."""
    parent = os.getpid()
    passes = 0

    def open_lines() -> Iterator[bytes]:
        nonlocal passes
        passes += 1
        first = passes == 1
        for number, line in enumerate(lines, 1):
            if first and number == at and os.getpid() != parent:
                act()
            yield line

    return open_lines


def children() -> list[int]:
    """The processes whose parent is this one, zombies included."""
    mine = str(os.getpid())
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if stat.rpartition(")")[2].split()[1] == mine:
                found.append(int(entry))
    return found


def small_campaign(count: int) -> list[bytes]:
    return campaign_lines(count, numbers(50, seed=3), numbers(10, seed=4))


def run(engine: Filter, open_lines: Callable[[], Iterator[bytes]], mode: str) -> list[Any]:
    return records(b"".join(engine.run_lines(open_lines, parser_process=mode)))


def test_auto_forks_past_4096_lines_and_always_past_the_first(tmp_path: Path) -> None:
    readers = tmp_path / "readers"

    def note_reader() -> None:
        with readers.open("a") as out:
            out.write(f"{os.getpid()}\n")

    for count, mode, forked in [
        (5000, "auto", True),
        (4000, "auto", False),
        (100, "always", True),
        (5000, "off", False),
    ]:
        readers.write_text("")
        # This process reads its lines and the one after them (to see that there is more).
        at = (reader.AUTO_AFTER_LINES if mode == "auto" else 1) + 2
        lines = small_campaign(count)
        expected = run(make_filter(), partial(iter, lines), "off")
        got = run(make_filter(), reading(lines, min(at, count), note_reader), mode)
        assert got == expected
        assert bool(readers.read_text()) is forked, (count, mode)
    assert children() == []


def test_a_reader_killed_half_way_stops_the_run_and_is_reaped() -> None:
    lines = small_campaign(3000)
    engine = make_filter()
    with pytest.raises(ReaderFailed, match="before it had sent all it read"):
        run(engine, reading(lines, 1500, lambda: os._exit(7)), "always")
    assert engine.summary.as_dict()["total"] == 0  # not one verdict
    assert children() == []


def test_the_input_changing_under_the_reader_process_is_input_changed(tmp_path: Path) -> None:
    campaign = tmp_path / "campaign.jsonl"
    campaign.write_bytes(b"".join(small_campaign(3000)))
    opener = cli._line_opener(str(campaign))  # the command line's reader, which checks the file
    parent = os.getpid()

    def open_lines() -> Iterator[bytes]:
        for number, line in enumerate(opener(), 1):
            if number == 2000 and os.getpid() != parent:
                with campaign.open("ab") as out:  # an exporter still writing the file
                    out.write(b'{"id": "late", "channel": "sms", "to": "+918020000052"}\n')
            yield line

    with pytest.raises(InputChanged, match="changed while it was being filtered"):
        run(make_filter(), open_lines, "always")
    assert children() == []


def test_a_reader_error_reaches_the_run_without_the_line_it_quotes() -> None:
    def fail() -> None:
        raise ValueError("cannot read '+918020000052'")

    with pytest.raises(ReaderFailed) as raised:
        run(make_filter(), reading(small_campaign(3000), 1000, fail), "always")
    assert "ValueError" in str(raised.value)
    assert "8020000052" not in str(raised.value)
    assert children() == []


def test_a_run_that_fails_while_the_child_reads_kills_it() -> None:
    calls = 0

    @message_independent
    def failing_policy(message: Mapping[str, Any], parsed: Parsed) -> Sequence[str]:
        nonlocal calls
        calls += 1
        if calls == 50:
            raise RuntimeError("a policy's bug")
        return ()

    lines = small_campaign(3000) * 20  # a child still reading when the policy fails
    engine = make_filter(fallback_policy=failing_policy)
    with pytest.raises(RuntimeError, match="a policy's bug"):
        run(engine, lambda: iter(lines), "always")
    assert children() == []


def test_compact_lines_past_the_route_limit_are_read_by_the_child(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Past the route limit, lines are coded by their channels and their numbers kept beside
    # the codes: the child sends those back with the codes.
    monkeypatch.setattr(jsonlines, "ROUTE_LIMIT", 40)
    monkeypatch.setattr(jsonlines.LinePlan, "_CHUNK", 64)  # codes spilled to the spool too
    lines = campaign_lines(2000, numbers(400, seed=5), numbers(50, seed=6))
    expected = run(make_filter(), lambda: iter(lines), "off")
    assert run(make_filter(), lambda: iter(lines), "always") == expected


def test_a_frame_cut_short_and_followed_by_another_is_reader_failed() -> None:
    # A child that fails while it writes a frame sends the failure after the frame's first
    # bytes: the frame's length then takes in the next frame's, and the bytes are no pickle.
    items = pickle.dumps([("m1", "sms", (), 918020000052, True)])
    error = pickle.dumps(("MemoryError", "MemoryError"))
    cut = items[: len(items) // 2]
    stream = b"i" + len(items).to_bytes(8, "little") + cut
    stream += b"e" + len(error).to_bytes(8, "little") + error
    stream = stream[: 9 + len(items)]  # what the parent reads as the first frame
    plan = jsonlines.LinePlan(share_verdicts=True)
    with pytest.raises(ReaderFailed, match="cannot be read"):
        list(reader._received(plan, io.BytesIO(stream)))
    assert plan.routes == []


@pytest.fixture
def one_task_cgroup(tmp_path: Path) -> Iterator[Path]:
    """A cgroup of the pids controller that holds one task at most: a process moved into it
    can neither fork nor start a thread. Skips where such a group cannot be made (cgroup v1's
    pids hierarchy, writable by root only)."""
    group = Path("/sys/fs/cgroup/pids") / f"blockfilter-test-{os.getpid()}-{tmp_path.name}"
    try:
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"no pids cgroup to limit a command's processes with: {exc}")
    try:
        (group / "pids.max").write_text("1")
        yield group
    finally:
        group.rmdir()  # empty once its one process has ended


def test_without_a_second_process_to_be_had_the_first_pass_is_read_in_one(
    one_task_cgroup: Path,
) -> None:
    # fork() fails (a limit on processes): the command reads on in its one process. Every
    # number is invalid, so no request thread is ever needed either.
    campaign = b"".join(
        json.dumps({"id": f"m{n}", "channel": "sms", "to": "12345"}).encode() + b"\n"
        for n in range(50)
    )
    procs = one_task_cgroup / "cgroup.procs"

    def alone() -> None:
        procs.write_text(str(os.getpid()))

    done = subprocess.run(
        [sys.executable, "-m", "blockfilter", "filter", "-", "--quiet"],
        input=campaign,
        capture_output=True,
        env=subprocess_env(
            "http://127.0.0.1:9",  # never asked: no number is valid
            BLOCKFILTER_PARSER_PROCESS="always",
        ),
        preexec_fn=alone,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()
    verdicts = [json.loads(line)["verdict"] for line in done.stdout.splitlines()]
    assert verdicts == ["invalid"] * 50


def test_a_plan_spooled_to_disk_before_the_fork_reaches_the_child_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Spools of 64 bytes, codes spilled every 64 lines, the fork after 2,000 lines: the
    # codes of the lines read before the fork are on disk, in a file whose offset the two
    # processes share once forked. The child copies them while this process starts afresh.
    small_spool = partial(tempfile.SpooledTemporaryFile, max_size=64)
    monkeypatch.setattr(jsonlines, "_new_spool", small_spool)
    monkeypatch.setattr(jsonlines.LinePlan, "_CHUNK", 64)
    monkeypatch.setattr(reader, "AUTO_AFTER_LINES", 2000)
    lines = small_campaign(4000)
    expected = run(make_filter(), partial(iter, lines), "off")
    for _ in range(10):  # the two processes race for the file: let them, a few times
        assert run(make_filter(), partial(iter, lines), "auto") == expected
