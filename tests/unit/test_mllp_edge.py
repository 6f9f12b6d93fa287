"""The MLLP listener's edge against slow and noisy peers (issue 15, finding 3): a connection is held only by
real work. A frame has ``frame_timeout`` from its start byte to its end; bytes outside frames neither keep a
connection open nor flow without end (``max_junk_bytes``); a TLS handshake has ``tls_handshake_timeout``.

StringTransport + task.Clock only, bytes delivered one at a time where a slow peer would.
"""

from __future__ import annotations

import structlog
from structlog.testing import capture_logs
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from adapters.hl7.ack import read_ack
from adapters.hl7.er7 import parse
from adapters.inner.framing import COMMIT_ACK_BLOCK, COMMIT_NAK_BLOCK, MLLPFramer, frame
from tests.unit.test_mllp_protocols import HeldHandler, Server, SyncHandler, answers, events, siu


def dribble(server, proto, data: bytes, every: float = 1.0) -> None:
    """Deliver ``data`` one byte per ``every`` seconds of the server's clock, as a slowloris peer does;
    stops early once the listener has decided to close."""
    for i in range(len(data)):
        if proto.transport.disconnecting:
            return
        proto.dataReceived(data[i : i + 1])
        server.clock.advance(every)


def test_a_frame_dribbled_one_byte_a_second_is_cut_at_frame_timeout_with_a_nak():
    """Before: every byte restarted the idle timer, so a frame sent at 1 byte/s held the connection for
    ever. Now the frame has frame_timeout from its start byte: when it runs out the sender gets an AE NAK
    (MSA-2 = its MSH-10, ERR 207 "not completed within 30 s ... send it again") and the connection is
    closed. (frame_timeout is left at its default, 30 s.)"""
    server = Server(SyncHandler(), idle_timeout=300.0)
    proto, tr = server.connect()
    data = frame(siu("SLOW-1"))
    header = data.index(b"|P|")  # the header up to MSH-10 comes at once, the rest 1 byte/s
    with capture_logs() as logs:
        proto.dataReceived(data[:header])
        dribble(server, proto, data[header:])
    assert tr.disconnecting
    assert server.clock.seconds() == 30.0  # cut at the deadline, not by the idle timer
    [nak] = answers(tr)
    code, control_id, text = read_ack(nak)
    assert (code, control_id) == ("AE", "SLOW-1")
    assert nak.segment("ERR").get(3) == "207" and "30 s" in text and "send it again" in text
    [timeout] = events(logs, "mllp.frame.timeout")
    assert timeout["control_id"] == "SLOW-1" and timeout["frame_timeout"] == 30.0
    assert server.handler.seen == []


def test_a_timed_out_frame_in_enhanced_mode_gets_ce_and_release_2_a_negative_commit_block():
    server = Server(SyncHandler(), frame_timeout=5.0, release=2)
    proto, tr = server.connect()
    proto.dataReceived(b"\x0bMSH|^~\\&|HIS|HOSP|GW|G|20240301||SIU^S12|ENH-1|P|2.5|||AL|NE|")
    server.clock.advance(5)
    assert tr.disconnecting
    assert tr.value().startswith(COMMIT_NAK_BLOCK)
    [nak] = [parse(p) for p in MLLPFramer().feed(tr.value()[len(COMMIT_NAK_BLOCK):])]
    assert read_ack(nak)[:2] == ("CE", "ENH-1")


def test_no_nak_when_msh_10_has_not_arrived_whole():
    """A NAK echoes MSH-10 only once the field is complete (a separator after it): a half-arrived id would
    answer a message that was never sent. Without one the connection is just closed."""
    heads = (b"\x0bMSH|^~\\&|HIS|HOSP|GW|G|2024", b"\x0bMSH|^~\\&|HIS|HOSP|GW|G|20240301||SIU^S12|C12", b"\x0b")
    for head in heads:
        server = Server(SyncHandler(), frame_timeout=5.0)
        proto, tr = server.connect()
        with capture_logs() as logs:
            proto.dataReceived(head)
            server.clock.advance(5)
        assert tr.disconnecting and tr.value() == b""
        assert events(logs, "mllp.frame.timeout")[0]["control_id"] == ""


def test_frames_completed_before_a_timed_out_one_are_answered_first():
    """A frame already read waits for the handler while the next one stalls: the deadline does not cut
    the first; it is answered, then the stalled one is NAKed and the connection closed."""
    server = Server(HeldHandler(), frame_timeout=10.0)
    proto, tr = server.connect()
    proto.dataReceived(frame(siu("DONE-1")) + frame(siu("STALL-2"))[:150])
    server.clock.advance(10)
    assert not tr.disconnecting and tr.value() == b""
    server.handler.release(0)
    assert [read_ack(a)[:2] for a in answers(tr)] == [("AA", "DONE-1"), ("AE", "STALL-2")]
    assert tr.disconnecting
    assert len(server.handler.calls) == 1  # the stalled frame never reached the handler


