"""Fail closed on what the upstream answers: against a hostile upstream written for the test
(``tests/hostile_upstream.py``, which shares no code with the client or the simulator).

* An answer may write a number another way (no ``+``, spaces, dashes, national format): every
  blocklisted number is still found, ``check`` prints it in E.164, and no blocklisted number is
  ever ``allowed``.
* An answer naming a number never asked is no answer to these numbers: the batch is retried,
  then deferred (exit 4), with one warning that names no number.
* A body that cannot be decoded (nested 100,000 deep, not UTF-8, ``NaN``, a repeated key...)
  is a transient ``bad_body``: retried, then deferred, with a log line and no traceback.
* A redirect or a ``204`` defers its numbers with one warning, and the redirect is not followed.

Every case runs through the real command line (a subprocess) or through ``Filter`` and
``KaleyraClient`` in process, over real HTTP.
"""

from __future__ import annotations

import json
import logging
import math
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from blockfilter import Filter
from blockfilter.errors import FinalUpstreamError, RetryBudgetExhausted
from blockfilter.kaleyra.client import KaleyraClient
from tests.conftest import fast_settings
from tests.hostile_upstream import (
    AnswerFunction,
    HostileUpstream,
    Trickle,
    always,
    as_written,
    blocklist,
    dashed,
    deep_body,
    kaleyra_body,
    national,
    no_content,
    no_plus,
    redirect,
    spaced,
)
from tests.support.env import TEST_KEY, TEST_SID, subprocess_env

Start = Callable[..., HostileUpstream]

ATTEMPTS = 3  # fast_settings() and cli_env() both try each request this many times


def indian_numbers(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    found: dict[str, None] = {}
    while len(found) < count:
        found[f"+9198{rng.randrange(10**8):08d}"] = None
    return list(found)


# A campaign of 250 distinct numbers (three lookups on sms), a third blocklisted on sms, a
# sixth on whatsapp; every other message falls back to whatsapp.
POOL = indian_numbers(250, seed=41)
SMS_BLOCKED = POOL[::3]
WHATSAPP_BLOCKED = POOL[::6]
LISTS = {"sms": SMS_BLOCKED, "whatsapp": WHATSAPP_BLOCKED}
NEVER_ASKED = "+919999912345"  # a valid number outside POOL
assert NEVER_ASKED not in POOL

REWRITES: dict[str, Callable[[str], str]] = {
    "e164": as_written,
    "no_plus": no_plus,
    "spaces": spaced,
    "dashes": dashed,
    "national": national("91"),
}


def campaign() -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for index in range(400):
        message: dict[str, Any] = {"id": f"m{index}", "channel": "sms", "to": POOL[index % 250]}
        if index % 2:
            message["fallback"] = ["whatsapp"]
        messages.append(message)
    return messages


def expected_verdict(message: dict[str, Any]) -> tuple[str, str]:
    number = message["to"]
    if number not in SMS_BLOCKED:
        return "allowed", "sms"
    if message.get("fallback") and number not in WHATSAPP_BLOCKED:
        return "rerouted", "whatsapp"
    return "blocked", "sms"


def assert_one_verdict_each(messages: list[dict[str, Any]], results: list[dict[str, Any]]) -> None:
    assert [r["id"] for r in results] == [m["id"] for m in messages]


def assert_no_blocklisted_number_allowed(results: list[dict[str, Any]]) -> None:
    allowed = {r["to"] for r in results if r["verdict"] == "allowed"}
    assert not allowed & set(SMS_BLOCKED)
    rerouted = {r["to"] for r in results if r["verdict"] == "rerouted"}
    assert not rerouted & set(WHATSAPP_BLOCKED)


def digits_of_every_number(text: str) -> list[str]:
    """The numbers (their last ten digits, so any way of writing them) that show in ``text``."""
    return [n for n in [*POOL, NEVER_ASKED] if n[-10:] in text.replace(" ", "").replace("-", "")]


# -- the command line ------------------------------------------------------------------------


def cli_env(upstream: HostileUpstream) -> dict[str, str]:
    return subprocess_env(
        upstream,
        BLOCKFILTER_RETRY_ATTEMPTS=str(ATTEMPTS),
        BLOCKFILTER_RETRY_DEADLINE="10",  # ample on a loaded machine: attempts are the limit
    )


def blockfilter(*args: str, upstream: HostileUpstream) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "blockfilter", *args]
    return subprocess.run(
        command, capture_output=True, text=True, env=cli_env(upstream), timeout=120
    )


