"""One verdict everywhere: an installed plugin's opt-out list counts whichever way in.

The pipeline's opt-out list is an installed distribution (a ``.dist-info`` with an
``entry_points.txt``, and its module, in a directory on ``PYTHONPATH``: what ``pip install``
leaves, found by ``importlib.metadata`` the same way) implementing ``blockfilter_blocklisted``.
The README's Python example run as written, ``blockfilter check``, ``blockfilter filter`` and
both Celery tasks on a real worker must give its numbers the verdict the list means; the
documented ways out (``plugins=False``, ``sources=``) leave it out.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import phonenumbers
import pytest

from blockfilter.engine.filter import Filter
from blockfilter.errors import CheckFailed
from blockfilter.pipeline.collector import COLLECT_TASK_NAME
from blockfilter.plugins.hookspecs import hookimpl
from blockfilter.plugins.manager import make_plugin_manager
from blockfilter.sources import FunctionSource
from blockfilter.tasks import TASK_NAME
from blockfilter.testing.simulator import Simulator
from tests.conftest import fast_settings
from tests.support.env import ROOT, subprocess_env
from tests.support.harness import (
    Stack,
    install_plugin_dist,
    require_broker,
)
from tests.support.workers import Worker

# The plugin: an opt-out table read from BF_OPTOUT_<CHANNEL> (comma-separated E.164), so every
# process a test starts (commands, workers) reads the same table.
OPTOUT_MODULE = '''\
"""A pipeline's own opt-out list, as an installed blockfilter plugin."""
import os

from blockfilter import hookimpl


@hookimpl
def blockfilter_blocklisted(channel, numbers):
    if os.environ.get("BF_OPTOUT_DOWN"):
        raise ConnectionError("opt-out database down while asked about " + numbers[0])
    opted_out = set(os.environ.get("BF_OPTOUT_" + channel.upper(), "").split(","))
    return [n for n in numbers if n in opted_out]
