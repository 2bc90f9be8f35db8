"""The Kaleyra client over real HTTP, against the simulator (and, for answers the simulator
cannot give, a small scripted HTTP server): error mapping, retries and their budget, batching,
paging, concurrency, timeouts, sessions and secrets."""

from __future__ import annotations

import json
import logging
import os
import random
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from blockfilter import __version__
from blockfilter.config import Settings, load_settings
from blockfilter.errors import (
    BadRequest,
    ConfigError,
    CredentialsRefused,
    FinalUpstreamError,
    RetryBudgetExhausted,
    TransientUpstreamError,
    UpstreamError,
)
from blockfilter.kaleyra.client import KaleyraClient, parse_retry_after
from blockfilter.kaleyra.transport import Urllib3Transport
from blockfilter.testing.simulator import FaultRule, Simulator
from tests.fakes import FakeTime
from tests.support.limiters import RecordingLimiter

SID = "CLIENTSID"
KEY = "sekrit-client-key-7f3a9c"  # distinctive, so a leak is easy to grep for
BLOCKED = "+918020000052"
CLEAN = "+918020000053"


def numbers(count: int, start: int = 0) -> list[str]:
    return [f"+9180{start + i:08d}" for i in range(count)]


def settings_for(base_url: str, **overrides: Any) -> Settings:
    """Test settings: tiny backoffs and timeouts, so failure cases finish well under a second."""
    values: dict[str, Any] = {
        "sid": SID,
        "api_key": KEY,
        "base_url": base_url,
        "retry_attempts": 3,
        "retry_deadline": 5.0,
        "backoff_base": 0.01,
        "backoff_max": 0.02,
        "retry_after_max": 1.0,
        "connect_timeout": 1.0,
        "request_timeout": 1.0,
    }
    values.update(overrides)
    return load_settings(environ={}, **values)


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(blocked={"sms": [BLOCKED]}, sid=SID, api_key=KEY) as simulator:
        yield simulator


@pytest.fixture
def make_client(sim: Simulator) -> Iterator[Callable[..., KaleyraClient]]:
    made: list[KaleyraClient] = []

    def make(**overrides: Any) -> KaleyraClient:
        limiter = overrides.pop("limiter", None)
        client = KaleyraClient(settings_for(sim.base_url, **overrides), limiter=limiter)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


# -- a scripted server, for answers the simulator has no fault for ------------------------------


@dataclass
class Scripted:
    """A real HTTP server answering from a list of (status, headers, body); the last repeats."""

    answers: list[tuple[int, dict[str, str], bytes]]
    seen: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    client_ports: list[int] = field(default_factory=list)
    base_url: str = ""

    def next_answer(self) -> tuple[int, dict[str, str], bytes]:
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def ok_body(*mobiles: str, code: str = "CNT196") -> bytes:
    data = [{"mobile": m, "channel_type": "3"} for m in mobiles]
    return json.dumps({"code": code, "data": data, "error": {}}).encode()


@pytest.fixture
def scripted() -> Iterator[Callable[..., Scripted]]:
    servers: list[ThreadingHTTPServer] = []

    def start(*answers: tuple[int, dict[str, str], bytes]) -> Scripted:
        script = Scripted(list(answers))

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                script.seen.append((self.path, dict(self.headers)))
                script.client_ports.append(self.client_address[1])
                status, headers, body = script.next_answer()
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}).start()
        servers.append(server)
        script.base_url = f"http://127.0.0.1:{server.server_address[1]}"
        return script

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


# -- answers and errors ------------------------------------------------------------------------


def test_answers_only_the_blocklisted_numbers(sim: Simulator, make_client) -> None:
    client = make_client()
    assert client.blocked_batch("SMS", [BLOCKED, CLEAN]) == {BLOCKED}
    assert client.blocked_batch("whatsapp", [BLOCKED, CLEAN]) == set()
    assert sim.stats.requests == 2
    assert client.stats.requests == 2
    assert client.stats.numbers_asked == 4


