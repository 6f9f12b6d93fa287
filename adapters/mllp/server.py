"""The MLLP listener: framing + parsing + hand-off. Decisions are the handler's.

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
* ``tls`` - an `IOpenSSLServerConnectionCreator` (e.g. `adapters.mllp.tls.server_options`, a
  ``CertificateOptions``): TLS is started on each connection before anything is read, so the listener works
  on any plain TCP endpoint; with ``requireCertificate`` a client without a certificate from the CA is
  refused at the handshake. ``on_tls_failure(peer, failure)`` is called for each handshake that fails with a
  TLS error (counted in the metrics); the connection is closed, log ``mllp.tls.handshake_failed``.

Ordering: frames are handled one at a time per connection, in arrival order; pipelined frames wait in a
queue, so answers are never reordered. When more than `MLLPServerProtocol.max_pipelined` frames wait, the
transport is paused (TCP back-pressure) until the queue drains to half. The protocol is also the transport's
push producer: when the peer does not read our answers and the transport's write buffer fills, reading
and handling stop until it drains, so a peer that sends without reading cannot make us buffer answers.

Failure paths (each chosen on purpose and tested in tests/unit/test_mllp_protocols.py and
tests/unit/test_mllp_release2.py):

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
no bytes in or out for ``idle_timeout``  log ``mllp.connection.idle_timeout``; close. The timer does not
                                        run while a message is with the handler (the peer is waiting on
                                        us, not idle). ``idle_timeout=None`` disables it.
``max_connections`` already open        log ``mllp.connection.refused``; close the new connection at
                                        once, before reading anything.
bytes outside frames                    discarded, counted, log ``mllp.junk.discarded`` (counts only).
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
from zope.interface import implementer

from adapters.hl7.ack import build_answers, build_nak_for_unparseable, salvage_control_id
from adapters.hl7.er7 import Hl7Error, Message, parse
from adapters.mllp.framing import (
    COMMIT_ACK,
    COMMIT_ACK_BLOCK,
    COMMIT_NAK,
    COMMIT_NAK_BLOCK,
    FrameTooLarge,
    MLLPFramer,
    frame,
)

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


def no_delay(transport) -> None:
    """Frames are small and answered one by one: without TCP_NODELAY, Nagle's algorithm meets the
    peer's delayed ACK and each exchange can stall ~40 ms."""
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:
            pass


