"""The chamber on PostgreSQL (``chamber.backend: postgresql``): the backend :class:`~gateway.chamber.engine.Chamber`
uses instead of the SQLite file, with psycopg 3 (the optional extra ``gatewayd[postgresql]``).

What differs from SQLite, and where it is handled — the rest of the chamber (the group commit, Txn, Reader, the
schema versions) is the same code:

- **Statements.** :class:`PgConnection` looks like the ``sqlite3.Connection`` Txn and Reader were written for:
  ``execute`` / ``executemany`` with ``?`` placeholders (translated once per statement text, cached: :func:`translate`),
  rows that are read by index and by name (``dict(row)``), ``cursor.lastrowid`` after an INSERT into ``messages``
  (its translation gets ``RETURNING id``).  Txn's SQL is written to run on both (``ON CONFLICT ... DO NOTHING`` /
  ``DO UPDATE``, ``RETURNING``); the few fragments that cannot be (JSON, integer division) are
  :data:`gateway.chamber.dialects.POSTGRESQL`'s.
- **Transactions.** The connection is in autocommit mode and the engine says BEGIN, SAVEPOINT, COMMIT itself, as
  on SQLite.  A write transaction begins with ``pg_advisory_xact_lock`` on the chamber's key: one writer at a time
  per chamber, exactly SQLite's BEGIN IMMEDIATE, so every guarantee (holds, quotas, idempotency keys, the audit
  chain) holds unchanged whatever the isolation level.  Finer locks (a lease per HIS endpoint, row locks) are for
  when several instances share the chamber (docs/chamber.md).
- **The schema.** The same versions and files as SQLite (:mod:`gateway.chamber.upgrades`): each file runs with
  its column types translated (:func:`portable_ddl`), except the few SQLite-only ones, which have a file of the
  same name in ``schema/postgresql/``.
- **Durability.** COMMIT returns once PostgreSQL has flushed its WAL (``synchronous_commit = on``, set on every
  connection: a site's weaker default is not taken): acknowledged only after COMMIT, as on SQLite.
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path
from typing import Any, Callable, Iterable

import structlog

from gateway.chamber.errors import ChamberClaimed, ChamberError
from gateway.chamber.watch import CommitWatch

log = structlog.get_logger("gateway.chamber.postgresql")

SCHEMA_DIR = Path(__file__).with_name("schema")
OVERRIDES = SCHEMA_DIR / "postgresql"

#: tables whose ``id`` PostgreSQL assigns (SQLite's INTEGER PRIMARY KEY): an INSERT into one returns it
_IDENTITY_TABLES = ("messages",)
_INSERT_INTO = re.compile(r"^\s*INSERT\s+INTO\s+(\w+)", re.IGNORECASE)

#: database collations whose order is SQLite's (bytewise): ids, control ids and cursors sort alike on both
_BYTEWISE_COLLATIONS = {"C", "POSIX", "C.UTF-8", "C.utf8"}


def _import_psycopg():
    try:
        import psycopg
    except ImportError as e:  # the optional extra is missing
        raise ChamberError("chamber.backend is postgresql, but psycopg is not installed: pip install "
                           "'gatewayd[postgresql]'") from e
    return psycopg


@functools.lru_cache(maxsize=2048)
def translate(sql: str) -> tuple[str, bool]:
    """A statement as Txn and Reader write it (``?`` placeholders) in psycopg's form (``%s``; a literal ``%``
    doubled), and whether it returns the new row's id (an INSERT into a table PostgreSQL numbers)."""
    out = sql.replace("%", "%%").replace("?", "%s")
    m = _INSERT_INTO.match(out)
    returning = bool(m and m.group(1).lower() in _IDENTITY_TABLES and "RETURNING" not in out.upper())
    if returning:
        out += " RETURNING id"
    return out, returning


def _row_class(names: tuple[str, ...]):
    index = {n: i for i, n in enumerate(names)}

    class Row(tuple):
        """A row read by index (``row[0]``) and by name (``row['id']``, ``dict(row)``), like sqlite3.Row."""

        __slots__ = ()

        def keys(self):
            return names

        def __getitem__(self, key):
            if isinstance(key, str):
                return tuple.__getitem__(self, index[key])
            return tuple.__getitem__(self, key)

    return Row


