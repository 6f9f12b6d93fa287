"""The chamber's backends: where its tables live and what differs between them, behind the one
:class:`~gateway.chamber.engine.Chamber` API (docs/chamber.md).

A backend answers the engine's few questions — connect (the writer's and a read-only connection), check and
create or upgrade the schema, BEGIN a write transaction holding the chamber's write lock, has another process
committed (``data_version``), make a backup — and names its errors (``Error``).  Statements are the same for
both (Txn and Reader); the fragments that cannot be are :mod:`gateway.chamber.dialects`'.

- :class:`SqliteBackend` (``chamber.backend: sqlite``, the default): one file, WAL, ``synchronous=FULL``.
- :class:`~gateway.chamber.postgresql.PostgresBackend` (``chamber.backend: postgresql``): psycopg 3, imported only
  when chosen.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Callable

from gateway.chamber import threads, upgrades
from gateway.chamber.errors import ChamberError

#: what statements on the read connection may do (sqlite3 authorizer actions): read, look at pragmas, and
#: BEGIN/ROLLBACK (the health probe takes the write lock and gives it back); never write
_READ_ACTIONS = frozenset({sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_PRAGMA,
                           sqlite3.SQLITE_TRANSACTION, sqlite3.SQLITE_RECURSIVE})


def _read_only(action, arg1, _arg2, _db, _trigger):
    if action in _READ_ACTIONS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_UPDATE and arg1 == "sqlite_master":  # json_each (an eponymous virtual table)
        return sqlite3.SQLITE_OK                                     # is set up on first use: not a write
    return sqlite3.SQLITE_DENY


def wal_mode(conn: sqlite3.Connection, timeout: float = threads.LOCK_WAIT) -> str:
    """``PRAGMA journal_mode = WAL`` (the resulting mode).  On a new file another process may be turning it
    into WAL or creating the schema at the same moment (the split lock's two gates start together); SQLite
    then answers "database is locked" at once, without waiting as busy_timeout says: try again, briefly."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.OperationalError as e:
            if not threads.busy(e) or time.monotonic() > deadline:
                raise
        time.sleep(0.01)


class SqliteBackend:
    """The chamber in one SQLite file at ``path`` (or ``:memory:``)."""

    kind = "sqlite"
    Error = sqlite3.Error
    caches_schedules = True  # data_version tells when another connection committed (Chamber._schedules_known)

    def __init__(self, path: str | Path):
        self.path = self.target = str(path)

    def connect(self) -> sqlite3.Connection:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA synchronous = FULL")
        # temporary tables, indexes and statement journals in memory, not in a temporary file: a batch of
        # several units (one SAVEPOINT each) otherwise created, wrote and deleted such a file per batch
        conn.execute("PRAGMA temp_store = MEMORY")
        return conn

    def connect_reader(self) -> sqlite3.Connection:
        conn = self.connect()
        conn.set_authorizer(_read_only)
        return conn

    def prepare(self, conn: sqlite3.Connection) -> str:
        """The writer connection's settings; returns the journal mode (WAL, or memory for ``:memory:``)."""
        mode = wal_mode(conn)
        conn.execute("PRAGMA foreign_keys = ON")
        return mode

    def check_integrity(self, conn: sqlite3.Connection) -> None:
        """Refuse to start on a damaged chamber: better no gateway than one that loses messages."""
        problems = [r[0] for r in conn.execute("PRAGMA integrity_check(5)")]
        if problems != ["ok"]:
            raise ChamberError(
                f"the chamber {self.path} is damaged (SQLite integrity_check: {'; '.join(problems)}). Stop "
                f"gatewayd, move the file aside and restore the last backup; the damaged file is kept as it is."
            )

    def ensure_schema(self, conn: sqlite3.Connection, clock: Callable[[], float]) -> None:
        upgrades.ensure_schema(conn, self.path, clock)

    def begin(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")

    def writable(self, conn: sqlite3.Connection) -> tuple[bool, str]:
        """Can the chamber be written now?  Take the write lock on ``conn`` and give it back (nothing written)."""
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return True, "ok"

    def data_version(self, conn: sqlite3.Connection) -> int:
        return conn.execute("PRAGMA data_version").fetchone()[0]

    def opened_error(self, e: Exception) -> ChamberError:
        return ChamberError(f"cannot open the chamber {self.path}: {e}. If the file is damaged, stop gatewayd, move "
                            f"it aside and restore the last backup.")

    def backup(self, reader: sqlite3.Connection, dest: str | Path, counts: Callable) -> dict[str, int]:
        """Write a consistent copy of the chamber to ``dest`` (see Chamber.backup); ``counts(conn)``: the row
        counts of the copy."""
        dest = Path(dest)
        partial = dest.with_name(dest.name + ".partial")
        partial.unlink(missing_ok=True)
        os.close(os.open(partial, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600))
        try:
            copy = sqlite3.connect(partial)
            try:
                reader.backup(copy)
                problems = [r[0] for r in copy.execute("PRAGMA integrity_check(5)")]
                if problems != ["ok"]:
                    raise ChamberError(f"the copy did not check out ({'; '.join(problems)}); nothing was replaced")
                result = counts(copy)
            finally:
                copy.close()
            fd = os.open(partial, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(partial, dest)
            fd = os.open(dest.parent, os.O_RDONLY)
            try:
                os.fsync(fd)  # the rename itself on disk
            finally:
                os.close(fd)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return result


def backend_for(settings):
    """The backend ``settings`` (the config's ``chamber`` section, or anything with its attributes) name:
    ``backend`` sqlite (``path``) or postgresql (``postgresql.dsn``, ...; ``postgresql.password()``, read now)."""
    kind = getattr(settings, "backend", "sqlite")
    if kind == "sqlite":
        return SqliteBackend(settings.path)
    if kind == "postgresql":
        from gateway.chamber.postgresql import PostgresBackend

        pg = settings.postgresql
        try:
            password = settings.postgresql.password()
        except (OSError, LookupError) as e:  # the file is unreadable, the variable unset: said, never shown
            raise ChamberError(f"the chamber's database password: {e}") from e
        return PostgresBackend(pg.dsn, password=password, sslmode=pg.sslmode,
                               sslrootcert=str(pg.sslrootcert) if pg.sslrootcert else None,
                               connect_timeout=pg.connect_timeout)
    raise ChamberError(f"unknown chamber backend {kind!r}")
