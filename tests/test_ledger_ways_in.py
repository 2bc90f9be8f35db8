"""The three ways in as Python functions: send results (each built-in code mapping), inbound
replies (keywords, locales, the free-text hook, one confirmation), operators."""

from __future__ import annotations

import pytest

from blockfilter.config import load_settings
from blockfilter.ledger import add_optouts, inbound, remove_optouts, report_send_results
from blockfilter.ledger.keywords import Keywords
from blockfilter.ledger.ledger import forget_shared_ledgers, shared_ledger
from blockfilter.plugins.hookspecs import hookimpl
from blockfilter.plugins.manager import make_plugin_manager
from tests.ledger_support import KEY_A, LedgerPlace

N1, N2 = "+919812300001", "+919812300002"


@pytest.fixture(autouse=True)
def _fresh_ledgers():
    yield
    forget_shared_ledgers()


def settings_for(place: LedgerPlace, **more: object):
    return load_settings(
        environ={}, optout_url=place.url, optout_key=KEY_A, load_plugins=[], **more
    )


def opted_out(settings, number: str, channel: str = "sms") -> bool:
    return number in shared_ledger(settings).opted_out({channel: [number]})[channel]


BUILTIN = [
    ("kaleyra", {"status": "NOT-SENT", "code": "OPT-OUT"}),
    ("kaleyra", {"code": "NOT-SENT/BLACKLIST"}),
    ("kaleyra", {"code": "DND-NUMB"}),
    ("kaleyra", {"code": "con-dnd"}),
    ("kaleyra", {"code": "NOT-OPTIN"}),
    ("kaleyra", {"code": "OUTPUT-REJ"}),
    ("twilio", {"error_code": 21610}),
    ("twilio", {"code": "21610"}),
    ("telnyx", {"code": "40300"}),
    ("vonage", {"code": 9}),
]


@pytest.mark.parametrize(("provider", "fields"), BUILTIN)
def test_each_built_in_code_records_an_opt_out(
    sqlite_place: LedgerPlace, provider: str, fields: dict[str, object]
) -> None:
    settings = settings_for(sqlite_place)
    result = {"to": N1, "channel": "sms", "provider": provider, **fields}
    report = report_send_results([result], settings=settings)
    assert (report.opted_out, report.ignored, report.invalid) == (1, 0, 0)
    assert opted_out(settings, N1)
    assert not opted_out(settings, N1, "whatsapp")


@pytest.mark.parametrize(
    ("provider", "fields"),
    [
        ("kaleyra", {"status": "DELIVRD"}),
        ("kaleyra", {"code": "NOT-SENT/INV-NUMBER"}),
        ("twilio", {"error_code": 30003}),
        ("telnyx", {"code": "40001"}),
        ("vonage", {"code": 0}),
        ("acme", {"code": "OPT-OUT"}),  # another provider's codes are its own
    ],
)
def test_other_codes_are_recorded_nowhere(
    sqlite_place: LedgerPlace, provider: str, fields: dict[str, object]
) -> None:
    settings = settings_for(sqlite_place)
    report = report_send_results(
        [{"to": N1, "channel": "sms", "provider": provider, **fields}], settings=settings
    )
    assert (report.opted_out, report.ignored) == (0, 1)
    assert not sqlite_place.path.exists() or shared_ledger(settings).store.all_events() == []


def test_a_bad_result_is_reported_by_index_and_the_rest_recorded(place: LedgerPlace) -> None:
    settings = settings_for(place)
    report = report_send_results(
        [
            {"to": "12", "channel": "sms", "provider": "twilio", "code": 21610},
            {"to": N1, "channel": "fax", "provider": "twilio", "code": 21610},
            "not a dict",
            {"to": N2, "channel": "sms", "provider": "twilio", "code": 21610, "id": "SM1"},
            {"to": N2, "channel": "sms", "provider": "twilio", "code": 21610, "id": "SM1"},
        ],
        settings=settings,
    )
    assert report.as_dict() == {
        "total": 5,
        "opted_out": 1,
        "ignored": 0,
        "duplicates": 1,
        "invalid": 3,
        "errors": [
            {"index": 0, "reason": "invalid_number"},
            {"index": 1, "reason": "channel must be one of sms, whatsapp, voice"},
            {"index": 2, "reason": "a send result is a JSON object"},
        ],
    }
    assert N2 not in str(report.as_dict()) and N1 not in str(report.as_dict())
    assert opted_out(settings, N2)


