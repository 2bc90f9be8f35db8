"""The source protocol's capabilities: the filter asks every source the same questions.

Nothing in the filter asks which source is Kaleyra's: a cost estimate, a request budget or a
one-shot run reach any source that has the capability, and a source written to the least
protocol (``name``, ``check_many``, ``stats``) gets the defaults. Checks that need Kaleyra run
against a real simulator over HTTP.
"""

from __future__ import annotations

import ast
import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from blockfilter.config import Settings, load_settings
from blockfilter.engine import Filter
from blockfilter.errors import RequestBudgetExhausted
from blockfilter.plugins import hookspecs
from blockfilter.plugins.builtin import DEFAULT_PLUGINS
from blockfilter.plugins.hookspecs import hookimpl
from blockfilter.plugins.manager import (
    BlockfilterPluginManager,
    PluginError,
    PluginHooks,
    make_plugin_manager,
)
from blockfilter.sources import BaseSource, CheckOutcome, CheckStream, SourceStats, as_source
from blockfilter.testing.simulator import Simulator
from tests.conftest import fast_settings

ROOT = Path(__file__).resolve().parents[1]
A = "+919812345678"
B = "+919812345679"
C = "+919812345680"


# A plugin manager of its own for every test (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("fresh_plugin_manager")


def msg(id_: str, to: str, channel: str = "sms", **extra: Any) -> dict[str, Any]:
    return {"id": id_, "channel": channel, "to": to, **extra}


def lines_of(messages: Sequence[dict[str, Any]]) -> list[bytes]:
    return [json.dumps(m).encode() + b"\n" for m in messages]


class MinimalSource:
    """A third party's source written to the least protocol: no capability at all."""

    name = "minimal"

    def __init__(self, blocked: set[str]) -> None:
        self.blocked = blocked
        self.asked: list[str] = []

    def check_many(self, wanted: Mapping[str, Sequence[str]]) -> Iterator[CheckOutcome]:
        for channel, numbers in wanted.items():
            self.asked.extend(numbers)
            listed = frozenset(n for n in numbers if n in self.blocked)
            yield CheckOutcome(channel, list(numbers), listed, time.time())

    def stats(self) -> SourceStats:
        return SourceStats()


