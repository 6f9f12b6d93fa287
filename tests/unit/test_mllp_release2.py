"""MLLP release 2 (commit acknowledgement blocks <VT>0x06<FS><CR> / <VT>0x15<FS><CR>) on the listener and
the sender. No reactor: StringTransport + task.Clock for the listener, iosim for the sender."""

from __future__ import annotations

import pytest
import structlog
from structlog.testing import capture_logs
from twisted.internet import defer, task
from twisted.internet.protocol import Factory, Protocol

from adapters.hl7.ack import read_ack
from adapters.hl7.er7 import parse
from adapters.inner.client import MLLPClient, NegativeCommit, PeerUnavailable
from adapters.inner.framing import (
    COMMIT_ACK,
    COMMIT_ACK_BLOCK,
    COMMIT_NAK,
    COMMIT_NAK_BLOCK,
    MLLPFramer,
    frame,
)
from adapters.inner.listener import Answer, MLLPServerFactory
from tests.deferreds import assertNoResult, failureResultOf, successResultOf
from tests.unit.test_hl7_enhanced_ack import Gate
from tests.unit.test_hl7_enhanced_ack import siu as gate_siu
from tests.unit.test_mllp_protocols import HeldHandler, Server, SyncHandler, World, ack_for, siu


def blocks(transport) -> list[bytes]:
    """Every frame payload written so far (commit blocks are the one-byte payloads 0x06 / 0x15)."""
    return MLLPFramer().feed(transport.value())


def kinds(transport) -> list[str]:
    out = []
    for p in blocks(transport):
        out.append({COMMIT_ACK: "ACK-BLOCK", COMMIT_NAK: "NAK-BLOCK"}.get(p) or read_ack(parse(p))[0])
    return out


# ============================================================================================ listener


def test_release2_listener_writes_commit_block_after_commit_then_the_ack():
    """With release=2 nothing is written while the handler holds the message; when it fires (committed),
    the commit block 0x06 comes first, then the HL7 ACK."""
    server = Server(HeldHandler(), release=2)
    proto, tr = server.connect()
    proto.dataReceived(frame(siu("C1")))
    assert tr.value() == b""
    server.handler.release(0)
    assert tr.value().startswith(COMMIT_ACK_BLOCK)
    assert kinds(tr) == ["ACK-BLOCK", "AA"]


def test_release1_listener_writes_no_commit_blocks():
    server = Server(SyncHandler())
    proto, tr = server.connect()
    proto.dataReceived(frame(siu("C1")))
    assert kinds(tr) == ["AA"]


class AnswerHandler:
    def __init__(self, answer):
        self.answer = answer

    def handle(self, message, peer):
        return self.answer(message)


def test_release2_uncommitted_answer_gets_negative_block():
    """An Answer(committed=False) (e.g. the chamber could not store it) gets the NAK block 0x15 first."""
    server = Server(AnswerHandler(lambda m: Answer((ack_for(m, "AE"),), committed=False)), release=2)
    proto, tr = server.connect()
    proto.dataReceived(frame(siu("C1")))
    assert kinds(tr) == ["NAK-BLOCK", "AE"]


def test_release2_commit_block_even_when_no_hl7_answer_is_asked_for():
    """A message that asks for no HL7 answer still gets its commit block: release 2's promise is about
    storage, not about HL7 acknowledgement."""
    server = Server(AnswerHandler(lambda m: []), release=2)
    proto, tr = server.connect()
    proto.dataReceived(frame(siu("C1")))
    assert tr.value() == COMMIT_ACK_BLOCK


def test_release2_failures_get_negative_blocks():
    """Handler failure, a frame that does not parse, and an oversize frame: each gets 0x15 before its NAK
    (nothing was stored); the oversize one then closes the connection."""
    failing = Server(AnswerHandler(lambda m: defer.fail(RuntimeError("boom"))), release=2)
    proto, tr = failing.connect()
    with capture_logs():
        proto.dataReceived(frame(siu("C1")))
        proto.dataReceived(frame(b"not HL7"))
    assert kinds(tr) == ["NAK-BLOCK", "AE", "NAK-BLOCK", "AR"]
    small = Server(SyncHandler(), release=2, max_message_bytes=100)
    proto, tr = small.connect()
    with capture_logs():
        proto.dataReceived(frame(siu("BIG")))
    assert kinds(tr) == ["NAK-BLOCK", "AR"] and tr.disconnecting


