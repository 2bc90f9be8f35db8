"""Fakes of time: injected time (``clock=``, ``sleep=``), so retries, backoff, Retry-After
and cache TTLs are tested without waiting."""

from __future__ import annotations


class FakeTime:
    """A clock that only moves when slept on, to test the budget (or a TTL) without waiting.

    :param now: where it starts (epoch seconds); a test that mixes its readings with real
        timestamps starts it at ``time.time()``.
    """

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
