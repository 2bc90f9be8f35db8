"""A real Celery deployment: personal data out of Celery's stores, problems that shout,
nothing stranded.

Real ``celery worker`` processes on RabbitMQ with a Redis result backend, against the Kaleyra
simulator; what a user checks is read where the user would read it: the result backend's keys,
the worker's DEBUG log, ``celery inspect``, the hooks (the test plugin's records), the queues.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import phonenumbers
import pytest
from celery.signals import before_task_publish

from blockfilter import hookimpl
from blockfilter.pipeline.monitoring import (
    MaskedRequest,
    describe_arguments,
    hide_published_arguments,
)
from blockfilter.redact import HIDDEN_ARGUMENTS
from blockfilter.tasks import TASK_NAME, filter_campaign
from blockfilter.testing.simulator import FaultRule
from tests.support.env import ROOT, TEST_KEY, TEST_SID, subprocess_env
from tests.support.harness import (
    RETRY_ATTEMPTS,
    TASK_MAX_RETRIES,
    Stack,
)

COLLECT = "blockfilter.collect"
# The collector is an extra (celery-batches pins Celery below 5.7): without it, its parts skip.
HAS_COLLECTOR = importlib.util.find_spec("celery_batches") is not None
needs_collector = pytest.mark.skipif(not HAS_COLLECTOR, reason="blockfilter[collector] absent")
# Text of the messages: no more allowed in Celery's stores than the numbers.
TEXT = "Namaste Ravi, your code is 4711"


def spellings(e164: str) -> set[str]:
    """Every way a log or a store could write the number: E.164, without the "+", national
    with and without spaces, the national significant number, international with spaces."""
    parsed = phonenumbers.parse(e164)
    national = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.NATIONAL)
    international = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.INTERNATIONAL)
    return {
        e164,
        e164[1:],
        national,
        national.replace(" ", ""),
        phonenumbers.national_significant_number(parsed),
        international,
    }


def leaks(text: str, numbers: list[str]) -> list[str]:
    """The spellings of ``numbers`` that appear in ``text``."""
    return sorted({s for n in numbers for s in spellings(n) if s in text})


def number(i: int) -> str:
    return f"+91984{i:07d}"


def campaign(tag: str, base: int, size: int) -> list[dict[str, Any]]:
    """Messages whose ``to`` is written in E.164, national with spaces or without the "+"."""
    messages = []
    for i in range(size):
        e164 = number(base + i)
        parsed = phonenumbers.parse(e164)
        national = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.NATIONAL)
        to, region = [(e164, None), (national, "IN"), (e164[1:], "IN")][i % 3]
        message: dict[str, Any] = {
            "id": f"{tag}{i}",
            "channel": "sms",
            "to": to,
            "text": f"{TEXT} ({tag}{i})",
            "fallback": ["whatsapp"],
        }
        if region:
            message["region"] = region
        messages.append(message)
    return messages


@pytest.fixture
def stack(amqp_stack: Stack) -> Stack:
    return amqp_stack


class BackendTap:
    """Every state the Redis result backend stored for the test, as it was stored.

    The backend publishes each state on its key's channel as it writes it: a ``RETRY`` or
    ``STARTED`` state overwritten later is still seen here.
    """

    def __init__(self, stack: Stack) -> None:
        self.values: list[str] = []
        self._pubsub = stack.redis.pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe(
            **{f"{stack.keyprefix}celery-task-meta-*": self._store}  # type: ignore[arg-type]
        )
        self._thread = self._pubsub.run_in_thread(sleep_time=0.05, daemon=True)

    def _store(self, message: dict[str, Any]) -> None:
        self.values.append(message["data"].decode("utf-8", "replace"))

    def close(self) -> None:
        if self._thread.is_alive():
            self._thread.stop()
            self._thread.join(timeout=5)
            self._pubsub.close()


def stored_results(stack: Stack) -> dict[str, str]:
    """Every result the backend holds for this test: key -> stored text."""
    found = {}
    for key in stack.redis.scan_iter(match=f"{stack.keyprefix}celery-task-meta-*", count=500):
        value = stack.redis.get(key)
        if value is not None:
            found[key.decode()] = value.decode("utf-8", "replace")
    return found


# -- fast: what monitoring is shown ------------------------------------------------------------


def test_arguments_are_described_by_counts_and_types_only() -> None:
    messages = [{"id": "1", "channel": "sms", "to": "+919840000001", "text": TEXT}] * 120
    assert describe_arguments((messages,), {}) == ("[120 messages]", "{}")
    assert describe_arguments(
        (messages[0],), {"carried_summary": {"total": 3}, "message": "098400 00001"}
    ) == ("[1 message]", "{'carried_summary': 1 message, 'message': str}")
    assert describe_arguments(None, None) == ("[]", "{}")


def test_a_send_by_name_gets_the_summary_in_its_headers() -> None:
    headers: dict[str, Any] = {"argsrepr": "[{'to': '+919840000001'}]", "kwargsrepr": "{}"}
    body = ([{"id": "1", "to": "+919840000001"}], {}, {})
    hide_published_arguments(sender=COLLECT, body=body, headers=headers)
    assert headers == {"argsrepr": "[1 message]", "kwargsrepr": "{}"}
    other = {"argsrepr": "['+919840000001']", "kwargsrepr": "{}"}
    hide_published_arguments(sender="pipeline.send", body=body, headers=other)
    assert other["argsrepr"] == "['+919840000001']", "a user's own task is left alone"


# -- slow: items 1, 2 and 3 on a real worker ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("pool", ["prefork", "solo", "threads"])
def test_no_number_or_text_in_the_result_backend_or_a_debug_worker_log(
    stack: Stack, pool: str, request: pytest.FixtureRequest
) -> None:
    env = stack.worker_env()
    env["BLOCKFILTER_COLLECT_FLUSH_INTERVAL"] = "0.3"
    # Room for a slow answer (g, below) within one attempt.
    env["BLOCKFILTER_REQUEST_TIMEOUT"] = "10"
    env["BLOCKFILTER_RETRY_DEADLINE"] = "20"
    # The strictest deployment: extended results, STARTED states, remote control for inspect.
    env["BFTEST_EXTRA_CONF"] = json.dumps(
        {
            "result_extended": True,
            "task_track_started": True,
            "worker_enable_remote_control": True,
        }
    )
    tap = BackendTap(stack)
    request.addfinalizer(tap.close)
    worker = stack.start_worker(env=env, pool=pool, loglevel="DEBUG")
    sent: list[dict[str, Any]] = []

    def e164s() -> list[str]:
        return [number(int(m["id"][1:]) + base_of[m["id"][0]]) for m in sent]

    base_of = {"a": 0, "b": 100, "c": 200, "d": 300, "e": 400, "f": 500, "g": 600}

    # a: checked after a failed first attempt (a RETRY state), some blocklisted, rerouted.
    a = campaign("a", 0, 30)
    stack.simulator.block("sms", *(number(i) for i in range(0, 30, 4)))
    stack.simulator.block("whatsapp", number(0))
    stack.simulator.set_faults([FaultRule("wa500", first=RETRY_ATTEMPTS)])
    sent += a
    summary = stack.app.send_task(TASK_NAME, args=[a]).get(timeout=60)
    assert summary["total"] == 30
    stack.simulator.clear_faults()

    # b: the dispatch hook fails once, quoting a number (RETRY with the hook's exception).
    b = campaign("b", 100, 12)
    sent += b
    stack.redis.set(stack.fail_key, 1)
    assert stack.app.send_task(TASK_NAME, args=[b]).get(timeout=60)["total"] == 12

    # c: the hook fails on every attempt (FAILURE, its exception and traceback stored).
    c = campaign("c", 200, 6)
    sent += c
    stack.redis.set(stack.fail_key, 1 + TASK_MAX_RETRIES)
    failed = stack.app.send_task(TASK_NAME, args=[c])
    with pytest.raises(Exception, match="fails on purpose") as caught:
        failed.get(timeout=60)
    assert "XXXX" in str(caught.value), "the stored exception was not masked"
    stack.redis.delete(stack.fail_key)

    # d: the collector, sent the way the README shows (ignore_result is False on the message).
    d = campaign("d", 300, 9) if HAS_COLLECTOR else []
    sent += d
    collected = [stack.app.send_task(COLLECT, args=[m]) for m in d]

    # e: a producer that never imported blockfilter: the raw repr travels in the headers.
    e = campaign("e", 400, 7)
    sent += e
    before_task_publish.disconnect(dispatch_uid="blockfilter.hide_published_arguments")
    try:
        bare = stack.app.send_task(TASK_NAME, args=[e], argsrepr=repr([e]))
    finally:
        before_task_publish.connect(
            hide_published_arguments,
            weak=False,
            dispatch_uid="blockfilter.hide_published_arguments",
        )
    assert bare.get(timeout=60)["total"] == 7

    # f: a campaign split into a group.
    f = campaign("f", 500, 10)
    sent += f
    assert sum(s["total"] for s in filter_campaign(f, chunk_size=5, app=stack.app).get(60)) == 10

    # g: `celery inspect active` while a batch waits on a slow API (a solo worker answers
    # no remote control while it runs a task).
    g = campaign("g", 600, 5)
    sent += g
    stack.simulator.set_latency(3.0)
    slow = stack.app.send_task(TASK_NAME, args=[g])
    active_seen = ""
    deadline = time.monotonic() + 30
    while pool != "solo" and not active_seen and time.monotonic() < deadline:
        replies = stack.app.control.inspect(destination=[worker.nodename], timeout=1.0).active()
        for tasks in (replies or {}).values():
            if any(t.get("id") == slow.id for t in tasks):
                active_seen = json.dumps(replies)
    if pool != "solo":
        assert active_seen, "the slow task never showed in `celery inspect active`"
        assert "[5 messages]" in active_seen
    assert slow.get(timeout=60)["total"] == 5
    stack.simulator.set_latency(0.0)

    # Every message reached a hook, but c's: its hook failed every time, it waits parked.
    every_id = {m["id"] for m in sent} - {m["id"] for m in c}
    stack.wait_records(
        lambda rs: {r["id"] for r in rs} >= every_id, timeout=60, what="every message"
    )
    numbers = e164s()

    # 1: the result backend holds summaries, never a message: now, nor at any state before.
    time.sleep(0.5)  # the tap's thread catches up
    tap.close()
    stored = stored_results(stack)
    assert len(stored) >= 7, sorted(stored)  # a, b, c, e, f (two tasks), g
    text = "\n".join([*stored.values(), *tap.values])
    assert leaks(text, numbers) == []
    assert TEXT not in text
    assert not any(r.id in key for r in collected for key in stored), "collect stored a result"
    assert '"args": ["[30 messages]", "{}"]' in text, "result_extended was not in effect"
    states = Counter(json.loads(value)["status"] for value in tap.values)
    assert states["RETRY"] >= 2 and states["FAILURE"] == 1, states
    failure = next(v for v in tap.values if '"status": "FAILURE"' in v)
    assert "fails on purpose" in failure and "XXXX" in failure  # the exception, masked

    # 2: inspect shows the summary (checked above, and never the messages).
    assert leaks(active_seen, numbers) == [] and TEXT not in active_seen

    # 3: the worker's DEBUG log, main process and pool alike.
    log = worker.log_text()
    assert "TaskPool: Apply" in log and HIDDEN_ARGUMENTS in log, "no DEBUG lines to check"
    assert f"{TASK_NAME}[{bare.id}] received" in log
    assert leaks(log, numbers) == [], leaks(log, numbers)
    assert TEXT not in log


def test_worker_requests_show_the_summary_whatever_the_producer_sent() -> None:
    from kombu import Message

    from tests.support.factory import make_app

    app = make_app(
        broker="memory://", backend="cache+memory://", queue="q", deferred_queue="", keyprefix=""
    )
    messages = [{"id": "1", "channel": "sms", "to": "098400 00001", "region": "IN"}]
    headers = {
        "lang": "py",
        "task": TASK_NAME,
        "id": "6c1f0b5e-0b0e-4b8e-9a53-2d1a3c4b5d6e",
        "argsrepr": repr([messages]),
        "kwargsrepr": "{}",
    }
    message = Message(
        body=json.dumps([[messages], {}, {}]),
        headers=headers,
        content_type="application/json",
        content_encoding="utf-8",
    )
    request = MaskedRequest(message, app=app, task=app.tasks[TASK_NAME])
    shown = json.dumps(
        [request.info(safe=False), request.argsrepr, request.request_dict], default=str
    )
    assert "[1 message]" in shown
    assert leaks(shown, ["+919840000001"]) == []
    assert request.args == [messages], "the task still gets its messages"
    assert Counter(type(a).__name__ for a in request.args) == {"list": 1}


# -- slow: items 4 and 5, problems that shout --------------------------------------------------


def parked_reasons(stack: Stack, expected: int, timeout: float = 15.0) -> Counter[str]:
    """The ``x-blockfilter-reason`` headers of the deferred queue's messages (left there)."""
    from blockfilter.tasks import deferred_queue

    reasons: Counter[str] = Counter()
    with stack.app.connection_for_read() as connection:
        inbox = connection.SimpleQueue(deferred_queue(stack.app))
        deadline = time.monotonic() + timeout
        try:
            while sum(reasons.values()) < expected and time.monotonic() < deadline:
                try:
                    message = inbox.get(block=True, timeout=0.5)
                except inbox.Empty:
                    continue
                reasons[message.headers.get("x-blockfilter-reason")] += 1
        finally:
            inbox.close()
    return reasons


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_refused_credentials_log_an_error_naming_the_refusal_and_park_as_such(
    stack: Stack,
) -> None:
    env = stack.worker_env()
    env["BLOCKFILTER_COLLECT_FLUSH_INTERVAL"] = "0.3"
    worker = stack.start_worker(env=env)
    stack.simulator.set_faults([FaultRule("rbc001")])

    batch = campaign("r", 700, 8)
    summary = stack.app.send_task(TASK_NAME, args=[batch]).get(timeout=30)
    assert summary["credentials_refused"] is True
    one_by_one = campaign("q", 800, 4) if HAS_COLLECTOR else []
    for message in one_by_one:
        stack.app.send_task(COLLECT, args=[message])
    total = len(batch) + len(one_by_one)
    records = stack.wait_records(lambda rs: len(rs) >= total, timeout=30, what="the suppressed")
    assert Counter((r["hook"], r["verdict"], r["reason"]) for r in records) == {
        ("suppressed", "deferred", "credentials_refused"): total
    }
    assert parked_reasons(stack, total) == {"credentials_refused": total}

    log = worker.log_text()
    errors = [line for line in log.splitlines() if "ERROR/" in line and "RBC001" in line]
    tasks = {TASK_NAME, COLLECT} if HAS_COLLECTOR else {TASK_NAME}
    assert len(errors) >= len(tasks), log[-3000:]  # one per batch
    for line in errors:
        assert "HTTP 401" in line and "KALEYRA_SID / KALEYRA_API_KEY" in line
        assert "KALEYRA_API_KEY from env KALEYRA_API_KEY" in line
    assert tasks == {line.split("]")[1].split(":")[0].strip() for line in errors}
    assert TEST_KEY not in log and "check_failed" not in log