def test_inner_gate_release2_reports_what_the_chamber_holds(tmp_path):
    """Through the real inner gate and chamber: a committed SIU gets 0x06 then AA; a refused SIU that is
    stored (for an operator to reprocess) gets 0x06 then AE; a reused control id, not stored, gets 0x15
    then AR."""
    gate = Gate(tmp_path, release=2)
    try:
        for payload, expected in [
            (gate_siu("R1"), ["ACK-BLOCK", "AA"]),
            (gate_siu("R2", schedule=""), ["ACK-BLOCK", "AE"]),
            (gate_siu("R1", schedule="D009"), ["NAK-BLOCK", "AR"]),
        ]:
            gate.send(payload)
            assert kinds(gate.tr) == expected
    finally:
        gate.close()


@pytest.mark.parametrize("release", [1, 2])
def test_commit_blocks_from_the_peer_are_swallowed(release):
    """The peer's commit blocks (acknowledging our answers) are not messages: no NAK for them, in either
    release, and the frame after them is handled."""
    server = Server(SyncHandler(), release=release)
    proto, tr = server.connect()
    proto.dataReceived(COMMIT_ACK_BLOCK + COMMIT_NAK_BLOCK + frame(siu("C2")))
    assert [k for k in kinds(tr) if k != "ACK-BLOCK"] == ["AA"]
    assert server.handler.seen == ["C2"]


def test_release_must_be_1_or_2():
    with pytest.raises(ValueError):
        MLLPServerFactory(SyncHandler(), clock=task.Clock(), release=3)
    with pytest.raises(ValueError):
        MLLPClient(None, None, clock=task.Clock(), release=0)


# ============================================================================================== sender


class R2Peer(Protocol):
    """A scripted release 2 peer: records every frame payload it receives (``raw``) and answers each HL7
    message with ``script(message)`` (payloads; COMMIT_ACK / COMMIT_NAK give commit blocks)."""

    def __init__(self, script, raw: list[bytes]):
        self.script = script
        self.raw = raw
        self.framer = MLLPFramer()

    def dataReceived(self, data):
        for payload in self.framer.feed(data):
            self.raw.append(payload)
            if payload in (COMMIT_ACK, COMMIT_NAK):
                continue
            for answer in self.script(parse(payload)):
                self.transport.write(frame(answer))

    def answer(self, payload: bytes):
        self.transport.write(frame(payload))


def r2_world(script) -> World:
    peers: list[R2Peer] = []
    raw: list[bytes] = []

    class PeerFactory(Factory):
        def buildProtocol(self, addr):
            peer = R2Peer(script, raw)
            peers.append(peer)
            return peer

    w = World(server_factory=PeerFactory())
    w.his, w.raw = peers, raw
    w.client = MLLPClient(w.reactor, w.client.endpoint, clock=w.reactor, release=2)
    return w


def test_release2_sender_gets_answer_after_commit_block_and_acknowledges_it():
    """The peer sends 0x06 then its ACK: the send fires with the ACK, and the sender writes a commit block
    back for the ACK (the peer's content), after which the next message follows."""
    w = r2_world(lambda m: [COMMIT_ACK, ack_for(m)])
    d1 = w.client.send(siu("G1"), "G1", timeout=10)
    d2 = w.client.send(siu("G2"), "G2", timeout=10)
    w.complete()
    w.flush()
    assert [read_ack(successResultOf(d))[:2] for d in (d1, d2)] == [("AA", "G1"), ("AA", "G2")]
    assert w.raw == [siu("G1"), COMMIT_ACK, siu("G2"), COMMIT_ACK]


