"""The MLLP listener: framing + parsing + hand-off. Decisions are the handler's.

(A little over 600 lines, on purpose: one connection's protocol, whose every failure path is listed below and
handled in one class beside the others; framing is in adapters/inner/framing.py, answers in adapters/hl7/ack.py.)

Each connection reads MLLP frames (`MLLPFramer`), parses each with `er7.parse`, and hands the `Message` to
the `MessageHandler`, whose answer is framed and written back: one payload (an encoded ACK built with
`build_ack`), several (enhanced mode: a commit ACK, then an application ACK), none (the sender asked for no
answer), or an `Answer` that also says whether the message was committed. Answers are written only when the
handler's Deferred fires, i.e. after the gateway committed the message ("acknowledge only after the chamber's
commit").

Options (`MLLPServerFactory`):

* ``release=2`` - MLLP release 2: before the handler's answers the listener writes a commit acknowledgement
  block ``<VT><0x06><FS><CR>`` when the message was committed, a negative one ``<VT><0x15><FS><CR>`` when it
  was not (not stored, refused without being stored, did not parse, too large, handler failed). Commit
  blocks the peer sends us (acknowledging our answers) are swallowed in either release.
* ``tls`` - an `IOpenSSLServerConnectionCreator` (e.g. `adapters.tls.server_options`, a
  ``CertificateOptions``): TLS is started on each connection before anything is read, so the listener works
  on any plain TCP endpoint; with ``requireCertificate`` a client without a certificate from the CA is
  refused at the handshake. ``on_tls_failure(peer, failure)`` is called for each handshake that fails with a
  TLS error (counted in the metrics); the connection is closed, log ``mllp.tls.handshake_failed``.
* ``idle_timeout``, ``frame_timeout``, ``tls_handshake_timeout``, ``max_junk_bytes`` - what a connection
  may hold without doing work (below). A connection is held by real work only: a frame answered, or one
  with the handler. Junk and commit blocks from the peer restart no timer.

Ordering: frames are handled one at a time per connection, in arrival order; pipelined frames wait in a
queue, so answers are never reordered. When more than `MLLPServerProtocol.max_pipelined` frames wait, the
transport is paused (TCP back-pressure) until the queue drains to half. The protocol is also the transport's
push producer: when the peer does not read our answers and the transport's write buffer fills, reading
and handling stop until it drains, so a peer that sends without reading cannot make us buffer answers.

Failure paths (each chosen on purpose and tested in tests/unit/test_mllp_protocols.py,
tests/unit/test_mllp_release2.py and, for slow and noisy peers, tests/unit/test_mllp_edge.py):

======================================  ================================================================
What happens                            What we do
======================================  ================================================================
frame does not parse (`Hl7Error`)       ``AR`` NAK (``CR`` when the salvaged MSH-15/16 say enhanced
                                        mode) built by `build_nak_for_unparseable` (MSA-2 = salvaged
                                        MSH-10, ERR with the parser's code/location), log
                                        ``mllp.frame.rejected``; keep the connection (the next frame may
                                        be fine). Release 2: a NAK block first.
parser raises anything else (a bug)     same, with ERR 207 ``internal error``; log ``mllp.parse.crashed``.
frame exceeds ``max_message_bytes``     frames completed before it are answered first; then ``AR`` NAK,
                                        ERR-3 **207** (table 0357 has no "too large" code; 207 says "this
                                        application cannot take it"), ERR-8 ``message exceeds N bytes``,
                                        MSA-2 salvaged from the frame's first bytes; log
                                        ``mllp.frame.too_large``; stop reading at once (nothing beyond the
                                        cap is buffered) and close after the NAK is written. AR, not AE:
                                        resending the same message cannot succeed.
a frame not ended ``frame_timeout``     (counted from its start byte; not while we stop reading because
after its start byte                    frames wait for the handler) frames completed before it are
                                        answered first; then, if its MSH-10 arrived whole, ``AE`` NAK
                                        (``CE`` if the salvaged MSH-15/16 say enhanced mode), ERR 207
                                        ``message not completed within N s; not stored, send it again``:
                                        AE, as the message itself may be fine; log ``mllp.frame.timeout``;
                                        close. Without a whole MSH-10 nothing is written: a half id would
                                        answer a message never sent.
handler raises / its Deferred fails     ``AE`` (the sender may retry; enhanced mode: ``CE`` if MSH-15
                                        asks for it), ERR 207 ``internal error``; if the failure is an
                                        `Hl7Error` its code, location and text are used instead. Log
                                        ``mllp.handler.failed`` at error level with the exception type and
                                        traceback. Connection kept. Release 2: a NAK block first.
handler returns something unusable      (not bytes / a list of bytes / an `Answer`, or containing
                                        0x0B/0x1C) as for a failing handler; log
                                        ``mllp.handler.bad_answer``.
our own answer path fails (a bug)       log ``mllp.answer.failed`` and close the connection: the sender
                                        then resends instead of waiting for an ACK that never comes.
answer ready after the peer left        log ``mllp.ack.undeliverable`` (the sender will resend; MSH-10
                                        dedupe is the handler's business). The handler is not cancelled.
no work for ``idle_timeout``            log ``mllp.connection.idle_timeout``; close. Work is a frame answered
                                        or with the handler; the timer does not run while a message is with
                                        the handler (the peer is waiting on us, not idle). When it runs out
                                        during a frame, that frame's deadline decides; if it ends without
                                        work (a commit block) the connection is closed then.
``tls_handshake_timeout`` without a     log ``mllp.tls.handshake_timeout``, count it like a failed handshake
finished TLS handshake                  (``on_tls_failure``); close.
a close, and the peer does not take     abort the connection ``abort_after`` (15 s) after the close: a peer
our last answers                        that does not read cannot hold it open.
``max_connections`` already open        log ``mllp.connection.refused``; close the new connection at
                                        once, before reading anything.
bytes outside frames                    discarded, counted, log ``mllp.junk.discarded`` (counts only); they
                                        restart no timer. More than ``max_junk_bytes`` since the last frame
                                        (abandoned frames count): frames before are answered, then log
                                        ``mllp.junk.too_much`` and close.
a commit block (0x06 / 0x15) arrives    swallowed (it acknowledges one of our answers), log
                                        ``mllp.commit.received`` at debug level.
======================================  ================================================================

Log events carry the peer and, where known, the control id (MSH-10) - never message contents.
"""

