"""Fail closed on hostile input and configuration.

Settings that are not finite numbers in range, malformed or secret-bearing URLs, JSON lines
that repeat a key, messages without a usable id, and output files on a full disk or in a run
that is killed: each is run as a user meets it (the real ``blockfilter`` command against the
simulator over HTTP, a real Celery app's conf, a real full file system where the machine
allows one), and checked for what a user would see.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from blockfilter.config import CHANNELS, SPECS, Settings, load_settings
from blockfilter.errors import ConfigError
from blockfilter.simulator import Simulator
from tests.conftest import TEST_KEY, TEST_SID
from tests.test_cli import blockfilter, cli_env, numbers, records, write_campaign

PASSWORD = "hunter2-Pw-7f3a"  # distinctive, so finding it anywhere is a leak


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with Simulator(sid=TEST_SID, api_key=TEST_KEY) as simulator:
        yield simulator


@pytest.fixture(autouse=True)
def _fresh(request: pytest.FixtureRequest) -> Iterator[None]:
    if "sim" in request.fixturenames:
        simulator = request.getfixturevalue("sim")
        simulator.clear_faults()
        simulator.reset_stats()
        for channel in CHANNELS:
            simulator.unblock(channel, *simulator.blocked(channel))
    yield


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
    assert len(NUMERIC) == 13  # the TTLs, timeouts, backoffs, counts and the rate limit
    assert {"cache_ttl", "cache_ttl_blocked", "rate_limit", "concurrency"} <= set(NUMERIC)


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
    done = blockfilter(*args, env=cli_env(sim, **{variable: raw}))
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
    done = blockfilter(*args, env=cli_env(sim, BLOCKFILTER_CACHE_URL=url))
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
    done = blockfilter("config", env=cli_env(sim, BLOCKFILTER_CACHE_URL=url))
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
    done = blockfilter("config", env=cli_env(sim, KALEYRA_BASE_URL=base_url))
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
        env=cli_env(sim, BLOCKFILTER_CACHE_URL=url),
    )
    assert done.returncode == 0, done.stderr
    assert len(records(done.stdout)) == 20
    for text in (done.stdout, done.stderr, summary.read_bytes()):
        assert PASSWORD.encode() not in text
