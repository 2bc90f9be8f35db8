"""Prometheus metrics: a prefork worker's, scraped as Prometheus would, and the command line's
``--metrics-file``. Values are checked against what the simulator saw and what the hooks got."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("prometheus_client", reason="blockfilter[metrics] is not installed")

from prometheus_client.parser import text_string_to_metric_families

from blockfilter import metrics
from blockfilter.tasks import TASK_NAME, filter_campaign
from blockfilter.testing.simulator import FaultRule, Simulator
from tests.support.env import TEST_KEY, TEST_SID, subprocess_env
from tests.support.harness import (
    RETRY_ATTEMPTS,
    TASK_MAX_RETRIES,
    Stack,
)
from tests.support.private_servers import free_port

HAS_COLLECTOR = importlib.util.find_spec("celery_batches") is not None


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, from Prometheus' text format."""
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


def total(found: dict[Any, float], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(
        value
        for (sample, sample_labels), value in found.items()
        if sample == name and set(labels.items()) <= set(sample_labels)
    )


def number(i: int) -> str:
    return f"+91985{i:07d}"


# -- fast -------------------------------------------------------------------------------------


def test_names_and_labels_follow_prometheus_conventions() -> None:
    metrics.count_verdicts(
        [
            {"verdict": "allowed", "channel": "sms"},
            {"verdict": "blocked", "channel": "SMS", "reason": "blocklisted"},
            {"verdict": "invalid", "channel": 7, "reason": "unknown_channel"},
        ]
    )
    metrics.observe_api_request("ok", 0.2)
    metrics.count_parked("check_failed", 3)
    metrics.observe_batch_fill({"sms": 100})
    from prometheus_client import generate_latest

    found = samples(generate_latest(metrics.registry()).decode())
    assert total(found, "blockfilter_verdicts_total", verdict="allowed", reason="none") >= 1
    assert total(found, "blockfilter_verdicts_total", channel="sms", reason="blocklisted") >= 1
    assert total(found, "blockfilter_verdicts_total", channel="unknown") >= 1
    assert total(found, "blockfilter_api_requests_total", outcome="ok") >= 1
    assert total(found, "blockfilter_api_request_duration_seconds_bucket", le="0.25") >= 1
    assert total(found, "blockfilter_messages_parked_total", reason="check_failed") >= 3
    assert total(found, "blockfilter_collector_batch_fill_bucket", channel="sms", le="100.0") >= 1
    names = {name for name, _ in found}
    assert all(name.startswith("blockfilter_") for name in names)
    counters = [n for n in names if n.endswith("_total")]
    assert "blockfilter_cache_hits_total" in counters or "blockfilter_cache_hits_created" in names


def test_parked_and_replayed_messages_are_counted() -> None:
    from celery import Celery

    from blockfilter.pipeline.replay import replay_deferred
    from blockfilter.tasks import park_deferred

    def value(name: str, **labels: str) -> float:
        from prometheus_client import generate_latest

        return total(samples(generate_latest(metrics.registry()).decode()), name, **labels)

    # kombu's memory transport is one broker for the whole process: queues of this test's own.
    app = Celery("parker", broker="memory://", set_as_current=False)
    app.conf.task_default_queue = "bftest-metrics"
    app.conf.blockfilter_deferred_queue = "bftest-metrics.deferred"
    parked = value("blockfilter_messages_parked_total", reason="credentials_refused")
    replayed = value("blockfilter_messages_replayed_total")
    messages = [{"id": str(i), "channel": "sms", "to": number(i)} for i in range(5)]
    park_deferred(app, messages, reason="credentials_refused")
    assert replay_deferred(app, timeout=0.2) == 5
    assert value("blockfilter_messages_parked_total", reason="credentials_refused") == parked + 5
    assert value("blockfilter_messages_replayed_total") == replayed + 5
    with app.connection_for_write() as connection:
        connection.default_channel.queue_purge("bftest-metrics")
    app.close()


def test_a_filter_run_without_a_metrics_file_records_none_and_imports_no_prometheus(
    tmp_path: Path, simulator: Simulator
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"id": "1", "channel": "sms", "to": number(7)}) + "\n")
    # A process of its own: this one imported prometheus-client long ago.
    probe = (
        "import sys\n"
        "from blockfilter.cli import main\n"
        "code = main(['filter', sys.argv[1], '--quiet', '--out', sys.argv[2]])\n"
        "print(code, 'prometheus_client' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(source), str(tmp_path / "out.jsonl")],
        env=subprocess_env(simulator, BLOCKFILTER_LOAD_PLUGINS=""),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.stdout.split() == ["0", "False"], done.stderr
    assert simulator.stats.requests == 1


def test_metrics_made_before_a_run_that_records_none_are_recorded_into_after_it() -> None:
    from prometheus_client import generate_latest

    def requests_ok() -> float:
        found = samples(generate_latest(metrics.registry()).decode())
        return total(found, "blockfilter_api_requests_total", outcome="ok")

    metrics.observe_api_request("ok", 0.1)
    before = requests_ok()
    with metrics.recording_nothing():
        metrics.observe_api_request("ok", 0.1)
        assert metrics.registry() is None
    metrics.observe_api_request("ok", 0.1)
    assert requests_ok() == before + 1


# -- slow: a prefork worker -------------------------------------------------------------------


@pytest.fixture
def stack(amqp_stack: Stack) -> Stack:
    return amqp_stack


def scrape(port: int) -> dict[Any, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return samples(answer.read().decode())


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_prefork_worker_serves_every_pool_processs_metrics(stack: Stack) -> None:
    port = free_port()
    env = stack.worker_env()
    env["BLOCKFILTER_METRICS_PORT"] = str(port)
    env["BLOCKFILTER_COLLECT_FLUSH_INTERVAL"] = "0.3"
    worker = stack.start_worker(env=env)
    assert f"metrics on http://0.0.0.0:{port}/metrics" in worker.log_text()

    messages = [
        {"id": f"m{i}", "channel": "sms", "to": number(i), "fallback": ["voice"]} for i in range(40)
    ]
    stack.simulator.block("sms", *(number(i) for i in range(0, 40, 5)))  # 8, rerouted
    stack.simulator.block("voice", number(0), number(5))  # 2 of them blocked
    stack.simulator.set_faults([FaultRule("wa500", first=1)])  # one failed attempt
    summaries = filter_campaign(messages, chunk_size=10, app=stack.app).get(timeout=60)
    assert sum(s["total"] for s in summaries) == 40
    # Parked: a batch the API never answers, once its retries are spent.
    stack.simulator.set_faults([FaultRule("wa500", channel="whatsapp")])
    down = [{"id": f"d{i}", "channel": "whatsapp", "to": number(100 + i)} for i in range(6)]
    assert stack.app.send_task(TASK_NAME, args=[down]).get(timeout=60)["total"] == 6
    stack.simulator.clear_faults()
    collected = [{"id": f"c{i}", "channel": "voice", "to": number(200 + i)} for i in range(7)]
    if HAS_COLLECTOR:
        for message in collected:
            stack.app.send_task("blockfilter.collect", args=[message])
    expected_records = 46 + (7 if HAS_COLLECTOR else 0)
    records = stack.wait_records(
        lambda rs: len(rs) >= expected_records, timeout=40, what="every message"
    )

    deadline = time.monotonic() + 10
    while True:  # a batch's counters are written just after its hooks ran
        found = scrape(port)
        if total(found, "blockfilter_verdicts_total") >= expected_records:
            break
        assert time.monotonic() < deadline, found
        time.sleep(0.2)

    by_label: Counter[tuple[str, str, str]] = Counter(
        (r["verdict"], str(r["channel"]).lower(), r["reason"] or "none") for r in records
    )
    for (verdict, channel, reason), n in by_label.items():
        got = total(
            found, "blockfilter_verdicts_total", verdict=verdict, channel=channel, reason=reason
        )
        assert got == n, (verdict, channel, reason, got, n)
    assert total(found, "blockfilter_verdicts_total") == expected_records
    assert by_label["rerouted", "voice", "none"] == 6 and by_label["blocked", "sms", "blocklisted"]

    # Every HTTP attempt the simulator saw, by outcome, and each timed once.
    seen = stack.simulator.stats
    assert total(found, "blockfilter_api_requests_total") == seen.requests
    failures = RETRY_ATTEMPTS * (1 + TASK_MAX_RETRIES) + 1
    assert total(found, "blockfilter_api_requests_total", outcome="WA500") == failures
    assert total(found, "blockfilter_api_request_duration_seconds_count") == seen.requests
    assert total(found, "blockfilter_messages_parked_total", reason="check_failed") == 6
    # Each distinct (channel, number) looked up once per process, from the cache or not.
    asked = total(found, "blockfilter_cache_hits_total") + total(
        found, "blockfilter_cache_misses_total"
    )
    assert asked >= 40 + 10 + 6, found
    if HAS_COLLECTOR:
        assert total(found, "blockfilter_collector_batch_fill_count", channel="voice") >= 1
        assert total(found, "blockfilter_collector_batch_fill_sum", channel="voice") == 7


# -- slow: the command line -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_filter_writes_its_metrics_to_a_file(tmp_path: Path) -> None:
    messages = [{"id": str(i), "channel": "sms", "to": number(300 + i)} for i in range(150)]
    messages.append({"id": "bad", "channel": "fax", "to": number(1)})
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(m) + "\n" for m in messages), encoding="utf-8")
    with Simulator(sid=TEST_SID, api_key=TEST_KEY) as simulator:
        simulator.block("sms", *(number(300 + i) for i in range(10)))
        env = subprocess_env(simulator, BLOCKFILTER_LOAD_PLUGINS="")
        done = subprocess.run(
            [sys.executable, "-m", "blockfilter", "filter", str(source)]
            + ["--out", str(tmp_path / "out.jsonl"), "--metrics-file", str(tmp_path / "m.prom")],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        requests = simulator.stats.requests
    assert done.returncode == 0, done.stderr
    found = samples((tmp_path / "m.prom").read_text())
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    counts: defaultdict[tuple[str, str], int] = defaultdict(int)
    for record in out:
        counts[record["verdict"], record.get("reason") or "none"] += 1
    assert counts == {
        ("allowed", "none"): 140,
        ("blocked", "blocklisted"): 10,
        ("invalid", "unknown_channel"): 1,
    }
    for (verdict, reason), n in counts.items():
        assert total(found, "blockfilter_verdicts_total", verdict=verdict, reason=reason) == n
    assert total(found, "blockfilter_api_requests_total", outcome="ok") == requests == 2
    assert total(found, "blockfilter_cache_misses_total") == 150
