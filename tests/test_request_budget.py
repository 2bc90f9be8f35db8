"""``--max-requests``: the request budget lets that many attempts through, then refuses."""

from __future__ import annotations

import pytest

from blockfilter.errors import RequestBudgetExhausted
from blockfilter.kaleyra.source import RequestBudget as FromTheSource
from blockfilter.store.ratelimit import RequestBudget
from tests.support.limiters import RecordingLimiter


def test_the_budget_refuses_past_its_limit_and_paces_what_it_lets_through() -> None:
    then = RecordingLimiter()
    budget = RequestBudget(2, then=then)
    budget.acquire()
    budget.acquire()
    with pytest.raises(RequestBudgetExhausted, match="budget of 2"):
        budget.acquire()
    assert then.acquired == 2, "a refused request is not paced"
    budget.penalize(1.5)
    assert then.penalties == [1.5]


def test_the_budget_is_still_importable_from_the_source() -> None:
    assert FromTheSource is RequestBudget
    RequestBudget(0).penalize(1.0)  # nothing to pass a 429 on to
