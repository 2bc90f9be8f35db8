"""Secrets and personal data: the API key never shows, phone numbers are masked in logs, the
SID cannot change the request path, plain HTTP only to loopback, TLS verified by default.

Every check greps what a user or an operator would see: the command line's stdout, stderr and
summary file, every log record (urllib3's DEBUG lines included), exception texts and reprs.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import ssl
import subprocess
import sys
import threading
import traceback
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from blockfilter.config import ConfigError, Settings, load_settings, validate_base_url
from blockfilter.engine.filter import Filter
from blockfilter.errors import UpstreamError
from blockfilter.kaleyra.client import KaleyraClient
from blockfilter.kaleyra.source import KaleyraSource
from blockfilter.plugins.manager import reset_plugin_manager
from blockfilter.redact import SECRET_FILTER, guard_library_logs, mask_number
from blockfilter.testing.simulator import FaultRule, Simulator
from tests.conftest import fast_settings
from tests.support.env import subprocess_env
from tests.support.simulator_command import simulator_command
from tests.test_cli import numbers, records, write_campaign

SID = "SECRETSSID"
# Distinctive, so any leak, whole or in part, is easy to grep for.
KEY = "sekrit-Key-9d41e07bb2"
KEY_PARTS = (KEY, KEY[:12], KEY[-10:])


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with Simulator(sid=SID, api_key=KEY) as simulator:
        yield simulator


@pytest.fixture(autouse=True)
def _clean_simulator(sim: Simulator) -> Iterator[None]:
    sim.clear_faults()
    sim.reset_stats()
    yield
    sim.clear_faults()


def env_for(sim: Simulator, **extra: str) -> dict[str, str]:
    own = {
        "KALEYRA_SID": SID,
        "KALEYRA_API_KEY": KEY,
        "BLOCKFILTER_RETRY_AFTER_MAX": "0.05",
        "BLOCKFILTER_REQUEST_TIMEOUT": "0.5",
    }
    return subprocess_env(sim, **{**own, **extra})


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "blockfilter", *args], capture_output=True, env=env, timeout=120
    )


def assert_no_key(text: str | bytes, where: str) -> None:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    for part in KEY_PARTS:
        assert part not in text, f"the API key (or part of it) shows in {where}"


def assert_no_full_number(text: str | bytes, campaign: list[str], where: str) -> None:
    """No number of the campaign in any spelling a log could use: +E.164, %2B-encoded, or the
    bare digits."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    for number in campaign:
        assert number[1:] not in text, f"{mask_number(number)} shows unmasked in {where}"


def log_texts(records_: list[logging.LogRecord]) -> list[str]:
    """Everything a handler could print of each record: message, traceback, stack."""
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return [formatter.format(record) for record in records_]


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every logger at DEBUG, urllib3's included, for the test."""
    with caplog.at_level(logging.DEBUG):
        for name in ("urllib3", "blockfilter", "requests"):
            caplog.set_level(logging.DEBUG, logger=name)
        yield caplog


# -- the key ----------------------------------------------------------------------------------


def test_the_key_never_shows_in_any_command_output(sim: Simulator, tmp_path: Path) -> None:
    campaign = numbers(260, seed=11)
    sim.block("sms", *campaign[:40])
    messages = [
        {"id": str(i), "channel": "sms", "to": n, "fallback": ["voice"]}
        for i, n in enumerate(campaign)
    ]
    path = write_campaign(tmp_path / "c.jsonl", messages)
    summary = tmp_path / "summary.json"
    outputs: list[tuple[str, bytes]] = []

    def run(label: str, *args: str, faults: list[FaultRule] | None = None, **extra: str) -> None:
        sim.set_faults(faults or [])
        done = run_cli(*args, env=env_for(sim, **extra))
        outputs.append((f"{label} stdout", done.stdout))
        outputs.append((f"{label} stderr", done.stderr))

    run("filter ok", "-vv", "filter", str(path), "--summary-json", str(summary))
    outputs.append(("summary", summary.read_bytes()))
    run("filter flaky", "-vv", "filter", str(path), faults=[FaultRule("wa500", every=2)])
    run("filter 429", "-vv", "filter", str(path), faults=[FaultRule("rate_limit", seconds=0.05)])
    run("filter reset", "-vv", "filter", str(path), faults=[FaultRule("reset", every=2)])
    run("filter timeout", "-vv", "filter", str(path), faults=[FaultRule("timeout", seconds=1)])
    run("filter refused", "-vv", "filter", str(path), faults=[FaultRule("rbc001")])
    run("filter wrong key", "-vv", "filter", str(path), KALEYRA_API_KEY=KEY + "x")
    run("filter estimate", "-vv", "filter", str(path), "--estimate")
    run("check", "-vv", "check", "--channel", "sms", campaign[0], campaign[1])
    run(
        "check failing", "-vv", "check", "--channel", "sms", campaign[0], faults=[FaultRule("e110")]
    )
    run("config", "-vv", "config")
    run("bad url", "-vv", "filter", str(path), KALEYRA_BASE_URL="http://example.com")
    assert any(b"[REDACTED]" in text for label, text in outputs if label == "config stdout")
    for where, text in outputs:
        assert_no_key(text, where)
    # The wrong key is refused and told as such, without echoing what was sent.
    assert any(b"refused the credentials" in text for _, text in outputs)


