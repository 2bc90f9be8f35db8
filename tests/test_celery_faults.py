"""The fault matrix, Celery half: every failure the simulator injects, against a real worker.

One worker process (RabbitMQ broker, Redis results) serves every case, with small budgets so a
case takes a second or so (timeouts a few): 2 client attempts per request within 1.5 s, 0.5 s
per attempt, 1 task retry. Each case runs a small campaign (``make_campaign``: every channel,
fallbacks, blocklisted numbers, invalid ones, a repeated id) through ``blockfilter.
filter_messages`` with one fault kind scheduled ``alone`` (the first request only),
``intermittent`` (every third request) or ``total`` (every request), and checks what a user
relies on:

* every message reaches exactly one hook, once;
* nothing is dispatched without a successful check: every verdict other than ``deferred`` is
  the one the blocklist dictates (computed without the engine);
* a message whose check cannot be made is suppressed as ``deferred`` *and* parked on the
  deferred queue, and only those are parked;
* refused credentials are final at once: no client retry, no task retry;
* the requests made stay within the documented budget (client attempts x task attempts x the
  requests of a fault-free run), and the summary states the final state (counts, requests,
  ``credentials_refused``).

The worker makes one API request at a time (``BLOCKFILTER_CONCURRENCY=1``), so where in the
campaign "every third request" falls is deterministic and the exact counts can be asserted;
the last test runs the same checks with concurrent requests and random faults over many
batches.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from blockfilter.model import VERDICT_FIELDS
from blockfilter.tasks import TASK_NAME, filter_campaign, merge_summaries, split_campaign
from blockfilter.testing.simulator import FaultRule, SimulatorStats
from tests.support.campaigns import (
    DISPATCHED,
    Campaign,
    logical_requests,
    make_campaign,
    primary_requests,
)
from tests.support.fault_kinds import FINAL, REFUSED, TRANSIENT
from tests.support.harness import require_broker
from tests.support.tuned import TunedStack

pytestmark = pytest.mark.slow

CLIENT_ATTEMPTS = 2
TASK_RETRIES = 1
TASK_ATTEMPTS = 1 + TASK_RETRIES
MATRIX_SETTINGS = {
    "BLOCKFILTER_RETRY_ATTEMPTS": str(CLIENT_ATTEMPTS),
    "BLOCKFILTER_RETRY_DEADLINE": "1.5",
    "BLOCKFILTER_BACKOFF_BASE": "0.01",
    "BLOCKFILTER_BACKOFF_MAX": "0.05",
    "BLOCKFILTER_RETRY_AFTER_MAX": "0.2",
    "BLOCKFILTER_CONNECT_TIMEOUT": "0.5",
    "BLOCKFILTER_REQUEST_TIMEOUT": "0.5",
    "BLOCKFILTER_TASK_MAX_RETRIES": str(TASK_RETRIES),
    "BLOCKFILTER_TASK_RETRY_BACKOFF": "0.1",
    "BLOCKFILTER_ON_ERROR": "defer",
    # One request at a time: "every third request" then falls in the same place every run.
    "BLOCKFILTER_CONCURRENCY": "1",
}

MODES: dict[str, dict[str, int]] = {
    "alone": {"first": 1},
    "intermittent": {"every": 3},
    "total": {},
}
# Longer than an attempt's 0.5 s (so they fail), short enough to let go of the simulator soon.
SECONDS = {"timeout": 1.0, "trickle": 2.0, "rate_limit": 0.1}

_case_numbers = itertools.count(1)


def fault(kind: str, mode: str) -> FaultRule:
    """``kind`` scheduled as ``mode`` (see :data:`MODES`)."""
    schedule = MODES[mode]
    return FaultRule(
        kind, every=schedule.get("every"), first=schedule.get("first"), seconds=SECONDS.get(kind)
    )


# -- the world -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory, plugin_dir: Path) -> Iterator[TunedStack]:
    """One worker for the whole matrix, with the simulator it reaches over HTTP."""
    stack = TunedStack(
        "amqp",
        require_broker("amqp"),
        tmp_path_factory.mktemp("matrix"),
        plugin_dir,
        overrides=MATRIX_SETTINGS,
    )
    try:
        stack.start_worker()
        yield stack
    finally:
        stack.close()


# -- one case --------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one campaign came to: the task's summary, the hooks' records, the parked bodies."""

    campaign: Campaign
    summary: dict[str, Any]
    records: list[dict[str, Any]]
    parked: list[Any]
    stats: SimulatorStats
    elapsed: float

    def verdicts(self) -> Counter[str]:
        return Counter(r["verdict"] for r in self.records)

    def deferred(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["verdict"] == "deferred"]


