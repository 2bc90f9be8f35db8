"""Where the ledger's events live: a SQLite file (the default, no server) or PostgreSQL (a
fleet), behind one small interface.

What both guarantee:

* **Append-only.** A trigger refuses any ``DELETE`` of an event and any ``UPDATE`` of what it
  says; only its seal (hash, ciphertext, key id) may be rewritten, by a key rotation.
* **No number in clear.** A row holds the number's keyed hash and its ciphertext
  (:mod:`blockfilter.ledger.crypto`); an idempotency reference, only its keyed hash.
* **Serialised writers.** One write transaction at a time (SQLite's ``BEGIN IMMEDIATE``, a
  PostgreSQL advisory lock), so "was this number opted out before this event?" is answered
  in the same transaction that appends the event: one confirmation, never two.
* **A fence between reports and dispatches.** :meth:`Store.gate` is held (shared) by a task
  from its last ledger read until its dispatch hook returns; :meth:`Store.drain` (exclusive)
  waits for every gate open at the time. A report drains after its event is committed, so when
  it returns no dispatch that could have missed it is still going on, in any process.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import unquote, urlsplit

from ..errors import ConfigError, LedgerUnavailable
from .events import Event

log = logging.getLogger("blockfilter.ledger")

T = TypeVar("T")

#: How long a report waits for the dispatches in flight before it gives up waiting.
DRAIN_TIMEOUT_S = 60.0
# SQLite's wait for a lock held by another process (a writer, a rotation).
_SQLITE_BUSY_S = 30.0
_SQLITE_CHUNK = 500
# Connections of one process that set a new file up (WAL, schema) take turns: SQLite answers a
# journal-mode change that meets another connection's with "database is locked" at once,
# without waiting out its busy timeout.
_SQLITE_SETUP_LOCK = threading.Lock()

_COLUMNS = (
    "seq, number_hash, channel, opted_out, occurred_at, recorded_at, source, provider, code, actor"
)


@dataclass(frozen=True, slots=True)
class NewRow:
    """An event to append, already sealed."""

    number_hash: bytes
    number_enc: str
    channel: str
    opted_out: bool
    occurred_at: float
    source: str
    provider: str | None
    code: str | None
    actor: str | None
    ref_hash: bytes | None
    key_id: str


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """A number whose Kaleyra blocklist status is to be written back."""

    number_hash: bytes
    channel: str
    number_enc: str
    blocklisted: bool
    version: int
    attempts: int


@dataclass(frozen=True, slots=True)
class QueuedRow:
    """An outbox row whole, as a key rotation reads and writes it back re-sealed."""

    number_hash: bytes
    channel: str
    number_enc: str
    blocklisted: bool
    version: int
    attempts: int
    due_at: float
    claimed_until: float | None


#: An event's seal: (seq, number_hash, number_enc, key_id).
Seal = tuple[int, bytes, str, str]


_OUTBOX_COLUMNS = (
    "number_hash, channel, number_enc, blocklisted, version, attempts, due_at, claimed_until"
)


def _queued_row(row: Sequence[Any]) -> QueuedRow:
    return QueuedRow(
        bytes(row[0]),
        row[1],
        row[2],
        bool(row[3]),
        int(row[4]),
        int(row[5]),
        float(row[6]),
        None if row[7] is None else float(row[7]),
    )


def _outbox_values(row: QueuedRow) -> tuple[Any, ...]:
    return (
        row.number_hash,
        row.channel,
        row.number_enc,
        row.blocklisted,
        row.version,
        row.attempts,
        row.due_at,
        row.claimed_until,
    )


def _event(row: Sequence[Any]) -> tuple[bytes, Event]:
    return bytes(row[1]), Event(
        seq=int(row[0]),
        channel=row[2],
        opted_out=bool(row[3]),
        occurred_at=float(row[4]),
        recorded_at=float(row[5]),
        source=row[6],
        provider=row[7],
        code=row[8],
        actor=row[9],
    )


class Writer(Protocol):
    """What a write transaction offers (:meth:`Store.write`)."""

    def events_for(self, hashes: Sequence[bytes]) -> list[tuple[bytes, Event]]: ...

    def ref_seen(self, ref_hashes: Sequence[bytes]) -> bool: ...

    def insert(self, row: NewRow, recorded_at: float) -> int | None: ...

    def queue_write_back(
        self, number_hash: bytes, channel: str, number_enc: str, blocklisted: bool, now: float
    ) -> None: ...

    # What a key rotation does, in one transaction: no write slips in between its read of
    # the seals and its rewrite of them.

    def seals(self) -> list[Seal]:
        """Every event's seal, in the order written."""
        ...

    def reseal_events(self, seals: Sequence[Seal]) -> None:
        """Rewrite these events' seals (matched by ``seq``); nothing else of an event."""
        ...

    def queued(self) -> list[QueuedRow]:
        """Every outbox row."""
        ...

    def replace_outbox(self, rows: Sequence[QueuedRow]) -> None:
        """The outbox becomes exactly ``rows``."""
        ...

    def set_key_ids(self, key_ids: Sequence[str]) -> None:
        """Record ``key_ids`` as the only keys the events are sealed with."""
        ...