def test_each_frame_has_its_own_deadline():
    """A sender that finishes each frame in time is never cut, however long the connection lives."""
    server = Server(SyncHandler(), frame_timeout=10.0, idle_timeout=300.0)
    proto, tr = server.connect()
    for i in range(5):
        data = frame(siu(f"OK-{i}"))
        proto.dataReceived(data[:100])
        server.clock.advance(9)
        proto.dataReceived(data[100:])
    assert not tr.disconnecting
    assert server.handler.seen == [f"OK-{i}" for i in range(5)]


def test_the_frame_deadline_waits_while_we_stopped_reading():
    """Reading paused because frames wait for the handler (back-pressure): the peer cannot finish a frame
    we do not read, so its deadline does not cut it; once reading resumes the deadline counts again."""
    server = Server(HeldHandler(), frame_timeout=10.0, idle_timeout=None)
    proto, tr = server.connect()
    limit = proto.max_pipelined
    proto.dataReceived(b"".join(frame(siu(f"P{i}")) for i in range(limit + 2)) + b"\x0bMSH|^~\\&|HIS|")
    assert tr.producerState == "paused"
    server.clock.advance(25)
    assert not tr.disconnecting
    for i in range(limit + 2):
        server.handler.release(i)
    assert tr.producerState == "producing" and not tr.disconnecting
    server.clock.advance(10)
    assert tr.disconnecting


def test_junk_bytes_do_not_keep_a_connection_open():
    """Before: a junk byte every second restarted the idle timer. Bytes outside frames are not work: the
    connection is closed idle_timeout after the last answer, junk or no junk."""
    server = Server(SyncHandler(), idle_timeout=10.0)
    proto, tr = server.connect()
    with capture_logs() as logs:
        dribble(server, proto, b"\r\n" * 8)
    assert tr.disconnecting and server.clock.seconds() == 10.0
    assert events(logs, "mllp.connection.idle_timeout")


def test_commit_blocks_do_not_keep_a_connection_open():
    """A commit block acknowledges one of our answers: no work for us, so it does not restart the idle
    timer either."""
    server = Server(SyncHandler(), idle_timeout=10.0)
    proto, tr = server.connect()
    for _ in range(3):
        server.clock.advance(4)
        proto.dataReceived(COMMIT_ACK_BLOCK)
    assert tr.disconnecting and server.clock.seconds() == 12.0


def test_commit_blocks_cut_across_reads_do_not_keep_a_connection_open():
    """A commit block split across reads is a frame in progress, but completing it neither restarts the
    idle timer nor gives the next frame a new deadline: the idle time that ran out meanwhile closes the
    connection when the block ends, and blocks chained without a pause meet the first one's deadline."""
    server = Server(SyncHandler(), idle_timeout=10.0, frame_timeout=30.0)
    proto, tr = server.connect()
    server.clock.advance(9)
    proto.dataReceived(b"\x0b\x06")
    server.clock.advance(2)
    assert not tr.disconnecting  # the idle time ran out while the block was arriving
    proto.dataReceived(b"\x1c\x0d")
    assert tr.disconnecting and server.clock.seconds() == 11.0

    server = Server(SyncHandler(), idle_timeout=300.0, frame_timeout=8.0)
    proto, tr = server.connect()
    proto.dataReceived(b"\x0b")
    for _ in range(2):
        server.clock.advance(3)
        proto.dataReceived(b"\x06\x1c\x0d\x0b")
    server.clock.advance(1.9)
    assert not tr.disconnecting
    server.clock.advance(0.1)
    assert tr.disconnecting  # 8 s after the first start byte


def test_a_message_arriving_when_the_idle_time_runs_out_is_still_answered():
    """The idle timer does not cut a frame in progress (its own deadline does): a message whose first bytes
    came just before the idle time ran out is answered and the connection kept."""
    server = Server(SyncHandler(), idle_timeout=10.0, frame_timeout=30.0)
    proto, tr = server.connect()
    data = frame(siu("LATE-1"))
    server.clock.advance(9.5)
    proto.dataReceived(data[:50])
    server.clock.advance(1)
    proto.dataReceived(data[50:])
    assert not tr.disconnecting and server.handler.seen == ["LATE-1"]
    server.clock.advance(10)
    assert tr.disconnecting