class _AcmeCodes:
    @hookimpl
    def blockfilter_optout_codes(self, provider: str):
        if provider == "acme":
            return {"E-UNSUB": True}
        if provider == "kaleyra":
            return {"DND-NUMB": False}  # this pipeline sends transactional SMS to DND numbers
        return None


def test_a_plugin_adds_and_overrides_codes(sqlite_place: LedgerPlace) -> None:
    settings = settings_for(sqlite_place)
    pm = make_plugin_manager(settings)
    pm.register(_AcmeCodes(), name="acme-codes")
    report = report_send_results(
        [
            {"to": N1, "channel": "sms", "provider": "acme", "code": "e-unsub"},
            {"to": N2, "channel": "sms", "provider": "kaleyra", "code": "DND-NUMB"},
            {"to": N2, "channel": "sms", "provider": "kaleyra", "code": "OPT-OUT"},
        ],
        settings=settings,
        pm=pm,
    )
    assert (report.opted_out, report.ignored) == (2, 1)
    assert opted_out(settings, N1) and opted_out(settings, N2)


@pytest.mark.parametrize(
    "text",
    ["STOP", "stop", "  Stop. ", "STOPALL", "unsubscribe", "Cancel", "END", "quit!", "REVOKE",
     "OPTOUT", "opt out", "Opt-Out", "OPT  OUT"],
)  # fmt: skip
def test_opt_out_keywords_any_case_and_spacing(text: str) -> None:
    assert Keywords.from_settings(None, None).match(text) is not None
    assert Keywords.from_settings(None, None).match(text)[0] == "opt_out"  # type: ignore[index]


@pytest.mark.parametrize("text", ["START", "unstop", " yes "])
def test_opt_in_keywords(text: str) -> None:
    assert Keywords.from_settings(None, None).match(text)[0] == "opt_in"  # type: ignore[index]


@pytest.mark.parametrize("text", ["please stop", "STOP IT", "", "stopp", "don't stop"])
def test_free_text_is_no_keyword(text: str) -> None:
    assert Keywords.from_settings(None, None).match(text) is None


def test_keyword_lists_per_locale() -> None:
    keywords = Keywords.from_settings("es:ALTO,PARAR;en:STOP", "es:INICIO")
    assert keywords.match("alto", "es") == ("opt_out", "ALTO")
    assert keywords.match("alto", "fr") is None  # Spanish words are Spanish
    assert keywords.match("STOP", "es") == ("opt_out", "STOP")  # STOP always works
    assert keywords.match("end") is None  # the English list was replaced
    assert keywords.match("inicio", "es") == ("opt_in", "INICIO")
    with pytest.raises(ValueError, match="locale:WORD"):
        Keywords.from_settings("ALTO", None)


def test_a_stop_reply_records_and_confirms_once(place: LedgerPlace) -> None:
    settings = settings_for(place)
    first = inbound({"from": N1, "channel": "sms", "text": "Stop", "id": "in-1"}, settings=settings)
    assert first.as_dict() == {
        "action": "opt_out",
        "keyword": "STOP",
        "channel": "sms",
        "recorded": True,
        "confirm": True,
    }
    assert opted_out(settings, N1) and not opted_out(settings, N1, "voice")
    # The same reply again (a webhook retry): nothing new, no second confirmation.
    again = inbound({"from": N1, "channel": "sms", "text": "Stop", "id": "in-1"}, settings=settings)
    assert (again.recorded, again.confirm) == (False, False)
    # Another STOP: recorded, but the number was already out: no confirmation.
    more = inbound({"from": N1, "channel": "sms", "text": "STOP"}, settings=settings)
    assert (more.recorded, more.confirm) == (True, False)
    # START lifts it, and may be confirmed.
    back = inbound({"from": N1, "channel": "sms", "text": "start"}, settings=settings)
    assert (back.action, back.confirm) == ("opt_in", True)
    assert not opted_out(settings, N1)


def test_stopall_reaches_every_channel(sqlite_place: LedgerPlace) -> None:
    settings = settings_for(sqlite_place)
    result = inbound({"from": N1, "channel": "whatsapp", "text": "STOPALL"}, settings=settings)
    assert result.channel == "all"
    assert all(opted_out(settings, N1, c) for c in ("sms", "whatsapp", "voice"))


