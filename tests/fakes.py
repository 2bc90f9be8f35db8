"""Fakes of time for the client's tests: what STYLE calls injected time (``clock=``,
``sleep=``), so retries, backoff and Retry-After are tested without waiting."""

from __future__ import annotations


class FakeTime:
    """A clock that only moves when slept on, to test the budget without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
