"""Fail closed on hostile input and configuration.

Settings that are not finite numbers in range, malformed or secret-bearing URLs, JSON lines
that repeat a key, messages without a usable id, and output files on a full disk or in a run
that is killed: each is run as a user meets it (the real ``blockfilter`` command against the
simulator over HTTP, a real Celery app's conf, a real full file system where the machine
allows one), and checked for what a user would see.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from celery import Celery
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from blockfilter.atomicfile import AtomicFile, OutputError
from blockfilter.config import SPECS, Settings, load_settings
from blockfilter.engine.filter import Filter
from blockfilter.engine.lines import repeats_a_key
from blockfilter.errors import ConfigError
from blockfilter.pipeline.replay import replay_deferred
from blockfilter.sources import FunctionSource
from blockfilter.tasks import deferred_queue
from blockfilter.testing.simulator import Simulator
from tests.support.env import TEST_KEY, TEST_SID, subprocess_env
from tests.test_cli import blockfilter, numbers, records, write_campaign
from tests.test_replay import sent_batches

PASSWORD = "hunter2-Pw-7f3a"  # distinctive, so finding it anywhere is a leak


def assert_one_clear_line(done: subprocess.CompletedProcess[bytes], variable: str) -> str:
    stderr = done.stderr.decode()
    assert done.returncode == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and variable in lines[0], stderr
    return lines[0]


# -- 1. numeric settings: finite and in range, however they are given --------------------------

# Every numeric setting of config.SPECS, found by its type (not by how config.py checks it).
NUMERIC = {
    name: spec.env
    for name, spec in SPECS.items()
    if Settings.__dataclass_fields__[name].type in ("float", "int", "float | None")
}
NOT_FINITE = ["nan", "NaN", "inf", "-inf", "Infinity", "1e400", "-1e400"]


def test_every_numeric_setting_is_covered() -> None:
    # the TTLs, timeouts, backoffs, counts and the rate limit; the collector's three too
    assert len(NUMERIC) == 16
    assert {"cache_ttl", "cache_ttl_blocked", "rate_limit", "concurrency"} <= set(NUMERIC)
    assert {"collect_flush_every", "collect_flush_interval", "collect_max_buffer"} <= set(NUMERIC)


@pytest.mark.parametrize("name", sorted(NUMERIC))
@pytest.mark.parametrize("raw", [*NOT_FINITE, "-1", "-0.5", "1e300", "ten", "0x10"])
def test_a_numeric_setting_that_is_not_a_finite_number_in_range_is_a_config_error(
    name: str, raw: str
) -> None:
    variable = NUMERIC[name]
    with pytest.raises(ConfigError, match=variable):
        load_settings(environ={variable: raw})


@pytest.mark.parametrize("name", sorted(NUMERIC))
@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), float("-inf"), -1, -1.0, 1e300, True, "x"]
    + [pytest.param(10**400, id="10**400")],
)
def test_typed_values_are_checked_as_well_as_text(name: str, value: Any) -> None:
    """A Celery conf and an override hand over numbers, not text: the same rules apply."""
    variable = NUMERIC[name]
    app = Celery("conf-check", set_as_current=False)
    app.conf[variable.lower()] = value
    with pytest.raises(ConfigError, match=variable) as caught:
        load_settings(environ={}, celery_conf=app.conf)
    assert variable.lower() in str(caught.value)  # names the key as the app spells it
    with pytest.raises(ConfigError, match=variable):
        load_settings(environ={}, **{name: value})
    with pytest.raises(ConfigError, match=variable):
        Settings(**{name: value})
    with pytest.raises(ConfigError, match=variable):
        Settings().replace(**{name: value})


def test_zero_and_whole_values_keep_working() -> None:
    loaded = load_settings(
        environ={"BLOCKFILTER_CACHE_TTL": "0", "BLOCKFILTER_CONCURRENCY": " 8 "},
        celery_conf={"blockfilter_retry_deadline": 20, "blockfilter_retry_attempts": 4.0},
        cache_ttl_blocked=60,
        rate_limit=None,
    )
    assert (loaded.cache_ttl, loaded.concurrency) == (0.0, 8)
    assert (loaded.retry_deadline, loaded.retry_attempts) == (20.0, 4)
    assert loaded.cache_ttl_blocked == 60.0 and type(loaded.cache_ttl_blocked) is float
    for name in ("concurrency", "retry_attempts", "task_max_retries"):
        with pytest.raises(ConfigError):
            load_settings(environ={}, **{name: 2.5})  # half an attempt is not a count
        with pytest.raises(ConfigError):
            load_settings(environ={}, **{name: 0})


@pytest.mark.parametrize(
    ("command", "variable", "raw"),
    [
        (["config"], "BLOCKFILTER_CACHE_TTL", "nan"),
        (["config"], "BLOCKFILTER_CACHE_TTL_BLOCKED", "inf"),
        (["check", "--channel", "sms", "+919812345678"], "BLOCKFILTER_CACHE_TTL", "-inf"),
        (["check", "--channel", "sms", "+919812345678"], "BLOCKFILTER_RATE_LIMIT", "nan"),
        (["filter", "CAMPAIGN"], "BLOCKFILTER_CACHE_TTL", "1e400"),
        (["filter", "CAMPAIGN"], "BLOCKFILTER_REQUEST_TIMEOUT", "-1"),
        (["filter", "CAMPAIGN"], "BLOCKFILTER_CONCURRENCY", "inf"),
    ],
)
def test_the_command_line_exits_2_with_one_line_naming_the_variable(
    sim: Simulator, tmp_path: Path, command: list[str], variable: str, raw: str
) -> None:
    campaign = write_campaign(
        tmp_path / "c.jsonl", [{"id": "a", "channel": "sms", "to": numbers(1)[0]}]
    )
    args = [str(campaign) if part == "CAMPAIGN" else part for part in command]
    done = blockfilter(*args, env=subprocess_env(sim, **{variable: raw}))
    assert_one_clear_line(done, variable)
    assert done.stdout == b""
    assert sim.stats.requests == 0  # refused before anything was asked


# -- 3 and 4. URLs: malformed ones are config errors, passwords never shown --------------------

MALFORMED_CACHE_URLS = [
    f"redis://:{PASSWORD}@[::1",  # an IPv6 address left open
    f"redis://:{PASSWORD}@[::1]:port/0",
    f"redis://:{PASSWORD}@127.0.0.1:99999/0",
    f"redis://:{PASSWORD[:6]}/{PASSWORD[6:]}@127.0.0.1:6379/0",  # a '/' not percent-encoded
    "redis://:1234/5678@127.0.0.1:6379/0",  # ... which would read as port 1234
]


@pytest.mark.parametrize("url", MALFORMED_CACHE_URLS)
@pytest.mark.parametrize("command", [["config"], ["filter", "CAMPAIGN"], ["sync"]])
def test_a_malformed_cache_url_is_a_config_error_that_hides_the_password(
    sim: Simulator, tmp_path: Path, url: str, command: list[str]
) -> None:
    campaign = write_campaign(tmp_path / "c.jsonl", [{"id": "a", "channel": "sms", "to": "x"}])
    args = [str(campaign) if part == "CAMPAIGN" else part for part in command]
    done = blockfilter(*args, env=subprocess_env(sim, BLOCKFILTER_CACHE_URL=url))
    assert_one_clear_line(done, "BLOCKFILTER_CACHE_URL")
    output = done.stdout + done.stderr
    for secret in (PASSWORD, PASSWORD[:6], PASSWORD[6:], "5678"):
        assert secret.encode() not in output


@pytest.mark.parametrize("url", MALFORMED_CACHE_URLS)
def test_a_malformed_cache_url_fails_at_load_time(url: str) -> None:
    with pytest.raises(ConfigError, match="BLOCKFILTER_CACHE_URL") as caught:
        load_settings(environ={"BLOCKFILTER_CACHE_URL": url})
    assert PASSWORD[:6] not in str(caught.value) and "5678" not in str(caught.value)


SECRET_URLS = [
    (f"redis://:{PASSWORD}@127.0.0.1:6379/0", "redis://:[REDACTED]@127.0.0.1:6379/0"),
    (
        f"rediss://user:{PASSWORD}@cache.example:6380/2",
        "rediss://user:[REDACTED]@cache.example:6380/2",
    ),
    (
        f"redis://127.0.0.1:6379/0?password={PASSWORD}&db=1",
        "redis://127.0.0.1:6379/0?password=[REDACTED]&db=1",
    ),
    (f"unix:///run/redis.sock?password={PASSWORD}", "unix:///run/redis.sock?password=[REDACTED]"),
]


@pytest.mark.parametrize(("url", "shown"), SECRET_URLS)
def test_blockfilter_config_shows_the_cache_url_without_its_password(
    sim: Simulator, url: str, shown: str
) -> None:
    done = blockfilter("config", env=subprocess_env(sim, BLOCKFILTER_CACHE_URL=url))
    assert done.returncode == 0, done.stderr
    assert PASSWORD.encode() not in done.stdout + done.stderr
    row = next(line for line in done.stdout.decode().splitlines() if "CACHE_URL" in line)
    assert row.split()[1] == shown


@pytest.mark.parametrize(("url", "shown"), SECRET_URLS)
def test_settings_repr_and_describe_redact_passwords_in_urls(url: str, shown: str) -> None:
    settings = load_settings(environ={"BLOCKFILTER_CACHE_URL": url})
    assert settings.cache_url == url  # the cache still gets the password
    for text in (repr(settings), str(settings), str(settings.describe()), f"{settings}"):
        assert PASSWORD not in text
    assert f"cache_url={shown!r}" in repr(settings)
    assert ("BLOCKFILTER_CACHE_URL", shown, "env BLOCKFILTER_CACHE_URL") in settings.describe()


@pytest.mark.parametrize(
    "base_url", [f"ftp://user:{PASSWORD}@api.example", f"http://user:{PASSWORD}@[::1"]
)
def test_a_refused_base_url_is_shown_without_its_password(sim: Simulator, base_url: str) -> None:
    done = blockfilter("config", env=subprocess_env(sim, KALEYRA_BASE_URL=base_url))
    assert_one_clear_line(done, "KALEYRA_BASE_URL")
    assert PASSWORD.encode() not in done.stdout + done.stderr


def test_a_run_with_a_password_in_the_cache_url_never_prints_it(
    sim: Simulator, tmp_path: Path
) -> None:
    """The local Redis has no password: the cache fails (a warning), the run goes on, and no
    debug line, warning, record or summary shows the password."""
    campaign = write_campaign(
        tmp_path / "c.jsonl",
        [{"id": str(i), "channel": "sms", "to": n} for i, n in enumerate(numbers(20))],
    )
    summary = tmp_path / "summary.json"
    url = f"redis://default:{PASSWORD}@127.0.0.1:6379/0"
    done = blockfilter(
        "-vv",
        "filter",
        str(campaign),
        "--summary-json",
        str(summary),
        env=subprocess_env(sim, BLOCKFILTER_CACHE_URL=url),
    )
    assert done.returncode == 0, done.stderr
    assert len(records(done.stdout)) == 20
    for text in (done.stdout, done.stderr, summary.read_bytes()):
        assert PASSWORD.encode() not in text


# -- 2. a JSON line that repeats a key is malformed --------------------------------------------

NUMBER = "+919812345678"  # blocklisted on SMS in these tests, not on WhatsApp

REPEATING_LINES = [
    # The one from the report: checked on WhatsApp by orjson, sent on SMS by a first-key parser.
    b'{"id":"c1","channel":"sms","channel":"whatsapp","to":"+919812345678"}',
    b'{"id":"c2","channel":"whatsapp","to":"+919812345678","channel":"sms"}',
    b'{"id":"c3","\\u0063hannel":"sms","channel":"whatsapp","to":"+919812345678"}',
    b'{"id":"c4","channel":"sms","to":"+919812345679","to":"+919812345678"}',
    b'{"id":"c5","id":"c5b","channel":"whatsapp","to":"+919812345678"}',
    b'{"id":"c6","channel":"whatsapp","to":"98123 45678","region":"IN","region":"US"}',
    b'{"id":"c7","channel":"sms","to":"+919812345678","fallback":["sms"],"fallback":["whatsapp"]}',
    b'{"id":"c8","channel":"whatsapp","to":"+919812345678","meta":{"a":1,"a":2}}',
    b'{"id":"c9","channel":"whatsapp","to":"+919812345678","x":[{"k":1},{"k":2,"k":3}]}',
    # A repeat hidden behind a colon that only the decoder sees (\u003a is ":").
    b'{"id":"c10","channel":"sms","channel":"whatsapp","to":"+919812345678","t":"\\u003a"}',
    b'{"id":"c11","channel":"sms","channel":"whatsapp","to":"+919812345678","t":"OTP: 12"}',
    b'{"id" : "c12" , "channel" : "sms" ,\t"chann\\u0065l":"whatsapp", "to" : "+919812345678"}',
    b'{"id":"c13","channel":"whatsapp","to":"+919812345678","d":'
    + b"[" * 300
    + b'{"a":1,"a":1}'
    + b"]" * 300
    + b"}",
]

FINE_LINES = [
    b'{"id":"ok1","channel":"whatsapp","to":"+919812345678","text":"OTP: 1234 https://x.example"}',
    b'{"id":"ok2","channel":"whatsapp","to":"+919812345678","t":"a\\u003ab","u":"\\\\u003a"}',
    b'{"id":"ok3","channel":"whatsapp","to":"+919812345678","p":{"channel":"sms","a":{"b":1}}}',
    b'{"id":"ok4","channel":"whatsapp","to":"+919812345678","x":[{"k":1},{"k":2}],"big":'
    + b"1" * 30
    + b"}",
    b'{"id":"ok5","channel":"whatsapp","to":"+919812345678","d":'
    + b"[" * 300
    + b'{"a":1,"b":{"a":2}}'
    + b"]" * 300
    + b"}",
    b'{"id":"ok6","ch:annel":"x","channel":"whatsapp","to":"+919812345678"}',
]


def sms_blocks(channel: str, batch: list[str]) -> set[str]:
    return {n for n in batch if channel == "sms"}


def filter_lines(lines: list[bytes]) -> list[dict[str, Any]]:
    data = [line + b"\n" for line in lines]
    engine = Filter(load_settings(environ={}), sources=[FunctionSource("rule", sms_blocks)])
    with engine:
        return [json.loads(out) for out in engine.run_lines(lambda: iter(data))]


def test_run_lines_makes_a_line_that_repeats_a_key_malformed() -> None:
    lines = [b""] + REPEATING_LINES + FINE_LINES  # a blank first line: numbers still count it
    out = filter_lines(lines)
    assert len(out) == len(REPEATING_LINES) + len(FINE_LINES)
    for number, record in enumerate(out[: len(REPEATING_LINES)], 2):
        assert record == {
            "id": str(number),
            "verdict": "invalid",
            "reason": "malformed_line",
            "detail": f"line {number} repeats a key",
        }
    for line, record in zip(FINE_LINES, out[len(REPEATING_LINES) :], strict=True):
        assert record["verdict"] == "allowed", (line[:60], record)
        assert record["id"] == json.loads(line)["id"]


def test_the_command_line_never_allows_the_number_a_repeated_channel_hides(
    sim: Simulator, tmp_path: Path
) -> None:
    sim.block("sms", NUMBER)
    campaign = tmp_path / "c.jsonl"
    campaign.write_bytes(b"\n".join(REPEATING_LINES + FINE_LINES) + b"\n")
    done = blockfilter("filter", str(campaign), env=subprocess_env(sim))
    assert done.returncode == 0, done.stderr
    out = records(done.stdout)
    assert [r["id"] for r in out[: len(REPEATING_LINES)]] == [
        str(n) for n in range(1, len(REPEATING_LINES) + 1)
    ]
    assert {(r["verdict"], r["reason"]) for r in out[: len(REPEATING_LINES)]} == {
        ("invalid", "malformed_line")
    }
    assert [r["verdict"] for r in out[len(REPEATING_LINES) :]] == ["allowed"] * len(FINE_LINES)
    # The record of a repeating line does not carry its bytes on (both channels and all).
    assert all(set(r) == {"id", "verdict", "reason", "detail"} for r in out[: len(REPEATING_LINES)])
    estimate = blockfilter("filter", str(campaign), "--estimate", env=subprocess_env(sim))
    assert estimate.stdout.strip() == b"1 API requests"  # the fine lines' one number only


def test_replay_passes_a_parked_body_that_repeats_a_key_on_as_text() -> None:
    """kombu would decode it (the last key wins) into a message checked on WhatsApp; as text,
    the filter calls it invalid, and it reaches blockfilter_suppressed."""
    broker = "memory://localhost/bftest-replay-repeats"
    app = Celery("parker", broker=broker, set_as_current=False)
    queue = deferred_queue(app)
    body = REPEATING_LINES[0]
    with app.producer_or_acquire() as producer:
        for payload in (body, FINE_LINES[0]):
            producer.publish(
                payload,
                exchange=queue.exchange,
                routing_key=queue.routing_key,
                declare=[queue],
                content_type="application/json",
                content_encoding="utf-8",
            )
        assert replay_deferred(app, timeout=0.2) == 2
    (batch,) = sent_batches(app, "celery")
    assert batch == [body.decode(), json.loads(FINE_LINES[0])]
    with Filter(load_settings(environ={}), sources=[FunctionSource("rule", sms_blocks)]) as f:
        first, second = f.run(batch)
    assert (first["id"], first["verdict"], first["reason"]) == ("1", "invalid", "malformed_line")
    assert second["verdict"] == "allowed"
    app.close()


# A property test of the cheap check against the standard library's exact look.

keys = st.sampled_from(["id", "channel", "to", "a", "b", "a:b", "ü"])


def _spell_key(key: str, escape: bool) -> str:
    if escape:  # every character as \\uXXXX: the same key to a decoder, other bytes
        return '"' + "".join(f"\\u{ord(c):04x}" for c in key) + '"'
    return json.dumps(key, ensure_ascii=False)


strings = st.sampled_from(["sms", "", "OTP: 1", "a\\u003ab", "\\\\u003a", "x::y", "ü"])


@st.composite
def json_texts(draw: st.DrawFn, depth: int = 0) -> str:
    """JSON text whose objects may repeat a key, written with odd spacing and escapes."""
    space = draw(st.sampled_from(["", " ", "\t", "  "]))
    kind = draw(st.sampled_from(["object", "object", "list", "string", "number"]))
    if depth >= 3 or kind == "string":
        return '"' + draw(strings) + '"'
    if kind == "number":
        return draw(st.sampled_from(["1", "-2.5e3", "1" * 25, "true", "null"]))
    if kind == "list":
        items = draw(st.lists(json_texts(depth + 1), max_size=3))
        return "[" + f",{space}".join(items) + "]"
    pairs = draw(st.lists(st.tuples(keys, st.booleans()), max_size=4))
    members = [
        f"{_spell_key(key, escape)}{space}:{space}{draw(json_texts(depth + 1))}"
        for key, escape in pairs
    ]
    return "{" + space + f",{space}".join(members) + space + "}"


def reference_repeats(text: bytes) -> bool:
    """Slow and exact: does any object, as the standard library reads it, repeat a key?"""
    found = False

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal found
        found = found or len({k for k, _ in pairs}) != len(pairs)
        return dict(pairs)

    json.loads(text, object_pairs_hook=pairs_hook)
    return found


# 1,500 random documents against the reference parser: twenty seconds of CPU, so the slow
# tier runs it (the fast tier, in parallel, would wait for it at its end).
@pytest.mark.slow
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=json_texts())
@example(text='{"a":1,"a":2}')
@example(text='{"a":"\\u003a","b":1,"b":2}')  # the escaped colon pays for the repeat
@example(text='{"a":{"b":1},"a":{"b":1}}')
@example(text='{"b":1,"c":{"d":2}}')  # keys one level down and none repeated: counted, settled
@example(text='{"b":1,"b":{"d":2,"e":3}}')  # a repeat that one level down alone cannot see
def test_repeats_a_key_agrees_with_an_exact_reference(text: str) -> None:
    line = ("{" + f'"m":{text}' + "}").encode()
    message = orjson.loads(line)
    assert repeats_a_key(line, message) == reference_repeats(line)


# -- 7. every record carries an id a user can find it by -----------------------------------------


def test_a_message_without_a_usable_id_is_named_by_its_line(sim: Simulator, tmp_path: Path) -> None:
    campaign = tmp_path / "c.jsonl"
    campaign.write_bytes(
        b"\n".join(
            [
                b"{}",
                b"",  # blank: skipped, but counted in the line numbers
                b"{ }",
                b'{"id":"","channel":"sms","to":"+919812345678"}',
                b'{"id":7,"channel":"sms","to":"+919812345678","keep":[1,2]}',
                b'{"id":null,"channel":"fax","to":"nope"}',
                b'{"channel":"sms","to":"+919812345678","big":123456789012345678901234567890}',
                b'{"id":"good","channel":"sms","to":"+919812345678"}',
                b'{"id":"no-channel","to":"+919812345678"}',
            ]
        )
        + b"\n"
    )
    done = blockfilter("filter", str(campaign), env=subprocess_env(sim))
    assert done.returncode == 0, done.stderr
    out = records(done.stdout)
    assert [r["id"] for r in out] == ["1", "3", "4", "5", "6", "7", "good", "no-channel"]
    assert [(r["verdict"], r.get("reason")) for r in out[:6]] == [("invalid", "missing_field")] * 6
    assert out[3]["keep"] == [1, 2]  # the rest of the line is carried through
    raw = done.stdout.splitlines()[5]
    assert b"123456789012345678901234567890" in raw  # big integers too
    assert (out[7]["verdict"], out[7]["reason"]) == ("invalid", "missing_field")


def test_filter_run_names_a_message_without_a_usable_id_by_its_position() -> None:
    messages: list[Any] = [
        {"id": "a", "channel": "sms", "to": NUMBER},
        {},
        {"id": 3, "channel": "sms", "to": NUMBER},
        "not an object",
        {"id": "", "channel": "sms", "to": NUMBER, "n": 5},
    ]
    with Filter(load_settings(environ={}), sources=[FunctionSource("rule", sms_blocks)]) as f:
        out = list(f.run(messages))
    assert [r["id"] for r in out] == ["a", "2", "3", "4", "5"]
    assert [r.get("reason") for r in out] == [
        "blocklisted",
        "missing_field",
        "missing_field",
        "malformed_line",
        "missing_field",
    ]
    assert out[4]["n"] == 5


# -- 5 and 6. output files: whole or not at all, nothing left behind ----------------------------


def campaign_of(path: Path, count: int) -> Path:
    return write_campaign(
        path, [{"id": str(i), "channel": "sms", "to": n} for i, n in enumerate(numbers(count))]
    )


def listing(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A real file system with no room left: a 64 KiB tmpfs, filled up. Skipped where this
    process may not mount one (the RLIMIT_FSIZE test below covers the same ground)."""
    mount_point = tmp_path / "full"
    mount_point.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
        capture_output=True,
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(directory: Path, keep: dict[str, bytes]) -> None:
    for name, content in keep.items():
        (directory / name).write_bytes(content)
    with open(directory / "filler", "wb", buffering=0) as filler, contextlib.suppress(OSError):
        while True:
            filler.write(b"\0" * 1024)
    with open(directory / "probe", "wb", buffering=0) as probe, pytest.raises(OSError):
        probe.write(b"x")  # really full: not even one byte more
    (directory / "probe").unlink()


