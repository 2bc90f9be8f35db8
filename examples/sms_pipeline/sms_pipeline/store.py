"""The pipeline's own data, in one SQLite file (``SMS_PIPELINE_DB``).

* ``outbox``: the messages sent, one row per ``id``. blockfilter delivers at least once (a
  crashed worker's batch runs again), so "sending" claims the ``id`` first: a repeat only
  counts an attempt and sends nothing.
* ``suppressed``: the messages not sent, with their verdict and reason, one row per ``id``.
* ``opt_outs``: numbers that asked not to be contacted on a channel, checked by blockfilter
  alongside Kaleyra's blocklist.

A connection per call: Celery's prefork pool runs the hooks in several processes, and SQLite
connections must not cross a fork. WAL mode lets readers and the writers get along.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from datetime import datetime, timezone
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id TEXT PRIMARY KEY,
    channel TEXT NOT NULL,
    e164 TEXT NOT NULL,
    message TEXT NOT NULL,
    sent_at TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS suppressed (
    id TEXT PRIMARY KEY,
    verdict TEXT NOT NULL,
    reason TEXT,
    message TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS opt_outs (
    channel TEXT NOT NULL,
    number TEXT NOT NULL,
    PRIMARY KEY (channel, number)
);
"""

# SQLite's limit on the parameters of one statement is 999 on old builds.
_CHUNK = 500


def database_path() -> str:
    return os.environ.get("SMS_PIPELINE_DB", "sms_pipeline.sqlite3")


@contextmanager
def connect() -> Iterator[sqlite3.Connection]:
    """A connection to the pipeline's database, committed on success."""
    with closing(sqlite3.connect(database_path(), timeout=30)) as connection:
        connection.execute("PRAGMA journal_mode=WAL")
        with connection:
            yield connection


def create_tables() -> None:
    with connect() as db:
        db.executescript(SCHEMA)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def send(messages: Iterable[dict[str, Any]]) -> int:
    """ "Send" each message once per ``id``; returns how many were sent by this call.

    A real pipeline would call its SMS/WhatsApp gateway for the newly claimed rows, after the
    commit; this example's outbox is the record of what went out.
    """
    sent = 0
    with connect() as db:
        for message in messages:
            claimed = db.execute(
                "INSERT INTO outbox (id, channel, e164, message, sent_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET attempts = attempts + 1 RETURNING attempts",
                (
                    str(message["id"]),
                    message["channel"],
                    message["e164"],
                    json.dumps(message, ensure_ascii=False),
                    _now(),
                ),
            ).fetchone()
            sent += claimed[0] == 1
    return sent


def suppress(messages: Iterable[dict[str, Any]]) -> None:
    """Record the messages that will not be sent (idempotent on ``id``)."""
    with connect() as db:
        db.executemany(
            "INSERT INTO suppressed (id, verdict, reason, message) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET verdict = excluded.verdict, "
            "reason = excluded.reason, attempts = attempts + 1",
            [
                (
                    str(m.get("id")),
                    m["verdict"],
                    m.get("reason"),
                    json.dumps(m, ensure_ascii=False),
                )
                for m in messages
            ],
        )


def opt_out(channel: str, numbers: Iterable[str]) -> None:
    with connect() as db:
        db.executemany(
            "INSERT OR IGNORE INTO opt_outs (channel, number) VALUES (?, ?)",
            [(channel.lower(), number) for number in numbers],
        )


def opted_out(channel: str, numbers: list[str]) -> list[str]:
    """The ``numbers`` (E.164) that opted out of ``channel``."""
    found: list[str] = []
    with connect() as db:
        for start in range(0, len(numbers), _CHUNK):
            chunk = numbers[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = db.execute(
                f"SELECT number FROM opt_outs WHERE channel = ? AND number IN ({marks})",
                [channel, *chunk],
            )
            found.extend(row[0] for row in rows)
    return found


def rows(table: str) -> list[dict[str, Any]]:
    """Every row of ``outbox`` or ``suppressed``, the message decoded."""
    if table not in ("outbox", "suppressed"):
        raise ValueError(f"no table {table!r}")
    with connect() as db:
        db.row_factory = sqlite3.Row
        found = [dict(row) for row in db.execute(f"SELECT * FROM {table} ORDER BY id")]
    for row in found:
        row["message"] = json.loads(row["message"])
    return found