def run_filter(
    upstream: HostileUpstream, messages: list[dict[str, Any]], tmp_path: Path
) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    path = tmp_path / "campaign.jsonl"
    path.write_text("".join(json.dumps(m) + "\n" for m in messages))
    done = blockfilter("filter", str(path), "--quiet", upstream=upstream)
    assert "Traceback" not in done.stderr, done.stderr
    return done, [json.loads(line) for line in done.stdout.splitlines()]


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("WARNING")]


def assert_nothing_secret_in(text: str) -> None:
    assert TEST_KEY not in text
    assert TEST_SID not in text
    assert digits_of_every_number(text) == []


# -- numbers written another way ---------------------------------------------------------------


@pytest.mark.parametrize("rewrite", REWRITES.values(), ids=REWRITES.keys())
def test_check_prints_every_blocklisted_number_in_e164_however_the_answer_writes_it(
    hostile_upstream: Start, rewrite: Callable[[str], str]
) -> None:
    upstream = hostile_upstream(blocklist(LISTS, rewrite=rewrite))
    asked = POOL[:7]
    done = blockfilter("check", "--channel", "sms", *asked, upstream=upstream)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines() == [n for n in asked if n in SMS_BLOCKED]
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("rewrite", REWRITES.values(), ids=REWRITES.keys())
def test_filter_never_allows_a_blocklisted_number_however_the_answer_writes_it(
    hostile_upstream: Start, tmp_path: Path, rewrite: Callable[[str], str]
) -> None:
    upstream = hostile_upstream(blocklist(LISTS, rewrite=rewrite))
    messages = campaign()
    done, results = run_filter(upstream, messages, tmp_path)
    assert done.returncode == 0, done.stderr
    assert_one_verdict_each(messages, results)
    assert_no_blocklisted_number_allowed(results)
    for message, result in zip(messages, results, strict=True):
        assert (result["verdict"], result["channel"]) == expected_verdict(message), message
        assert result["e164"] == message["to"]
    # Three lookups on sms, and one on whatsapp for the blocklisted numbers with a fallback:
    # an answer written another way is matched, not retried.
    rerouting = {m["to"] for m in messages if m["to"] in SMS_BLOCKED and m.get("fallback")}
    assert len(upstream.requests) == math.ceil(250 / 100) + math.ceil(len(rerouting) / 100)


def mixed_countries() -> tuple[list[str], list[str]]:
    indian = indian_numbers(4, seed=7)
    american = ["+12125550142", "+14155550199", "+16175550123"]
    british = ["+447400123456", "+447700900077"]
    asked = indian + american + british
    return asked, [indian[0], indian[2], american[1], british[0]]


def national_of_each(number: str) -> str:
    """Each number in its own country's national format, as a local upstream might write it."""
    if number.startswith("+91"):
        return national("91")(number)
    if number.startswith("+1"):
        return national("1", trunk="")(number)
    return national("44")(number)


def test_national_formats_are_read_in_the_regions_of_the_numbers_asked(
    hostile_upstream: Start,
) -> None:
    asked, blocked = mixed_countries()
    upstream = hostile_upstream(blocklist({"voice": blocked}, rewrite=national_of_each))
    with KaleyraClient(fast_settings(upstream.base_url)) as client:
        assert client.blocked_batch("voice", asked) == set(blocked)
    assert len(upstream.requests) == 1


