"""The plugin contract: discovery, isolation of broken plugins, and every hook doing its job.

Each test builds a fresh plugin manager. Installed plugins are real distributions written into
``tmp_path`` (a ``.dist-info`` with an ``entry_points.txt``, and a module), found by
``importlib.metadata`` exactly as a ``pip install`` would be; checks run against a real
Kaleyra simulator over HTTP.
"""

from __future__ import annotations

import itertools
import logging
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blockfilter import __version__
from blockfilter.config import Settings, load_settings
from blockfilter.errors import ConfigError
from blockfilter.plugins.hookspecs import hookimpl
from blockfilter.plugins.manager import (
    PluginError,
    build_filter,
    describe_plugins,
    dispatch_results,
    get_plugin_manager,
    make_plugin_manager,
    notify_verdicts,
    reset_plugin_manager,
)
from blockfilter.testing.simulator import Simulator
from tests.conftest import fast_settings
from tests.support.env import subprocess_env

A = "+919812345678"
B = "+919812345679"
C = "+919812345680"


# A plugin manager of its own for every test (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("fresh_plugin_manager")


def no_entry_points(**overrides: Any) -> Settings:
    """Settings that load no installed plugin: only the built-ins and the test's own."""
    values: dict[str, Any] = {"load_plugins": []}
    values.update(overrides)
    return load_settings(environ={}, **values)


def ledger_settings(tmp_path: Path) -> Settings:
    """Settings with an SQLite opt-out ledger in tmp_path and no installed plugin."""
    return load_settings(
        environ={},
        load_plugins=[],
        optout_url=f"sqlite:///{tmp_path / 'ledger.sqlite3'}",
        optout_key="k" * 40,
    )


def msg(id_: str, to: str, channel: str = "sms", **extra: Any) -> dict[str, Any]:
    return {"id": id_, "channel": channel, "to": to, **extra}


_unique = itertools.count()


@pytest.fixture
def install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., dict[str, str]]]:
    """Install a fake distribution: ``install("blockfilter-optout", {"optout": source})``.

    Writes ``<dist>-1.0.dist-info`` (METADATA and an ``entry_points.txt`` with a
    ``[blockfilter]`` section) and one module per entry point into a directory on
    ``sys.path``. Returns entry-point name -> module name (unique per test, removed from
    ``sys.modules`` afterwards).
    """
    site = tmp_path / "site-packages"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    imported: list[str] = []

    def install_distribution(
        dist_name: str, plugins: dict[str, str], version: str = "1.0"
    ) -> dict[str, str]:
        modules = {}
        lines = ["[blockfilter]"]
        for entry_point, source in plugins.items():
            module = f"bf_test_plugin_{next(_unique)}"
            (site / f"{module}.py").write_text(textwrap.dedent(source))
            lines.append(f"{entry_point} = {module}")
            modules[entry_point] = module
            imported.append(module)
        info = site / f"{dist_name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: {version}\n"
        )
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        return modules

    yield install_distribution
    for module in imported:
        sys.modules.pop(module, None)


OPTOUT_PLUGIN = f"""
    from blockfilter.plugins.hookspecs import hookimpl

    DISPATCHED = []

    @hookimpl
    def blockfilter_blocklisted(channel, numbers):
        return [n for n in numbers if channel == "sms" and n == "{B}"]

    @hookimpl
    def blockfilter_dispatch(messages):
        DISPATCHED.extend(m["id"] for m in messages)
"""


# -- discovery of installed plugins -----------------------------------------------------------


def test_an_installed_plugin_is_loaded_and_its_hooks_run(
    install: Callable[..., dict[str, str]], simulator: Simulator
) -> None:
    modules = install("blockfilter-optout", {"optout": OPTOUT_PLUGIN})
    simulator.block("sms", A)
    # BLOCKFILTER_LOAD_PLUGINS unset: every entry point is loaded.
    everything = make_plugin_manager(fast_settings(simulator.base_url))
    assert everything.get_plugin("optout") is sys.modules[modules["optout"]]
    assert everything.distributions["optout"] == ("blockfilter-optout", "1.0")

    # The run loads only this test's plugin: no other installed one may change a verdict.
    settings = fast_settings(simulator.base_url, load_plugins=["optout"])
    pm = get_plugin_manager(settings)

    with build_filter(settings, pm) as engine:
        results = list(engine.run([msg("1", A), msg("2", B), msg("3", C)]))
    # Kaleyra blocklists A, the plugin's opt-out table B: both sources are joined.
    assert [r["verdict"] for r in results] == ["blocked", "blocked", "allowed"]

    dispatch_results(pm, results, deferred_final=True)
    assert sys.modules[modules["optout"]].DISPATCHED == ["3"]