def test_the_simulator_command_never_prints_the_key(tmp_path: Path) -> None:
    env = subprocess_env(KALEYRA_SID=SID, KALEYRA_API_KEY=KEY)
    with simulator_command(env, verbose=True) as simulator:
        env["KALEYRA_BASE_URL"] = simulator.base_url
        done = run_cli("-vv", "check", "--channel", "sms", numbers(1)[0], env=env)
        assert done.returncode == 0, done.stderr
    output = simulator.stdout + simulator.stderr + done.stdout + done.stderr
    assert_no_key(output, "the simulator's output")


def test_the_key_never_shows_in_the_python_api(
    sim: Simulator, debug_logs: pytest.LogCaptureFixture
) -> None:
    campaign = numbers(150, seed=12)
    sim.block("sms", campaign[0])
    settings = fast_settings(sim.base_url, sid=SID, api_key=KEY, retry_attempts=2)
    texts: list[str] = [repr(settings), str(settings), str(settings.describe())]
    messages = [{"id": str(i), "channel": "sms", "to": n} for i, n in enumerate(campaign)]
    for faults in ([], [FaultRule("wa500")], [FaultRule("rbc001")], [FaultRule("reset")]):
        sim.set_faults(faults)
        # The filters of a process share the Kaleyra source and its cache: a fresh one, so
        # every run asks the API and meets its fault.
        reset_plugin_manager()
        requests_before = sim.stats.requests
        with Filter(settings) as engine:
            results = list(engine.run(messages))
            texts += [repr(engine), repr(engine.sources), json.dumps(engine.summary.as_dict())]
            texts += [json.dumps(results)]
        assert sim.stats.requests > requests_before
    source = KaleyraSource(settings)
    texts += [repr(source), repr(source.client), str(source.client.stats)]
    source.close()
    texts += log_texts(debug_logs.records)
    # The transport's DEBUG request lines were really there.
    assert any("blockfilter.transport" in text for text in texts)
    for text in texts:
        assert_no_key(text, "the Python API's reprs, results or logs")


@pytest.mark.parametrize("fault", ["wa500", "rbc001", "wa400", "e110", "timeout", "non_json"])
def test_errors_never_carry_the_key_or_a_number(sim: Simulator, fault: str) -> None:
    campaign = numbers(3, seed=13)
    sim.set_faults([FaultRule(fault, seconds=1)] if fault == "timeout" else [FaultRule(fault)])
    settings = fast_settings(
        sim.base_url, sid=SID, api_key=KEY, retry_attempts=2, request_timeout=0.3
    )
    with KaleyraClient(settings) as client, pytest.raises(UpstreamError) as caught:
        client.blocked("sms", campaign)
    error = caught.value
    chain = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    for text in (str(error), repr(error), chain, repr(getattr(error, "last_error", None))):
        assert_no_key(text, f"the {fault} error")
        assert_no_full_number(text, campaign, f"the {fault} error")


