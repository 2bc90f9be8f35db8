"""Settings: environment variables, overridden inside workers by a Celery app's ``conf``.

Every setting is read in one place, validated once, and remembers where it came from so that
``blockfilter config`` can show it (with the key redacted).
"""

from __future__ import annotations

import ipaddress
import numbers
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import SplitResult, urlsplit

from .errors import ConfigError

REGION_DOMAINS = {
    "in": "api.in.kaleyra.io",
    "sg": "api.kaleyra.io",
    "eu": "api.eu.kaleyra.io",
    "na": "api.na.kaleyra.ai",
}
CHANNELS = ("sms", "whatsapp", "voice")
ON_ERROR_POLICIES = ("defer", "allow", "drop")
# Where `blockfilter filter` decodes most of its input's first pass: a forked process past
# the first lines (auto: past 4,096 of them; always: past the first), or this one (off).
PARSER_PROCESS_CHOICES = ("auto", "always", "off")
STARTUP_CHECKS = ("settings", "api", "off")

# A SID goes into the URL path, so it must not be able to change that path. fullmatch, not
# match with "$": "$" also matches before a trailing newline.
_SID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")
# The key travels in an HTTP header: visible ASCII only, so it can neither break the header
# (a newline) nor make the request fail deep in http.client (a non-latin-1 character).
_KEY_PATTERN = re.compile(r"[\x21-\x7e]{1,512}")


def _parse_list(raw: str) -> list[str]:
    return [item.strip() for item in raw.split(",") if item.strip()]


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected 1/0, true/false, yes/no or on/off, got {raw!r}")


# The longest duration a setting may hold: ten years is past any useful TTL, timeout or
# backoff, and well inside what a socket timeout, a thread's wait and a Redis expiry in
# milliseconds can take (``inf`` or ``1e400`` fit none of them, and would fail on use).
MAX_SECONDS = 10 * 365 * 86_400
# The largest count (requests in flight, attempts, retries) or rate a setting may hold: far
# past any real fleet, so a bigger one is a typo; pools and windows are sized from it.
MAX_COUNT = 1_000_000


def _takes_values(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Mark a parser that checks a typed value (a Celery conf's or an override's) as well as
    the environment's text: :class:`Settings` runs it on every value it is given."""
    parse.takes_values = True  # type: ignore[attr-defined]
    return parse


def _real(raw: Any) -> float:
    """A setting's value as a float: text from the environment, or a real number from a
    Celery conf or an override. A bool is refused: ``True`` is 1 to Python, not to a user."""
    if isinstance(raw, str):
        return float(raw.strip())
    if isinstance(raw, bool) or not isinstance(raw, numbers.Real):
        raise TypeError(f"expected a number, got {type(raw).__name__}")
    try:
        return float(raw)
    except OverflowError:  # an int past a float's range: no use printing its digits
        raise ValueError("is far too large") from None


def _bounded(low: float, high: float, *, low_included: bool, what: str) -> Callable[[Any], float]:
    def parse(raw: Any) -> float:
        value = _real(raw)
        # Written so that NaN, which compares false with everything, fails it.
        if not ((value >= low if low_included else value > low) and value <= high):
            bound = ">=" if low_included else ">"
            raise ValueError(
                f"must be a finite number of {what} {bound} {low:g} "
                f"(at most {high:.0f}), got {raw!r}"
            )
        return value

    return _takes_values(parse)


_positive_float = _bounded(0, MAX_SECONDS, low_included=False, what="seconds")
_non_negative_float = _bounded(0, MAX_SECONDS, low_included=True, what="seconds")
_positive_rate = _bounded(0, MAX_COUNT, low_included=False, what="requests per second")


@_takes_values
def _positive_int(raw: Any) -> int:
    if isinstance(raw, str):
        value = int(raw.strip())
    else:
        number = _real(raw)
        if not number.is_integer():  # 2.5 attempts, nan, inf
            raise ValueError(f"must be a whole number, got {raw!r}")
        value = int(number)
    if not 1 <= value <= MAX_COUNT:
        raise ValueError(f"must be a whole number >= 1 (at most {MAX_COUNT}), got {raw!r}")
    return value


def _port(raw: str) -> int:
    value = int(raw)
    if not 1 <= value <= 65535:
        raise ValueError(f"must be a TCP port (1-65535), got {raw!r}")
    return value


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}, got {raw!r}")
        return value

    return parse


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def parse_optional(raw: Any) -> Any:
        if raw is None or (isinstance(raw, str) and raw.strip() == ""):
            return None
        return parse(raw)

    if getattr(parse, "takes_values", False):
        _takes_values(parse_optional)
    return parse_optional