TRANSIENT_FAULTS = [
    (FaultRule("wa500"), "WA500"),
    (FaultRule("cnt195"), "CNT195"),
    (FaultRule("http500"), "http_500"),
    (FaultRule("rate_limit", seconds=0.01), "rate_limited"),
    (FaultRule("accepted"), "WA202"),
    (FaultRule("non_json"), "bad_body"),
    (FaultRule("bad_shape"), "bad_body"),
    (FaultRule("timeout", seconds=5), "timeout"),
    (FaultRule("reset"), "connection"),
]


@pytest.mark.parametrize(("rule", "code"), TRANSIENT_FAULTS, ids=lambda v: getattr(v, "kind", v))
def test_transient_failures_are_retried_until_the_budget_is_spent(
    sim: Simulator, make_client, rule: FaultRule, code: str
) -> None:
    client = make_client(retry_attempts=3, request_timeout=0.3)
    sim.set_faults([rule])
    with pytest.raises(RetryBudgetExhausted) as caught:
        client.blocked_batch("sms", [BLOCKED, CLEAN])
    assert caught.value.attempts == 3
    assert caught.value.code == code
    assert caught.value.last_error.code == code
    assert isinstance(caught.value.last_error, TransientUpstreamError)
    assert sim.stats.requests == 3
    assert client.stats.requests == 3
    assert client.stats.retries == 2
    assert client.stats.failures_by_code == {code: 3}


@pytest.mark.parametrize(("rule", "code"), TRANSIENT_FAULTS, ids=lambda v: getattr(v, "kind", v))
def test_a_transient_failure_then_success_gives_the_answer(
    sim: Simulator, make_client, rule: FaultRule, code: str
) -> None:
    client = make_client(request_timeout=0.3)
    sim.set_faults([FaultRule(rule.kind, first=1, seconds=rule.seconds)])
    assert client.blocked_batch("sms", [BLOCKED, CLEAN]) == {BLOCKED}
    assert sim.stats.requests == 2
    assert client.stats.failures_by_code == {code: 1}


@pytest.mark.parametrize(
    ("kind", "error", "code", "status"),
    [
        ("rbc001", CredentialsRefused, "RBC001", 401),
        ("wa401", CredentialsRefused, "WA401", 401),
        ("wa-401", CredentialsRefused, "WA-401", 401),
        ("e110", CredentialsRefused, "E110", 400),
        ("wa400", BadRequest, "WA400", 400),
    ],
)
def test_final_failures_are_not_retried(
    sim: Simulator, make_client, kind: str, error: type[Exception], code: str, status: int
) -> None:
    client = make_client(retry_attempts=5)
    sim.set_faults([FaultRule(kind)])
    with pytest.raises(error) as caught:
        client.blocked_batch("sms", [BLOCKED, CLEAN, "+918020000054"])
    assert isinstance(caught.value, FinalUpstreamError)
    assert caught.value.code == code
    assert caught.value.status == status
    assert sim.stats.requests == 1
    assert client.stats.retries == 0


def test_bad_request_names_the_shape_never_the_numbers(sim: Simulator, make_client) -> None:
    client = make_client()
    sim.set_faults([FaultRule("wa400")])
    with pytest.raises(BadRequest) as caught:
        client.blocked_batch("WhatsApp", [BLOCKED, CLEAN, "+918020000054"])
    message = str(caught.value)
    assert "whatsapp" in message
    assert "3 numbers" in message
    assert "802000005" not in message
    assert KEY not in message


def test_wrong_key_is_refused_by_the_server_itself(sim: Simulator) -> None:
    settings = settings_for(sim.base_url, api_key="not-the-key")
    with KaleyraClient(settings) as client, pytest.raises(CredentialsRefused) as caught:
        client.blocked_batch("sms", [BLOCKED])
    assert caught.value.code == "RBC001"
    assert sim.stats.requests == 1