class _Intent:
    @hookimpl
    def blockfilter_inbound_intent(self, text: str, channel: str, locale: str | None):
        return "opt_out" if "no more" in text.lower() else None


def test_free_text_goes_to_the_intent_hook(sqlite_place: LedgerPlace) -> None:
    settings = settings_for(sqlite_place)
    pm = make_plugin_manager(settings)
    assert (
        inbound({"from": N1, "channel": "sms", "text": "hi"}, settings=settings, pm=pm).action
        is None
    )
    pm.register(_Intent(), name="intent")
    result = inbound(
        {"from": N1, "channel": "sms", "text": "No more texts please"}, settings=settings, pm=pm
    )
    assert (result.action, result.keyword, result.confirm) == ("opt_out", "intent", True)
    assert opted_out(settings, N1)


def test_an_unusable_reply_is_a_clear_error(sqlite_place: LedgerPlace) -> None:
    settings = settings_for(sqlite_place)
    for message, what in (
        ({"from": "12", "channel": "sms", "text": "STOP"}, "not a valid number"),
        ({"from": N1, "channel": "pager", "text": "STOP"}, "channel"),
        ({"from": N1, "channel": "sms"}, "text"),
    ):
        with pytest.raises(ValueError, match=what):
            inbound(message, settings=settings)


def test_operators_add_and_remove(place: LedgerPlace) -> None:
    settings = settings_for(place)
    done = add_optouts([N1, "098123 00002", "bogus"], "all", by="alice", region="IN",
                       reason="complaint", settings=settings)  # fmt: skip
    assert (done["recorded"], done["changed"], done["invalid"]) == (2, 2, 1)
    assert opted_out(settings, N2, "voice")
    state = shared_ledger(settings).state(N1)
    assert state["sms"] is not None and state["sms"].describe()["by"] == "alice"
    removed = remove_optouts([N1], "all", by="bob", settings=settings)
    assert removed["changed"] == 1
    assert not opted_out(settings, N1, "sms") and opted_out(settings, N2, "sms")


def test_the_tasks_hide_their_arguments_from_monitoring() -> None:
    from celery import Celery
    from celery.signals import before_task_publish

    import blockfilter.tasks  # noqa: F401  (registers the ledger's tasks and their guard)

    app = Celery("bftest-argsrepr", broker="memory://", backend="cache+memory://")
    # kombu's memory:// queues are shared by the whole process: a queue of this test's own, so
    # no later test that drains the default queue finds these tasks.
    app.conf.task_default_queue = "bftest-argsrepr"
    seen: dict[str, tuple[str, str]] = {}

    def capture(sender: str | None = None, headers: dict | None = None, **_: object) -> None:
        if headers is not None and sender is not None:
            seen[sender] = (headers.get("argsrepr"), headers.get("kwargsrepr"))

    before_task_publish.connect(capture)
    try:
        app.send_task("blockfilter.send_results", args=[[{"to": N1, "code": "OPT-OUT"}]])
        app.send_task("blockfilter.inbound", args=[{"from": N1, "text": "STOP"}])
        app.send_task("blockfilter.optout", args=[[N1], "sms"], kwargs={"by": N1})
    finally:
        before_task_publish.disconnect(capture)
        app.close()
    # Each shown as a summary (which one depends on the handlers registered), never the
    # number in any spelling.
    assert set(seen) == {"blockfilter.send_results", "blockfilter.inbound", "blockfilter.optout"}
    for argsrepr, kwargsrepr in seen.values():
        shown = f"{argsrepr} {kwargsrepr}"
        assert N1 not in shown and N1[1:] not in shown and N1[-8:] not in shown


def test_a_number_in_an_operators_words_is_stored_masked(place: LedgerPlace) -> None:
    settings = settings_for(place)
    add_optouts([N1], "sms", by=f"desk {N2}", reason=f"called from {N2}", settings=settings)
    event = shared_ledger(settings).state(N1)["sms"]
    assert event is not None
    shown = event.describe()
    assert shown["code"].startswith("called from +9198") and shown["by"].startswith("desk ")
    dump = place.dump()
    for form in (N2, N2[1:], N2[-8:]):
        assert form not in str(shown) and form not in dump
