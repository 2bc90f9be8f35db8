"""blockfilter's own behaviour, as plugins registered like any other (datasette's way).

* ``kaleyra``: Kaleyra's API (through the status cache) as a blocklist source.
* ``default-reroute``: a blocklisted message tries its own ``fallback`` list, in order.
* ``ledger``: the opt-out ledger (:mod:`blockfilter.ledger`) as a blocklist source.

They are registered like any plugin, from :data:`DEFAULT_PLUGINS`, after the installed ones;
each hook is marked ``trylast=True``, so an installed plugin is called before them and wins
where the first result wins. ``blockfilter plugins`` lists them; ``BLOCKFILTER_DISABLE_PLUGINS``
blocks them by name (blocking ``kaleyra`` requires another blocklist source).

Nothing else knows them by name: a filter asks every source the same questions
(:class:`blockfilter.sources.BaseSource`), so a request budget or a cost estimate reaches
Kaleyra's source as it would any other that has one.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ..config import Settings
from ..ledger.source import LEDGER, LedgerPlugin, LedgerSource
from ..sources import BaseSource, BlocklistSource
from .hookspecs import hookimpl

if TYPE_CHECKING:
    from ..kaleyra.source import KaleyraSource

log = logging.getLogger("blockfilter.builtin")

KALEYRA = "kaleyra"
DEFAULT_REROUTE = "default-reroute"

# How many differently configured Kaleyra sources one process keeps. A worker has one; a
# test suite that starts a simulator per test would otherwise keep every one of them.
_MAX_SHARED = 8


class _SharedSources:
    """One :class:`KaleyraSource` per process and per settings, made on first use.

    Sharing it is what makes the status cache (``memory://``) and the HTTP connection pool
    outlive a single run or Celery task. A fork (Celery's prefork pool) starts afresh: a
    thread pool or a connection pool inherited from the parent must not be used.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._entries: list[tuple[Settings, KaleyraSource]] = []

    def get(self, settings: Settings) -> KaleyraSource:
        from ..kaleyra.source import KaleyraSource

        with self._lock:
            if self._pid != os.getpid():
                self._pid, self._entries = os.getpid(), []
            for index, (known, source) in enumerate(self._entries):
                if known != settings:
                    continue
                if source.refused is None:
                    return source
                # A source remembers a refusal (RBC001, E110...) for its whole life, so a
                # worker would defer forever after the account is fixed (balance topped up).
                # A fresh source asks again; it keeps the cache and the connections.
                fresh = source.renewed()
                self._entries[index] = (settings, fresh)
                return fresh
            source = KaleyraSource(settings)
            self._entries.append((settings, source))
            if len(self._entries) > _MAX_SHARED:
                # Not closed: a run in another thread may still be using it; its idle
                # threads and connections go with it.
                self._entries.pop(0)
            return source

    def clear(self) -> None:
        """Close and forget every shared source (tests, and :func:`reset_plugin_manager`)."""
        with self._lock:
            entries, self._entries = self._entries, []
            mine = self._pid == os.getpid()
        if mine:
            for _, source in entries:
                source.close()


SHARED_SOURCES = _SharedSources()


class KaleyraPlugin:
    """The built-in ``kaleyra`` plugin: Kaleyra's "Get Blocklist" API as a blocklist source."""

    @hookimpl(trylast=True)
    def blockfilter_blocklist_sources(self, settings: Settings) -> list[BlocklistSource]:
        # Made lazily, on the first filter: listing plugins or starting a worker needs no
        # credentials, and a missing one is reported when a check is about to be made.
        return [SHARED_SOURCES.get(settings)]


Hook = TypeVar("Hook", bound=Callable[..., object])

# The mark of answers_own_fallbacks, on a hook implementation.
OWN_FALLBACKS = "blockfilter_own_fallbacks"


def answers_own_fallbacks(hook: Hook) -> Hook:
    """Mark a ``blockfilter_fallback_channels`` implementation that answers the message's own
    list, whatever else the message holds: when every implementation does, the filter reads
    the list itself instead of calling the hook for every message, in every pass."""
    setattr(hook, OWN_FALLBACKS, True)
    return hook


class DefaultReroutePlugin:
    """The built-in ``default-reroute`` plugin: try the message's own ``fallback`` list."""

    @hookimpl(trylast=True)
    @answers_own_fallbacks
    def blockfilter_fallback_channels(
        self, message: dict[str, Any], channel: str, fallback: list[str]
    ) -> list[str]:
        return fallback


# (name, factory) of each built-in plugin, registered in this order after the installed ones.
DEFAULT_PLUGINS: tuple[tuple[str, Callable[[], object]], ...] = (
    (KALEYRA, KaleyraPlugin),
    (DEFAULT_REROUTE, DefaultReroutePlugin),
    (LEDGER, LedgerPlugin),
)
BUILTIN_NAMES = frozenset(name for name, _ in DEFAULT_PLUGINS)


def sources_without_plugins(settings: Settings) -> tuple[list[BaseSource], list[BaseSource]]:
    """What a filter without plugins checks with (``Filter(plugins=False)``), and which of
    them are its own to close: a Kaleyra source of its own (through the status cache) and the
    opt-out ledger, which joins even here so that an opt-out it holds beats a clean answer.
    """
    from ..kaleyra.source import KaleyraSource
    from ..ledger.ledger import shared_ledger

    kaleyra = KaleyraSource(settings)
    return [kaleyra, LedgerSource(shared_ledger(settings))], [kaleyra]