@pytest.mark.parametrize(
    ("status", "error", "code"),
    [
        (404, FinalUpstreamError, "http_404"),
        (418, FinalUpstreamError, "http_418"),
        (401, CredentialsRefused, "http_401"),
        (302, FinalUpstreamError, "http_302"),
    ],
)
def test_unknown_client_errors_are_final(
    scripted, status: int, error: type[UpstreamError], code: str
) -> None:
    server = scripted((status, {"Location": "http://127.0.0.1:9/elsewhere"}, b"nope"))
    with KaleyraClient(settings_for(server.base_url)) as client, pytest.raises(error) as caught:
        client.blocked_batch("sms", [BLOCKED])
    assert caught.value.code == code
    assert not isinstance(caught.value, TransientUpstreamError)
    # Not retried, and a redirect is not followed (it would carry the api-key elsewhere).
    assert len(server.seen) == 1


def test_a_200_with_another_code_but_a_valid_list_is_accepted(scripted) -> None:
    server = scripted((200, {}, ok_body(BLOCKED, code="CNT197")))
    with KaleyraClient(settings_for(server.base_url)) as client:
        assert client.blocked_batch("sms", [BLOCKED, CLEAN]) == {BLOCKED}


def test_other_5xx_with_retry_after_is_retried_after_waiting(scripted) -> None:
    server = scripted((503, {"Retry-After": "0.3"}, b"busy"), (200, {}, ok_body()))
    with KaleyraClient(settings_for(server.base_url)) as client:
        started = time.monotonic()
        assert client.blocked_batch("sms", [CLEAN]) == set()
        assert time.monotonic() - started >= 0.3
        assert client.stats.failures_by_code == {"http_503": 1}


# -- the request itself ------------------------------------------------------------------------


def test_plus_signs_reach_the_simulator_intact(sim: Simulator, make_client) -> None:
    # The simulator decodes the query like any server: a raw '+' would become a space and
    # every number would be rejected as malformed (WA400).
    batch = numbers(50)
    sim.block("sms", *batch[::7])
    client = make_client()
    assert client.blocked_batch("sms", batch) == set(batch[::7])
    assert sim.stats.by_outcome == {"ok": 1}


def test_many_numbers_are_split_into_requests_of_at_most_100(sim: Simulator, make_client) -> None:
    asked = numbers(250)
    sim.block("sms", asked[3], asked[120], asked[249])
    client = make_client()
    assert client.blocked("sms", asked) == {asked[3], asked[120], asked[249]}
    stats = sim.stats
    assert stats.requests == 3
    assert stats.max_numbers_per_request == 100
    assert stats.numbers_asked == 250
    assert sorted(record[2] for record in stats.records) == [50, 100, 100]


def test_duplicates_are_asked_once(sim: Simulator, make_client) -> None:
    asked = numbers(100)
    client = make_client()
    assert client.blocked("sms", asked + asked[:40] + [BLOCKED, BLOCKED]) == {BLOCKED}
    assert sim.stats.numbers_asked == 101
    assert sim.stats.requests == 2
    sim.reset_stats()
    assert client.blocked_batch("sms", [BLOCKED] * 150) == {BLOCKED}
    assert sim.stats.numbers_asked == 1


def test_batch_limits_are_checked_before_asking(sim: Simulator, make_client) -> None:
    client = make_client()
    with pytest.raises(ValueError, match="at most 100"):
        client.blocked_batch("sms", numbers(101))
    with pytest.raises(ValueError, match="channel"):
        client.blocked_batch("fax", [BLOCKED])
    with pytest.raises(ValueError, match="E.164"):
        client.blocked_batch("sms", ["918020000052"])
    # An empty batch must not go out: without `mobile` the API answers the whole blocklist.
    assert client.blocked_batch("sms", []) == set()
    assert client.blocked("sms", []) == set()
    assert sim.stats.requests == 0


