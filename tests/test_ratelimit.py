"""The fleet-wide rate limit and the 429 pause, measured where it counts: at the simulator.

Real Redis (127.0.0.1:6379), real ``blockfilter filter`` processes, the real ``limits`` library.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

from blockfilter.config import load_settings
from blockfilter.kaleyra.source import KaleyraSource
from blockfilter.store.ratelimit import RateLimiter, build_limiter, rate_window
from blockfilter.testing.simulator import FaultRule, Simulator
from tests.support.env import REDIS_HOST, REDIS_PORT, redis_up
from tests.test_scale import (
    campaign_file,
    cli_env,
    make_numbers,
    start,
)
from tests.test_scale import cli_redis as cli_redis  # noqa: F401 - a fixture, used by name
from tests.test_scale import namespace as namespace  # noqa: F401
from tests.test_scale import simulator as simulator  # noqa: F401

pytestmark = pytest.mark.skipif(not redis_up(), reason=f"no Redis at {REDIS_HOST}:{REDIS_PORT}")

REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"


def most_in_any_window(times: list[float], width: float = 1.0) -> int:
    """The most events that any interval of ``width`` seconds holds."""
    times = sorted(times)
    most = 0
    end = 0
    for begin, at in enumerate(times):
        while end < len(times) and times[end] < at + width:
            end += 1
        most = max(most, end - begin)
    return most


def assert_paced(times: list[float], rate: int, tolerance: int = 1) -> None:
    """The rate on average, with at most one burst: from the first request, at most
    ``rate * seconds + rate`` (+ ``tolerance``) requests; and once the first second is over,
    at most ``rate`` in any second (+ ``tolerance`` for network jitter). The first second is
    left out of the second check: a process's first requests reach the server late (a new
    connection, an interpreter busy starting up) and so the server may see them bunched."""
    times = sorted(times)
    first = times[0]
    for count, at in enumerate(times, 1):
        assert count <= rate * (at - first) + rate + tolerance, (count, at - first)
    settled = [at for at in times if at >= first + 1.0]
    assert most_in_any_window(settled) <= rate + tolerance


def test_rates_become_whole_windows() -> None:
    assert rate_window(100) == (100, 1)
    assert rate_window(2.5) == (5, 2)
    assert rate_window(0.5) == (1, 2)
    with pytest.raises(ValueError):
        rate_window(0)


def test_a_limit_holds_across_threads_of_a_process() -> None:
    rate = 40
    limiter = RateLimiter(rate, account=f"A{uuid.uuid4().hex}")
    times: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(6):
            limiter.acquire()
            with lock:
                times.append(time.monotonic())

    threads = [threading.Thread(target=worker) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(times) == 60
    assert_paced(times, rate, tolerance=0)
    # Spaced out, not in bursts: a process sends one request every 1/R seconds...
    assert most_in_any_window(times, 0.1) <= rate * 0.1 + 1
    # ...and keeps up the rate: sleep overshoots do not add up.
    assert max(times) - min(times) <= 59 / rate + 0.2


def test_a_limit_holds_across_two_processes(
    simulator: Simulator,
    cli_redis: redis.Redis,
    tmp_path: Path,
) -> None:
    rate = 20
    env = cli_env(
        simulator, cli_redis, BLOCKFILTER_RATE_LIMIT=str(rate), BLOCKFILTER_CONCURRENCY="8"
    )
    simulator.set_latency(0.02)
    # 40 requests each, one process on sms and one on whatsapp so the records tell them apart.
    numbers = make_numbers(8000, seed=21)
    campaigns = [
        campaign_file(tmp_path / "a.jsonl", numbers[:4000], "sms"),
        campaign_file(tmp_path / "b.jsonl", numbers[4000:], "whatsapp"),
    ]
    processes = [start("filter", str(c), "--quiet", env=env) for c in campaigns]
    for process in processes:
        _, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
    records = simulator.stats.records
    assert len(records) == 80
    times = [at for at, *_ in records]
    assert_paced(times, rate)
    # Both were sending at the same time, yet together no faster than the one limit allows.
    by_channel = {
        c: [at for at, channel, *_ in records if channel == c] for c in ("sms", "whatsapp")
    }
    assert min(by_channel["sms"]) < max(by_channel["whatsapp"])
    assert min(by_channel["whatsapp"]) < max(by_channel["sms"])
    assert max(times) - min(times) >= (80 - rate) / rate - 0.1


def test_a_429_pauses_the_other_process_too(
    simulator: Simulator,
    cli_redis: redis.Redis,
    tmp_path: Path,
) -> None:
    pause = 2.0
    simulator.set_faults([FaultRule("rate_limit", first=1, channel="sms", seconds=pause)])
    env = cli_env(
        simulator, cli_redis, BLOCKFILTER_RETRY_DEADLINE="10", BLOCKFILTER_RETRY_ATTEMPTS="3"
    )
    numbers = make_numbers(400, seed=22)
    first = start("filter", str(campaign_file(tmp_path / "a.jsonl", numbers[:100])), env=env)
    deadline = time.monotonic() + 20
    while not simulator.stats.by_status.get(429):
        assert time.monotonic() < deadline, "the first process never got its 429"
        time.sleep(0.01)
    (told_at,) = [at for at, _, _, status in simulator.stats.records if status == 429]
    # Another worker of the fleet, on another channel, starts while the pause holds.
    campaign = campaign_file(tmp_path / "b.jsonl", numbers[100:], "whatsapp")
    second = start("filter", str(campaign), env=env)
    for process in (first, second):
        _, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
    records = simulator.stats.records
    others = [at for at, channel, _, _ in records if channel == "whatsapp"]
    assert len(others) == 3
    assert min(others) >= told_at + pause - 0.05
    retried = [at for at, channel, _, status in records if channel == "sms" and status == 200]
    assert retried and min(retried) >= told_at + pause - 0.05


def test_a_short_pause_does_not_cut_a_longer_one(namespace: str) -> None:
    account = f"A{uuid.uuid4().hex}"
    one = RateLimiter(None, account=account, redis_url=REDIS_URL, namespace=namespace)
    other = RateLimiter(None, account=account, redis_url=REDIS_URL, namespace=namespace)
    stranger = RateLimiter(None, account="another", redis_url=REDIS_URL, namespace=namespace)
    one.penalize(1.5)
    other.penalize(0.1)
    assert 1.2 < other.paused_for() <= 1.5
    assert stranger.paused_for() == 0
    started = time.monotonic()
    other.acquire()
    assert time.monotonic() - started >= 1.2


def test_without_redis_each_process_paces_itself() -> None:
    # Nothing listens on port 1: the shared window is out of reach.
    limiter = RateLimiter(10, account="A", redis_url="redis://127.0.0.1:1/0")
    started = time.monotonic()
    for _ in range(15):
        limiter.acquire()
    assert 0.4 <= time.monotonic() - started <= 3.0


def test_the_source_builds_its_limiter_from_the_settings(simulator: Simulator) -> None:
    base = {"sid": "S", "api_key": "test-key-0123456789", "base_url": simulator.base_url}
    paced = KaleyraSource(load_settings(environ={}, rate_limit=5.0, **base))
    assert isinstance(paced.client.limiter, RateLimiter)
    assert (paced.client.limiter.rate, paced.client.limiter.shared) == (5.0, False)
    fleet = load_settings(environ={}, cache_url=REDIS_URL, **base)
    limiter = build_limiter(fleet)
    assert limiter is not None and limiter.shared and limiter.rate is None
    assert build_limiter(load_settings(environ={}, **base)) is None
    budgeted = KaleyraSource(load_settings(environ={}, rate_limit=5.0, **base), max_requests=3)
    assert isinstance(budgeted.client.limiter._then, RateLimiter)  # type: ignore[union-attr]