def settle(stack: TunedStack, timeout: float = 5.0) -> None:
    """Wait until the simulator has let go of the previous case's slow requests."""
    deadline = time.monotonic() + timeout
    while stack.simulator.snapshot(records=False).in_flight and time.monotonic() < deadline:
        time.sleep(0.05)


def run_case(stack: TunedStack, tag: str, rules: Sequence[FaultRule]) -> Outcome:
    """Send one campaign as one ``filter_messages`` task under ``rules``; collect the outcome."""
    campaign = make_campaign(tag, base=next(_case_numbers) * 1000)
    for channel, numbers in campaign.blocked.items():
        stack.simulator.block(channel, *numbers)
    settle(stack)
    stack.clear_records()
    stack.drain_deferred(0, grace=0.1)  # what an earlier, failed case may have left
    stack.simulator.set_faults(rules)
    stack.simulator.reset_stats()
    started = time.monotonic()
    summary = stack.app.send_task(TASK_NAME, args=[campaign.messages]).get(timeout=90)
    elapsed = time.monotonic() - started
    # A request the client gave up on (timeout, trickle) is counted once the simulator lets go.
    settle(stack)
    stats = stack.simulator.snapshot(records=False)
    records = [r for r in stack.records() if str(r["id"]).startswith(f"{tag}-")]
    deferred = sum(1 for r in records if r["verdict"] == "deferred")
    parked = stack.drain_deferred(deferred)
    stack.simulator.clear_faults()
    return Outcome(campaign, summary, records, parked, stats, elapsed)


def check_invariants(outcome: Outcome, *, budget_requests: int) -> None:
    """What must hold whatever the fault: one hook per message, no unchecked dispatch, the
    deferred ones parked, the summary true, the requests within the budget."""
    campaign = outcome.campaign
    records = outcome.records
    # Exactly one hook call per message.
    assert Counter(r["id"] for r in records) == campaign.ids, "a message was lost or repeated"
    # Every verdict but "deferred" is the truth; "deferred" only where a check could fail.
    expected = Counter(campaign.truth())
    for r in records:
        hook = "dispatch" if r["verdict"] in DISPATCHED else "suppressed"
        assert r["hook"] == hook, r
        if r["verdict"] == "deferred":
            assert r["reason"] in ("check_failed", "credentials_refused"), r
            assert r["message"]["e164"], r
            candidates = [k for k in expected if k[0] == r["id"] and k[1] != "invalid"]
            assert candidates, f"{r['id']} deferred, but it is invalid: {r}"
            expected[candidates[0]] -= 1
            continue
        key = (r["id"], r["verdict"], str(r["channel"]).lower())
        assert expected[key] > 0, f"wrong verdict, not what the blocklist says: {r}"
        expected[key] -= 1
        if r["verdict"] in DISPATCHED:
            # Dispatched only on a real answer from the API.
            assert r["message"]["checked_at"], r
            assert r["message"].get("reason") != "unchecked", r
    assert +expected == Counter()
    # Carried through untouched.
    first = next(r for r in records if r["id"] == f"{campaign.messages[1]['id']}")
    assert first["message"]["payload"] == campaign.messages[1]["payload"]

    # Deferred (final) <=> parked on the deferred queue, as the original message.
    deferred_ids = sorted(r["id"] for r in outcome.deferred())
    assert sorted(m["id"] for m in outcome.parked) == deferred_ids
    assert all(VERDICT_FIELDS.isdisjoint(m) for m in outcome.parked)

    # The summary states the final state.
    summary = outcome.summary
    assert summary["total"] == len(campaign.messages)
    assert summary["verdicts"] == dict(outcome.verdicts())
    assert summary["requests"] == outcome.stats.requests
    refused = any(r["reason"] == "credentials_refused" for r in outcome.deferred())
    assert bool(summary.get("credentials_refused")) == refused

    # Retries stop within the documented budget.
    assert outcome.stats.requests <= budget_requests, (outcome.stats.requests, budget_requests)