def test_the_first_error_of_a_concurrent_check_is_raised(sim: Simulator, make_client) -> None:
    client = make_client(concurrency=2)
    sim.set_faults([FaultRule("rbc001", every=2)])
    with pytest.raises(CredentialsRefused):
        client.blocked("sms", numbers(300))


# -- paging ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listed", "page_size", "requests_made"),
    [(0, 100, 1), (250, 100, 3), (200, 100, 3), (200, 50, 5), (7, 3, 3)],
)
def test_iter_blocklist_pages_until_a_short_page(
    sim: Simulator, make_client, listed: int, page_size: int, requests_made: int
) -> None:
    sim.unblock("sms", BLOCKED)
    expected = numbers(listed, start=5000)
    if expected:
        sim.block("sms", *expected)
    sim.block("voice", *numbers(3))  # another channel's list stays out
    client = make_client()
    assert sorted(client.iter_blocklist("SMS", page_size=page_size)) == expected
    assert sim.stats.requests == requests_made
    assert sim.stats.numbers_asked == 0  # `mobile` was never sent


def test_iter_blocklist_rejects_pages_the_api_refuses(make_client) -> None:
    client = make_client()
    with pytest.raises(ValueError):
        list(client.iter_blocklist("sms", page_size=101))
    with pytest.raises(ValueError, match="offset"):
        client.blocklist_page("sms", -100)


def test_blocklist_page_fetches_one_page_at_an_offset(sim: Simulator, make_client) -> None:
    """What a concurrent sync asks: any page, in any order, each one request."""
    sim.unblock("sms", BLOCKED)
    listed = numbers(250, start=5000)
    sim.block("sms", *listed)
    client = make_client()
    pages = [client.blocklist_page("sms", offset) for offset in (200, 0, 100, 300)]
    assert [len(page) for page in pages] == [50, 100, 100, 0]
    assert sorted(pages[1] + pages[2] + pages[0]) == listed
    assert sim.stats.requests == 4


# -- retries and their budget ------------------------------------------------------------------


def test_retry_after_is_honoured(sim: Simulator, make_client) -> None:
    limiter = RecordingLimiter()
    client = make_client(limiter=limiter, backoff_base=0.0, backoff_max=0.0)
    sim.set_faults([FaultRule("rate_limit", first=1, seconds=0.4)])
    started = time.monotonic()
    assert client.blocked_batch("sms", [BLOCKED]) == {BLOCKED}
    assert time.monotonic() - started >= 0.4
    assert sim.stats.requests == 2
    assert limiter.acquired == 2  # before every attempt
    assert limiter.penalties == [pytest.approx(0.4)]  # the fleet hears about the 429


def test_retry_after_is_capped(sim: Simulator, make_client) -> None:
    client = make_client(retry_after_max=0.1)
    sim.set_faults([FaultRule("rate_limit", first=1, seconds=30)])
    started = time.monotonic()
    assert client.blocked_batch("sms", [BLOCKED]) == {BLOCKED}
    assert time.monotonic() - started < 1.0


def test_budget_stops_at_the_attempt_limit(sim: Simulator, make_client) -> None:
    client = make_client(retry_attempts=4, retry_deadline=30.0)
    sim.set_faults([FaultRule("wa500")])
    with pytest.raises(RetryBudgetExhausted) as caught:
        client.blocked_batch("sms", [BLOCKED])
    assert caught.value.attempts == 4
    assert sim.stats.requests == 4


def test_budget_stops_at_the_deadline(sim: Simulator, make_client) -> None:
    client = make_client(retry_attempts=50, retry_deadline=1.5, request_timeout=1.0)
    sim.set_faults([FaultRule("timeout", seconds=5)])
    started = time.monotonic()
    with pytest.raises(RetryBudgetExhausted) as caught:
        client.blocked_batch("sms", [BLOCKED])
    elapsed = time.monotonic() - started
    # The last attempt is cut to what is left of the budget, so the whole stays within it.
    assert elapsed < 2.2
    assert caught.value.code == "timeout"
    assert 2 <= caught.value.attempts <= 3


