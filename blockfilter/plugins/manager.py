"""The plugin manager: which plugins run, and the calls from the filter into them.

One manager per process, built lazily by :func:`get_plugin_manager` (never at import: Celery
imports this package in every worker). It is built in tox's order:

1. the hook specifications (:mod:`blockfilter.plugins.hookspecs`);
2. the names blocked by ``BLOCKFILTER_DISABLE_PLUGINS``;
3. the installed plugins, entry points of the group ``blockfilter``, loaded one by one so that
   a broken one is logged and skipped (``BLOCKFILTER_STRICT_PLUGINS=1``: an error instead);
   ``BLOCKFILTER_LOAD_PLUGINS`` lists the only ones to load;
4. the built-in plugins (:data:`blockfilter.plugins.builtin.DEFAULT_PLUGINS`), registered
   like any other, their hooks ``trylast`` so installed ones win;
5. a check that every hook implemented exists (a misspelt hook name fails loudly), that some
   blocklist source is left, and then the ``blockfilter_startup`` hook.

Every call into the plugins goes through :class:`PluginHooks`, one typed method per hook: the
one place that keeps the hooks' rules (never an empty list, observers get copies and cannot
break a run, what a plugin returns is checked). A :class:`~blockfilter.engine.Filter` takes
its sources (:func:`sources_from_plugins`), reroute policy (:func:`make_fallback_policy`) and
observers from there by default; :func:`build_filter` makes one for a host that calls the
observers itself, and :func:`dispatch_results` hands its results to the pipeline's hooks. The
engine imports this module lazily, when a filter is made: this module builds on the engine.
"""

from __future__ import annotations

import difflib
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from .. import __version__
from ..config import CHANNELS, Settings, load_settings
from ..engine.filter import FallbackPolicy, Filter, message_independent
from ..errors import PluginError
from ..model import Parsed, Verdict
from ..redact import mask_numbers_in
from ..sources import NEVER_ALONE, BaseSource, BlocklistSource, FunctionSource, as_source
from . import hookspecs
from .builtin import BUILTIN_NAMES, DEFAULT_PLUGINS, KALEYRA, OWN_FALLBACKS, SHARED_SOURCES
from .hookspecs import PROJECT_NAME

log = logging.getLogger("blockfilter.plugins")

ENTRY_POINT_GROUP = PROJECT_NAME
HOOK_PREFIX = "blockfilter_"

DISPATCHED_VERDICTS = Verdict.DISPATCHED
SUPPRESSED_VERDICTS = Verdict.SUPPRESSED


@dataclass(frozen=True)
class SkippedPlugin:
    """An entry point or built-in that was not registered, and why."""

    name: str
    why: str
    distribution: str | None = None  # "name version" of the package that provides it


class BlockfilterPluginManager(pluggy.PluginManager):
    """A :class:`pluggy.PluginManager` that remembers where its plugins came from.

    :ivar distributions: plugin name -> (distribution name, version); built-ins give
        blockfilter's.
    :ivar skipped: the plugins not registered (disabled, not allowed, broken), with why.
    """

    def __init__(self) -> None:
        super().__init__(PROJECT_NAME)
        self.distributions: dict[str, tuple[str, str]] = {}
        self.skipped: list[SkippedPlugin] = []


# -- building the manager ---------------------------------------------------------------------


def make_plugin_manager(settings: Settings) -> BlockfilterPluginManager:
    """Build a new plugin manager (uncached: most code wants :func:`get_plugin_manager`).

    :raises PluginError: a plugin is broken and ``settings.strict_plugins`` is set; a plugin
        implements an unknown hook; no blocklist source is left; a plugin refused to start.
    """
    pm = BlockfilterPluginManager()
    pm.add_hookspecs(hookspecs)
    for name in settings.disable_plugins:
        pm.set_blocked(name)
    found = _load_entry_points(pm, settings)
    _register_builtins(pm)
    for name in settings.disable_plugins:
        if name not in found and name not in BUILTIN_NAMES:
            log.warning("BLOCKFILTER_DISABLE_PLUGINS names %r, but no plugin has that name", name)
    _check_hook_names(pm)
    _require_a_source(pm)
    PluginHooks(pm).startup(settings)
    return pm


