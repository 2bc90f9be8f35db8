"""A pipeline plugin for the soak benchmark: counts what reaches its hooks, per message id.

A million JSON records would be hundreds of megabytes in Redis; this plugin keeps a bitmap
instead. Message ids are ``<letter><index>`` (``m0``, ``m1``...): the plugin sets bit
``index`` of ``<prefix>seen`` and, when the bit was already set, counts a repeat (and keeps
the first few repeated ids). It also counts records per hook and verdict. So, once a run is
over, ``BITCOUNT`` is the number of distinct messages that came out and ``records - distinct``
the number of repeats: "every message exactly once" is ``distinct == sent and repeats == 0``.

Configured by ``BFSOAK_REDIS_URL`` and ``BFSOAK_PREFIX``; installed as a fake distribution
(:func:`install_counting_dist`) so workers find it through a real entry point.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from blockfilter.plugins.hookspecs import hookimpl

DIST = "bfsoak_plugins"
ENTRY_POINT = "bfsoak_counter"
REPEATS_KEPT = 100

_client: redis.Redis | None = None
_client_pid = 0


def _redis() -> redis.Redis:
    # One client per process, made after the prefork fork, never shared across it.
    global _client, _client_pid
    if _client is None or _client_pid != os.getpid():
        _client = redis.Redis.from_url(os.environ["BFSOAK_REDIS_URL"])
        _client_pid = os.getpid()
    return _client


def _index(message_id: Any) -> int | None:
    if isinstance(message_id, str) and len(message_id) > 1 and message_id[1:].isdigit():
        return int(message_id[1:])
    return None


def _count(hook: str, messages: list[dict[str, Any]]) -> None:
    prefix = os.environ["BFSOAK_PREFIX"]
    client = _redis()
    indexed = [(m.get("id"), _index(m.get("id"))) for m in messages]
    pipe = client.pipeline(transaction=False)
    for _, index in indexed:
        if index is not None:
            pipe.setbit(f"{prefix}seen", index, 1)
    earlier = iter(pipe.execute())
    pipe = client.pipeline(transaction=False)
    repeats = 0
    for message_id, index in indexed:
        if index is None:
            pipe.hincrby(f"{prefix}counts", "unindexed", 1)
        elif next(earlier):
            repeats += 1
            pipe.rpush(f"{prefix}repeated", str(message_id))
    verdicts: dict[str, int] = {}
    for m in messages:
        key = f"{hook}:{m.get('verdict')}"
        verdicts[key] = verdicts.get(key, 0) + 1
    for key, count in verdicts.items():
        pipe.hincrby(f"{prefix}counts", key, count)
    pipe.hincrby(f"{prefix}counts", "records", len(messages))
    if repeats:
        pipe.hincrby(f"{prefix}counts", "repeats", repeats)
        pipe.ltrim(f"{prefix}repeated", 0, REPEATS_KEPT - 1)
    pipe.execute()


@hookimpl
def blockfilter_dispatch(messages: list[dict[str, Any]]) -> None:
    _count("dispatch", messages)


@hookimpl
def blockfilter_suppressed(messages: list[dict[str, Any]]) -> None:
    _count("suppressed", messages)


# -- for the process that reads the counts --------------------------------------------------


@dataclass
class Tally:
    """What the counting plugin saw, read back from Redis."""

    records: int
    distinct: int
    repeats: int
    by_hook_verdict: dict[str, int]
    repeated_ids: list[str]

    @classmethod
    def read(cls, client: redis.Redis, prefix: str) -> Tally:
        raw: dict[bytes, bytes] = client.hgetall(f"{prefix}counts")  # type: ignore[assignment]
        counts = {k.decode(): int(v) for k, v in raw.items()}
        repeated: list[bytes] = client.lrange(f"{prefix}repeated", 0, -1)  # type: ignore[assignment]
        return cls(
            records=counts.pop("records", 0),
            distinct=int(client.bitcount(f"{prefix}seen")),  # type: ignore[arg-type]
            repeats=counts.pop("repeats", 0),
            by_hook_verdict=counts,
            repeated_ids=[r.decode() for r in repeated],
        )


def install_counting_dist(directory: Path) -> Path:
    """A fake installed distribution whose only ``[blockfilter]`` entry point is this plugin.

    Put ``directory`` on ``PYTHONPATH`` and ``importlib.metadata`` finds it like any package.
    """
    info = directory / f"{DIST}-1.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {DIST}\nVersion: 1.0\n", encoding="utf-8"
    )
    (info / "entry_points.txt").write_text(
        f"[blockfilter]\n{ENTRY_POINT} = tests.support.counting_plugin\n",
        encoding="utf-8",
    )
    return directory
