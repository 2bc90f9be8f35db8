"""A full-list sync against an upstream that does not page as documented: it must stop, keep
no snapshot, and leave the filter to look its numbers up. The upstream is the tests' own
(:mod:`tests.hostile_upstream`), written without the project's simulator."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import pytest

from blockfilter.engine.filter import Filter
from blockfilter.errors import SyncAborted
from blockfilter.kaleyra.source import KaleyraSource
from blockfilter.kaleyra.sync import sync_channel
from blockfilter.store.cache import MemoryCache
from tests.conftest import fast_settings
from tests.hostile_upstream import Answer, HostileUpstream, blocklist, national, no_plus, spaced
from tests.support.env import subprocess_env
from tests.test_cli import blockfilter


def listed(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    found: dict[str, None] = {}
    while len(found) < count:
        found[f"+9198{rng.randrange(10**8):08d}"] = None
    return list(found)


def pages_asked(upstream: HostileUpstream) -> int:
    return sum(1 for request in upstream.requests if "mobile" not in request.query)


def lookups_asked(upstream: HostileUpstream) -> int:
    return sum(1 for request in upstream.requests if "mobile" in request.query)


class Switchable:
    """An answer function whose behaviour the test changes half-way (an upstream that starts
    misbehaving after an honest sync)."""

    def __init__(self, answer: Callable[..., Answer]) -> None:
        self.answer = answer

    def __call__(self, path: str, query: dict[str, str], headers: dict[str, str]) -> Answer:
        return self.answer(path, query, headers)


def assert_no_blocklisted_allowed(
    results: list[dict[str, Any]], messages: list[dict[str, Any]], blocked: set[str]
) -> None:
    assert [r["id"] for r in results] == [m["id"] for m in messages], "one verdict each"
    for result in results:
        if result["verdict"] in ("allowed", "rerouted"):
            assert result["e164"] not in blocked, result["verdict"]


def test_a_page_repeating_the_one_before_stops_the_sync(
    hostile_upstream: Callable[..., HostileUpstream],
) -> None:
    upstream = hostile_upstream(blocklist({"sms": listed(250, 1)}, paging="same_page"))
    source = KaleyraSource(fast_settings(upstream.base_url), strategy="sync")
    with pytest.raises(SyncAborted, match="same as the page next to it"):
        source.sync("sms")
    # Stopped within the first rounds, not after thousands of requests.
    assert pages_asked(upstream) <= 8
    assert source.cache.snapshot_info("sms") is None
    source.close()


def test_a_list_that_never_ends_stops_at_the_page_bound(
    hostile_upstream: Callable[..., HostileUpstream],
) -> None:
    upstream = hostile_upstream(blocklist({"sms": listed(250, 2)}, paging="never_short"))
    settings = fast_settings(upstream.base_url)
    source = KaleyraSource(settings)
    with pytest.raises(SyncAborted, match="within 30 pages"):
        sync_channel(source.client, source.cache, "sms", max_pages=30)
    assert 30 <= pages_asked(upstream) <= 30 + settings.concurrency
    assert source.cache.snapshot_info("sms") is None
    source.close()


def test_a_list_that_never_ends_stops_at_the_time_budget(
    hostile_upstream: Callable[..., HostileUpstream],
) -> None:
    endless = blocklist({"sms": listed(250, 3)}, paging="never_short")

    def slowly(path: str, query: dict[str, str], headers: dict[str, str]) -> Answer:
        time.sleep(0.05)
        return endless(path, query, headers)

    upstream = hostile_upstream(slowly)
    source = KaleyraSource(fast_settings(upstream.base_url))
    started = time.monotonic()
    with pytest.raises(SyncAborted, match="within 1 s"):
        sync_channel(source.client, source.cache, "sms", max_seconds=1.0)
    assert time.monotonic() - started < 10
    assert source.cache.snapshot_info("sms") is None
    source.close()


def test_a_filter_whose_sync_runs_away_looks_its_numbers_up(
    hostile_upstream: Callable[..., HostileUpstream],
) -> None:
    # An honest sync teaches the filter the list's size (250: 3 pages); once its clean answers
    # are too old, a big campaign makes the auto strategy sync again, and this time the
    # upstream pages for ever. Before, the filter hung; now the size bounds the pages, the sync
    # fails, and its numbers are looked up.
    blocked = listed(250, 4)
    answer = Switchable(blocklist({"sms": blocked}))
    upstream = hostile_upstream(answer)
    now = [time.time()]
    settings = fast_settings(upstream.base_url, cache_ttl=600.0)
    cache = MemoryCache(settings, clock=lambda: now[0])
    source = KaleyraSource(settings, cache=cache, clock=lambda: now[0])
    assert source.sync("sms").marked
    now[0] += 601
    answer.answer = blocklist({"sms": blocked}, paging="never_short")
    campaign = blocked[:50] + listed(1_000, 5)
    messages = [{"id": str(i), "channel": "sms", "to": n} for i, n in enumerate(campaign)]
    before = pages_asked(upstream)
    with Filter(settings, sources=[source]) as run:
        results = list(run.run(messages))
    assert_no_blocklisted_allowed(results, messages, set(blocked))
    assert {r["e164"] for r in results if r["verdict"] == "blocked"} == set(blocked[:50])
    # The bound from the known size (twice its pages and some slack), not a runaway.
    assert pages_asked(upstream) - before <= 2 * 3 + 100 + settings.concurrency
    # The 50 listed numbers are still answered (blocked) by the old snapshot, whose blocked
    # answers outlive its clean ones; the 1,000 others are looked up, 100 to a request.
    assert lookups_asked(upstream) == 10
    source.close()


@pytest.mark.parametrize("rewrite", [no_plus, spaced], ids=["no_plus", "spaced"])
def test_entries_written_another_way_are_read_like_the_input(
    hostile_upstream: Callable[..., HostileUpstream], rewrite: Callable[[str], str]
) -> None:
    blocked = listed(150, 8)
    upstream = hostile_upstream(blocklist({"sms": blocked}, rewrite=rewrite))
    settings = fast_settings(upstream.base_url)
    source = KaleyraSource(settings, strategy="sync")
    assert source.sync("sms").marked
    clean = listed(30, 9)
    messages = [
        {"id": str(i), "channel": "sms", "to": n} for i, n in enumerate(blocked[:30] + clean)
    ]
    with Filter(settings, sources=[source]) as run:
        results = list(run.run(messages))
    assert [r["verdict"] for r in results] == ["blocked"] * 30 + ["allowed"] * 30
    assert lookups_asked(upstream) == 0  # answered by the snapshot
    source.close()


def test_entries_that_cannot_be_read_keep_no_snapshot(
    hostile_upstream: Callable[..., HostileUpstream],
) -> None:
    # National format without a region: no campaign number can be matched against the entry,
    # so no number may be called clean for being absent from the list.
    blocked = listed(150, 6)
    upstream = hostile_upstream(blocklist({"sms": blocked}, rewrite=national("91")))
    settings = fast_settings(upstream.base_url)
    source = KaleyraSource(settings, strategy="sync")
    result = source.sync("sms")
    assert (result.size, result.marked) == (150, False)
    assert source.cache.snapshot_info("sms") is None
    messages = [{"id": str(i), "channel": "sms", "to": n} for i, n in enumerate(blocked[:20])]
    with Filter(settings, sources=[source]) as run:
        results = list(run.run(messages))
    # Looked up instead; the answers, national too, are matched to the numbers asked.
    assert [r["verdict"] for r in results] == ["blocked"] * 20
    assert lookups_asked(upstream) >= 1
    source.close()


def test_cli_sync_of_a_runaway_list_fails_without_a_traceback(
    hostile_upstream: Callable[..., HostileUpstream],
) -> None:
    upstream = hostile_upstream(blocklist({"sms": listed(250, 7)}, paging="same_page"))
    done = blockfilter("sync", "--channel", "sms", env=subprocess_env(upstream))  # type: ignore[arg-type]
    stderr = done.stderr.decode()
    assert done.returncode == 1, stderr
    assert "same as the page next to it" in stderr
    assert "Traceback" not in stderr
