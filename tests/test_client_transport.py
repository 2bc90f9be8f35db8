"""The Kaleyra client through its transport seam: a function answers each request, no socket
is opened (httpx's MockTransport, for this client). What crosses a real network (timeouts,
resets, trickles, TLS, proxies) stays in test_client.py and the fault matrices."""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from blockfilter import __version__
from blockfilter.config import Settings, load_settings
from blockfilter.errors import (
    ConfigError,
    CredentialsRefused,
    RetryBudgetExhausted,
)
from blockfilter.kaleyra.client import KaleyraClient
from blockfilter.kaleyra.transport import (
    BodyTooLarge,
    NetworkEnvironment,
    Request,
    Response,
    TransportFailed,
    TransportTimeout,
    Urllib3Transport,
)
from tests.fakes import FakeTime
from tests.hostile_upstream import kaleyra_body
from tests.support.limiters import RecordingLimiter

SID = "TRANSPORTSID"
KEY = "sekrit-transport-key-51c9e"  # distinctive, so a leak is easy to grep for
BLOCKED = "+918020000052"
CLEAN = "+918020000053"
ENDPOINT = f"https://api.in.kaleyra.io/v1/{SID}/contacts/blocklisted"


def ok_body(*mobiles: str) -> bytes:
    return kaleyra_body(mobiles)


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "sid": SID,
        "api_key": KEY,
        "region": "in",
        "retry_attempts": 3,
        "retry_deadline": 5.0,
        "backoff_base": 0.5,
        "backoff_max": 1.0,
        "retry_after_max": 10.0,
    }
    values.update(overrides)
    return load_settings(environ={}, **values)


class Upstream:
    """Answers requests in turn (the last answer repeats) and remembers them. An answer is a
    Response, or an exception for the transport to raise."""

    def __init__(self, *answers: Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[Request] = []

    def __call__(self, request: Request) -> Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def asked(self, index: int = 0) -> list[str]:
        query = parse_qs(urlsplit(self.requests[index].url).query)
        return query["mobile"][0].split(",")


@pytest.fixture
def make_client() -> Callable[..., tuple[KaleyraClient, FakeTime]]:
    def make(upstream: Callable[[Request], Response], **overrides: Any) -> Any:
        fake = FakeTime()
        client = KaleyraClient(
            settings(**overrides),
            sleep=fake.sleep,
            clock=fake.clock,
            rng=random.Random(3),
            transport=upstream,
        )
        return client, fake

    return make


# -- moved from test_client.py, where a real HTTP server answered -------------------------------


def test_request_shape_plus_encoded_commas_literal_headers(make_client) -> None:
    upstream = Upstream(Response(200, {}, ok_body(BLOCKED)))
    client, _ = make_client(upstream)
    assert client.blocked_batch("SMS", [BLOCKED, CLEAN]) == {BLOCKED}
    (request,) = upstream.requests
    assert request.method == "GET"
    route, _, query = request.url.partition("?")
    assert route == ENDPOINT
    params = dict(part.split("=", 1) for part in query.split("&"))
    assert params["channel"] == "sms"
    assert params["mobile"] == "%2B918020000052,%2B918020000053"
    assert params["limit"] == "100" and params["offset"] == "0"
    assert "+" not in query
    assert request.headers["api-key"] == KEY
    assert request.headers["User-Agent"] == f"blockfilter/{__version__}"
    assert request.body is None


def test_kaleyra_code_wins_over_http_status(make_client) -> None:
    # A 200 carrying a failure code is that failure; a 500 carrying RBC001 is a refusal.
    failing = json.dumps({"code": "CNT195", "data": [], "error": {}}).encode()
    upstream = Upstream(Response(200, {}, failing), Response(200, {}, ok_body(BLOCKED)))
    client, _ = make_client(upstream)
    assert client.blocked_batch("sms", [BLOCKED]) == {BLOCKED}
    assert client.stats.failures_by_code == {"CNT195": 1}
    refused = json.dumps({"code": "RBC001", "data": [], "error": {}}).encode()
    upstream = Upstream(Response(500, {}, refused))
    client, _ = make_client(upstream)
    with pytest.raises(CredentialsRefused):
        client.blocked_batch("sms", [BLOCKED])
    assert len(upstream.requests) == 1


def test_numbers_not_asked_fail_the_answer(make_client, caplog: pytest.LogCaptureFixture) -> None:
    # An answer naming a number never asked is not an answer to these numbers: what it
    # leaves out cannot be taken as clean. Retried, then given up on.
    upstream = Upstream(Response(200, {}, ok_body(BLOCKED, "+918099999999")))
    client, _ = make_client(upstream)
    logs = caplog.at_level(logging.WARNING, logger="blockfilter.client")
    with logs, pytest.raises(RetryBudgetExhausted) as caught:
        client.blocked_batch("sms", [BLOCKED, CLEAN])
    assert caught.value.code == "bad_answer"
    assert len(upstream.requests) == 3
    assert "not asked" in caplog.text
    assert "+918099999999" not in caplog.text


# -- what a transport reports ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        (TransportTimeout("ReadTimeoutError"), "timeout"),
        (TransportFailed("ConnectionResetError"), "connection"),
        (BodyTooLarge("the body is longer than 4194304 bytes"), "bad_body"),
    ],
    ids=["timeout", "connection", "too_large"],
)
def test_a_failed_exchange_is_retried_then_answered(make_client, failure, code: str) -> None:
    upstream = Upstream(failure, Response(200, {}, ok_body(BLOCKED)))
    client, fake = make_client(upstream)
    assert client.blocked_batch("sms", [BLOCKED, CLEAN]) == {BLOCKED}
    assert client.stats.failures_by_code == {code: 1}
    assert client.stats.requests == 2 and client.stats.retries == 1
    assert len(fake.sleeps) == 1  # the backoff, slept on the fake clock