class PaidSource(BaseSource):
    """A third party's source that pays per request of 10 numbers, and counts them."""

    name = "paid"

    def __init__(self, blocked: set[str], max_requests: int | None = None) -> None:
        self.blocked = blocked
        self.max_requests = max_requests
        self.requests = 0
        self.budgeted: list[PaidSource] = []
        self.closed = False
        self.one_shot_told = False

    def check_many(self, wanted: Mapping[str, Sequence[str]]) -> Iterator[CheckOutcome]:
        for channel, numbers in wanted.items():
            for start in range(0, len(numbers), 10):
                chunk = list(numbers[start : start + 10])
                if self.max_requests is not None and self.requests >= self.max_requests:
                    yield CheckOutcome(channel, chunk, error=RequestBudgetExhausted("spent"))
                    continue
                self.requests += 1
                listed = frozenset(n for n in chunk if n in self.blocked)
                yield CheckOutcome(channel, chunk, listed, time.time())

    def stats(self) -> SourceStats:
        return SourceStats(requests=self.requests)

    def estimate_requests(self, wanted: Mapping[str, Sequence[str]]) -> int | None:
        return sum(-(-len(numbers) // 10) for numbers in wanted.values())

    def with_budget(self, max_requests: int) -> PaidSource:
        own = PaidSource(self.blocked, max_requests)
        self.budgeted.append(own)
        return own

    def one_shot(self) -> None:
        self.one_shot_told = True

    def close(self) -> None:
        self.closed = True


class SourcePlugin:
    def __init__(self, *sources: object) -> None:
        self.sources = list(sources)

    @hookimpl
    def blockfilter_blocklist_sources(self, settings: Settings) -> list[Any]:
        return self.sources


def manager_with(settings: Settings, *sources: object) -> Any:
    pm = make_plugin_manager(settings)
    pm.register(SourcePlugin(*sources), name="third-party")
    return pm


def test_a_source_with_a_cost_beside_kaleyra_is_asked_for_the_estimate_too(
    simulator: Simulator,
) -> None:
    settings = fast_settings(simulator.base_url, load_plugins=[])
    paid = PaidSource(set())
    numbers = [f"+9198{i:08d}" for i in range(150)]
    messages = [msg(str(i), n) for i, n in enumerate(numbers)]
    # Registered after the built-ins, so it is called first: no order makes Kaleyra the one.
    with Filter(settings, plugins=manager_with(settings, paid)) as engine:
        assert engine.sources[0] is paid
        # Kaleyra: 150 misses, 2 requests of 100; the paid source: 15 requests of 10.
        assert engine.estimate(lambda: iter(lines_of(messages))) == (17, 17)
    assert simulator.stats.requests == 0  # an estimate asks nothing


def test_the_request_budget_reaches_every_source_that_counts_its_requests(
    simulator: Simulator,
) -> None:
    settings = fast_settings(simulator.base_url, load_plugins=[])
    paid = PaidSource(set())
    numbers = [f"+9198{i:08d}" for i in range(150)]
    messages = [msg(str(i), n) for i, n in enumerate(numbers)]
    with Filter(settings, plugins=manager_with(settings, paid), max_requests=2) as engine:
        results = list(engine.run(messages))
        [own] = paid.budgeted
        assert own in engine.sources and paid not in engine.sources
    verdicts = [r["verdict"] for r in results]
    # Kaleyra answers the 150 numbers in its 2 requests, the paid source 20 in its 2: a number
    # is allowed only when every source answered for it.
    assert verdicts.count("allowed") == 20 and verdicts.count("deferred") == 130
    assert simulator.stats.requests == 2
    assert own.closed and not paid.closed  # the budgeted copy was the filter's own to close


def test_a_source_without_capabilities_works_and_gets_their_defaults(
    simulator: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    simulator.block("sms", A)
    settings = fast_settings(simulator.base_url, load_plugins=[])
    minimal = MinimalSource({B})
    messages = [msg("1", A), msg("2", B), msg("3", C, fallback=["voice"])]
    pm = manager_with(settings, minimal)
    with (
        caplog.at_level(logging.WARNING, logger="blockfilter.engine"),
        Filter(settings, plugins=pm, max_requests=5) as f,
    ):
        assert [r["verdict"] for r in f.run(messages)] == ["blocked", "blocked", "allowed"]
        # It costs nothing the filter could count: only Kaleyra's requests are, and the
        # cache answers the numbers now, all but C on its fallback channel.
        assert f.estimate(lambda: iter(lines_of(messages))) == (0, 1)
        assert f.blocklisted("sms", [A, B, C]) == [A, B]
        for source in f.sources:
            source.one_shot()
    assert sorted(set(minimal.asked)) == [A, B, C]
    assert not [r for r in caplog.records if "max_requests" in r.getMessage()]

    adapted = as_source(minimal)
    assert adapted.name == "minimal" and adapted.estimate_requests({"sms": [A]}) is None
    assert adapted.with_budget(3) is adapted and adapted.stands_alone
    adapted.close()  # nothing to release


def test_a_minimal_source_keeps_a_stream_of_its_own() -> None:
    class Streaming(MinimalSource):
        streams = 0

        def stream(self) -> CheckStream:
            Streaming.streams += 1
            from blockfilter.sources import BufferedStream

            return BufferedStream(self)

    source = Streaming({A})
    with Filter(load_settings(environ={}), sources=[source]) as engine:
        assert [r["verdict"] for r in engine.run([msg("1", A), msg("2", B)])] == [
            "blocked",
            "allowed",
        ]
    assert Streaming.streams == 1


def test_a_budget_no_source_takes_is_said(caplog: pytest.LogCaptureFixture) -> None:
    settings = load_settings(environ={})
    with (
        caplog.at_level(logging.WARNING, logger="blockfilter.engine"),
        Filter(settings, sources=[MinimalSource(set())], max_requests=1) as engine,
    ):
        list(engine.run([msg("1", A)]))
    assert any("no blocklist source makes requests" in r.getMessage() for r in caplog.records)


def test_a_filter_with_no_plugin_registered_fails_closed() -> None:
    bare = BlockfilterPluginManager()
    bare.add_hookspecs(hookspecs)
    engine = Filter(load_settings(environ={}), plugins=bare)
    with pytest.raises(PluginError, match="no blocklist source.*refusing to run unchecked"):
        list(engine.run([msg("1", A)]))
    # With no source at all, nothing is ever allowed: every number is unchecked.
    with Filter(load_settings(environ={}), sources=[]) as empty:
        assert [(r["verdict"], r["reason"]) for r in empty.run([msg("1", A), msg("2", B)])] == [
            ("deferred", "check_failed"),
            ("deferred", "check_failed"),
        ]


def test_the_ledger_alone_is_no_source() -> None:
    from blockfilter.ledger.source import LedgerSource

    class LedgerOnly:
        @hookimpl
        def blockfilter_blocklist_sources(self, settings: Settings) -> list[Any]:
            return [LedgerSource(ledger=None)]

    bare = BlockfilterPluginManager()
    bare.add_hookspecs(hookspecs)
    bare.register(LedgerOnly(), name="ledger-only")
    with pytest.raises(PluginError, match="no blocklist source"):
        Filter(load_settings(environ={}), plugins=bare).sources  # noqa: B018


def test_the_built_ins_are_plugins_whose_hooks_are_all_trylast() -> None:
    pm = make_plugin_manager(load_settings(environ={}, load_plugins=[]))
    for name, factory in DEFAULT_PLUGINS:
        plugin = pm.get_plugin(name)
        assert isinstance(plugin, factory)  # type: ignore[arg-type]
        impls = [
            impl
            for caller in pm.get_hookcallers(plugin) or ()
            for impl in caller.get_hookimpls()
            if impl.plugin is plugin
        ]
        assert impls and all(impl.trylast for impl in impls), name


def test_the_hook_facade_never_calls_with_an_empty_list() -> None:
    class Counts:
        calls = 0

        @hookimpl
        def blockfilter_dispatch(self, messages: list[dict[str, Any]]) -> None:
            Counts.calls += 1

        @hookimpl
        def blockfilter_suppressed(self, messages: list[dict[str, Any]]) -> None:
            Counts.calls += 1

        @hookimpl
        def blockfilter_verdicts(self, results: list[dict[str, Any]]) -> None:
            Counts.calls += 1

    pm = make_plugin_manager(load_settings(environ={}, load_plugins=[]))
    pm.register(Counts())
    hooks = PluginHooks(pm)
    hooks.dispatch([])
    hooks.suppressed([])
    hooks.verdicts([])
    assert Counts.calls == 0
    hooks.dispatch([{"id": "1"}])
    assert Counts.calls == 1


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add("." * node.level + (node.module or ""))
    return found


def test_the_engine_knows_no_source_by_name() -> None:
    for path in sorted((ROOT / "blockfilter" / "engine").glob("*.py")):
        modules = _imported_modules(path)
        assert not any("kaleyra" in m or "ledger" in m for m in modules), path.name
    manager = (ROOT / "blockfilter" / "plugins" / "manager.py").read_text(encoding="utf-8")
    assert "subset_hook_caller" not in manager


def test_a_refused_shared_source_is_renewed_on_its_client_and_cache(simulator: Simulator) -> None:
    from blockfilter.kaleyra.source import KaleyraSource
    from blockfilter.plugins.builtin import SHARED_SOURCES
    from blockfilter.plugins.manager import build_filter

    settings = fast_settings(simulator.base_url, load_plugins=[])
    pm = make_plugin_manager(settings)
    simulator.set_faults(["e110"])  # the account is refused (no balance)
    with build_filter(settings, pm) as first:
        assert [r["reason"] for r in first.run([msg("1", A)])] == ["credentials_refused"]
        [refused] = [s for s in first.sources if isinstance(s, KaleyraSource)]
    assert refused.refused is not None
    simulator.set_faults([])  # topped up
    with build_filter(settings, pm) as second:
        assert [r["verdict"] for r in second.run([msg("1", A)])] == ["allowed"]
        [fresh] = [s for s in second.sources if isinstance(s, KaleyraSource)]
    # A new source asks again, on the same connections and cache.
    assert fresh is not refused and fresh.refused is None
    assert fresh.client is refused.client and fresh.cache is refused.cache
    SHARED_SOURCES.clear()
