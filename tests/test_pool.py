"""The request pool kept full: requests leave as soon as they are full, and only full ones.

Observed at a real simulator over HTTP, through the filter's JSON Lines path (the command
line's), with an input that stalls where the test wants to look.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator

from blockfilter.engine import Filter
from blockfilter.kaleyra.source import KaleyraSource
from blockfilter.testing.simulator import Simulator
from tests.conftest import fast_settings

# Long enough for a request to reach the simulator on a loaded machine; a failing run waits
# it out once.
_PATIENCE_S = 30.0


def _line(index: int) -> bytes:
    message = {"id": f"m{index}", "channel": "sms", "to": f"+9198{index:08d}"}
    return json.dumps(message).encode() + b"\n"


def test_the_first_request_leaves_once_one_request_of_numbers_is_read(sim: Simulator) -> None:
    total = 450  # fewer than a first hand-over of 500 numbers would need
    requests_at_the_stall: list[int] = []

    def first_pass() -> Iterator[bytes]:
        for index in range(100):
            yield _line(index)
        # The input stalls after exactly one request's worth of numbers: that request must
        # reach the simulator without waiting for more.
        deadline = time.monotonic() + _PATIENCE_S
        while sim.stats.requests == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        requests_at_the_stall.append(sim.stats.requests)
        for index in range(100, total):
            yield _line(index)

    passes = iter([first_pass])

    def open_lines() -> Iterator[bytes]:
        # The first pass stalls; the later ones read the same lines at once.
        return next(passes, lambda: (_line(index) for index in range(total)))()

    sim.block("sms", "+919800000007", "+919800000444")
    settings = fast_settings(sim.base_url, concurrency=8)
    source = KaleyraSource(settings)
    try:
        with Filter(settings, sources=[source]) as engine:
            records = [json.loads(line) for line in engine.run_lines(open_lines)]
    finally:
        source.close()
    assert requests_at_the_stall == [1]
    # Still the fewest requests, each full but the last.
    stats = sim.stats
    assert stats.requests == math.ceil(total / 100)
    assert stats.numbers_asked == total and stats.max_numbers_per_request == 100
    assert [r["id"] for r in records] == [f"m{i}" for i in range(total)]
    blocked = [r["id"] for r in records if r["verdict"] == "blocked"]
    assert blocked == ["m7", "m444"]
    assert all(r["verdict"] == "allowed" for r in records if r["id"] not in {"m7", "m444"})
