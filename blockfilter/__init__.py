"""blockfilter: check recipients against Kaleyra's blocklist before a message goes out.

``from blockfilter import hookimpl`` marks a pipeline's hook implementations;
``blockfilter.Filter`` runs the filter without Celery; ``Verdict`` and ``Reason`` name what its
records say; the errors it raises derive from ``BlockfilterError``. Each is imported on first
use, so that a plugin importing ``hookimpl`` does not pay for the whole library, nor
``blockfilter --version`` for pluggy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "BlockfilterError",
    "CheckFailed",
    "ConfigError",
    "CredentialsRefused",
    "Filter",
    "Reason",
    "Settings",
    "Verdict",
    "__version__",
    "hookimpl",
    "load_settings",
]

if TYPE_CHECKING:
    from .config import Settings, load_settings
    from .engine.filter import Filter
    from .errors import BlockfilterError, CheckFailed, ConfigError, CredentialsRefused
    from .model import Reason, Verdict
    from .plugins.hookspecs import hookimpl

_LAZY = {
    "BlockfilterError": "errors",
    "CheckFailed": "errors",
    "ConfigError": "errors",
    "CredentialsRefused": "errors",
    "Reason": "model",
    "Verdict": "model",
    "Filter": "engine.filter",
    "Settings": "config",
    "hookimpl": "plugins.hookspecs",
    "load_settings": "config",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'blockfilter' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{module}", __name__), name)
