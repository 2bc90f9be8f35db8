"""The cost model of the Kaleyra source: lookups or a whole-list sync, as arithmetic."""

from __future__ import annotations

import pytest

from blockfilter.kaleyra.strategy import (
    STRATEGIES,
    Mode,
    Plan,
    cost,
    lookup_requests,
    may_sync,
    sync_cost,
)
from blockfilter.kaleyra.sync import sync_pages


@pytest.mark.parametrize(("misses", "requests"), [(0, 0), (1, 1), (100, 1), (101, 2), (250, 3)])
def test_lookups_go_100_to_a_request(misses: int, requests: int) -> None:
    assert lookup_requests(misses) == requests


def test_only_the_lookup_strategy_never_syncs() -> None:
    assert [may_sync(strategy) for strategy in STRATEGIES] == [True, False, True]


def test_a_sync_costs_the_pages_of_the_known_size() -> None:
    assert sync_cost("auto", 250) == sync_pages(250) == 3
    assert sync_cost("auto", 200) == 3, "a list that is a multiple of 100 ends on an empty page"
    assert sync_cost("sync", 250) == 3
    assert sync_cost("lookup", 250) is None


def test_with_no_size_known_only_a_forced_sync_is_costed() -> None:
    assert sync_cost("auto", None) is None
    assert sync_cost("sync", None) == sync_pages(0) == 1


def test_the_cheaper_way_wins_and_ties_go_to_lookups() -> None:
    assert cost("auto", 150, pages=5) == 2
    assert cost("auto", 1_000, pages=5) == 5
    assert cost("auto", 500, pages=5) == 5  # a tie: lookups, at the same price
    assert cost("auto", 150, pages=None) == 2
    assert cost("sync", 150, pages=5) == 5, "a forced sync is paid for whatever lookups cost"
    assert cost("sync", 0, pages=5) == 0, "nothing missing costs nothing"


def test_a_plan_with_no_sync_possible_looks_every_miss_up() -> None:
    plan = Plan.for_channel("auto", None)
    assert plan.mode is Mode.LOOKUP
    assert plan.take(["a", "b"]) == ["a", "b"]
    assert not plan.wants_sync and plan.settle() == []


def test_misses_are_held_until_lookups_would_cost_more_than_a_sync() -> None:
    plan = Plan.for_channel("auto", 2)
    numbers = [str(n) for n in range(201)]
    assert plan.take(numbers[:200]) == []
    assert not plan.wants_sync, "two requests either way: lookups"
    plan.take(numbers[200:])
    assert plan.wants_sync
    plan.begin_sync()
    assert plan.mode is Mode.SYNCING and plan.buffer == [] and plan.held == numbers
    assert plan.take(["late"]) == [] and plan.held[-1] == "late"
    assert plan.sync_ended() == [*numbers, "late"]
    assert plan.mode is Mode.LOOKUP and plan.held == []


def test_a_forced_sync_starts_with_the_first_miss() -> None:
    plan = Plan.for_channel("sync", 7)
    assert (plan.mode, plan.pages, plan.forced) == (Mode.UNDECIDED, 0, True)
    plan.take(["a"])
    assert plan.wants_sync


def test_a_sync_that_answered_everything_decides_again_at_the_new_size() -> None:
    plan = Plan.for_channel("auto", 2)
    plan.take(["a"])
    plan.begin_sync()
    plan.sync_ended()
    plan.sync_answered(size=450)
    assert (plan.mode, plan.pages) == (Mode.UNDECIDED, 5)
    forced = Plan.for_channel("sync", 2)
    forced.sync_answered(size=450)
    assert (forced.mode, forced.pages) == (Mode.UNDECIDED, 0), "forced: the next miss syncs"


def test_a_campaign_that_ends_undecided_looks_its_held_misses_up() -> None:
    plan = Plan.for_channel("auto", 9)
    plan.take(["a", "b"])
    assert plan.settle() == ["a", "b"]
    assert plan.mode is Mode.LOOKUP and plan.buffer == []
    assert plan.settle() == []