def test_a_failed_exchange_names_the_shape_never_the_numbers(make_client) -> None:
    upstream = Upstream(TransportFailed("SSLError"))
    client, _ = make_client(upstream)
    with pytest.raises(RetryBudgetExhausted) as caught:
        client.blocked_batch("sms", [BLOCKED, CLEAN])
    last = caught.value.last_error
    assert last.code == "connection"
    assert "SSLError" in str(last) and "2 numbers" in str(last)
    assert "802000005" not in str(last) and KEY not in str(last)
    # No cause is attached: an HTTP stack's exception may show the URL, numbers and all.
    assert last.__cause__ is None and last.__suppress_context__


def test_retry_after_of_a_429_is_slept_and_the_limiter_hears_it(make_client) -> None:
    limiter = RecordingLimiter()
    upstream = Upstream(
        Response(429, {"retry-after": "4"}, b"slow down"), Response(200, {}, ok_body())
    )
    fake = FakeTime()
    client = KaleyraClient(
        settings(), limiter=limiter, sleep=fake.sleep, clock=fake.clock, transport=upstream
    )
    assert client.blocked_batch("sms", [CLEAN]) == set()
    assert fake.sleeps == [pytest.approx(4.0)]  # the header's names are any case
    assert limiter.acquired == 2 and limiter.penalties == [pytest.approx(4.0)]
    assert client.stats.failures_by_code == {"rate_limited": 1}


def test_each_attempt_gets_what_is_left_of_the_budget(make_client) -> None:
    upstream = Upstream(TransportTimeout("ReadTimeoutError"))
    client, fake = make_client(
        upstream, retry_attempts=10, retry_deadline=12.0, request_timeout=5.0, connect_timeout=2
    )

    def slow(request: Request) -> Response:
        fake.now += request.timeout  # the attempt used its whole timeout
        return upstream(request)

    client._given_transport = slow  # the same client, its attempts taking their time
    with pytest.raises(RetryBudgetExhausted):
        client.blocked_batch("sms", [BLOCKED])
    timeouts = [request.timeout for request in upstream.requests]
    assert timeouts[0] == 5.0
    assert all(t <= 5.0 for t in timeouts) and timeouts[-1] < 5.0  # cut to the deadline
    assert all(r.connect_timeout == min(2.0, r.timeout) for r in upstream.requests)
    assert fake.now - 1000.0 <= 12.0 + 0.001


def test_pages_and_blocklist_changes_go_through_the_transport(make_client) -> None:
    page = json.dumps({"code": "CNT196", "data": [{"mobile": BLOCKED}], "error": {}}).encode()
    upstream = Upstream(Response(200, {}, page))
    client, _ = make_client(upstream)
    assert list(client.iter_blocklist("voice", page_size=50)) == [BLOCKED]
    assert upstream.requests[0].url == f"{ENDPOINT}?limit=50&offset=0&channel=voice"
    upstream.answers = [Response(202, {}, b'{"status": "queued"}')]
    client.change_blocklist("sms", add=[BLOCKED], remove=[CLEAN])
    post = upstream.requests[-1]
    assert (post.method, post.url) == ("POST", ENDPOINT)
    assert post.headers["Content-Type"] == "application/json"
    assert post.headers["api-key"] == KEY
    assert json.loads(post.body or b"") == {
        "channel": "sms",
        "contacts": [
            {"blocklist_status": 1, "numbers": [BLOCKED]},
            {"blocklist_status": 0, "numbers": [CLEAN]},
        ],
    }


def test_numbers_are_checked_before_anything_is_sent(make_client) -> None:
    upstream = Upstream(Response(200, {}, ok_body()))
    client, _ = make_client(upstream)
    for bad in ("+918020000052\n", "+91 8020000052", "+٩١٨٠٢٠", 918020000052):
        with pytest.raises(ValueError, match="E.164"):
            client.blocked_batch("sms", [CLEAN, bad])  # type: ignore[list-item]
    assert upstream.requests == []


def test_a_handed_in_transport_is_the_only_way_out(make_client) -> None:
    requests: list[Request] = []

    def upstream(request: Request) -> Response:
        requests.append(request)
        listed = BLOCKED.replace("+", "%2B")
        return Response(200, {}, ok_body(BLOCKED) if listed in request.url else ok_body())

    client, _ = make_client(upstream)
    assert client._http() is upstream
    asked = [BLOCKED, *(f"+9180300{i:05d}" for i in range(250))]
    assert client.blocked("sms", asked) == {BLOCKED}
    assert len(requests) == 3  # 251 numbers, 100 a request
    client.close()  # the owner's to close: nothing to do here, and no pool was ever made
    assert client._transport is None
    assert client.blocked_batch("sms", [BLOCKED]) == {BLOCKED}


