"""The fault matrix of the command line: every failure the simulator can inject, alone,
intermittent and total, against ``blockfilter filter`` run as a user runs it.

For each case: every message gets exactly one verdict, in input order; under ``defer`` no
message is allowed, rerouted or blocked unless the checks behind that verdict succeeded (the
campaign is one third blocklisted, so an answer misread as "nothing blocklisted" would show as
a wrong verdict); retries stop within the budget (attempts x requests, and the deadline); the
summary JSON, the human summary and the exit code all state the final state.

The retry budget is shrunk through the environment so the whole matrix runs in well under a
minute: 3 attempts, 10-20 ms backoff, 0.75 s per attempt, 3 s per request, Retry-After capped
at 0.2 s.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from blockfilter.cli import format_summary
from blockfilter.config import CHANNELS
from blockfilter.testing.simulator import FAULT_KINDS, FaultRule, Simulator
from tests.support.env import TEST_KEY, TEST_SID, subprocess_env
from tests.support.fault_kinds import FINAL, REFUSED, TRANSIENT
from tests.test_cli import numbers, write_campaign

ATTEMPTS = 3
REQUEST_TIMEOUT = 0.75
RETRY_DEADLINE = 3.0
RETRY_AFTER_MAX = 0.2
# How long a slow fault holds the connection: longer than an attempt may take.
SLOW_FAULT_SECONDS = 2.0

MODES = ("alone", "intermittent", "total")


def test_the_matrix_covers_every_fault_the_simulator_knows() -> None:
    assert set(TRANSIENT + REFUSED + FINAL) == set(FAULT_KINDS)


# -- the campaign: a third of it blocklisted, fallbacks, and some invalid messages ---------------

POOL = numbers(260, seed=31)
BLOCKED = {
    "sms": {n for i, n in enumerate(POOL) if i % 3 == 0},
    "whatsapp": {n for i, n in enumerate(POOL) if i % 6 == 0},
    "voice": {n for i, n in enumerate(POOL) if i % 12 == 0},
}


def _campaign() -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for i in range(420):
        number = POOL[i % len(POOL)]
        message: dict[str, Any] = {"id": f"m{i}", "channel": "sms", "to": number, "n": i}
        if i % 10 == 0:
            message["channel"] = "WhatsApp"
            if i % 20 == 0:
                message["fallback"] = ["voice"]
        elif i % 2:
            message["fallback"] = ["whatsapp", "voice"]
        messages.append(message)
    messages += [
        {"id": "bad-number", "channel": "sms", "to": "12345"},
        {"id": "bad-channel", "channel": "fax", "to": POOL[1]},
        {"id": "m7", "channel": "sms", "to": POOL[2]},  # a repeated id
    ]
    return messages


CAMPAIGN = _campaign()
INVALID_IDS = {"bad-number": "invalid_number", "bad-channel": "unknown_channel"}


def first_round_requests() -> int:
    """Requests of the first round: the distinct numbers of each channel, 100 a request."""
    distinct: dict[str, set[str]] = {channel: set() for channel in CHANNELS}
    for message in CAMPAIGN[:420]:
        distinct[message["channel"].lower()].add(message["to"])
    return sum(math.ceil(len(found) / 100) for found in distinct.values())


def truly_blocked(channel: str, number: str) -> bool:
    return number in BLOCKED[channel]


def true_verdict(message: dict[str, Any]) -> tuple[str, str]:
    """(verdict, final channel) the blocklist calls for, every check succeeding."""
    channel, number = message["channel"].lower(), message["to"]
    if not truly_blocked(channel, number):
        return "allowed", channel
    for fallback in message.get("fallback", []):
        if not truly_blocked(fallback, number):
            return "rerouted", fallback
    return "blocked", channel


# -- running the command line ----------------------------------------------------------------


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with Simulator(BLOCKED, sid=TEST_SID, api_key=TEST_KEY) as simulator:
        yield simulator


@pytest.fixture(scope="module")
def campaign_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_campaign(tmp_path_factory.mktemp("matrix") / "campaign.jsonl", CAMPAIGN)


def matrix_env(sim: Simulator, **extra: str) -> dict[str, str]:
    budget = {
        "BLOCKFILTER_RETRY_ATTEMPTS": str(ATTEMPTS),
        "BLOCKFILTER_CONNECT_TIMEOUT": "0.5",
        "BLOCKFILTER_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT),
        "BLOCKFILTER_RETRY_DEADLINE": str(RETRY_DEADLINE),
        "BLOCKFILTER_RETRY_AFTER_MAX": str(RETRY_AFTER_MAX),
    }
    return subprocess_env(sim, **{**budget, **extra})


@dataclass
class Run:
    returncode: int
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    stderr: str
    requests: int  # as the simulator counted them


def run_filter(
    sim: Simulator, campaign: Path, tmp_path: Path, faults: list[FaultRule], **extra: str
) -> Run:
    sim.set_faults(faults)
    sim.reset_stats()
    summary_file = tmp_path / "summary.json"
    done = subprocess.run(
        [sys.executable, "-m", "blockfilter", "filter", str(campaign)]
        + ["--summary-json", str(summary_file)],
        capture_output=True,
        env=matrix_env(sim, **extra),
        timeout=120,
    )
    sim.clear_faults()
    stderr = done.stderr.decode()
    assert "Traceback" not in stderr, stderr
    return Run(
        returncode=done.returncode,
        records=[json.loads(line) for line in done.stdout.splitlines()],
        summary=json.loads(summary_file.read_text()),
        stderr=stderr,
        requests=sim.stats.requests,
    )


@pytest.fixture(scope="module")
def baseline(sim: Simulator, campaign_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The campaign with no fault: the verdicts every recovered run must reproduce."""
    run = run_filter(sim, campaign_file, tmp_path_factory.mktemp("baseline"), [])
    assert run.returncode == 0, run.stderr
    return run


