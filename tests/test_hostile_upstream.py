"""The hostile upstream of the tests does what its docs say: asked with the standard library
only, so these tests hold whatever blockfilter's client does."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from tests.hostile_upstream import (
    HostileUpstream,
    Trickle,
    always,
    blocklist,
    dashed,
    deep_body,
    national,
    no_plus,
    sequence,
    spaced,
)

Start = Callable[..., HostileUpstream]
PATH = "/v1/SID/contacts/blocklisted"
LISTED = [f"+91980000{i:04d}" for i in range(250)]


def get(upstream: HostileUpstream, query: str, path: str = PATH) -> tuple[int, bytes]:
    request = urllib.request.Request(f"{upstream.base_url}{path}?{query}", headers={"api-key": "k"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def mobiles(body: bytes) -> list[str]:
    return [entry["mobile"] for entry in json.loads(body)["data"]]


def test_requests_are_recorded_and_answered_by_the_function(hostile_upstream: Start) -> None:
    seen: list[tuple[str, dict[str, str], dict[str, str]]] = []

    def answer(path: str, query: dict[str, str], headers: dict[str, str]) -> Any:
        seen.append((path, query, headers))
        return 418, {"X-Test": "yes"}, b"teapot"

    upstream = hostile_upstream(answer)
    assert get(upstream, "mobile=%2B91,+91&channel=sms&channel=voice") == (418, b"teapot")
    path, query, headers = seen[0]
    # A raw "+" decodes to a space; the first of a repeated parameter counts.
    assert (path, query) == (PATH, {"mobile": "+91, 91", "channel": "sms"})
    assert headers["api-key"] == "k"
    (request,) = upstream.requests
    assert request.raw_query == "mobile=%2B91,+91&channel=sms&channel=voice"
    assert request.mobiles == ["+91", " 91"]


def test_lookups_answer_the_listed_numbers_asked_rewritten_with_extras(
    hostile_upstream: Start,
) -> None:
    upstream = hostile_upstream(
        blocklist({"sms": LISTED[:2]}, rewrite=no_plus, extra=["+10000000000"])
    )
    asked = ",".join(n.replace("+", "%2B") for n in [LISTED[1], LISTED[5], LISTED[0]])
    status, body = get(upstream, f"channel=sms&mobile={asked}")
    assert status == 200
    assert mobiles(body) == [LISTED[1][1:], LISTED[0][1:], "+10000000000"]
    assert mobiles(get(upstream, f"channel=voice&mobile={asked}")[1]) == ["+10000000000"]
    assert get(upstream, "channel=fax&mobile=%2B91")[0] == 400
    assert get(upstream, "channel=sms", path="/elsewhere")[0] == 404


def test_paging_modes(hostile_upstream: Start) -> None:
    honest = hostile_upstream(blocklist({"sms": LISTED}))
    pages = [mobiles(get(honest, f"channel=sms&limit=100&offset={o}")[1]) for o in (0, 100, 200)]
    assert [len(p) for p in pages] == [100, 100, 50]
    assert sum(pages, []) == LISTED

    same = hostile_upstream(blocklist({"sms": LISTED}, paging="same_page"))
    assert mobiles(get(same, "channel=sms&limit=100&offset=900")[1]) == LISTED[:100]

    never_short = hostile_upstream(blocklist({"sms": LISTED}, paging="never_short"))
    page = mobiles(get(never_short, "channel=sms&limit=100&offset=200")[1])
    assert page == LISTED[200:] + LISTED[:50]


def test_rewrites() -> None:
    assert no_plus("+919812345678") == "919812345678"
    assert spaced("+919812345678") == "+91 98123 45678"
    assert dashed("+919812345678") == "+91-98123-45678"
    assert national("91")("+919812345678") == "098123 45678"
    assert national("1", trunk="")("+12125550142") == "21255 50142"
    with pytest.raises(ValueError):
        national("44")("+919812345678")


def test_sequence_answers_in_turn_then_repeats_the_last(hostile_upstream: Start) -> None:
    upstream = hostile_upstream(sequence(always(500, b"a"), always(200, b"b")))
    assert [get(upstream, "x=1") for _ in range(3)] == [(500, b"a"), (200, b"b"), (200, b"b")]


def test_deep_body_is_as_deep_as_asked() -> None:
    assert deep_body(3) == b"[[[]]]"
    assert json.loads(deep_body(3, "data"))["data"] == [[[]]]
    assert json.loads(deep_body(2, "entry", mobile="+91"))["data"][0]["mobile"] == "+91"


def test_a_server_nobody_stops_stops_by_itself() -> None:
    upstream = HostileUpstream(always(200, b"{}"), lifetime=0.5)
    port = int(upstream.base_url.rsplit(":", 1)[1])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the server was still listening 30 s after its lifetime")


def test_stop_ends_a_trickle_at_once() -> None:
    upstream = HostileUpstream(always(200, Trickle(b"x" * 1000, seconds_per_byte=1.0)))
    got: list[BaseException] = []

    def read() -> None:
        try:
            get(upstream, "q=1")
        except Exception as exc:  # the connection is cut mid-body
            got.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 30
    while not upstream.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    upstream.stop()
    reader.join(30)
    assert not reader.is_alive()
    assert time.monotonic() - started < 10  # not the 1000 s the trickle would take
    assert got  # the body was cut, never completed


def test_an_answer_function_that_raises_is_a_500_and_is_reported() -> None:
    def broken(path: str, query: dict[str, str], headers: dict[str, str]) -> Any:
        raise RuntimeError("bug in the test")

    with HostileUpstream(broken) as upstream:
        assert get(upstream, "q=1")[0] == 500
        assert [type(e) for e in upstream.errors] == [RuntimeError]
