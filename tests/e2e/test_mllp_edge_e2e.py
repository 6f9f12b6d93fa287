"""The MLLP listener's edge over real sockets (issue 15, findings 3 and 10): slow senders cannot lock the HIS
out, and a HIS resend with a new MSH-7 is the same message."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from adapters.hl7.ack import read_ack
from adapters.hl7.er7 import parse
from adapters.inner.framing import MLLPFramer, frame
from tests.e2e.harness import Lock, eventually, mllp_exchange

FRAME_TIMEOUT = 4.0
IDLE_TIMEOUT = 6.0


class Dribbler(threading.Thread):
    """A slowloris peer: connects, sends ``burst`` at once, then one byte of ``drip`` every ``every`` seconds
    (over and over), reading whatever comes back, until the gateway closes the connection."""

    def __init__(self, port: int, drip: bytes, *, burst: bytes = b"", every: float = 0.5):
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.burst, self.drip, self.every = burst, drip, every
        self.received = b""
        self.opened = time.monotonic()
        self.held_for: float | None = None  # seconds until the gateway closed the connection
        self.stop = threading.Event()

    def run(self):
        self.sock.settimeout(self.every)
        try:
            self.sock.sendall(self.burst)
            i = 0
            while not self.stop.is_set():
                self.sock.sendall(self.drip[i % len(self.drip) : i % len(self.drip) + 1])
                i += 1
                try:
                    data = self.sock.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    break
                self.received += data
        except OSError:
            pass
        self.held_for = time.monotonic() - self.opened
        self.sock.close()


def refused_at_once(port: int, source: str = "127.0.0.1") -> bool:
    """Whether a new connection (from ``source``) is closed by the gateway before anything is sent (a connection
    limit reached)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0)) as s:
        s.settimeout(2)
        try:
            return s.recv(1) == b""
        except socket.timeout:
            return False


def still_open(s: socket.socket) -> bool:
    """Whether the gateway has not closed this connection (nothing to read, no end of stream)."""
    s.setblocking(False)
    try:
        return s.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True


@pytest.fixture
def small_gateway(tmp_path):
    """A gateway whose MLLP listener takes 4 connections, with short frame and idle deadlines."""
    lock = Lock(tmp_path, sim={"retry_initial": "200ms", "retry_max": "1s"})
    lock.gateway_config["inner"].update(max_connections=4, frame_timeout=f"{FRAME_TIMEOUT}s",
                                        idle_timeout=f"{IDLE_TIMEOUT}s")
    lock.write_configs()
    lock.start_gateway()
    yield lock
    lock.stop()


def test_four_dribbling_senders_no_longer_lock_the_his_out(small_gateway):
    """Four peers take every MLLP connection and dribble a byte every 0.5 s: two inside a frame (one whose
    MSH-10 already arrived), two junk outside frames. Before, every byte restarted the idle timer and the HIS
    simulator was refused for as long as they kept dribbling. Now the frames are cut at frame_timeout (the one
    with an MSH-10 gets an AE NAK naming it), the junk senders at idle_timeout, and the real HIS simulator,
    retrying as HIS engines do, gets in and publishes every slot."""
    lock = small_gateway
    head = b"\x0bMSH|^~\\&|EVIL|X|GATEWAYD|FRONT|20301010120000||SIU^S12^SIU_S12|SLOW-9|P|2.5|"
    dribblers = [
        Dribbler(lock.mllp_port, b"SCH|||||D001^x", burst=head),
        Dribbler(lock.mllp_port, b"\x0bMSH|^~\\&|EVIL|X|"),
        Dribbler(lock.mllp_port, b"\r\n"),
        Dribbler(lock.mllp_port, b"GET / HTTP/1.1\r\n"),
    ]
    for d in dribblers:
        d.start()
    try:
        time.sleep(0.3)
        assert refused_at_once(lock.mllp_port), "the four dribblers should hold every connection"
        started = time.monotonic()
        lock.start_sim()
        eventually(lambda: len(lock.search_slots()) >= lock.slot_count, timeout=30,
                   what="the HIS simulator's slots, past the dribblers")
        published = time.monotonic() - started
        for d in dribblers:
            d.join(IDLE_TIMEOUT)
        print(f"\nslots published {published:.1f} s after the HIS simulator started; dribblers held their "
              f"connections for {', '.join(f'{d.held_for:.1f}' if d.held_for else '?' for d in dribblers)} s")
    finally:
        for d in dribblers:
            d.stop.set()
    framed_slow, framed_bare, junk_lines, junk_http = dribblers
    for d in (framed_slow, framed_bare):
        assert d.held_for is not None and FRAME_TIMEOUT - 0.5 < d.held_for < FRAME_TIMEOUT + 3
    for d in (junk_lines, junk_http):
        assert d.held_for is not None and IDLE_TIMEOUT - 0.5 < d.held_for < IDLE_TIMEOUT + 3
    [nak] = [parse(p) for p in MLLPFramer().feed(framed_slow.received)]
    code, control_id, text = read_ack(nak)
    assert (code, control_id) == ("AE", "SLOW-9") and "send it again" in text
    assert framed_bare.received == junk_lines.received == junk_http.received == b""
    assert lock.gateway.alive()