def peer_name(address: object) -> str:
    """``host:port`` for IP addresses, ``str(address)`` otherwise."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


@implementer(IPushProducer, IHandshakeListener)
class MLLPServerProtocol(Protocol):
    """One MLLP connection. Per-connection state only; everything else lives on the factory."""

    #: frames allowed to wait behind the one being handled before the transport is paused
    max_pipelined = 32

    def __init__(self, factory: MLLPServerFactory):
        self.factory = factory
        self.peer = "?"
        self._log = log
        self._framer = MLLPFramer(factory.max_message_bytes)
        self._queue: collections.deque[bytes | FrameTooLarge] = collections.deque()
        self._busy = False  # a message is with the handler
        self._pumping = False
        self._closing = False  # decided to close: read nothing more
        self._disconnected = False
        self._refused = False
        self._pause_reasons: set[str] = set()  # why reading is paused: pipeline | writes | closing
        self._idle_call = None
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

    def connectionLost(self, reason=None) -> None:
        self._disconnected = True
        self._cancel_idle()
        if self._refused:
            return
        if self._tls is False and reason is not None and reason.check(SSL.Error):
            self._log.warning("mllp.tls.handshake_failed", error=reason.getErrorMessage()[:200])
            if self.factory.on_tls_failure is not None:
                self.factory.on_tls_failure(self.transport.getPeer(), reason)
        self.factory.connections.discard(self)
        self._log.info(
            "mllp.connection.closed",
            reason=reason.getErrorMessage() if reason is not None else "",
            unanswered=len(self._queue) + (1 if self._busy else 0),
            junk_bytes=self._framer.junk_bytes,
        )
        self._queue.clear()

    def dataReceived(self, data: bytes) -> None:
        if self._closing or self._disconnected:
            return
        junk_before = self._framer.junk_bytes
        too_large = None
        try:
            frames = self._framer.feed(data)
        except FrameTooLarge as exc:
            frames, too_large = exc.frames, exc
        junk = self._framer.junk_bytes - junk_before
        if junk:
            self._log.warning("mllp.junk.discarded", bytes=junk, total=self._framer.junk_bytes)
        self._queue.extend(frames)
        if too_large is not None:
            self._pause("closing")  # read nothing more; we close after the NAK
            self._closing = True
            self._queue.append(too_large)
        elif len(self._queue) > self.max_pipelined:
            self._pause("pipeline")
        self._touch()
        self._pump()

    # ------------------------------------------------------------------------------------- idle timer

    def _cancel_idle(self) -> None:
        if self._idle_call is not None:
            if self._idle_call.active():
                self._idle_call.cancel()
            self._idle_call = None

    def _touch(self) -> None:
        """Restart the idle timer; it runs only while nothing is with the handler."""
        self._cancel_idle()
        timeout = self.factory.idle_timeout
        if timeout and not (self._busy or self._closing or self._disconnected):
            self._idle_call = self.factory.clock.callLater(timeout, self._idle_timeout)

    def _idle_timeout(self) -> None:
        self._idle_call = None
        self._closing = True
        self._log.info("mllp.connection.idle_timeout", idle_timeout=self.factory.idle_timeout)
        self.transport.loseConnection()

    # ---------------------------------------------------------------------------------------- work

    def _pump(self) -> None:
        """Start on queued frames while nothing is with the handler. Re-entrant calls (a handler that
        answers synchronously) return at once; the outer loop continues, so the stack stays flat."""
        if self._pumping:
            return
        self._pumping = True
        try:
            while (not self._busy and self._queue and not self._disconnected
                   and "writes" not in self._pause_reasons):
                item = self._queue.popleft()
                if isinstance(item, FrameTooLarge):
                    self._reject_too_large(item)
                    self._queue.clear()
                    break
                self._handle_frame(item)
        finally:
            self._pumping = False
        if len(self._queue) <= self.max_pipelined // 2:
            self._resume("pipeline")

    def _handle_frame(self, payload: bytes) -> None:
        f = self.factory
        if payload == COMMIT_ACK or payload == COMMIT_NAK:
            # MLLP release 2: the peer acknowledges one of our answers. Nothing to answer.
            self._log.debug("mllp.commit.received", commit="ack" if payload == COMMIT_ACK else "nak")
            return
        try:
            message = parse(payload, f.default_charset)
        except Hl7Error as err:
            self._reject(payload, err)
            return
        except Exception:  # noqa: BLE001 - a parser bug must still produce a NAK
            self._log.exception("mllp.parse.crashed", control_id=salvage_control_id(payload))
            self._reject(payload, Hl7Error(207, "internal error"))
            return
        self._busy = True
        self._cancel_idle()
        d = defer.maybeDeferred(f.handler.handle, message, self.peer)
        d.addCallbacks(self._answer, self._handler_failed, callbackArgs=(message,), errbackArgs=(message,))
        d.addErrback(self._answer_failed, message)
        d.addBoth(self._done)

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
        self._closing = True
        if not self._disconnected:
            self.transport.loseConnection()

    def _done(self, _result: object) -> None:
        self._busy = False
        self._pump()
        self._touch()  # re-arms only if nothing new went to the handler

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

    def _nak(self, raw: bytes, error: Hl7Error) -> bytes:
        f = self.factory
        return build_nak_for_unparseable(
            raw,
            error,
            sending_application=f.sending_application,
            sending_facility=f.sending_facility,
            control_id=f.ack_control_id(),
            now=self._now(),
            default_charset=f.default_charset,
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

    def _reject_too_large(self, exc: FrameTooLarge) -> None:
        control_id = salvage_control_id(exc.head)
        limit = self.factory.max_message_bytes
        self._log.warning("mllp.frame.too_large", control_id=control_id, size_so_far=exc.size_so_far, limit=limit)
        error = Hl7Error(207, f"message exceeds {limit} bytes")
        self._write_commit(False, control_id)
        self._write(frame(self._nak(exc.head, error)), control_id)
        self._closing = True
        self._cancel_idle()
        self.transport.loseConnection()

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.factory.clock.seconds())


class MLLPServerFactory(Factory):
    """Builds one `MLLPServerProtocol` per connection; holds configuration and the open connections.

    ``handler``: a `MessageHandler`. ``clock``: an IReactorTime (the reactor in production, a
    ``task.Clock`` in tests); when None the global reactor is used. ``ack_control_id``: callable giving the
    MSH-10 of ACKs/NAKs the listener writes itself (default: 20 hex chars of a uuid4). ``idle_timeout``
    None or 0 disables the idle timer. ``release``: 1 (default) or 2 (commit acknowledgement blocks, see the
    module docstring). ``tls``: None, or a server connection creator / ``CertificateOptions`` started on
    every connection (`adapters.mllp.tls.server_options` builds one from PEM files).
    """

    protocol = MLLPServerProtocol

    def __init__(
        self,
        handler: MessageHandler,
        *,
        max_message_bytes: int = 1 << 20,
        default_charset: str = "utf-8",
        idle_timeout: float | None = 300.0,
        max_connections: int = 64,
        sending_application: str = "GATEWAYD",
        sending_facility: str = "",
        clock: IReactorTime | None = None,
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
        if clock is None:
            from twisted.internet import reactor as clock
        self.handler = handler
        self.max_message_bytes = max_message_bytes
        self.default_charset = default_charset
        self.idle_timeout = idle_timeout
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