def test_requests_and_responses_show_no_secret() -> None:
    request = Request("GET", f"{ENDPOINT}?mobile=%2B918020000052", {"api-key": KEY}, b"+9180")
    assert KEY not in repr(request) and "8020000052" not in repr(request)
    assert "+9180" not in repr(request)
    response = Response(429, {"Retry-After": "3", "CONTENT-TYPE": "text/plain"})
    assert response.header("retry-after") == "3" and response.header("Content-Type")
    assert response.headers == {"retry-after": "3", "content-type": "text/plain"}


# -- the environment, read once --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "url", "proxy"),
    [
        ({"HTTPS_PROXY": "http://p:3128"}, "https://api.in.kaleyra.io", "http://p:3128"),
        ({"https_proxy": "p:3128"}, "https://api.in.kaleyra.io", "http://p:3128"),
        (
            {"HTTPS_PROXY": "http://up:1", "https_proxy": "http://low:1"},
            "https://a.io",
            "http://low:1",
        ),
        ({"ALL_PROXY": "http://all:1"}, "https://a.io", "http://all:1"),
        ({"HTTP_PROXY": "http://p:1"}, "https://a.io", None),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "kaleyra.io"}, "https://api.kaleyra.io", None),
        ({"HTTPS_PROXY": "http://p:1", "no_proxy": "a.io:8443"}, "https://a.io:8443", None),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "*"}, "https://a.io", None),
        ({"HTTP_PROXY": "http://p:1", "NO_PROXY": "10.0.0.0/8"}, "http://10.1.2.3:80", None),
        ({"HTTP_PROXY": "http://p:1", "NO_PROXY": "10.0.0.0/8"}, "http://11.1.2.3", "http://p:1"),
        ({"HTTP_PROXY": "http://p:1", "REQUEST_METHOD": "GET"}, "http://127.0.0.1", None),
        ({"http_proxy": "http://p:1", "REQUEST_METHOD": "GET"}, "http://a.io", "http://p:1"),
    ],
)
def test_proxies_follow_requests_rules(environ: dict[str, str], url: str, proxy: str) -> None:
    assert NetworkEnvironment.read(environ).proxy_for(url) == proxy


def test_ca_variables_in_requests_order(tmp_path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("not read here")
    env = NetworkEnvironment.read(
        {"REQUESTS_CA_BUNDLE": str(bundle), "CURL_CA_BUNDLE": "/x", "SSL_CERT_FILE": "/y"}
    )
    assert (env.ca_file, env.ca_dir) == (str(bundle), None)
    assert NetworkEnvironment.read({"CURL_CA_BUNDLE": str(tmp_path)}).ca_dir == str(tmp_path)
    assert NetworkEnvironment.read({"SSL_CERT_FILE": "/etc/ssl/x.pem"}).ca_file == "/etc/ssl/x.pem"
    with pytest.raises(ConfigError, match="REQUESTS_CA_BUNDLE") as caught:
        NetworkEnvironment.read({"REQUESTS_CA_BUNDLE": str(tmp_path / "missing.pem")})
    assert "missing.pem" not in str(caught.value)


def test_the_environment_is_read_when_the_client_is_made(monkeypatch) -> None:
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    client = KaleyraClient(settings())
    monkeypatch.delenv("HTTPS_PROXY")  # too late for this client: it read the variables
    transport = client._http()
    assert isinstance(transport, Urllib3Transport)
    assert transport.environment.proxy_for(client.endpoint) == "http://proxy.example:3128"
    assert KaleyraClient(settings())._http().environment.proxy_for(client.endpoint) is None


@pytest.mark.parametrize("call", ["lookup", "blocklist change"])
def test_no_attempt_starts_after_the_budget_when_the_limiter_held_it(call: str) -> None:
    # A lookup and a blocklist change share one retry budget: a limiter that keeps the client
    # waiting past the deadline means no further attempt, for a write as for a read.
    fake = FakeTime()

    class SlowLimiter:
        acquired = 0

        def acquire(self) -> None:
            self.acquired += 1
            if self.acquired > 1:
                fake.sleep(60.0)  # the fleet's rate limit is busy far beyond the budget

        def penalize(self, seconds: float) -> None:
            pass

    upstream = Upstream(Response(500, {}, b'{"code": "WA500"}'))
    client = KaleyraClient(
        settings(retry_deadline=5.0),
        limiter=SlowLimiter(),
        sleep=fake.sleep,
        clock=fake.clock,
        rng=random.Random(3),
        transport=upstream,
    )
    with pytest.raises(RetryBudgetExhausted) as caught:
        if call == "lookup":
            client.blocked_batch("sms", [CLEAN])
        else:
            client.change_blocklist("sms", add=[BLOCKED])
    assert len(upstream.requests) == 1
    assert caught.value.attempts == 1
