"""The environment of every process a test starts: the command line, workers, scripts.

One builder, :func:`subprocess_env`, so a child never inherits the machine's ``KALEYRA_*`` or
``BLOCKFILTER_*`` settings, always imports this checkout (and ``tests.support``) whatever its
working directory, and, pointed at an upstream, gets the test credentials and a retry budget
small enough that failure cases end in about a second.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

ROOT = Path(__file__).resolve().parents[2]

TEST_SID = "TESTSID"
TEST_KEY = "test-key-0123456789"

#: The machine's settings, which must never reach the code under test.
SETTINGS_PREFIXES = ("KALEYRA_", "BLOCKFILTER_")

#: Given with an upstream: two attempts, hardly any backoff, short timeouts. A test that
#: needs another budget overrides these keys.
FAST_RETRIES = {
    "BLOCKFILTER_RETRY_ATTEMPTS": "2",
    "BLOCKFILTER_BACKOFF_BASE": "0.01",
    "BLOCKFILTER_BACKOFF_MAX": "0.02",
    "BLOCKFILTER_REQUEST_TIMEOUT": "1",
    "BLOCKFILTER_RETRY_DEADLINE": "2",
}


class Upstream(Protocol):
    """A server that speaks Kaleyra's API: the simulator, a hostile upstream."""

    @property
    def base_url(self) -> str: ...


def clean_environ(*also: str) -> dict[str, str]:
    """This process's environment without the variables of :data:`SETTINGS_PREFIXES` (and of
    the prefixes in ``also``)."""
    prefixes = SETTINGS_PREFIXES + also
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


def python_path(*first: str | Path) -> str:
    """``first``, then the repository, then the inherited ``PYTHONPATH``, without repeats."""
    inherited = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    entries = [str(entry) for entry in (*first, ROOT, *inherited) if str(entry)]
    return os.pathsep.join(dict.fromkeys(entries))


def subprocess_env(
    upstream: Upstream | str | None = None,
    /,
    *,
    path: Iterable[str | Path] = (),
    strip: tuple[str, ...] = (),
    **overrides: str,
) -> dict[str, str]:
    """The environment of a child process.

    :param upstream: a server (or its base URL) the child talks to as Kaleyra, with the test
        credentials and :data:`FAST_RETRIES`; ``None``: no credentials at all.
    :param path: directories put before the repository on ``PYTHONPATH`` (an installed test
        plugin, an app module written by the test).
    :param strip: more prefixes of variables the child must not inherit (``"BFTEST_"``).
    :param overrides: variables set last, over everything above (``PYTHONPATH`` included).
    """
    env = clean_environ(*strip)
    env["PYTHONPATH"] = python_path(*path)
    if upstream is not None:
        base_url = upstream if isinstance(upstream, str) else upstream.base_url
        env.update(KALEYRA_SID=TEST_SID, KALEYRA_API_KEY=TEST_KEY, KALEYRA_BASE_URL=base_url)
        env.update(FAST_RETRIES)
    env.update(overrides)
    return env


#: The machine's Redis, which the cache tests share (each in a database or key space of its own).
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


def redis_up() -> bool:
    """Whether the machine's Redis answers a connection (CI makes sure it does)."""
    try:
        with socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=1):
            return True
    except OSError:
        return False
