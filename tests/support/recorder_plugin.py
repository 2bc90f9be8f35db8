"""A pipeline plugin for the tests: records what reaches its hooks into a Redis list.

Installed as a fake distribution with a ``[blockfilter]`` entry point, so the worker finds it
the way it finds a real plugin. Each record is JSON: ``{"hook", "id", "verdict", "channel",
"reason", "pid", "at", "message"}``; the list's key is ``BFTEST_RECORD_KEY``. Its dispatch hook can
be told to fail (``BFTEST_FAIL_KEY``).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis

from blockfilter.plugins.hookspecs import hookimpl

_client: redis.Redis | None = None
_client_pid = 0


def _redis() -> redis.Redis:
    # One client per process, made after the prefork fork, never shared across it.
    global _client, _client_pid
    if _client is None or _client_pid != os.getpid():
        _client = redis.Redis.from_url(os.environ["BFTEST_RECORD_URL"])
        _client_pid = os.getpid()
    return _client


def _record(hook: str, messages: list[dict[str, Any]]) -> None:
    rows = [
        json.dumps(
            {
                "hook": hook,
                "id": m.get("id"),
                "verdict": m.get("verdict"),
                "channel": m.get("channel"),
                "reason": m.get("reason"),
                "pid": os.getpid(),
                "at": time.time(),
                "message": m,
            }
        )
        for m in messages
    ]
    _redis().rpush(os.environ["BFTEST_RECORD_KEY"], *rows)


@hookimpl
def blockfilter_dispatch(messages: list[dict[str, Any]]) -> None:
    # A test sets BFTEST_FAIL_KEY to N to make the next N calls fail, before recording.
    fail_key = os.environ.get("BFTEST_FAIL_KEY")
    if fail_key and _redis().decr(fail_key) >= 0:
        # Quoting the first message, as a careless pipeline's error would: the number must
        # not reach a stored exception or a log line whole.
        first = messages[0]
        raise RuntimeError(
            f"bftest: the dispatch hook fails on purpose (to {first.get('to')}, "
            f"e164 {first.get('e164')})"
        )
    # A send takes time (BFTEST_DISPATCH_DELAY seconds): the record is written when it is done.
    delay = float(os.environ.get("BFTEST_DISPATCH_DELAY") or 0)
    if delay:
        time.sleep(delay)
    _record("dispatch", messages)


@hookimpl
def blockfilter_suppressed(messages: list[dict[str, Any]]) -> None:
    _record("suppressed", messages)