def test_a_full_disk_leaves_no_summary_and_the_old_files_as_they_were(
    sim: Simulator, tmp_path: Path, full_disk: Path
) -> None:
    campaign = campaign_of(tmp_path / "c.jsonl", 30)
    old_out = b'{"old": "output"}\n' * 300  # more than a page: room the new file could reuse
    fill(full_disk, {"out.jsonl": old_out})
    before = listing(full_disk)

    # No old summary: the new one cannot be written, and no empty file takes its place.
    done = blockfilter(
        "filter",
        str(campaign),
        "--summary-json",
        str(full_disk / "summary.json"),
        env=subprocess_env(sim),
    )
    stderr = done.stderr.decode()
    assert done.returncode == 1, stderr
    assert "Traceback" not in stderr
    assert "--summary-json" in stderr and "No space left on device" in stderr
    assert listing(full_disk) == before  # nothing new, not even a temporary file

    # An old output file on the full disk: it stays whole, and so does the old summary.
    (tmp_path / "summary.json").write_text('{"old": true}\n')
    done = blockfilter(
        "filter",
        str(campaign),
        "--out",
        str(full_disk / "out.jsonl"),
        "--summary-json",
        str(tmp_path / "summary.json"),
        env=subprocess_env(sim),
    )
    assert done.returncode == 1, done.stderr
    assert "--out" in done.stderr.decode() and "No space left" in done.stderr.decode()
    assert listing(full_disk) == before
    assert (tmp_path / "summary.json").read_text() == '{"old": true}\n'