def test_negative_commit_fails_the_send_and_the_next_goes_on():
    """0x15 from the peer fails the send with NegativeCommit (a PeerUnavailable, so the relay resends
    later); the connection stays and the next send is answered."""
    w = r2_world(lambda m: [COMMIT_NAK] if m.control_id == "G1" else [COMMIT_ACK, ack_for(m)])
    with capture_logs() as logs:
        d1 = w.client.send(siu("G1"), "G1", timeout=10)
        d2 = w.client.send(siu("G2"), "G2", timeout=10)
        w.complete()
    failure = failureResultOf(d1, NegativeCommit)
    assert failure.check(PeerUnavailable)
    assert read_ack(successResultOf(d2))[1] == "G2"
    assert len(w.his) == 1
    assert next(e for e in logs if e["event"] == "mllp.commit.refused")["control_id"] == "G1"


def test_until_commit_fires_at_the_commit_block():
    """send(until='commit') fires with None at 0x06, without waiting for an HL7 answer."""
    w = r2_world(lambda m: [COMMIT_ACK])
    d = w.client.send(siu("G1"), "G1", timeout=10, until="commit")
    w.complete()
    assert successResultOf(d) is None


def test_until_commit_needs_release2():
    w = World()
    with pytest.raises(ValueError):
        w.client.send(siu("G1"), "G1", timeout=10, until="commit")


def test_late_commit_block_is_never_taken_for_the_next_message():
    """A peer that writes its ACK before the commit block: the late 0x06 is counted off against the message
    already answered, and the next message (sent until='commit') waits for its own block."""
    held = []
    w = r2_world(lambda m: held.append(m) or [])
    d1 = w.client.send(siu("G1"), "G1", timeout=10)
    pump = w.complete()
    with capture_logs() as logs:
        w.his[0].answer(ack_for(held[0]))
        pump.flush()
        assert read_ack(successResultOf(d1))[1] == "G1"
        d2 = w.client.send(siu("G2"), "G2", timeout=10, until="commit")
        pump.flush()
        w.his[0].answer(COMMIT_ACK)  # G1's block, late
        pump.flush()
        assertNoResult(d2)
        w.his[0].answer(COMMIT_ACK)  # G2's block
        pump.flush()
    assert successResultOf(d2) is None
    assert [e["event"] for e in logs if e["event"].startswith("mllp.commit")] == [
        "mllp.commit.late", "mllp.commit.received"]


def test_release1_sender_ignores_commit_blocks():
    """A release 1 sender logs a commit block from the peer (a configuration mismatch) and keeps waiting
    for the HL7 answer; a stray 0x15 does not fail the send."""
    w = World(script=lambda m: [COMMIT_NAK, ack_for(m)])
    with capture_logs() as logs:
        d = w.client.send(siu("G1"), "G1", timeout=10)
        w.complete()
    assert read_ack(successResultOf(d))[:2] == ("AA", "G1")
    assert [e for e in logs if e["event"] == "mllp.commit.unexpected"]


def test_release2_sender_and_listener_together():
    """Our release 2 sender against our release 2 listener: each send is committed and answered; the
    sender's commit blocks for the ACKs are swallowed by the listener (no NAK comes back for them)."""
    factory = MLLPServerFactory(SyncHandler(), clock=task.Clock(), release=2)
    w = World(server_factory=factory)
    w.client = MLLPClient(w.reactor, w.client.endpoint, clock=w.reactor, release=2)
    with capture_logs() as logs:
        ds = [w.client.send(siu(f"E{i}"), f"E{i}", timeout=10) for i in range(3)]
        w.complete()
        w.flush()
    assert [read_ack(successResultOf(d))[:2] for d in ds] == [("AA", f"E{i}") for i in range(3)]
    assert factory.handler.seen == ["E0", "E1", "E2"]
    assert not [e for e in logs if e["event"] in ("mllp.frame.rejected", "mllp.commit.unmatched",
                                                  "mllp.ack.unmatched")]


@pytest.fixture(autouse=True)
def _reset_structlog():
    yield
    structlog.reset_defaults()