def test_an_entry_that_could_mean_several_numbers_asked_blocks_them_all(
    hostile_upstream: Start,
) -> None:
    # "2486393352" is the national number of +1 248-639-3352 and of +91 24863 93352: the
    # answer cannot say which one is blocklisted, so neither may be sent to.
    american, indian, clean = "+12486393352", "+912486393352", "+919812345678"
    upstream = hostile_upstream(always(200, kaleyra_body(["2486393352"])))
    messages = [
        {"id": "us", "channel": "sms", "to": american},
        {"id": "in", "channel": "sms", "to": indian},
        {"id": "clean", "channel": "sms", "to": clean},
    ]
    with Filter(fast_settings(upstream.base_url)) as engine:
        results = list(engine.run(messages))
    assert [(r["id"], r["verdict"]) for r in results] == [
        ("us", "blocked"),
        ("in", "blocked"),
        ("clean", "allowed"),
    ]
    assert len(upstream.requests) == 1


# -- numbers never asked ---------------------------------------------------------------------


@pytest.mark.parametrize("rewrite", REWRITES.values(), ids=REWRITES.keys())
def test_an_entry_never_asked_fails_the_answer_with_one_warning(
    hostile_upstream: Start, caplog: pytest.LogCaptureFixture, rewrite: Callable[[str], str]
) -> None:
    upstream = hostile_upstream(blocklist(LISTS, rewrite=rewrite, extra=[rewrite(NEVER_ASKED)]))
    client = KaleyraClient(fast_settings(upstream.base_url))
    logs = caplog.at_level(logging.WARNING, logger="blockfilter.client")
    with client, logs, pytest.raises(RetryBudgetExhausted) as caught:
        client.blocked_batch("sms", POOL[:10])
    assert caught.value.code == "bad_answer"
    assert len(upstream.requests) == ATTEMPTS  # transient: retried within the budget
    about_it = [r.getMessage() for r in caplog.records if "not asked" in r.getMessage()]
    assert len(about_it) == 1, about_it
    assert "1 of its 5 entries" in about_it[0] and "channel sms" in about_it[0]
    assert_nothing_secret_in(caplog.text + str(caught.value))


def test_an_answer_that_is_a_page_of_the_whole_list_is_not_taken_for_a_lookup(
    hostile_upstream: Start,
) -> None:
    # An upstream that ignores `mobile` answers the first page of the list: the numbers it
    # leaves out are not "not blocklisted".
    upstream = hostile_upstream(always(200, kaleyra_body(SMS_BLOCKED[:100])))
    messages = [{"id": str(i), "channel": "sms", "to": n} for i, n in enumerate(POOL[:20])]
    with Filter(fast_settings(upstream.base_url)) as engine:
        results = list(engine.run(messages))
    assert {(r["verdict"], r["reason"]) for r in results} == {("deferred", "check_failed")}
    assert len(upstream.requests) == ATTEMPTS


def test_filter_defers_every_batch_an_entry_never_asked_comes_back_in(
    hostile_upstream: Start, tmp_path: Path
) -> None:
    upstream = hostile_upstream(blocklist(LISTS, rewrite=no_plus, extra=[no_plus(NEVER_ASKED)]))
    messages = campaign()
    done, results = run_filter(upstream, messages, tmp_path)
    assert done.returncode == 4, done.stderr
    assert_one_verdict_each(messages, results)
    assert {(r["verdict"], r["reason"]) for r in results} == {("deferred", "check_failed")}
    assert len(upstream.requests) == math.ceil(250 / 100) * ATTEMPTS
    about_it = [line for line in warnings_in(done.stderr) if "not asked" in line]
    assert len(about_it) == 1, done.stderr
    assert "channel sms" in about_it[0]
    assert_nothing_secret_in(done.stderr)