@functools.lru_cache(maxsize=512)
def _rows_of(names: tuple[str, ...]):
    return _row_class(names)


# PostgreSQL's text cannot hold NUL, which SQLite's can (a header or a query parameter may carry one, and is
# then looked up or kept as it came). Text parameters are written with NUL as \x01\x01 and \x01 itself as
# \x01\x02 (so no two texts become one, and equality is kept), and read back the other way.
_ESCAPED = re.compile("\x01[\x01\x02]")


def _escape(text: str) -> str:
    return text.replace("\x01", "\x01\x02").replace("\x00", "\x01\x01")


def _unescape(text: str) -> str:
    return _ESCAPED.sub(lambda m: "\x00" if m.group(0) == "\x01\x01" else "\x01", text)


def _params(params: Iterable) -> tuple:
    params = tuple(params)
    if any(type(p) is str and ("\x00" in p or "\x01" in p) for p in params):
        return tuple(_escape(p) if type(p) is str else p for p in params)
    return params


def row_factory(cursor):
    """psycopg row factory: rows like sqlite3.Row (their text as it was written: see _escape)."""
    if cursor.description is None:
        return tuple
    cls = _rows_of(tuple(c.name for c in cursor.description))

    def make(values):
        if any(type(v) is str and "\x01" in v for v in values):
            values = [_unescape(v) if type(v) is str else v for v in values]
        return cls(values)

    return make


class PgConnection:
    """One PostgreSQL connection that Txn and Reader use as they use a ``sqlite3.Connection``."""

    from gateway.chamber import dialects as _dialects

    dialect = _dialects.POSTGRESQL

    def __init__(self, connect: Callable[[], Any], *, reads_only: bool = False):
        self._connect = connect
        self.raw = connect()
        #: a read connection (autocommit, read-only): a statement that finds the connection dropped (PostgreSQL
        #: restarted, a failover) is run again once on a new one — a read, so running it again changes nothing
        self.reads_only = reads_only
        self._trace: Callable[[str], None] | None = None

    def set_trace_callback(self, trace: Callable[[str], None] | None) -> None:
        """As sqlite3's: ``trace(sql)`` for each statement executed (as Txn wrote it), None to stop."""
        self._trace = trace

    def execute(self, sql: str, params: Iterable = ()):
        if self._trace is not None:
            self._trace(sql)
        text, returning = translate(sql)
        params = _params(params)
        try:
            cur = self.raw.execute(text, params)
        except _import_psycopg().OperationalError:
            if not (self.reads_only and self.raw.broken):
                raise
            self.reconnect_if_broken()
            cur = self.raw.execute(text, params)
        if returning:
            row = cur.fetchone()
            cur.lastrowid = row[0] if row is not None else None
        return cur

    def executemany(self, sql: str, seq: Iterable):
        if self._trace is not None:
            self._trace(sql)
        text, _ = translate(sql)
        cur = self.raw.cursor()
        cur.executemany(text, [_params(p) for p in seq])
        return cur

    def script(self, text: str) -> None:
        """Run a schema script (several statements, no parameters) as it is."""
        self.raw.execute(text)

    @property
    def in_transaction(self) -> bool:
        psycopg = _import_psycopg()
        return self.raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE

    def reconnect_if_broken(self) -> None:
        """Outside a transaction: a connection PostgreSQL dropped (a restart, a failover) is made again."""
        if self.raw.closed or self.raw.broken:
            try:
                self.raw.close()
            except Exception:  # noqa: BLE001 - it is gone either way
                pass
            self.raw = self._connect()
            log.warning("chamber.reconnected")

    def close(self) -> None:
        self.raw.close()


def _cursor_class():
    psycopg = _import_psycopg()

    class Cursor(psycopg.Cursor):
        lastrowid = None

    return Cursor