def run_worker_to_exit(stack: Stack, **env: str) -> tuple[int, str]:
    worker_env = stack.worker_env()
    for name, value in env.items():
        if value:
            worker_env[name] = value
        else:
            worker_env.pop(name, None)
    return stack.make_worker(env=worker_env).run_to_exit(timeout=60)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_misconfigured_worker_refuses_to_start_with_one_critical_line(stack: Stack) -> None:
    status, output = run_worker_to_exit(stack, KALEYRA_SID="")
    critical = [line for line in output.splitlines() if "CRITICAL" in line]
    assert status == 78, output[-3000:]
    assert len(critical) == 1, output[-3000:]
    assert "KALEYRA_SID is not set" in critical[0] and "refuses to start" in critical[0]
    assert " ready." not in output and "Traceback" not in output

    status, output = run_worker_to_exit(stack, BLOCKFILTER_ON_ERROR="maybe")
    assert status == 78 and "BLOCKFILTER_ON_ERROR" in output, output[-3000:]

    # Opt-in: one request validates the credentials, refused ones stop the worker too.
    requests_before = stack.simulator.stats.requests
    status, output = run_worker_to_exit(
        stack, BLOCKFILTER_STARTUP_CHECK="api", KALEYRA_API_KEY="not-the-key-0000"
    )
    critical = [line for line in output.splitlines() if "CRITICAL" in line]
    assert status == 78 and len(critical) == 1, output[-3000:]
    assert "RBC001" in critical[0] and "not-the-key" not in output
    assert stack.simulator.stats.requests == requests_before + 1

    # The same worker, right key: it starts, after one request.
    env = stack.worker_env()
    env["BLOCKFILTER_STARTUP_CHECK"] = "api"
    worker = stack.start_worker(env=env)
    assert "Kaleyra accepted the credentials" in worker.log_text()
    assert stack.simulator.stats.requests == requests_before + 2
    worker.stop()

    # Off: a worker that serves other tasks too may start without the check.
    env = stack.worker_env()
    env.pop("KALEYRA_SID")
    env["BLOCKFILTER_STARTUP_CHECK"] = "off"
    stack.start_worker(env=env).stop()