def test_check_fails_cleanly_when_an_entry_was_never_asked(hostile_upstream: Start) -> None:
    upstream = hostile_upstream(blocklist(LISTS, extra=[NEVER_ASKED]))
    done = blockfilter("check", "--channel", "sms", *POOL[:3], upstream=upstream)
    assert done.returncode == 1
    assert done.stdout == ""
    assert "the check failed" in done.stderr and "bad_answer" in done.stderr
    assert "Traceback" not in done.stderr
    assert_nothing_secret_in(done.stderr)
    assert len(upstream.requests) == ATTEMPTS


# -- bodies that cannot be decoded -------------------------------------------------------------

BLOCKED = SMS_BLOCKED[0]
CLEAN = POOL[1]
assert CLEAN not in SMS_BLOCKED


def _entry(mobile: str) -> str:
    return f'{{"mobile":"{mobile}","channel_type":"3"}}'


BAD_BODIES: dict[str, bytes] = {
    "nested_100000_deep": deep_body(100_000),
    "data_nested_100000_deep": deep_body(100_000, "data"),
    "entry_nested_100000_deep": deep_body(100_000, "entry", mobile=BLOCKED),
    "not_utf8": kaleyra_body([BLOCKED]).replace(b'"3"', b'"\xe9"'),
    "utf16": kaleyra_body([BLOCKED]).decode().encode("utf-16"),
    "nan": b'{"code":"CNT196","data":[],"error":{"retry":NaN}}',
    "infinity": b'{"code":"CNT196","data":[],"error":{"retry":-Infinity}}',
    "huge_integer": b'{"code":"CNT196","data":[],"error":{"n":' + b"7" * 100_000 + b"}}",
    "huge_float": b'{"code":"CNT196","data":[],"error":{"n":1e999999}}',
    # Which copy counts differs between parsers; Python's json takes the last (nothing
    # blocklisted, CLEAN blocklisted instead of BLOCKED).
    "repeated_data": (
        f'{{"code":"CNT196","data":[{_entry(BLOCKED)}],"data":[],"error":{{}}}}'
    ).encode(),
    "repeated_mobile": (
        f'{{"code":"CNT196","data":[{{"mobile":"{BLOCKED}","mobile":"{CLEAN}"}}],"error":{{}}}}'
    ).encode(),
    "repeated_code": b'{"code":"CNT195","code":"CNT196","data":[],"error":{}}',
    "empty": b"",
    "truncated": kaleyra_body([BLOCKED])[:-5],
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_a_body_that_cannot_be_decoded_is_retried_then_deferred_with_a_warning(
    hostile_upstream: Start, caplog: pytest.LogCaptureFixture, body: bytes
) -> None:
    upstream = hostile_upstream(always(200, body, {"Content-Type": "application/json"}))
    client = KaleyraClient(fast_settings(upstream.base_url))
    logs = caplog.at_level(logging.WARNING, logger="blockfilter.client")
    with client, logs, pytest.raises(RetryBudgetExhausted) as caught:
        client.blocked_batch("sms", [BLOCKED, CLEAN])
    assert caught.value.code == "bad_body"
    assert len(upstream.requests) == ATTEMPTS
    assert any("Kaleyra's answer was" in r.getMessage() for r in caplog.records), caplog.text
    assert_nothing_secret_in(caplog.text)

    messages = [
        {"id": "b", "channel": "sms", "to": BLOCKED},
        {"id": "c", "channel": "sms", "to": CLEAN},
    ]
    with Filter(fast_settings(upstream.base_url)) as engine:
        results = list(engine.run(messages))
    assert [(r["id"], r["verdict"]) for r in results] == [("b", "deferred"), ("c", "deferred")]


def test_a_leading_bom_is_ignored(hostile_upstream: Start) -> None:
    upstream = hostile_upstream(always(200, b"\xef\xbb\xbf" + kaleyra_body([BLOCKED])))
    with KaleyraClient(fast_settings(upstream.base_url)) as client:
        assert client.blocked_batch("sms", [BLOCKED, CLEAN]) == {BLOCKED}


CLI_BAD_BODIES = ("nested_100000_deep", "entry_nested_100000_deep", "repeated_data", "nan")


@pytest.mark.parametrize("name", CLI_BAD_BODIES)
def test_no_command_shows_a_traceback_for_a_body_that_cannot_be_decoded(
    hostile_upstream: Start, tmp_path: Path, name: str
) -> None:
    upstream = hostile_upstream(always(200, BAD_BODIES[name]))

    done = blockfilter("check", "--channel", "sms", BLOCKED, CLEAN, upstream=upstream)
    assert (done.returncode, done.stdout) == (1, "")
    assert "the check failed" in done.stderr and "bad_body" in done.stderr
    assert "Traceback" not in done.stderr

    messages = [{"id": str(i), "channel": "sms", "to": n} for i, n in enumerate(POOL[:120])]
    done, results = run_filter(upstream, messages, tmp_path)
    assert done.returncode == 4, done.stderr
    assert_one_verdict_each(messages, results)
    assert {r["verdict"] for r in results} == {"deferred"}
    assert any("Kaleyra's answer was" in line for line in warnings_in(done.stderr)), done.stderr
    assert_nothing_secret_in(done.stderr)

    done = blockfilter("sync", "--channel", "sms", "--quiet", upstream=upstream)
    assert done.returncode == 1
    assert "bad_body" in done.stderr and "Traceback" not in done.stderr


# -- redirects, 204, trickles ------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308, 204])
def test_a_redirect_or_no_content_defers_with_one_warning_and_is_not_followed(
    hostile_upstream: Start, tmp_path: Path, status: int
) -> None:
    elsewhere = hostile_upstream(blocklist({}))
    answer: AnswerFunction = (
        no_content() if status == 204 else redirect(status, f"{elsewhere.base_url}/v1/x")
    )
    upstream = hostile_upstream(answer)
    messages = [{"id": str(i), "channel": "sms", "to": n} for i, n in enumerate(POOL)]
    done, results = run_filter(upstream, messages, tmp_path)
    assert done.returncode == 4, done.stderr
    assert_one_verdict_each(messages, results)
    assert {(r["verdict"], r["reason"]) for r in results} == {("deferred", "check_failed")}
    assert len(upstream.requests) == 3  # three batches, none retried: the answer is final
    assert elsewhere.requests == []  # the api-key header never went there
    warnings = warnings_in(done.stderr)
    assert len(warnings) == 1, done.stderr
    assert f"HTTP {status}" in warnings[0]
    if status != 204:
        assert "redirects are not followed" in warnings[0]
        assert elsewhere.base_url not in done.stderr
    assert_nothing_secret_in(done.stderr)


def test_a_redirect_is_a_final_error_of_the_client(hostile_upstream: Start) -> None:
    upstream = hostile_upstream(redirect(307))
    with (
        KaleyraClient(fast_settings(upstream.base_url)) as client,
        pytest.raises(FinalUpstreamError) as caught,
    ):
        client.blocked_batch("sms", [BLOCKED])
    assert (caught.value.status, caught.value.code) == (307, "http_307")


def test_a_slow_trickle_is_cut_and_deferred(hostile_upstream: Start, tmp_path: Path) -> None:
    upstream = hostile_upstream(always(200, Trickle(kaleyra_body([]), seconds_per_byte=0.2)))
    messages = [{"id": str(i), "channel": "sms", "to": n} for i, n in enumerate(POOL[:50])]
    done, results = run_filter(upstream, messages, tmp_path)
    assert done.returncode == 4, done.stderr
    assert {(r["verdict"], r["reason"]) for r in results} == {("deferred", "check_failed")}
    assert len(upstream.requests) == ATTEMPTS
