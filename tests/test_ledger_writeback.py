"""Write-back over HTTP to the simulator: at most 100 numbers a POST, retried on 5xx, kept for
later when it keeps failing, never delaying the local effect; a later GET sees it."""

from __future__ import annotations

import time

import pytest

from blockfilter.kaleyra.client import KaleyraClient
from blockfilter.ledger import add_optouts, remove_optouts
from blockfilter.ledger.ledger import forget_shared_ledgers, shared_ledger
from blockfilter.ledger.writeback import flush_write_back
from blockfilter.plugins.manager import reset_plugin_manager
from blockfilter.testing.simulator import Simulator
from tests.conftest import TEST_KEY, TEST_SID, fast_settings
from tests.ledger_support import KEY_A, KEY_B, LedgerPlace


@pytest.fixture
def simulator():
    with Simulator(sid=TEST_SID, api_key=TEST_KEY) as sim:
        yield sim


@pytest.fixture(autouse=True)
def _fresh():
    yield
    forget_shared_ledgers()
    reset_plugin_manager()


def numbers(count: int, base: int = 0) -> list[str]:
    return [f"+91984{base + i:07d}" for i in range(count)]


def manual(settings):
    """The shared ledger, flushed by the test alone (no background write-back)."""
    ledger = shared_ledger(settings)
    ledger.auto_flush = False
    return ledger


def settings_for(sim: Simulator, place: LedgerPlace, **more: object):
    values: dict[str, object] = {
        "optout_url": place.url,
        "optout_key": KEY_A,
        "load_plugins": [],
        "write_back": True,
    }
    values.update(more)
    return fast_settings(sim.base_url, **values)


def test_opt_outs_are_written_back_in_posts_of_at_most_100(
    simulator: Simulator, place: LedgerPlace
) -> None:
    settings = settings_for(simulator, place)
    ledger = manual(settings)
    many = numbers(250)
    add_optouts(many, "sms", settings=settings, ledger=ledger)
    add_optouts(numbers(3, 1000), "all", settings=settings, ledger=ledger)
    with KaleyraClient(settings) as client:
        done = flush_write_back(settings, ledger, client=client)
        assert done == {"sent": 250 + 9, "requests": 3 + 1 + 1, "failed": 0, "left": 0}
        assert all(n <= 100 for _, n in simulator.changes)
        assert sum(n for c, n in simulator.changes if c == "sms") == 253
        # A later GET sees what was written back.
        assert client.blocked("sms", many) == set(many)
        assert client.blocked("voice", numbers(3, 1000)) == set(numbers(3, 1000))
        assert client.blocked("voice", many[:5]) == set()


def test_a_write_back_is_retried_on_5xx_and_kept_when_it_keeps_failing(
    simulator: Simulator, place: LedgerPlace
) -> None:
    settings = settings_for(simulator, place)
    ledger = manual(settings)
    add_optouts(numbers(120), "sms", settings=settings, ledger=ledger)
    with KaleyraClient(settings) as client:
        simulator.set_faults(["wa500:every=2"])
        done = flush_write_back(settings, ledger, client=client)
        assert (done["sent"], done["failed"]) == (120, 0)
        assert simulator.stats.by_outcome.get("fault:wa500", 0) >= 1  # retried, then through

        add_optouts(numbers(10, 500), "sms", settings=settings, ledger=ledger)
        simulator.set_faults(["wa500"])  # every request fails: the budget is spent
        failed = flush_write_back(settings, ledger, client=client)
        assert (failed["sent"], failed["failed"], failed["left"]) == (0, 10, 1 * 10)
        # The local effect never waited for Kaleyra.
        assert set(ledger.opted_out({"sms": numbers(10, 500)})["sms"]) == set(numbers(10, 500))
        simulator.clear_faults()
        assert flush_write_back(settings, ledger, client=client)["sent"] == 0  # not due yet
        later = flush_write_back(settings, ledger, client=client, clock=lambda: time.time() + 60)
        assert (later["sent"], later["left"]) == (10, 0)
        assert client.blocked("sms", numbers(10, 500)) == set(numbers(10, 500))


def test_an_opt_in_removes_what_was_written_back(simulator: Simulator, place: LedgerPlace) -> None:
    settings = settings_for(simulator, place)
    ledger = manual(settings)
    target = numbers(1)
    with KaleyraClient(settings) as client:
        add_optouts(target, "sms", settings=settings, ledger=ledger)
        flush_write_back(settings, ledger, client=client)
        assert client.blocked("sms", target) == set(target)
        # Out, in, out, in before the next flush: the last state is what goes out.
        remove_optouts(target, "sms", settings=settings, ledger=ledger, at=time.time() + 1)
        add_optouts(target, "sms", settings=settings, ledger=ledger, at=time.time() + 2)
        remove_optouts(target, "sms", settings=settings, ledger=ledger, at=time.time() + 3)
        assert flush_write_back(settings, ledger, client=client)["sent"] == 1
        assert client.blocked("sms", target) == set()