def _limit_file_size(limit: int) -> None:  # runs in the child, before exec
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so write() fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_summary_that_cannot_be_written_whole_leaves_the_old_one(
    sim: Simulator, tmp_path: Path
) -> None:
    """RLIMIT_FSIZE: every file the process writes stops at 100 bytes, as a full disk would
    (the output goes to a pipe, which the limit does not touch)."""
    campaign = campaign_of(tmp_path / "c.jsonl", 30)
    summary = tmp_path / "out" / "summary.json"
    summary.parent.mkdir()
    summary.write_text('{"total": 1, "old": "summary"}\n')
    done = subprocess.run(
        [sys.executable, "-m", "blockfilter", "filter", str(campaign)]
        + ["--summary-json", str(summary)],
        capture_output=True,
        env=subprocess_env(sim),
        timeout=120,
        preexec_fn=lambda: _limit_file_size(100),
    )
    stderr = done.stderr.decode()
    assert done.returncode == 1, stderr
    assert "Traceback" not in stderr and "--summary-json" in stderr
    assert listing(summary.parent) == {"summary.json": b'{"total": 1, "old": "summary"}\n'}
    assert len(records(done.stdout)) == 30  # stdout got every record all the same


def test_summary_json_is_written_whole(sim: Simulator, tmp_path: Path) -> None:
    campaign = campaign_of(tmp_path / "c.jsonl", 30)
    summary = tmp_path / "out" / "summary.json"
    summary.parent.mkdir()
    summary.write_text("old")
    done = blockfilter(
        "filter", str(campaign), "--summary-json", str(summary), env=subprocess_env(sim)
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(summary.read_text())["total"] == 30
    assert [p.name for p in summary.parent.iterdir()] == ["summary.json"]


@pytest.mark.parametrize("unnamed", [True, False], ids=["O_TMPFILE", "named-temp"])
def test_an_atomic_file_leaves_nothing_behind_when_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unnamed: bool
) -> None:
    if not unnamed:  # as on a system without O_TMPFILE: a hidden named file
        monkeypatch.delattr(os, "O_TMPFILE", raising=False)
    target = tmp_path / "out.jsonl"
    target.write_bytes(b"old\n")
    with pytest.raises(RuntimeError), AtomicFile(str(target), label="--out") as file:
        file.write(b"new\n")
        assert len(list(tmp_path.iterdir())) == (1 if unnamed else 2)
        raise RuntimeError("the run failed")
    assert listing(tmp_path) == {"out.jsonl": b"old\n"}
    with AtomicFile(str(target), label="--out") as file:
        file.write(b"new\n")
    assert listing(tmp_path) == {"out.jsonl": b"new\n"}
    assert (target.stat().st_mode & 0o777) == 0o600  # it holds phone numbers
    with pytest.raises(OutputError, match="--out"):
        AtomicFile(str(tmp_path / "missing" / "out.jsonl"), label="--out")


