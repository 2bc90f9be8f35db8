"""The ledger across a fleet: two worker processes on RabbitMQ share a ledger (SQLite file,
PostgreSQL), campaigns run while opt-outs are reported, and no number is dispatched after its
report returned. Plus the two tasks, on a real worker."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from blockfilter.config import load_settings
from blockfilter.ledger import report_send_results
from blockfilter.ledger.ledger import forget_shared_ledgers, make_ledger
from blockfilter.tasks import TASK_NAME
from tests.ledger_support import KEY_A, LedgerPlace
from tests.support.harness import Stack, install_plugin_dist, require_broker


@dataclass
class LedgerStack(Stack):
    """A :class:`Stack` whose workers share the test's ledger."""

    ledger_env: dict[str, str] = field(default_factory=dict)

    def worker_env(self) -> dict[str, str]:
        env = super().worker_env()
        env.update(self.ledger_env)
        return env


def number(i: int) -> str:
    return f"+91983{i:07d}"


@pytest.fixture
def stack(tmp_path: Path, place: LedgerPlace):
    url = require_broker("amqp")
    plugin_dir = install_plugin_dist(tmp_path / "plugins")
    made = LedgerStack(
        "amqp",
        url,
        tmp_path,
        plugin_dir,
        ledger_env={
            "BLOCKFILTER_OPTOUT_URL": place.url,
            "BLOCKFILTER_OPTOUT_KEY": KEY_A,
            # Sending takes time: a report lands while dispatches are under way.
            "BFTEST_DISPATCH_DELAY": "0.1",
        },
    )
    made.app.conf.update(blockfilter_optout_url=place.url, blockfilter_optout_key=KEY_A)
    try:
        yield made
    finally:
        made.close()
        forget_shared_ledgers()


@pytest.mark.slow
def test_no_dispatch_of_a_number_after_its_report_returned(
    stack: LedgerStack, place: LedgerPlace
) -> None:
    # Checks take a while, so a report lands in the middle of many of them.
    stack.simulator.set_latency(0.05)
    settings = load_settings(environ={}, optout_url=place.url, optout_key=KEY_A, load_plugins=[])
    make_ledger(settings).record([])  # nothing; the store is opened once, here
    stack.start_worker()
    stack.start_worker()

    numbers = [number(i) for i in range(60)]
    rounds, per_round = 12, 120
    sent: list[Any] = []
    done = threading.Event()

    def campaigns() -> None:
        # Every round sends every number a couple of times, across many small tasks.
        try:
            for r in range(rounds):
                batch = [
                    {"id": f"r{r}-{i}", "channel": "sms", "to": numbers[i % len(numbers)]}
                    for i in range(per_round)
                ]
                for start in range(0, per_round, 20):
                    sent.append(stack.app.send_task(TASK_NAME, args=[batch[start : start + 20]]))
                time.sleep(0.25)
        finally:
            done.set()

    reporter_rng = random.Random(5)
    to_report = reporter_rng.sample(numbers, 16)
    returned: dict[str, float] = {}
    thread = threading.Thread(target=campaigns)
    thread.start()
    try:
        time.sleep(0.6)
        for index, target in enumerate(to_report):
            result = {"to": target, "channel": "sms", "provider": "kaleyra", "code": "OPT-OUT"}
            if index % 2:
                # Through the task, as a pipeline's delivery-report consumer would.
                stack.app.send_task("blockfilter.send_results", args=[[result]]).get(timeout=60)
            else:
                report_send_results([result], settings=settings)
            returned[target] = time.time()
            time.sleep(reporter_rng.uniform(0.05, 0.25))
    finally:
        thread.join(120)
    assert done.is_set()
    summaries = [result.get(timeout=180) for result in sent]
    total = rounds * per_round
    assert sum(s["total"] for s in summaries) == total
    records = stack.wait_records(lambda rs: len({r["id"] for r in rs}) >= total, 120, "records")

    def e164(record: dict[str, Any]) -> str:
        return str(record["message"].get("e164"))

    reported = [r for r in records if e164(r) in returned]
    late = [
        (e164(r), r["at"] - returned[e164(r)])
        for r in reported
        if r["hook"] == "dispatch" and r["at"] > returned[e164(r)]
    ]
    assert late == []
    # The test means something: reported numbers went out before their report, and were
    # stopped after it (by the ledger, in other processes than the reporter).
    dispatched_before = {e164(r) for r in reported if r["hook"] == "dispatch"}
    stopped = [r for r in reported if r["hook"] == "suppressed" and r["verdict"] == "blocked"]
    assert len(dispatched_before) >= len(returned) // 2
    assert stopped and all(r["reason"] == "blocklisted" for r in stopped)
    # Each says why: the ledger, and the send result that put the number there.
    for record in stopped:
        shown = record["message"]
        assert shown["source"] == "ledger" and "age_s" not in shown
        assert (shown["ledger_event"]["source"], shown["ledger_event"]["code"]) == (
            "send_result",
            "OPT-OUT",
        )
    # Every message reached a hook; none was lost.
    assert {r["id"] for r in records} == {
        f"r{r}-{i}" for r in range(rounds) for i in range(per_round)
    }


