"""A full disk on demand: a tiny filesystem mounted on a temporary directory, and a filler that fills it.

::

    with small_filesystem(4) as fs:                 # 4 MiB, mounted on a fresh temp dir
        lock.gateway_config["chamber"]["path"] = str(fs / "chamber.sqlite3")
        ...
        filler = fill(fs)                           # writes now fail with ENOSPC
        ...
        filler.unlink()                             # the space is back
    # unmounted (lazily if something still holds a file open) and the directory removed

tmpfs is preferred (``mount -t tmpfs -o size=N``); if that is refused, an ext4 image is made with
``mkfs.ext4`` and loop-mounted. Mounting needs root (CAP_SYS_ADMIN); without it :class:`FaultUnavailable`
is raised and the calling test decides whether to skip. Note that fsync on tmpfs is a no-op: this injects
"no space left", not power loss.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["FaultUnavailable", "fill", "free_bytes", "small_filesystem"]

_MIB = 1024 * 1024


class FaultUnavailable(RuntimeError):
    """This fault cannot be injected here (not root, no tmpfs, no loop devices, ...). Tests may skip."""


def _run(args: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    except FileNotFoundError as e:
        return subprocess.CompletedProcess(args, 127, "", str(e))


def _mount_tmpfs(mnt: Path, size: int) -> str | None:
    r = _run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(mnt)])
    return None if r.returncode == 0 else f"mount -t tmpfs: {(r.stderr or r.stdout).strip()}"


def _mount_ext4(mnt: Path, image: Path, size: int) -> str | None:
    with open(image, "wb") as f:
        f.truncate(size)
    r = _run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)])  # -m 0: no blocks reserved for root
    if r.returncode != 0:
        return f"mkfs.ext4: {(r.stderr or r.stdout).strip()}"
    r = _run(["mount", "-o", "loop", str(image), str(mnt)])
    if r.returncode != 0:
        return f"mount -o loop: {(r.stderr or r.stdout).strip()}"
    os.chmod(mnt, 0o777)
    return None


def _unmount(mnt: Path) -> None:
    if not os.path.ismount(mnt):
        return
    if _run(["umount", str(mnt)]).returncode != 0 and os.path.ismount(mnt):
        # Something still holds a file there (a gateway left running by a failed test): detach now, the
        # kernel frees the filesystem (and the loop device, autoclear) when the last file is closed.
        _run(["umount", "-l", str(mnt)])


@contextmanager
def small_filesystem(size_mb: float, *, kind: str = "auto") -> Iterator[Path]:
    """Mount a filesystem of ``size_mb`` MiB on a fresh temporary directory and yield its Path.

    ``kind``: ``"auto"`` (tmpfs, else loop-mounted ext4), ``"tmpfs"`` or ``"ext4"``. On exit the filesystem
    is unmounted (``umount -l`` if busy) and the directory removed, whatever happened in the block.
    Raises :class:`FaultUnavailable` when no kind can be mounted here.
    """
    if kind not in ("auto", "tmpfs", "ext4"):
        raise ValueError(f"kind must be auto, tmpfs or ext4, not {kind!r}")
    size = int(size_mb * _MIB)
    if size <= 0:
        raise ValueError("size_mb must be positive")
    if os.geteuid() != 0:
        raise FaultUnavailable(f"small_filesystem needs root (mount); running as uid {os.geteuid()}")
    base = Path(tempfile.mkdtemp(prefix="gatewayd-smallfs-"))
    mnt = base / "mnt"
    mnt.mkdir()
    try:
        problems = []
        mounted = False
        if kind in ("auto", "tmpfs"):
            problem = _mount_tmpfs(mnt, size)
            mounted = problem is None
            if problem:
                problems.append(problem)
        if not mounted and kind in ("auto", "ext4"):
            problem = _mount_ext4(mnt, base / "fs.ext4", size)
            mounted = problem is None
            if problem:
                problems.append(problem)
        if not mounted:
            raise FaultUnavailable("cannot mount a small filesystem: " + "; ".join(problems))
        yield mnt
    finally:
        try:
            _unmount(mnt)
        finally:
            if not os.path.ismount(mnt):
                shutil.rmtree(base, ignore_errors=True)


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes available to an unprivileged writer on the filesystem holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: str | os.PathLike, leave_bytes: int = 0) -> Path:
    """Write a filler file until the filesystem is full, leaving about ``leave_bytes`` free.

    ``path`` is a directory on the filesystem to fill (the filler is created there, with a unique hidden
    name) or the filler's own path. With ``leave_bytes=0`` writes continue, in smaller and smaller pieces,
    until ENOSPC, so afterwards every write that needs a new block fails. Returns the filler's Path; delete
    it to give the space back.
    """
    path = Path(path)
    filler = path / f".filler-{uuid.uuid4().hex[:8]}" if path.is_dir() else path
    budget = None if leave_bytes <= 0 else max(0, free_bytes(filler.parent) - leave_bytes)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    written = 0
    try:
        for piece in (_MIB, 64 * 1024, 4096, 512, 1):
            block = b"\xa5" * piece
            while budget is None or written + piece <= budget:
                try:
                    n = os.write(fd, block)
                except OSError as e:
                    if e.errno in (errno.ENOSPC, errno.EDQUOT):
                        break
                    raise
                written += n
                if n < piece:  # a short write: the filesystem is full
                    break
        try:
            os.fsync(fd)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
    finally:
        os.close(fd)
    return filler
