"""Whatever bytes a peer throws at the listener: an answer (ACK or NAK) for every frame, or a close - never
an exception, never unbounded buffering. And a peer that sends without reading our answers cannot make us
buffer them: the listener is the transport's push producer and stops reading when the write buffer is full.

StringTransport + task.Clock only; hypothesis drives the bytes and how they are cut into reads.
"""

from __future__ import annotations

import itertools

import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from adapters.hl7.ack import read_ack
from adapters.hl7.er7 import Hl7Error, parse
from adapters.inner.framing import COMMIT_ACK, COMMIT_NAK, FrameTooLarge, MLLPFramer, frame
from adapters.inner.listener import MLLPServerFactory
from tests.unit.test_mllp_protocols import SyncHandler, siu

MAX = 600  # max_message_bytes of the listener under test: small, so oversize frames are common

# pieces that make the bytes interesting: framing bytes, commit blocks, message starts, whole messages
PIECES = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"\x0b", b"\x1c", b"\x0d", b"\x1c\x0d", b"\x0b\x06\x1c\x0d", b"\x0b\x15\x1c\x0d",
                     b"MSH|^~\\&|", b"MSH|^~\\&|A|B|C|D|20300101||SIU^S12|X1|P|2.5|||AL|NE", b"\r", b"\n",
                     b"\\X0D\\", b"\\E\\", "张三".encode("gb18030"), b"\xff\xfe", b"|" * 40]),
    st.builds(lambda i: frame(siu(f"P{i}")), st.integers(0, 999)),
    st.builds(lambda n: b"\x0bMSH|^~\\&|" + b"x" * n, st.integers(MAX - 20, MAX + 50)),
)


def expected_frames(chunks: list[bytes]) -> tuple[list[bytes], bool]:
    """What an independent framer finds in the same reads: the payloads before any oversize frame, and
    whether an oversize frame came. (Where a frame restarts with a new start byte depends on the cut: an
    unfinished frame abandoned by a restart within one read is junk, but over the cap if the read ends
    first. Either answer is right; the oracle sees the same reads.)"""
    framer = MLLPFramer(MAX)
    out: list[bytes] = []
    for chunk in chunks:
        try:
            out += framer.feed(chunk)
        except FrameTooLarge as exc:
            return out + exc.frames, True
    return out, False


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(PIECES, max_size=30).map(b"".join), st.data())
def test_any_bytes_get_answers_or_a_close_and_nothing_unbounded(data, draw):
    """Feed arbitrary bytes in arbitrary reads: no exception escapes; every complete frame (other than a
    commit block) gets exactly one answer, in order, that parses as an ACK (AA for a good SIU, AR/CR
    otherwise); an oversize frame gets an AR NAK and the connection is closed; the bytes held by the
    connection never exceed the size cap."""
    ids = (f"N{i}" for i in itertools.count())
    factory = MLLPServerFactory(SyncHandler(), clock=task.Clock(), max_message_bytes=MAX,
                                ack_control_id=lambda: next(ids), idle_timeout=30)
    addr = IPv4Address("TCP", "10.9.9.9", 5000)
    proto = factory.buildProtocol(addr)
    tr = StringTransport(peerAddress=addr)
    proto.makeConnection(tr)
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(data)), max_size=12)))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    with capture_logs():
        for chunk in chunks:
            proto.dataReceived(chunk)  # an exception here fails the test
            assert proto.buffered_bytes <= MAX
            assert proto._framer.pending <= MAX
    frames, too_large = expected_frames(chunks)
    messages = [f for f in frames if f not in (COMMIT_ACK, COMMIT_NAK)]
    answers = [parse(p) for p in MLLPFramer().feed(tr.value())]
    assert len(answers) == len(messages) + (1 if too_large else 0)
    for payload, answer in zip(messages, answers):
        try:
            control_id = parse(payload).control_id
        except Hl7Error:
            assert read_ack(answer)[0] in ("AR", "CR")  # a NAK, never silence
        else:
            assert read_ack(answer)[:2] == ("AA", control_id)  # what the handler answered
    if too_large:
        assert read_ack(answers[-1])[0] in ("AR", "CR") and tr.disconnecting
    else:
        assert not tr.disconnecting
    # the idle timer still closes a connection left hanging mid-frame
    factory.clock.advance(31)
    assert tr.disconnecting


class ReadNothingTransport(StringTransport):
    """A transport whose peer never reads: it calls its registered producer's pauseProducing once more than
    ``limit`` bytes wait, as Twisted's TCP transport does when its write buffer is full."""

    limit = 4096

    def write(self, data):
        super().write(data)
        if len(self.value()) > self.limit and self.producer is not None and not getattr(self, "_full", False):
            self._full = True
            self.producer.pauseProducing()

    def drain(self):
        self.clear()
        self._full = False
        self.producer.resumeProducing()


def test_a_peer_that_does_not_read_cannot_make_us_buffer_answers():
    """Thousands of tiny garbage frames from a peer that never reads our NAKs: once the write buffer is full
    the listener stops reading (TCP back-pressure) and stops handling the frames it already has; when the
    buffer drains it goes on where it stopped, answering every frame in order."""
    factory = MLLPServerFactory(SyncHandler(), clock=task.Clock(), idle_timeout=None)
    addr = IPv4Address("TCP", "10.9.9.9", 5001)
    proto = factory.buildProtocol(addr)
    tr = ReadNothingTransport(peerAddress=addr)
    proto.makeConnection(tr)
    assert tr.producer is proto and tr.streaming
    garbage = b"".join(frame(f"junk {i}".encode()) for i in range(2000))
    with capture_logs():
        proto.dataReceived(garbage)
        assert tr.producerState == "paused"
        written = len(tr.value())
        assert written < tr.limit + 1024  # the NAK that crossed the limit, nothing more
        handled = []
        for _ in range(10_000):
            handled += MLLPFramer().feed(tr.value())
            if not proto._queue:
                break
            tr.drain()
    assert len(handled) == 2000
    assert [read_ack(parse(p))[0] for p in handled] == ["AR"] * 2000
    tr.drain()
    assert tr.producerState == "producing"


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 64))
def test_junk_without_start_bytes_is_counted_not_kept(chunk_kib):
    """A stream with no start byte, however it is cut, is discarded as it arrives: nothing is buffered and
    one junk event is logged per read, by count only. (Without the junk limit, max_junk_bytes, which closes
    such a connection after 64 KiB: tests/unit/test_mllp_edge.py.)"""
    factory = MLLPServerFactory(SyncHandler(), clock=task.Clock(), idle_timeout=None, max_junk_bytes=None)
    proto = factory.buildProtocol(IPv4Address("TCP", "10.9.9.9", 5002))
    tr = StringTransport()
    proto.makeConnection(tr)
    junk = bytes(range(0x0C, 0x100)) * 16 * chunk_kib
    with capture_logs() as logs:
        for _ in range(4):
            proto.dataReceived(junk)
            assert proto.buffered_bytes == 0
    assert proto._framer.junk_bytes == 4 * len(junk) and tr.value() == b""
    assert [e["bytes"] for e in logs if e["event"] == "mllp.junk.discarded"] == [len(junk)] * 4


def teardown_function():
    structlog.reset_defaults()
