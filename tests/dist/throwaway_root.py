"""A throwaway Debian root for install tests: this machine's root file system as the lower layer of an overlay
whose upper layer is a tmpfs, in a mount namespace of its own and a network namespace with nothing but
loopback (the network is cut). What the tests install, change and remove lands in the tmpfs and disappears
with the namespace; the machine's root is never written. The host's Python is deleted in the overlay (a
whiteout in the upper layer) so that what is installed cannot lean on it.

Commands run inside with ``nsenter`` + ``chroot``; a process holds the namespaces until ``close()``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

SETUP = r"""
set -e
mount -t tmpfs -o size=3g,mode=0755 tmpfs "$BASE"
mkdir "$BASE/upper" "$BASE/work" "$BASE/root"
mount -t overlay overlay -o lowerdir=/,upperdir="$BASE/upper",workdir="$BASE/work" "$BASE/root"
R="$BASE/root"
mount -t proc proc "$R/proc"
mount --rbind /dev "$R/dev"
mount -t tmpfs tmpfs "$R/tmp"
mount -t tmpfs tmpfs "$R/run"
# No Python but the package's: the host's interpreters and the work trees (with their venvs) are gone in here.
rm -rf "$R"/root/.pyenv "$R"/usr/lib/python3* "$R"/usr/local/lib/python3* "$R"/work "$R"/opt/gatewayd
rm -f "$R"/usr/bin/python3* "$R"/usr/local/bin/python3*
ip link set lo up
echo ready
exec sleep 7200
"""


class ThrowawayRoot:
    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="gatewayd-root-"))
        self.root = self.base / "root"
        self.upper = self.base / "upper"
        self.holder = subprocess.Popen(["unshare", "--mount", "--net", "--propagation", "private", "sh", "-c", SETUP],
                                       env={**os.environ, "BASE": str(self.base)}, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
        line = self.holder.stdout.readline()
        if line.strip() != "ready":
            self.holder.kill()
            raise RuntimeError(f"cannot make the throwaway root: {self.holder.stderr.read()}")

    def _enter(self) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-m", "-n", "chroot", str(self.root)]

    def sh(self, script: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run ``script`` with /bin/sh inside, as root; stdout and stderr are returned (and named on failure)."""
        done = subprocess.run(self._enter() + ["/bin/sh", "-c", script], capture_output=True, text=True,
                              timeout=timeout, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8",
                                                    "HOME": "/root"})
        if check:
            assert done.returncode == 0, f"{script}\nexit {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done

    def spawn(self, args: list[str], log: str | None = None) -> subprocess.Popen:
        """Start ``args`` inside (in the background); its output goes to ``log`` inside, or without one to the
        returned process's ``stdout`` (text)."""
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root"}
        if log is None:
            return subprocess.Popen(self._enter() + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
        return subprocess.Popen(self._enter() + ["/bin/sh", "-c", 'exec "$@" >>' + log + " 2>&1", "sh", *args],
                                env=env)

    def put(self, source: Path, inside: str) -> None:
        """Copy a file of this machine to ``inside`` (a path in the throwaway root)."""
        subprocess.run(["nsenter", "-t", str(self.holder.pid), "-m", "cp", str(source),
                        str(self.root / inside.lstrip("/"))], check=True)

    def files(self) -> set[str]:
        """Everything the upper layer holds (what was written or deleted in the throwaway root)."""
        out = subprocess.run(["nsenter", "-t", str(self.holder.pid), "-m", "find", str(self.upper), "-mindepth", "1"],
                             capture_output=True, text=True, check=True).stdout
        return {line[len(str(self.upper)):] for line in out.splitlines()}

    def close(self) -> None:
        self.holder.send_signal(signal.SIGKILL)
        self.holder.wait(10)
        time.sleep(0.1)  # the namespace's mounts go with its last process
        shutil.rmtree(self.base, ignore_errors=True)