class PostgresBackend:
    """How the chamber reaches PostgreSQL: ``dsn`` (a libpq connection string, without the password),
    ``password`` (from a file or the environment; never logged), TLS (``sslmode``, ``sslrootcert``).  The
    chamber keeps two connections: its transactions' (the group commit's) and its reads'."""

    kind = "postgresql"
    caches_schedules = False  # another instance may change a schedule: no cache of them (see Txn.upsert_schedule)

    def __init__(self, dsn: str, *, password: str | None = None, sslmode: str | None = None,
                 sslrootcert: str | None = None, connect_timeout: float = 5.0):
        self.psycopg = _import_psycopg()
        self.Error = self.psycopg.Error
        self._dsn = dsn
        self._params: dict[str, Any] = {"connect_timeout": max(1, int(connect_timeout)),
                                        "application_name": "gatewayd"}
        if password is not None:
            self._params["password"] = password
        if sslmode is not None:
            self._params["sslmode"] = sslmode
        if sslrootcert is not None:
            self._params["sslrootcert"] = sslrootcert
        info = self.psycopg.conninfo.conninfo_to_dict(dsn)
        self.target = "postgresql://{}:{}/{}".format(info.get("host", "localhost"), info.get("port", 5432),
                                                    info.get("dbname", info.get("user", "")))
        if "options" in info:  # a schema of its own (search_path): part of which chamber this is
            self.target += f"?options={info['options']}"
        self._lock_key: int | None = None

    # -- connections --------------------------------------------------------------------------------------------
    def _raw(self):
        conn = self.psycopg.connect(self._dsn, autocommit=True, row_factory=row_factory,
                                    cursor_factory=_cursor_class(), **self._params)
        conn.execute("SET synchronous_commit = on")
        conn.execute("SET lock_timeout = '5s'")  # the write lock of another instance: waited for, not for ever
        return conn

    def connect(self) -> PgConnection:
        try:
            return PgConnection(self._raw)
        except self.psycopg.Error as e:
            raise ChamberError(f"cannot connect to the chamber's PostgreSQL {self.target}: {_without_secrets(e)}") from e

    def connect_reader(self) -> PgConnection:
        def read_only():
            raw = self._raw()
            raw.execute("SET default_transaction_read_only = on")
            return raw

        try:
            return PgConnection(read_only, reads_only=True)
        except self.psycopg.Error as e:
            raise ChamberError(f"cannot connect to the chamber's PostgreSQL {self.target}: {_without_secrets(e)}") from e

    # -- what the engine asks ------------------------------------------------------------------------------------
    def prepare(self, conn: PgConnection) -> str:
        """Check the database (its collation) and compute the chamber's lock key; returns a mode to log."""
        row = dict(conn.execute("SELECT *, current_schema() AS current_schema FROM pg_database"
                                " WHERE datname = current_database()").fetchone())
        collation, database, schema = row["datcollate"], row["datname"], row["current_schema"]
        if collation not in _BYTEWISE_COLLATIONS or row.get("datlocprovider", "c") != "c":  # (PostgreSQL 15: ICU)
            raise ChamberError(
                f"the chamber's database {database} sorts text by the collation {collation}; the chamber needs "
                f"C (ids, control ids and page cursors compare bytewise, as on SQLite): create it with "
                f"CREATE DATABASE {database} TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C' ENCODING 'UTF8'")
        digest = hashlib.sha256(f"gatewayd chamber {database}.{schema}".encode()).digest()
        self._lock_key = int.from_bytes(digest[:8], "big", signed=True)
        return "postgresql"

    def opened_error(self, e: Exception) -> ChamberError:
        return ChamberError(f"cannot open the chamber {self.target}: {_without_secrets(e)}")

    def check_integrity(self, conn: PgConnection) -> None:
        """PostgreSQL checks its own pages (data checksums, if the cluster has them): nothing to do here."""

    def ensure_schema(self, conn: PgConnection, clock: Callable[[], float]) -> None:
        from gateway.chamber import upgrades

        upgrades.ensure_schema_postgresql(self, conn, clock)

    def begin(self, conn: PgConnection) -> None:
        """BEGIN a write transaction: the chamber's write lock first (SQLite's BEGIN IMMEDIATE), and the
        notification its COMMIT sends to the other processes on the chamber (:class:`NotifyWatch`; none if it
        rolls back).  A connection found dropped at BEGIN (PostgreSQL restarted, a failover) is made again and
        BEGIN said again: nothing had been done on it yet."""
        conn.reconnect_if_broken()
        try:
            conn.execute("BEGIN")
        except self.psycopg.OperationalError:
            if not conn.raw.broken:
                raise
            conn.reconnect_if_broken()
            conn.execute("BEGIN")
        try:
            conn.execute("SELECT pg_advisory_xact_lock(?)", (self._lock_key,))
            conn.execute(f"NOTIFY {self.channel}, '{conn.raw.info.backend_pid}'")
        except self.psycopg.Error:
            if not conn.raw.broken:
                conn.execute("ROLLBACK")
            raise

    @property
    def channel(self) -> str:
        """The chamber's notification channel (one per database and schema, like its lock)."""
        return f"gatewayd_chamber_{self._lock_key & 0xFFFFFFFFFFFF:x}"

    def claim(self, roles: Iterable[str], holder: str) -> "DatabaseClaim":
        """This process's claim of the gate ``roles`` on the chamber (:class:`DatabaseClaim`, not yet taken)."""
        return DatabaseClaim(self, roles, holder)

    def watch(self, writer: Callable[[], "PgConnection | None"], busy: Callable[[], bool],
              on_commit: Callable[[], None]) -> "NotifyWatch":
        return NotifyWatch(self, writer, busy, on_commit)

    def writable(self, conn: PgConnection) -> tuple[bool, str]:
        """Can the chamber be written now?  Reachable (a dropped connection is made again) and a primary, not a
        standby in recovery (after a failover the gateway must be pointed at the new primary)."""
        conn.reconnect_if_broken()
        if conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
            return False, "the database is a standby (read-only, in recovery)"
        return True, "ok"

    def data_version(self, conn: PgConnection) -> None:
        return None

    def backup(self, *_args) -> dict[str, int]:
        raise ChamberError("the chamber is on PostgreSQL: back it up with PostgreSQL's own tools (pg_dump, or "
                           "pg_basebackup with WAL archiving for a point in time), not gatewayd backup")

    def schema_script(self, path: Path) -> str:
        """A schema file as PostgreSQL runs it: its file in schema/postgresql/, if it has one, else the portable
        file with its column types translated."""
        override = OVERRIDES / path.name
        if override.exists():
            return override.read_text(encoding="utf-8")
        return portable_ddl(path.read_text(encoding="utf-8"))