@dataclass(frozen=True)
class _Spec:
    env: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    #: an empty value (``BLOCKFILTER_COLLECT_MAX_BUFFER=``) means the default, not an error
    blank_is_default: bool = False


# One row a setting: the environment variable, how to parse it, its default.
# The Celery conf key is the same name in lower case.
SPECS: dict[str, _Spec] = {
    "sid": _Spec("KALEYRA_SID", str.strip, None, "Kaleyra account SID"),
    "api_key": _Spec("KALEYRA_API_KEY", str.strip, None, "Kaleyra API key (never printed)"),
    "region": _Spec("KALEYRA_REGION", _choice(tuple(REGION_DOMAINS)), "in", "API region"),
    "base_url": _Spec("KALEYRA_BASE_URL", str.strip, None, "API base URL (overrides region)"),
    "on_error": _Spec(
        "BLOCKFILTER_ON_ERROR", _choice(ON_ERROR_POLICIES), "defer", "when a check fails"
    ),
    "cache_url": _Spec("BLOCKFILTER_CACHE_URL", str.strip, "memory://", "status cache"),
    # A clean status is trusted briefly: an opt-out must take effect within minutes.
    "cache_ttl": _Spec(
        "BLOCKFILTER_CACHE_TTL", _non_negative_float, 600.0, "seconds a clean status is trusted"
    ),
    # A blocklisted status errs on the safe side (we keep not sending), so it may live longer.
    "cache_ttl_blocked": _Spec(
        "BLOCKFILTER_CACHE_TTL_BLOCKED",
        _non_negative_float,
        21600.0,
        "seconds a blocklisted status is trusted",
    ),
    "cache_secret": _Spec(
        "BLOCKFILTER_CACHE_SECRET",
        str.strip,
        None,
        "HMAC key for cache entries (default: derived from the API key)",
    ),
    "concurrency": _Spec(
        "BLOCKFILTER_CONCURRENCY", _positive_int, 16, "API requests in flight per process"
    ),
    "rate_limit": _Spec(
        "BLOCKFILTER_RATE_LIMIT",
        _optional(_positive_rate),
        None,
        "API requests per second, fleet-wide",
    ),
    "load_plugins": _Spec(
        "BLOCKFILTER_LOAD_PLUGINS", _parse_list, None, "entry points to load (unset: all)"
    ),
    "disable_plugins": _Spec(
        "BLOCKFILTER_DISABLE_PLUGINS", _parse_list, [], "plugin names not to load"
    ),
    "strict_plugins": _Spec(
        "BLOCKFILTER_STRICT_PLUGINS", _parse_bool, False, "a broken plugin is an error"
    ),
    # The retry budget: one request is tried at most `retry_attempts` times, and never
    # after `retry_deadline` seconds have passed since its first attempt.
    "retry_attempts": _Spec(
        "BLOCKFILTER_RETRY_ATTEMPTS", _positive_int, 5, "attempts per API request"
    ),
    "retry_deadline": _Spec(
        "BLOCKFILTER_RETRY_DEADLINE",
        _positive_float,
        30.0,
        "seconds one request may take, retries included",
    ),
    "backoff_base": _Spec(
        "BLOCKFILTER_BACKOFF_BASE", _non_negative_float, 0.5, "first backoff, seconds"
    ),
    "backoff_max": _Spec(
        "BLOCKFILTER_BACKOFF_MAX", _non_negative_float, 8.0, "longest backoff, seconds"
    ),
    "retry_after_max": _Spec(
        "BLOCKFILTER_RETRY_AFTER_MAX",
        _non_negative_float,
        30.0,
        "longest Retry-After honoured, seconds",
    ),
    "connect_timeout": _Spec(
        "BLOCKFILTER_CONNECT_TIMEOUT", _positive_float, 3.05, "TCP connect timeout, seconds"
    ),
    "request_timeout": _Spec(
        "BLOCKFILTER_REQUEST_TIMEOUT",
        _positive_float,
        10.0,
        "total deadline of one attempt, seconds",
    ),
    "task_max_retries": _Spec(
        "BLOCKFILTER_TASK_MAX_RETRIES",
        _positive_int,
        3,
        "Celery task retries after the client's own",
    ),
    "task_retry_backoff": _Spec(
        "BLOCKFILTER_TASK_RETRY_BACKOFF",
        _non_negative_float,
        5.0,
        "first task retry countdown, seconds",
    ),
    # The opt-out ledger (blockfilter.ledger): where it lives, its own key, how far it reaches.
    "optout_url": _Spec(
        "BLOCKFILTER_OPTOUT_URL",
        _optional(str.strip),
        None,
        "opt-out ledger: sqlite:///FILE or postgresql://... (unset: a SQLite file of the user's)",
    ),
    "optout_key": _Spec(
        "BLOCKFILTER_OPTOUT_KEY",
        _optional(str.strip),
        None,
        "opt-out ledger keys, newest first, comma-separated (never printed)",
    ),
    "optout_scope": _Spec(
        "BLOCKFILTER_OPTOUT_SCOPE",
        _choice(("channel", "all")),
        "channel",
        "an opt-out blocks its own channel, or all channels",
    ),
    "optout_keywords": _Spec(
        "BLOCKFILTER_OPTOUT_KEYWORDS",
        _optional(str.strip),
        None,
        "opt-out keywords per locale: 'es:ALTO,PARAR;fr:ARRET' (replaces that locale's list)",
    ),
    "optin_keywords": _Spec(
        "BLOCKFILTER_OPTIN_KEYWORDS",
        _optional(str.strip),
        None,
        "opt-in keywords per locale, the same way",
    ),
    "write_back": _Spec(
        "BLOCKFILTER_WRITE_BACK", _parse_bool, False, "write ledger changes back to Kaleyra"
    ),
    # The first pass on the second core (Linux): see blockfilter.engine.reader.
    "parser_process": _Spec(
        "BLOCKFILTER_PARSER_PROCESS",
        _choice(PARSER_PROCESS_CHOICES),
        "auto",
        "blockfilter filter decodes its input in a second process: auto (past 4,096 lines), "
        "always, off",
    ),
    # Prometheus metrics of a worker (the blockfilter[metrics] extra): see blockfilter.metrics.
    "metrics_port": _Spec(
        "BLOCKFILTER_METRICS_PORT",
        _optional(_port),
        None,
        "port a worker serves Prometheus metrics on (unset: none)",
    ),
    # A worker that cannot check anything must not start "ready": see blockfilter.worker.
    "startup_check": _Spec(
        "BLOCKFILTER_STARTUP_CHECK",
        _choice(STARTUP_CHECKS),
        "settings",
        "what a worker checks when it starts: settings, api (one request too), off",
    ),
    # When the collector's batch leaves (blockfilter.pipeline.collector); read when its
    # worker starts. Last, so that `blockfilter config` lists them after the others.
    "collect_flush_every": _Spec(
        "BLOCKFILTER_COLLECT_FLUSH_EVERY",
        _positive_int,
        100,  # one full API request
        "distinct numbers waiting on a channel that send the collector's batch",
        blank_is_default=True,
    ),
    "collect_flush_interval": _Spec(
        "BLOCKFILTER_COLLECT_FLUSH_INTERVAL",
        _positive_float,
        1.0,
        "seconds the collector's oldest message waits at most",
        blank_is_default=True,
    ),
    "collect_max_buffer": _Spec(
        "BLOCKFILTER_COLLECT_MAX_BUFFER",
        _positive_int,
        1000,
        "messages waiting in the collector that send everything",
        blank_is_default=True,
    ),
}


