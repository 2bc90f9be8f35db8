"""The ledger as a blocklist source: an opt-out beats every clean answer (live, cached,
synced), in ``Filter().run``, the plugin-built filter, ``blockfilter filter`` and
``blockfilter check``; a ledger that cannot be read defers, never allows."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blockfilter.engine.filter import Filter
from blockfilter.kaleyra.source import KaleyraSource
from blockfilter.ledger import add_optouts, remove_optouts, report_send_results
from blockfilter.ledger.ledger import forget_shared_ledgers
from blockfilter.plugins.hookspecs import hookimpl
from blockfilter.plugins.manager import build_filter, make_plugin_manager
from blockfilter.testing.simulator import Simulator
from tests.conftest import fast_settings
from tests.ledger_support import KEY_A, LedgerPlace
from tests.support.env import TEST_KEY, TEST_SID, subprocess_env

ROOT = Path(__file__).resolve().parents[1]
N1, N2, N3 = "+919812300001", "+919812300002", "+919812300003"


@pytest.fixture
def simulator():
    with Simulator(sid=TEST_SID, api_key=TEST_KEY) as sim:
        yield sim


@pytest.fixture(autouse=True)
def _fresh_ledgers():
    yield
    forget_shared_ledgers()


def settings_for(sim: Simulator, place: LedgerPlace, **more: object):
    return fast_settings(
        sim.base_url, optout_url=place.url, optout_key=KEY_A, load_plugins=[], **more
    )


def msg(i: str, to: str, channel: str = "sms", **more: object) -> dict[str, object]:
    return {"id": i, "channel": channel, "to": to, **more}


def verdicts(results) -> dict[str, tuple[str, str]]:
    return {r["id"]: (r["verdict"], r.get("channel")) for r in results}


def test_a_ledger_opt_out_beats_a_live_clean_answer(
    simulator: Simulator, place: LedgerPlace
) -> None:
    settings = settings_for(simulator, place)
    report = report_send_results(
        [{"to": N1, "channel": "sms", "provider": "kaleyra", "code": "NOT-SENT/OPT-OUT"}],
        settings=settings,
    )
    assert report.opted_out == 1
    messages = [
        msg("a", N1),
        msg("b", N2),
        msg("c", N1, fallback=["whatsapp"]),  # opted out of SMS only: WhatsApp is fine
        msg("d", N1, channel="whatsapp"),
    ]
    with Filter(settings) as engine:  # the plain Python API, no plugin manager
        assert verdicts(engine.run(messages)) == {
            "a": ("blocked", "sms"),
            "b": ("allowed", "sms"),
            "c": ("rerouted", "whatsapp"),
            "d": ("allowed", "whatsapp"),
        }
    # Kaleyra answered clean for N1 on SMS: the ledger decided.
    assert simulator.stats.requests >= 1


def test_a_ledger_opt_out_beats_a_cached_clean_status(
    simulator: Simulator, sqlite_place: LedgerPlace
) -> None:
    settings = settings_for(simulator, sqlite_place)
    pm = make_plugin_manager(settings)
    with build_filter(settings, pm) as engine:
        assert verdicts(engine.run([msg("a", N1)])) == {"a": ("allowed", "sms")}
    add_optouts([N1], "sms", by="ops", settings=settings)
    simulator.reset_stats()
    with build_filter(settings, pm) as engine:
        results = list(engine.run([msg("a", N1)]))
        assert engine.summary.cache_hits == 1  # Kaleyra's answer came from the cache...
    assert simulator.stats.requests == 0
    assert verdicts(results) == {"a": ("blocked", "sms")}  # ...and lost to the ledger


def test_a_ledger_opt_out_beats_a_synced_snapshot(
    simulator: Simulator, sqlite_place: LedgerPlace
) -> None:
    settings = settings_for(simulator, sqlite_place)
    simulator.block("sms", N3)
    source = KaleyraSource(settings)
    try:
        source.sync("sms")  # N1 is absent from the list: clean, by the snapshot
        add_optouts([N1], "sms", settings=settings)
        with Filter(settings, sources=[source, *_ledger_sources(settings)]) as engine:
            simulator.reset_stats()
            found = verdicts(engine.run([msg("a", N1), msg("b", N2), msg("c", N3)]))
    finally:
        source.close()
    assert simulator.stats.requests == 0
    assert found == {"a": ("blocked", "sms"), "b": ("allowed", "sms"), "c": ("blocked", "sms")}


def _ledger_sources(settings):
    from blockfilter.ledger.ledger import shared_ledger
    from blockfilter.ledger.source import LedgerSource

    return [LedgerSource(shared_ledger(settings))]


def test_an_opt_in_lifts_only_what_the_ledger_recorded(
    simulator: Simulator, sqlite_place: LedgerPlace
) -> None:
    settings = settings_for(simulator, sqlite_place)
    simulator.block("sms", N2)  # on Kaleyra's own list
    add_optouts([N1, N2], "sms", settings=settings)
    remove_optouts([N1, N2], "sms", settings=settings)
    with Filter(settings) as engine:
        assert verdicts(engine.run([msg("a", N1), msg("b", N2)])) == {
            "a": ("allowed", "sms"),
            "b": ("blocked", "sms"),  # Kaleyra's list stays authoritative
        }


def test_a_ledger_that_cannot_be_read_defers_the_messages(
    simulator: Simulator, sqlite_place: LedgerPlace
) -> None:
    settings = settings_for(simulator, sqlite_place)
    add_optouts([N1], "sms", settings=settings)
    keyless = settings.replace(optout_key=None)  # a worker that lost its key
    with Filter(keyless) as engine:
        results = list(engine.run([msg("a", N2)]))
    assert [(r["verdict"], r["reason"]) for r in results] == [("deferred", "check_failed")]


def test_blocking_kaleyra_leaves_the_ledger_alone_and_refuses_to_start(
    simulator: Simulator, sqlite_place: LedgerPlace
) -> None:
    from blockfilter.plugins.manager import PluginError

    settings = settings_for(simulator, sqlite_place, disable_plugins=["kaleyra"])
    with pytest.raises(PluginError, match="no blocklist source"):
        make_plugin_manager(settings)


def _cli(args: list[str], env: dict[str, str], stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blockfilter", *args],
        input=stdin,
        capture_output=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )


def test_the_command_line_filter_and_check_see_the_ledger(
    simulator: Simulator, place: LedgerPlace, tmp_path: Path
) -> None:
    env = subprocess_env(
        simulator,
        BLOCKFILTER_OPTOUT_URL=place.url,
        BLOCKFILTER_OPTOUT_KEY=KEY_A,
        BLOCKFILTER_LOAD_PLUGINS="",
    )
    added = _cli(["optout", "add", "--channel", "sms", "--by", "ops", N1], env)
    assert added.returncode == 0, added.stderr.decode()
    campaign = tmp_path / "campaign.jsonl"
    campaign.write_text("".join(json.dumps(msg(str(i), n)) + "\n" for i, n in enumerate([N1, N2])))
    done = _cli(["filter", str(campaign), "--quiet"], env)
    assert done.returncode == 0, done.stderr.decode()
    lines = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert [(r["to"], r["verdict"]) for r in lines] == [(N1, "blocked"), (N2, "allowed")]
    checked = _cli(["check", "--channel", "sms", "--json", N1, N2], env)
    assert checked.returncode == 0, checked.stderr.decode()
    assert json.loads(checked.stdout) == {"channel": "sms", "blocked": [N1]}
    # A ledger the command cannot read: the check fails, it does not answer "clean".
    broken = {**env, "BLOCKFILTER_OPTOUT_KEY": ""}
    failed = _cli(["check", "--channel", "sms", N2], broken)
    assert failed.returncode == 1 and b"the check failed" in failed.stderr


def test_every_verdict_says_which_source_decided(
    simulator: Simulator, sqlite_place: LedgerPlace
) -> None:
    settings = settings_for(simulator, sqlite_place)
    simulator.block("sms", N3)
    pm = make_plugin_manager(settings)
    with build_filter(settings, pm) as engine:
        first = {r["id"]: r["source"] for r in engine.run([msg("a", N1), msg("b", N3)])}
    assert first == {"a": "api", "b": "api"}
    add_optouts([N2], "sms", settings=settings)
    with build_filter(settings, pm) as engine:
        again = {r["id"]: r["source"] for r in engine.run([msg("a", N1), msg("c", N2, "SMS")])}
        summary = engine.summary.as_dict()
    assert again == {"a": "cache", "c": "ledger"}
    assert summary["sources"] == {"cache": {"allowed": 1}, "ledger": {"blocked": 1}}
    source = KaleyraSource(settings)
    try:
        source.sync("sms")
        with Filter(settings, sources=[source, *_ledger_sources(settings)]) as engine:
            synced = {r["id"]: r["source"] for r in engine.run([msg("d", "+919812300009")])}
    finally:
        source.close()
    assert synced == {"d": "snapshot"}


def _no_number_in(value: object, *numbers: str) -> bool:
    text = json.dumps(value)
    return not any(form in text for n in numbers for form in (n, n[1:], n[-8:]))


def test_a_ledger_verdict_names_the_event_that_put_the_number_there(
    simulator: Simulator, place: LedgerPlace
) -> None:
    settings = settings_for(simulator, place)
    report_send_results(
        [
            {
                "to": N1,
                "channel": "sms",
                "provider": "kaleyra",
                "code": "NOT-SENT/OPT-OUT",
                "id": "prov-1",
                "at": "2026-12-01T10:00:00Z",
            }
        ],
        settings=settings,
    )
    add_optouts([N2], "all", by="ops", reason="complaint", settings=settings)
    from blockfilter.ledger.ledger import shared_ledger

    events = {n: shared_ledger(settings).state(n)["sms"] for n in (N1, N2)}
    seen: list[dict[str, object]] = []

    class Observer:
        @hookimpl
        def blockfilter_verdicts(self, results):
            seen.extend(results)

    pm = make_plugin_manager(settings)
    pm.register(Observer(), name="observer")
    with Filter(settings, plugins=pm) as engine:
        results = {r["id"]: r for r in engine.run([msg("a", N1), msg("b", N2), msg("c", N3)])}
    assert results["a"]["ledger_event"] == {
        "event": events[N1].seq,  # type: ignore[union-attr]
        "action": "opt_out",
        "channel": "sms",
        "source": "send_result",
        "provider": "kaleyra",
        "code": "OPT-OUT",
        "by": "provider",
        "at": "2026-12-01T10:00:00.000Z",
        "recorded_at": events[N1].describe()["recorded_at"],  # type: ignore[union-attr]
    }
    operator = results["b"]["ledger_event"]
    assert (operator["source"], operator["channel"], operator["by"]) == ("operator", "all", "ops")
    assert operator["event"] == events[N2].seq  # type: ignore[union-attr]
    assert results["a"]["source"] == results["b"]["source"] == "ledger"
    assert "ledger_event" not in results["c"] and results["c"]["source"] == "api"
    # The observers see the same records; the provenance names no number.
    assert {r["id"]: r.get("ledger_event") for r in seen} == {
        k: r.get("ledger_event") for k, r in results.items()
    }
    assert _no_number_in([results["a"]["ledger_event"], operator], N1, N2)


def test_a_cached_verdict_carries_its_age_and_a_synced_one_the_snapshots(
    simulator: Simulator, sqlite_place: LedgerPlace
) -> None:
    settings = settings_for(simulator, sqlite_place)
    simulator.block("sms", N3)
    # An hour ago: the ledger's own answers (clean, read now) are newer, so Kaleyra's decide.
    now = [float(int(time.time()) - 3600)]
    source = KaleyraSource(settings, clock=lambda: now[0])
    ledger = _ledger_sources(settings)
    try:
        with Filter(settings, sources=[source, *ledger]) as engine:
            live = {r["id"]: r for r in engine.run([msg("a", N1), msg("b", N3)])}
        assert [live[i]["source"] for i in "ab"] == ["api", "api"]
        assert "age_s" not in live["a"] and "age_s" not in live["b"]
        now[0] += 42.5
        with Filter(settings, sources=[source, *ledger]) as engine:
            cached = {r["id"]: r for r in engine.run([msg("a", N1), msg("b", N3)])}
        assert [(cached[i]["source"], cached[i]["age_s"]) for i in "ab"] == [
            ("cache", 42.5),
            ("cache", 42.5),
        ]
        assert cached["a"]["checked_at"] == live["a"]["checked_at"]  # when it was fetched
        source.sync("sms")
        now[0] += 7.25
        with Filter(settings, sources=[source, *ledger]) as engine:
            synced = list(engine.run([msg("d", "+919812300009", fallback=["voice"])]))
        assert (synced[0]["source"], synced[0]["age_s"]) == ("snapshot", 7.25)
    finally:
        source.close()


def test_the_command_line_summary_counts_verdicts_by_source(
    simulator: Simulator, sqlite_place: LedgerPlace, tmp_path: Path
) -> None:
    env = subprocess_env(
        simulator,
        BLOCKFILTER_OPTOUT_URL=sqlite_place.url,
        BLOCKFILTER_OPTOUT_KEY=KEY_A,
        BLOCKFILTER_LOAD_PLUGINS="",
    )
    assert _cli(["optout", "add", "--channel", "sms", N1], env).returncode == 0
    campaign = tmp_path / "campaign.jsonl"
    campaign.write_text(
        "".join(json.dumps(msg(str(i), n)) + "\n" for i, n in enumerate([N1, N2, N3]))
    )
    summary = tmp_path / "summary.json"
    done = _cli(["filter", str(campaign), "--out", str(tmp_path / "out.jsonl"),
                 "--summary-json", str(summary)], env)  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    assert "decided by: api 2, ledger 1" in done.stderr.decode()
    assert json.loads(summary.read_text())["sources"] == {
        "api": {"allowed": 2},
        "ledger": {"blocked": 1},
    }
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert lines[0]["ledger_event"]["source"] == "operator"


def test_a_verdict_the_dispatch_fence_turns_names_the_event_and_drops_the_cache_age(
    simulator: Simulator, sqlite_place: LedgerPlace
) -> None:
    from blockfilter.ledger.source import dispatch_gate

    settings = settings_for(simulator, sqlite_place)
    pm = make_plugin_manager(settings)
    with build_filter(settings, pm) as engine:
        list(engine.run([msg("a", N1)]))
    with build_filter(settings, pm) as engine:
        results = list(engine.run([msg("a", N1)]))
        summary = engine.summary.as_dict()
    assert (results[0]["source"], results[0]["verdict"]) == ("cache", "allowed")
    assert "age_s" in results[0]
    checked = results[0]["checked_at"]
    # The opt-out lands while the task is between its check and its dispatch.
    add_optouts([N1], "sms", by="ops", settings=settings)
    with dispatch_gate(pm, settings, results, summary):
        pass
    from blockfilter.ledger.ledger import shared_ledger

    event = shared_ledger(settings).state(N1)["sms"]
    assert event is not None
    result = results[0]
    assert (result["verdict"], result["reason"], result["source"]) == (
        "blocked",
        "blocklisted",
        "ledger",
    )
    assert "age_s" not in result  # the cache no longer explains the verdict
    assert result["ledger_event"] == event.describe()
    assert result["checked_at"] > checked  # when the fence read the ledger
    assert summary["sources"] == {"ledger": {"blocked": 1}}


class _AnswersNothing:
    """A source that skips every number: a bug, or an answer lost on its way."""

    name = "skipper"

    def check_many(self, wanted):
        return iter(())

    def stats(self):
        from blockfilter.sources import SourceStats

        return SourceStats()


def test_the_ledger_answers_only_its_opt_outs_so_a_number_nobody_else_answered_is_unchecked(
    simulator: Simulator, sqlite_place: LedgerPlace
) -> None:
    settings = settings_for(simulator, sqlite_place)
    add_optouts([N2], "sms", by="ops", settings=settings)  # a ledger that holds something
    with Filter(settings, sources=[_AnswersNothing(), *_ledger_sources(settings)]) as engine:
        found = {
            r["id"]: (r["verdict"], r.get("reason"))
            for r in engine.run([msg("a", N1), msg("b", N2)])
        }
    # The ledger knows nothing of N1: that is no clean answer, and no other source gave one.
    assert found == {"a": ("deferred", "check_failed"), "b": ("blocked", "blocklisted")}


def _refuse_reads(monkeypatch: pytest.MonkeyPatch, settings) -> None:
    from blockfilter.ledger.ledger import shared_ledger

    def read(wanted):
        raise AssertionError("a ledger never written was read")

    monkeypatch.setattr(shared_ledger(settings), "opted_out", read)


def test_a_ledger_never_written_is_not_read_by_the_filter_nor_the_dispatch_gate(
    simulator: Simulator, sqlite_place: LedgerPlace, monkeypatch: pytest.MonkeyPatch
) -> None:
    from blockfilter.ledger.source import dispatch_gate

    settings = settings_for(simulator, sqlite_place)
    _refuse_reads(monkeypatch, settings)
    (source,) = _ledger_sources(settings)
    stream = source.stream()
    stream.add("sms", [N1, N2])
    assert list(stream.finish()) == []  # no opt-out to answer, no read
    assert source.stats().numbers_checked == 2
    pm = make_plugin_manager(settings)
    with build_filter(settings, pm) as engine:
        results = list(engine.run([msg("a", N1)]))
        summary = engine.summary.as_dict()
    assert results[0]["verdict"] == "allowed"
    with dispatch_gate(pm, settings, results, summary):
        pass
    assert results[0]["verdict"] == "allowed"
