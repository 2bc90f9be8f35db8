"""Every hook is documented, tested and in the README (datasette's tests/test_docs.py).

Adding a hook to blockfilter/hookspecs.py without a ``:param:`` line per argument, without a
test in tests/test_plugins.py, or without a mention in the README's "## Hooks" section fails
here.
"""

from __future__ import annotations

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


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_hook_is_in_the_readme(name: str) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Hooks\b(.*?)(?=^## |\Z)", readme, re.MULTILINE | re.DOTALL)
    if section is None:
        pytest.skip("README.md has no '## Hooks' section yet: the check starts once it does")
    assert re.search(rf"\b{name}\b", section.group(1)), (
        f"{name} is not mentioned in README.md's '## Hooks' section"
    )