def _distribution_of(entry_point: EntryPoint) -> tuple[str, str] | None:
    dist = getattr(entry_point, "dist", None)
    if dist is None:
        return None
    return dist.metadata["Name"] or "?", dist.version or "?"


def _load_entry_points(pm: BlockfilterPluginManager, settings: Settings) -> set[str]:
    """Register the installed plugins; return the names of every entry point found."""
    allowed = None if settings.load_plugins is None else set(settings.load_plugins)
    found: set[str] = set()
    # Sorted, so the order plugins are called in does not depend on sys.path order.
    for entry_point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        name = entry_point.name
        dist = _distribution_of(entry_point)
        dist_label = f"{dist[0]} {dist[1]}" if dist else None
        if name in found:
            _broken(
                pm, settings, name, dist_label, "another installed plugin has the same name", None
            )
            continue
        found.add(name)
        if pm.is_blocked(name):
            pm.skipped.append(
                SkippedPlugin(name, "disabled by BLOCKFILTER_DISABLE_PLUGINS", dist_label)
            )
            continue
        if allowed is not None and name not in allowed:
            pm.skipped.append(
                SkippedPlugin(name, "not listed in BLOCKFILTER_LOAD_PLUGINS", dist_label)
            )
            continue
        if name in BUILTIN_NAMES:
            _broken(
                pm,
                settings,
                name,
                dist_label,
                "the name of a built-in plugin (disable the built-in and pick another name)",
                None,
            )
            continue
        plugin: object = None
        try:
            plugin = entry_point.load()
            pm.register(plugin, name=name)
        except Exception as exc:  # any error of a third party's code: skip it, say why
            # pluggy registers hooks one by one: undo what a failed registration left.
            if plugin is not None and pm.get_plugin(name) is plugin:
                pm.unregister(name=name)
            _broken(pm, settings, name, dist_label, "failed to load", exc)
            continue
        if dist is not None:
            pm.distributions[name] = dist
        log.debug("loaded plugin %r from %s", name, dist_label or entry_point.value)
    if allowed is not None:
        for name in sorted(allowed - found):
            _broken(pm, settings, name, None, "listed in BLOCKFILTER_LOAD_PLUGINS, not installed")
    return found


def _broken(
    pm: BlockfilterPluginManager,
    settings: Settings,
    name: str,
    dist_label: str | None,
    why: str,
    exc: BaseException | None = None,
) -> None:
    """A plugin that cannot be used: an error in strict mode, else a warning and a skip."""
    if exc is not None:
        why = f"{why}: {_describe_exception(exc)}"
    origin = f" ({dist_label})" if dist_label else ""
    if settings.strict_plugins:
        raise PluginError(
            f"plugin {name!r}{origin}: {why} (BLOCKFILTER_STRICT_PLUGINS is on)",
            plugin_name=name,
        ) from exc
    log.warning("plugin %r%s skipped: %s", name, origin, why)
    pm.skipped.append(SkippedPlugin(name, why, dist_label))


def _describe_exception(exc: BaseException) -> str:
    # A plugin's message may quote data: no phone number goes to the log whole.
    text = mask_numbers_in(str(exc))
    if len(text) > 300:
        text = text[:300] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _register_builtins(pm: BlockfilterPluginManager) -> None:
    for name, factory in DEFAULT_PLUGINS:
        if pm.is_blocked(name):
            pm.skipped.append(
                SkippedPlugin(name, "disabled by BLOCKFILTER_DISABLE_PLUGINS", "built-in")
            )
            continue
        pm.register(factory(), name=name)
        pm.distributions[name] = ("blockfilter", __version__)