_TYPES = [(re.compile(r"\bINTEGER\b"), "BIGINT"), (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
          (re.compile(r"\bBLOB\b"), "BYTEA"), (re.compile(r"\)\s*WITHOUT\s+ROWID"), ")")]


def portable_ddl(script: str) -> str:
    """A schema script written for SQLite in portable SQL, for PostgreSQL: comments dropped, SQLite's storage
    classes as PostgreSQL's types (INTEGER -> BIGINT: SQLite's integers are 64-bit; REAL -> DOUBLE PRECISION;
    BLOB -> BYTEA), ``WITHOUT ROWID`` dropped."""
    text = "\n".join(line.split("--", 1)[0] if "'" not in line.split("--", 1)[0] else line
                     for line in script.splitlines())
    for pattern, replacement in _TYPES:
        text = pattern.sub(replacement, text)
    return text


def _without_secrets(error: Exception) -> str:
    """A connection error's text without a password libpq may quote from the connection string."""
    return re.sub(r"password=\S+", "password=***", str(error)).strip()


class NotifyWatch(CommitWatch):
    """Another process's commits to a chamber on PostgreSQL (the split lock's other gate), as
    :class:`~gateway.chamber.watch.CommitWatch` sees them on SQLite (whose looks, every ``interval`` and after
    each of this process's own commits, it shares): every write transaction NOTIFYs the chamber's channel with
    its connection's backend pid (delivered at COMMIT only); this watch LISTENs on a connection of its own and
    reads what arrived without blocking (libpq's consume_input).  A notification from this process's own
    writer connection is not another's."""

    def __init__(self, backend: PostgresBackend, writer: Callable[[], "PgConnection | None"],
                 busy: Callable[[], bool], on_commit: Callable[[], None]):
        super().__init__(backend.target, lambda: None, busy, on_commit)
        self._backend = backend
        self._writer = writer
        self._conn: PgConnection | None = None

    def _listen(self) -> PgConnection:
        conn = self._backend.connect()
        conn.execute(f"LISTEN {self._backend.channel}")
        return conn

    def _watch_wal(self, clock) -> Callable[[], None]:
        """(Instead of SQLite's WAL file: the listening connection; returns what closes it.)"""
        self._conn = self._listen()

        def stop() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        return stop

    def other_commits(self) -> bool:
        """Has another process committed since the watch last looked?  (A dropped listening connection is made
        again — at this look, or a later one if PostgreSQL is not back yet — and counts as a commit seen: what
        happened meanwhile is unknown.)"""
        if not self.watching:
            return False
        if self._conn is None:
            return self._listen_again()
        pgconn = self._conn.raw.pgconn
        psycopg = self._backend.psycopg
        try:
            pgconn.consume_input()
            if pgconn.status != psycopg.pq.ConnStatus.OK:  # (the server said goodbye: its last words were read)
                raise psycopg.OperationalError("the listening connection was closed")
        except psycopg.OperationalError:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - it is gone either way
                pass
            self._conn = None
            return self._listen_again()
        writer = self._writer()
        own = str(writer.raw.info.backend_pid).encode() if writer is not None else None
        other = False
        while (note := pgconn.notifies()) is not None:
            if note.extra != own:
                other = True
        return other

    def _listen_again(self) -> bool:
        try:
            self._conn = self._listen()
        except ChamberError as e:
            log.warning("chamber.watch.reconnect_failed", error=str(e))
            return False
        return True


class DatabaseClaim:
    """The claims of one process on a chamber in PostgreSQL: each gate role at most once per chamber, as the claim
    files (gateway/ops/claim.py) make it on one host — but across hosts, since every gateway that reaches the
    database reaches its claims.  A claim is a session-level advisory lock (the chamber's key, the role) held by a
    connection of its own for the process's life; PostgreSQL releases it when that connection ends, however the
    process ends.  The connection's application_name says who holds it, so a refused process can name the holder.

    If PostgreSQL drops the connection (a restart, a failover), the claim is gone with it: :meth:`keep` (every
    few seconds) takes it again on a new connection — or, when another process took it meanwhile, says so, and
    this process must stop (two gateways' decisions would contradict each other: issue 24)."""

    ROLE_IDS = {"outer": 1, "inner": 2}

    def __init__(self, backend: PostgresBackend, roles: Iterable[str], holder: str):
        self._backend = backend
        self.roles = tuple(roles)
        self._holder = holder
        self._conn: PgConnection | None = None
        self._key: int | None = None

    def take(self) -> None:
        """Claim every role, or none: raises ChamberClaimed naming the holder, ChamberError when the database
        cannot be reached."""
        backend = self._backend
        conn = backend.connect()
        try:
            conn.execute("SELECT set_config('application_name', ?, false)", (self._holder[:63],))
            if self._key is None:
                row = conn.execute("SELECT current_database(), current_schema()").fetchone()
                digest = hashlib.sha256(f"gatewayd chamber {row[0]}.{row[1]}".encode()).digest()
                self._key = int.from_bytes(digest[:4], "big", signed=True)
            for role in self.roles:
                if not conn.execute("SELECT pg_try_advisory_lock(?, ?)", (self._key, self.ROLE_IDS[role])).fetchone()[0]:
                    raise ChamberClaimed(role, backend.target, self._holder_of(conn, role))
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _holder_of(self, conn: PgConnection, role: str) -> str:
        row = conn.execute(
            "SELECT a.application_name, host(a.client_addr), a.backend_start FROM pg_locks l JOIN pg_stat_activity a"
            " ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted AND l.classid::bigint = ? AND l.objid::bigint = ?"
            " AND l.objsubid = 2", (self._key & 0xFFFFFFFF, self.ROLE_IDS[role])).fetchone()
        if row is None:
            return "another process (gone since)"
        return f"{row[0] or 'a process'} (connected from {row[1] or 'this host'} since {row[2]:%Y-%m-%d %H:%M:%S %Z})"

    def keep(self) -> str | None:
        """Still held?  None when it is (taken again on a new connection if PostgreSQL dropped the old one, or
        when the database cannot be reached now: tried again at the next look); else why this process must
        stop."""
        if self._conn is not None:
            try:
                self._conn.execute("SELECT 1")
                return None
            except self._backend.psycopg.Error:
                self.release()
        try:
            self.take()
        except ChamberClaimed as e:
            return str(e)
        except ChamberError as e:
            log.warning("gateway.claim_unconfirmed", error=str(e))
        return None

    def release(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - closing a dropped connection
                pass
            self._conn = None
