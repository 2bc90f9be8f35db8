"""The batch core both Celery tasks share (blockfilter.pipeline.batch), run without Celery.

A simulator answers the checks, a plugin registered for the test records what reached the
hooks, and a list records what the core asked to park: the same steps ``filter_messages`` and
``collect`` take, seen one by one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis

from blockfilter import hookimpl
from blockfilter.config import load_settings
from blockfilter.pipeline.batch import check_batch
from blockfilter.plugins.manager import get_plugin_manager
from blockfilter.testing.simulator import FaultRule, Simulator
from tests.conftest import TEST_KEY, TEST_SID
from tests.support.env import REDIS_HOST, REDIS_PORT, redis_up

ROOT = Path(__file__).resolve().parents[1]
ALLOWED, BLOCKED, INVALID = "+919820000001", "+919820000002", "not a number"


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []

    @hookimpl
    def blockfilter_dispatch(self, messages: list[dict[str, Any]]) -> None:
        self.seen += [("dispatch", m["id"], m["verdict"]) for m in messages]

    @hookimpl
    def blockfilter_suppressed(self, messages: list[dict[str, Any]]) -> None:
        self.seen += [("suppressed", m["id"], m["verdict"]) for m in messages]


def conf_for(simulator: Simulator) -> dict[str, Any]:
    """An app conf (lower-case keys) reaching the simulator, with a one-attempt budget."""
    return {
        "kaleyra_sid": TEST_SID,
        "kaleyra_api_key": TEST_KEY,
        "kaleyra_base_url": simulator.base_url,
        "blockfilter_retry_attempts": 1,
        "blockfilter_backoff_base": 0,
        "blockfilter_request_timeout": 2.0,
    }


@pytest.fixture
def recorder(
    clean_env: None, kaleyra_simulator: Simulator
) -> Iterator[tuple[Recorder, dict[str, Any]]]:
    conf = conf_for(kaleyra_simulator)
    plugins = get_plugin_manager(load_settings(celery_conf=conf))
    recorder = Recorder()
    plugins.register(recorder)
    try:
        yield recorder, conf
    finally:
        plugins.unregister(recorder)


MESSAGES = [
    {"id": "a", "channel": "sms", "to": ALLOWED},
    {"id": "b", "channel": "sms", "to": BLOCKED},
    {"id": "c", "channel": "sms", "to": INVALID},
    {"id": "d", "channel": "whatsapp", "to": ALLOWED},
]


def test_a_batch_is_checked_parked_and_handed_to_the_hooks_in_order(
    recorder: tuple[Recorder, dict[str, Any]], kaleyra_simulator: Simulator
) -> None:
    seen, conf = recorder
    kaleyra_simulator.block("sms", BLOCKED)
    # Every WhatsApp request fails: "d" cannot be checked.
    kaleyra_simulator.set_faults([FaultRule("wa500", channel="whatsapp")])
    parked: list[tuple[list[str], bool]] = []

    def park(messages: Sequence[Any], refused: bool) -> None:
        parked.append(([m["id"] for m in messages], refused))

    batch = check_batch(MESSAGES, conf, retries_left=lambda settings: True)
    assert [r["verdict"] for r in batch.results] == ["allowed", "blocked", "invalid", "deferred"]
    assert batch.deferred == [3] and not batch.refused and not batch.final
    assert batch.to_retry == [3] and batch.handled == [0, 1, 2]
    assert batch.park_final(park) is None and parked == [], "a retry decides it, not parking"
    batch.hand_to_hooks()
    assert seen.seen == [
        ("dispatch", "a", "allowed"),
        ("suppressed", "b", "blocked"),
        ("suppressed", "c", "invalid"),
    ]

    # No retry left: the deferral is final, parked first, then suppressed like the rest.
    seen.seen.clear()
    last = check_batch(MESSAGES, conf, retries_left=lambda settings: False)
    assert last.final and last.to_retry == [] and last.handled == [0, 1, 2, 3]
    assert last.park_final(park) is None and parked == [(["d"], False)]
    last.hand_to_hooks()
    assert ("suppressed", "d", "deferred") in seen.seen and len(seen.seen) == 4


def test_the_retry_budget_is_read_from_the_batchs_own_settings(
    recorder: tuple[Recorder, dict[str, Any]],
) -> None:
    _, conf = recorder
    budgets: list[int] = []

    def retries_left(settings: Any) -> bool:
        budgets.append(settings.task_max_retries)
        return True

    check_batch(
        MESSAGES[2:3], {**conf, "blockfilter_task_max_retries": 7}, retries_left=retries_left
    )
    assert budgets == [7]


def test_refused_credentials_are_final_at_once_and_reported(
    recorder: tuple[Recorder, dict[str, Any]], kaleyra_simulator: Simulator
) -> None:
    seen, conf = recorder
    batch = check_batch(
        MESSAGES[:1], {**conf, "kaleyra_api_key": "not-the-key-0000"}, retries_left=lambda s: True
    )
    assert batch.refused and batch.final and batch.deferred == [0]
    assert batch.refusal_to_report is not None and batch.refusal_to_report.code == "RBC001"
    failure = RuntimeError("broker away")
    assert batch.park_final(lambda messages, refused: failure) is failure
    batch.hand_to_hooks()
    assert seen.seen == [("suppressed", "a", "deferred")]


def test_the_core_needs_no_celery() -> None:
    code = "import sys, json, blockfilter.pipeline.batch; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout)
    assert not [m for m in loaded if m.split(".")[0] in ("celery", "kombu", "celery_batches")]


@pytest.mark.skipif(not redis_up(), reason="no Redis server")
def test_a_warm_batch_reads_the_shared_cache_in_one_round_trip(
    clean_env: None, kaleyra_simulator: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1,200 numbers: the filter hands them to the source 500 at a time, and each hand-over
    # was a read of its own, after a read of the channel's sync mark.
    numbers = [f"+91982{index:07d}" for index in range(1200)]
    kaleyra_simulator.block("sms", *numbers[:60])
    conf = {
        **conf_for(kaleyra_simulator),
        "blockfilter_cache_url": f"redis://{REDIS_HOST}:{REDIS_PORT}/0",
        "blockfilter_cache_secret": uuid.uuid4().hex,
        "blockfilter_cache_ttl": 60,
        "blockfilter_cache_ttl_blocked": 60,
    }
    sms_only = [{"id": f"s{i}", "channel": "sms", "to": n} for i, n in enumerate(numbers)]
    with_fallbacks = [{**m, "fallback": ["whatsapp"]} for m in sms_only]
    check_batch(with_fallbacks, conf, retries_left=lambda _: False)  # cold: fills the cache
    requests = kaleyra_simulator.stats.requests

    sent: list[bytes] = []
    send = redis.connection.Connection.send_packed_command

    def counting(connection: Any, command: Any, check_health: bool = True) -> None:
        sent.append(b"".join(command) if isinstance(command, list) else bytes(command))
        send(connection, command, check_health)

    monkeypatch.setattr(redis.connection.Connection, "send_packed_command", counting)
    batch = check_batch(sms_only, conf, retries_left=lambda _: False)
    assert batch.summary["verdicts"] == {"allowed": 1140, "blocked": 60}
    assert batch.summary["cache_hits"] == 1200
    assert len(sent) == 1  # every status, and every channel's sync mark, at once

    sent.clear()
    batch = check_batch(with_fallbacks, conf, retries_left=lambda _: False)
    assert batch.summary["verdicts"] == {"allowed": 1140, "rerouted": 60}
    assert len(sent) == 2  # the batch's own numbers, then the fallbacks of the blocked
    assert kaleyra_simulator.stats.requests == requests  # all from the cache
    # What went to Redis names no number.
    for command in sent:
        for number in numbers:
            assert number.encode() not in command and number[1:].encode() not in command