def _check_hook_names(pm: BlockfilterPluginManager) -> None:
    """Fail loudly on a hook no spec declares: a typo would otherwise never be called."""
    known = sorted(
        name
        for name in vars(hookspecs)
        if name.startswith(HOOK_PREFIX) and callable(getattr(hookspecs, name))
    )
    for hook_name, caller in sorted(vars(pm.hook).items()):
        if not isinstance(caller, pluggy.HookCaller) or caller.has_spec():
            continue
        for impl in caller.get_hookimpls():
            if impl.optionalhook:
                continue
            close = difflib.get_close_matches(hook_name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PluginError(
                f"plugin {impl.plugin_name!r} implements an unknown hook {hook_name!r}{hint}; "
                f"the hooks are: {', '.join(known)}",
                plugin_name=impl.plugin_name,
            )
    try:  # pluggy's own check, in case it learns more than the loop above
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        name = pm.get_name(exc.plugin)
        raise PluginError(f"plugin {name!r}: {exc}", plugin_name=name) from exc


def _require_a_source(pm: BlockfilterPluginManager) -> None:
    # A source that only adds opt-outs (the ledger knows only what was reported to it) would,
    # alone, let every other number through unchecked.
    impls = (
        pm.hook.blockfilter_blocklist_sources.get_hookimpls()
        + pm.hook.blockfilter_blocklisted.get_hookimpls()
    )
    if any(not getattr(impl.function, NEVER_ALONE, False) for impl in impls):
        return
    raise PluginError(
        f"no blocklist source: the built-in {KALEYRA!r} plugin is disabled "
        "(BLOCKFILTER_DISABLE_PLUGINS) and no plugin implements blockfilter_blocklist_sources "
        "or blockfilter_blocklisted; refusing to run unchecked"
    )


def _call_order(caller: pluggy.HookCaller) -> list[pluggy.HookImpl]:
    """The plain implementations of a hook, in the order pluggy would call them.

    Used where each implementation must be called on its own (to name the one that failed,
    or so that one failing does not stop the others). Wrappers are left out: they wrap a
    whole hook call, which this is not.
    """
    return [i for i in reversed(caller.get_hookimpls()) if not (i.hookwrapper or i.wrapper)]


def _call_impl(impl: pluggy.HookImpl, kwargs: Mapping[str, Any]) -> Any:
    # As pluggy does: an implementation takes any subset of the hook's arguments.
    return impl.function(*[kwargs[name] for name in impl.argnames])


# -- the per-process manager ------------------------------------------------------------------

_managers: dict[tuple[Any, ...], BlockfilterPluginManager] = {}
_managers_lock = threading.RLock()


def _plugin_settings_key(settings: Settings) -> tuple[Any, ...]:
    load = None if settings.load_plugins is None else tuple(settings.load_plugins)
    return load, tuple(settings.disable_plugins), settings.strict_plugins


def get_plugin_manager(settings: Settings | None = None) -> pluggy.PluginManager:
    """This process's plugin manager, built on first use.

    :param settings: read from the environment when omitted. A Celery worker passes the
        settings from its app's ``conf``; should they name other plugins to load or disable
        than an earlier call did, a manager for those is built (and kept) too.
    :raises PluginError: see :func:`make_plugin_manager`. Nothing is cached then: the next
        call tries again.
    """
    if settings is None:
        settings = load_settings()
    key = _plugin_settings_key(settings)
    with _managers_lock:
        pm = _managers.get(key)
        if pm is None:
            pm = _managers[key] = make_plugin_manager(settings)
        return pm


def reset_plugin_manager() -> None:
    """Forget every manager and close the shared Kaleyra sources (for tests)."""
    with _managers_lock:
        _managers.clear()
    SHARED_SOURCES.clear()


def _manager_of(pm: pluggy.PluginManager | None, settings: Settings | None) -> pluggy.PluginManager:
    return pm if pm is not None else get_plugin_manager(settings)


# -- the hooks, one typed method each --------------------------------------------------------


class PluginHooks:
    """Every call into the plugins, one typed method per hook (as tox's plugin manager).

    The one place that keeps the hooks' rules, so that call sites read as plain calls: hooks
    taking a list are never called with an empty one; observers get copies of the results,
    each is called even when another raised, and their exceptions are logged, never raised;
    what a plugin returns is checked before anyone uses it. Hook names and semantics are those
    of :mod:`blockfilter.plugins.hookspecs`.
    """

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self._hook = pm.hook

    # -- what a pipeline implements --------------------------------------------------------

    def dispatch(self, messages: list[dict[str, Any]]) -> None:
        """``blockfilter_dispatch``; an exception propagates (the batch is retried)."""
        if messages:
            self._hook.blockfilter_dispatch(messages=messages)

    def suppressed(self, messages: list[dict[str, Any]]) -> None:
        """``blockfilter_suppressed``; an exception propagates (the batch is retried)."""
        if messages:
            self._hook.blockfilter_suppressed(messages=messages)

    # -- how the check is made -------------------------------------------------------------

    def blocklist_sources(self, settings: Settings) -> list[BlocklistSource]:
        """Every source ``blockfilter_blocklist_sources`` gives, in call order.

        :raises PluginError: an implementation returned something not a list of sources.
        """
        sources: list[BlocklistSource] = []
        for result in self._hook.blockfilter_blocklist_sources(settings=settings):
            sources.extend(self._checked_sources(result))
        return sources

    def _checked_sources(self, result: Any) -> list[BlocklistSource]:
        implementers = ", ".join(
            impl.plugin_name for impl in self._hook.blockfilter_blocklist_sources.get_hookimpls()
        )
        if not isinstance(result, (list, tuple)):
            raise PluginError(
                f"blockfilter_blocklist_sources returned {type(result).__name__}, not a list "
                f"of blocklist sources (implemented by: {implementers})"
            )
        for source in result:
            if not isinstance(source, BlocklistSource):
                raise PluginError(
                    f"blockfilter_blocklist_sources returned {source!r}, which is not a "
                    "BlocklistSource (it needs name, check_many() and stats()); implemented "
                    f"by: {implementers}"
                )
        return list(result)

    def blocklisted_sources(self) -> list[FunctionSource]:
        """One source per ``blockfilter_blocklisted`` implementation, named after its plugin:
        each is called on its own, so one that fails leaves only its own numbers unchecked."""
        return [
            FunctionSource(impl.plugin_name, _lookup_of(impl))
            for impl in _call_order(self._hook.blockfilter_blocklisted)
        ]

    def fallback_channels(
        self, message: Mapping[str, Any], channel: str, fallback: list[str]
    ) -> list[str] | None:
        """``blockfilter_fallback_channels`` as it answered (the first result wins)."""
        return self._hook.blockfilter_fallback_channels(  # type: ignore[no-any-return]
            message=message, channel=channel, fallback=fallback
        )

    def fallback_policy(self) -> FallbackPolicy:
        """The engine's reroute policy, asking :meth:`fallback_channels`.

        Channels are lower-cased, repeats dropped and unknown names dropped with a warning
        (once per name). When every implementation answers the message's own list (the
        built-in ``default-reroute``), the hook is not called at all: the engine asks this
        for every message in several passes.
        """
        impls = self._hook.blockfilter_fallback_channels.get_hookimpls()
        if not impls:
            return _no_fallbacks
        if all(getattr(impl.function, OWN_FALLBACKS, False) for impl in impls):
            return _own_fallbacks
        implementers = ", ".join(sorted({impl.plugin_name for impl in impls}))
        warned: set[str] = set()

        def policy(message: Mapping[str, Any], parsed: Parsed) -> Sequence[str]:
            chosen = self.fallback_channels(message, parsed.channel, list(parsed.fallback))
            if chosen is None:
                return ()
            if isinstance(chosen, (str, bytes)) or not isinstance(chosen, Iterable):
                raise PluginError(
                    f"blockfilter_fallback_channels returned {chosen!r}; expected a list of "
                    f"channel names or None (implemented by: {implementers})"
                )
            return _known_channels(chosen, warned)

        return policy

    # -- observers and life cycle ----------------------------------------------------------

    def has_observers(self) -> bool:
        """Whether any plugin implements ``blockfilter_verdicts`` (results are decoded for
        them only then)."""
        return bool(self._hook.blockfilter_verdicts.get_hookimpls())

    def verdicts(self, results: Sequence[Mapping[str, Any]]) -> None:
        """Show a batch of results to the ``blockfilter_verdicts`` observers.

        Never calls them with an empty list. Each observer gets copies of the results (so it
        cannot change a verdict), is called even when another one raised, and an exception is
        logged as a warning naming the plugin, never raised.
        """
        if not results:
            return
        caller = self._hook.blockfilter_verdicts
        impls = caller.get_hookimpls()
        if not impls:
            return
        copies = [dict(result) for result in results]
        if any(impl.hookwrapper or impl.wrapper for impl in impls):
            # A wrapper wraps the whole call: isolate the call as a whole.
            try:
                caller(results=copies)
            except Exception as exc:
                log.warning("a blockfilter_verdicts observer failed: %s", _describe_exception(exc))
            return
        for impl in _call_order(caller):
            try:
                _call_impl(impl, {"results": copies})
            except Exception as exc:
                log.warning(
                    "blockfilter_verdicts observer %r failed (ignored): %s",
                    impl.plugin_name,
                    _describe_exception(exc),
                )

    def startup(self, settings: Settings) -> None:
        """``blockfilter_startup``, each implementation on its own.

        :raises PluginError: naming the plugin that refused to start.
        """
        for impl in _call_order(self._hook.blockfilter_startup):
            try:
                _call_impl(impl, {"settings": settings})
            except Exception as exc:
                raise PluginError(
                    f"plugin {impl.plugin_name!r} refused to start: {_describe_exception(exc)}",
                    plugin_name=impl.plugin_name,
                ) from exc

    # -- the opt-out ledger ----------------------------------------------------------------

    def optout_codes(self, provider: str) -> list[Mapping[str, bool] | None]:
        """Every ``blockfilter_optout_codes`` answer, the first called first."""
        return list(self._hook.blockfilter_optout_codes(provider=provider))

    def inbound_intent(self, text: str, channel: str, locale: str | None) -> str | None:
        """``blockfilter_inbound_intent`` as it answered (the first result wins)."""
        return self._hook.blockfilter_inbound_intent(  # type: ignore[no-any-return]
            text=text, channel=channel, locale=locale
        )


def _lookup_of(impl: pluggy.HookImpl) -> Callable[[str, list[str]], Iterable[str] | None]:
    def lookup(channel: str, numbers: list[str]) -> Iterable[str] | None:
        found = _call_impl(impl, {"channel": channel, "numbers": numbers})
        if isinstance(found, (str, bytes)):
            # Iterating a string gives characters, which match no number: the numbers would
            # pass as clean. Refuse it, so they are left unchecked (fail closed).
            raise TypeError(
                f"plugin {impl.plugin_name!r}: blockfilter_blocklisted must return an "
                "iterable of numbers, not a single string"
            )
        return found  # type: ignore[no-any-return]

    return lookup


def _known_channels(chosen: Iterable[Any], warned: set[str]) -> tuple[str, ...]:
    """The channel names of ``chosen``, lower case, each once; an unknown one is dropped with
    a warning, once per name (``warned`` holds those already said)."""
    channels: list[str] = []
    for item in chosen:
        name = item.lower() if isinstance(item, str) else None
        if name in CHANNELS:
            if name not in channels:
                channels.append(name)
            continue
        shown = repr(item)[:40]
        if shown not in warned:
            warned.add(shown)
            log.warning(
                "blockfilter_fallback_channels returned the unknown channel %s; dropped "
                "(channels: %s)",
                shown,
                ", ".join(CHANNELS),
            )
    return tuple(channels)


@message_independent
def _no_fallbacks(message: Mapping[str, Any], parsed: Parsed) -> Sequence[str]:
    return ()


@message_independent
def _own_fallbacks(message: Mapping[str, Any], parsed: Parsed) -> Sequence[str]:
    return parsed.fallback


# -- building a filter from the hooks ---------------------------------------------------------


class PluginFilter(Filter):
    """The plugins' :class:`Filter`, for hosts that hand its results to the plugins themselves.

    It calls no ``blockfilter_verdicts`` observer: the Celery tasks show them final results
    only, after a retry. Its sources are made when it is built, so a broken source plugin or
    a missing credential fails there. Sources the plugins share (long-lived) are left open on
    :meth:`close`; the ones made for this filter alone (a ``max_requests`` budget) are closed.
    """

    _calls_observers = False

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        try:
            self.sources  # noqa: B018  # made now: a broken source plugin fails here
        except BaseException:
            self.close()
            raise


def build_filter(
    settings: Settings, pm: pluggy.PluginManager | None = None, **filter_kwargs: Any
) -> Filter:
    """A :class:`~blockfilter.engine.Filter` made from the plugins' hooks, that calls no
    observer (:class:`PluginFilter`): for a host that calls them itself, as the Celery tasks do.

    Its sources are every ``blockfilter_blocklist_sources`` result plus one
    :class:`~blockfilter.sources.FunctionSource` per ``blockfilter_blocklisted``
    implementation (named after its plugin); its reroute policy is
    ``blockfilter_fallback_channels``. Use it as a context manager, or call ``close()``.

    :param settings: the effective settings.
    :param pm: the plugin manager; :func:`get_plugin_manager` when omitted.
    :param filter_kwargs: passed to :class:`Filter` (``on_error``, ``max_requests``,
        ``progress``). ``max_requests`` caps the API requests of every source that counts
        them (Kaleyra's).
    :raises PluginError: no source at all, or a plugin returned something not a source.
    :raises ConfigError: the Kaleyra credentials are missing.
    """
    for reserved in ("sources", "fallback_policy", "plugins"):
        if reserved in filter_kwargs:
            raise TypeError(
                f"build_filter() takes no {reserved!r}: it comes from the plugins' hooks "
                "(use blockfilter.engine.Filter directly to pass your own)"
            )
    return PluginFilter(settings, plugins=_manager_of(pm, settings), **filter_kwargs)


def sources_from_plugins(pm: pluggy.PluginManager, settings: Settings) -> list[BaseSource]:
    """The sources the plugins give a filter: every ``blockfilter_blocklist_sources`` result,
    then one per ``blockfilter_blocklisted`` implementation, each with the whole protocol
    (:func:`~blockfilter.sources.as_source`).

    :raises PluginError: no source that may stand alone, or a plugin returned something not
        a source.
    """
    hooks = PluginHooks(pm)
    sources = [as_source(source) for source in hooks.blocklist_sources(settings)]
    sources.extend(hooks.blocklisted_sources())
    if not any(source.stands_alone for source in sources):
        raise PluginError(
            "no blocklist source: every blockfilter_blocklist_sources implementation "
            "returned None and none implements blockfilter_blocklisted; refusing to "
            "run unchecked"
        )
    return sources


def make_fallback_policy(pm: pluggy.PluginManager) -> FallbackPolicy:
    """The engine's reroute policy, asking ``blockfilter_fallback_channels``
    (:meth:`PluginHooks.fallback_policy`)."""
    return PluginHooks(pm).fallback_policy()


# -- handing results to the plugins ----------------------------------------------------------


def notify_verdicts(pm: pluggy.PluginManager, results: Sequence[Mapping[str, Any]]) -> None:
    """Show a batch of results to the ``blockfilter_verdicts`` observers
    (:meth:`PluginHooks.verdicts`)."""
    PluginHooks(pm).verdicts(results)


@dataclass
class DispatchOutcome:
    """How :func:`dispatch_results` split a batch.

    :ivar dispatched: the ``allowed`` and ``rerouted`` results, given to
        ``blockfilter_dispatch``.
    :ivar suppressed: the ``blocked`` and ``invalid`` results (and the ``deferred`` ones when
        final), given to ``blockfilter_suppressed``.
    :ivar deferred: the ``deferred`` results that are not final: given to no hook, for the
        caller to check again later.
    """

    dispatched: list[dict[str, Any]] = field(default_factory=list)
    suppressed: list[dict[str, Any]] = field(default_factory=list)
    deferred: list[dict[str, Any]] = field(default_factory=list)


def split_results(results: Iterable[dict[str, Any]], *, deferred_final: bool) -> DispatchOutcome:
    """Sort results by where they go, keeping input order within each list."""
    outcome = DispatchOutcome()
    for result in results:
        verdict = result.get("verdict")
        if verdict in DISPATCHED_VERDICTS:
            outcome.dispatched.append(result)
        elif verdict in SUPPRESSED_VERDICTS:
            outcome.suppressed.append(result)
        elif verdict == Verdict.DEFERRED:
            (outcome.suppressed if deferred_final else outcome.deferred).append(result)
        else:
            raise ValueError(f"result {result.get('id')!r} has no known verdict: {verdict!r}")
    return outcome


def dispatch_results(
    pm: pluggy.PluginManager, results: Iterable[dict[str, Any]], *, deferred_final: bool
) -> DispatchOutcome:
    """Hand a batch of results to ``blockfilter_dispatch`` and ``blockfilter_suppressed``.

    Each hook is called once, with keyword arguments, and only when it has messages. An
    exception in a hook propagates: the caller (the Celery task) retries the batch, and the
    messages come again with the same ``id`` (at least once).

    :param deferred_final: whether ``deferred`` results are final (retries spent): then they
        are suppressed; otherwise they are returned in :attr:`DispatchOutcome.deferred` and
        given to no hook.
    """
    outcome = split_results(results, deferred_final=deferred_final)
    hooks = PluginHooks(pm)
    hooks.dispatch(outcome.dispatched)
    hooks.suppressed(outcome.suppressed)
    return outcome


# -- `blockfilter plugins` --------------------------------------------------------------------


def describe_plugins(
    settings: Settings | None = None, pm: pluggy.PluginManager | None = None
) -> list[str]:
    """Lines for ``blockfilter plugins``: each plugin with its version and hooks, then the
    plugins that were skipped and why."""
    pm = _manager_of(pm, settings)
    distributions: Mapping[str, tuple[str, str]] = getattr(pm, "distributions", {})
    skipped: Sequence[SkippedPlugin] = getattr(pm, "skipped", ())
    lines = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:  # a blocked name
            continue
        dist = distributions.get(name)
        if name in BUILTIN_NAMES and dist == ("blockfilter", __version__):
            origin = f"{__version__} (built-in)"
        elif dist is not None:
            origin = f"{dist[1]} (from {dist[0]})"
        else:
            origin = "(registered in code)"
        hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or ())
        lines.append(f"{name} {origin}: {', '.join(hooks) or 'no hooks'}")
    for skip in skipped:
        origin = f" ({skip.distribution})" if skip.distribution else ""
        lines.append(f"skipped: {skip.name}{origin}: {skip.why}")
    return lines
