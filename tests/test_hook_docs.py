"""Every hook is documented, tested and in the README (datasette's tests/test_docs.py).

Adding a hook to blockfilter/plugins/hookspecs.py without a ``:param:`` line per argument,
without a test of its own named ``test_hook_<name>`` (the hook's name without ``blockfilter_``,
as datasette's ``test_plugin_hooks_have_tests``), or without a mention in the README's
"## Hooks" section fails here. A name merely appearing in a test file proves nothing.
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
from pathlib import Path
from types import FunctionType

import pytest

from blockfilter.plugins import hookspecs

ROOT = Path(__file__).resolve().parent.parent


def _hook_specs() -> dict[str, FunctionType]:
    marker = f"{hookspecs.PROJECT_NAME}_spec"  # what HookspecMarker sets on a spec
    return {
        name: value
        for name, value in vars(hookspecs).items()
        if isinstance(value, FunctionType) and hasattr(value, marker)
    }


HOOKS = _hook_specs()


@functools.cache
def _test_function_names() -> frozenset[str]:
    """The name of every test function defined anywhere under tests/ (read, not imported)."""
    names: set[str] = set()
    for path in (ROOT / "tests").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        names.update(
            node.name
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.name.startswith("test_")
        )
    return frozenset(names)


def test_the_test_names_are_read_from_the_source() -> None:
    names = _test_function_names()
    assert "test_hook_has_a_test" in names  # this very module's
    assert "test_hook_dispatch" in names
    assert "_hook_specs" not in names  # only tests


def test_the_hooks_are_found() -> None:
    assert {"blockfilter_dispatch", "blockfilter_suppressed"} <= set(HOOKS)
    assert all(name.startswith("blockfilter_") for name in HOOKS)


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_hook_has_a_docstring_with_a_param_per_argument(name: str) -> None:
    spec = HOOKS[name]
    doc = inspect.getdoc(spec) or ""
    assert doc, f"{name} has no docstring"
    for argument in inspect.signature(spec).parameters:
        assert re.search(rf":param {argument}:", doc), f"{name}: no ':param {argument}:'"
    assert ":return:" in doc, f"{name}: say what a return value means (':return:')"


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_hook_has_a_test(name: str) -> None:
    tests = (ROOT / "tests" / "test_plugins.py").read_text(encoding="utf-8")
    assert re.search(rf"\b{name}\b", tests), f"{name} is never used in tests/test_plugins.py"
    wanted = "test_hook_" + name.removeprefix("blockfilter_")
    assert wanted in _test_function_names(), f"{name} has no test function named {wanted}"


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_hook_is_in_the_readme(name: str) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Hooks\b(.*?)(?=^## |\Z)", readme, re.MULTILINE | re.DOTALL)
    if section is None:
        pytest.skip("README.md has no '## Hooks' section yet: the check starts once it does")
    assert re.search(rf"\b{name}\b", section.group(1)), (
        f"{name} is not mentioned in README.md's '## Hooks' section"
    )
