"""The claim: each gate role runs at most once per chamber.

One SQLite chamber serves one gateway, or one split pair (one ``--gate outer`` and one ``--gate inner``
process).  Two processes running the same gate on one chamber both expire holds, both deliver the same queued
messages and both apply the HIS's answers: bookings accepted by the HIS are undone, a platform told 201 loses
its booking (issue 24).  So ``gatewayd run`` claims its role(s) before anything is opened:

    <chamber>.outer.lock   held by the process that runs the outer gate (``--gate outer``, or both gates)
    <chamber>.inner.lock   held by the process that runs the inner gate (``--gate inner``, or both gates)

Each claim is an OS lock (``flock``, exclusive, not waited for) on a file beside the chamber (its real path:
a symlink to the chamber leads to the same claim).  The kernel releases it when its process ends, however it
ends (kill -9 included), so there is no stale PID file to clean up: a new gateway starts at once.  The file
records who holds it (pid, user, host, gate, config, since when) so that a refused process can name the holder;
the record is only read, never trusted for the decision — the lock decides.  The file itself is never
deleted (a process that deleted it could leave two holders, each with a lock on a different file).

Files are created with mode 0660 less the umask (as the chamber's own files): the split lock's units run as
two users sharing the chamber directory's group (deploy/systemd/gatewayd.tmpfiles, ``UMask=0007``).

The operator's tools (``gatewayd status``, ``backup``, ``queue``, ``audit``) never take a claim; they work beside
a running gateway (``status`` reads the claims through :func:`holder`).  SIGHUP (reload) does not touch it: it is
held for the process's life.  The descriptors are close-on-exec: a process the gateway starts holds no claim.
"""

from __future__ import annotations

import errno
import fcntl
import getpass
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

#: the roles a ``gatewayd run --gate`` takes
ROLES = {"both": ("outer", "inner"), "outer": ("outer",), "inner": ("inner",)}

#: the exit code of ``gatewayd run`` refused because another process holds its gate's claim on the chamber
#: (the units' RestartPreventExitStatus: systemd does not start it again and again)
CLAIM_HELD_EXIT = 3

#: the largest holder record read back (a record is ~250 bytes; a file grown by anything else is not read whole)
_RECORD_MAX = 4096


class ClaimError(Exception):
    """The claim cannot be taken (its file cannot be created or written)."""


class ClaimHeld(ClaimError):
    """Another process holds this gate's claim on the chamber."""

    def __init__(self, role: str, chamber: str, path: Path, holder: "Holder | None"):
        self.role, self.chamber, self.path, self.holder = role, chamber, path, holder
        who = holder.describe() if holder is not None else "a process that has not recorded itself yet"
        super().__init__(
            f"the {role} gate of the chamber {chamber} is already run by {who}. One SQLite chamber serves one "
            f"gateway, or one outer and one inner process of the split lock: stop that process first, or give "
            f"this one its own chamber.path (docs/install.md). Claim file: {path}")


@dataclass(frozen=True)
class Holder:
    """Who holds a claim, as recorded in its file."""

    pid: int
    gate: str
    config: str
    since: str  # ISO 8601, UTC: when the claim was taken (the process's start)
    user: str = ""
    host: str = ""

    def describe(self) -> str:
        return (f"pid {self.pid} (gate {self.gate}, config {self.config}, running since {self.since}"
                + (f", user {self.user}" if self.user else "") + (f", host {self.host}" if self.host else "") + ")")

    def encode(self) -> bytes:
        return (json.dumps(asdict(self), ensure_ascii=False) + "\n").encode("utf-8")

    @classmethod
    def decode(cls, data: bytes) -> "Holder | None":
        try:
            raw = json.loads(data.decode("utf-8"))
            return cls(pid=int(raw["pid"]), gate=str(raw["gate"]), config=str(raw["config"]),
                       since=str(raw["since"]), user=str(raw.get("user", "")), host=str(raw.get("host", "")))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    @classmethod
    def this_process(cls, gate: str, config: str | Path, now: float | None = None) -> "Holder":
        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # a uid without a name (containers)
            user = str(os.getuid())
        since = datetime.fromtimestamp(time.time() if now is None else now, timezone.utc)
        return cls(pid=os.getpid(), gate=gate, config=str(Path(config).resolve()),
                   since=since.isoformat(timespec="seconds").replace("+00:00", "Z"), user=user,
                   host=socket.gethostname())