def test_a_long_retry_after_past_the_deadline_gives_up_at_once(sim: Simulator, make_client) -> None:
    client = make_client(retry_deadline=1.0, retry_after_max=30.0)
    sim.set_faults([FaultRule("rate_limit", seconds=20)])
    started = time.monotonic()
    with pytest.raises(RetryBudgetExhausted) as caught:
        client.blocked_batch("sms", [BLOCKED])
    assert time.monotonic() - started < 0.5
    assert caught.value.attempts == 1
    assert caught.value.retry_after == pytest.approx(20)


def test_backoff_is_exponential_full_jitter_within_the_deadline(sim: Simulator) -> None:
    fake = FakeTime()
    settings = settings_for(
        sim.base_url, retry_attempts=100, retry_deadline=20.0, backoff_base=0.5, backoff_max=4.0
    )
    client = KaleyraClient(settings, sleep=fake.sleep, clock=fake.clock, rng=random.Random(7))
    sim.set_faults([FaultRule("wa500")])
    with pytest.raises(RetryBudgetExhausted) as caught, client:
        client.blocked_batch("sms", [BLOCKED])
    attempts = caught.value.attempts
    assert len(fake.sleeps) == attempts - 1
    assert sim.stats.requests == attempts
    for index, slept in enumerate(fake.sleeps):
        assert 0 <= slept <= min(4.0, 0.5 * 2**index)
    # Jittered, not a fixed ladder; and no sleep ran past the deadline.
    assert len({round(s, 6) for s in fake.sleeps}) == len(fake.sleeps)
    assert sum(fake.sleeps) < 20.0
    assert attempts > 5  # the deadline, not the attempt limit, ended it


def test_a_trickling_answer_is_cut_by_the_total_deadline(sim: Simulator, make_client) -> None:
    client = make_client(retry_attempts=1, request_timeout=0.5)
    sim.set_faults([FaultRule("trickle", seconds=5)])
    started = time.monotonic()
    with pytest.raises(RetryBudgetExhausted) as caught:
        client.blocked_batch("sms", [BLOCKED, CLEAN])
    assert time.monotonic() - started < 1.5
    assert caught.value.last_error.code == "timeout"


def test_the_connection_of_an_aborted_answer_is_not_reused(sim: Simulator, make_client) -> None:
    # Were the half-read connection put back in the pool, the next answer would be read from
    # the middle of the old one and fail to parse.
    client = make_client(request_timeout=0.5)
    sim.set_faults([FaultRule("trickle", first=1, seconds=3)])
    assert client.blocked_batch("sms", [BLOCKED, CLEAN]) == {BLOCKED}
    assert client.blocked_batch("sms", [BLOCKED]) == {BLOCKED}
    assert client.stats.failures_by_code == {"timeout": 1}


def test_a_reset_is_retried_then_succeeds(sim: Simulator, make_client) -> None:
    client = make_client()
    sim.set_faults([FaultRule("reset", first=1)])
    assert client.blocked("sms", [BLOCKED, CLEAN]) == {BLOCKED}
    assert client.stats.failures_by_code == {"connection": 1}
    assert sim.stats.requests == 2


def test_a_server_that_is_down_is_a_transient_connection_error() -> None:
    with Simulator(sid=SID, api_key=KEY) as gone:
        base_url = gone.base_url
    client = KaleyraClient(settings_for(base_url, retry_attempts=2))
    with client, pytest.raises(RetryBudgetExhausted) as caught:
        client.blocked_batch("sms", [BLOCKED])
    assert caught.value.code == "connection"


def test_parse_retry_after() -> None:
    now = time.time()
    in_ten = format_datetime(datetime.fromtimestamp(now, timezone.utc) + timedelta(seconds=10))
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0.25") == 0.25
    assert parse_retry_after(in_ten, now=now) == pytest.approx(10, abs=1)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert parse_retry_after("-5") == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


