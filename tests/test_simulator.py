"""The Kaleyra simulator, exercised over real HTTP the way a client (or a user with curl) would."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest
import requests

from blockfilter.testing.simulator import (
    FAULT_KINDS,
    FaultRule,
    RemoteSimulator,
    Simulator,
    parse_fault_spec,
)
from tests.support.env import subprocess_env

SID = "SIDTEST01"
KEY = "sim-key-0123456789abcdef"
N1, N2, N3 = "+918020000052", "+918020000053", "+918020000054"


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator({"sms": [N1], "whatsapp": [N2]}, sid=SID, api_key=KEY) as simulator:
        yield simulator


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


def api_url(target: Simulator | str, sid: str = SID) -> str:
    """The endpoint of a simulator object, or of one known by its base URL."""
    base_url = target if isinstance(target, str) else target.base_url
    return f"{base_url}/v1/{sid}/contacts/blocklisted"


def get(
    session: requests.Session,
    simulator: Simulator | str,
    *,
    key: str | None = KEY,
    sid: str = SID,
    timeout: float | tuple[float, float] = 5,
    stream: bool = False,
    **params: Any,
) -> requests.Response:
    headers = {} if key is None else {"api-key": key}
    return session.get(
        api_url(simulator, sid), params=params, headers=headers, timeout=timeout, stream=stream
    )


def code_of(response: requests.Response) -> str:
    return str(response.json()["code"])


# ---------------------------------------------------------------------------------------------
# Authentication
# ---------------------------------------------------------------------------------------------


def test_right_credentials_get_an_answer(sim: Simulator, http: requests.Session) -> None:
    response = get(http, sim, channel="sms", mobile=N1)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {
        "code": "CNT196",
        "data": [{"mobile": N1, "channel_type": "3"}],
        "error": {},
    }


@pytest.mark.parametrize(
    ("sid", "key"),
    [(SID, "wrong-key"), ("OTHERSID", KEY), (SID, None), (SID, "")],
    ids=["wrong key", "wrong SID", "missing key", "empty key"],
)
def test_wrong_credentials_get_rbc001(
    sim: Simulator, http: requests.Session, sid: str, key: str | None
) -> None:
    response = get(http, sim, sid=sid, key=key, channel="sms", mobile=N1)
    assert response.status_code == 401
    body = response.json()
    assert body["code"] == "RBC001"
    assert body["data"] == []
    assert body["message"]
    assert isinstance(body["error"], dict) and body["error"]


def test_unconfigured_credentials_accept_any_non_empty_pair(http: requests.Session) -> None:
    with Simulator({"sms": [N1]}) as simulator:
        assert get(http, simulator, sid="ANY", key="whatever", channel="sms").status_code == 200
        missing = get(http, simulator, sid="ANY", key=None, channel="sms")
        assert (missing.status_code, code_of(missing)) == (401, "RBC001")
        empty_sid = http.get(
            f"{simulator.base_url}/v1//contacts/blocklisted",
            params={"channel": "sms"},
            headers={"api-key": "k"},
            timeout=5,
        )
        assert (empty_sid.status_code, code_of(empty_sid)) == (401, "RBC001")


def test_repr_never_shows_the_key(sim: Simulator) -> None:
    assert KEY not in repr(sim)
    assert sim.base_url in repr(sim)


# ---------------------------------------------------------------------------------------------
# Validation and lookups
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channel", [None, "", "SMS", "email", "rcs"])
def test_unknown_channel_is_wa400(sim: Simulator, http: requests.Session, channel: str) -> None:
    params = {} if channel is None else {"channel": channel}
    response = get(http, sim, mobile=N1, **params)
    assert (response.status_code, code_of(response)) == (400, "WA400")


def test_lookup_returns_only_the_blocklisted_numbers_of_that_channel(
    sim: Simulator, http: requests.Session
) -> None:
    sim.block("voice", N3)
    sms = get(http, sim, channel="sms", mobile=f"{N1},{N2},{N3}").json()
    assert sms == {"code": "CNT196", "data": [{"mobile": N1, "channel_type": "3"}], "error": {}}
    whatsapp = get(http, sim, channel="whatsapp", mobile=f"{N1},{N2},{N3}").json()
    assert whatsapp["data"] == [{"mobile": N2, "channel_type": "5"}]
    voice = get(http, sim, channel="voice", mobile=f"{N1},{N2},{N3}").json()
    assert voice["data"] == [{"mobile": N3, "channel_type": "2"}]
    clean = get(http, sim, channel="sms", mobile=N3)
    assert (clean.status_code, clean.json()["data"]) == (200, [])


def test_block_and_unblock_take_effect_at_once(sim: Simulator, http: requests.Session) -> None:
    sim.block("sms", N3)
    assert [d["mobile"] for d in get(http, sim, channel="sms", mobile=N3).json()["data"]] == [N3]
    sim.unblock("sms", N3, "+919999999999")  # unblocking an absent number is fine
    assert get(http, sim, channel="sms", mobile=N3).json()["data"] == []
    with pytest.raises(ValueError, match="E.164"):
        sim.block("sms", "918020000052")
    with pytest.raises(ValueError, match="channel"):
        sim.block("fax", N1)


def test_hundred_numbers_pass_and_a_hundred_and_one_are_wa400(
    sim: Simulator, http: requests.Session
) -> None:
    numbers = [f"+4477001{i:05d}" for i in range(101)]
    sim.block("sms", numbers[0], numbers[99], numbers[100])
    ok = get(http, sim, channel="sms", mobile=",".join(numbers[:100]))
    assert ok.status_code == 200
    assert [d["mobile"] for d in ok.json()["data"]] == [numbers[0], numbers[99]]
    too_many = get(http, sim, channel="sms", mobile=",".join(numbers))
    assert (too_many.status_code, code_of(too_many)) == (400, "WA400")


@pytest.mark.parametrize(
    "mobile",
    [
        "918020000052",
        "+9180200",
        "+9180200000521234",
        "+91-8020000052",
        f"{N1},",
        "",
        f"{N1}, {N2}",
    ],
)
def test_malformed_numbers_are_wa400(sim: Simulator, http: requests.Session, mobile: str) -> None:
    response = get(http, sim, channel="sms", mobile=mobile)
    assert (response.status_code, code_of(response)) == (400, "WA400")


def test_plus_must_be_sent_as_percent_2b(sim: Simulator, http: requests.Session) -> None:
    headers = {"api-key": KEY}
    raw_plus = http.get(f"{api_url(sim)}?channel=sms&mobile={N1}", headers=headers, timeout=5)
    # The raw "+" decodes to a space: the client bug shows up as WA400, not as "not blocked".
    assert (raw_plus.status_code, code_of(raw_plus)) == (400, "WA400")
    encoded = N1.replace("+", "%2B")
    good = http.get(f"{api_url(sim)}?channel=sms&mobile={encoded}", headers=headers, timeout=5)
    assert good.json()["data"] == [{"mobile": N1, "channel_type": "3"}]


def test_repeated_parameters_are_wa400(sim: Simulator, http: requests.Session) -> None:
    response = http.get(
        api_url(sim),
        params=[("channel", "sms"), ("mobile", N1), ("mobile", N2)],
        headers={"api-key": KEY},
        timeout=5,
    )
    assert (response.status_code, code_of(response)) == (400, "WA400")


def test_whole_blocklist_pages_by_limit_and_offset(http: requests.Session) -> None:
    numbers = [f"+4477009{i:05d}" for i in range(250)]
    with Simulator({"sms": reversed(numbers), "voice": [N1]}, sid=SID, api_key=KEY) as simulator:
        seen: list[str] = []
        pages = []
        offset = 0
        while True:
            page = get(http, simulator, channel="sms", limit=100, offset=offset).json()["data"]
            pages.append(len(page))
            seen += [entry["mobile"] for entry in page]
            if len(page) < 100:
                break
            offset += 100
        assert pages == [100, 100, 50]
        assert seen == sorted(numbers)
        default_page = get(http, simulator, channel="sms").json()["data"]
        assert [d["mobile"] for d in default_page] == sorted(numbers)[:100]
        small = get(http, simulator, channel="sms", limit=7, offset=245).json()["data"]
        assert [d["mobile"] for d in small] == sorted(numbers)[245:]
        past_end = get(http, simulator, channel="sms", offset=1000)
        assert (past_end.status_code, past_end.json()["data"]) == (200, [])
        for bad in ({"limit": 101}, {"limit": 0}, {"limit": "ten"}, {"offset": -1}):
            response = get(http, simulator, channel="sms", **bad)
            assert (response.status_code, code_of(response)) == (400, "WA400"), bad


def test_wrong_path_is_404_and_counted(sim: Simulator, http: requests.Session) -> None:
    response = http.get(f"{sim.base_url}/v2/{SID}/contacts", headers={"api-key": KEY}, timeout=5)
    assert response.status_code == 404
    assert sim.stats.by_outcome == {"not_found": 1}


def test_connections_are_kept_alive(sim: Simulator) -> None:
    host, port = sim.base_url.removeprefix("http://").split(":")
    conn = HTTPConnection(host, int(port), timeout=5)
    try:
        sockets = []
        for _ in range(3):
            conn.request(
                "GET",
                f"/v1/{SID}/contacts/blocklisted?channel=sms&mobile=%2B918020000052",
                headers={"api-key": KEY},
            )
            reply = conn.getresponse()
            assert reply.status == 200 and not reply.will_close
            reply.read()
            sockets.append(conn.sock)
        assert sockets[0] is not None and all(s is sockets[0] for s in sockets)
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------------

JSON_FAULTS = {
    "wa500": (500, "WA500"),
    "cnt195": (500, "CNT195"),
    "accepted": (202, "WA202"),
    "e110": (400, "E110"),
    "rbc001": (401, "RBC001"),
    "wa401": (401, "WA401"),
    "wa-401": (401, "WA-401"),
    "wa400": (400, "WA400"),
}


@pytest.mark.parametrize(("kind", "expected"), JSON_FAULTS.items(), ids=list(JSON_FAULTS))
def test_json_faults(
    sim: Simulator, http: requests.Session, kind: str, expected: tuple[int, str]
) -> None:
    sim.set_faults([FaultRule(kind)])
    response = get(http, sim, channel="sms", mobile=N1)
    assert (response.status_code, code_of(response)) == expected
    if kind == "accepted":
        assert response.json()["message_id"]
    assert sim.stats.by_outcome == {f"fault:{kind}": 1}


def test_http500_sends_html(sim: Simulator, http: requests.Session) -> None:
    sim.set_faults([FaultRule("http500")])
    response = get(http, sim, channel="sms", mobile=N1)
    assert response.status_code == 500
    assert response.headers["Content-Type"].startswith("text/html")
    assert response.text.lstrip().startswith("<html")


@pytest.mark.parametrize(("seconds", "header"), [(None, "1"), (3, "3"), (0.25, "0.25")])
def test_rate_limit_sends_retry_after(
    sim: Simulator, http: requests.Session, seconds: float | None, header: str
) -> None:
    sim.set_faults([FaultRule("rate_limit", seconds=seconds)])
    response = get(http, sim, channel="sms", mobile=N1)
    assert response.status_code == 429
    assert response.headers["Retry-After"] == header


def test_non_json_is_a_200_html_page(sim: Simulator, http: requests.Session) -> None:
    sim.set_faults([FaultRule("non_json")])
    response = get(http, sim, channel="sms", mobile=N1)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    with pytest.raises(ValueError):
        response.json()


def test_bad_shape_is_json_with_data_not_a_list(sim: Simulator, http: requests.Session) -> None:
    sim.set_faults([FaultRule("bad_shape")])
    response = get(http, sim, channel="sms", mobile=N1)
    assert response.status_code == 200
    assert not isinstance(response.json()["data"], list)


def test_timeout_sends_nothing_then_closes(sim: Simulator, http: requests.Session) -> None:
    sim.set_faults([FaultRule("timeout", seconds=1.0)])
    started = time.monotonic()
    with pytest.raises(requests.ReadTimeout):
        get(http, sim, channel="sms", mobile=N1, timeout=(2, 0.3))
    assert time.monotonic() - started < 0.9
    # A patient client sees the connection close after the fault's seconds, with no answer.
    started = time.monotonic()
    with pytest.raises(requests.ConnectionError), requests.Session() as other:
        get(other, sim, channel="sms", mobile=N1, timeout=5)
    assert 0.9 <= time.monotonic() - started < 3


def test_reset_sends_a_tcp_reset(sim: Simulator) -> None:
    sim.set_faults([FaultRule("reset")])
    host, port = sim.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        conn.sendall(
            f"GET /v1/{SID}/contacts/blocklisted?channel=sms HTTP/1.1\r\n"
            f"Host: {host}\r\napi-key: {KEY}\r\n\r\n".encode()
        )
        with pytest.raises(ConnectionResetError):
            # A FIN would read as b""; only a RST raises.
            while conn.recv(4096):
                pass
    assert sim.stats.by_outcome == {"fault:reset": 1}
    assert sim.stats.by_status == {0: 1}


def test_trickle_beats_a_read_timeout_but_not_a_deadline(
    sim: Simulator, http: requests.Session
) -> None:
    expected = get(http, sim, channel="sms", mobile=f"{N1},{N2}").json()
    sim.set_faults([FaultRule("trickle", seconds=1.0)])
    started = time.monotonic()
    # Read timeout 0.4 s: every gap between chunks is shorter, so it never fires...
    with get(http, sim, channel="sms", mobile=f"{N1},{N2}", timeout=(2, 0.4), stream=True) as r:
        headers_at = time.monotonic() - started
        first_byte = r.raw.read(1)
        first_byte_at = time.monotonic() - started
        body = first_byte + r.raw.read()
    total = time.monotonic() - started
    assert r.status_code == 200
    assert json.loads(body) == expected
    assert headers_at < 0.4 and first_byte_at < 0.4
    # ...yet the answer took longer than it: only a total deadline would have caught it.
    assert total >= 0.9


def test_every_fault_kind_is_tested() -> None:
    tested = set(JSON_FAULTS) | {"http500", "rate_limit", "non_json", "bad_shape"}
    tested |= {"timeout", "reset", "trickle"}
    assert tested == set(FAULT_KINDS)


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------


def statuses(session: requests.Session, simulator: Simulator, n: int, **params: Any) -> list[int]:
    params.setdefault("channel", "sms")
    return [get(session, simulator, mobile=N1, **params).status_code for _ in range(n)]


def test_every_n_fires_on_requests_n_2n_3n(sim: Simulator, http: requests.Session) -> None:
    sim.set_faults([parse_fault_spec("wa500:every=3")])
    assert statuses(http, sim, 9) == [200, 200, 500] * 3


def test_first_n_then_normal(sim: Simulator, http: requests.Session) -> None:
    sim.set_faults([parse_fault_spec("rate_limit:first=2,seconds=1")])
    assert statuses(http, sim, 4) == [429, 429, 200, 200]
    sim.set_faults([parse_fault_spec("rate_limit:first=1")])  # a new schedule counts afresh
    assert statuses(http, sim, 2) == [429, 200]


def test_probability_is_seeded_and_repeatable(http: requests.Session) -> None:
    def pattern(seed: int, probability: float) -> list[int]:
        rule = FaultRule("wa500", probability=probability)
        with Simulator(sid=SID, api_key=KEY, faults=[rule], seed=seed) as simulator:
            return statuses(http, simulator, 120)

    first = pattern(7, 0.3)
    assert first == pattern(7, 0.3)
    assert first != pattern(8, 0.3)
    assert 15 <= first.count(500) <= 60
    assert set(pattern(1, 0.0)) == {200}
    assert set(pattern(1, 1.0)) == {500}


def test_first_matching_rule_wins(sim: Simulator, http: requests.Session) -> None:
    sim.set_faults([FaultRule("wa500", every=2), FaultRule("rate_limit")])
    assert statuses(http, sim, 4) == [429, 500, 429, 500]


def test_channel_limited_rule(sim: Simulator, http: requests.Session) -> None:
    sim.set_faults([parse_fault_spec("cnt195:always,channel=whatsapp")])
    assert statuses(http, sim, 2, channel="sms") == [200, 200]
    assert statuses(http, sim, 2, channel="whatsapp") == [500, 500]


def test_latency_delays_every_answer(sim: Simulator, http: requests.Session) -> None:
    sim.set_latency(0.3)
    started = time.monotonic()
    assert get(http, sim, channel="sms", mobile=N1).status_code == 200
    assert time.monotonic() - started >= 0.3


@pytest.mark.parametrize(
    ("spec", "rule"),
    [
        ("wa500:every=3", FaultRule("wa500", every=3)),
        ("rate_limit:first=2,seconds=1", FaultRule("rate_limit", first=2, seconds=1)),
        ("timeout:always,seconds=2", FaultRule("timeout", seconds=2)),
        ("reset:probability=0.05", FaultRule("reset", probability=0.05)),
        ("WA-401:channel=SMS", FaultRule("wa-401", channel="sms")),
        ("trickle", FaultRule("trickle")),
    ],
)
def test_parse_fault_spec(spec: str, rule: FaultRule) -> None:
    assert parse_fault_spec(spec) == rule


@pytest.mark.parametrize(
    "spec",
    [
        "explode",
        "wa500:every=0",
        "wa500:every=x",
        "wa500:every=2,first=1",
        "wa500:colour=red",
        "reset:probability=2",
        "wa500:channel=fax",
        "timeout:seconds",
    ],
)
def test_bad_fault_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_fault_spec(spec)


# ---------------------------------------------------------------------------------------------
# Counters
# ---------------------------------------------------------------------------------------------


def test_counters(sim: Simulator, http: requests.Session) -> None:
    before = time.time()
    get(http, sim, channel="sms", mobile=f"{N1},{N2},{N3}")
    get(http, sim, channel="whatsapp", mobile=N2)
    get(http, sim, channel="sms", key="bad", mobile=f"{N1},{N2}")
    get(http, sim, channel="voice")
    stats = sim.stats
    assert stats.requests == 4
    assert stats.numbers_asked == 6
    assert stats.max_numbers_per_request == 3
    assert stats.requests_by_channel == {"sms": 2, "whatsapp": 1, "voice": 1}
    assert stats.by_outcome == {"ok": 3, "RBC001": 1}
    assert stats.by_status == {200: 3, 401: 1}
    assert [(c, n, s) for _, c, n, s in stats.records] == [
        ("sms", 3, 200),
        ("whatsapp", 1, 200),
        ("sms", 2, 401),
        ("voice", 0, 200),
    ]
    assert all(before <= ts <= time.time() for ts, *_ in stats.records)
    assert stats.in_flight == 0
    sim.reset_stats()
    assert sim.stats.requests == 0 and sim.stats.records == []


def test_in_flight_under_latency(sim: Simulator) -> None:
    sim.set_latency(0.4)
    barrier = threading.Barrier(4)
    codes: list[int] = []

    def call() -> None:
        with requests.Session() as session:
            barrier.wait()
            codes.append(get(session, sim, channel="sms", mobile=N1).status_code)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert codes == [200] * 4
    stats = sim.stats
    assert stats.max_in_flight == 4
    assert 3.0 <= stats.mean_in_flight <= 4.0

    # One at a time: never more than one in flight, and about one on average.
    sim.reset_stats()
    sim.set_latency(0.1)
    with requests.Session() as session:
        statuses(session, sim, 3)
    stats = sim.stats
    assert stats.max_in_flight == 1
    assert 0.6 <= stats.mean_in_flight <= 1.0


def test_reset_stats_while_a_request_is_in_flight(sim: Simulator) -> None:
    sim.set_faults([FaultRule("timeout", seconds=0.5)])
    errors: list[BaseException] = []

    def call() -> None:
        try:
            with requests.Session() as session:
                get(session, sim, channel="sms")
        except requests.RequestException as exc:
            errors.append(exc)

    client = threading.Thread(target=call, daemon=True)
    client.start()
    wait_until(lambda: sim.stats.in_flight == 1)
    sim.reset_stats()
    assert (sim.stats.requests, sim.stats.in_flight, sim.stats.max_in_flight) == (0, 1, 1)
    client.join(5)
    assert isinstance(errors[0], requests.ConnectionError)  # the timeout fault answered nothing
    # The old request ends without polluting the new window, and the count goes back to 0.
    stats = sim.stats
    assert (stats.in_flight, stats.requests, stats.by_outcome, stats.records) == (0, 0, {}, [])


# ---------------------------------------------------------------------------------------------
# Admin API and remote control
# ---------------------------------------------------------------------------------------------


def test_admin_api_round_trip(sim: Simulator, http: requests.Session) -> None:
    remote = RemoteSimulator(sim.base_url)
    remote.set_faults(["wa500:first=1", {"kind": "rate_limit", "every": 3, "seconds": 0.5}])
    assert [r.kind for r in remote.faults()] == ["wa500", "rate_limit"]
    assert statuses(http, sim, 3) == [500, 200, 429]

    remote.block("voice", N3)
    remote.unblock("sms", N1)
    assert get(http, sim, channel="voice", mobile=N3).json()["data"][0]["mobile"] == N3
    assert get(http, sim, channel="sms", mobile=N1).json()["data"] == []

    stats = remote.stats
    assert stats.requests == 5
    assert stats.by_outcome == {"fault:wa500": 1, "fault:rate_limit": 1, "ok": 3}
    assert stats.records == []  # records only when asked for
    assert [s for *_, s in remote.fetch_stats(records=True).records] == [500, 200, 429, 200, 200]
    raw = http.get(f"{sim.base_url}/_sim/stats", timeout=5).json()
    assert "records" not in raw and raw["requests"] == 5

    remote.set_latency(0.2)
    assert sim.latency == 0.2 and [r.kind for r in sim.faults] == ["wa500", "rate_limit"]
    remote.clear_faults()
    remote.reset_stats()
    assert remote.stats.requests == 0
    assert sim.faults == []


def test_admin_api_rejects_bad_requests(sim: Simulator, http: requests.Session) -> None:
    bad_json = http.post(f"{sim.base_url}/_sim/faults", data=b"{nope", timeout=5)
    assert bad_json.status_code == 400
    bad_rule = http.post(f"{sim.base_url}/_sim/faults", json={"rules": ["boom"]}, timeout=5)
    assert bad_rule.status_code == 400
    bad_number = http.post(
        f"{sim.base_url}/_sim/blocklist", json={"add": [["sms", "12345"]]}, timeout=5
    )
    assert bad_number.status_code == 400
    assert http.get(f"{sim.base_url}/_sim/nothing", timeout=5).status_code == 404
    remote = RemoteSimulator(sim.base_url)
    with pytest.raises(RuntimeError, match="400"):
        remote.block("sms", "12345")
    with pytest.raises(ValueError, match="colour"):
        remote.set_faults([{"kind": "wa500", "colour": "red"}])
    assert sim.faults == [] and sim.stats.requests == 0  # admin calls are not API requests


# ---------------------------------------------------------------------------------------------
# Blocklist files
# ---------------------------------------------------------------------------------------------


def test_load_blocklist_file(tmp_path: Path, http: requests.Session) -> None:
    path = tmp_path / "blocked.csv"
    path.write_text(f"# opted out\n\nsms,{N1}\n  WhatsApp , {N2}  \nvoice,{N3}\n")
    with Simulator(sid=SID, api_key=KEY) as simulator:
        simulator.load_blocklist_file(path)
        for channel, number in (("sms", N1), ("whatsapp", N2), ("voice", N3)):
            data = get(http, simulator, channel=channel, mobile=f"{N1},{N2},{N3}").json()["data"]
            assert [d["mobile"] for d in data] == [number]


@pytest.mark.parametrize(
    "bad_line", ["sms 918020000052", "fax,+918020000052", "sms,918020000052", "sms,"]
)
def test_bad_blocklist_line_names_its_number(tmp_path: Path, bad_line: str) -> None:
    path = tmp_path / "blocked.csv"
    path.write_text(f"# header\nsms,{N1}\n{bad_line}\n")
    with pytest.raises(ValueError, match="line 3"):
        Simulator().load_blocklist_file(path)


# ---------------------------------------------------------------------------------------------
# Stopping
# ---------------------------------------------------------------------------------------------


def wait_until(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_stop_is_prompt_while_a_timeout_holds_a_connection() -> None:
    simulator = Simulator(sid=SID, api_key=KEY, faults=[FaultRule("timeout", seconds=30)]).start()
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            with requests.Session() as session:
                get(session, simulator, channel="sms", timeout=60)
        except requests.RequestException as exc:
            outcome.append(exc)

    client = threading.Thread(target=call, daemon=True)
    client.start()
    wait_until(lambda: simulator.stats.in_flight == 1)
    started = time.monotonic()
    simulator.stop()
    assert time.monotonic() - started < 1.0
    client.join(3)
    assert not client.is_alive()
    assert isinstance(outcome[0], requests.ConnectionError)


def test_stop_closes_pooled_connections(http: requests.Session) -> None:
    simulator = Simulator(sid=SID, api_key=KEY).start()
    assert get(http, simulator, channel="sms").status_code == 200
    simulator.stop()
    simulator.stop()  # idempotent
    with pytest.raises(requests.ConnectionError):
        get(http, simulator, channel="sms", timeout=2)


# ---------------------------------------------------------------------------------------------
# The command-line entry and the pytest plugin, each in its own process
# ---------------------------------------------------------------------------------------------


RUN_SIMULATOR = textwrap.dedent(
    """
    import sys
    from blockfilter.testing.simulator import run_simulator
    run_simulator("127.0.0.1", 0, sys.argv[1], ["wa500:first=1"], 0.0,
                  lambda url: print(url, flush=True))
    print("stopped", flush=True)
    """
)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_run_simulator_serves_until_signalled(
    tmp_path: Path, http: requests.Session, stop_signal: int
) -> None:
    blocked = tmp_path / "blocked.csv"
    blocked.write_text(f"sms,{N1}\n")
    process = subprocess.Popen(
        [sys.executable, "-c", RUN_SIMULATOR, str(blocked)],
        env=subprocess_env(KALEYRA_SID=SID, KALEYRA_API_KEY=KEY),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        base_url = process.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:")
        assert get(http, base_url, channel="sms", mobile=N1).status_code == 500  # wa500:first=1
        answer = get(http, base_url, channel="sms", mobile=f"{N1},{N2}")
        assert answer.json()["data"] == [{"mobile": N1, "channel_type": "3"}]
        assert get(http, base_url, key="other-key", channel="sms").status_code == 401
        assert RemoteSimulator(base_url).stats.requests == 3
        process.send_signal(stop_signal)
        # A guard against a hang, not a deadline: on a loaded machine (the fast tier runs on
        # four workers) an interpreter may take seconds to get the CPU and wind down.
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    assert out.strip() == "stopped"
    assert "Traceback" not in err


def test_pytest_plugin_fixtures(tmp_path: Path) -> None:
    (tmp_path / "test_uses_plugin.py").write_text(
        textwrap.dedent(
            """
            import os
            import requests

            def test_env(kaleyra_env):
                assert os.environ["KALEYRA_BASE_URL"] == kaleyra_env.base_url
                kaleyra_env.block("sms", "+918020000052")
                r = requests.get(
                    os.environ["KALEYRA_BASE_URL"] + "/v1/" + os.environ["KALEYRA_SID"]
                    + "/contacts/blocklisted",
                    params={"channel": "sms", "mobile": "+918020000052"},
                    headers={"api-key": os.environ["KALEYRA_API_KEY"]},
                    timeout=5,
                )
                assert r.json()["data"][0]["mobile"] == "+918020000052"
                assert kaleyra_env.stats.requests == 1

            def test_simulator_is_fresh_and_checks_the_key(kaleyra_simulator):
                assert kaleyra_simulator.stats.requests == 0
                r = requests.get(
                    kaleyra_simulator.base_url + "/v1/TESTSID/contacts/blocklisted",
                    params={"channel": "sms"}, headers={"api-key": "wrong"}, timeout=5,
                )
                assert r.status_code == 401
            """
        )
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "blockfilter.testing.pytest_plugin",
            "-p",
            "no:cacheprovider",
            str(tmp_path),
        ],
        cwd=tmp_path,
        env=subprocess_env(PYTEST_DISABLE_PLUGIN_AUTOLOAD="1"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout
