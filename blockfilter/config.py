"""Settings: environment variables, overridden inside workers by a Celery app's ``conf``.

Every setting is read in one place, validated once, and remembers where it came from so that
``blockfilter config`` can show it (with the key redacted).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError

REGION_DOMAINS = {
    "in": "api.in.kaleyra.io",
    "sg": "api.kaleyra.io",
    "eu": "api.eu.kaleyra.io",
    "na": "api.na.kaleyra.ai",
}
CHANNELS = ("sms", "whatsapp", "voice")
ON_ERROR_POLICIES = ("defer", "allow", "drop")
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


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError(f"must be > 0, got {raw!r}")
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if value < 0:
        raise ValueError(f"must be >= 0, got {raw!r}")
    return value


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError(f"must be >= 1, got {raw!r}")
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


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse_optional(raw: str) -> Any:
        return None if raw.strip() == "" else parse(raw)

    return parse_optional


@dataclass(frozen=True)
class _Spec:
    env: str
    parse: Callable[[str], Any]
    default: Any
    help: str


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
        _optional(_positive_float),
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
}


@dataclass(frozen=True)
class Settings:
    """The effective configuration. Build it with :func:`load_settings`."""

    sid: str | None = None
    api_key: str | None = field(default=None, repr=False)
    region: str = "in"
    base_url: str | None = None
    on_error: str = "defer"
    cache_url: str = "memory://"
    cache_ttl: float = 600.0
    cache_ttl_blocked: float = 21600.0
    cache_secret: str | None = field(default=None, repr=False)
    concurrency: int = 16
    rate_limit: float | None = None
    load_plugins: list[str] | None = None
    disable_plugins: list[str] = field(default_factory=list)
    strict_plugins: bool = False
    retry_attempts: int = 5
    retry_deadline: float = 30.0
    backoff_base: float = 0.5
    backoff_max: float = 8.0
    retry_after_max: float = 30.0
    connect_timeout: float = 3.05
    request_timeout: float = 10.0
    task_max_retries: int = 3
    task_retry_backoff: float = 5.0
    startup_check: str = "settings"
    metrics_port: int | None = None
    # Where each value came from: "default", "env KALEYRA_SID", "celery conf kaleyra_sid".
    sources: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
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
        """Rows of (variable, value, source) for ``blockfilter config``; the key is redacted."""
        rows = []
        for name, spec in SPECS.items():
            value = getattr(self, name)
            if name in ("api_key", "cache_secret") and value:
                shown = "[REDACTED]"
            elif value is None:
                shown = "(unset)"
            elif isinstance(value, list):
                shown = ",".join(value)
            else:
                shown = str(value)
            rows.append((spec.env, shown, self.sources.get(name, "default")))
        return rows


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate_base_url(raw: str) -> str:
    """Check ``KALEYRA_BASE_URL``: https anywhere, plain http only to loopback."""
    url = raw.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"KALEYRA_BASE_URL must look like https://host[:port], got {url!r}")
    if parts.path or parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(
            "KALEYRA_BASE_URL takes a scheme, host and port only; "
            "the client appends /v1/<SID>/contacts/blocklisted"
        )
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ConfigError(
            "KALEYRA_BASE_URL: plain http:// is only allowed to loopback "
            "(127.0.0.0/8, ::1, localhost); use https://"
        )
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError(f"KALEYRA_BASE_URL has a bad port: {exc}") from None
    return url


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
        if raw is None:
            values[name] = spec.default
            sources[name] = "default"
            continue
        try:
            values[name] = spec.parse(raw) if isinstance(raw, str) else raw
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{spec.env}: {exc}") from None
        sources[name] = source
    if values.get("sid") == "":
        values["sid"] = None
    if values.get("api_key") == "":
        values["api_key"] = None
    return Settings(**values, sources=sources)