# -- concurrency and sessions ------------------------------------------------------------------


def test_batches_run_concurrently(make_client, caplog: pytest.LogCaptureFixture) -> None:
    with Simulator(sid=SID, api_key=KEY, latency=0.2) as slow:
        settings = settings_for(slow.base_url, concurrency=8, request_timeout=5.0)
        asked = numbers(1600)
        slow.block("sms", asked[0], asked[1599])
        with KaleyraClient(settings) as client, caplog.at_level(logging.WARNING):
            started = time.monotonic()
            assert client.blocked("sms", asked) == {asked[0], asked[1599]}
            elapsed = time.monotonic() - started
        stats = slow.stats
    assert stats.requests == 16
    assert stats.max_numbers_per_request == 100
    # Sequentially this takes 16 x 0.2 = 3.2 s; 8 at a time, about 0.4 s.
    assert elapsed < 1.5
    assert stats.max_in_flight >= 8
    # Every concurrent request had a pooled connection of its own.
    assert "Connection pool is full" not in caplog.text


def test_one_session_reused_and_sized_for_the_concurrency(sim: Simulator, make_client) -> None:
    client = make_client(concurrency=24)
    session = client._http()
    assert client._http() is session
    assert isinstance(session, Urllib3Transport)
    assert session.maxsize >= 24
    client.blocked_batch("sms", [BLOCKED])
    client.blocked_batch("sms", [CLEAN])
    assert client._http() is session
    client.close()
    assert client.blocked_batch("sms", [BLOCKED]) == {BLOCKED}  # usable after close


def test_connections_are_kept_alive_and_reused(scripted) -> None:
    server = scripted((200, {}, ok_body(BLOCKED)))
    with KaleyraClient(settings_for(server.base_url)) as client:
        for _ in range(3):
            assert client.blocked_batch("sms", [BLOCKED, CLEAN]) == {BLOCKED}
    assert len(server.client_ports) == 3
    assert len(set(server.client_ports)) == 1  # one TCP connection for all three
    # On the wire as the client built it (test_client_transport.py checks the whole shape).
    path, headers = server.seen[0]
    assert path.endswith("&mobile=%2B918020000052,%2B918020000053")
    assert headers["api-key"] == KEY
    assert headers["User-Agent"] == f"blockfilter/{__version__}"