def _default(name: str) -> Any:
    """The default of setting ``name``, for :class:`Settings`: written once, in :data:`SPECS`."""
    return SPECS[name].default


# The settings whose every value, however it was given, is checked by its parser.
_CHECKED_VALUES = tuple(
    name for name, spec in SPECS.items() if getattr(spec.parse, "takes_values", False)
)


def _value_error(name: str, source: str, exc: Exception) -> ConfigError:
    """A bad value, naming the variable (and the conf key or override it came from)."""
    variable = SPECS[name].env
    if source.startswith("celery conf"):
        variable += f" (from {source})"
    elif source == "override":
        variable += f" (from the override {name}=)"
    return ConfigError(f"{variable}: {exc}")


@dataclass(frozen=True, repr=False)
class Settings:
    """The effective configuration. Build it with :func:`load_settings`."""

    sid: str | None = _default("sid")
    api_key: str | None = field(default=_default("api_key"), repr=False)
    region: str = _default("region")
    base_url: str | None = _default("base_url")
    on_error: str = _default("on_error")
    cache_url: str = _default("cache_url")
    cache_ttl: float = _default("cache_ttl")
    cache_ttl_blocked: float = _default("cache_ttl_blocked")
    cache_secret: str | None = field(default=_default("cache_secret"), repr=False)
    concurrency: int = _default("concurrency")
    rate_limit: float | None = _default("rate_limit")
    load_plugins: list[str] | None = _default("load_plugins")
    disable_plugins: list[str] = field(default_factory=list)
    strict_plugins: bool = _default("strict_plugins")
    retry_attempts: int = _default("retry_attempts")
    retry_deadline: float = _default("retry_deadline")
    backoff_base: float = _default("backoff_base")
    backoff_max: float = _default("backoff_max")
    retry_after_max: float = _default("retry_after_max")
    connect_timeout: float = _default("connect_timeout")
    request_timeout: float = _default("request_timeout")
    task_max_retries: int = _default("task_max_retries")
    task_retry_backoff: float = _default("task_retry_backoff")
    optout_url: str | None = _default("optout_url")
    optout_key: str | None = field(default=_default("optout_key"), repr=False)
    optout_scope: str = _default("optout_scope")
    optout_keywords: str | None = _default("optout_keywords")
    optin_keywords: str | None = _default("optin_keywords")
    write_back: bool = _default("write_back")
    startup_check: str = _default("startup_check")
    parser_process: str = _default("parser_process")
    metrics_port: int | None = _default("metrics_port")
    collect_flush_every: int = _default("collect_flush_every")
    collect_flush_interval: float = _default("collect_flush_interval")
    collect_max_buffer: int = _default("collect_max_buffer")
    # Where each value came from: "default", "env KALEYRA_SID", "celery conf kaleyra_sid".
    sources: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in _CHECKED_VALUES:
            try:
                value = SPECS[name].parse(getattr(self, name))
            except (TypeError, ValueError, OverflowError) as exc:
                raise _value_error(name, self.sources.get(name, "override"), exc) from None
            object.__setattr__(self, name, value)
        object.__setattr__(self, "cache_url", validate_cache_url(self.cache_url))
        if self.sid is not None and not (
            isinstance(self.sid, str) and _SID_PATTERN.fullmatch(self.sid)
        ):
            raise ConfigError(
                "KALEYRA_SID may only hold letters, digits, '-' and '_' (it goes into the URL path)"
            )
        if self.api_key is not None and not (
            isinstance(self.api_key, str) and _KEY_PATTERN.fullmatch(self.api_key)
        ):
            # The message never shows the key, not even in part.
            raise ConfigError(
                "KALEYRA_API_KEY may only hold visible ASCII characters, without spaces "
                "(it travels in an HTTP header); check it was copied whole"
            )
        if self.base_url is not None:
            object.__setattr__(self, "base_url", validate_base_url(self.base_url))

    @property
    def api_root(self) -> str:
        """Scheme, host and port of the API, without a trailing slash."""
        if self.base_url:
            return self.base_url
        return f"https://{REGION_DOMAINS[self.region]}"

    def require_credentials(self) -> tuple[str, str]:
        """The SID and key, or a :class:`ConfigError` naming the variable that is missing."""
        if not self.sid:
            raise ConfigError("KALEYRA_SID is not set: export your Kaleyra account SID")
        if not self.api_key:
            raise ConfigError("KALEYRA_API_KEY is not set: export your Kaleyra API key")
        return self.sid, self.api_key

    def replace(self, **changes: Any) -> Settings:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        sources = dict(self.sources)
        for name in changes:
            if name != "sources":
                sources[name] = "override"
        values["sources"] = sources
        return Settings(**values)

    def describe(self) -> list[tuple[str, str, str]]:
        """Rows of (variable, value, source) for ``blockfilter config``; the key and secret
        are redacted, and so is every password inside a URL."""
        rows = []
        for name, spec in SPECS.items():
            value = getattr(self, name)
            if name in _SECRETS and value:
                shown = "[REDACTED]"
            elif value is None:
                shown = "(unset)"
            elif isinstance(value, list):
                shown = ",".join(redact_url(item) for item in value)
            else:
                shown = redact_url(str(value))
            rows.append((spec.env, shown, self.sources.get(name, "default")))
        return rows

    def __repr__(self) -> str:
        # The dataclass repr, with the secrets left out and passwords in URLs redacted.
        shown = ", ".join(
            f"{f.name}={_shown(getattr(self, f.name))}" for f in fields(self) if f.repr
        )
        return f"Settings({shown})"