def test_a_plugin_that_fails_to_import_is_skipped_with_a_warning_naming_it(
    install: Callable[..., dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    install(
        "blockfilter-mixed",
        {"broken": "import no_such_module_for_blockfilter\n", "optout": OPTOUT_PLUGIN},
    )
    with caplog.at_level(logging.WARNING, logger="blockfilter.plugins"):
        pm = make_plugin_manager(load_settings(environ={}, load_plugins=["broken", "optout"]))
    assert pm.get_plugin("broken") is None
    assert pm.get_plugin("optout") is not None  # the host and the other plugins go on
    warning = next(r.getMessage() for r in caplog.records if "'broken'" in r.getMessage())
    assert "blockfilter-mixed 1.0" in warning
    assert "ModuleNotFoundError" in warning and "no_such_module_for_blockfilter" in warning


def test_a_plugin_with_a_wrong_hook_signature_is_skipped_not_half_registered(
    install: Callable[..., dict[str, str]],
) -> None:
    install(
        "blockfilter-badsig",
        {
            "badsig": """
                from blockfilter.plugins.hookspecs import hookimpl

                @hookimpl
                def blockfilter_dispatch(messages):
                    pass

                @hookimpl
                def blockfilter_suppressed(messages, priority):
                    pass
            """
        },
    )
    pm = make_plugin_manager(load_settings(environ={}, load_plugins=["badsig"]))
    assert pm.get_plugin("badsig") is None
    # Its valid hook was registered before the bad one failed: it must be gone too.
    assert all(i.plugin_name != "badsig" for i in pm.hook.blockfilter_dispatch.get_hookimpls())
    assert any(
        line.startswith("skipped: badsig") and "priority" in line
        for line in describe_plugins(pm=pm)
    )


def test_strict_mode_turns_a_broken_plugin_into_an_error_naming_it(
    install: Callable[..., dict[str, str]],
) -> None:
    install("blockfilter-broken", {"broken": "raise RuntimeError('bad config')\n"})
    with pytest.raises(PluginError, match="'broken'.*RuntimeError: bad config") as caught:
        make_plugin_manager(
            load_settings(environ={"BLOCKFILTER_STRICT_PLUGINS": "1"}, load_plugins=["broken"])
        )
    assert caught.value.plugin_name == "broken"
    assert isinstance(caught.value, ConfigError)  # the command line exits 2 on it


def test_load_plugins_is_an_allowlist_of_entry_points(
    install: Callable[..., dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    noop = "from blockfilter.plugins.hookspecs import hookimpl\n"
    install("blockfilter-two", {"alpha": noop, "beta": noop})

    only_beta = make_plugin_manager(load_settings(environ={"BLOCKFILTER_LOAD_PLUGINS": "beta"}))
    assert only_beta.get_plugin("beta") is not None
    assert only_beta.get_plugin("alpha") is None
    assert "skipped: alpha (blockfilter-two 1.0): not listed in BLOCKFILTER_LOAD_PLUGINS" in (
        describe_plugins(pm=only_beta)
    )

    none = make_plugin_manager(load_settings(environ={"BLOCKFILTER_LOAD_PLUGINS": ""}))
    assert none.get_plugin("alpha") is None and none.get_plugin("beta") is None
    assert none.get_plugin("kaleyra") is not None  # built-ins are not entry points

    with caplog.at_level(logging.WARNING, logger="blockfilter.plugins"):
        make_plugin_manager(load_settings(environ={"BLOCKFILTER_LOAD_PLUGINS": "beta,gamma"}))
    assert any(
        "'gamma'" in r.getMessage() and "not installed" in r.getMessage() for r in caplog.records
    )


def test_disable_plugins_blocks_an_installed_plugin_by_name(
    install: Callable[..., dict[str, str]],
) -> None:
    install("blockfilter-optout", {"optout": OPTOUT_PLUGIN})
    pm = make_plugin_manager(
        load_settings(environ={"BLOCKFILTER_DISABLE_PLUGINS": "optout"}, load_plugins=["optout"])
    )
    assert pm.get_plugin("optout") is None
    assert not pm.hook.blockfilter_blocklisted.get_hookimpls()
    assert (
        "skipped: optout (blockfilter-optout 1.0): disabled by BLOCKFILTER_DISABLE_PLUGINS"
        in describe_plugins(pm=pm)
    )


def test_disabling_kaleyra_with_no_other_source_refuses_to_start() -> None:
    with pytest.raises(PluginError, match="no blocklist source.*refusing to run unchecked"):
        make_plugin_manager(no_entry_points(disable_plugins=["kaleyra"]))


def test_sources_that_never_stand_alone_are_no_source_at_start(
    install: Callable[..., dict[str, str]],
) -> None:
    # Marked as the ledger's are: they only add opt-outs to what another source says.
    install(
        "blockfilter-extra-optouts",
        {
            "extra-optouts": """
                from blockfilter.plugins.hookspecs import hookimpl
                from blockfilter.sources import sources_never_alone

                @hookimpl
                @sources_never_alone
                def blockfilter_blocklist_sources(settings):
                    return None
            """
        },
    )
    with pytest.raises(PluginError, match="no blocklist source.*refusing to run unchecked"):
        make_plugin_manager(
            load_settings(environ={}, load_plugins=["extra-optouts"], disable_plugins=["kaleyra"])
        )
    assert make_plugin_manager(load_settings(environ={}, load_plugins=["extra-optouts"]))


def test_with_kaleyra_disabled_a_plugin_source_alone_does_the_check(
    install: Callable[..., dict[str, str]], simulator: Simulator
) -> None:
    install("blockfilter-optout", {"optout": OPTOUT_PLUGIN})
    simulator.block("sms", A)
    settings = fast_settings(
        simulator.base_url, disable_plugins=["kaleyra"], load_plugins=["optout"]
    )
    pm = make_plugin_manager(settings)
    with build_filter(settings, pm) as engine:
        results = list(engine.run([msg("1", A), msg("2", B)]))
    assert [r["verdict"] for r in results] == ["allowed", "blocked"]
    assert simulator.stats.requests == 0  # Kaleyra was not asked at all


def test_a_misspelt_hook_fails_loudly_naming_the_plugin(
    install: Callable[..., dict[str, str]],
) -> None:
    install(
        "blockfilter-typo",
        {
            "typo": """
                from blockfilter.plugins.hookspecs import hookimpl

                @hookimpl
                def blockfilter_dispach(messages):
                    pass
            """
        },
    )
    with pytest.raises(PluginError, match="'typo'.*'blockfilter_dispach'") as caught:
        make_plugin_manager(load_settings(environ={}, load_plugins=["typo"]))
    assert "did you mean 'blockfilter_dispatch'" in str(caught.value)
    assert caught.value.plugin_name == "typo"


def test_an_entry_point_may_not_take_a_built_in_name(
    install: Callable[..., dict[str, str]],
) -> None:
    install("blockfilter-impostor", {"kaleyra": "x = 1\n"})
    pm = make_plugin_manager(load_settings(environ={}, load_plugins=["kaleyra"]))
    assert type(pm.get_plugin("kaleyra")).__name__ == "KaleyraPlugin"
    assert any(
        line.startswith("skipped: kaleyra (blockfilter-impostor 1.0)")
        for line in describe_plugins(pm=pm)
    )


# -- startup ----------------------------------------------------------------------------------


def test_hook_startup(
    install: Callable[..., dict[str, str]],
) -> None:
    modules = install(
        "blockfilter-picky",
        {
            "picky": """
                from blockfilter.plugins.hookspecs import hookimpl

                SEEN = []

                @hookimpl
                def blockfilter_startup(settings):  # it sees the settings and may refuse
                    SEEN.append(settings.on_error)
                    if settings.on_error == "allow":
                        raise ValueError("picky refuses to fail open")
            """
        },
    )
    make_plugin_manager(
        load_settings(environ={"BLOCKFILTER_ON_ERROR": "drop"}, load_plugins=["picky"])
    )
    assert sys.modules[modules["picky"]].SEEN == ["drop"]
    with pytest.raises(PluginError, match="'picky' refused to start: ValueError: picky refuses"):
        make_plugin_manager(
            load_settings(environ={"BLOCKFILTER_ON_ERROR": "allow"}, load_plugins=["picky"])
        )


def test_importing_blockfilter_loads_no_plugin(
    install: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    marker = tmp_path / "imported"
    install("blockfilter-marker", {"marker": f"open({str(marker)!r}, 'w').close()\n"})
    site = tmp_path / "site-packages"
    code = (
        "import os, blockfilter, blockfilter.plugins.manager, blockfilter.plugins.builtin\n"
        "import blockfilter.plugins.hookspecs\n"
        f"assert not os.path.exists({str(marker)!r}), 'a plugin was loaded at import'\n"
        "from blockfilter.config import load_settings\n"
        "blockfilter.plugins.get_plugin_manager(load_settings(environ={}))\n"
    )
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        env=subprocess_env(path=[site]),
        timeout=60,
    )
    assert marker.exists()  # loaded on first use, not before


def test_the_manager_is_built_once_per_process_and_lazily() -> None:
    settings = no_entry_points()
    first = get_plugin_manager(settings)
    assert get_plugin_manager(settings) is first
    reset_plugin_manager()
    assert get_plugin_manager(settings) is not first


# -- the check: sources and reroutes ----------------------------------------------------------


class OptOutTable:
    """A pipeline's own opt-out table, as a plugin registered in code."""

    def __init__(self, blocked: dict[str, set[str]], failing: bool = False) -> None:
        self.blocked = blocked
        self.failing = failing
        self.asked: list[tuple[str, list[str]]] = []

    @hookimpl
    def blockfilter_blocklisted(self, channel: str, numbers: list[str]) -> list[str]:
        self.asked.append((channel, sorted(numbers)))
        if self.failing:
            raise ConnectionError("opt-out database down")
        return [n for n in numbers if n in self.blocked.get(channel, set())]


def test_hook_blocklisted(simulator: Simulator) -> None:
    # Each implementation is a source joined to the Kaleyra check.
    simulator.block("sms", A)
    settings = fast_settings(simulator.base_url, load_plugins=[])
    pm = make_plugin_manager(settings)
    table = OptOutTable({"sms": {B}, "whatsapp": {C}})
    pm.register(table, name="optout-table")

    messages = [msg("1", A), msg("2", B), msg("3", C), msg("4", C, "whatsapp", fallback=["voice"])]
    with build_filter(settings, pm) as engine:
        results = list(engine.run(messages))
    assert [r["verdict"] for r in results] == ["blocked", "blocked", "allowed", "rerouted"]
    assert results[3]["channel"] == "voice"
    # The plugin is asked about every distinct number, fallback channels included.
    assert ("sms", sorted([A, B, C])) in table.asked
    assert ("voice", [C]) in table.asked
    assert "optout-table" in [s.name for s in engine.sources]


def test_a_failing_plugin_source_defers_its_numbers(simulator: Simulator) -> None:
    settings = fast_settings(simulator.base_url, load_plugins=[])
    pm = make_plugin_manager(settings)
    pm.register(OptOutTable({}, failing=True), name="optout-table")
    with build_filter(settings, pm) as engine:
        results = list(engine.run([msg("1", A)]))
    assert results[0]["verdict"] == "deferred"  # Kaleyra said clean; fail closed anyway


def test_a_blocklisted_hook_returning_a_string_fails_closed(simulator: Simulator) -> None:
    class OneNumber:
        @hookimpl
        def blockfilter_blocklisted(self, channel: str, numbers: list[str]) -> str:
            return A  # a common mistake: iterating it would give characters, "none blocked"

    settings = fast_settings(simulator.base_url, load_plugins=[])
    pm = make_plugin_manager(settings)
    pm.register(OneNumber(), name="one-number")
    with build_filter(settings, pm) as engine:
        results = list(engine.run([msg("1", A)]))
    assert results[0]["verdict"] == "deferred"


def test_hook_blocklist_sources(simulator: Simulator) -> None:
    # A source object joins the check as it is, the filter's own list holding it.
    from blockfilter.sources import FunctionSource

    regulator = FunctionSource("regulator", lambda channel, numbers: [n for n in numbers if n == C])

    class Regulator:
        @hookimpl
        def blockfilter_blocklist_sources(self, settings: Settings) -> list[Any]:
            return [regulator]

    settings = fast_settings(simulator.base_url, load_plugins=[])
    pm = make_plugin_manager(settings)
    pm.register(Regulator(), name="regulator")
    with build_filter(settings, pm) as engine:
        results = list(engine.run([msg("1", A), msg("2", C)]))
    assert [r["verdict"] for r in results] == ["allowed", "blocked"]
    assert regulator in engine.sources


def test_a_source_hook_returning_junk_is_a_plugin_error(simulator: Simulator) -> None:
    class Junk:
        @hookimpl
        def blockfilter_blocklist_sources(self, settings: Settings) -> list[Any]:
            return ["not a source"]

    settings = fast_settings(simulator.base_url, load_plugins=[])
    pm = make_plugin_manager(settings)
    pm.register(Junk(), name="junk")
    with pytest.raises(PluginError, match="not a BlocklistSource.*junk"):
        build_filter(settings, pm)


def test_the_kaleyra_source_is_shared_by_the_filters_of_a_process(simulator: Simulator) -> None:
    settings = fast_settings(simulator.base_url, load_plugins=[])
    pm = make_plugin_manager(settings)
    with build_filter(settings, pm) as first:
        list(first.run([msg("1", A)]))
    with build_filter(settings, pm) as second:
        list(second.run([msg("1", A)]))
        assert second.sources == first.sources
    # The second run was answered by the status cache the first one filled.
    assert simulator.stats.requests == 1
    assert second.summary.cache_hits == 1


def test_max_requests_reaches_the_kaleyra_source(simulator: Simulator) -> None:
    settings = fast_settings(simulator.base_url, load_plugins=[])
    pm = make_plugin_manager(settings)
    numbers = [f"+9198{i:08d}" for i in range(150)]  # two requests of 100 and 50
    with build_filter(settings, pm, max_requests=1) as engine:
        results = list(engine.run([msg(str(i), n) for i, n in enumerate(numbers)]))
    verdicts = [r["verdict"] for r in results]
    assert simulator.stats.requests == 1
    assert verdicts.count("allowed") == 100 and verdicts.count("deferred") == 50


VOICE_FIRST_PLUGIN = """
    from blockfilter.plugins.hookspecs import hookimpl

    @hookimpl
    def blockfilter_fallback_channels(message, channel, fallback):
        # A reroute policy: voice before anything else, for messages marked urgent.
        if not message.get("urgent"):
            return None  # leave it to the next plugin (the built-in default)
        return ["VOICE", "fax", *fallback]
"""


def test_a_reroute_plugin_wins_over_the_built_in_default(
    install: Callable[..., dict[str, str]],
    simulator: Simulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Installed, so registered *before* the built-ins: it wins only because the built-in
    # default is trylast (pluggy calls the last registered first).
    install("blockfilter-voice-first", {"voice-first": VOICE_FIRST_PLUGIN})
    simulator.block("sms", A)
    settings = fast_settings(simulator.base_url, load_plugins=["voice-first"])
    pm = make_plugin_manager(settings)
    messages = [
        msg("urgent", A, fallback=["WhatsApp"], urgent=True),
        msg("normal", A, fallback=["WhatsApp"]),
    ]
    with (
        caplog.at_level(logging.WARNING, logger="blockfilter.plugins"),
        build_filter(settings, pm) as engine,
    ):
        results = list(engine.run(messages))
    assert [(r["verdict"], r["channel"]) for r in results] == [
        ("rerouted", "voice"),  # the plugin's choice, lower-cased
        ("rerouted", "whatsapp"),  # the plugin returned None: the message's own list
    ]
    unknown = [r for r in caplog.records if "'fax'" in r.getMessage()]
    assert len(unknown) == 1  # dropped, and said once, not once per message and pass


def test_without_default_reroute_a_message_is_not_rerouted(simulator: Simulator) -> None:
    simulator.block("sms", A)
    settings = fast_settings(
        simulator.base_url, load_plugins=[], disable_plugins=["default-reroute"]
    )
    pm = make_plugin_manager(settings)
    with build_filter(settings, pm) as engine:
        results = list(engine.run([msg("1", A, fallback=["whatsapp"])]))
    assert results[0]["verdict"] == "blocked"


# -- results to the plugins -------------------------------------------------------------------


class Recorder:
    """Records what each hook was called with."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    @hookimpl
    def blockfilter_dispatch(self, messages: list[dict[str, Any]]) -> None:
        self.calls.append(("dispatch", [m["id"] for m in messages]))

    @hookimpl
    def blockfilter_suppressed(self, messages: list[dict[str, Any]]) -> None:
        self.calls.append(("suppressed", [m["id"] for m in messages]))

    @hookimpl
    def blockfilter_verdicts(self, results: list[dict[str, Any]]) -> None:
        self.calls.append(("verdicts", [r["id"] for r in results]))


def results_of(*verdicts: str) -> list[dict[str, Any]]:
    return [{"id": str(i), "verdict": v} for i, v in enumerate(verdicts, 1)]


def test_dispatch_and_suppressed_get_their_split_and_never_an_empty_list() -> None:
    pm = make_plugin_manager(no_entry_points())
    recorder = Recorder()
    pm.register(recorder)

    mixed = results_of("allowed", "blocked", "rerouted", "invalid", "deferred")
    outcome = dispatch_results(pm, mixed, deferred_final=False)
    assert recorder.calls == [("dispatch", ["1", "3"]), ("suppressed", ["2", "4"])]
    assert [r["id"] for r in outcome.deferred] == ["5"]  # to be retried, not suppressed

    recorder.calls.clear()
    dispatch_results(pm, results_of("deferred", "allowed"), deferred_final=True)
    assert recorder.calls == [("dispatch", ["2"]), ("suppressed", ["1"])]

    recorder.calls.clear()
    dispatch_results(pm, results_of("allowed", "allowed"), deferred_final=True)
    dispatch_results(pm, results_of("blocked"), deferred_final=True)
    dispatch_results(pm, [], deferred_final=True)
    notify_verdicts(pm, [])
    assert recorder.calls == [("dispatch", ["1", "2"]), ("suppressed", ["1"])]


def test_a_failing_dispatch_hook_propagates_so_the_batch_is_retried() -> None:
    class Down:
        @hookimpl
        def blockfilter_dispatch(self, messages: list[dict[str, Any]]) -> None:
            raise ConnectionError("SMS gateway down")

    pm = make_plugin_manager(no_entry_points())
    pm.register(Down())
    with pytest.raises(ConnectionError):
        dispatch_results(pm, results_of("allowed"), deferred_final=True)


def test_observers_see_every_verdict_and_a_failing_one_changes_nothing(
    simulator: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    class Meddler:
        @hookimpl
        def blockfilter_verdicts(self, results: list[dict[str, Any]]) -> None:
            results[0]["verdict"] = "allowed"  # tries to change a verdict, then crashes
            raise RuntimeError(f"metrics backend down while sending {A}")

    simulator.block("sms", A)
    settings = fast_settings(simulator.base_url, load_plugins=[])
    pm = make_plugin_manager(settings)
    recorder = Recorder()
    pm.register(recorder, name="recorder")
    pm.register(Meddler(), name="meddler")  # registered last: called first
    with build_filter(settings, pm) as engine:
        results = list(engine.run([msg("1", A), msg("2", B), msg("3", "junk")]))
    with caplog.at_level(logging.WARNING, logger="blockfilter.plugins"):
        notify_verdicts(pm, results)

    assert recorder.calls == [("verdicts", ["1", "2", "3"])]  # still called, every verdict
    assert [r["verdict"] for r in results] == ["blocked", "allowed", "invalid"]
    warning = next(r.getMessage() for r in caplog.records if "'meddler'" in r.getMessage())
    assert "RuntimeError" in warning and A not in warning  # the number is masked


# -- each hook through a real plugin manager -------------------------------------------------


def checked_by_table(simulator: Simulator, blocked: dict[str, set[str]]) -> tuple[Settings, Any]:
    """A fresh manager whose opt-out table (registered as ``table``) blocklists ``blocked``,
    joined to Kaleyra's check on ``simulator``."""
    settings = fast_settings(simulator.base_url, load_plugins=[])
    pm = make_plugin_manager(settings)
    pm.register(OptOutTable(blocked), name="table")
    return settings, pm


def test_hook_dispatch(simulator: Simulator) -> None:
    class Sender:
        def __init__(self) -> None:
            self.sent: list[list[tuple[str, str]]] = []

        @hookimpl
        def blockfilter_dispatch(self, messages: list[dict[str, Any]]) -> None:
            self.sent.append([(m["id"], m["channel"]) for m in messages])

    sender = Sender()
    settings, pm = checked_by_table(simulator, {"sms": {A}})
    pm.register(sender, name="sender")
    messages = [msg("1", A, fallback=["whatsapp"]), msg("2", B), msg("3", C, "voice"), msg("4", A)]
    with build_filter(settings, pm) as engine:
        results = list(engine.run(messages))
    dispatch_results(pm, results, deferred_final=True)
    # The allowed and rerouted ones, in input order, each on the channel it goes out on.
    assert sender.sent == [[("1", "whatsapp"), ("2", "sms"), ("3", "voice")]]
    dispatch_results(pm, results_of("blocked", "invalid"), deferred_final=True)
    assert len(sender.sent) == 1  # nothing to send: not called with an empty list


def test_hook_suppressed(simulator: Simulator) -> None:
    class Audit:
        def __init__(self) -> None:
            self.seen: list[list[tuple[str, str, str]]] = []

        @hookimpl
        def blockfilter_suppressed(self, messages: list[dict[str, Any]]) -> None:
            self.seen.append([(m["id"], m["verdict"], m["reason"]) for m in messages])

    audit = Audit()
    settings, pm = checked_by_table(simulator, {"sms": {A}})
    pm.register(audit, name="audit")
    with build_filter(settings, pm) as engine:
        results = list(engine.run([msg("1", A), msg("2", B), msg("3", "junk")]))
    dispatch_results(pm, results, deferred_final=True)
    assert audit.seen == [[("1", "blocked", "blocklisted"), ("3", "invalid", "invalid_number")]]
    dispatch_results(pm, results_of("allowed", "deferred"), deferred_final=False)
    assert len(audit.seen) == 1  # a deferred one that will be retried is not suppressed yet


def test_hook_fallback_channels(simulator: Simulator) -> None:
    class ByUrgency:
        @hookimpl
        def blockfilter_fallback_channels(
            self, message: dict[str, Any], channel: str, fallback: list[str]
        ) -> list[str] | None:
            return ["voice", "whatsapp"] if message.get("urgent") else None

    settings, pm = checked_by_table(simulator, {"sms": {A, B}, "voice": {B}})
    pm.register(ByUrgency(), name="by-urgency")
    messages = [
        msg("1", A, urgent=True),
        msg("2", B, urgent=True),
        msg("3", A, fallback=["whatsapp"]),  # None from the plugin: the built-in default
        msg("4", A),
    ]
    with build_filter(settings, pm) as engine:
        results = list(engine.run(messages))
    assert [(r["verdict"], r["channel"]) for r in results] == [
        ("rerouted", "voice"),
        ("rerouted", "whatsapp"),  # voice blocklisted too: the next one the plugin gave
        ("rerouted", "whatsapp"),
        ("blocked", "sms"),
    ]


def test_hook_verdicts(simulator: Simulator) -> None:
    class Observer:
        def __init__(self) -> None:
            self.batches: list[list[tuple[str, str]]] = []

        @hookimpl
        def blockfilter_verdicts(self, results: list[dict[str, Any]]) -> None:
            self.batches.append([(r["id"], r["verdict"]) for r in results])
            results[0]["verdict"] = "allowed"  # a copy: changes no verdict

    observer = Observer()
    settings, pm = checked_by_table(simulator, {"sms": {A}})
    pm.register(observer, name="observer")
    from blockfilter.engine import Filter

    with Filter(settings, plugins=pm) as engine:  # the Python API shows its results
        results = list(engine.run([msg("1", A), msg("2", B)]))
    assert observer.batches == [[("1", "blocked"), ("2", "allowed")]]
    assert [r["verdict"] for r in results] == ["blocked", "allowed"]
    notify_verdicts(pm, [])
    assert len(observer.batches) == 1  # never with an empty list


# -- the hooks' documentation of themselves ---------------------------------------------------


def test_describe_plugins_lists_versions_hooks_and_skipped(
    install: Callable[..., dict[str, str]],
) -> None:
    install(
        "blockfilter-optout",
        {"optout": OPTOUT_PLUGIN, "broken": "import no_such_module_for_blockfilter\n"},
        version="2.3.1",
    )
    pm = make_plugin_manager(
        load_settings(
            environ={}, load_plugins=["optout", "broken"], disable_plugins=["default-reroute"]
        )
    )
    pm.register(Recorder(), name="in-code")
    lines = describe_plugins(pm=pm)
    assert (
        "optout 2.3.1 (from blockfilter-optout): blockfilter_blocklisted, blockfilter_dispatch"
        in lines
    )
    assert f"kaleyra {__version__} (built-in): blockfilter_blocklist_sources" in lines
    assert (
        "in-code (registered in code): blockfilter_dispatch, blockfilter_suppressed, "
        "blockfilter_verdicts" in lines
    )
    assert "skipped: default-reroute (built-in): disabled by BLOCKFILTER_DISABLE_PLUGINS" in lines
    assert any(
        line.startswith(
            "skipped: broken (blockfilter-optout 2.3.1): failed to load: ModuleNotFoundError"
        )
        for line in lines
    )


def test_describe_plugins_reads_the_environment(
    clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BLOCKFILTER_LOAD_PLUGINS", "")
    monkeypatch.setenv("BLOCKFILTER_DISABLE_PLUGINS", "default-reroute")
    lines = describe_plugins()
    assert lines[0].startswith("kaleyra ")
    assert lines[-1].startswith("skipped: default-reroute")


# -- the opt-out ledger's hooks ---------------------------------------------------------------


def test_hook_optout_codes(tmp_path: Path) -> None:
    from blockfilter.ledger import report_send_results
    from blockfilter.ledger.ledger import forget_shared_ledgers, shared_ledger

    class Codes:
        @hookimpl
        def blockfilter_optout_codes(self, provider: str) -> dict[str, bool] | None:
            return {"GONE": True, "OPT-OUT": False} if provider == "kaleyra" else None

    settings = ledger_settings(tmp_path)
    pm = make_plugin_manager(settings)
    pm.register(Codes(), name="codes")
    try:
        report = report_send_results(
            [
                {"to": "+919812300001", "channel": "sms", "provider": "kaleyra", "code": "gone"},
                {"to": "+919812300002", "channel": "sms", "provider": "kaleyra", "code": "OPT-OUT"},
            ],
            settings=settings,
            pm=pm,
        )
        assert (report.opted_out, report.ignored) == (1, 1)
        found = shared_ledger(settings).opted_out({"sms": ["+919812300001", "+919812300002"]})
        assert set(found["sms"]) == {"+919812300001"}
    finally:
        forget_shared_ledgers()


def test_hook_inbound_intent(tmp_path: Path) -> None:
    from blockfilter.ledger import inbound
    from blockfilter.ledger.ledger import forget_shared_ledgers

    seen: list[tuple[str, str | None]] = []

    class Intent:
        @hookimpl
        def blockfilter_inbound_intent(self, text: str, channel: str, locale: str | None) -> str:
            seen.append((channel, locale))
            return "opt_in" if text == "resume please" else "opt_out"

    settings = ledger_settings(tmp_path)
    pm = make_plugin_manager(settings)
    pm.register(Intent(), name="intent")
    try:
        reply = {"from": "+919812300001", "channel": "voice", "locale": "hi"}
        assert inbound({**reply, "text": "STOP"}, settings=settings, pm=pm).keyword == "STOP"
        assert seen == []  # a keyword never reaches the hook
        result = inbound({**reply, "text": "resume please"}, settings=settings, pm=pm)
        assert (result.action, result.keyword) == ("opt_in", "intent")
        assert seen == [("voice", "hi")]
    finally:
        forget_shared_ledgers()