def valid_count(campaign: Campaign) -> int:
    return sum(1 for _, verdict, _ in campaign.truth() if verdict != "invalid")


# -- the matrix ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_fault_free_baseline_matches_the_request_count(matrix: TunedStack) -> None:
    """Without faults: the truth, and exactly the requests the budget is counted in."""
    outcome = run_case(matrix, "clean", [])
    lowest = outcome.campaign.logical_requests()
    check_invariants(outcome, budget_requests=lowest)
    assert not outcome.deferred()
    assert outcome.stats.requests == lowest


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind", TRANSIENT)
def test_transient_fault(matrix: TunedStack, kind: str, mode: str) -> None:
    outcome = run_case(matrix, f"{kind}-{mode}", [fault(kind, mode)])
    campaign = outcome.campaign
    lowest = campaign.logical_requests()
    check_invariants(outcome, budget_requests=CLIENT_ATTEMPTS * TASK_ATTEMPTS * lowest)
    faults = outcome.stats.by_outcome.get(f"fault:{kind}", 0)

    if mode in ("alone", "intermittent"):
        # The client's own retry gets past each one: everything checked, each request
        # answered once, and one extra attempt per fault.
        assert outcome.verdicts()["deferred"] == 0, outcome.deferred()[:3]
        assert outcome.stats.by_outcome.get("ok", 0) == lowest
        assert faults == (1 if mode == "alone" else outcome.stats.requests // 3) >= 1
        assert outcome.stats.requests == lowest + faults
    else:
        # Nothing can be checked: every valid message deferred, parked, nothing dispatched,
        # and the whole budget spent on the first round, no more.
        assert outcome.verdicts() == {"deferred": valid_count(campaign), "invalid": 3}
        assert not any(r["hook"] == "dispatch" for r in outcome.records)
        assert {r["reason"] for r in outcome.deferred()} == {"check_failed"}
        assert outcome.stats.by_outcome.get("ok", 0) == 0
        per_channel = primary_requests(campaign.messages)
        assert outcome.stats.requests_by_channel == {
            channel: n * CLIENT_ATTEMPTS * TASK_ATTEMPTS for channel, n in per_channel.items()
        }


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind", REFUSED)
def test_refused_credentials(matrix: TunedStack, kind: str, mode: str) -> None:
    outcome = run_case(matrix, f"{kind}-{mode}", [fault(kind, mode)])
    campaign = outcome.campaign
    check_invariants(outcome, budget_requests=campaign.logical_requests())
    deferred = outcome.deferred()
    assert deferred, "a refused account deferred nothing"
    assert {r["reason"] for r in deferred} == {"credentials_refused"}
    assert outcome.summary["credentials_refused"] is True
    # Final at once: the refusal is asked once, never again by the client nor by a task
    # retry; requests made before it (intermittent: the first two) count as checked.
    refused_at = 3 if mode == "intermittent" else 1
    assert outcome.stats.requests == refused_at
    assert outcome.stats.by_outcome.get("ok", 0) == refused_at - 1
    if mode != "intermittent":
        assert len(deferred) == valid_count(campaign)


@pytest.mark.timeout(60)
def test_refusal_does_not_outlive_its_case(matrix: TunedStack) -> None:
    """After a refusal (a balance since topped up), the same worker process checks again."""
    children = set(matrix.workers[0].children())
    # As many refused batches as pool processes, at once and slow, so each process gets one.
    refused = [make_campaign(f"refused{k}", base=next(_case_numbers) * 1000) for k in children]
    matrix.simulator.set_faults([FaultRule("e110")])
    matrix.simulator.set_latency(0.2)  # shorter than an attempt's timeout
    try:
        pending = [matrix.app.send_task(TASK_NAME, args=[c.messages]) for c in refused]
        assert all(p.get(timeout=30)["credentials_refused"] for p in pending)
    finally:
        matrix.simulator.set_latency(0.0)
    refused_in = {r["pid"] for r in matrix.records() if str(r["id"]).startswith("refused")}
    assert refused_in == children, "a pool process got no refused batch"
    matrix.drain_deferred(sum(len(c.messages) for c in refused) - 3 * len(refused))

    outcome = run_case(matrix, "topped-up", [])
    check_invariants(outcome, budget_requests=outcome.campaign.logical_requests())
    assert not outcome.deferred()
    assert outcome.stats.requests == outcome.campaign.logical_requests()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind", FINAL)
def test_malformed_request_answer(matrix: TunedStack, kind: str, mode: str) -> None:
    """WA400 is final for the client (no second attempt); the task retry may still ask."""
    outcome = run_case(matrix, f"{kind}-{mode}", [fault(kind, mode)])
    campaign = outcome.campaign
    check_invariants(outcome, budget_requests=TASK_ATTEMPTS * campaign.logical_requests())
    assert {r["reason"] for r in outcome.deferred()} <= {"check_failed"}
    if mode == "alone":
        assert not outcome.deferred(), "the task retry should have checked them"
    if mode == "total":
        assert outcome.verdicts() == {"deferred": valid_count(campaign), "invalid": 3}
        per_channel = primary_requests(campaign.messages)
        assert outcome.stats.requests_by_channel == {
            channel: n * TASK_ATTEMPTS for channel, n in per_channel.items()
        }


# -- many batches, concurrent requests, random faults -----------------------------------------


@pytest.fixture
def concurrent_stack(tmp_path: Path, plugin_dir: Path) -> Iterator[TunedStack]:
    settings = dict(MATRIX_SETTINGS)
    del settings["BLOCKFILTER_CONCURRENCY"]  # the default: many requests in flight
    settings["BLOCKFILTER_TASK_MAX_RETRIES"] = "2"
    stack = TunedStack("amqp", require_broker("amqp"), tmp_path, plugin_dir, overrides=settings)
    try:
        yield stack
    finally:
        stack.close()


@pytest.mark.timeout(120)
def test_mixed_random_faults_over_many_concurrent_batches(concurrent_stack: TunedStack) -> None:
    stack = concurrent_stack
    parts = [make_campaign(f"mix{k}", base=90_000_000 + k * 1000) for k in range(20)]
    campaign = Campaign([m for part in parts for m in part.messages])
    for part in parts:
        for channel, numbers in part.blocked.items():
            campaign.blocked[channel] |= numbers
            stack.simulator.block(channel, *numbers)
    stack.simulator.set_faults(
        [
            # About half the attempts fail, in five different ways.
            FaultRule("wa500", probability=0.2),
            FaultRule("reset", probability=0.1),
            FaultRule("timeout", probability=0.1, seconds=1.0),
            FaultRule("rate_limit", probability=0.1, seconds=0.1),
            FaultRule("non_json", probability=0.1),
        ]
    )
    stack.start_worker()

    started = time.monotonic()
    result = filter_campaign(campaign.messages, chunk_size=50, app=stack.app)
    summaries = result.get(timeout=100)
    elapsed = time.monotonic() - started
    stats = stack.simulator.snapshot(records=False)
    records = stack.records()
    deferred = sum(1 for r in records if r["verdict"] == "deferred")
    parked = stack.drain_deferred(deferred)
    outcome = Outcome(campaign, merge_summaries(summaries), records, parked, stats, elapsed)

    batches = split_campaign(campaign.messages, 50)
    assert len(batches) >= 20
    budget = sum(
        CLIENT_ATTEMPTS * 3 * logical_requests(batch, campaign.blocked) for batch in batches
    )
    check_invariants(outcome, budget_requests=budget)
    assert sum(n for k, n in stats.by_outcome.items() if k.startswith("fault:")) > 0
    # Most of the campaign gets through: the retries are doing their job.
    assert deferred <= math.ceil(0.25 * len(campaign.messages)), outcome.verdicts()