def test_settings_never_show_the_key() -> None:
    settings = load_settings(environ={"KALEYRA_SID": SID, "KALEYRA_API_KEY": KEY})
    for text in (repr(settings), str(settings), str(settings.describe()), repr(vars(settings))):
        if text.startswith("{"):
            continue  # vars() is the object itself: not something anything prints
        assert_no_key(text, "the settings")
    assert ("KALEYRA_API_KEY", "[REDACTED]", "env KALEYRA_API_KEY") in settings.describe()


@pytest.mark.parametrize("key", ["two\nlines", "spa ce", "ünïcode", "tab\there", "x" * 600])
def test_a_key_that_cannot_travel_in_a_header_is_a_config_error(key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"KALEYRA_SID": SID, "KALEYRA_API_KEY": key})
    assert "KALEYRA_API_KEY" in str(caught.value)
    assert key.strip() not in str(caught.value)


# -- phone numbers in logs ----------------------------------------------------------------------


def test_cli_debug_logs_mask_every_number(sim: Simulator, tmp_path: Path) -> None:
    campaign = numbers(120, seed=14)
    sim.block("sms", *campaign[:30])
    messages = [
        {"id": str(i), "channel": "sms", "to": n, "fallback": ["whatsapp"]}
        for i, n in enumerate(campaign)
    ]
    path = write_campaign(tmp_path / "c.jsonl", messages)
    sim.set_faults([FaultRule("wa500", every=2)])
    done = run_cli("-vv", "filter", str(path), env=env_for(sim))
    assert done.returncode == 0, done.stderr
    # The transport's request lines were printed (so the numbers really went through the
    # logs)...
    assert b"blockfilter.transport" in done.stderr and b"mobile=%2B" in done.stderr
    # ...and masked, in the contract's form (the "+" percent-encoded as it was sent).
    assert re.search(rb"mobile=%2B[0-9]{5}X+[0-9]{2}(,|%2C)%2B", done.stderr)
    assert_no_full_number(done.stderr, campaign, "the -vv log of filter")
    # The output itself carries the numbers, of course: it is the user's data.
    assert [r["to"] for r in records(done.stdout)] == campaign


def test_python_api_logs_mask_numbers_for_handlers_added_later(
    sim: Simulator, debug_logs: pytest.LogCaptureFixture
) -> None:
    campaign = numbers(30, seed=15)
    settings = fast_settings(sim.base_url, sid=SID, api_key=KEY)
    engine = Filter(settings)
    # A handler the host attaches after the library set itself up still gets clean records.
    late: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            late.append(record)

    handler = Collect(logging.DEBUG)
    logging.getLogger("blockfilter.transport").addHandler(handler)
    try:
        with engine:
            list(
                engine.run(
                    {"id": str(i), "channel": "sms", "to": n} for i, n in enumerate(campaign)
                )
            )
    finally:
        logging.getLogger("blockfilter.transport").removeHandler(handler)
    assert any("mobile=%2B" in record.getMessage() for record in late)
    for text in log_texts(late) + log_texts(debug_logs.records):
        assert_no_full_number(text, campaign, "a DEBUG log line of the Python API")
        assert_no_key(text, "a DEBUG log line of the Python API")


def test_library_records_are_cleaned_whatever_their_shape() -> None:
    guard_library_logs(KEY)
    number = "+918020000052"
    caught: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            caught.append(record)

    logger = logging.getLogger("blockfilter.test_secrets")
    handler = Collect(logging.DEBUG)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        logger.debug("asked %s with key %s", number, KEY)
        logger.debug("as a query: mobile=%%2B%s", number[1:])
        logger.debug({"not": "a string", "to": number})
        logger.debug("%s %s", "too few arguments")  # must not raise, must not leak
        try:
            raise ValueError(f"bad number {number} for key {KEY}")
        except ValueError:
            logger.exception("failed")
        logger.debug("where", stack_info=True)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    texts = log_texts(caught)
    assert len(texts) == 6
    assert "+91802XXXXX52" in texts[0] and "[REDACTED]" in texts[0]
    assert "%2B91802XXXXX52" in texts[1]
    assert "ValueError" in texts[4]  # the traceback is still there, cleaned
    for text in texts:
        assert_no_key(text, "a log record")
        assert number[1:] not in text
    # A host application's own loggers are left alone.
    record = logging.getLogger("host.app").makeRecord(
        "host.app", logging.INFO, __file__, 1, "sent to %s", (number,), None
    )
    assert record.getMessage() == f"sent to {number}"
    assert SECRET_FILTER.clean(f"to {number}") == "to +91802XXXXX52"


