"""The fault-injection toolkit does what the fault tests will rely on (fast: a few seconds)."""

from __future__ import annotations

import errno
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time

import pytest

from tests.e2e.harness import Lock, free_port
from tests.faults import (
    FaultProxy,
    FaultUnavailable,
    fill,
    free_bytes,
    free_slot_ids,
    kill9,
    port_open,
    rss_bytes,
    run_mixed,
    send_sius,
    small_filesystem,
    wait_for_port,
    wait_for_port_closed,
)

# -- an echo server to proxy to ------------------------------------------------------------------------


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        self.accepted = 0
        self.received = 0
        self.closed = 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), EchoHandler)

    @property
    def port(self) -> int:
        return self.server_address[1]


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self):
        server: EchoServer = self.server
        with server.lock:
            server.accepted += 1
        try:
            while True:
                data = self.request.recv(65536)
                if not data:
                    break
                with server.lock:
                    server.received += len(data)
                self.request.sendall(data)
        except OSError:
            pass
        finally:
            with server.lock:
                server.closed += 1


@pytest.fixture
def echo():
    server = EchoServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def proxy(echo):
    with FaultProxy(echo.port) as p:
        yield p


def connect(port: int, timeout: float = 2.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        data = s.recv(n - len(out))
        if not data:
            raise ConnectionError(f"closed after {len(out)} of {n} bytes")
        out += data
    return out


def is_closed(s: socket.socket, timeout: float = 2.0) -> bool:
    """The peer closed or reset the connection (EOF or ECONNRESET) within ``timeout``."""
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def is_refused(port: int) -> bool:
    """A new connection is reset at once: during connect (the RST can beat the handshake's end) or just
    after."""
    try:
        s = connect(port)
    except (ConnectionResetError, ConnectionRefusedError):
        return True
    with s:
        return is_closed(s)


def wait_until(check, timeout: float = 3.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# -- FaultProxy ----------------------------------------------------------------------------------------


def test_proxy_forwards_bytes_both_ways(proxy, echo):
    payload = os.urandom(300_000)
    with connect(proxy.port) as s:
        sender = threading.Thread(target=s.sendall, args=(payload,))
        sender.start()
        assert recv_exactly(s, len(payload)) == payload
        sender.join()
    stats = proxy.wait_for(lambda st: st["active"] == 0)
    assert stats["accepted"] == 1 and stats["upstream_connects"] == 1
    assert stats["bytes_up"] == stats["bytes_down"] == len(payload) == echo.received
    assert proxy.mode == "pass_through"


def test_proxy_delay_adds_at_least_the_delay_each_way(proxy):
    with connect(proxy.port) as s:
        s.sendall(b"x")
        recv_exactly(s, 1)
        proxy.delay(0.25)
        t0 = time.monotonic()
        s.sendall(b"ping")
        assert recv_exactly(s, 4) == b"ping"
        assert time.monotonic() - t0 >= 0.5  # 0.25 up + 0.25 down
        # chunks in flight are delayed, not serialised: two sends in a row still take ~2 delays
        t0 = time.monotonic()
        s.sendall(b"a")
        time.sleep(0.05)
        s.sendall(b"b")
        assert recv_exactly(s, 2) == b"ab"
        assert 0.5 <= time.monotonic() - t0 < 0.8  # serialised would be >= 0.75
        proxy.pass_through()
        t0 = time.monotonic()
        s.sendall(b"fast")
        assert recv_exactly(s, 4) == b"fast"
        assert time.monotonic() - t0 < 0.25


def test_proxy_drop_accepts_reads_and_never_forwards(proxy, echo):
    with connect(proxy.port) as live:
        live.sendall(b"before")
        assert recv_exactly(live, 6) == b"before"
        proxy.drop()
        live.sendall(b"lost")
        with connect(proxy.port) as new:
            new.sendall(b"silent HIS")
            assert not is_closed(new, 0.3)  # connected, no answer, not closed
        assert not is_closed(live, 0.1)
    stats = proxy.wait_for(lambda st: st["dropped_up"] == len(b"lost") + len(b"silent HIS"))
    assert stats["bytes_up"] == 6 and echo.received == 6
    assert echo.accepted == 1  # the dropped connection never reached the target


def test_proxy_black_hole_holds_data_until_it_heals(proxy, echo):
    proxy.black_hole()
    with connect(proxy.port) as s:
        s.sendall(b"into the void")
        assert not is_closed(s, 0.3)
        assert echo.accepted == 0 and proxy.stats()["bytes_up"] == 0
        proxy.pass_through()
        s.settimeout(2)
        assert recv_exactly(s, 13) == b"into the void"


def test_proxy_cut_closes_live_connections_and_keeps_listening(proxy, echo):
    clients = [connect(proxy.port) for _ in range(2)]
    try:
        for c in clients:
            c.sendall(b"hi")
            assert recv_exactly(c, 2) == b"hi"
        assert proxy.cut() == 2
        assert all(is_closed(c) for c in clients)
        wait_until(lambda: echo.closed == 2)  # the target's side is closed as well
        assert proxy.stats()["active"] == 0 and proxy.stats()["cut"] == 2
    finally:
        for c in clients:
            c.close()
    with connect(proxy.port) as again:
        again.sendall(b"ok")
        assert recv_exactly(again, 2) == b"ok"


def test_proxy_refuse_closes_new_connections_only(proxy, echo):
    with connect(proxy.port) as live:
        live.sendall(b"up")
        assert recv_exactly(live, 2) == b"up"  # accepted by the proxy (accept is asynchronous)
        proxy.refuse()
        assert is_refused(proxy.port)
        live.sendall(b"still")
        assert recv_exactly(live, 5) == b"still"
    assert proxy.stats()["refused"] == 1 and echo.accepted == 1
    proxy.pass_through()
    with connect(proxy.port) as s:
        s.sendall(b"back")
        assert recv_exactly(s, 4) == b"back"


def test_proxy_resets_the_client_when_the_target_is_down_and_close_frees_the_port():
    with FaultProxy(free_port(), connect_timeout=1) as p:
        assert is_refused(p.port)
        assert p.stats()["upstream_failures"] == 1
        port = p.port
    assert not port_open(port)
    with pytest.raises(RuntimeError):
        p.drop()
    with pytest.raises(ValueError):
        FaultProxy(80, "192.0.2.1")


# -- small filesystem --------------------------------------------------------------------------------------


def write_file(path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(b"z" * size)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", ["tmpfs", "ext4"])
def test_small_filesystem_fills_up_and_gives_space_back(kind):
    try:
        with small_filesystem(8, kind=kind) as fs:
            assert os.path.ismount(fs)
            st = os.statvfs(fs)
            total = st.f_blocks * st.f_frsize
            assert (6 << 20) <= total <= (8 << 20) if kind == "ext4" else total == 8 << 20
            write_file(fs / "before", 4096)
            filler = fill(fs)
            assert filler.parent == fs and filler.stat().st_size > (5 << 20)
            with pytest.raises(OSError) as full:
                write_file(fs / "after", 64 * 1024)
            assert full.value.errno == errno.ENOSPC
            assert (fs / "before").read_bytes() == b"z" * 4096  # what was there is still there
            filler.unlink()
            write_file(fs / "after", 1 << 20)
            mount_point = fs
    except FaultUnavailable as e:
        pytest.fail(f"root is available here, mounting must work: {e}")
    assert not os.path.ismount(mount_point)
    assert not mount_point.exists() and not mount_point.parent.exists()


def test_fill_can_leave_some_room():
    with small_filesystem(4) as fs:
        fill(fs, leave_bytes=256 * 1024)
        assert 200 * 1024 <= free_bytes(fs) <= 300 * 1024
        write_file(fs / "fits", 128 * 1024)


def test_small_filesystem_unmounts_even_when_a_file_is_still_open_and_the_test_fails():
    with pytest.raises(ZeroDivisionError), small_filesystem(1) as fs:
        held = open(fs / "held", "wb")
        held.write(b"x")
        mount_point = fs
        1 / 0
    try:
        assert not os.path.ismount(mount_point) and not mount_point.parent.exists()
    finally:
        held.close()


# -- processes -----------------------------------------------------------------------------------------------


def test_process_helpers():
    assert 5 << 20 < rss_bytes() < 4 << 30
    assert rss_bytes(os.getpid()) > 0
    port = free_port()
    child = subprocess.Popen([sys.executable, "-c", (
        "import socket, time\n"
        f"s = socket.create_server(('127.0.0.1', {port}))\n"
        "time.sleep(60)\n")])
    try:
        assert wait_for_port(port, timeout=10) < 10
        assert rss_bytes(child.pid) > 1 << 20
        assert kill9(child) == -9
        assert wait_for_port_closed(port, timeout=5) < 5
        assert kill9(child) == -9  # already gone: only reaped
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    with pytest.raises(ProcessLookupError):
        rss_bytes(child.pid)
    with pytest.raises(TimeoutError):
        wait_for_port(port, timeout=0.2)


# -- load driver against a real lock -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lock(tmp_path_factory):
    with Lock(tmp_path_factory.mktemp("faults-lock"), doctors=1, days=1) as running:
        yield running


def test_load_driver_gets_aa_for_sius_and_201_for_bookings(lock):
    slots = free_slot_ids(lock, 3)
    assert len(slots) == 3
    results = run_mixed(lock, sius=20, slot_ids=slots, timeout=60)
    his, platform = results["his"], results["platform"]
    assert len(his["acked"]) == 20 and not his["unacknowledged"] and not his["refused"], his
    assert [m["control_id"] for m in his["messages"]] == [f"LOAD-{his['run']}-{i}" for i in range(20)]
    assert platform["status_counts"] == {201: 3}, platform
    assert all(b["appointment_id"] and b["appointment_status"] == "booked" for b in platform["bookings"])
    # the SIUs reached the slot book: the last slot was opened, then booked at the counter
    last = his["messages"][-1]
    assert last["trigger"] == "SIU^S12"
    slot = lock.session().get(f"{lock.base}/Slot/{last['slot_id']}", timeout=5).json()
    assert slot["status"] == "busy"


def test_load_driver_counts_unanswered_messages_and_carries_on(lock):
    with FaultProxy(lock.mllp_port) as link:
        link.drop()
        silent = send_sius(link.port, 2, ack_timeout=0.3, reconnect_delay=0.05)
        assert silent["unacknowledged"] == [m["control_id"] for m in silent["messages"]]
        link.refuse()
        refused = send_sius(link.port, 2, attempts=2, reconnect_delay=0.05)
        assert len(refused["unacknowledged"]) == 2 and refused["connection_failures"] == 4
        link.pass_through()
        healed = send_sius(link.port, 2, run=silent["run"])  # the lost messages, sent again: AA
        assert len(healed["acked"]) == 2