_SECRETS = frozenset(f.name for f in fields(Settings) if not f.repr and f.name != "sources")


def _shown(value: Any) -> str:
    if isinstance(value, str):
        return repr(redact_url(value))
    if isinstance(value, list):
        return repr([redact_url(item) if isinstance(item, str) else item for item in value])
    return repr(value)


# What a password may be called in a URL's query (redis-py, for one, reads ?password=).
_SECRET_QUERY_ITEM = re.compile(
    r"(?P<name>[?&;][^=&;#]*(?:pass|secret|token|key|auth)[^=&;#]*=)[^&;#]*", re.IGNORECASE
)


def redact_url(text: str) -> str:
    """``text`` with the password of a URL in it replaced by ``[REDACTED]``:
    ``redis://user:pw@host/0`` shows as ``redis://user:[REDACTED]@host/0``. Anything else is
    left as it is. Split by hand as ``urllib.parse`` does (the password is between the first
    ``:`` and the last ``@`` before the first ``/``, ``?`` or ``#``), so that even a URL
    ``urlsplit`` refuses is shown without its password."""
    scheme, separator, rest = text.partition("://")
    if not separator:
        return text
    ends = [i for i in (rest.find(c) for c in "/?#") if i >= 0]
    cut = min(ends) if ends else len(rest)
    netloc, tail = rest[:cut], rest[cut:]
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:[REDACTED]@{hostport}"
    tail = _SECRET_QUERY_ITEM.sub(r"\g<name>[REDACTED]", tail)
    return f"{scheme}://{netloc}{tail}"


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine: ``localhost``, 127.0.0.0/8, ``::1`` (an IPv4-mapped
    IPv6 address counts as its IPv4 address)."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool((mapped or address).is_loopback)


