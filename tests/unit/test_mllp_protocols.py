"""Unit tests of the MLLP listener (adapters.inner.listener) and sender (adapters.inner.client).

No real reactor: the listener runs on a StringTransport with a task.Clock; the sender talks through
twisted.test.iosim to real protocols (a scripted fake HIS, or our own listener) on a MemoryReactorClock.
"""

from __future__ import annotations

import itertools
from datetime import datetime

import pytest
import structlog
from structlog.testing import capture_logs
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test.iosim import ConnectionCompleter

from adapters.hl7.ack import build_ack, read_ack
from adapters.hl7.er7 import Hl7Error, Message, parse
from adapters.inner.client import AckTimeout, MLLPClient, PeerUnavailable
from adapters.inner.framing import MLLPFramer, frame
from adapters.inner.listener import MLLPServerFactory
from tests.deferreds import assertNoResult, failureResultOf, successResultOf

NOW = datetime(2024, 3, 1, 8, 30)
PATIENT = "Zhangsan"


def siu(control_id: str, charset: str = "UNICODE UTF-8") -> bytes:
    return (
        f"MSH|^~\\&|HIS|HOSP|GATEWAYD|GW|20240301083000||SIU^S12^SIU_S12|{control_id}|P|2.5|||||CHN|{charset}\r"
        "SCH||HA123^HIS||||S12^booked|||30|MIN|^^30^202403011000^202403011030\r"
        f"PID|1||MR0001^^^HOSP^MR||{PATIENT}^Wei\r"
        "RGS|1\r"
        "AIS|1||GEN^General medicine|202403011000|||30|MIN\r"
        "AIP|1||DOC1^Li^Na\r"
    ).encode()


def ack_for(message: Message, code: str = "AA", control_id: str | None = None) -> bytes:
    """An ACK for ``message``; with ``control_id`` the MSA-2 is forced to that value instead."""
    raw = build_ack(message, code, sending_application="HIS", sending_facility="HOSP",
                    control_id="A-" + message.control_id, now=NOW)
    if control_id is not None:
        raw = raw.replace(f"MSA|{code}|{message.control_id}".encode(), f"MSA|{code}|{control_id}".encode())
    return raw


def answers(transport) -> list[Message]:
    """Parse every frame written on a StringTransport so far."""
    return [parse(p) for p in MLLPFramer().feed(transport.value())]


def events(logs, name):
    return [e for e in logs if e["event"] == name]


# ============================================================================================ listener


class HeldHandler:
    """A MessageHandler whose answers the test releases: each call returns an unfired Deferred."""

    def __init__(self):
        self.calls: list[tuple[Message, str, defer.Deferred]] = []

    def handle(self, message, peer):
        d = defer.Deferred()
        self.calls.append((message, peer, d))
        return d

    def release(self, index: int = -1, code: str = "AA"):
        message, _peer, d = self.calls[index]
        d.callback(ack_for(message, code))


class SyncHandler:
    """A MessageHandler that answers at once with plain bytes."""

    def __init__(self):
        self.seen: list[str] = []

    def handle(self, message, peer):
        self.seen.append(message.control_id)
        return ack_for(message)


class FailingHandler:
    def __init__(self, how: str):
        self.how = how

    def handle(self, message, peer):
        if self.how == "raise":
            raise RuntimeError("database is on fire")
        if self.how == "hl7":
            return defer.fail(Hl7Error(101, "SCH-2 missing", segment="SCH", field=2))
        if self.how == "text":
            return defer.succeed("not bytes")
        return defer.fail(RuntimeError("commit failed"))


class Server:
    """One listener connection on a StringTransport."""

    def __init__(self, handler, **kw):
        self.clock = task.Clock()
        ids = (f"N{i}" for i in itertools.count(1))
        kw.setdefault("max_message_bytes", 4096)
        self.factory = MLLPServerFactory(handler, clock=self.clock, ack_control_id=lambda: next(ids), **kw)
        self.handler = handler

    def connect(self, port: int = 40000):
        addr = IPv4Address("TCP", "10.1.2.3", port)
        proto = self.factory.buildProtocol(addr)
        transport = StringTransport(peerAddress=addr)
        proto.makeConnection(transport)
        return proto, transport