class Store:
    """The interface of a backend; see :class:`SQLiteStore` and :class:`PostgresStore`."""

    url: str

    def exists(self) -> bool:
        """Whether anything was ever written (a reader of an absent ledger answers clean)."""
        raise NotImplementedError

    def read(self, hashes: Sequence[bytes]) -> tuple[list[tuple[bytes, Event]], set[str]]:
        """The events of these hashes, and the key ids the store's events are sealed with,
        read together (one snapshot)."""
        raise NotImplementedError

    def write(self, work: Callable[[Writer], T]) -> T:
        """Run ``work`` in a write transaction, one writer at a time across processes."""
        raise NotImplementedError

    @contextlib.contextmanager
    def gate(self) -> Iterator[None]:
        """Hold the fence (shared) for the block: :meth:`drain` waits for it."""
        raise NotImplementedError
        yield

    def drain(self, timeout: float = DRAIN_TIMEOUT_S) -> bool:
        """Wait until no gate opened before this call is held; ``False`` on timeout."""
        raise NotImplementedError

    def sealed_rows(self) -> list[Seal]:
        """Every event's (seq, number_hash, number_enc, key_id), for an export (a rotation
        reads them in its write transaction: :meth:`Writer.seals`)."""
        raise NotImplementedError

    def all_events(self) -> list[tuple[bytes, Event]]:
        raise NotImplementedError

    def claim_outbox(self, now: float, lease: float, limit: int) -> list[OutboxItem]:
        raise NotImplementedError

    def finish_outbox(self, items: Sequence[OutboxItem]) -> None:
        raise NotImplementedError

    def retry_outbox(self, items: Sequence[OutboxItem], due_at: float) -> None:
        raise NotImplementedError

    def outbox_size(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def open_store(url: str | None) -> Store:
    """The store at ``url``: ``sqlite:///relative``, ``sqlite:////absolute``, a plain path,
    or ``postgresql://...``; ``None``: the SQLite file of the user's data directory."""
    if url is None:
        return SQLiteStore(default_sqlite_path())
    scheme = url.split(":", 1)[0].lower() if "://" in url else ""
    if scheme in ("postgres", "postgresql"):
        return PostgresStore(url)
    if scheme == "sqlite":
        path = url[len("sqlite://") :]
        if not path.startswith("/") or path == "/":
            raise ConfigError(
                "BLOCKFILTER_OPTOUT_URL: sqlite:///relative/file or sqlite:////absolute/file"
            )
        return SQLiteStore(Path(unquote(path[1:])))
    if scheme:
        raise ConfigError(
            f"BLOCKFILTER_OPTOUT_URL: unknown scheme {scheme!r} (sqlite:/// or postgresql://)"
        )
    return SQLiteStore(Path(url))


def default_sqlite_path() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local/share")
    return Path(base) / "blockfilter" / "optout.sqlite3"


def _lock_key(namespace: str, what: str) -> int:
    digest = hashlib.blake2b(f"{namespace}:{what}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


# -- SQLite ------------------------------------------------------------------------------------

_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    number_hash BLOB NOT NULL,
    number_enc TEXT NOT NULL,
    channel TEXT NOT NULL CHECK (channel IN ('sms', 'whatsapp', 'voice', 'all')),
    opted_out INTEGER NOT NULL CHECK (opted_out IN (0, 1)),
    occurred_at REAL NOT NULL,
    recorded_at REAL NOT NULL,
    source TEXT NOT NULL,
    provider TEXT,
    code TEXT,
    actor TEXT,
    ref_hash BLOB UNIQUE,
    key_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_number ON events (number_hash);
CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'the opt-out ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS events_no_rewrite
BEFORE UPDATE OF seq, channel, opted_out, occurred_at, recorded_at, source, provider, code,
    actor ON events
BEGIN SELECT RAISE(ABORT, 'the opt-out ledger is append-only'); END;
CREATE TABLE IF NOT EXISTS key_ids (key_id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS outbox (
    number_hash BLOB NOT NULL,
    channel TEXT NOT NULL,
    number_enc TEXT NOT NULL,
    blocklisted INTEGER NOT NULL,
    version INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    due_at REAL NOT NULL,
    claimed_until REAL,
    PRIMARY KEY (number_hash, channel)
);
"""


class _SQLiteWriter:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def events_for(self, hashes: Sequence[bytes]) -> list[tuple[bytes, Event]]:
        return _sqlite_events_for(self._db, hashes)

    def ref_seen(self, ref_hashes: Sequence[bytes]) -> bool:
        marks = ",".join("?" * len(ref_hashes))
        query = f"SELECT 1 FROM events WHERE ref_hash IN ({marks}) LIMIT 1"  # noqa: S608
        return self._db.execute(query, list(ref_hashes)).fetchone() is not None

    def insert(self, row: NewRow, recorded_at: float) -> int | None:
        cursor = self._db.execute(
            "INSERT INTO events (number_hash, number_enc, channel, opted_out, occurred_at, "
            "recorded_at, source, provider, code, actor, ref_hash, key_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (ref_hash) DO NOTHING",
            (
                row.number_hash,
                row.number_enc,
                row.channel,
                int(row.opted_out),
                row.occurred_at,
                recorded_at,
                row.source,
                row.provider,
                row.code,
                row.actor,
                row.ref_hash,
                row.key_id,
            ),
        )
        if cursor.rowcount == 0:
            return None
        self._db.execute("INSERT OR IGNORE INTO key_ids VALUES (?)", (row.key_id,))
        return int(cursor.lastrowid or 0)

    def queue_write_back(
        self, number_hash: bytes, channel: str, number_enc: str, blocklisted: bool, now: float
    ) -> None:
        self._db.execute(
            "INSERT INTO outbox (number_hash, channel, number_enc, blocklisted, version, due_at) "
            "VALUES (?, ?, ?, ?, 1, ?) ON CONFLICT (number_hash, channel) DO UPDATE SET "
            "number_enc = excluded.number_enc, blocklisted = excluded.blocklisted, "
            "version = outbox.version + 1, due_at = excluded.due_at, attempts = 0",
            (number_hash, channel, number_enc, int(blocklisted), now),
        )

    def seals(self) -> list[Seal]:
        return _sqlite_seals(self._db)

    def reseal_events(self, seals: Sequence[Seal]) -> None:
        self._db.executemany(
            "UPDATE events SET number_hash = ?, number_enc = ?, key_id = ? WHERE seq = ?",
            [(h, enc, key_id, seq) for seq, h, enc, key_id in seals],
        )

    def queued(self) -> list[QueuedRow]:
        rows = self._db.execute(f"SELECT {_OUTBOX_COLUMNS} FROM outbox")  # noqa: S608
        return [_queued_row(row) for row in rows]

    def replace_outbox(self, rows: Sequence[QueuedRow]) -> None:
        self._db.execute("DELETE FROM outbox")
        self._db.executemany(
            f"INSERT INTO outbox ({_OUTBOX_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
            [_outbox_values(row) for row in rows],
        )

    def set_key_ids(self, key_ids: Sequence[str]) -> None:
        self._db.execute("DELETE FROM key_ids")
        self._db.executemany("INSERT INTO key_ids VALUES (?)", [(k,) for k in key_ids])


def _sqlite_seals(db: sqlite3.Connection) -> list[Seal]:
    rows = db.execute("SELECT seq, number_hash, number_enc, key_id FROM events ORDER BY seq")
    return [(int(r[0]), bytes(r[1]), r[2], r[3]) for r in rows]


def _sqlite_events_for(
    db: sqlite3.Connection, hashes: Sequence[bytes]
) -> list[tuple[bytes, Event]]:
    found: list[tuple[bytes, Event]] = []
    for start in range(0, len(hashes), _SQLITE_CHUNK):
        chunk = list(hashes[start : start + _SQLITE_CHUNK])
        marks = ",".join("?" * len(chunk))
        query = f"SELECT {_COLUMNS} FROM events WHERE number_hash IN ({marks})"  # noqa: S608
        found.extend(_event(row) for row in db.execute(query, chunk))
    return found


class SQLiteStore(Store):
    """The ledger in a SQLite file (WAL, synchronous=FULL), shared by the processes of one
    machine. The fence is a second, tiny SQLite file in rollback-journal mode, whose lock
    protocol (shared readers, a pending writer that holds new readers back) is exactly a
    cross-process readers-writer lock that cannot starve the writer."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path).expanduser()
        self.url = f"sqlite:///{self.path}"
        self._fence_path = Path(f"{self.path}-fence")
        self._local = threading.local()
        self._pid = os.getpid()
        self._schema_ready = False

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"

    def _connect(self, path: Path, wal: bool) -> sqlite3.Connection:
        db = sqlite3.connect(str(path), timeout=_SQLITE_BUSY_S, isolation_level=None)
        if wal:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # an opt-out is on disk once it is recorded
        else:
            db.execute("PRAGMA journal_mode=DELETE")
        return db

    def _open_ready(self) -> sqlite3.Connection:
        db = self._connect(self.path, wal=True)
        try:
            if not self._schema_ready:
                db.executescript(_SQLITE_SCHEMA)
                self._schema_ready = True
        except BaseException:
            db.close()
            raise
        return db

    def _db(self, create: bool) -> sqlite3.Connection | None:
        if self._pid != os.getpid():  # a fork: the parent's connections are not ours
            self._local, self._pid = threading.local(), os.getpid()
        db = getattr(self._local, "db", None)
        if db is not None:
            return db
        if not self.path.exists():
            if not create:
                return None
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = _set_up_while_busy(self._open_ready, self.path)
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"opt-out ledger {self.path}: {exc}") from None
        self._local.db = db
        return db

    def exists(self) -> bool:
        return self.path.exists()

    def read(self, hashes: Sequence[bytes]) -> tuple[list[tuple[bytes, Event]], set[str]]:
        try:
            db = self._db(create=False)
            if db is None:
                return [], set()
            db.execute("BEGIN")
            try:
                keys = {row[0] for row in db.execute("SELECT key_id FROM key_ids")}
                events = _sqlite_events_for(db, hashes) if hashes else []
            finally:
                db.execute("COMMIT")
            return events, keys
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"opt-out ledger {self.path}: {exc}") from None

    def write(self, work: Callable[[Writer], T]) -> T:
        try:
            db = self._db(create=True)
            assert db is not None
            db.execute("BEGIN IMMEDIATE")
            try:
                result = work(_SQLiteWriter(db))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"opt-out ledger {self.path}: {exc}") from None

    def _fence(self) -> sqlite3.Connection:
        db = getattr(self._local, "fence", None)
        if db is None:
            self._fence_path.parent.mkdir(parents=True, exist_ok=True)
            db = self._connect(self._fence_path, wal=False)
            db.execute("CREATE TABLE IF NOT EXISTS fence (x INTEGER)")
            self._local.fence = db
        return db

    @contextlib.contextmanager
    def gate(self) -> Iterator[None]:
        try:
            db = self._fence()
            db.execute("BEGIN")
            db.execute("SELECT count(*) FROM fence").fetchone()  # takes the SHARED lock
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"opt-out ledger fence {self._fence_path}: {exc}") from None
        try:
            yield
        finally:
            with contextlib.suppress(sqlite3.Error):
                db.execute("COMMIT")

    def drain(self, timeout: float = DRAIN_TIMEOUT_S) -> bool:
        deadline = time.monotonic() + timeout
        db = self._fence()
        while True:
            try:
                db.execute("BEGIN EXCLUSIVE")
                db.execute("COMMIT")
                return True
            except sqlite3.OperationalError:
                if time.monotonic() >= deadline:
                    return False

    def sealed_rows(self) -> list[Seal]:
        db = self._db(create=False)
        return [] if db is None else _sqlite_seals(db)

    def all_events(self) -> list[tuple[bytes, Event]]:
        db = self._db(create=False)
        if db is None:
            return []
        return [_event(row) for row in db.execute(f"SELECT {_COLUMNS} FROM events")]  # noqa: S608

    def claim_outbox(self, now: float, lease: float, limit: int) -> list[OutboxItem]:
        def work(writer: Writer) -> list[OutboxItem]:
            db = writer._db  # type: ignore[attr-defined]
            rows = db.execute(
                "UPDATE outbox SET claimed_until = ? WHERE rowid IN (SELECT rowid FROM outbox "
                "WHERE due_at <= ? AND (claimed_until IS NULL OR claimed_until < ?) "
                "ORDER BY due_at LIMIT ?) RETURNING number_hash, channel, number_enc, "
                "blocklisted, version, attempts",
                (now + lease, now, now, limit),
            ).fetchall()
            return [
                OutboxItem(bytes(r[0]), r[1], r[2], bool(r[3]), int(r[4]), int(r[5])) for r in rows
            ]

        if not self.exists():
            return []
        return self.write(work)

    def finish_outbox(self, items: Sequence[OutboxItem]) -> None:
        def work(writer: Writer) -> None:
            writer._db.executemany(  # type: ignore[attr-defined]
                "DELETE FROM outbox WHERE number_hash = ? AND channel = ? AND version = ?",
                [(i.number_hash, i.channel, i.version) for i in items],
            )

        self.write(work)

    def retry_outbox(self, items: Sequence[OutboxItem], due_at: float) -> None:
        def work(writer: Writer) -> None:
            writer._db.executemany(  # type: ignore[attr-defined]
                "UPDATE outbox SET due_at = ?, attempts = attempts + 1, claimed_until = NULL "
                "WHERE number_hash = ? AND channel = ? AND version = ?",
                [(due_at, i.number_hash, i.channel, i.version) for i in items],
            )

        self.write(work)

    def outbox_size(self) -> int:
        db = self._db(create=False)
        if db is None:
            return 0
        return int(db.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def close(self) -> None:
        for name in ("db", "fence"):
            db = getattr(self._local, name, None)
            if db is not None:
                with contextlib.suppress(sqlite3.Error):
                    db.close()
                setattr(self._local, name, None)


# -- PostgreSQL --------------------------------------------------------------------------------

_PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS blockfilter_optout_events (
    seq BIGSERIAL PRIMARY KEY,
    number_hash BYTEA NOT NULL,
    number_enc TEXT NOT NULL,
    channel TEXT NOT NULL CHECK (channel IN ('sms', 'whatsapp', 'voice', 'all')),
    opted_out BOOLEAN NOT NULL,
    occurred_at DOUBLE PRECISION NOT NULL,
    recorded_at DOUBLE PRECISION NOT NULL,
    source TEXT NOT NULL,
    provider TEXT,
    code TEXT,
    actor TEXT,
    ref_hash BYTEA UNIQUE,
    key_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS blockfilter_optout_events_by_number
    ON blockfilter_optout_events (number_hash);
CREATE OR REPLACE FUNCTION blockfilter_optout_append_only() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' OR NEW.seq IS DISTINCT FROM OLD.seq
        OR NEW.channel IS DISTINCT FROM OLD.channel
        OR NEW.opted_out IS DISTINCT FROM OLD.opted_out
        OR NEW.occurred_at IS DISTINCT FROM OLD.occurred_at
        OR NEW.recorded_at IS DISTINCT FROM OLD.recorded_at
        OR NEW.source IS DISTINCT FROM OLD.source
        OR NEW.provider IS DISTINCT FROM OLD.provider
        OR NEW.code IS DISTINCT FROM OLD.code
        OR NEW.actor IS DISTINCT FROM OLD.actor THEN
        RAISE EXCEPTION 'the opt-out ledger is append-only';
    END IF;
    RETURN NEW;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS blockfilter_optout_append_only ON blockfilter_optout_events;
CREATE TRIGGER blockfilter_optout_append_only BEFORE UPDATE OR DELETE
    ON blockfilter_optout_events FOR EACH ROW EXECUTE FUNCTION blockfilter_optout_append_only();
CREATE TABLE IF NOT EXISTS blockfilter_optout_key_ids (key_id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS blockfilter_optout_outbox (
    number_hash BYTEA NOT NULL,
    channel TEXT NOT NULL,
    number_enc TEXT NOT NULL,
    blocklisted BOOLEAN NOT NULL,
    version BIGINT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    due_at DOUBLE PRECISION NOT NULL,
    claimed_until DOUBLE PRECISION,
    PRIMARY KEY (number_hash, channel)
);
"""

_PG_EVENTS = "blockfilter_optout_events"
_PG_OUTBOX = "blockfilter_optout_outbox"


class _PostgresWriter:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def events_for(self, hashes: Sequence[bytes]) -> list[tuple[bytes, Event]]:
        return _pg_events_for(self._conn, hashes)

    def ref_seen(self, ref_hashes: Sequence[bytes]) -> bool:
        row = self._conn.execute(
            f"SELECT 1 FROM {_PG_EVENTS} WHERE ref_hash = ANY(%s) LIMIT 1",  # noqa: S608
            (list(ref_hashes),),
        ).fetchone()
        return row is not None

    def insert(self, row: NewRow, recorded_at: float) -> int | None:
        found = self._conn.execute(
            f"INSERT INTO {_PG_EVENTS} (number_hash, number_enc, channel, opted_out, "  # noqa: S608
            "occurred_at, recorded_at, source, provider, code, actor, ref_hash, key_id) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (ref_hash) DO NOTHING RETURNING seq",
            (
                row.number_hash,
                row.number_enc,
                row.channel,
                row.opted_out,
                row.occurred_at,
                recorded_at,
                row.source,
                row.provider,
                row.code,
                row.actor,
                row.ref_hash,
                row.key_id,
            ),
        ).fetchone()
        if found is None:
            return None
        self._conn.execute(
            "INSERT INTO blockfilter_optout_key_ids VALUES (%s) ON CONFLICT DO NOTHING",
            (row.key_id,),
        )
        return int(found[0])

    def queue_write_back(
        self, number_hash: bytes, channel: str, number_enc: str, blocklisted: bool, now: float
    ) -> None:
        self._conn.execute(
            "INSERT INTO blockfilter_optout_outbox AS o (number_hash, channel, number_enc, "
            "blocklisted, version, due_at) VALUES (%s, %s, %s, %s, 1, %s) "
            "ON CONFLICT (number_hash, channel) DO UPDATE SET number_enc = excluded.number_enc, "
            "blocklisted = excluded.blocklisted, version = o.version + 1, "
            "due_at = excluded.due_at, attempts = 0",
            (number_hash, channel, number_enc, blocklisted, now),
        )

    def seals(self) -> list[Seal]:
        return _pg_seals(self._conn)

    def reseal_events(self, seals: Sequence[Seal]) -> None:
        with self._conn.cursor() as cursor:
            cursor.executemany(
                f"UPDATE {_PG_EVENTS} SET number_hash = %s, number_enc = %s, key_id = %s "  # noqa: S608
                "WHERE seq = %s",
                [(h, enc, key_id, seq) for seq, h, enc, key_id in seals],
            )

    def queued(self) -> list[QueuedRow]:
        rows = self._conn.execute(f"SELECT {_OUTBOX_COLUMNS} FROM {_PG_OUTBOX}")  # noqa: S608
        return [_queued_row(row) for row in rows]

    def replace_outbox(self, rows: Sequence[QueuedRow]) -> None:
        with self._conn.cursor() as cursor:
            cursor.execute(f"DELETE FROM {_PG_OUTBOX}")  # noqa: S608
            cursor.executemany(
                f"INSERT INTO {_PG_OUTBOX} ({_OUTBOX_COLUMNS}) "  # noqa: S608
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                [_outbox_values(row) for row in rows],
            )

    def set_key_ids(self, key_ids: Sequence[str]) -> None:
        with self._conn.cursor() as cursor:
            cursor.execute("DELETE FROM blockfilter_optout_key_ids")
            cursor.executemany(
                "INSERT INTO blockfilter_optout_key_ids VALUES (%s)", [(k,) for k in key_ids]
            )


def _pg_seals(conn: Any) -> list[Seal]:
    rows = conn.execute(
        f"SELECT seq, number_hash, number_enc, key_id FROM {_PG_EVENTS} ORDER BY seq"  # noqa: S608
    ).fetchall()
    return [(int(r[0]), bytes(r[1]), r[2], r[3]) for r in rows]


def _pg_events_for(conn: Any, hashes: Sequence[bytes]) -> list[tuple[bytes, Event]]:
    if not hashes:
        return []
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM {_PG_EVENTS} WHERE number_hash = ANY(%s)",  # noqa: S608
        (list(hashes),),
    )
    return [_event(row) for row in rows]


class PostgresStore(Store):
    """The ledger in PostgreSQL (psycopg 3, the ``blockfilter[postgres]`` extra), shared by a
    fleet. Tables are made on first use in the connection's schema (set one with
    ``?options=-csearch_path%3Dmyschema`` in the URL). Advisory locks, keyed by that schema,
    serialise the writers and make the fence."""

    def __init__(self, url: str) -> None:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise ConfigError(
                "BLOCKFILTER_OPTOUT_URL is a PostgreSQL URL: install blockfilter[postgres] "
                "(psycopg 3)"
            ) from None
        self.url = url
        self._local = threading.local()
        self._pid = os.getpid()
        self._schema_ready = False
        self._keys: tuple[int, int, int] | None = None

    def __repr__(self) -> str:
        parts = urlsplit(self.url)
        return f"PostgresStore({parts.hostname!r}, {parts.path.lstrip('/')!r})"

    def _conn(self, name: str = "conn") -> Any:
        import psycopg

        if self._pid != os.getpid():
            self._local, self._pid = threading.local(), os.getpid()
        conn = getattr(self._local, name, None)
        if conn is not None and not conn.closed:
            return conn
        try:
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10)
            if self._keys is None:
                schema = _one(conn, "SELECT current_schema()")
                self._keys = (
                    _lock_key(schema, "write"),
                    _lock_key(schema, "fence"),
                    _lock_key(schema, "schema"),
                )
            if not self._schema_ready:
                # DDL only when the tables are missing: DDL next to other processes' writes
                # would take locks in an order that can deadlock with them.
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._keys[2],))
                    present = _one(conn, "SELECT to_regclass('blockfilter_optout_outbox')")
                    if present is None:
                        conn.execute(_PG_SCHEMA)
                self._schema_ready = True
        except psycopg.Error as exc:
            raise LedgerUnavailable(f"opt-out ledger (PostgreSQL): {_pg_error(exc)}") from None
        setattr(self._local, name, conn)
        return conn

    def _run(self, what: Callable[[Any], T], name: str = "conn") -> T:
        import psycopg

        try:
            return what(self._conn(name))
        except psycopg.Error as exc:
            conn = getattr(self._local, name, None)
            if conn is not None and conn.closed:
                setattr(self._local, name, None)
            raise LedgerUnavailable(f"opt-out ledger (PostgreSQL): {_pg_error(exc)}") from None

    @property
    def _lock_keys(self) -> tuple[int, int, int]:
        if self._keys is None:
            self._conn()
        assert self._keys is not None
        return self._keys

    def exists(self) -> bool:
        return True

    def read(self, hashes: Sequence[bytes]) -> tuple[list[tuple[bytes, Event]], set[str]]:
        def read(conn: Any) -> tuple[list[tuple[bytes, Event]], set[str]]:
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                keys = {r[0] for r in conn.execute("SELECT key_id FROM blockfilter_optout_key_ids")}
                return _pg_events_for(conn, hashes), keys

        return self._run(read)

    def write(self, work: Callable[[Writer], T]) -> T:
        def write(conn: Any) -> T:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock_keys[0],))
                return work(_PostgresWriter(conn))

        return self._run(write)

    @contextlib.contextmanager
    def gate(self) -> Iterator[None]:
        import psycopg

        def open_gate(conn: Any) -> Any:
            transaction = conn.transaction()
            transaction.__enter__()
            conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (self._lock_keys[1],))
            return transaction

        transaction = self._run(open_gate, "fence")
        try:
            yield
        finally:
            with contextlib.suppress(psycopg.Error):
                transaction.__exit__(None, None, None)

    def drain(self, timeout: float = DRAIN_TIMEOUT_S) -> bool:
        import psycopg

        def drain(conn: Any) -> bool:
            try:
                with conn.transaction():
                    conn.execute(f"SET LOCAL lock_timeout = {int(timeout * 1000)}")
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock_keys[1],))
                return True
            except psycopg.errors.LockNotAvailable:
                return False

        return self._run(drain, "drain")

    def sealed_rows(self) -> list[Seal]:
        return self._run(_pg_seals)

    def all_events(self) -> list[tuple[bytes, Event]]:
        rows = self._run(
            lambda conn: conn.execute(f"SELECT {_COLUMNS} FROM {_PG_EVENTS}").fetchall()  # noqa: S608
        )
        return [_event(row) for row in rows]

    def claim_outbox(self, now: float, lease: float, limit: int) -> list[OutboxItem]:
        def work(writer: Writer) -> list[OutboxItem]:
            rows = writer._conn.execute(  # type: ignore[attr-defined]
                "UPDATE blockfilter_optout_outbox SET claimed_until = %s WHERE (number_hash, "
                "channel) IN (SELECT number_hash, channel FROM blockfilter_optout_outbox "
                "WHERE due_at <= %s AND (claimed_until IS NULL OR claimed_until < %s) "
                "ORDER BY due_at LIMIT %s) RETURNING number_hash, channel, number_enc, "
                "blocklisted, version, attempts",
                (now + lease, now, now, limit),
            ).fetchall()
            return [
                OutboxItem(bytes(r[0]), r[1], r[2], bool(r[3]), int(r[4]), int(r[5])) for r in rows
            ]

        return self.write(work)

    def finish_outbox(self, items: Sequence[OutboxItem]) -> None:
        def work(writer: Writer) -> None:
            with writer._conn.cursor() as cursor:  # type: ignore[attr-defined]
                cursor.executemany(
                    "DELETE FROM blockfilter_optout_outbox WHERE number_hash = %s AND "
                    "channel = %s AND version = %s",
                    [(i.number_hash, i.channel, i.version) for i in items],
                )

        self.write(work)

    def retry_outbox(self, items: Sequence[OutboxItem], due_at: float) -> None:
        def work(writer: Writer) -> None:
            with writer._conn.cursor() as cursor:  # type: ignore[attr-defined]
                cursor.executemany(
                    "UPDATE blockfilter_optout_outbox SET due_at = %s, attempts = attempts + 1, "
                    "claimed_until = NULL WHERE number_hash = %s AND channel = %s AND version = %s",
                    [(due_at, i.number_hash, i.channel, i.version) for i in items],
                )

        self.write(work)

    def outbox_size(self) -> int:
        return int(
            self._run(
                lambda conn: conn.execute(
                    "SELECT count(*) FROM blockfilter_optout_outbox"
                ).fetchone()
            )[0]
        )

    def close(self) -> None:
        for name in ("conn", "fence", "drain"):
            conn = getattr(self._local, name, None)
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
                setattr(self._local, name, None)


def _one(conn: Any, query: str) -> Any:
    row = conn.execute(query).fetchone()
    return None if row is None else row[0]


def _pg_error(exc: BaseException) -> str:
    # psycopg's messages may quote the connection string's host and user, never a password
    # (libpq keeps it out); they never hold a number, which only travels as a hash.
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:300]


def _set_up_while_busy(open_ready: Callable[[], T], path: Path) -> T:
    """``open_ready()``, tried again while SQLite says the file is locked, for as long as its
    own busy timeout would have waited: the journal-mode switch and the schema script of a new
    file do not wait for another process's connection (or one of ours) that sets it up too."""
    deadline = time.monotonic() + _SQLITE_BUSY_S
    pause = 0.01
    while True:
        try:
            with _SQLITE_SETUP_LOCK:
                return open_ready()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            log.debug("opt-out ledger %s is being set up elsewhere; trying again", path)
        time.sleep(pause)
        pause = min(pause * 2, 0.5)