'''


def install_optout_dist(site: Path) -> Path:
    """Install the opt-out plugin into ``site`` as the distribution ``bf-optout 1.0``."""
    site.mkdir(parents=True, exist_ok=True)
    (site / "bf_optout.py").write_text(OPTOUT_MODULE, encoding="utf-8")
    info = site / "bf_optout-1.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: bf-optout\nVersion: 1.0\n", encoding="utf-8"
    )
    (info / "entry_points.txt").write_text("[blockfilter]\noptout = bf_optout\n", encoding="utf-8")
    return site


# A plugin manager of its own for every test (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("fresh_plugin_manager")


# -- the README's example and what should become of its messages ------------------------------


def readme_python_example() -> str:
    """The first Python block of the README's "Use it from Python" section, as written."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Use it from Python\n(.*?)(?=^## )", readme, re.MULTILINE | re.DOTALL)
    assert section is not None, "README.md has no 'Use it from Python' section"
    block = re.search(r"```python\n(.*?)```", section.group(1), re.DOTALL)
    assert block is not None, "the 'Use it from Python' section has no Python example"
    return block.group(1)


def readme_messages(example: str) -> list[dict[str, Any]]:
    """The ``messages = [...]`` the example filters, read without running it."""
    for node in ast.walk(ast.parse(example)):
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "messages" for target in node.targets
        ):
            messages: list[dict[str, Any]] = ast.literal_eval(node.value)
            return messages
    raise AssertionError("the README's example assigns no `messages` list")


def e164(message: dict[str, Any]) -> str:
    number = phonenumbers.parse(message["to"], message.get("region"))
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def expected_verdicts(
    messages: list[dict[str, Any]], blocklisted: dict[str, set[str]]
) -> dict[str, tuple[str, str]]:
    """id -> (verdict, final channel) for numbers ``blocklisted`` per channel, worked out
    without blockfilter."""
    expected = {}
    for message in messages:
        number, channel = e164(message), message["channel"].lower()
        if number not in blocklisted.get(channel, set()):
            expected[message["id"]] = ("allowed", channel)
            continue
        for fallback in message.get("fallback", []):
            if number not in blocklisted.get(fallback, set()):
                expected[message["id"]] = ("rerouted", fallback)
                break
        else:
            expected[message["id"]] = ("blocked", channel)
    return expected


def surface_env(simulator: Simulator, site: Path, opted_out: set[str]) -> dict[str, str]:
    """A user's shell: credentials for the simulator, the plugin installed, its opt-outs."""
    return subprocess_env(simulator, path=[site], BF_OPTOUT_SMS=",".join(sorted(opted_out)))


def run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


def lowered(verdicts: dict[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    return {i: (verdict, str(channel).lower()) for i, (verdict, channel) in verdicts.items()}


# -- every way in -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_every_way_in_gives_the_installed_plugins_verdict(tmp_path: Path) -> None:
    example = readme_python_example()
    messages = readme_messages(example)
    # The pipeline opted every number of the example out of SMS; Kaleyra blocklists none.
    opted_out = {e164(m) for m in messages if m["channel"].lower() == "sms"}
    expected = expected_verdicts(messages, {"sms": opted_out})
    assert {verdict for verdict, _ in expected.values()} != {"allowed"}
    site = install_optout_dist(tmp_path / "site")
    stack = Stack("amqp", require_broker("amqp"), tmp_path, install_plugin_dist(tmp_path / "rec"))
    try:
        env = surface_env(stack.simulator, site, opted_out)
        seen: dict[str, dict[str, tuple[str, str]]] = {}

        done = run(["-c", example], env, tmp_path)
        assert done.returncode == 0, done.stderr
        printed = [line.split() for line in done.stdout.splitlines()[: len(messages)]]
        seen["README example"] = lowered({i: (v, c) for i, v, c in printed})

        # check: which numbers are blocklisted on each channel a message may end on.
        blocklisted: dict[str, set[str]] = {}
        asked = [e164(m) for m in messages]
        for channel in ("sms", "whatsapp", "voice"):
            done = run(["-m", "blockfilter", "check", "--channel", channel, *asked], env, tmp_path)
            assert done.returncode == 0, done.stderr
            blocklisted[channel] = set(done.stdout.split())
        seen["blockfilter check"] = expected_verdicts(messages, blocklisted)

        campaign = tmp_path / "campaign.jsonl"
        campaign.write_text("".join(json.dumps(m) + "\n" for m in messages), encoding="utf-8")
        done = run(["-m", "blockfilter", "filter", str(campaign), "--quiet"], env, tmp_path)
        assert done.returncode == 0, done.stderr
        records = [json.loads(line) for line in done.stdout.splitlines()]
        seen["blockfilter filter"] = lowered(
            {r["id"]: (r["verdict"], r["channel"]) for r in records}
        )

        worker_env = stack.worker_env()
        worker_env["PYTHONPATH"] = os.pathsep.join([str(site), worker_env["PYTHONPATH"]])
        worker_env.update(
            BF_OPTOUT_SMS=env["BF_OPTOUT_SMS"], BLOCKFILTER_COLLECT_FLUSH_INTERVAL="0.3"
        )
        worker = Worker(worker_env, stack.queue, tmp_path / "worker.log", f"bfone-{stack.unique}")
        stack.workers.append(worker)
        worker.start()

        summary = stack.app.send_task(TASK_NAME, args=[messages]).get(timeout=60)
        assert summary["total"] == len(messages)
        stack.wait_records(lambda rs: len(rs) >= len(messages), 30, "the batch's verdicts")
        seen[TASK_NAME] = lowered({r["id"]: (r["verdict"], r["channel"]) for r in stack.records()})

        for message in messages:
            stack.app.send_task(COLLECT_TASK_NAME, args=[{**message, "id": "c-" + message["id"]}])
        records = stack.wait_records(
            lambda rs: len(rs) >= 2 * len(messages), 30, "the collected verdicts"
        )
        seen[COLLECT_TASK_NAME] = lowered(
            {r["id"][2:]: (r["verdict"], r["channel"]) for r in records if r["id"][:2] == "c-"}
        )
        time.sleep(0.5)  # nothing more may come
        assert len(stack.records()) == 2 * len(messages)
    finally:
        stack.close()
    assert seen == {way: expected for way in seen}


# -- the Python API: plugins by default, and the ways out ---------------------------------------

A, B, C = "+919812345678", "+919812345679", "+919812345680"


@pytest.fixture
def optout_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The opt-out plugin installed on this process's ``sys.path``, opting ``B`` out of SMS."""
    site = install_optout_dist(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("BF_OPTOUT_SMS", B)
    yield site
    sys.modules.pop("bf_optout", None)


def msg(id_: str, to: str, channel: str = "sms", **extra: Any) -> dict[str, Any]:
    return {"id": id_, "channel": channel, "to": to, **extra}


def verdicts(engine: Filter, messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    with engine:
        return [(r["verdict"], r["channel"]) for r in engine.run(messages)]


def test_filter_joins_the_installed_plugins_unless_told_not_to(
    optout_installed: Path, simulator: Simulator
) -> None:
    simulator.block("sms", A)
    settings = fast_settings(simulator.base_url)
    messages = [msg("a", A), msg("b", B), msg("c", C)]
    # Kaleyra blocklists A, the installed plugin's table B: both count.
    assert verdicts(Filter(settings), messages) == [
        ("blocked", "sms"),
        ("blocked", "sms"),
        ("allowed", "sms"),
    ]
    assert verdicts(Filter(settings, plugins=False), messages) == [
        ("blocked", "sms"),
        ("allowed", "sms"),
        ("allowed", "sms"),
    ]
    nobody = FunctionSource("nobody", lambda channel, numbers: [])
    assert verdicts(Filter(settings, sources=[nobody]), messages) == [("allowed", "sms")] * 3
    with pytest.raises(TypeError, match="sources= or plugins="):
        Filter(settings, sources=[nobody], plugins=True)


def test_filter_follows_the_plugins_reroute_policy_and_shows_the_observers(
    simulator: Simulator,
) -> None:
    class VoiceFirst:
        @hookimpl
        def blockfilter_fallback_channels(
            self, message: dict[str, Any], channel: str, fallback: list[str]
        ) -> list[str]:
            return ["voice", *fallback]

    class Observer:
        def __init__(self) -> None:
            self.seen: list[list[tuple[str, str]]] = []

        @hookimpl
        def blockfilter_verdicts(self, results: list[dict[str, Any]]) -> None:
            self.seen.append([(r["id"], r["verdict"]) for r in results])

    simulator.block("sms", A)
    settings = fast_settings(simulator.base_url, load_plugins=[])
    pm = make_plugin_manager(settings)
    observer = Observer()
    pm.register(VoiceFirst(), name="voice-first")
    pm.register(observer, name="observer")
    messages = [msg("a", A, fallback=["whatsapp"]), msg("c", C), msg("x", "junk")]

    assert verdicts(Filter(settings, plugins=pm), messages) == [
        ("rerouted", "voice"),
        ("allowed", "sms"),
        ("invalid", "sms"),
    ]
    assert observer.seen == [[("a", "rerouted"), ("c", "allowed"), ("x", "invalid")]]

    observer.seen.clear()
    lines = [json.dumps(m).encode() + b"\n" for m in messages]
    with Filter(settings, plugins=pm) as engine:
        out = [json.loads(line) for line in engine.run_lines(lambda: iter(lines))]
    assert [(r["verdict"], r["channel"]) for r in out][:1] == [("rerouted", "voice")]
    assert observer.seen == [[("a", "rerouted"), ("c", "allowed"), ("x", "invalid")]]

    # Without plugins: the message's own fallback, and nobody is shown anything.
    observer.seen.clear()
    assert verdicts(Filter(settings, plugins=False), messages)[0] == ("rerouted", "whatsapp")
    assert observer.seen == []


def test_filter_leaves_the_shared_kaleyra_source_open_and_keeps_the_request_budget(
    simulator: Simulator,
) -> None:
    settings = fast_settings(simulator.base_url, load_plugins=[])
    numbers = [f"+9198{i:08d}" for i in range(150)]  # two requests: 100 and 50
    with Filter(settings, max_requests=1) as engine:
        results = [
            r["verdict"] for r in engine.run([msg(str(i), n) for i, n in enumerate(numbers)])
        ]
    assert (results.count("allowed"), results.count("deferred")) == (100, 50)
    assert simulator.stats.requests == 1
    with Filter(settings) as first:
        list(first.run([msg("1", C)]))
    with Filter(settings) as second:  # the first one's close() left the shared source usable
        list(second.run([msg("1", C)]))
    assert second.sources == first.sources
    assert (simulator.stats.requests, second.summary.cache_hits) == (2, 1)


def test_blocklisted_answers_for_every_number_or_not_at_all(simulator: Simulator) -> None:
    class Table:
        down = False

        @hookimpl
        def blockfilter_blocklisted(self, channel: str, numbers: list[str]) -> list[str]:
            if self.down:
                raise ConnectionError(f"opt-out database down while asked about {numbers[0]}")
            return [n for n in numbers if channel == "sms" and n == B]

    simulator.block("sms", A)
    settings = fast_settings(simulator.base_url, load_plugins=[])
    pm = make_plugin_manager(settings)
    table = Table()
    pm.register(table, name="table")
    with Filter(settings, plugins=pm) as engine:
        assert engine.blocklisted("SMS", [C, B, A, B]) == [B, A]
        assert engine.blocklisted("whatsapp", [A, B]) == []
        table.down = True
        # A is blocklisted whatever the table would say; C cannot be known.
        assert engine.blocklisted("sms", [A]) == [A]
        with pytest.raises(CheckFailed) as caught:
            engine.blocklisted("sms", [A, C])
        with pytest.raises(ValueError):
            engine.blocklisted("fax", [A])
    message = str(caught.value)
    assert "1 of 2 numbers" in message and "table" in message and "ConnectionError" in message
    assert C not in message  # the plugin's words are masked


def check(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blockfilter", "check", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_answers_through_every_source_or_fails_whole(
    simulator: Simulator, tmp_path: Path
) -> None:
    simulator.block("sms", A)
    env = surface_env(simulator, install_optout_dist(tmp_path / "site"), {B, C})
    done = check("--channel", "sms", C, "0981234 5678", B, "--region", "in", env=env)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{C}\n{A}\n{B}\n", "")
    done = check("--channel", "sms", "--json", A, B, env=env)
    assert json.loads(done.stdout) == {"channel": "sms", "blocked": [A, B]}

    env["BF_OPTOUT_DOWN"] = "1"
    done = check("--channel", "sms", B, C, env=env)
    assert (done.returncode, done.stdout) == (1, "")
    assert "the check failed: 2 of 2 numbers could not be checked: optout" in done.stderr
    assert B not in done.stderr and "Traceback" not in done.stderr
    done = check("--channel", "sms", A, env=env)  # blocklisted by Kaleyra: known all the same
    assert (done.returncode, done.stdout) == (0, f"{A}\n")