def test_a_new_process_gets_a_new_session(
    sim: Simulator, make_client, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client()
    parent_session = client._http()
    monkeypatch.setattr(os, "getpid", lambda: -12345)  # as if in a prefork child
    child_session = client._http()
    assert child_session is not parent_session
    assert client._http() is child_session
    assert client.blocked_batch("sms", [BLOCKED]) == {BLOCKED}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_checks_on_its_own_session(sim: Simulator, make_client) -> None:
    client = make_client()
    assert client.blocked_batch("sms", [BLOCKED]) == {BLOCKED}  # the parent's pool is warm
    parent_session_id = id(client._http())
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without running pytest's teardown
        try:
            result = {
                "new_session": id(client._http()) != parent_session_id,
                "blocked": sorted(client.blocked_batch("sms", [BLOCKED, CLEAN])),
            }
        except BaseException as exc:  # noqa: BLE001 - anything goes back to the parent
            result = {"error": repr(exc)}
        os.write(write_end, json.dumps(result).encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as pipe:
        result = json.loads(pipe.read())
    assert result == {"new_session": True, "blocked": [BLOCKED]}
    # The parent's own session still works after the child used the network.
    assert client.blocked_batch("sms", [BLOCKED]) == {BLOCKED}


def test_proxies_from_the_environment_are_used(
    sim: Simulator, scripted, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = scripted((200, {}, ok_body(BLOCKED)))
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy.base_url)
    monkeypatch.setenv("http_proxy", proxy.base_url)
    with KaleyraClient(settings_for(sim.base_url)) as client:
        assert client.blocked_batch("sms", [BLOCKED, CLEAN]) == {BLOCKED}
    # The proxy got the request (in absolute form), the simulator never did.
    assert proxy.seen[0][0].startswith(f"{sim.base_url}/v1/{SID}/contacts/blocklisted?")
    assert sim.stats.requests == 0


# -- configuration and secrets -----------------------------------------------------------------


def test_base_url_comes_from_the_region() -> None:
    settings = load_settings(environ={}, sid=SID, api_key=KEY, region="eu")
    client = KaleyraClient(settings)
    assert client.endpoint == f"https://api.eu.kaleyra.io/v1/{SID}/contacts/blocklisted"
    assert "api.eu.kaleyra.io" in repr(client)
    assert "'eu'" in repr(client)
    assert SID in repr(client)
    na = KaleyraClient(settings.replace(region="na"))
    assert na.endpoint.startswith("https://api.na.kaleyra.ai/v1/")


@pytest.mark.parametrize(
    ("missing", "variable"), [("sid", "KALEYRA_SID"), ("api_key", "KALEYRA_API_KEY")]
)
def test_missing_credentials_name_the_variable(missing: str, variable: str) -> None:
    values: dict[str, Any] = {"sid": SID, "api_key": KEY}
    values[missing] = ""
    with pytest.raises(ConfigError, match=variable):
        KaleyraClient(load_settings(environ={}, **values))


def test_from_env(sim: Simulator, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("KALEYRA_", "BLOCKFILTER_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("KALEYRA_SID", SID)
    monkeypatch.setenv("KALEYRA_API_KEY", KEY)
    monkeypatch.setenv("KALEYRA_BASE_URL", sim.base_url + "/")
    with KaleyraClient.from_env() as client:
        assert client.blocked_batch("sms", [BLOCKED]) == {BLOCKED}


def test_the_key_never_shows(sim: Simulator, make_client, caplog: pytest.LogCaptureFixture) -> None:
    client = make_client(retry_attempts=2)
    errors: list[Exception] = []
    with caplog.at_level(logging.DEBUG):
        client.blocked("sms", numbers(150) + [BLOCKED])
        list(client.iter_blocklist("sms"))
        for rule in ("wa500", "rbc001", "wa400", "reset", "non_json"):
            sim.set_faults([FaultRule(rule)])
            with pytest.raises(Exception) as caught:
                client.blocked_batch("sms", [BLOCKED])
            errors.append(caught.value)
    assert caplog.records
    assert KEY not in caplog.text
    for record in caplog.records:
        assert KEY not in record.getMessage()
    assert KEY not in repr(client) and KEY not in str(client)
    assert KEY not in repr(client.settings)
    for error in errors:
        assert KEY not in str(error) and KEY not in repr(error)
        assert BLOCKED not in str(error)
    # The client's own log lines carry counts, never numbers.
    own = [r.getMessage() for r in caplog.records if r.name == "blockfilter.client"]
    assert own and not any("+9180" in line for line in own)


def test_stats_snapshot_is_a_copy(sim: Simulator, make_client) -> None:
    client = make_client()
    sim.set_faults([FaultRule("wa500", first=1)])
    client.blocked_batch("sms", [BLOCKED])
    snapshot = client.stats.snapshot()
    assert (snapshot.requests, snapshot.retries, snapshot.numbers_asked) == (2, 1, 2)
    client.blocked_batch("sms", [BLOCKED])
    assert snapshot.requests == 2 and client.stats.requests == 3


def test_tls_verification_and_environment_are_on(
    make_client, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = make_client()._http()
    assert session.ssl_context.verify_mode == ssl.CERT_REQUIRED
    # HTTPS_PROXY, REQUESTS_CA_BUNDLE apply (read when the client is made).
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    environment = make_client()._http().environment
    assert environment.proxy_for("https://api.in.kaleyra.io/") == "http://proxy.example:3128"