def test_an_atomic_file_starts_writing_back_as_it_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The commit's fsync then waits for the last few MB only, not for the whole output.
    from blockfilter import atomicfile

    monkeypatch.setattr(atomicfile, "WRITE_BACK_EVERY", 10)
    advised: list[tuple[int, int, int]] = []
    real_fadvise = os.posix_fadvise

    def fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        advised.append((offset, length, advice))
        real_fadvise(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    target = tmp_path / "out.jsonl"
    with AtomicFile(str(target), label="--out") as file:
        for _ in range(5):
            file.write(b"0123456\n")
            file.handle.flush()  # as a full buffer does
    assert target.read_bytes() == b"0123456\n" * 5
    assert advised == [(0, 16, os.POSIX_FADV_DONTNEED), (16, 16, os.POSIX_FADV_DONTNEED)]


def test_an_output_that_is_a_device_or_a_pipe_is_written_in_place(
    sim: Simulator, tmp_path: Path
) -> None:
    # `--out /dev/null` once replaced the machine's /dev/null with a regular file (a rename
    # over it, as root). A device of the test's own, and a FIFO, must stay what they are.
    campaign = campaign_of(tmp_path / "c.jsonl", 30)
    null = tmp_path / "null"
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    done = blockfilter("filter", str(campaign), "--out", str(null), env=subprocess_env(sim))
    assert done.returncode == 0, done.stderr
    assert stat.S_ISCHR(null.stat().st_mode)

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    done = blockfilter("filter", str(campaign), "--out", str(fifo), env=subprocess_env(sim))
    reader.join(60)
    assert done.returncode == 0, done.stderr
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert len(records(received[0])) == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "fifo", "null"]