def test_ack_written_only_after_handler_deferred_fires():
    """Nothing is written while the handler's Deferred is pending; its ACK is written, framed, once it
    fires - acknowledgement follows commit."""
    server = Server(HeldHandler())
    proto, tr = server.connect()
    proto.dataReceived(frame(siu("C1")))
    assert len(server.handler.calls) == 1
    message, peer, _d = server.handler.calls[0]
    assert message.control_id == "C1" and peer == "10.1.2.3:40000"
    assert tr.value() == b""
    server.handler.release(0)
    [ack] = answers(tr)
    assert read_ack(ack)[:2] == ("AA", "C1")
    assert tr.value().startswith(b"\x0b") and tr.value().endswith(b"\x1c\x0d")


def test_pipelined_frames_handled_one_at_a_time_in_order():
    """Three frames in one chunk: the handler sees the second only after the first was answered, and the
    answers come out in arrival order."""
    server = Server(HeldHandler())
    proto, tr = server.connect()
    proto.dataReceived(frame(siu("C1")) + frame(siu("C2")) + frame(siu("C3")))
    assert [c[0].control_id for c in server.handler.calls] == ["C1"]
    server.handler.release(0)
    assert [c[0].control_id for c in server.handler.calls] == ["C1", "C2"]
    server.handler.release(1)
    server.handler.release(2)
    assert [read_ack(a)[1] for a in answers(tr)] == ["C1", "C2", "C3"]


def test_many_pipelined_frames_with_synchronous_handler():
    """2,000 pipelined frames answered synchronously come back in order without deep recursion (the pump
    loops; a recursive one would hit the recursion limit)."""
    server = Server(SyncHandler())
    proto, tr = server.connect()
    ids = [f"C{i}" for i in range(2000)]
    proto.dataReceived(b"".join(frame(siu(i)) for i in ids))
    assert [read_ack(a)[1] for a in answers(tr)] == ids