def test_without_write_back_nothing_is_queued(
    simulator: Simulator, sqlite_place: LedgerPlace
) -> None:
    settings = settings_for(simulator, sqlite_place, write_back=False)
    ledger = manual(settings)
    add_optouts(numbers(5), "sms", settings=settings, ledger=ledger)
    with KaleyraClient(settings) as client:
        assert flush_write_back(settings, ledger, client=client)["requests"] == 0
    assert simulator.changes == []


def test_a_slow_kaleyra_does_not_delay_the_local_effect(
    simulator: Simulator, sqlite_place: LedgerPlace
) -> None:
    settings = settings_for(simulator, sqlite_place)
    simulator.set_latency(3.0)
    started = time.monotonic()
    add_optouts(numbers(2), "sms", settings=settings)  # kicks a background write-back
    assert time.monotonic() - started < 2.5
    ledger = shared_ledger(settings)
    assert set(ledger.opted_out({"sms": numbers(2)})["sms"]) == set(numbers(2))
    deadline = time.monotonic() + 30
    while simulator.changes == [] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert simulator.changes == [("sms", 2)]


def test_a_key_rotation_reseals_the_queued_write_backs(
    simulator: Simulator, place: LedgerPlace
) -> None:
    settings = settings_for(simulator, place)  # the old key alone
    old = manual(settings)
    queued, lifted = numbers(150), numbers(1, 900)
    with KaleyraClient(settings) as client:
        add_optouts(lifted, "sms", settings=settings, ledger=old)
        flush_write_back(settings, old, client=client)
        assert client.blocked("sms", lifted) == set(lifted)
    # Queued, not sent yet: 150 opt-outs, and an opt-in of a number Kaleyra holds.
    add_optouts(queued, "sms", settings=settings, ledger=old)
    remove_optouts(lifted, "sms", settings=settings, ledger=old, at=time.time() + 1)
    # The new key goes first; a process on it opts one number back in: queued under the new
    # key's hash, next to that number's row under the old one.
    both_settings = settings.replace(optout_key=f"{KEY_B},{KEY_A}")
    both = manual(both_settings)
    remove_optouts(queued[:1], "sms", settings=both_settings, ledger=both, at=time.time() + 2)
    assert both.store.outbox_size() == 152

    assert both.rotate() == 152  # every event of the old key (the new one's is sealed)
    assert both.store.outbox_size() == 151  # the number queued twice is one row now
    new_settings = settings.replace(optout_key=KEY_B)  # the old key is retired
    new = manual(new_settings)
    with KaleyraClient(new_settings) as client:
        done = flush_write_back(new_settings, new, client=client)
        assert (done["sent"], done["failed"], done["left"]) == (151, 0, 0)
        # A later GET sees every queued change, with the right numbers.
        assert client.blocked("sms", queued) == set(queued[1:])
        assert client.blocked("sms", lifted) == set()
    assert set(new.opted_out({"sms": queued})["sms"]) == set(queued[1:])


def test_a_number_queued_under_two_keys_is_sent_once_with_its_state_now(
    simulator: Simulator, place: LedgerPlace
) -> None:
    settings = settings_for(simulator, place)
    old = manual(settings)
    target = numbers(1)
    add_optouts(target, "sms", settings=settings, ledger=old)
    both_settings = settings.replace(optout_key=f"{KEY_B},{KEY_A}")
    both = manual(both_settings)
    remove_optouts(target, "sms", settings=both_settings, ledger=both, at=time.time() + 1)
    assert both.store.outbox_size() == 2  # opted out under one hash, back in under the other
    with KaleyraClient(both_settings) as client:
        done = flush_write_back(both_settings, both, client=client)
        # Not "added and removed in one request" (refused, again and again): the ledger's
        # state now, once.
        assert (done["sent"], done["requests"], done["failed"], done["left"]) == (2, 1, 0, 0)
        assert simulator.changes == [("sms", 1)]
        assert client.blocked("sms", target) == set()


def test_a_write_back_sealed_with_a_dropped_key_waits_and_holds_no_other_back(
    simulator: Simulator, sqlite_place: LedgerPlace
) -> None:
    settings = settings_for(simulator, sqlite_place)
    early, late = numbers(1), numbers(1, 10)
    add_optouts(early, "sms", settings=settings, ledger=manual(settings))
    # The old key dropped without a rotation: its row cannot be read, the others still go.
    new_settings = settings.replace(optout_key=KEY_B)
    new = manual(new_settings)
    add_optouts(late, "sms", settings=new_settings, ledger=new)
    with KaleyraClient(new_settings) as client:
        done = flush_write_back(new_settings, new, client=client)
        assert (done["sent"], done["failed"], done["left"]) == (1, 1, 1)
        assert client.blocked("sms", early + late) == set(late)
        # The old key back (after the new one) and a rotation: it goes out too.
        both_settings = settings.replace(optout_key=f"{KEY_B},{KEY_A}")
        both = manual(both_settings)
        both.rotate()
        later = flush_write_back(
            new_settings, manual(new_settings), client=client, clock=lambda: time.time() + 900
        )
        assert (later["sent"], later["left"]) == (1, 0)
        assert client.blocked("sms", early + late) == set(early + late)
