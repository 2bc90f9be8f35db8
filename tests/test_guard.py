"""The status cache's circuit breaker, on an injected clock: no sleeping, no server."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from blockfilter.store.cache import CacheUnavailable
from blockfilter.store.guard import CACHE_RETRY_AFTER_S, CacheGuard


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def failing() -> str:
    raise CacheUnavailable("connection refused")


def counted(answer: str, calls: list[str]) -> Callable[[], str]:
    def call() -> str:
        calls.append(answer)
        return answer

    return call


def test_a_working_cache_answers_through_the_guard() -> None:
    guard = CacheGuard(clock=Clock())
    assert guard.ok
    assert guard.call("get", lambda: "answer", "default") == "answer"
    assert guard.ok


def test_a_failed_call_answers_its_default_and_leaves_the_cache_alone_until_retry_after() -> None:
    clock = Clock()
    guard = CacheGuard(retry_after=5.0, clock=clock)
    calls: list[str] = []
    assert guard.call("get", failing, "default") == "default"
    assert not guard.ok
    clock.now += 4.999
    assert guard.call("get", counted("answer", calls), "default") == "default"
    assert calls == [], "the cache is not called while it is down"
    clock.now += 0.001
    assert guard.ok
    assert guard.call("get", counted("answer", calls), "default") == "answer"
    assert calls == ["answer"]


def test_a_failure_while_tried_again_starts_a_new_wait() -> None:
    clock = Clock()
    guard = CacheGuard(retry_after=5.0, clock=clock)
    guard.call("get", failing, None)
    clock.now += 5.0
    guard.call("set", failing, None)
    clock.now += 4.0
    assert not guard.ok
    clock.now += 1.0
    assert guard.ok


def test_calls_that_fail_together_report_it_once(caplog: pytest.LogCaptureFixture) -> None:
    guard = CacheGuard(clock=Clock())

    def fails_while_another_call_fails() -> None:
        # This call got past the check before the other failed: as two threads would.
        guard.call("set", failing, None)
        failing()

    caplog.set_level(logging.WARNING, logger="blockfilter.kaleyra")
    assert guard.call("get", fails_while_another_call_fails, "default") == "default"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "status cache unavailable (set)" in warnings[0]
    assert f"for {CACHE_RETRY_AFTER_S:.0f} s" in warnings[0]
    assert not guard.ok


def test_an_error_that_is_not_the_cache_being_down_is_not_swallowed() -> None:
    guard = CacheGuard(clock=Clock())

    def broken() -> None:
        raise ValueError("a bug")

    with pytest.raises(ValueError):
        guard.call("get", broken, None)
    assert guard.ok, "only CacheUnavailable opens the breaker"