def test_the_his_addresses_keep_their_own_connections_whatever_else_holds_the_listener(tmp_path):
    """Before, connections that send nothing held the listener for idle_timeout (31 of them, 5 minutes with the
    default config) and the HIS was refused meanwhile. Now connections are counted per source at accept, and the
    HIS's addresses (inner.his_addresses) have inner.his_connections of their own: peers at 127.0.0.2 and
    127.0.0.3 take every shared connection (max_connections 4, at most 3 from one address), more are closed at
    accept, and the HIS simulator at 127.0.0.1 still gets in at once and publishes its slots."""
    lock = Lock(tmp_path, sim={"retry_initial": "200ms", "retry_max": "1s"})
    lock.gateway_config["inner"].update(max_connections=4, max_connections_per_address=3,
                                        his_addresses=["127.0.0.1"], his_connections=2)
    lock.write_configs()
    lock.start_gateway()
    held = []
    try:
        for source, n in (("127.0.0.2", 3), ("127.0.0.3", 1)):
            held += [socket.create_connection(("127.0.0.1", lock.mllp_port), timeout=5, source_address=(source, 0))
                     for _ in range(n)]
        time.sleep(0.3)
        assert refused_at_once(lock.mllp_port, "127.0.0.2"), "a fourth connection from one address"
        assert refused_at_once(lock.mllp_port, "127.0.0.4"), "any connection once the shared ones are taken"
        started = time.monotonic()
        lock.start_sim()
        eventually(lambda: len(lock.search_slots()) >= lock.slot_count, timeout=20,
                   what="the HIS simulator's slots, through its reserved connections")
        print(f"\nslots published {time.monotonic() - started:.1f} s after the HIS simulator started")
        assert all(still_open(s) for s in held), "the HIS got in beside them, not in their place"
    finally:
        for s in held:
            s.close()
        lock.stop()
    log = lock.gateway.log_path.read_text()
    assert '"connections.refused"' in log and '"gate": "inner"' in log


def test_a_tls_handshake_that_never_finishes_is_cut(tmp_path):
    """With inner.tls, a peer that opens a TCP connection and never finishes the handshake (sends nothing, or
    half a ClientHello) is closed after inner.tls_handshake_timeout, logged; a real HIS engine's handshake and
    message still go through."""
    import json
    import ssl

    lock = Lock(tmp_path)
    lock.gateway_config["inner"].update(tls_handshake_timeout="1s", idle_timeout="30s", tls={
        "certificate": "certs/server.pem", "private_key": "certs/server.key", "client_ca": "certs/ca.pem"})
    lock.write_configs()
    lock.start_gateway()
    try:
        held = []
        for first_bytes in (b"", b"\x16\x03\x01\x02\x00\x01"):  # nothing; the start of a ClientHello
            with socket.create_connection(("127.0.0.1", lock.mllp_port), timeout=10) as s:
                s.sendall(first_bytes)
                opened = time.monotonic()
                try:
                    assert s.recv(1) == b""
                except ConnectionResetError:
                    pass  # aborted: mid-handshake there is nothing to say goodbye with
                held.append(time.monotonic() - opened)
        assert all(0.8 < h < 3 for h in held), held
        ctx = ssl.create_default_context(cafile=str(lock.certs / "ca.pem"))
        ctx.load_cert_chain(*lock.cert("demo"))
        with socket.create_connection(("127.0.0.1", lock.mllp_port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                time.sleep(1.5)  # past the handshake deadline: a finished handshake is not cut by it
                s.sendall(frame(siu("TLS-OK", "20301010120000")))
                framer, frames = MLLPFramer(), []
                while not frames:
                    frames = framer.feed(s.recv(65536))
        assert read_ack(parse(frames[0]))[:2] == ("AA", "TLS-OK")
        events = [json.loads(line)["event"] for line in lock.gateway.log_path.read_text().splitlines()
                  if line.startswith("{")]
        assert events.count("mllp.tls.handshake_timeout") == 2
    finally:
        lock.stop()


def siu(control_id: str, msh7: str, status: str = "Blocked", facility: str = "HOSPITAL") -> bytes:
    return (f"MSH|^~\\&|HIS|{facility}|GATEWAYD|FRONT|{msh7}||SIU^S23^SIU_S12|{control_id}|P|2.5\r"
            f"SCH|||||D001^x||||15|MIN|^^15^203010100830^203010100845|||||||||||||{status}\r"
            "RGS|1\rAIS|1||x^y|203010100830|||15|MIN\r").encode()


def test_a_resend_with_a_new_msh_7_is_acked_again_and_applied_once(lock):
    """Before, the resend (same MSH-3/4 and MSH-10, a new MSH-7) got AR 205. Now: two AA, one message in the
    chamber, applied once (its story has one 'delivered' line). The same MSH-10 from another facility (MSH-4) is
    another message; the same sender and MSH-10 with other content is still AR 205."""
    first = parse(mllp_exchange(lock.mllp_port, siu("RESEND-1", "20301010120000")))
    again = parse(mllp_exchange(lock.mllp_port, siu("RESEND-1", "20301010120130")))
    assert read_ack(first)[:2] == read_ack(again)[:2] == ("AA", "RESEND-1")
    rows = lock.chamber_rows("SELECT id, sender FROM messages WHERE direction = 'inbound' AND control_id = ?",
                             "RESEND-1")
    assert [sender for _, sender in rows] == ["HIS|HOSPITAL"]
    story = lock.chamber_rows("SELECT state FROM message_events WHERE message_id = ?", rows[0][0])
    assert [s for (s,) in story].count("delivered") == 1

    other_facility = parse(mllp_exchange(lock.mllp_port, siu("RESEND-1", "20301010120200", "Open", "BRANCH")))
    assert read_ack(other_facility)[:2] == ("AA", "RESEND-1")
    assert len(lock.chamber_rows("SELECT 1 FROM messages WHERE control_id = 'RESEND-1'")) == 2

    changed = parse(mllp_exchange(lock.mllp_port, siu("RESEND-1", "20301010120300", "Open")))
    assert read_ack(changed)[:2] == ("AR", "RESEND-1") and changed.segment("ERR").get(3) == "205"
    assert len(lock.chamber_rows("SELECT 1 FROM messages WHERE control_id = 'RESEND-1'")) == 2