def test_the_baseline_is_the_truth(baseline: Run) -> None:
    verdicts = Counter(record["verdict"] for record in baseline.records)
    # Every verdict is exercised, so a fault could hide in none of them.
    assert {"allowed", "rerouted", "blocked", "invalid"} <= set(verdicts)
    for message, record in zip(CAMPAIGN[:420], baseline.records, strict=False):
        assert (record["verdict"], record["channel"].lower()) == true_verdict(message), message
    assert baseline.requests == baseline.summary["requests"]


# -- the invariants of every run ---------------------------------------------------------------


def check_run(run: Run, *, on_error: str = "defer") -> None:
    """What must hold whatever failed."""
    # One record per message, in input order, ids preserved, other fields carried through.
    assert [record["id"] for record in run.records] == [m["id"] for m in CAMPAIGN]
    seen: set[str] = set()
    for message, record in zip(CAMPAIGN, run.records, strict=True):
        verdict, reason = record["verdict"], record.get("reason")
        assert record.get("n") == message.get("n") and record["to"] == message["to"]
        if message["id"] in INVALID_IDS:
            assert (verdict, reason) == ("invalid", INVALID_IDS[message["id"]])
            continue
        if message["id"] in seen:
            assert (verdict, reason) == ("invalid", "duplicate_id")
            continue
        seen.add(message["id"])
        truth = true_verdict(message)
        channel = message["channel"].lower()
        if verdict == "deferred":
            assert reason in ("check_failed", "credentials_refused")
            assert record["channel"] == message["channel"] and "checked_at" not in record
        elif reason == "unchecked":
            # Only a policy that says so lets an unchecked message through (or drops it).
            assert on_error != "defer" and record["checked_at"] is None
            assert verdict in ({"allowed", "rerouted"} if on_error == "allow" else {"blocked"})
        else:
            # A verdict that claims checks: those checks succeeded, so it is the true one.
            assert (verdict, record["channel"].lower()) == truth, (message, record)
            assert record["checked_at"].endswith("Z")
            if verdict == "rerouted":
                assert record["original_channel"] == channel
    # The summary states the same final state.
    summary = run.summary
    verdicts = Counter(record["verdict"] for record in run.records)
    assert summary["total"] == len(CAMPAIGN)
    assert summary["verdicts"] == dict(verdicts)
    channels: dict[str, Counter[str]] = {}
    for record in run.records:
        channel = str(record.get("channel", "")).lower()
        channel = channel if channel in CHANNELS else "unknown"
        channels.setdefault(channel, Counter())[record["verdict"]] += 1
    assert summary["channels"] == {c: dict(v) for c, v in channels.items()}
    assert summary["requests"] == run.requests
    for line in format_summary(summary).splitlines():
        assert line in run.stderr
    # And the exit code.
    refused = any(record.get("reason") == "credentials_refused" for record in run.records)
    assert summary["credentials_refused"] is refused
    expected_exit = 3 if summary["credentials_refused"] else 4 if verdicts["deferred"] else 0
    assert run.returncode == expected_exit, run.stderr