from __future__ import annotations

import codecs
import collections
import typing
import uuid
from dataclasses import dataclass
from datetime import datetime

import structlog
from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from adapters.hl7.ack import build_answers, build_nak_for_unparseable, salvage_control_id
from adapters.hl7.er7 import Hl7Error, Message, parse
from adapters.inner.framing import (
    COMMIT_ACK,
    COMMIT_ACK_BLOCK,
    COMMIT_NAK,
    COMMIT_NAK_BLOCK,
    FrameTooLarge,
    MLLPFramer,
    TooMuchJunk,
    frame,
)
from adapters.net import no_delay, peer_name

__all__ = ["Answer", "MLLPServerFactory", "MLLPServerProtocol", "MessageHandler"]

log = structlog.get_logger()


@dataclass(frozen=True)
class Answer:
    """A handler's answer to one message: the encoded payloads to write, in order (possibly none), and
    whether the message is committed (MLLP release 2 writes a commit block, or a negative one, before them).
    """

    payloads: tuple[bytes, ...] = ()
    committed: bool = True


class MessageHandler(typing.Protocol):
    """What the listener hands each parsed message to."""

    def handle(self, message: Message, peer: str) -> defer.Deferred | bytes | list[bytes] | Answer:
        """Return (or fire a Deferred with) the answer: one complete payload, unframed and encoded (an ACK
        built with `build_ack`); a list/tuple of them, written in order (possibly empty: nothing is written);
        or an `Answer`. Bytes and lists mean "committed". Fire only once the message is safely committed, or
        known not to be. Raising / failing makes the listener answer AE (CE) 207."""
        ...


def _as_answer(value: object) -> Answer | None:
    """The handler's return value as an `Answer`, or None when it is unusable."""
    if isinstance(value, Answer):
        payloads, committed = value.payloads, value.committed
    elif isinstance(value, (bytes, bytearray)):
        payloads, committed = (value,), True
    elif isinstance(value, (list, tuple)):
        payloads, committed = value, True
    else:
        return None
    if not all(isinstance(p, (bytes, bytearray)) for p in payloads):
        return None
    return Answer(tuple(bytes(p) for p in payloads), bool(committed))


def _default_control_id() -> str:
    return uuid.uuid4().hex[:20]


@dataclass(frozen=True)
class _Cut:
    """The end of a connection, queued behind the frames read before it (they are answered first): log
    ``event`` with ``fields``; when ``head`` (the first bytes of the frame we give up on) is not None, NAK it
    with ``error`` (``outcome`` as in `build_nak_for_unparseable`); then close."""

    event: str
    fields: dict
    head: bytes | None = None
    error: Hl7Error | None = None
    outcome: str = "rejected"


