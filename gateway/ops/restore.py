"""``gatewayd restore FILE --config PATH``: put a backup (``gatewayd backup``) back as the config's chamber.

What it does, in order, and prints (:func:`restore`):

1. **Claims the chamber** — both gates' claims (gateway/ops/claim.py), as ``gatewayd run`` would: while any
   gate runs on the chamber it is refused, naming the process; and while it restores, a gateway that starts is
   refused in its turn (the claim is the only race-free test, so it is taken, not only looked at).
2. **Copies FILE beside the chamber** (``<chamber>.restoring``, flushed to disk; with the replaced chamber's
   owner, group and mode — else the directory's owner, mode 0660 less the umask — as restore often runs as root
   for a gateway that runs as its own user) and
   checks that copy — what will be put in place, not the file it came from: SQLite's ``integrity_check`` and
   ``foreign_key_check``, the schema version (a chamber newer than this gatewayd is refused; an older one is
   upgraded by the next start, as any chamber), and the chamber's own checks: the audit trail's hash chain
   (gateway/domain/audit.py) and the row counts.  Anything wrong: the copy is removed and nothing is touched.
3. **Keeps the replaced chamber aside**: the chamber and its ``-wal``/``-shm`` files (a gateway killed without
   a checkpoint leaves committed rows in ``-wal``) are renamed together to ``<chamber>.replaced-<UTC time>``
   (and ``-wal``/``-shm``), never deleted.
4. Renames the checked copy into place and flushes the directory.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path

from gateway.chamber.reader import Reader
from gateway.chamber.upgrades import SCHEMA_VERSION
from gateway.domain.audit import verify
from gateway.ops.claim import Claim, ClaimError, Holder, claim_file

#: the SQLite files that are one chamber
SIDECARS = ("", "-wal", "-shm")


class RestoreError(Exception):
    """The restore was refused: nothing was changed."""


def check_copy(path: Path, now: float) -> list[str]:
    """Check a chamber file as ``restore`` puts it in place; the lines saying what was found, or
    :class:`RestoreError` naming what is wrong."""
    with open(path, "rb") as f:
        if f.read(16) != b"SQLite format 3\x00":
            raise RestoreError(f"{path} is not an SQLite database (not a chamber backup)")
    try:
        conn = sqlite3.connect(path)
    except sqlite3.Error as e:
        raise RestoreError(f"cannot open it: {e}") from None
    conn.row_factory = sqlite3.Row
    try:
        problems = [r[0] for r in conn.execute("PRAGMA integrity_check(5)")]
        if problems != ["ok"]:
            raise RestoreError(f"SQLite's integrity_check failed: {'; '.join(problems)}")
        broken = conn.execute("PRAGMA foreign_key_check").fetchall()
        if broken:
            raise RestoreError(f"SQLite's foreign_key_check failed: {len(broken)} row(s) point at nothing "
                               f"(first: table {broken[0][0]}, rowid {broken[0][1]})")
        try:
            row = conn.execute("SELECT value FROM chamber_meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.Error:
            row = None
        if row is None:
            raise RestoreError("it has no schema version (chamber_meta): it is not a chamber")
        version = int(row[0])
        if not 1 <= version <= SCHEMA_VERSION:
            raise RestoreError(f"its schema version is {version}; this gatewayd knows 1 to {SCHEMA_VERSION} "
                               f"(restore it with the gatewayd that wrote it)")
        reader = Reader(conn, now)
        verdict = verify(reader)
        if not verdict.ok:
            raise RestoreError(f"its audit chain is broken at record {verdict.broken_at}: {verdict.reason}")
        counts = reader.counts()
    except sqlite3.Error as e:
        raise RestoreError(f"cannot be read as a chamber: {e}") from None
    finally:
        conn.close()
    upgrade = "" if version == SCHEMA_VERSION else f" (older: the next start upgrades it to {SCHEMA_VERSION})"
    return ["integrity_check ok, foreign_key_check ok",
            f"schema version {version}{upgrade}",
            f"audit chain ok: {verdict.checked} record(s) after the anchor (record {verdict.anchor_seq}), head "
            f"record {verdict.head_seq}",
            "rows: " + ", ".join(f"{n} {t}" for t, n in counts.items())]


def _own(target, owner: os.stat_result) -> None:
    """Give ``target`` (a path or descriptor) ``owner``'s user and group, when this process may (root)."""
    if os.geteuid() == 0 and (owner.st_uid, owner.st_gid) != (0, 0):
        os.chown(target, owner.st_uid, owner.st_gid)


def restore(source: Path, chamber: Path, config_path: Path, *, now: float | None = None) -> list[str]:
    """Put ``source`` in place of ``chamber`` (see the module's text); the lines saying what was done.  Raises
    :class:`RestoreError` (nothing changed) or :class:`gateway.ops.claim.ClaimHeld` (a gate runs on it)."""
    now = time.time() if now is None else now
    source, chamber = Path(source).resolve(), Path(os.path.realpath(chamber))
    if not source.is_file():
        raise RestoreError(f"{source} is not a file")
    if source == chamber:
        raise RestoreError("the backup is the chamber itself")
    if not chamber.parent.is_dir():
        raise RestoreError(f"the chamber's directory {chamber.parent} does not exist")
    # the gateway's user owns the chamber (and its directory); restore is often run as root: what it creates
    # (the copy put in place, a claim file that was not there) gets the replaced chamber's owner and mode, else
    # the directory's owner, or the gateway could not open its own chamber
    owner = os.stat(chamber if chamber.exists() else chamber.parent)
    fresh = [r for r in ("outer", "inner") if not claim_file(chamber, r).exists()]
    claim = Claim(chamber, "both", Holder.this_process("restore", config_path))
    claim.take()  # ClaimHeld names the running gateway; ClaimError: the claim files cannot be used
    try:
        for role in fresh:
            _own(claim_file(chamber, role), owner)
        staged = chamber.with_name(chamber.name + ".restoring")
        for suffix in SIDECARS:
            Path(f"{staged}{suffix}").unlink(missing_ok=True)
        done = [f"claimed the chamber {chamber} (no gate runs on it; none can start until this ends)"]
        try:
            fd = os.open(staged, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o660)
            with open(source, "rb") as src, os.fdopen(fd, "wb") as dst:
                _own(dst.fileno(), owner)
                if chamber.exists():
                    os.fchmod(dst.fileno(), owner.st_mode & 0o7777)
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
            done += [f"checked {source}:"] + [f"  {line}" for line in check_copy(staged, now)]
        except BaseException as e:
            for suffix in SIDECARS:
                Path(f"{staged}{suffix}").unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise RestoreError(f"cannot copy {source} beside the chamber: {e}") from None
            raise
        present = [s for s in SIDECARS if Path(f"{chamber}{s}").exists()]
        if present:
            stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            aside = chamber.with_name(f"{chamber.name}.replaced-{stamp}")
            for suffix in present:
                os.replace(f"{chamber}{suffix}", f"{aside}{suffix}")
            done.append(f"kept the replaced chamber aside: {aside}"
                        + (f" (with its {', '.join(s for s in present if s)})" if len(present) > 1 else ""))
        else:
            done.append("there was no chamber to replace")
        os.replace(staged, chamber)
        dir_fd = os.open(chamber.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        done.append(f"restored {source} as the chamber {chamber}: start the gateway")
        return done
    finally:
        claim.release()


__all__ = ["RestoreError", "check_copy", "restore", "ClaimError"]