def fault(kind: str, mode: str) -> FaultRule:
    seconds: float | None = None
    if kind in ("timeout", "trickle"):
        seconds = SLOW_FAULT_SECONDS
    elif kind == "rate_limit":
        seconds = 1.0  # a Retry-After of 1 s, capped by BLOCKFILTER_RETRY_AFTER_MAX
    if mode == "alone":
        return FaultRule(kind, first=1, seconds=seconds)
    if mode == "intermittent":
        return FaultRule(kind, every=3, seconds=seconds)
    return FaultRule(kind, seconds=seconds)


def sequential_requests_with_every_third_failing(logical: int) -> int:
    """HTTP requests one at a time make when every third fails once and is retried."""
    sent = 0
    while sent - sent // 3 < logical:
        sent += 1
    return sent


# -- the matrix --------------------------------------------------------------------------------


def _mode_options(mode: str) -> dict[str, str]:
    # One request in flight at a time makes "every third request" mean the same thing every
    # run: with more in flight, one request's retry could land on the next third too.
    return {"BLOCKFILTER_CONCURRENCY": "1"} if mode == "intermittent" else {}


# The faults that hold a connection cost an attempt's timeout each: the slow part.
_SLOW_KINDS = ("timeout", "trickle")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "kind",
    [pytest.param(k, marks=pytest.mark.slow) if k in _SLOW_KINDS else k for k in TRANSIENT],
)
def test_a_transient_fault(
    sim: Simulator, campaign_file: Path, tmp_path: Path, baseline: Run, kind: str, mode: str
) -> None:
    run = run_filter(sim, campaign_file, tmp_path, [fault(kind, mode)], **_mode_options(mode))
    check_run(run)
    logical = baseline.requests
    assert run.requests <= ATTEMPTS * logical  # the budget, whatever happens
    if mode == "alone":
        # One failure, one retry, and every verdict as without the fault.
        assert run.returncode == 0, run.stderr
        assert _verdicts(run) == _verdicts(baseline)
        assert run.requests == logical + 1
    elif mode == "intermittent":
        assert run.returncode == 0, run.stderr
        assert _verdicts(run) == _verdicts(baseline)
        assert run.requests == sequential_requests_with_every_third_failing(logical)
    else:
        # Nothing answers: every message that could be checked is deferred, none is guessed.
        assert run.returncode == 4, run.stderr
        usable = [r for r in run.records if r["verdict"] != "invalid"]
        assert {(r["verdict"], r["reason"]) for r in usable} == {("deferred", "check_failed")}
        assert len(usable) == len(CAMPAIGN) - 3
        # Each first-round request tried exactly ATTEMPTS times; no fallback round follows.
        assert run.requests == ATTEMPTS * first_round_requests()
        assert run.summary["elapsed_s"] < RETRY_DEADLINE + 1.5
        if kind == "rate_limit":
            # Retry-After was honoured, capped at BLOCKFILTER_RETRY_AFTER_MAX, before each retry.
            assert run.summary["elapsed_s"] >= (ATTEMPTS - 1) * RETRY_AFTER_MAX


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", REFUSED)
def test_a_refusal_of_the_account(
    sim: Simulator, campaign_file: Path, tmp_path: Path, baseline: Run, kind: str, mode: str
) -> None:
    run = run_filter(sim, campaign_file, tmp_path, [fault(kind, mode)], **_mode_options(mode))
    check_run(run)
    # Final: never retried, and once refused nothing more is asked.
    assert run.returncode == 3, run.stderr
    assert run.summary["credentials_refused"] is True
    assert "refused the credentials" in run.stderr
    deferred = [r for r in run.records if r["verdict"] == "deferred"]
    assert deferred and {r["reason"] for r in deferred} == {"credentials_refused"}
    if mode == "intermittent":
        assert run.requests == 3  # two answered, the third refused, then nothing
    elif mode == "total":
        assert 1 <= run.requests <= first_round_requests()
        assert {r["verdict"] for r in run.records} == {"deferred", "invalid"}
    else:
        assert 1 <= run.requests <= baseline.requests


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", FINAL)
def test_a_rejected_request(
    sim: Simulator, campaign_file: Path, tmp_path: Path, baseline: Run, kind: str, mode: str
) -> None:
    run = run_filter(sim, campaign_file, tmp_path, [fault(kind, mode)], **_mode_options(mode))
    check_run(run)
    # WA400 will not get better by retrying: the numbers of that request are deferred.
    assert run.returncode == 4, run.stderr
    deferred = [r for r in run.records if r["verdict"] == "deferred"]
    assert deferred and {r["reason"] for r in deferred} == {"check_failed"}
    assert run.requests <= baseline.requests  # no request is ever retried
    if mode == "total":
        assert run.requests == first_round_requests()
        assert {r["verdict"] for r in run.records} == {"deferred", "invalid"}