# -- item 8: eager mode with no broker ---------------------------------------------------------


class Recorder:
    """A pipeline plugin registered in this process: what reached each hook."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str, str | None]] = []

    def _record(self, hook: str, messages: list[dict[str, Any]]) -> None:
        self.seen += [(hook, m["id"], m["verdict"], m.get("reason")) for m in messages]

    @hookimpl
    def blockfilter_dispatch(self, messages: list[dict[str, Any]]) -> None:
        self._record("dispatch", messages)

    @hookimpl
    def blockfilter_suppressed(self, messages: list[dict[str, Any]]) -> None:
        self._record("suppressed", messages)


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("task", [TASK_NAME, pytest.param(COLLECT, marks=needs_collector)])
def test_eager_mode_with_an_unreachable_broker_hands_every_deferred_message_to_a_hook(
    task: str, caplog: pytest.LogCaptureFixture
) -> None:
    from celery import Celery

    from blockfilter.config import load_settings
    from blockfilter.plugins.manager import get_plugin_manager, reset_plugin_manager
    from blockfilter.tasks import DeferredNotParked
    from blockfilter.testing.simulator import Simulator
    from tests.support.private_servers import free_port

    app = Celery("eager", broker=f"amqp://guest:guest@127.0.0.1:{free_port()}//")
    app.conf.update(
        task_always_eager=True,
        task_eager_propagates=True,
        result_backend="cache+memory://",
        broker_connection_timeout=1,
        broker_connection_max_retries=1,
        kaleyra_sid=TEST_SID,
        kaleyra_api_key=TEST_KEY,
        blockfilter_load_plugins="",
        blockfilter_retry_attempts=2,
        blockfilter_backoff_base=0.01,
        blockfilter_backoff_max=0.02,
        blockfilter_task_max_retries=1,
        blockfilter_task_retry_backoff=0.01,
        blockfilter_cache_url="memory://",
    )
    app.autodiscover_tasks(["blockfilter"])
    recorder = Recorder()
    with Simulator(sid=TEST_SID, api_key=TEST_KEY) as simulator:
        app.conf.kaleyra_base_url = simulator.base_url
        simulator.set_faults([FaultRule("wa500")])  # the API is down too: every check fails
        messages = campaign("z", 900, 4)
        reset_plugin_manager()
        get_plugin_manager(load_settings(celery_conf=app.conf)).register(recorder)
        caplog.set_level(logging.ERROR, logger="blockfilter")
        try:
            with pytest.raises(DeferredNotParked, match="could not be parked"):
                if task == TASK_NAME:
                    app.tasks[task].delay(messages)
                else:
                    for message in messages:
                        app.tasks[task].delay(message)
        finally:
            reset_plugin_manager()
    # Neither parked (no broker) nor lost: suppressed as deferred, and the failure is loud.
    expected = messages if task == TASK_NAME else messages[:1]
    assert recorder.seen == [("suppressed", m["id"], "deferred", "check_failed") for m in expected]
    assert any("could not park" in r.getMessage() for r in caplog.records)


# -- the smaller ones --------------------------------------------------------------------------


def test_settings_with_celerys_namespace_are_read() -> None:
    from celery import Celery

    from blockfilter.config import load_settings

    class Settings:
        CELERY_BROKER_URL = "memory://"
        CELERY_KALEYRA_SID = "NAMESPACED"
        CELERY_BLOCKFILTER_ON_ERROR = "drop"
        CELERY_BLOCKFILTER_COLLECT_FLUSH_INTERVAL = "0.5"

    app = Celery("namespaced", set_as_current=False)
    app.config_from_object(Settings, namespace="CELERY")
    settings = load_settings(environ={}, celery_conf=app.conf)
    assert (settings.sid, settings.on_error) == ("NAMESPACED", "drop")
    assert settings.sources["sid"] == "celery conf kaleyra_sid"
    if HAS_COLLECTOR:
        from blockfilter.pipeline.collector import collect_settings

        assert collect_settings(app.conf, {}).flush_interval == 0.5


def run_blockfilter(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blockfilter", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_config_shows_what_a_worker_of_the_app_sees() -> None:
    extra_conf = {"kaleyra_sid": "FROMCONF", "blockfilter_collect_flush_interval": 0.5}
    env = subprocess_env(KALEYRA_SID="FROMENV", BFTEST_EXTRA_CONF=json.dumps(extra_conf))
    done = run_blockfilter("config", "--app", "tests.support.app", env=env)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()}
    assert rows["KALEYRA_SID"] == ["FROMCONF", "(celery", "conf", "kaleyra_sid)"]
    if HAS_COLLECTOR:
        assert rows["BLOCKFILTER_COLLECT_FLUSH_INTERVAL"][0] == "0.5"
        assert rows["BLOCKFILTER_COLLECT_MAX_BUFFER"] == ["1000", "(default)"]
    done = run_blockfilter("config", env=env)
    assert "FROMENV" in done.stdout, "without --app: the environment's"


def test_a_wrong_option_prints_its_subcommands_usage_and_every_option_has_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import argparse

    from blockfilter.cli import build_parser, main

    with pytest.raises(SystemExit) as exited:
        main(["replay", "--brokr", "amqp://"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: blockfilter replay") and "--brokr" in err

    def undocumented(parser: argparse.ArgumentParser, path: str) -> list[str]:
        found = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found += undocumented(sub, f"{path} {name}")
            elif not action.help:
                found.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
        return found

    assert undocumented(build_parser(), "blockfilter") == []