def _whole_fields(head: bytes) -> bytes:
    """The head of an unfinished frame without the field still arriving when its first segment has not
    ended: a half-arrived MSH-10 must not be echoed as if it were the sender's control id."""
    if b"\r" in head or b"\n" in head or len(head) < 4:
        return head
    return head[: head.rfind(head[3:4]) + 1]


@implementer(IPushProducer, IHandshakeListener)
class MLLPServerProtocol(Protocol):
    """One MLLP connection. Per-connection state only; everything else lives on the factory."""

    #: frames allowed to wait behind the one being handled before the transport is paused
    max_pipelined = 32
    #: seconds a connection we close gets to take our last answers before it is aborted (a peer that does
    #: not read would otherwise keep it open for ever)
    abort_after = 15.0

    def __init__(self, factory: MLLPServerFactory):
        self.factory = factory
        self.peer = "?"
        self._log = log
        self._framer = MLLPFramer(factory.max_message_bytes, factory.max_junk_bytes)
        self._queue: collections.deque[bytes | _Cut] = collections.deque()
        self._busy = False  # a message is with the handler
        self._pumping = False
        self._closing = False  # decided to close: read nothing more
        self._disconnected = False
        self._refused = False
        self._pause_reasons: set[str] = set()  # why reading is paused: pipeline | writes | closing
        self._timers: dict[str, object] = {}  # idle | frame | handshake | abort -> IDelayedCall
        self._tls = None  # None: no TLS; False: handshake under way; True: handshake completed

    @property
    def buffered_bytes(self) -> int:
        """Bytes this connection holds on to: the frame in progress and the frames waiting their turn."""
        return self._framer.pending + sum(len(i) for i in self._queue if isinstance(i, bytes))

    # ---------------------------------------------------------------------------------- connection

    def connectionMade(self) -> None:
        f = self.factory
        no_delay(self.transport)
        self.peer = peer_name(self.transport.getPeer())
        self._log = log.bind(peer=self.peer)
        if len(f.connections) >= f.max_connections:
            self._refused = True
            self._closing = True
            self._log.warning(
                "mllp.connection.refused", open_connections=len(f.connections), max_connections=f.max_connections
            )
            self.transport.loseConnection()
            return
        if f.tls is not None:
            self._tls = False
            self.transport.startTLS(f.tls)
            self._arm("handshake", f.tls_handshake_timeout, self._handshake_timeout)
        self.transport.registerProducer(self, True)
        f.connections.add(self)
        self._log.info("mllp.connection.opened", open_connections=len(f.connections), tls=f.tls is not None,
                       release=f.release)
        self._touch()

    # --------------------------------------------------------------- reading: pause, resume, produce

    def _pause(self, reason: str) -> None:
        if not self._pause_reasons and not self._disconnected:
            self.transport.pauseProducing()
        self._pause_reasons.add(reason)

    def _resume(self, reason: str) -> None:
        if reason not in self._pause_reasons:
            return
        self._pause_reasons.discard(reason)
        if not self._pause_reasons and not (self._closing or self._disconnected):
            self.transport.resumeProducing()

    def pauseProducing(self) -> None:
        """IPushProducer: the transport's write buffer is full (the peer is not reading our answers):
        stop reading and stop handling frames until it drains."""
        self._pause("writes")

    def resumeProducing(self) -> None:
        """IPushProducer: the write buffer drained."""
        self._resume("writes")
        self._pump()

    def stopProducing(self) -> None:
        """IPushProducer: the connection is going away."""
        self._closing = True

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: the TLS handshake succeeded."""
        self._tls = True
        self._disarm("handshake")

    def connectionLost(self, reason=None) -> None:
        self._disconnected = True
        for name in list(self._timers):
            self._disarm(name)
        if self._refused:
            return
        if self._tls is False and reason is not None and reason.check(SSL.Error):
            self._tls_failed(reason)
        self.factory.connections.discard(self)
        self._log.info(
            "mllp.connection.closed",
            reason=reason.getErrorMessage() if reason is not None else "",
            unanswered=sum(isinstance(i, bytes) for i in self._queue) + (1 if self._busy else 0),
            junk_bytes=self._framer.junk_bytes,
        )
        self._queue.clear()

    def _tls_failed(self, failure: Failure, event: str = "mllp.tls.handshake_failed", **fields) -> None:
        self._log.warning(event, error=failure.getErrorMessage()[:200], **fields)
        if self.factory.on_tls_failure is not None:
            self.factory.on_tls_failure(self.transport.getPeer(), failure)

    def dataReceived(self, data: bytes) -> None:
        if self._closing or self._disconnected:
            return
        f = self.factory
        junk_before = self._framer.junk_bytes
        cut = None
        try:
            frames = self._framer.feed(data)
        except FrameTooLarge as exc:
            frames = exc.frames
            cut = _Cut("mllp.frame.too_large", {"size_so_far": exc.size_so_far, "limit": f.max_message_bytes},
                       exc.head, Hl7Error(207, f"message exceeds {f.max_message_bytes} bytes"))
        except TooMuchJunk as exc:
            frames = exc.frames
            cut = _Cut("mllp.junk.too_much", {"junk_bytes": exc.junk_run, "max_junk_bytes": exc.max_junk})
        junk = self._framer.junk_bytes - junk_before
        if junk:
            self._log.warning("mllp.junk.discarded", bytes=junk, total=self._framer.junk_bytes)
        self._queue.extend(frames)
        if cut is not None:
            self._cut_after_queued(cut)
        else:
            if len(self._queue) > self.max_pipelined:
                self._pause("pipeline")
            self._follow_frame(started_again=any(p != COMMIT_ACK and p != COMMIT_NAK for p in frames))
        self._pump()

    def _cut_after_queued(self, cut: _Cut) -> None:
        """Read nothing more; answer the frames already queued, then ``cut``."""
        self._pause("closing")
        self._closing = True
        for name in ("idle", "frame"):
            self._disarm(name)
        self._queue.append(cut)

    # ------------------------------------------------------------------------------------- timers

    def _arm(self, name: str, delay: float | None, call: typing.Callable[[], None]) -> None:
        self._disarm(name)
        if delay:
            self._timers[name] = self.factory.clock.callLater(delay, self._fire, name, call)

    def _disarm(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _fire(self, name: str, call: typing.Callable[[], None]) -> None:
        del self._timers[name]
        call()

    def _touch(self) -> None:
        """Restart the idle timer after real work (the connection opened, a frame answered); it does not run
        while a message is with the handler. Nothing else restarts it: not junk, not commit blocks."""
        self._disarm("idle")
        if not (self._busy or self._closing or self._disconnected):
            self._arm("idle", self.factory.idle_timeout, self._idle_timeout)

    def _follow_frame(self, started_again: bool) -> None:
        """After a read: a frame in progress has ``frame_timeout`` from its start byte (``started_again``: an
        HL7 frame completed in this read, so the one in progress started in it); with none, no deadline. A
        commit block completing does not give the next frame more time."""
        if not self._framer.in_frame:
            self._disarm("frame")
        elif started_again or "frame" not in self._timers:
            self._arm("frame", self.factory.frame_timeout, self._frame_timeout)

    def _idle_timeout(self) -> None:
        """Close, unless a frame is arriving: it has its own deadline, and if it brings no work the
        connection is closed as idle once it has ended (`_pump`)."""
        if self._framer.in_frame and "frame" in self._timers:
            return
        self._log.info("mllp.connection.idle_timeout", idle_timeout=self.factory.idle_timeout)
        self._close()

    def _frame_timeout(self) -> None:
        """The frame in progress did not end in time: NAK it if its MSH-10 arrived whole, after the frames
        queued before it; close. While we do not read (frames wait for the handler) the peer cannot finish
        it: the deadline starts again instead."""
        timeout = self.factory.frame_timeout
        if "pipeline" in self._pause_reasons:
            self._arm("frame", timeout, self._frame_timeout)
            return
        head = _whole_fields(self._framer.head())
        control_id = salvage_control_id(head)
        self._cut_after_queued(_Cut(
            "mllp.frame.timeout", {"frame_timeout": timeout, "bytes": self._framer.pending},
            head if control_id else None,
            Hl7Error(207, f"message not completed within {timeout:g} s; not stored, send it again"), "not_stored"))
        self._pump()

    def _handshake_timeout(self) -> None:
        timeout = self.factory.tls_handshake_timeout
        self._tls_failed(Failure(TimeoutError(f"no TLS handshake within {timeout:g} s")),
                         "mllp.tls.handshake_timeout", tls_handshake_timeout=timeout)
        self._tls = None  # counted once: the close that follows is not another failure
        self._close()

    def _close(self) -> None:
        """Close after our last answers are written; abort if the peer has not taken them ``abort_after``
        seconds later."""
        self._closing = True
        if not self._disconnected:
            self.transport.loseConnection()
            self._arm("abort", self.abort_after, self.transport.abortConnection)

    # ---------------------------------------------------------------------------------------- work

    def _pump(self) -> None:
        """Start on queued frames while nothing is with the handler. Re-entrant calls (a handler that
        answers synchronously) return at once; the outer loop continues, so the stack stays flat."""
        if self._pumping:
            return
        self._pumping = True
        worked = False
        try:
            while (not self._busy and self._queue and not self._disconnected
                   and "writes" not in self._pause_reasons):
                item = self._queue.popleft()
                if isinstance(item, _Cut):
                    self._cut(item)
                    self._queue.clear()
                    return
                worked = self._handle_frame(item) or worked
        finally:
            self._pumping = False
        if len(self._queue) <= self.max_pipelined // 2:
            self._resume("pipeline")
        if worked:
            self._touch()
        elif self.factory.idle_timeout and "idle" not in self._timers and not (
                self._busy or self._closing or self._disconnected or self._queue or self._framer.in_frame):
            self._idle_timeout()  # it ran out while a frame was arriving, and that frame brought no work

    def _handle_frame(self, payload: bytes) -> bool:
        """Answer one frame, or hand it to the handler. False for a commit block: no work for us."""
        f = self.factory
        if payload == COMMIT_ACK or payload == COMMIT_NAK:
            # MLLP release 2: the peer acknowledges one of our answers. Nothing to answer.
            self._log.debug("mllp.commit.received", commit="ack" if payload == COMMIT_ACK else "nak")
            return False
        try:
            message = parse(payload, f.default_charset)
        except Hl7Error as err:
            self._reject(payload, err)
            return True
        except Exception:  # noqa: BLE001 - a parser bug must still produce a NAK
            self._log.exception("mllp.parse.crashed", control_id=salvage_control_id(payload))
            self._reject(payload, Hl7Error(207, "internal error"))
            return True
        self._busy = True
        self._disarm("idle")
        d = defer.maybeDeferred(f.handler.handle, message, self.peer)
        d.addCallbacks(self._answer, self._handler_failed, callbackArgs=(message,), errbackArgs=(message,))
        d.addErrback(self._answer_failed, message)
        d.addBoth(self._done)
        return True

    def _answer(self, value: object, message: Message) -> None:
        answer = _as_answer(value)
        if answer is None:
            self._log.error(
                "mllp.handler.bad_answer", control_id=message.control_id, answer_type=type(value).__name__
            )
            self._send_error_ack(message, Hl7Error(207, "internal error"))
            return
        try:
            framed = [frame(p) for p in answer.payloads]
        except ValueError:
            self._log.error("mllp.handler.bad_answer", control_id=message.control_id, answer_type="unframeable")
            self._send_error_ack(message, Hl7Error(207, "internal error"))
            return
        self._write_commit(answer.committed, message.control_id)
        for block in framed:
            self._write(block, message.control_id)
        if not framed:
            self._log.debug("mllp.ack.none", control_id=message.control_id)

    def _handler_failed(self, failure, message: Message) -> None:
        self._log.error(
            "mllp.handler.failed",
            control_id=message.control_id,
            error_type=failure.type.__name__ if failure.type else "?",
            exc_info=failure.value,
        )
        value = failure.value
        self._send_error_ack(message, value if isinstance(value, Hl7Error) else Hl7Error(207, "internal error"))

    def _send_error_ack(self, message: Message, error: Hl7Error) -> None:
        """The message is not known to be stored: AE (original mode) / CE (enhanced, if MSH-15 asks)."""
        f = self.factory
        answers = build_answers(
            message,
            "not_stored",
            error=error,
            sending_application=f.sending_application,
            sending_facility=f.sending_facility,
            control_id=f.ack_control_id,
            now=self._now(),
        )
        self._write_commit(False, message.control_id)
        for ack in answers:
            self._write(frame(ack), message.control_id)

    def _answer_failed(self, failure, message: Message) -> None:
        self._log.error(
            "mllp.answer.failed",
            control_id=message.control_id,
            error_type=failure.type.__name__ if failure.type else "?",
            exc_info=failure.value,
        )
        self._close()

    def _done(self, _result: object) -> None:
        self._busy = False
        self._touch()  # an answer was written
        self._pump()

    def _write(self, framed: bytes, control_id: str) -> None:
        if self._disconnected:
            self._log.warning("mllp.ack.undeliverable", control_id=control_id)
            return
        self.transport.write(framed)
        self._log.debug("mllp.ack.sent", control_id=control_id, bytes=len(framed))

    def _write_commit(self, committed: bool, control_id: str) -> None:
        """MLLP release 2: the commit acknowledgement block (or the negative one) for one message."""
        if self.factory.release != 2 or self._disconnected:
            return
        self.transport.write(COMMIT_ACK_BLOCK if committed else COMMIT_NAK_BLOCK)
        self._log.debug("mllp.commit.sent", control_id=control_id, commit="ack" if committed else "nak")

    def _nak(self, raw: bytes, error: Hl7Error, outcome: str = "rejected") -> bytes:
        f = self.factory
        return build_nak_for_unparseable(
            raw,
            error,
            sending_application=f.sending_application,
            sending_facility=f.sending_facility,
            control_id=f.ack_control_id(),
            now=self._now(),
            default_charset=f.default_charset,
            outcome=outcome,
        )

    def _reject(self, payload: bytes, error: Hl7Error) -> None:
        control_id = salvage_control_id(payload)
        self._log.warning(
            "mllp.frame.rejected",
            control_id=control_id,
            code=error.code,
            location=error.location,
            reason=error.text,
            bytes=len(payload),
        )
        self._write_commit(False, control_id)
        self._write(frame(self._nak(payload, error)), control_id)

    def _cut(self, cut: _Cut) -> None:
        control_id = salvage_control_id(cut.head) if cut.head is not None else ""
        self._log.warning(cut.event, control_id=control_id, **cut.fields)
        if cut.head is not None:
            self._write_commit(False, control_id)
            self._write(frame(self._nak(cut.head, cut.error, cut.outcome)), control_id)
        self._close()

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.factory.clock.seconds())


class MLLPServerFactory(Factory):
    """Builds one `MLLPServerProtocol` per connection; holds configuration and the open connections.

    ``handler``: a `MessageHandler`. ``clock``: an IReactorTime (the reactor in production, a
    ``task.Clock`` in tests). ``ack_control_id``: callable giving the
    MSH-10 of ACKs/NAKs the listener writes itself (default: 20 hex chars of a uuid4). ``idle_timeout``,
    ``frame_timeout``, ``tls_handshake_timeout`` and ``max_junk_bytes``: None or 0 disables them (see the
    module docstring). ``release``: 1 (default) or 2 (commit acknowledgement blocks, see the
    module docstring). ``tls``: None, or a server connection creator / ``CertificateOptions`` started on
    every connection (`adapters.tls.server_options` builds one from PEM files).
    """

    protocol = MLLPServerProtocol

    def __init__(
        self,
        handler: MessageHandler,
        *,
        max_message_bytes: int = 1 << 20,
        default_charset: str = "utf-8",
        idle_timeout: float | None = 300.0,
        frame_timeout: float | None = 30.0,
        max_junk_bytes: int | None = 65536,
        tls_handshake_timeout: float | None = 10.0,
        max_connections: int = 64,
        sending_application: str = "GATEWAYD",
        sending_facility: str = "",
        clock: IReactorTime,
        ack_control_id: typing.Callable[[], str] | None = None,
        release: int = 1,
        tls: object | None = None,
        on_tls_failure: typing.Callable[[object, object], None] | None = None,
    ):
        try:
            codecs.lookup(default_charset)
        except LookupError:
            raise ValueError(f"unknown default charset {default_charset!r}") from None
        if max_message_bytes < 1 or max_connections < 1:
            raise ValueError("max_message_bytes and max_connections must be positive")
        if release not in (1, 2):
            raise ValueError(f"MLLP release must be 1 or 2, not {release!r}")
        self.handler = handler
        self.max_message_bytes = max_message_bytes
        self.default_charset = default_charset
        self.idle_timeout = idle_timeout
        self.frame_timeout = frame_timeout
        self.max_junk_bytes = max_junk_bytes or None
        self.tls_handshake_timeout = tls_handshake_timeout
        self.max_connections = max_connections
        self.sending_application = sending_application
        self.sending_facility = sending_facility
        self.clock = clock
        self.ack_control_id = ack_control_id or _default_control_id
        self.release = release
        self.tls = tls
        self.on_tls_failure = on_tls_failure  # called with (peer address, Failure) for a failed handshake
        self.connections: set[MLLPServerProtocol] = set()

    def buildProtocol(self, addr) -> MLLPServerProtocol:
        return self.protocol(self)
