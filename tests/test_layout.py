"""The package's layout: old import paths keep working for a release, and no module imports
itself back through another.

The table below is written out here on purpose, not read from the package: it is what users'
code imports today, and each of those imports must keep working (with a warning) whatever
the package's own bookkeeping says.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "blockfilter"

# Module paths before the package was split into concerns -> where the module is now.
MOVED = {
    "blockfilter.messages": "blockfilter.model",
    "blockfilter.jsonlines": "blockfilter.engine.lines",
    "blockfilter.client": "blockfilter.kaleyra.client",
    "blockfilter.transport": "blockfilter.kaleyra.transport",
    "blockfilter.sync": "blockfilter.kaleyra.sync",
    "blockfilter.cache": "blockfilter.store.cache",
    "blockfilter.ratelimit": "blockfilter.store.ratelimit",
    "blockfilter.hookspecs": "blockfilter.plugins.hookspecs",
    "blockfilter.builtin": "blockfilter.plugins.builtin",
    "blockfilter.collector": "blockfilter.pipeline.collector",
    "blockfilter.worker": "blockfilter.pipeline.worker",
    "blockfilter.monitoring": "blockfilter.pipeline.monitoring",
    "blockfilter.replay": "blockfilter.pipeline.replay",
    "blockfilter.simulator": "blockfilter.testing.simulator",
    "blockfilter.demo": "blockfilter.testing.demo",
    "blockfilter.pytest_plugin": "blockfilter.testing.pytest_plugin",
}
# Names users import from modules that became packages (and from the package root), still there.
BECAME_PACKAGES = {
    "blockfilter": ["Filter", "Settings", "hookimpl", "load_settings", "Verdict", "Reason"],
    "blockfilter.engine": ["Filter", "Summary"],
    "blockfilter.kaleyra": ["KaleyraSource"],
    "blockfilter.plugins": ["get_plugin_manager", "build_filter", "describe_plugins"],
    "blockfilter.tasks": ["filter_messages", "filter_campaign", "merge_summaries", "TASK_NAME"],
}

# Names that moved into a module of their own and are still importable where they were:
# (where they were, where they are now, the names).
MOVED_NAMES = [
    ("blockfilter.store.cache", "blockfilter.store.redis", ["RedisCache"]),
    ("blockfilter.kaleyra.source", "blockfilter.store.ratelimit", ["RequestBudget"]),
    ("blockfilter.kaleyra.source", "blockfilter.store.guard", ["CACHE_RETRY_AFTER_S"]),
    ("blockfilter.kaleyra.source", "blockfilter.kaleyra.strategy", ["STRATEGIES"]),
]


def run_python(code: str, *flags: str) -> subprocess.CompletedProcess[str]:
    # A fresh interpreter: in this one the modules are imported already, and a second import
    # of an old name would neither run its shim nor warn.
    return subprocess.run(
        [sys.executable, *flags, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_path_imports_the_new_module_with_a_deprecation_warning(old: str) -> None:
    new = MOVED[old]
    code = f"""
import importlib, json, sys, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    old = importlib.import_module({old!r})
new = importlib.import_module({new!r})
print(json.dumps({{
    "same": old is new and sys.modules[{old!r}] is new,
    "warnings": [(w.category.__name__, str(w.message), w.filename) for w in caught],
}}))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["same"], f"{old} is not the module {new}"
    deprecations = [w for w in seen["warnings"] if w[0] == "DeprecationWarning" and old in w[1]]
    assert len(deprecations) == 1, seen["warnings"]
    assert new in deprecations[0][1]
    # pointed at the line that imported the old name, not at the shim
    assert "blockfilter" not in Path(deprecations[0][2]).parts


@pytest.mark.parametrize("module", sorted(BECAME_PACKAGES))
def test_names_of_a_module_that_became_a_package_import_without_a_warning(module: str) -> None:
    names = BECAME_PACKAGES[module]
    result = run_python(f"from {module} import {', '.join(names)}", "-W", "error")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("old", "new", "names"), MOVED_NAMES)
def test_a_name_that_moved_to_a_module_of_its_own_is_still_importable_where_it_was(
    old: str, new: str, names: list[str]
) -> None:
    code = f"""
import importlib
old, new = importlib.import_module({old!r}), importlib.import_module({new!r})
for name in {names!r}:
    assert getattr(old, name) is getattr(new, name), name
"""
    result = run_python(code, "-W", "error")
    assert result.returncode == 0, result.stderr


def test_the_package_itself_imports_no_old_module_path() -> None:
    modules = sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in PACKAGE.rglob("*.py")
        if ".".join(path.relative_to(ROOT).with_suffix("").parts) not in MOVED
        and path.name != "__main__.py"
    )
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    result = run_python(code, "-W", "error::DeprecationWarning")
    assert result.returncode == 0, result.stderr


def _module_level_imports(path: Path, module: str) -> set[str]:
    """The blockfilter modules ``module`` imports when it is imported (not inside functions,
    not under ``if TYPE_CHECKING``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def run_at_import(nodes: list[ast.stmt]) -> list[ast.stmt]:
        # the statements that run when the module is imported, nested blocks included
        run: list[ast.stmt] = []
        for node in nodes:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                run.extend(run_at_import(node.orelse))
                continue
            run.append(node)
            for block in ("body", "orelse", "finalbody", "handlers"):
                run.extend(run_at_import(getattr(node, block, [])))
        return run

    for sub in run_at_import(tree.body):
        if isinstance(sub, ast.Import):
            found.update(alias.name for alias in sub.names)
        elif isinstance(sub, ast.ImportFrom):
            base = sub.module or ""
            if sub.level:
                parts = package.split(".")
                parts = parts[: len(parts) - sub.level + 1]
                base = ".".join(parts + ([sub.module] if sub.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in sub.names)
    return {name for name in found if name.startswith("blockfilter")}


def test_no_module_imports_itself_back_through_others() -> None:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        graph[module] = _module_level_imports(path, module)
    known = set(graph)
    # Tarjan's strongly connected components: a component of two or more modules is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node] & known):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert cycles == []


def test_the_kaleyra_stream_asks_of_its_source_only_what_stream_source_declares() -> None:
    # The stream once reached into about ten private members of the source; what it may ask
    # is now the StreamSource interface, which KaleyraSource implements (mypy checks that).
    from blockfilter.kaleyra.stream import StreamSource

    tree = ast.parse((PACKAGE / "kaleyra" / "stream.py").read_text())
    declared = {name for name in vars(StreamSource) if not name.startswith("_")}
    asked = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and ast.unparse(node.value) in ("self._source", "source")
    }
    assert asked and asked <= declared, asked - declared