def _verdicts(run: Run) -> list[tuple[str, str | None, str]]:
    return [(r["verdict"], r.get("reason"), r["channel"]) for r in run.records]


# -- the other policies --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("on_error", "verdict"), [("allow", "allowed"), ("drop", "blocked"), ("defer", "deferred")]
)
def test_a_total_outage_under_each_policy(
    sim: Simulator, campaign_file: Path, tmp_path: Path, on_error: str, verdict: str
) -> None:
    run = run_filter(
        sim, campaign_file, tmp_path, [FaultRule("wa500")], BLOCKFILTER_ON_ERROR=on_error
    )
    check_run(run, on_error=on_error)
    usable = [r for r in run.records if r["verdict"] != "invalid"]
    reason = "check_failed" if on_error == "defer" else "unchecked"
    assert {(r["verdict"], r["reason"]) for r in usable} == {(verdict, reason)}
    # Failing open or dropping is the user's choice: done, nothing left to retry.
    assert run.returncode == (4 if on_error == "defer" else 0)
    assert run.requests == ATTEMPTS * first_round_requests()


@pytest.mark.parametrize("on_error", ["allow", "drop"])
def test_a_refused_account_defers_even_when_failing_open(
    sim: Simulator, campaign_file: Path, tmp_path: Path, on_error: str
) -> None:
    run = run_filter(
        sim, campaign_file, tmp_path, [FaultRule("rbc001")], BLOCKFILTER_ON_ERROR=on_error
    )
    check_run(run, on_error=on_error)
    assert run.returncode == 3
    usable = [r for r in run.records if r["verdict"] != "invalid"]
    assert {(r["verdict"], r["reason"]) for r in usable} == {("deferred", "credentials_refused")}


@pytest.mark.parametrize("on_error", ["defer", "allow", "drop"])
def test_an_outage_of_one_channel_only(
    sim: Simulator, campaign_file: Path, tmp_path: Path, on_error: str
) -> None:
    """WhatsApp down, SMS and voice up: a fallback that cannot be checked is never skipped
    for the next one, and never taken as clean (unless failing open)."""
    run = run_filter(
        sim,
        campaign_file,
        tmp_path,
        [FaultRule("wa500", channel="whatsapp")],
        BLOCKFILTER_ON_ERROR=on_error,
    )
    check_run(run, on_error=on_error)
    unchecked = {"defer": ("deferred", "check_failed"), "drop": ("blocked", "unchecked")}
    for message, record in zip(CAMPAIGN[:420], run.records, strict=False):
        channel, number = message["channel"].lower(), message["to"]
        got = (record["verdict"], record.get("reason"))
        needs_whatsapp = channel == "whatsapp" or (
            truly_blocked("sms", number) and message.get("fallback", [None])[0] == "whatsapp"
        )
        if not needs_whatsapp:
            assert (record["verdict"], record["channel"].lower()) == true_verdict(message)
        elif on_error == "allow":
            expected = "allowed" if channel == "whatsapp" else "rerouted"
            assert got == (expected, "unchecked") and record["channel"].lower() == "whatsapp"
        else:
            assert got == unchecked[on_error]
    assert run.returncode == (4 if on_error == "defer" else 0)
