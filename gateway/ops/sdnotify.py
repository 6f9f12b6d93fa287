"""systemd readiness and watchdog (``Type=notify``, ``WatchdogSec=``), without a dependency on libsystemd.

systemd passes ``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace) and, with a watchdog,
``WATCHDOG_USEC``.  We send ``READY=1`` once both gates listen and the chamber is open, ``WATCHDOG=1`` at
half the watchdog interval while the reactor turns (a hung reactor stops the pings and systemd restarts
us), ``STATUS=...`` lines for `systemctl status`, and ``STOPPING=1`` at shutdown.  Outside systemd every
call is a no-op.
"""

from __future__ import annotations

import os
import socket

import structlog
from twisted.internet import task

log = structlog.get_logger("gateway.ops.sdnotify")


def notify(state: str, environ=os.environ) -> bool:
    """Send one notification; False when not under systemd (or the socket is gone)."""
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode("utf-8"), address)
        return True
    except OSError as e:
        log.warning("sdnotify.failed", error=str(e))
        return False


def watchdog_interval(environ=os.environ) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None without a watchdog."""
    usec = environ.get("WATCHDOG_USEC")
    pid = environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None


def start_watchdog(clock, environ=os.environ) -> task.LoopingCall | None:
    interval = watchdog_interval(environ)
    if interval is None:
        return None
    loop = task.LoopingCall(notify, "WATCHDOG=1", environ)
    loop.clock = clock
    loop.start(interval, now=True)
    return loop
