"""Small helpers around the processes a fault test starts and kills."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

__all__ = ["kill9", "port_open", "rss_bytes", "wait_for_port", "wait_for_port_closed"]

_PAGE = os.sysconf("SC_PAGE_SIZE")


def kill9(proc, timeout: float = 10.0) -> int | None:
    """SIGKILL a process and reap it; returns its return code (``-9`` when the kill did it).

    ``proc`` is a ``subprocess.Popen`` or anything with a ``.popen`` (the e2e harness's ``Proc``). A process
    that has already exited is only reaped. Raises ``subprocess.TimeoutExpired`` if it is still there after
    ``timeout`` seconds (it should never be: SIGKILL cannot be caught).
    """
    popen: subprocess.Popen = getattr(proc, "popen", proc)
    if popen.poll() is None:
        try:
            popen.send_signal(signal.SIGKILL)
        except ProcessLookupError:
            pass
    return popen.wait(timeout)


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of ``pid`` (default: this process) in bytes, from ``/proc/<pid>/statm``.

    Raises ``ProcessLookupError`` if there is no such process."""
    pid = os.getpid() if pid is None else pid
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * _PAGE
    except FileNotFoundError:
        raise ProcessLookupError(f"no process {pid}") from None


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port`` now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> float:
    """Wait until ``host:port`` accepts connections; returns the seconds waited, ``TimeoutError`` after
    ``timeout``."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        if port_open(port, host, timeout=min(0.5, max(0.05, deadline - time.monotonic()))):
            return time.monotonic() - start
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")
        time.sleep(0.05)


def wait_for_port_closed(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> float:
    """Wait until ``host:port`` refuses connections; returns the seconds waited, ``TimeoutError`` after
    ``timeout``."""
    start = time.monotonic()
    deadline = start + timeout
    while port_open(port, host, timeout=0.5):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port} still accepts connections after {timeout}s")
        time.sleep(0.05)
    return time.monotonic() - start