def claim_file(chamber: str | Path, role: str) -> Path:
    """The file beside the chamber (its real path) that ``role``'s claim is a lock on."""
    real = Path(os.path.realpath(chamber))
    return real.with_name(f"{real.name}.{role}.lock")


def _read_holder(fd: int) -> "Holder | None":
    return Holder.decode(os.pread(fd, _RECORD_MAX, 0))


class Claim:
    """The claims of one process on one chamber: :meth:`take` them all or none; held until :meth:`release` or
    the process's end."""

    def __init__(self, chamber: str | Path, gate: str, holder: Holder):
        if gate not in ROLES:
            raise ValueError(f"gate must be one of {tuple(ROLES)}")
        self.chamber, self.gate, self.holder = str(chamber), gate, holder
        self._held: dict[str, int] = {}  # role -> the locked file's descriptor
        #: a chamber in PostgreSQL: the same roles claimed in the database too (across hosts), released with these
        #: (gateway.chamber.postgresql.DatabaseClaim; taken by the caller)
        self.database = None

    @property
    def held(self) -> tuple[str, ...]:
        return tuple(self._held)

    def take(self) -> None:
        """Claim every role of this gate on the chamber, or none: raises :class:`ClaimHeld` (naming the holder)
        when another process holds one, :class:`ClaimError` when a claim file cannot be opened or written."""
        if self.chamber == ":memory:" or self._held:
            return
        try:
            for role in ROLES[self.gate]:
                self._held[role] = self._take(role)
        except BaseException:
            self.release()
            raise

    def _take(self, role: str) -> int:
        path = claim_file(self.chamber, role)
        writable = True
        try:
            path.parent.mkdir(parents=True, exist_ok=True)  # (as the chamber's own open would)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o660)
        except PermissionError:  # another user's file: it can still say who holds it
            writable = False
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise ClaimError(f"cannot open the claim file {path}: {e.strerror}. The gate's user needs to "
                                 f"read and write it, as the chamber itself (docs/install.md)") from e
        except OSError as e:
            raise ClaimError(f"cannot create the claim file {path}: {e.strerror}") from e
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise ClaimError(f"cannot lock the claim file {path}: {e.strerror}") from e
                raise ClaimHeld(role, self.chamber, path, _read_holder(fd)) from None
            if not writable:
                raise ClaimError(f"cannot write the claim file {path} (owner uid {os.fstat(fd).st_uid}, mode "
                                 f"{os.fstat(fd).st_mode & 0o777:o}): the gate's user needs to read and write it, "
                                 f"as the chamber itself (docs/install.md)")
            record = self.holder.encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
        except BaseException:
            os.close(fd)  # (releases the lock, if it was taken)
            raise
        return fd

    def release(self) -> None:
        """Give the claims back (the process's end does the same).  The files stay, with the last record."""
        held, self._held = self._held, {}
        for fd in held.values():
            try:
                os.close(fd)
            except OSError:
                pass
        if self.database is not None:
            self.database.release()


def holder(chamber: str | Path, role: str, locks: str | Path = "/proc/locks") -> "Holder | None":
    """Who holds ``role``'s claim on the chamber now (None: nobody), for ``gatewayd status`` and a tool about to
    start a gateway (the demo), without touching the lock: the kernel's table of locks (``/proc/locks``) says
    whether one is held on the claim file.  Raises :class:`ClaimError` where that table cannot be read.  The
    gateway itself never asks this: it takes its claim (:meth:`Claim.take`), which is the only race-free test."""
    path = claim_file(chamber, role)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None  # never claimed
    except OSError as e:
        raise ClaimError(f"cannot look at the claim file {path}: {e.strerror}") from e
    try:
        with open(locks, encoding="ascii", errors="replace") as f:
            table = f.read()
    except OSError as e:
        raise ClaimError(f"cannot read the kernel's table of locks ({locks}): {e.strerror}") from e
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF" (a waiting lock's line has "->" after the number)
        if "FLOCK" in fields and inode in fields and "->" not in fields:
            pid = fields[fields.index(inode) - 1]
            try:
                with open(path, "rb") as f:
                    recorded = Holder.decode(f.read(_RECORD_MAX))
            except OSError:
                recorded = None
            return recorded or Holder(pid=int(pid) if pid.isdigit() else 0, gate="?", config="?", since="?")
    return None