def test_answers_keep_a_connection_open():
    """A frame answered (an ACK or a NAK) is work: the idle timer starts again from the answer."""
    server = Server(SyncHandler(), idle_timeout=10.0)
    proto, tr = server.connect()
    server.clock.advance(9)
    proto.dataReceived(frame(siu("W1")))
    server.clock.advance(9)
    proto.dataReceived(frame(b"not HL7"))
    server.clock.advance(9)
    assert not tr.disconnecting
    server.clock.advance(1)
    assert tr.disconnecting


def test_junk_beyond_max_junk_bytes_between_two_messages_closes_the_connection():
    """Before: junk flowed without end (50 MB in one connection were read and dropped). Now at most
    max_junk_bytes (default 64 KiB) between two messages - a CR LF after each frame never adds up; past it
    the connection is closed, with a log event giving the count only."""
    server = Server(SyncHandler())
    proto, tr = server.connect()
    with capture_logs() as logs:
        for i in range(5):
            proto.dataReceived(b"\r\n" * 30_000 + frame(siu(f"J{i}")))
        assert not tr.disconnecting
        proto.dataReceived(b"GET / HTTP/1.1\r\n" + b"x" * 65_530)
    assert tr.disconnecting
    assert server.handler.seen == [f"J{i}" for i in range(5)]
    [closed] = events(logs, "mllp.junk.too_much")
    assert closed["junk_bytes"] == 65_546 and closed["max_junk_bytes"] == 65_536 and "GET" not in repr(closed)
    proto.dataReceived(frame(siu("AFTER")))
    assert server.handler.seen[-1] == "J4"  # nothing more is read


def test_an_abandoned_frame_counts_as_junk():
    """A start byte inside a frame drops the unfinished one (the sender started again): its bytes are junk."""
    server = Server(SyncHandler(), max_junk_bytes=100)
    proto, tr = server.connect()
    proto.dataReceived(b"\x0b" + b"y" * 200 + frame(siu("J1")))
    assert tr.disconnecting and server.handler.seen == []


def test_a_connection_we_close_is_aborted_if_the_peer_does_not_take_our_last_answers():
    """Before: a close waited for our unwritten answers, so a peer that never read them kept its connection
    for ever after its idle or frame timeout. Now it is aborted abort_after (15 s) later; a peer that takes
    them is closed normally and nothing is aborted."""
    server = Server(SyncHandler(), idle_timeout=10.0)
    proto, tr = server.connect()
    proto.dataReceived(frame(siu("R1")))
    server.clock.advance(10)
    assert tr.disconnecting and not tr.disconnected
    server.clock.advance(15)
    assert tr.disconnected  # StringTransport.abortConnection

    proto, tr = server.connect()
    server.clock.advance(10)
    proto.connectionLost(Failure(ConnectionDone()))
    assert not server.clock.getDelayedCalls()


class TlsTransport(StringTransport):
    """A StringTransport on which TLS can be started: it records the options; the handshake completes only
    when the test says so (``proto.handshakeCompleted()``), as a peer that never finishes it would leave it."""

    tls = None

    def startTLS(self, options):
        self.tls = options


def tls_connection(server, **kw):
    from twisted.internet.address import IPv4Address

    addr = IPv4Address("TCP", "10.1.2.3", 40001)
    proto = server.factory.buildProtocol(addr)
    tr = TlsTransport(peerAddress=addr)
    proto.makeConnection(tr)
    return proto, tr


def test_a_tls_handshake_that_never_finishes_is_cut_at_tls_handshake_timeout():
    """Before: a peer that opened a TCP connection to a TLS listener and never finished the handshake held
    it until idle_timeout (5 min). Now it has tls_handshake_timeout; the failure is counted like any failed
    handshake (on_tls_failure) and logged. (tls_handshake_timeout is left at its default, 10 s.)"""
    failures = []
    server = Server(SyncHandler(), tls=object(), idle_timeout=300.0,
                    on_tls_failure=lambda peer, failure: failures.append(failure))
    proto, tr = tls_connection(server)
    assert tr.tls is server.factory.tls
    with capture_logs() as logs:
        server.clock.advance(9.9)
        assert not tr.disconnecting
        server.clock.advance(0.1)
    assert tr.disconnecting
    [event] = events(logs, "mllp.tls.handshake_timeout")
    assert event["tls_handshake_timeout"] == 10.0
    proto.connectionLost(Failure(ConnectionDone()))
    assert len(failures) == 1 and "10" in failures[0].getErrorMessage()


def test_a_finished_tls_handshake_stops_its_deadline():
    server = Server(SyncHandler(), tls=object(), tls_handshake_timeout=10.0, idle_timeout=300.0)
    proto, tr = tls_connection(server)
    server.clock.advance(5)
    proto.handshakeCompleted()
    proto.dataReceived(frame(siu("T1")))
    server.clock.advance(200)
    assert not tr.disconnecting and server.handler.seen == ["T1"]


def teardown_function():
    structlog.reset_defaults()