@pytest.mark.slow
def test_the_ledger_tasks_on_a_worker(stack: LedgerStack, place: LedgerPlace) -> None:
    stack.start_worker()
    target = number(1)
    reply = {"from": target, "channel": "sms", "text": "stop", "id": "in-7"}
    first = stack.app.send_task("blockfilter.inbound", args=[reply]).get(timeout=60)
    again = stack.app.send_task("blockfilter.inbound", args=[reply]).get(timeout=60)
    assert (first["action"], first["confirm"], again["recorded"], again["confirm"]) == (
        "opt_out", True, False, False,
    )  # fmt: skip
    bad = stack.app.send_task("blockfilter.inbound", args=[{"channel": "sms"}]).get(timeout=60)
    assert bad["action"] is None and "text" in bad["error"]
    report = stack.app.send_task(
        "blockfilter.send_results",
        args=[[{"to": number(2), "channel": "voice", "provider": "twilio", "code": 21610}]],
    ).get(timeout=60)
    assert (report["opted_out"], report["invalid"]) == (1, 0)
    # An operator's word, as a task: a complaint taken by a support tool.
    operator = stack.app.send_task(
        "blockfilter.optout", args=[[number(3), "12"], "all"], kwargs={"by": "support"}
    ).get(timeout=60)
    assert (operator["recorded"], operator["changed"], operator["invalid"]) == (1, 1, 1)
    assert operator["errors"] == [{"index": 1, "reason": "invalid_number"}]
    lifted = stack.app.send_task(
        "blockfilter.optout", args=[[number(3)], "voice"], kwargs={"opted_out": False}
    ).get(timeout=60)
    assert lifted["changed"] == 1
    unknown = stack.app.send_task("blockfilter.optout", args=[[number(3)], "fax"]).get(timeout=60)
    assert unknown["recorded"] == 0 and "channel" in unknown["error"]
    # No number in what the tasks return, nor in what monitoring is shown of their arguments.
    assert target not in str(first) and number(2) not in str(report)
    assert number(3) not in str(operator) + str(lifted) + str(unknown)
    stack.app.send_task(
        TASK_NAME,
        args=[[{"id": "a", "channel": "sms", "to": target}, {"id": "b", "channel": "voice",
               "to": number(2)}, {"id": "c", "channel": "sms", "to": number(2)},
               {"id": "d", "channel": "sms", "to": number(3)},
               {"id": "e", "channel": "voice", "to": number(3)}]],
    ).get(timeout=60)  # fmt: skip
    records = stack.wait_records(lambda rs: len(rs) >= 5, 60, "records")
    assert {(r["id"], r["verdict"]) for r in records} == {
        ("a", "blocked"), ("b", "blocked"), ("c", "allowed"), ("d", "blocked"), ("e", "allowed"),
    }  # fmt: skip
    # The dispatch hooks are shown the event that decided each ledger verdict.
    events = {r["id"]: r["message"].get("ledger_event") for r in records}
    assert (events["a"]["source"], events["a"]["code"], events["a"]["by"]) == (
        "inbound", "STOP", "recipient",
    )  # fmt: skip
    assert (events["b"]["source"], events["b"]["provider"], events["b"]["code"]) == (
        "send_result", "twilio", "21610",
    )  # fmt: skip
    assert events["c"] is None and events["e"] is None
    assert (events["d"]["source"], events["d"]["channel"], events["d"]["by"]) == (
        "operator", "all", "support",
    )  # fmt: skip
    log = "\n".join(w.log_text() for w in stack.workers)
    assert target not in log and number(2) not in log and number(3) not in log