def test_backpressure_when_many_frames_wait():
    """When more than max_pipelined frames wait behind a held message the transport is paused (TCP
    back-pressure), and reading resumes once the queue has drained to half."""
    server = Server(HeldHandler())
    proto, tr = server.connect()
    limit = proto.max_pipelined
    proto.dataReceived(b"".join(frame(siu(f"C{i}")) for i in range(limit + 2)))
    assert tr.producerState == "paused"
    for i in range(limit // 2 + 1):
        assert tr.producerState == "paused"
        server.handler.release(i)
    assert tr.producerState == "producing"
    assert [read_ack(a)[1] for a in answers(tr)] == [f"C{i}" for i in range(limit // 2 + 1)]


def test_frames_split_into_single_bytes():
    """A frame arriving one byte at a time is handled once, when complete."""
    server = Server(SyncHandler())
    proto, tr = server.connect()
    data = frame(siu("C1"))
    for i in range(len(data)):
        proto.dataReceived(data[i : i + 1])
    assert server.handler.seen == ["C1"]
    assert [read_ack(a)[1] for a in answers(tr)] == ["C1"]


def test_garbage_frame_gets_ar_nak_and_connection_stays():
    """A frame that does not parse gets an AR NAK with ERR from the parser, logged as mllp.frame.rejected;
    the connection stays open and the next good frame is handled."""
    server = Server(SyncHandler())
    proto, tr = server.connect()
    with capture_logs() as logs:
        proto.dataReceived(frame(b"this is not HL7"))
        proto.dataReceived(frame(siu("C2")))
    nak, ack = answers(tr)
    assert read_ack(nak)[0] == "AR"
    assert nak.segment("ERR").get(3) == "100"
    assert read_ack(ack)[:2] == ("AA", "C2")
    assert not tr.disconnecting
    assert events(logs, "mllp.frame.rejected")[0]["code"] == 100


def test_unparseable_message_nak_echoes_salvaged_control_id():
    """A message refused by the parser (missing MSH-12) still gets its MSH-10 echoed in the NAK's MSA-2, and
    ERR-2 names the field."""
    server = Server(SyncHandler())
    proto, tr = server.connect()
    with capture_logs() as logs:
        proto.dataReceived(frame(b"MSH|^~\\&|HIS|HOSP|GW|G|20240301||SIU^S12|C9|P|\rPID|1\r"))
    [nak] = answers(tr)
    assert read_ack(nak)[:2] == ("AR", "C9")
    assert nak.segment("ERR").raw(2) == "MSH^1^12" and nak.segment("ERR").get(3) == "101"
    assert events(logs, "mllp.frame.rejected")[0]["control_id"] == "C9"


def test_oversize_frame_gets_nak_then_close():
    """A frame over max_message_bytes gets an AR NAK (ERR 207 'message exceeds N bytes', MSA-2 salvaged)
    and the connection is closed; reading stops at once and later bytes are ignored."""
    server = Server(SyncHandler(), max_message_bytes=300)
    proto, tr = server.connect()
    big = b"\x0b" + siu("BIG1") + b"NTE|1||" + b"x" * 1000
    with capture_logs() as logs:
        proto.dataReceived(big[:200])
        assert tr.value() == b""
        proto.dataReceived(big[200:])  # exceeds the cap in the middle of the frame
        proto.dataReceived(b"\x1c\x0d" + frame(siu("AFTER")))
    [nak] = answers(tr)
    assert read_ack(nak) == ("AR", "BIG1", "message exceeds 300 bytes")
    assert nak.segment("ERR").get(3) == "207"
    assert tr.disconnecting and tr.producerState == "paused"
    assert server.handler.seen == []
    assert events(logs, "mllp.frame.too_large")[0]["control_id"] == "BIG1"


def test_oversize_after_pending_message_answers_both_in_order():
    """When an oversize frame follows a message still with the handler, the message's ACK is written first,
    then the NAK, then the connection closes."""
    server = Server(HeldHandler(), max_message_bytes=300)
    proto, tr = server.connect()
    proto.dataReceived(frame(siu("C1")) + b"\x0b" + b"y" * 400)
    assert tr.value() == b"" and not tr.disconnecting
    server.handler.release(0)
    ack, nak = answers(tr)
    assert read_ack(ack)[:2] == ("AA", "C1")
    assert read_ack(nak)[0] == "AR"
    assert tr.disconnecting


def test_handler_exception_gives_ae_and_error_log():
    """A handler that raises yields AE with ERR 207 'internal error' and an error-level
    mllp.handler.failed event; the connection stays usable."""
    server = Server(FailingHandler("raise"))
    proto, tr = server.connect()
    with capture_logs() as logs:
        proto.dataReceived(frame(siu("C1")))
    [ack] = answers(tr)
    assert read_ack(ack) == ("AE", "C1", "internal error")
    assert ack.segment("ERR").get(3) == "207"
    [event] = events(logs, "mllp.handler.failed")
    assert event["log_level"] == "error" and event["control_id"] == "C1" and event["peer"] == "10.1.2.3:40000"
    assert event["error_type"] == "RuntimeError"
    assert not tr.disconnecting


@pytest.mark.parametrize("how", ["errback", "text"])
def test_handler_deferred_failure_or_bad_answer_gives_ae(how):
    """A failing Deferred, or an answer that is not bytes, also yields AE 207 (never silence)."""
    server = Server(FailingHandler(how))
    proto, tr = server.connect()
    with capture_logs() as logs:
        proto.dataReceived(frame(siu("C1")))
    [ack] = answers(tr)
    assert read_ack(ack)[:2] == ("AE", "C1")
    assert ack.segment("ERR").get(3) == "207"
    assert any(e["log_level"] == "error" for e in logs)


def test_handler_hl7error_is_reported_in_err():
    """A handler failing with an Hl7Error gets AE with that error's code and location in ERR."""
    server = Server(FailingHandler("hl7"))
    proto, tr = server.connect()
    with capture_logs():
        proto.dataReceived(frame(siu("C1")))
    [ack] = answers(tr)
    assert read_ack(ack) == ("AE", "C1", "SCH-2 missing")
    assert ack.segment("ERR").raw(2) == "SCH^1^2" and ack.segment("ERR").get(3) == "101"


def test_idle_timeout_closes_connection():
    """A connection with no bytes for idle_timeout seconds is closed; bytes received restart the timer."""
    server = Server(SyncHandler(), idle_timeout=10.0)
    proto, tr = server.connect()
    with capture_logs() as logs:
        server.clock.advance(9)
        proto.dataReceived(b"")
        proto.dataReceived(frame(siu("C1")))
        server.clock.advance(9)
        assert not tr.disconnecting
        server.clock.advance(1.5)
    assert tr.disconnecting
    assert events(logs, "mllp.connection.idle_timeout")


def test_idle_timer_does_not_run_while_handler_holds_a_message():
    """While a message is with the handler the peer is waiting on us: no idle close, even when more bytes
    (a pipelined frame) arrive meanwhile; the timer restarts after the last answer is written."""
    server = Server(HeldHandler(), idle_timeout=10.0)
    proto, tr = server.connect()
    proto.dataReceived(frame(siu("C1")))
    server.clock.advance(5)
    proto.dataReceived(frame(siu("C2")))
    server.clock.advance(60)
    assert not tr.disconnecting
    server.handler.release(0)
    server.clock.advance(60)
    assert not tr.disconnecting
    server.handler.release(1)
    server.clock.advance(9)
    assert not tr.disconnecting
    server.clock.advance(2)
    assert tr.disconnecting


def test_max_connections():
    """Over max_connections a new connection is closed at once, with a log event; once one closes, a new
    connection is accepted again."""
    server = Server(SyncHandler(), max_connections=2)
    with capture_logs() as logs:
        (p1, t1), (_p2, t2) = server.connect(1), server.connect(2)
        p3, t3 = server.connect(3)
        assert not t1.disconnecting and not t2.disconnecting
        assert t3.disconnecting
        p3.dataReceived(frame(siu("C3")))
        assert t3.value() == b"" and server.handler.seen == []
        p3.connectionLost(Failure(ConnectionDone()))
        p1.connectionLost(Failure(ConnectionDone()))
        _p4, t4 = server.connect(4)
        assert not t4.disconnecting
    [refused] = events(logs, "mllp.connection.refused")
    assert refused["peer"] == "10.1.2.3:3"
    assert len(server.factory.connections) == 2


def test_junk_bytes_counted_and_logged():
    """Bytes outside frames are discarded and logged by count only; the frame after them is handled."""
    server = Server(SyncHandler())
    proto, _tr = server.connect()
    with capture_logs() as logs:
        proto.dataReceived(b"GET / HTTP/1.0\r\n\r\n" + frame(siu("C1")))
    assert server.handler.seen == ["C1"]
    [junk] = events(logs, "mllp.junk.discarded")
    assert junk["bytes"] == 18 and "GET" not in repr(junk)


def test_answer_after_disconnect_is_logged_not_written():
    """If the peer leaves before the handler answers, the ACK is dropped with mllp.ack.undeliverable."""
    server = Server(HeldHandler())
    proto, tr = server.connect()
    with capture_logs() as logs:
        proto.dataReceived(frame(siu("C1")))
        proto.connectionLost(Failure(ConnectionDone()))
        server.handler.release(0)
    assert tr.value() == b""
    assert events(logs, "mllp.ack.undeliverable")[0]["control_id"] == "C1"


def test_logs_never_contain_message_contents():
    """Across accepted, rejected, failed and junk paths, no log event carries message contents (the patient
    name in PID-5 never appears)."""
    for handler in (SyncHandler(), FailingHandler("raise")):
        server = Server(handler, max_message_bytes=1000)
        proto, _tr = server.connect()
        with capture_logs() as logs:
            proto.dataReceived(b"junk " + PATIENT.encode() + frame(siu("C1")))
            proto.dataReceived(frame(siu("C2").replace(b"MSH", b"XXX", 1)))
            proto.dataReceived(frame(siu("C3") + b"NTE|" + PATIENT.encode() * 100))
        assert logs
        assert PATIENT not in repr(logs).replace("database is on fire", "")


# ============================================================================================== sender


class FakeHIS(Protocol):
    """A scripted MLLP peer (a real protocol on an iosim transport): records each message it receives and
    answers with whatever ``script(message)`` returns (a list of payloads; nothing = hold the answer)."""

    def __init__(self, world: World):
        self.world = world
        self.framer = MLLPFramer()

    def dataReceived(self, data):
        for payload in self.framer.feed(data):
            message = parse(payload)
            self.world.received.append(message)
            for answer in self.world.script(message):
                self.transport.write(frame(answer))

    def answer(self, payload: bytes):
        self.transport.write(frame(payload))


class World:
    """A MemoryReactorClock with a listener on port 2575 and an MLLPClient pointing at it."""

    def __init__(self, server_factory=None, script=lambda m: [ack_for(m)]):
        self.reactor = MemoryReactorClock()
        self.received: list[Message] = []
        self.script = script
        self.his: list[FakeHIS] = []
        if server_factory is None:
            world = self

            class HISFactory(Factory):
                def buildProtocol(self, addr):
                    p = FakeHIS(world)
                    world.his.append(p)
                    return p

            server_factory = HISFactory()
        TCP4ServerEndpoint(self.reactor, 2575).listen(server_factory)
        self.client = MLLPClient(self.reactor, TCP4ClientEndpoint(self.reactor, "127.0.0.1", 2575),
                                 clock=self.reactor, connect_timeout=5.0)
        self.completer = ConnectionCompleter(self.reactor)
        self.pumps = []

    def complete(self):
        pump = self.completer.succeedOnce()
        assert pump is not None, "no pending connection"
        self.pumps.append(pump)
        pump.flush()
        return pump

    def flush(self):
        for pump in self.pumps:
            pump.flush()


def test_matching_ack_fires_send():
    """send() opens the connection lazily, writes the frame, and fires with the parsed answer whose MSA-2
    equals the control id."""
    w = World()
    d = w.client.send(siu("G1"), "G1", timeout=10)
    assertNoResult(d)
    w.complete()
    message = successResultOf(d)
    assert read_ack(message)[:2] == ("AA", "G1")
    assert [m.control_id for m in w.received] == ["G1"]


def test_unmatched_msa2_is_ignored():
    """An answer whose MSA-2 is another control id (a late ACK for an earlier message) is logged as
    mllp.ack.unmatched and not taken as this message's answer; the matching one that follows is."""
    w = World(script=lambda m: [ack_for(m, control_id="OLD7"), ack_for(m)])
    with capture_logs() as logs:
        d = w.client.send(siu("G2"), "G2", timeout=10)
        w.complete()
    message = successResultOf(d)
    assert read_ack(message)[1] == "G2"
    [event] = events(logs, "mllp.ack.unmatched")
    assert event["control_id"] == "OLD7" and event["expected"] == "G2"


def test_only_unmatched_answer_means_timeout_and_disconnect():
    """With only a mismatching answer the send times out with AckTimeout, the connection is dropped, and a
    late matching answer on the old connection is not delivered to anyone."""
    w = World(script=lambda m: [ack_for(m, control_id="OTHER")])
    with capture_logs() as logs:
        d = w.client.send(siu("G3"), "G3", timeout=10)
        pump = w.complete()
        assertNoResult(d)
        w.reactor.advance(9.9)
        assertNoResult(d)
        w.reactor.advance(0.2)
        failure = failureResultOf(d, AckTimeout)
        assert failure.value.control_id == "G3"
        assert pump.clientIO.disconnecting
        w.his[0].answer(ack_for(w.received[0]))  # late answer on the dropped connection
        w.flush()
    assert events(logs, "mllp.ack.timeout")
    assert not w.client.connected


def test_timeout_then_next_send_uses_new_connection():
    """After a timeout the next send opens a fresh connection. Nothing arriving on the dropped connection
    is read - not even an answer carrying the new message's control id - and a late answer for the old
    message on the new connection is ignored (strict MSA-2 matching), never given to the new message."""
    held = []
    w = World(script=lambda m: held.append(m) or [])
    d1 = w.client.send(siu("G1"), "G1", timeout=5)
    w.complete()
    w.reactor.advance(5)
    failureResultOf(d1, AckTimeout)
    d2 = w.client.send(siu("G2"), "G2", timeout=5)
    w.complete()  # a second connection
    assert len(w.his) == 2
    with capture_logs() as logs:
        w.his[0].answer(ack_for(held[0], control_id="G2"))  # the dropped connection still talks
        w.flush()
        assertNoResult(d2)
        w.his[1].answer(ack_for(held[0]))  # G1's answer, late, on the new connection
        w.flush()
        assertNoResult(d2)
        w.his[1].answer(ack_for(held[1]))
        w.flush()
    assert read_ack(successResultOf(d2))[1] == "G2"
    assert [e["control_id"] for e in events(logs, "mllp.ack.unmatched")] == ["G1"]


def test_queued_sends_go_one_at_a_time_in_order():
    """Sends made while one is in flight (before and after the connection is up) are queued: the peer sees
    the next message only after the previous answer, and the results fire in order."""
    held = []
    w = World(script=lambda m: held.append(m) or [])
    ds = [w.client.send(siu("G0"), "G0", timeout=30), w.client.send(siu("G1"), "G1", timeout=30)]
    w.complete()
    ds.append(w.client.send(siu("G2"), "G2", timeout=30))  # connection up, G0 in flight
    w.flush()
    assert [m.control_id for m in w.received] == ["G0"]
    answered = []
    for i in range(3):
        for d in ds[i:]:  # the earlier ones have fired (read below as each does), these not yet
            assertNoResult(d)
        w.his[0].answer(ack_for(held[i]))
        w.flush()
        answered.append(successResultOf(ds[i]))
        assert [m.control_id for m in w.received] == [f"G{j}" for j in range(min(i + 2, 3))]
    assert [read_ack(a)[1] for a in answered] == ["G0", "G1", "G2"]


def test_connection_refused_gives_peer_unavailable_and_next_send_retries():
    """A refused connection fails the send with PeerUnavailable naming the reason, the message not written;
    the next send makes a new connection attempt."""
    w = World()
    d1 = w.client.send(siu("G1"), "G1", timeout=10)
    d2 = w.client.send(siu("G2"), "G2", timeout=10)
    with capture_logs() as logs:
        w.completer.failOnce(Failure(ConnectionRefusedError("nobody home")))
    failure = failureResultOf(d1, PeerUnavailable)
    assert "nobody home" in failure.value.reason
    assert failure.value.written is False
    assert events(logs, "mllp.client.connect_failed")
    assertNoResult(d2)
    w.complete()
    assert read_ack(successResultOf(d2))[1] == "G2"


def test_connect_timeout_gives_peer_unavailable():
    """A connection attempt that never completes fails the send with PeerUnavailable after
    connect_timeout, the message not written."""
    w = World()
    d = w.client.send(siu("G1"), "G1", timeout=10)
    with capture_logs():
        w.reactor.advance(5.1)
    failure = failureResultOf(d, PeerUnavailable)
    assert "timed out" in failure.value.reason
    assert failure.value.written is False


def test_connection_lost_before_answer_gives_peer_unavailable():
    """If the peer closes the connection before answering, the send fails with PeerUnavailable, the message
    written (the peer may have taken it); the next send reconnects."""
    w = World(script=lambda m: [])
    d = w.client.send(siu("G1"), "G1", timeout=10)
    pump = w.complete()
    with capture_logs():
        w.his[0].transport.loseConnection()
        pump.flush()
    failure = failureResultOf(d, PeerUnavailable)
    assert failure.value.written is True
    assert not w.client.connected
    w.script = lambda m: [ack_for(m)]
    d2 = w.client.send(siu("G2"), "G2", timeout=10)
    w.complete()
    successResultOf(d2)


class OnePerConnectionHIS(Protocol):
    """Like hl7apy's MLLPServer: reads one message, answers it, closes; reads nothing after that."""

    def __init__(self, world):
        self.world = world
        self.framer = MLLPFramer()
        self.done = False

    def dataReceived(self, data):
        if self.done:
            return
        for payload in self.framer.feed(data):
            message = parse(payload)
            self.world.received.append(message)
            self.transport.write(frame(ack_for(message)))
            self.done = True
            self.transport.loseConnection()
            return


def test_peer_that_closes_after_each_answer_gets_the_next_message_on_a_new_connection():
    """Engines that take one message per connection (hl7apy's MLLPServer) answer, then close. A message
    written on that connection before the close was seen is written again on a new connection, once, and
    the send succeeds - the relay never sees a failure. (A first exchange that loses its connection still
    fails: only a reused connection that went away silently is taken as stale.)"""
    holder = {}

    class OneFactory(Factory):
        def buildProtocol(self, addr):
            return OnePerConnectionHIS(holder["world"])

    w = World(server_factory=OneFactory())
    holder["world"] = w
    with capture_logs() as logs:
        ds = [w.client.send(siu(f"G{i}"), f"G{i}", timeout=10) for i in range(3)]
        for _ in range(3):
            w.complete()
            w.flush()
    assert [read_ack(successResultOf(d))[1] for d in ds] == ["G0", "G1", "G2"]
    assert [m.control_id for m in w.received] == ["G0", "G1", "G2"]
    assert [e["control_id"] for e in events(logs, "mllp.client.stale_connection")] == ["G1", "G2"]


def test_stale_connection_is_retried_only_once():
    """If the new connection is lost silently too, the send fails with PeerUnavailable."""
    w = World()
    with capture_logs():
        d1 = w.client.send(siu("G1"), "G1", timeout=10)
        pump = w.complete()
        successResultOf(d1)
        w.script = lambda m: []
        d2 = w.client.send(siu("G2"), "G2", timeout=10)
        pump.flush()
        w.his[0].transport.loseConnection()
        pump.flush()
        assertNoResult(d2)
        pump2 = w.complete()
        w.his[1].transport.loseConnection()
        pump2.flush()
    failureResultOf(d2, PeerUnavailable)


def test_unparseable_answer_gives_hl7error():
    """An answer that does not parse fails the in-flight send with Hl7Error."""
    w = World(script=lambda m: [b"NOT AN ACK"])
    d = w.client.send(siu("G1"), "G1", timeout=10)
    with capture_logs() as logs:
        w.complete()
    failure = failureResultOf(d, Hl7Error)
    assert failure.value.code == 100
    assert events(logs, "mllp.ack.unparseable")


def test_cancel_in_flight_send_drops_connection_and_moves_on():
    """Cancelling the in-flight send fails it with CancelledError, drops the connection, and the next
    queued send goes out on a new one."""
    w = World(script=lambda m: [])
    d1 = w.client.send(siu("G1"), "G1", timeout=10)
    d2 = w.client.send(siu("G2"), "G2", timeout=10)
    pump = w.complete()
    d1.cancel()
    failureResultOf(d1, defer.CancelledError)
    assert pump.clientIO.disconnecting
    w.script = lambda m: [ack_for(m)]
    w.flush()
    w.complete()
    assert read_ack(successResultOf(d2))[1] == "G2"


def test_close_fails_pending_sends():
    """close() fails in-flight and queued sends with PeerUnavailable (the one in flight written, the queued
    one not), closes the connection and fires when it is closed; later sends fail at once."""
    w = World(script=lambda m: [])
    d1 = w.client.send(siu("G1"), "G1", timeout=10)
    d2 = w.client.send(siu("G2"), "G2", timeout=10)
    pump = w.complete()
    closed = w.client.close()
    f1, f2 = failureResultOf(d1, PeerUnavailable), failureResultOf(d2, PeerUnavailable)
    assert (f1.value.written, f2.value.written) == (True, False)
    with capture_logs():
        pump.flush()
    assert successResultOf(closed) is None
    failureResultOf(w.client.send(siu("G3"), "G3", timeout=1), PeerUnavailable)


def test_client_and_listener_end_to_end():
    """Our sender against our listener (iosim): the listener hands the message to the handler, the handler's
    ACK reaches the sender, matched by MSA-2; a GB18030 message comes back as a GB18030 ACK."""
    factory = MLLPServerFactory(SyncHandler(), clock=task.Clock(), default_charset="gb18030")
    w = World(server_factory=factory)
    with capture_logs():
        d1 = w.client.send(siu("E1"), "E1", timeout=10)
        d2 = w.client.send(siu("E2", charset="GB 18030-2000").replace(b"Zhangsan", "张三".encode("gb18030")),
                           "E2", timeout=10)
        w.complete()
    a1, a2 = successResultOf(d1), successResultOf(d2)
    assert read_ack(a1)[:2] == ("AA", "E1")
    assert read_ack(a2)[:2] == ("AA", "E2") and a2.charset == "gb18030"
    assert factory.handler.seen == ["E1", "E2"]


@pytest.fixture(autouse=True)
def _reset_structlog():
    yield
    structlog.reset_defaults()
