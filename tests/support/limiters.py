"""A request limiter that lets everything through and remembers how it was used."""

from __future__ import annotations


class RecordingLimiter:
    """A real (if permissive) limiter: the client's ``acquire`` before every attempt and its
    ``penalize`` after a 429 are counted, so a test can say how the client paced itself."""

    def __init__(self) -> None:
        self.acquired = 0
        self.penalties: list[float] = []

    def acquire(self) -> None:
        self.acquired += 1

    def penalize(self, seconds: float) -> None:
        self.penalties.append(seconds)
