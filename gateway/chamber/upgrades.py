"""The chamber's schema, versioned: ``schema/chamber-v1.sql`` and one ``upgrade-v<N>-v<N+1>.sql`` per later
version. A new chamber runs them all, an older one the upgrades it lacks — each case in one transaction, so a
crash leaves the file at the old version or the new one, never between. The version this code needs is
``SCHEMA_VERSION`` (1 + the number of upgrade files); a chamber newer than that is refused, not touched.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Callable, Iterable

import structlog

from gateway.chamber.errors import ChamberError

log = structlog.get_logger("gateway.chamber.upgrades")

SCHEMA_DIR = Path(__file__).with_name("schema")


def upgrade_scripts() -> list[Path]:
    """The upgrade scripts, in order; they must form an unbroken chain v1 -> v2 -> ... ."""
    files = sorted(SCHEMA_DIR.glob("upgrade-v*-v*.sql"), key=lambda p: int(p.stem.split("-v")[1]))
    for n, path in enumerate(files, start=1):
        if path.name != f"upgrade-v{n}-v{n + 1}.sql":
            raise RuntimeError(f"schema upgrades are not a chain: expected upgrade-v{n}-v{n + 1}.sql, "
                               f"found {path.name}")
    return files


SCHEMA_VERSION = 1 + len(upgrade_scripts())


def _statements(script: str) -> Iterable[str]:
    """A schema script's statements, one by one (triggers' bodies included), so they can run inside a
    transaction this module controls (``executescript`` would COMMIT first)."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            if pending.strip():
                yield pending
            pending = ""
    if pending.strip() and not all(l.strip().startswith("--") or not l.strip() for l in pending.splitlines()):
        raise RuntimeError(f"a schema script ends in an incomplete statement: {pending.strip()[:80]}")


def _version(conn: sqlite3.Connection) -> int | None:
    """The chamber's schema version; None for a file without a schema yet (a new chamber)."""
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'chamber_meta'").fetchone():
        return None
    row = conn.execute("SELECT value FROM chamber_meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else 0


def _refuse(path: str, version: int | None) -> None:
    if version is not None and not 1 <= version <= SCHEMA_VERSION:
        raise ChamberError(
            f"the chamber {path} has schema version {version}; this gatewayd needs {SCHEMA_VERSION}"
            + (" (it was written by a newer gatewayd: run that one, or restore a backup made for this "
               "version)" if version > SCHEMA_VERSION else "")
        )


def ensure_schema(conn: sqlite3.Connection, path: str, clock: Callable[[], float]) -> None:
    """Create a new chamber's schema, or upgrade an older one, in one transaction, on the chamber at
    ``path`` open as ``conn``; ``clock()`` is recorded as the time it was created or upgraded. The version
    is read again under the write lock: the split lock starts two processes on one file, and the other one
    may have created or upgraded the schema while this one waited (CI once failed on exactly that)."""
    version = _version(conn)
    if version == SCHEMA_VERSION:
        return
    _refuse(path, version)
    conn.execute("PRAGMA foreign_keys = OFF")  # an upgrade may rebuild a table others point at
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = _version(conn)
        if version != SCHEMA_VERSION:
            _refuse(path, version)
            scripts = (([SCHEMA_DIR / "chamber-v1.sql"] if version is None else [])
                       + upgrade_scripts()[(version or 1) - 1:])
            for script in scripts:
                for statement in _statements(script.read_text(encoding="utf-8")):
                    conn.execute(statement)
            if version is None:
                conn.executemany("INSERT INTO chamber_meta (key, value) VALUES (?, ?)",
                                 [("schema_version", str(SCHEMA_VERSION)), ("created", str(clock()))])
            else:
                conn.execute("UPDATE chamber_meta SET value = ? WHERE key = 'schema_version'",
                             (str(SCHEMA_VERSION),))
                conn.execute("INSERT OR REPLACE INTO chamber_meta (key, value) VALUES ('upgraded', ?)",
                             (str(clock()),))
            broken = conn.execute("PRAGMA foreign_key_check").fetchone()
            if broken is not None:
                raise ChamberError(f"the schema upgrade of {path} would break a reference from table "
                                   f"{broken[0]} to {broken[2]}; nothing was changed")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    finally:
        conn.execute("PRAGMA foreign_keys = ON")
    if version is None and conn.execute("PRAGMA freelist_count").fetchone()[0]:
        _compact_new(conn, path)
    if version not in (None, SCHEMA_VERSION):
        log.warning("chamber.upgraded", path=path, from_version=version, to_version=SCHEMA_VERSION)


def _compact_new(conn: sqlite3.Connection, path: str) -> None:
    """A new chamber starts without the free pages of tables an upgrade script rebuilt (VACUUM). Only
    tidiness: if the other gate of a split lock holds the write lock past the busy timeout, it is left."""
    try:
        conn.execute("VACUUM")
    except sqlite3.OperationalError as e:
        log.info("chamber.vacuum_skipped", path=path, reason=str(e))


def ensure_schema_postgresql(backend, conn, clock: Callable[[], float]) -> None:
    """:func:`ensure_schema` on PostgreSQL (:mod:`gateway.chamber.postgresql`): the same versions and files (each
    as ``backend.schema_script`` gives it), in one transaction under the chamber's write lock, so two instances
    starting at once create or upgrade it once."""
    version = _version_postgresql(conn)
    if version == SCHEMA_VERSION:
        return
    _refuse(backend.target, version)
    backend.begin(conn)
    try:
        version = _version_postgresql(conn)
        if version != SCHEMA_VERSION:
            _refuse(backend.target, version)
            scripts = (([SCHEMA_DIR / "chamber-v1.sql"] if version is None else [])
                       + upgrade_scripts()[(version or 1) - 1:])
            for script in scripts:
                conn.script(backend.schema_script(script))
            if version is None:
                conn.executemany("INSERT INTO chamber_meta (key, value) VALUES (?, ?)",
                                 [("schema_version", str(SCHEMA_VERSION)), ("created", str(clock()))])
            else:
                conn.execute("UPDATE chamber_meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
                conn.execute("INSERT INTO chamber_meta (key, value) VALUES ('upgraded', ?)"
                             " ON CONFLICT (key) DO UPDATE SET value = excluded.value", (str(clock()),))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    if version not in (None, SCHEMA_VERSION):
        log.warning("chamber.upgraded", path=backend.target, from_version=version, to_version=SCHEMA_VERSION)


def _version_postgresql(conn) -> int | None:
    """The chamber's schema version in the connection's schema (search_path); None: no chamber there yet."""
    if conn.execute("SELECT to_regclass('chamber_meta')").fetchone()[0] is None:
        return None
    row = conn.execute("SELECT value FROM chamber_meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else 0