def validate_base_url(raw: str) -> str:
    """Check ``KALEYRA_BASE_URL``: https anywhere, plain http only to loopback."""
    url = raw.strip().rstrip("/")
    parts = _split_url("KALEYRA_BASE_URL", url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"KALEYRA_BASE_URL must look like https://host[:port], got {redact_url(url)!r}"
        )
    if parts.path or parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(
            "KALEYRA_BASE_URL takes a scheme, host and port only; "
            "the client appends /v1/<SID>/contacts/blocklisted"
        )
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ConfigError(
            "KALEYRA_BASE_URL: plain http:// is only allowed to loopback "
            "(127.0.0.0/8, ::1, localhost); use https://"
        )
    return url


def _split_url(variable: str, url: str) -> SplitResult:
    """``urlsplit(url)``, its port checked, or a :class:`ConfigError` that shows neither the
    URL nor urllib's message (a port that is not a number, say, can be a password cut short
    by an unencoded ``/``)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        problem = "has a bad port" if "Port" in str(exc) else "is not a valid URL"
        raise ConfigError(
            f"{variable} {problem} (percent-encode '@', ':' and '/' in a password)"
        ) from None
    return parts


def validate_cache_url(raw: Any) -> str:
    """Check that ``BLOCKFILTER_CACHE_URL`` can be read as a URL, whichever scheme it names:
    every part of the library may split it (the cache, the rate limiter), so a malformed one is
    a configuration error here, before anything uses it. Which schemes work is the cache's
    business (:func:`blockfilter.store.cache.open_cache`)."""
    if not isinstance(raw, str):
        raise ConfigError(f"BLOCKFILTER_CACHE_URL must be a URL, not {type(raw).__name__}")
    parts = _split_url("BLOCKFILTER_CACHE_URL", raw)
    if "@" in parts.path or "@" in parts.fragment:
        # redis://:12/34@host reads as host "", port 12: the password would be shown as an
        # address in every message about the server.
        raise ConfigError(
            "BLOCKFILTER_CACHE_URL has an '@' after its host: percent-encode '/', '?' and '#' "
            "in a password"
        )
    return raw


def load_settings(
    environ: Mapping[str, str] | None = None,
    celery_conf: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> Settings:
    """Build :class:`Settings` from the environment, a Celery ``app.conf`` and overrides.

    Precedence, highest first: ``overrides``, the lower-case keys in ``celery_conf``
    (``kaleyra_sid``, ``blockfilter_on_error``...), the environment, the defaults.
    A bad value raises :class:`ConfigError` naming the variable.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, spec in SPECS.items():
        conf_key = spec.env.lower()
        if name in overrides:
            values[name] = overrides[name]
            sources[name] = "override"
            continue
        raw: Any = None
        source = "default"
        if celery_conf is not None and celery_conf.get(conf_key) is not None:
            raw, source = celery_conf[conf_key], f"celery conf {conf_key}"
        elif env.get(spec.env) is not None:
            raw, source = env[spec.env], f"env {spec.env}"
        if spec.blank_is_default and isinstance(raw, str) and raw == "":
            raw = None
        if raw is None:
            values[name] = spec.default
            sources[name] = "default"
            continue
        try:
            values[name] = spec.parse(raw) if isinstance(raw, str) else raw
        except (TypeError, ValueError, OverflowError) as exc:
            raise _value_error(name, source, exc) from None
        sources[name] = source
    if values.get("sid") == "":
        values["sid"] = None
    if values.get("api_key") == "":
        values["api_key"] = None
    return Settings(**values, sources=sources)
