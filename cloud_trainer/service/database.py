"""One SQL connection for the service's state: SQLite by default, PostgreSQL by URL.

The statements are written once with ``?`` placeholders and portable types; this module
translates them for PostgreSQL. Library errors become :class:`StateError`, which says
whether the database is locked, full, corrupt or unreachable.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cloud_trainer.errors import StateError

# SQLite's own words for the failures an operator must act on.
_REASONS = (
    ("locked", "locked (another process holds it)"),
    ("busy", "locked (another process holds it)"),
    ("full", "full (free disk space)"),
    ("not a database", "corrupt (restore it from a backup)"),
    ("malformed", "corrupt (restore it from a backup)"),
    ("readonly", "read-only"),
    ("unable to open", "unreachable"),
)


def explain(exc: Exception, url: str) -> StateError:
    text = str(exc)
    reason = next((why for key, why in _REASONS if key in text.lower()), "failing")
    return StateError(f"state database {url} is {reason}: {text}")


class Database:
    """``url`` is ``sqlite:///path/to/file.db`` (or a bare path) or
    ``postgresql://user@host:port/dbname``."""

    def __init__(self, url: str, *, timeout: float = 5.0) -> None:
        self.url = url
        self.postgres = url.startswith(("postgresql://", "postgres://"))
        self._lock = threading.RLock()
        try:
            self._conn = (
                self._connect_postgres(timeout) if self.postgres else self._connect(timeout)
            )
        except StateError:
            raise
        except Exception as exc:
            raise explain(exc, url) from exc

    def _connect(self, timeout: float):
        path = self.url.removeprefix("sqlite:///").removeprefix("sqlite://")
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
        # quick_check reads every page: a corrupt file is refused at start, not mid-run
        if conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise StateError(f"state database {self.url} is corrupt (PRAGMA quick_check)")
        conn.execute("PRAGMA journal_mode=WAL")  # several workers read while one writes
        conn.execute("PRAGMA synchronous=FULL")  # an acknowledged update survives power loss
        return conn

    def _connect_postgres(self, timeout: float):
        try:
            import psycopg
        except ImportError as exc:
            raise StateError(
                "a postgresql:// state URL needs psycopg: pip install 'psycopg[binary]'"
            ) from exc
        return psycopg.connect(self.url, autocommit=True, connect_timeout=max(1, int(timeout)))

    def _sql(self, statement: str) -> str:
        if not self.postgres:
            return statement
        statement = statement.replace("BLOB", "BYTEA").replace("REAL", "DOUBLE PRECISION")
        statement = statement.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY")
        return re.sub(r"\?", "%s", statement)

    @contextmanager
    def transaction(self) -> Iterator[Cursor]:
        """A transaction that takes the write lock at once (no upgrade deadlocks between
        workers); commits on success, rolls back on any error."""
        with self._lock:
            try:
                if self.postgres:
                    with self._conn.transaction():
                        yield Cursor(self, self._conn.cursor())
                    return
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield Cursor(self, self._conn.cursor())
                except BaseException:
                    if self._conn.in_transaction:  # SQLite ends it itself on a full disk
                        self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            except (sqlite3.Error, OSError) as exc:
                raise explain(exc, self.url) from exc
            except Exception as exc:
                if type(exc).__module__.startswith("psycopg"):
                    raise explain(exc, self.url) from exc
                raise

    def execute(self, statement: str, params: tuple = ()) -> list[tuple]:
        """One statement in its own transaction; the rows it returns."""
        with self.transaction() as cur:
            return cur.execute(statement, params)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class Cursor:
    def __init__(self, db: Database, cursor) -> None:
        self.db, self.cursor = db, cursor

    def execute(self, statement: str, params: tuple = ()) -> list[tuple]:
        self.cursor.execute(self.db._sql(statement), params)
        if self.cursor.description is None:
            return []
        return [tuple(row) for row in self.cursor.fetchall()]

    @property
    def rowcount(self) -> int:
        return self.cursor.rowcount
