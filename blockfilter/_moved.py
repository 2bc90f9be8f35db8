"""Old import paths of modules that moved into packages: they work for one more release.

Each old module (``blockfilter/cache.py``...) is a two-line shim that calls :func:`moved`:
the old name becomes the new module itself in ``sys.modules`` (one module object, so its
state and anything patched on it are shared), and the importer gets a DeprecationWarning
naming the new path.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable
from typing import Any


def moved(old: str, new: str) -> None:
    # stacklevel 3: past this function and the shim; the warnings module skips the import
    # system's own frames, so the warning points at the line that imported the old name.
    warnings.warn(
        f"{old} moved to {new}: import it from there (the old name goes in 0.3)",
        DeprecationWarning,
        stacklevel=3,
    )
    sys.modules[old] = importlib.import_module(new)


def names_from(module: str, package: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that finds its other names in ``module``.

    A flat module that became a package keeps the names it had (``from blockfilter.engine
    import Filter``) without importing ``module`` until one of them is used, so that importing
    one of the package's submodules does not import the rest.
    """

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):  # __path__, __file__...: what the import system asks
            raise AttributeError(name)
        try:
            return getattr(importlib.import_module(module), name)
        except AttributeError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None

    return __getattr__
