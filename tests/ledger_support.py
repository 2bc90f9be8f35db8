"""What the ledger tests share: a ledger on SQLite (a temporary file) or on the machine's
PostgreSQL (a schema of the test's own, dropped afterwards), and the settings pointing at it."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.conftest import port_open

PG_BASE = "postgresql://postgres@127.0.0.1:5432/test"
KEY_A = "ledger-key-A-0123456789abcdefghijklmnop"
KEY_B = "ledger-key-B-0123456789abcdefghijklmnop"


@dataclass
class LedgerPlace:
    kind: str
    url: str
    schema: str | None = None
    path: Path | None = None

    def dump(self) -> str:
        """The store as a SQL dump, the way an operator (or a thief) would take one."""
        if self.kind == "sqlite":
            import sqlite3

            assert self.path is not None
            db = sqlite3.connect(str(self.path))
            try:
                return "\n".join(db.iterdump())
            finally:
                db.close()
        command = ["pg_dump", "-h", "127.0.0.1", "-U", "postgres", "-n", str(self.schema), "test"]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def require_postgres() -> None:
    if not port_open("127.0.0.1", 5432):
        pytest.skip("PostgreSQL not reachable at 127.0.0.1:5432")


@pytest.fixture
def postgres_place() -> Iterator[LedgerPlace]:
    require_postgres()
    import psycopg

    schema = f"bftest_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_BASE, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    url = f"{PG_BASE}?options={quote(f'-csearch_path={schema}')}"
    try:
        yield LedgerPlace("postgres", url, schema=schema)
    finally:
        from blockfilter.ledger.ledger import forget_shared_ledgers

        forget_shared_ledgers()
        with psycopg.connect(PG_BASE, autocommit=True) as conn:
            # Connections of worker processes that are still closing must not keep it.
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE pid <> pg_backend_pid() AND query ILIKE %s",
                (f"%{schema}%",),
            )
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture
def sqlite_place(tmp_path: Path) -> Iterator[LedgerPlace]:
    path = tmp_path / "optout.sqlite3"
    yield LedgerPlace("sqlite", f"sqlite:///{path}", path=path)
    from blockfilter.ledger.ledger import forget_shared_ledgers

    forget_shared_ledgers()


@pytest.fixture(params=["sqlite", "postgres"])
def place(request: pytest.FixtureRequest) -> LedgerPlace:
    """The same test on both stores."""
    return request.getfixturevalue(f"{request.param}_place")
