"""The command line, run as a user runs it (a subprocess), against the simulator over HTTP."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from blockfilter.testing.simulator import FaultRule, Simulator
from tests.support.env import TEST_KEY, TEST_SID, subprocess_env
from tests.support.simulator_command import simulator_command


def numbers(count: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    found: dict[str, None] = {}
    while len(found) < count:
        found[f"+9198{rng.randrange(10**8):08d}"] = None
    return list(found)


@pytest.fixture
def simulator():
    with Simulator(sid=TEST_SID, api_key=TEST_KEY) as sim:
        yield sim


def blockfilter(
    *args: str, env: dict[str, str], stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "blockfilter", *args],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=120,
    )


def write_campaign(path: Path, messages: list[Any]) -> Path:
    path.write_text("".join(json.dumps(m) + "\n" for m in messages))
    return path


def records(output: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines()]


def test_a_campaign_comes_out_whole_with_the_right_verdicts_and_fewest_requests(
    simulator: Simulator, tmp_path: Path
) -> None:
    pool = numbers(450)
    sms_blocked = set(pool[:60])
    whatsapp_blocked = set(pool[:20])
    voice_blocked = set(pool[:5])
    simulator.block("sms", *sms_blocked)
    simulator.block("whatsapp", *whatsapp_blocked)
    simulator.block("voice", *voice_blocked)
    rng = random.Random(3)
    messages = []
    for index in range(3000):
        number = rng.choice(pool)
        message: dict[str, Any] = {"id": f"m{index}", "channel": "sms", "to": number, "n": index}
        if index % 2:
            message["fallback"] = ["whatsapp", "voice"]
        messages.append(message)
    campaign = write_campaign(tmp_path / "campaign.jsonl", messages)
    summary_file = tmp_path / "summary.json"
    done = blockfilter(
        "filter", str(campaign), "--summary-json", str(summary_file), env=subprocess_env(simulator)
    )
    assert done.returncode == 0, done.stderr
    out = records(done.stdout)
    assert [r["id"] for r in out] == [m["id"] for m in messages]
    for message, result in zip(messages, out, strict=True):
        number = message["to"]
        if number not in sms_blocked:
            expected = ("allowed", "sms")
        elif not message.get("fallback"):
            expected = ("blocked", "sms")
        elif number not in whatsapp_blocked:
            expected = ("rerouted", "whatsapp")
        elif number not in voice_blocked:
            expected = ("rerouted", "voice")
        else:
            expected = ("blocked", "sms")
        assert (result["verdict"], result["channel"]) == expected, message
        assert result["n"] == message["n"]
    distinct = {m["to"] for m in messages}
    blocked_with_fallback = {
        m["to"] for m in messages if m["to"] in sms_blocked and "fallback" in m
    }
    second = blocked_with_fallback & whatsapp_blocked
    lower_bound = (
        math.ceil(len(distinct) / 100)
        + math.ceil(len(blocked_with_fallback) / 100)
        + math.ceil(len(second) / 100)
    )
    stats = simulator.stats
    assert stats.requests == lower_bound
    assert stats.max_numbers_per_request <= 100
    summary = json.loads(summary_file.read_text())
    assert summary["total"] == 3000
    assert summary["requests"] == lower_bound
    assert sum(summary["verdicts"].values()) == 3000
    assert "3000 messages" in done.stderr.decode()


def test_stdin_and_atomic_out_file(simulator: Simulator, tmp_path: Path) -> None:
    messages = [{"id": str(i), "channel": "voice", "to": n} for i, n in enumerate(numbers(5))]
    payload = "".join(json.dumps(m) + "\n" for m in messages).encode()
    out_file = tmp_path / "out.jsonl"
    done = blockfilter(
        "filter",
        "-",
        "--out",
        str(out_file),
        "--quiet",
        env=subprocess_env(simulator),
        stdin=payload,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"" and done.stderr == b""
    assert [r["verdict"] for r in records(out_file.read_bytes())] == ["allowed"] * 5
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temporary left behind


def test_an_outage_defers_every_message_and_exits_4(simulator: Simulator, tmp_path: Path) -> None:
    simulator.set_faults([FaultRule(kind="wa500")])
    messages = [{"id": str(i), "channel": "sms", "to": n} for i, n in enumerate(numbers(150))]
    campaign = write_campaign(tmp_path / "c.jsonl", messages)
    done = blockfilter("filter", str(campaign), env=subprocess_env(simulator))
    assert done.returncode == 4, done.stderr
    out = records(done.stdout)
    assert len(out) == 150
    assert {(r["verdict"], r["reason"]) for r in out} == {("deferred", "check_failed")}
    # Two requests of 100 and 50, each tried twice: the budget holds.
    assert simulator.stats.requests == 4


@pytest.mark.parametrize("code", ["rbc001", "wa401", "wa-401", "e110"])
def test_credentials_refused_writes_every_record_and_exits_3(
    simulator: Simulator, tmp_path: Path, code: str
) -> None:
    simulator.set_faults([FaultRule(kind=code)])
    messages = [{"id": str(i), "channel": "sms", "to": n} for i, n in enumerate(numbers(300))]
    messages.append({"id": "bad", "channel": "sms", "to": "12"})
    campaign = write_campaign(tmp_path / "c.jsonl", messages)
    summary_file = tmp_path / "s.json"
    done = blockfilter(
        "filter", str(campaign), "--summary-json", str(summary_file), env=subprocess_env(simulator)
    )
    assert done.returncode == 3, done.stderr
    out = records(done.stdout)
    assert len(out) == 301
    assert {r["reason"] for r in out[:300]} == {"credentials_refused"}
    assert out[300]["verdict"] == "invalid"
    assert json.loads(summary_file.read_text())["verdicts"] == {"deferred": 300, "invalid": 1}
    # Refused is final: the first refusal stops every other request.
    assert simulator.stats.requests <= 3


def test_malformed_lines_become_invalid_records(simulator: Simulator, tmp_path: Path) -> None:
    (number,) = numbers(1)
    good = json.dumps({"id": "a", "channel": "sms", "to": number})
    campaign = tmp_path / "c.jsonl"
    campaign.write_bytes(
        b"\n".join([good.encode(), b"{oops", b"\xff\xfe not utf-8", b"", b'"a string"']) + b"\n"
    )
    done = blockfilter("filter", str(campaign), env=subprocess_env(simulator))
    assert done.returncode == 0, done.stderr
    out = records(done.stdout)
    assert [(r["id"], r["verdict"]) for r in out] == [
        ("a", "allowed"),
        ("2", "invalid"),
        ("3", "invalid"),
        ("5", "invalid"),
    ]
    assert {r.get("reason") for r in out[1:]} == {"malformed_line"}


def test_the_key_never_shows_even_at_debug(simulator: Simulator, tmp_path: Path) -> None:
    simulator.set_faults([FaultRule(kind="wa500", every=2)])
    messages = [{"id": str(i), "channel": "sms", "to": n} for i, n in enumerate(numbers(250))]
    campaign = write_campaign(tmp_path / "c.jsonl", messages)
    outputs = [
        blockfilter("-vv", "filter", str(campaign), env=subprocess_env(simulator)),
        blockfilter("config", env=subprocess_env(simulator)),
        blockfilter(
            "-vv", "check", "--channel", "sms", messages[0]["to"], env=subprocess_env(simulator)
        ),
    ]
    for done in outputs:
        assert TEST_KEY.encode() not in done.stdout + done.stderr
    assert b"[REDACTED]" in outputs[1].stdout
    # Numbers in logs are masked.
    assert messages[0]["to"].encode() not in outputs[0].stderr


def test_missing_credentials_is_one_clear_line(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c.jsonl", [])
    env = subprocess_env()
    done = blockfilter("filter", str(campaign), env=env)
    assert done.returncode == 2
    assert done.stderr.decode().strip().splitlines() == [
        "blockfilter: KALEYRA_SID is not set: export your Kaleyra account SID"
    ]


def test_bad_settings_exit_2_without_a_traceback(simulator: Simulator, tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c.jsonl", [])
    for extra in (
        {"KALEYRA_BASE_URL": "http://example.com"},
        {"BLOCKFILTER_ON_ERROR": "maybe"},
        {"KALEYRA_SID": "../../admin"},
    ):
        done = blockfilter("filter", str(campaign), env=subprocess_env(simulator, **extra))
        assert done.returncode == 2, extra
        assert b"Traceback" not in done.stderr
        assert len(done.stderr.decode().strip().splitlines()) == 1


def test_check_prints_the_blocklisted_numbers(simulator: Simulator) -> None:
    pool = numbers(3)
    simulator.block("whatsapp", pool[1])
    done = blockfilter("check", "--channel", "whatsapp", *pool, env=subprocess_env(simulator))
    assert (done.returncode, done.stdout.decode()) == (0, pool[1] + "\n")
    done = blockfilter(
        "check", "--channel", "whatsapp", "--json", *pool, env=subprocess_env(simulator)
    )
    assert json.loads(done.stdout) == {"channel": "whatsapp", "blocked": [pool[1]]}


def test_estimate_equals_the_requests_a_run_makes(simulator: Simulator, tmp_path: Path) -> None:
    pool = numbers(730)
    messages = [
        {"id": str(i), "channel": ["sms", "whatsapp"][i % 2], "to": pool[i % len(pool)]}
        for i in range(2000)
    ]
    campaign = write_campaign(tmp_path / "c.jsonl", messages)
    estimate = blockfilter("filter", str(campaign), "--estimate", env=subprocess_env(simulator))
    assert estimate.returncode == 0, estimate.stderr
    assert simulator.stats.requests == 0
    predicted = int(estimate.stdout.split()[0])
    done = blockfilter("filter", str(campaign), "--quiet", env=subprocess_env(simulator))
    assert done.returncode == 0
    # 730 numbers: the even ones on sms, the odd ones on whatsapp, 365 each.
    assert simulator.stats.requests == predicted == 8


def test_max_requests_defers_the_rest(simulator: Simulator, tmp_path: Path) -> None:
    messages = [{"id": str(i), "channel": "sms", "to": n} for i, n in enumerate(numbers(500))]
    campaign = write_campaign(tmp_path / "c.jsonl", messages)
    done = blockfilter(
        "filter", str(campaign), "--max-requests", "2", env=subprocess_env(simulator)
    )
    assert done.returncode == 4
    verdicts = [r["verdict"] for r in records(done.stdout)]
    assert verdicts.count("allowed") == 200 and verdicts.count("deferred") == 300
    assert simulator.stats.requests == 2


def test_a_closed_pipe_ends_quietly(simulator: Simulator, tmp_path: Path) -> None:
    messages = [{"id": str(i), "channel": "sms", "to": n} for i, n in enumerate(numbers(2000))]
    campaign = write_campaign(tmp_path / "c.jsonl", messages)
    env = subprocess_env(simulator)
    command = f"{sys.executable} -m blockfilter filter {campaign} | head -n 1"
    done = subprocess.run(command, shell=True, capture_output=True, env=env, timeout=120)
    assert len(done.stdout.splitlines()) == 1
    assert b"Traceback" not in done.stderr and b"Exception" not in done.stderr


def test_version_and_usage_errors() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "blockfilter", "--version"], capture_output=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.startswith(b"blockfilter ")
    done = subprocess.run(
        [sys.executable, "-m", "blockfilter", "filter"], capture_output=True, timeout=60
    )
    assert done.returncode == 2


def test_the_simulator_command_prints_its_url_when_ready(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked.txt"
    (number,) = numbers(1)
    blocked.write_text(f"sms,{number}\n")
    env = subprocess_env()
    with simulator_command(env, "--blocked", str(blocked)) as simulator:
        assert simulator.base_url.startswith("http://127.0.0.1:")
        env.update(
            KALEYRA_SID="ANY", KALEYRA_API_KEY="any-key", KALEYRA_BASE_URL=simulator.base_url
        )
        done = blockfilter("check", "--channel", "sms", number, env=env)
        assert done.stdout.decode() == number + "\n"
    assert b"Traceback" not in simulator.stderr


def test_plugins_lists_the_built_ins_with_versions_and_hooks() -> None:
    env = subprocess_env()
    done = subprocess.run(
        [sys.executable, "-m", "blockfilter", "plugins"], capture_output=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.decode().splitlines()
    assert any(
        line.startswith("kaleyra ") and "blockfilter_blocklist_sources" in line for line in lines
    )
    assert any(line.startswith("default-reroute ") for line in lines)


def test_replay_without_an_app_or_broker_is_a_usage_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "blockfilter", "replay"], capture_output=True, timeout=60
    )
    assert done.returncode == 2
    assert b"--app" in done.stderr and b"Traceback" not in done.stderr