def start_slow_run(
    sim: Simulator, tmp_path: Path, *, stdin: bool
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """A run whose API requests take 3 s each, started and waited on until one is in flight
    (its output file is open by then)."""
    sim.set_latency(3.0)
    out_dir, temp_dir = tmp_path / "out", tmp_path / "tmp"
    out_dir.mkdir()
    temp_dir.mkdir()
    (out_dir / "scrubbed.jsonl").write_bytes(b'{"old": "output"}\n')
    (out_dir / "summary.json").write_bytes(b'{"old": "summary"}\n')
    campaign = campaign_of(tmp_path / "c.jsonl", 300)
    env = subprocess_env(
        sim,
        TMPDIR=str(temp_dir),  # where a stdin spool would go
        BLOCKFILTER_REQUEST_TIMEOUT="60",
        BLOCKFILTER_RETRY_DEADLINE="120",
    )
    args = ["filter", "-" if stdin else str(campaign), "--out", str(out_dir / "scrubbed.jsonl")]
    args += ["--summary-json", str(out_dir / "summary.json")]
    process = subprocess.Popen(
        [sys.executable, "-m", "blockfilter", *args],
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    if stdin:
        assert process.stdin is not None
        process.stdin.write(campaign.read_bytes())
        process.stdin.close()
        process.stdin = None  # so communicate() does not flush it again
    deadline = time.monotonic() + 60
    while sim.stats.in_flight == 0:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no request was made"
        time.sleep(0.05)
    return process, out_dir, temp_dir


@pytest.mark.parametrize("stdin", [False, True], ids=["file", "stdin"])
@pytest.mark.parametrize(
    ("signum", "exit_code"),
    [
        (signal.SIGKILL, -signal.SIGKILL),
        (signal.SIGTERM, 128 + signal.SIGTERM),
        (signal.SIGHUP, 128 + signal.SIGHUP),
        (signal.SIGINT, 130),
    ],
    ids=["SIGKILL", "SIGTERM", "SIGHUP", "SIGINT"],
)
def test_a_stopped_run_leaves_no_temporary_file_and_the_old_output(
    tmp_path: Path, stdin: bool, signum: int, exit_code: int
) -> None:
    with Simulator(sid=TEST_SID, api_key=TEST_KEY) as slow:
        process, out_dir, temp_dir = start_slow_run(slow, tmp_path, stdin=stdin)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == exit_code, stderr
    assert b"Traceback" not in stderr
    assert listing(out_dir) == {
        "scrubbed.jsonl": b'{"old": "output"}\n',
        "summary.json": b'{"old": "summary"}\n',
    }
    assert list(temp_dir.iterdir()) == []
