"""One verdict everywhere: an installed plugin's opt-out list counts whichever way in.

The pipeline's opt-out list is an installed distribution (a ``.dist-info`` with an
``entry_points.txt``, and its module, in a directory on ``PYTHONPATH``: what ``pip install``
leaves, found by ``importlib.metadata`` the same way) implementing ``blockfilter_blocklisted``.
The README's Python example run as written, ``blockfilter check``, ``blockfilter filter`` and
both Celery tasks on a real worker must give its numbers the verdict the list means; the
documented ways out (``plugins=False``, ``sources=``) leave it out.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the support package is imported as tests.celery_support
    sys.path.insert(0, str(ROOT))

from blockfilter.engine import Filter  # noqa: E402
from blockfilter.errors import CheckFailed  # noqa: E402
from blockfilter.hookspecs import hookimpl  # noqa: E402
from blockfilter.plugins import make_plugin_manager, reset_plugin_manager  # noqa: E402
from blockfilter.simulator import Simulator  # noqa: E402
from blockfilter.sources import FunctionSource  # noqa: E402
from tests.conftest import TEST_KEY, TEST_SID, fast_settings  # noqa: E402

COLLECT_TASK_NAME = "blockfilter.collect"

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


@pytest.fixture(autouse=True)
def fresh_manager() -> Iterator[None]:
    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture
def simulator() -> Iterator[Simulator]:
    with Simulator(sid=TEST_SID, api_key=TEST_KEY) as sim:
        yield sim


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