# -- the SID and the base URL ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "sid",
    ["../x", "a/b", "%2e%2e", "a b", "ünï", SID + "\n", "a?b", "a#b", "..", "a\\b", "x" * 200],
)
def test_a_sid_that_could_change_the_path_is_refused_before_any_request(
    sim: Simulator, sid: str
) -> None:
    with pytest.raises(ConfigError, match="KALEYRA_SID"):
        Settings(sid=sid, api_key=KEY, base_url=sim.base_url)
    with pytest.raises(ConfigError, match="KALEYRA_SID"):
        load_settings(environ={}, sid=sid, api_key=KEY)
    done = run_cli("check", "--channel", "sms", numbers(1)[0], env=env_for(sim, KALEYRA_SID=sid))
    if sid.strip() != sid:
        # The environment's value is stripped (a pasted newline): what is left is the SID.
        assert done.returncode == 0, done.stderr
        assert sim.stats.requests == 1
    else:
        assert done.returncode == 2 and b"KALEYRA_SID" in done.stderr
        assert b"Traceback" not in done.stderr
        assert sim.stats.requests == 0


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1",
        "http://example.com",
        "http://127.0.0.1.nip.io",
        "http://localhost.example.com",
        "http://0.0.0.0:8080",
        "http://2130706433",  # 127.0.0.1 as one number: refused rather than guessed
        "http://127.0.0.1@example.com",
        "ftp://127.0.0.1",
        "https://example.com/v1/other",
    ],
)
def test_plain_http_or_a_path_is_refused_except_to_loopback(url: str) -> None:
    with pytest.raises(ConfigError, match="KALEYRA_BASE_URL"):
        validate_base_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080",
        "http://127.5.5.5",
        "http://[::1]:9000/",
        "http://localhost:1234",
        "HTTP://LOCALHOST",
        "https://api.in.kaleyra.io",
        "https://10.0.0.1:8443",
    ],
)
def test_loopback_http_and_any_https_are_accepted(url: str) -> None:
    assert validate_base_url(url) == url.rstrip("/")


# -- TLS ----------------------------------------------------------------------------------------


class _Blocklist(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        body = json.dumps({"code": "CNT196", "data": [], "error": {}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@pytest.fixture(scope="module")
def https_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A real HTTPS blocklist endpoint with a self-signed certificate for 127.0.0.1."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make a certificate")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Blocklist)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", cert
    finally:
        server.shutdown()
        server.server_close()


def test_tls_is_verified_by_default_and_the_ca_bundle_variable_is_honoured(
    https_server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    base_url, cert = https_server
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    settings = fast_settings(base_url, sid=SID, api_key=KEY, retry_attempts=1)
    number = numbers(1)[0]
    with KaleyraClient(settings) as client:
        assert client._http().ssl_context.verify_mode == ssl.CERT_REQUIRED
        # A self-signed certificate is refused: the check fails, it is not skipped.
        with pytest.raises(UpstreamError) as caught:
            client.blocked_batch("sms", [number])
        assert "SSLError" in str(getattr(caught.value, "last_error", caught.value))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    with KaleyraClient(settings) as client:
        assert client.blocked_batch("sms", [number]) == set()


def test_a_tls_failure_defers_in_the_command_line(
    https_server: tuple[str, Path], tmp_path: Path
) -> None:
    base_url, cert = https_server
    env = subprocess_env(
        base_url,
        strip=("REQUESTS_CA_BUNDLE",),
        KALEYRA_SID=SID,
        KALEYRA_API_KEY=KEY,
        BLOCKFILTER_RETRY_ATTEMPTS="1",
    )
    path = write_campaign(
        tmp_path / "c.jsonl", [{"id": "1", "channel": "sms", "to": numbers(1)[0]}]
    )
    done = run_cli("filter", str(path), env=env)
    assert done.returncode == 4, done.stderr
    assert records(done.stdout)[0]["verdict"] == "deferred"
    done = run_cli("filter", str(path), env={**env, "REQUESTS_CA_BUNDLE": str(cert)})
    assert done.returncode == 0, done.stderr
    assert records(done.stdout)[0]["verdict"] == "allowed"
