"""The opt-out ledger itself, on SQLite and on the machine's PostgreSQL: events, the state
derived from them, sealing, rotation, idempotency, the fence."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from blockfilter.config import load_settings
from blockfilter.errors import ConfigError
from blockfilter.ledger.events import event_time
from blockfilter.ledger.ledger import Change, make_ledger
from blockfilter.ledger.store import LedgerUnavailable
from tests.ledger_support import KEY_A, KEY_B, LedgerPlace
from tests.support.env import ROOT, subprocess_env

N1, N2, N3 = "+919812300001", "+919812300002", "+919812300003"
T0 = 1_800_000_000.0  # 2027-01-15


def settings_for(place: LedgerPlace, key: str | None = KEY_A, **more: object):
    return load_settings(environ={}, optout_url=place.url, optout_key=key, **more)


def out(number: str, channel: str = "sms", at: float = T0, **more: object) -> Change:
    return Change(number, channel, True, at, "operator", actor="test", **more)  # type: ignore[arg-type]


def back_in(number: str, channel: str = "sms", at: float = T0, **more: object) -> Change:
    return Change(number, channel, False, at, "operator", actor="test", **more)  # type: ignore[arg-type]


def blocked(ledger, channel: str, *numbers: str) -> set[str]:
    return set(ledger.opted_out({channel: list(numbers)})[channel])


def test_an_opt_out_blocks_its_channel_and_all_blocks_every_channel(place: LedgerPlace) -> None:
    ledger = make_ledger(settings_for(place))
    ledger.record([out(N1, "sms"), out(N2, "all")])
    assert blocked(ledger, "sms", N1, N2, N3) == {N1, N2}
    assert blocked(ledger, "whatsapp", N1, N2, N3) == {N2}
    assert blocked(ledger, "voice", N1, N2, N3) == {N2}
    # The cross-channel rule: one opt-out, every channel.
    wide = make_ledger(settings_for(place, optout_scope="all"))
    assert blocked(wide, "whatsapp", N1, N2, N3) == {N1, N2}


def test_the_newest_event_by_its_own_time_wins_whatever_order_it_arrives_in(
    place: LedgerPlace,
) -> None:
    ledger = make_ledger(settings_for(place))
    # The opt-in of 12:01 reaches the ledger first; the opt-out of 12:00 arrives late.
    ledger.record([back_in(N1, at=T0 + 60)])
    ledger.record([out(N1, at=T0)])
    assert blocked(ledger, "sms", N1) == set()
    # And the other way round: a late opt-in about the past does not lift a newer opt-out.
    ledger.record([out(N2, at=T0 + 60)])
    ledger.record([back_in(N2, at=T0)])
    assert blocked(ledger, "sms", N2) == {N2}
    # The same instant: the safe side.
    ledger.record([back_in(N3, at=T0), out(N3, at=T0)])
    assert blocked(ledger, "sms", N3) == {N3}


def test_an_opt_in_on_one_channel_lifts_only_that_channel(place: LedgerPlace) -> None:
    ledger = make_ledger(settings_for(place))
    ledger.record([out(N1, "all", at=T0), back_in(N1, "sms", at=T0 + 1)])
    assert blocked(ledger, "sms", N1) == set()
    assert blocked(ledger, "voice", N1) == {N1}


def test_a_future_event_time_is_taken_as_now() -> None:
    now = 1_900_000_000.0
    assert event_time(now + 3600 * 24 * 365, now=now) == now
    assert event_time(now + 10, now=now) == now + 10  # a little skew is kept as given
    assert event_time("2027-01-15T08:00:00Z", now=now) == pytest.approx(
        1_800_000_000 - 0, abs=86400
    )
    for bad in ("yesterday", float("nan"), 12.0, True):
        with pytest.raises(ValueError):
            event_time(bad, now=now)


def test_a_dump_of_the_store_holds_no_number_in_clear(place: LedgerPlace) -> None:
    ledger = make_ledger(settings_for(place, write_back=True))
    numbers = [f"+9198123{i:05d}" for i in range(20)]
    ledger.record([out(n, "sms", ref=f"msg-{n}") for n in numbers])
    ledger.record([back_in(numbers[0], "sms", at=T0 + 5)])
    dump = place.dump()
    assert "INSERT" in dump or "COPY" in dump  # the dump has the rows...
    assert len(ledger.store.all_events()) == 21
    for number in numbers:
        for form in (number, number[1:], number[3:], number[-8:]):  # ...but no number, no ref
            assert form not in dump
        assert f"msg-{number}" not in dump
    assert KEY_A not in dump


def test_the_store_is_append_only(place: LedgerPlace) -> None:
    ledger = make_ledger(settings_for(place))
    ledger.record([out(N1)])
    if place.kind == "sqlite":
        import sqlite3

        db = sqlite3.connect(str(place.path))
        for statement in ("DELETE FROM events", "UPDATE events SET opted_out = 0"):
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                db.execute(statement)
        db.close()
    else:
        import psycopg

        with psycopg.connect(place.url, autocommit=True) as conn:
            for statement in (
                "DELETE FROM blockfilter_optout_events",
                "UPDATE blockfilter_optout_events SET opted_out = false",
            ):
                with pytest.raises(psycopg.Error, match="append-only"):
                    conn.execute(statement)
    assert blocked(ledger, "sms", N1) == {N1}


def test_key_rotation_keeps_every_opt_out(place: LedgerPlace) -> None:
    numbers = [f"+9198124{i:05d}" for i in range(50)]
    old = make_ledger(settings_for(place, key=KEY_A))
    old.record([out(n, "sms" if i % 2 else "all") for i, n in enumerate(numbers)])
    expected = {n for n in numbers}

    # Step 1: the new key goes first; the old one stays for what it sealed.
    both = make_ledger(settings_for(place, key=f"{KEY_B},{KEY_A}"))
    assert blocked(both, "sms", *numbers) == expected
    both.record([out(N1)])  # new events are sealed with the new key
    # A process still on the old key alone cannot read what the new one sealed: it fails
    # closed rather than missing opt-outs.
    with pytest.raises(LedgerUnavailable, match="not in BLOCKFILTER_OPTOUT_KEY"):
        old.opted_out({"sms": numbers})

    # Step 2: re-seal everything under the new key, then drop the old one.
    assert both.rotate() == 50
    new = make_ledger(settings_for(place, key=KEY_B))
    assert blocked(new, "sms", *numbers, N1) == expected | {N1}
    assert {n for n, _, _ in new.export()} == expected | {N1}
    with pytest.raises(LedgerUnavailable):
        old.opted_out({"sms": numbers})


def test_without_a_key_an_empty_ledger_answers_and_a_full_one_fails_closed(
    place: LedgerPlace,
) -> None:
    keyless = make_ledger(settings_for(place, key=None))
    if place.kind == "sqlite":
        assert blocked(keyless, "sms", N1) == set()  # nothing recorded: nothing opted out
        assert not place.path.exists()  # and reading made no file
    with pytest.raises(ConfigError, match="BLOCKFILTER_OPTOUT_KEY"):
        keyless.record([out(N1)])
    make_ledger(settings_for(place)).record([out(N1)])
    with pytest.raises(LedgerUnavailable, match="BLOCKFILTER_OPTOUT_KEY is not set"):
        keyless.opted_out({"sms": [N2]})


def test_a_short_key_is_a_configuration_error(place: LedgerPlace) -> None:
    with pytest.raises(ConfigError, match="shorter than 32"):
        make_ledger(settings_for(place, key="short"))


def test_a_change_reported_twice_is_recorded_once(place: LedgerPlace) -> None:
    ledger = make_ledger(settings_for(place))
    first = ledger.record([out(N1, ref="m-1")])[0]
    again = ledger.record([out(N1, ref="m-1")])[0]
    assert first.event is not None and first.changed and not first.duplicate
    assert again.duplicate and again.event is None and not again.changed
    assert len(ledger.store.all_events()) == 1


def test_concurrent_writers_see_one_change(place: LedgerPlace) -> None:
    """Two writers recording the same opt-out at once: exactly one of them changed the state
    (so exactly one confirmation may go out)."""
    settings = settings_for(place)
    results: list[bool] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def write() -> None:
        ledger = make_ledger(settings)
        start.wait()
        recorded = ledger.record([out(N1, at=time.time())])[0]
        with lock:
            results.append(recorded.changed)
        ledger.close()

    threads = [threading.Thread(target=write) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(results) == [False, False, False, True]


_HOLD_GATE = """
import sys, time
from blockfilter.config import load_settings
from blockfilter.ledger.ledger import make_ledger
ledger = make_ledger(load_settings(environ={}, optout_url=sys.argv[1], optout_key=sys.argv[2]))
with ledger.gate():
    print("gate held", flush=True)
    time.sleep(float(sys.argv[3]))
    print("gate released at", time.time(), flush=True)
"""


def test_a_report_returns_only_once_the_dispatches_in_flight_elsewhere_are_done(
    place: LedgerPlace,
) -> None:
    ledger = make_ledger(settings_for(place))
    ledger.record([out(N2)])  # the store exists, its schema is made
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_GATE, place.url, KEY_A, "1.5"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=subprocess_env(),
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "gate held"
        ledger.record([out(N1)])
        returned = time.time()
        released = float(holder.stdout.readline().split()[-1])
    finally:
        holder.wait(30)
    assert returned >= released
    # A gate opened after the report sees it at once.
    with ledger.gate():
        assert blocked(ledger, "sms", N1) == {N1}


def test_a_report_from_inside_a_gate_does_not_wait_for_itself(place: LedgerPlace) -> None:
    ledger = make_ledger(settings_for(place))
    ledger.record([out(N2)])
    started = time.monotonic()
    with ledger.gate():
        ledger.record([out(N1)])  # a dispatch hook that reports what the provider said
    assert time.monotonic() - started < 10
    assert blocked(ledger, "sms", N1) == {N1}
