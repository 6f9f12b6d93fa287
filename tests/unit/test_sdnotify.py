"""systemd notifications: the datagrams systemd reads, on a real unix socket."""

import os
import socket

from twisted.internet import task

from gateway.ops.sdnotify import notify, start_watchdog, watchdog_interval


def receiver(tmp_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(tmp_path / "notify"))
    s.settimeout(2)
    return s


def test_notify_sends_the_state_to_notify_socket(tmp_path):
    sock = receiver(tmp_path)
    assert notify("READY=1\nSTATUS=listening", {"NOTIFY_SOCKET": str(tmp_path / "notify")})
    assert sock.recv(100) == b"READY=1\nSTATUS=listening"


def test_abstract_namespace_socket(tmp_path):
    name = f"gatewayd-test-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(2)
    assert notify("READY=1", {"NOTIFY_SOCKET": "@" + name})
    assert s.recv(10) == b"READY=1"


def test_outside_systemd_nothing_happens():
    assert notify("READY=1", {}) is False
    assert watchdog_interval({}) is None


def test_watchdog_pings_at_half_the_interval(tmp_path):
    sock = receiver(tmp_path)
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(env) == 2.0
    clock = task.Clock()
    loop = start_watchdog(clock, env)
    assert sock.recv(20) == b"WATCHDOG=1"
    clock.advance(2)
    assert sock.recv(20) == b"WATCHDOG=1"
    loop.stop()
    assert watchdog_interval({**env, "WATCHDOG_PID": "1"}) is None  # meant for another process
