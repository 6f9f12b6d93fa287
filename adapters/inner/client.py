"""The MLLP sender: one connection, one message in flight, strict MSA-2 matching.

Used by the gateway's relay (SRM/SQM to the HIS) and by the HIS simulator (SIU to the gateway). The relay
owns retry timing; this class only reports what happened to each send.

* One connection, opened lazily by the first `MLLPClient.send` and reopened by the next send after it
  drops. No background reconnect loop.
* One message in flight: a send made while another waits for its answer is queued and written, in order,
  after the earlier one is settled (answered, timed out, failed or cancelled).
* An answer is the frame whose MSA-2 equals the in-flight message's control id. Any other frame (another
  MSA-2, no MSA, a frame while nothing is in flight) is logged as ``mllp.ack.unmatched`` and ignored - never
  matched to another message (the classic engine bug of pairing a late ACK with the next message).
* ``release=2`` (MLLP release 2): the peer acknowledges each message with a commit block
  ``<VT><0x06><FS><CR>`` once it is in safe storage, or ``<VT><0x15><FS><CR>`` when it is not. A send waits
  for the peer's HL7 answer as in release 1 (the relay needs MSA-1, and an HL7 answer implies the commit);
  ``send(..., until="commit")`` fires with None at the commit block instead, for messages that ask for no
  HL7 answer. We acknowledge every HL7 frame the peer sends us (its answers) with a commit block: we have
  taken it, and a resend would not change what we do with it. A negative commit block fails the in-flight
  send (the peer says it did not store the message). Commit blocks carry no control id, so they are matched
  by position: each message written on a connection is owed exactly one block, and a block that arrives
  after its message was already answered (a peer that writes its ACK before the commit block) is counted
  off against that message, never taken for the next one. In release 1 a commit block is logged
  (``mllp.commit.unexpected``: the peer is configured for release 2) and ignored.
* ``tls``: a client connection creator (`adapters.tls.client_options`): the endpoint is wrapped with
  ``wrapClientTLS``, so the peer's certificate is verified and ours presented before any byte is sent.

Failure paths (each tested in tests/unit/test_mllp_protocols.py and tests/unit/test_his_reach.py). Every
`PeerUnavailable` says whether the message was **written** to the peer (``written``): False when it cannot
have reached the peer's application (no connection, or a TLS handshake that did not complete: until then our
bytes wait in the TLS layer), True when it may have (it went out on an open connection), so the relay can
tell an unreachable HIS from one that took the message and did not answer it.

=====================================  =====================================================================
What happens                           What the send's Deferred gets
=====================================  =====================================================================
no matching answer within ``timeout``  `AckTimeout`; the connection is aborted so a late answer cannot be
(counted from when the frame is        read at all, and the next send opens a fresh one. Log
written)                               ``mllp.ack.timeout``. (Over TLS, if the handshake has not completed
                                       by then: `PeerUnavailable`, not written.)
connection refused / connect takes     `PeerUnavailable` with the reason, not written (the next queued send
longer than ``connect_timeout``        tries a new connection). Log ``mllp.client.connect_failed``.
connection lost before the answer      `PeerUnavailable` with the reason, written (over TLS: only if the
                                       handshake had completed). Log ``mllp.client.connection_lost``.
                                       Except once per message: when a connection that already carried an
                                       answered exchange is lost with not a byte from the peer since our
                                       write, the peer closed its idle connection (engines that take one
                                       message per connection, e.g. hl7apy's server): the message is
                                       written again on a new connection at once (log
                                       ``mllp.client.stale_connection``; MSH-10 unchanged, so it is at
                                       worst a duplicate the peer drops).
a frame that does not parse while a    `Hl7Error` from the parser (the peer answered something unreadable;
message is in flight                   the relay decides whether to resend). Log ``mllp.ack.unparseable``.
                                       Connection kept: only a matching MSA-2 can settle later messages.
an answer larger than                  `Hl7Error` 207 ``answer exceeds N bytes``; connection aborted. Log
``max_message_bytes``                  ``mllp.ack.too_large``.
a negative commit block (0x15)         `NegativeCommit` (a `PeerUnavailable`, written: the relay resends
                                       later). Log ``mllp.commit.refused``. Connection kept.
TLS handshake fails                    `PeerUnavailable` (connection lost before the answer), not written.
caller cancels the Deferred            `CancelledError`; if it was already written the connection is
                                       aborted (as for a timeout).
`MLLPClient.close`                     queued and in-flight sends fail with `PeerUnavailable` (written only
                                       for an in-flight message that was); later sends fail at once.
=====================================  =====================================================================

Log events carry the peer and the control ids - never message contents.
"""

from __future__ import annotations

import collections
from typing import Callable

import structlog
from twisted.internet import defer
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from adapters.hl7.ack import read_ack
from adapters.hl7.er7 import Hl7Error, Message, parse
from adapters.inner.framing import COMMIT_ACK, COMMIT_ACK_BLOCK, COMMIT_NAK, FrameTooLarge, MLLPFramer, frame
from adapters.net import no_delay, peer_name

__all__ = ["AckTimeout", "MLLPClient", "NegativeCommit", "PeerUnavailable"]

log = structlog.get_logger()


class AckTimeout(Exception):
    """No answer with the right MSA-2 arrived in time. Attributes: ``control_id``, ``timeout``."""

    def __init__(self, control_id: str, timeout: float):
        super().__init__(f"no ACK for {control_id!r} within {timeout:g}s")
        self.control_id = control_id
        self.timeout = timeout


class PeerUnavailable(Exception):
    """The peer could not be reached, or the connection went away before the answer. Attributes ``reason``
    (str) and ``written``: whether the message went out on an open connection before the failure (it may
    have reached the peer), or certainly did not reach it."""

    def __init__(self, reason: str, *, written: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.written = written


class NegativeCommit(PeerUnavailable):
    """The peer answered with an MLLP release 2 negative commit block: it did not store the message."""

    def __init__(self, control_id: str):
        super().__init__(f"the peer did not commit {control_id!r} (MLLP negative commit acknowledgement)",
                         written=True)
        self.control_id = control_id


def _describe(endpoint) -> str:
    """``host:port`` of a TCP/TLS client endpoint when it exposes them, else its repr."""
    host = getattr(endpoint, "_host", None)
    port = getattr(endpoint, "_port", None)
    return f"{host}:{port}" if host is not None and port is not None else repr(endpoint)


class _Send:
    __slots__ = ("committed", "control_id", "deferred", "payload", "rewritten", "timeout", "timer", "until",
                 "written")

    def __init__(self, payload: bytes, control_id: str, timeout: float, until: str = "answer"):
        self.payload = payload
        self.control_id = control_id
        self.timeout = timeout
        self.until = until
        self.deferred: defer.Deferred | None = None
        self.written = False
        self.rewritten = False  # already written again after a stale connection
        self.committed = False
        self.timer = None


@implementer(IHandshakeListener)
class _ClientProtocol(Protocol):
    """One connection of an `MLLPClient`: frames in, everything else delegated to the client."""

    def __init__(self, client: MLLPClient):
        self.client = client
        self.framer = MLLPFramer(client.max_message_bytes)
        self.alive = False
        # what we write reaches the peer: at once on plain TCP; over TLS once the handshake completed (the TLS
        # layer holds our bytes until then)
        self.open_to_peer = client.tls is None
        self.peer = "?"
        self.commits_owed = 0  # release 2: messages written on this connection whose commit block is due
        self.exchanges = 0  # answers matched on this connection
        self.heard_since_write = False  # a byte arrived since our last write

    def connectionMade(self) -> None:
        self.alive = True
        no_delay(self.transport)
        self.peer = peer_name(self.transport.getPeer())

    def dataReceived(self, data: bytes) -> None:
        self.heard_since_write = True
        junk_before = self.framer.junk_bytes
        try:
            frames = self.framer.feed(data)
            too_large = None
        except FrameTooLarge as exc:
            frames, too_large = exc.frames, exc
        if self.framer.junk_bytes != junk_before:
            log.warning(
                "mllp.junk.discarded", peer=self.peer, bytes=self.framer.junk_bytes - junk_before,
                total=self.framer.junk_bytes,
            )
        for payload in frames:
            self.client._frame_received(self, payload)
        if too_large is not None:
            self.client._answer_too_large(self, too_large)

    def handshakeCompleted(self) -> None:
        self.open_to_peer = True

    def connectionLost(self, reason: Failure = None) -> None:
        self.alive = False
        self.client._connection_lost(self, reason)


class _ClientFactory(Factory):
    def __init__(self, client: MLLPClient):
        self.client = client

    def buildProtocol(self, addr) -> _ClientProtocol:
        return _ClientProtocol(self.client)


class MLLPClient:
    """Sends HL7 messages over one MLLP connection and fires each send with its matching answer.

    ``reactor`` is used for nothing but the default ``clock``; ``endpoint`` is an IStreamClientEndpoint
    (``clientFromString(reactor, 'tcp:his.example:2575')`` or a TLS endpoint). ``release``: 1 (default) or 2
    (MLLP release 2 commit blocks, see the module docstring). ``tls``: None or a client connection creator
    (`adapters.tls.client_options`), which wraps ``endpoint`` in TLS. ``on_answer``: called (no arguments)
    whenever the peer answers one of our messages (`adapters.inner.probe.HisProbe.answered`).
    """

    def __init__(
        self,
        reactor,
        endpoint: IStreamClientEndpoint,
        *,
        default_charset: str = "utf-8",
        max_message_bytes: int = 1 << 20,
        clock: IReactorTime | None = None,
        connect_timeout: float = 5.0,
        release: int = 1,
        tls: object | None = None,
        on_answer: Callable[[], object] | None = None,
    ):
        if release not in (1, 2):
            raise ValueError(f"MLLP release must be 1 or 2, not {release!r}")
        self.reactor = reactor
        self.release = release
        self.tls = tls
        self._plain_endpoint = endpoint
        self._tls = tls
        self.endpoint = wrapClientTLS(tls, endpoint) if tls is not None else endpoint
        self.default_charset = default_charset
        self.max_message_bytes = max_message_bytes
        self.clock = clock if clock is not None else reactor
        self.connect_timeout = connect_timeout
        self._queue: collections.deque[_Send] = collections.deque()
        self._in_flight: _Send | None = None
        self._proto: _ClientProtocol | None = None
        self._connecting: defer.Deferred | None = None
        self._closed = False
        self._connect_timed_out = False
        self._close_waiters: list[tuple[_ClientProtocol, defer.Deferred]] = []
        self.on_answer = on_answer  # called whenever the peer answers one of our messages (the HIS probe's)

    # ------------------------------------------------------------------------------------- public

    def send(self, payload: bytes, control_id: str, timeout: float, *, until: str = "answer"
             ) -> defer.Deferred[Message]:
        """Frame and write ``payload`` (an encoded HL7 message whose MSH-10 is ``control_id``); fire with the
        parsed answer whose MSA-2 == ``control_id``. With ``until="commit"`` (release 2 only) fire with None
        as soon as the peer's commit block arrives. See the module docstring for the failures."""
        if until not in ("answer", "commit"):
            raise ValueError(f"until must be 'answer' or 'commit', not {until!r}")
        if until == "commit" and self.release != 2:
            raise ValueError("until='commit' needs MLLP release 2")
        if self._closed:
            return defer.fail(PeerUnavailable("client closed"))
        framed = frame(payload)  # ValueError for an unframeable payload: the caller's bug, raised at once
        item = _Send(framed, control_id, timeout, until)
        item.deferred = defer.Deferred(lambda d, item=item: self._cancel(item))
        self._queue.append(item)
        self._next()
        return item.deferred

    def close(self) -> defer.Deferred:
        """Fail every queued and in-flight send with `PeerUnavailable('client closed')`, close the
        connection, and fire when it is closed."""
        self._closed = True
        items = ([self._in_flight] if self._in_flight is not None else []) + list(self._queue)
        self._in_flight = None
        self._queue.clear()
        for item in items:
            self._settle(item, failure=PeerUnavailable("client closed", written=self._reached(item)))
        if self._connecting is not None:
            self._connecting.cancel()
        proto, self._proto = self._proto, None
        if proto is None or not proto.alive:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._close_waiters.append((proto, d))
        proto.transport.loseConnection()
        return d

    @property
    def connected(self) -> bool:
        return self._proto is not None

    # ------------------------------------------------------------------------------------ sending

    def _next(self) -> None:
        """Put the next queued send in flight (connecting first if needed)."""
        if self._in_flight is not None or not self._queue or self._closed:
            return
        if self._proto is None and self._connecting is not None:
            return  # _connected() will come back here
        item = self._queue.popleft()
        self._in_flight = item
        if self._proto is not None:
            self._write(item)
        else:
            self._connect()

    def _connect(self) -> None:
        d = self.endpoint.connect(_ClientFactory(self))
        self._connecting = d
        self._connect_timed_out = False
        timer = self.clock.callLater(self.connect_timeout, self._connect_timeout, d)
        d.addBoth(self._stop_timer, timer)
        d.addCallbacks(self._connected, self._connect_failed)

    def _connect_timeout(self, d: defer.Deferred) -> None:
        # Deferred.addTimeout is not used: endpoints' cancellers fail with ConnectingCancelledError, which
        # addTimeout does not recognise as a timeout.
        self._connect_timed_out = True
        d.cancel()

    @staticmethod
    def _stop_timer(result, timer):
        if timer.active():
            timer.cancel()
        return result

    def _connected(self, proto: _ClientProtocol) -> None:
        self._connecting = None
        if self._closed:
            proto.transport.loseConnection()
            return
        if not proto.alive:  # lost between connectionMade and this callback
            self._connect_failed(Failure(PeerUnavailable("connection lost while opening")))
            return
        self._proto = proto
        log.info("mllp.client.connected", peer=proto.peer)
        item = self._in_flight
        if item is None:
            self._next()
        elif not item.written:
            self._write(item)

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        if self._closed:
            return  # close() already failed every send
        if self._connect_timed_out:
            reason = f"connect timed out after {self.connect_timeout:g}s"
        else:
            reason = f"connect failed: {failure.getErrorMessage() or failure.type.__name__}"
        log.warning("mllp.client.connect_failed", endpoint=_describe(self._plain_endpoint), reason=reason)
        item, self._in_flight = self._in_flight, None
        if item is not None:
            self._settle(item, failure=PeerUnavailable(reason))
        self._next()

    def _write(self, item: _Send) -> None:
        item.written = True
        item.timer = self.clock.callLater(item.timeout, self._timed_out, item)
        if self.release == 2:
            self._proto.commits_owed += 1
        self._proto.heard_since_write = False
        self._proto.transport.write(item.payload)

    # ----------------------------------------------------------------------------------- answers

    def _frame_received(self, proto: _ClientProtocol, payload: bytes) -> None:
        if proto is not self._proto:
            return  # a retired connection (timed out / cancelled): nothing it says can be an answer
        if payload == COMMIT_ACK or payload == COMMIT_NAK:
            self._commit_received(proto, payload == COMMIT_ACK)
            return
        if self.release == 2 and proto.alive:
            proto.transport.write(COMMIT_ACK_BLOCK)  # we have taken the peer's frame (see module docstring)
        item = self._in_flight
        try:
            message = parse(payload, self.default_charset)
        except Hl7Error as err:
            log.warning(
                "mllp.ack.unparseable",
                peer=proto.peer,
                expected=item.control_id if item else None,
                code=err.code,
                reason=err.text,
            )
            if item is not None and item.written:
                self._in_flight = None
                self._settle(item, failure=err)
                self._next()
            return
        try:
            _code, answered, _text = read_ack(message)
        except Hl7Error:
            answered = None
        if item is None or not item.written or answered != item.control_id:
            log.warning(
                "mllp.ack.unmatched",
                peer=proto.peer,
                control_id=answered,
                expected=item.control_id if item else None,
                message_type=message.type_name,
            )
            return
        self._in_flight = None
        proto.exchanges += 1
        if self.on_answer is not None:
            self.on_answer()
        self._settle(item, result=message)
        self._next()

    def _commit_received(self, proto: _ClientProtocol, ok: bool) -> None:
        """A release 2 commit block (0x06) or negative one (0x15): for the message in flight when it is the
        last one owed on this connection, else for an earlier message already answered."""
        commit = "ack" if ok else "nak"
        if self.release != 2:
            log.warning("mllp.commit.unexpected", peer=proto.peer, commit=commit)
            return
        proto.commits_owed -= 1
        if proto.commits_owed < 0:
            proto.commits_owed = 0
            log.warning("mllp.commit.unmatched", peer=proto.peer, commit=commit)
            return
        item = self._in_flight
        if proto.commits_owed > 0 or item is None or not item.written:
            log.info("mllp.commit.late", peer=proto.peer, commit=commit)  # for a message already answered
            return
        if not ok:
            log.warning("mllp.commit.refused", peer=proto.peer, control_id=item.control_id)
            self._in_flight = None
            self._settle(item, failure=NegativeCommit(item.control_id))
            self._next()
            return
        item.committed = True
        log.debug("mllp.commit.received", peer=proto.peer, control_id=item.control_id)
        if item.until == "commit":
            self._in_flight = None
            self._settle(item, result=None)
            self._next()

    def _answer_too_large(self, proto: _ClientProtocol, exc: FrameTooLarge) -> None:
        if proto is not self._proto:
            return
        item = self._in_flight
        log.warning("mllp.ack.too_large", peer=proto.peer, expected=item.control_id if item else None,
                    size_so_far=exc.size_so_far, limit=self.max_message_bytes)
        self._drop_connection()
        if item is not None and item.written:
            self._in_flight = None
            self._settle(item, failure=Hl7Error(207, f"answer exceeds {self.max_message_bytes} bytes"))
        self._next()

    def _timed_out(self, item: _Send) -> None:
        item.timer = None
        if self._in_flight is not item:
            return
        self._in_flight = None
        peer = self._proto.peer if self._proto is not None else "?"
        if self._reached(item):
            log.warning("mllp.ack.timeout", peer=peer, control_id=item.control_id, timeout=item.timeout)
            failure = AckTimeout(item.control_id, item.timeout)
        else:
            log.warning("mllp.client.handshake_timeout", peer=peer, control_id=item.control_id, timeout=item.timeout)
            failure = PeerUnavailable(f"TLS handshake not completed within {item.timeout:g}s")
        self._drop_connection()
        self._settle(item, failure=failure)
        self._next()

    def _cancel(self, item: _Send) -> None:
        """Canceller of a send's Deferred (the Deferred then fails with CancelledError)."""
        if item in self._queue:
            self._queue.remove(item)
            return
        if self._in_flight is item:
            self._in_flight = None
            if item.timer is not None and item.timer.active():
                item.timer.cancel()
            if item.written:
                self._drop_connection()
            self._next()

    # -------------------------------------------------------------------------------- connection

    def retarget(self, endpoint) -> None:
        """Use ``endpoint`` from the next connection on (a config reload moved the peer); the current
        connection is dropped, so a send in flight times out and is resent there, with its control id."""
        self.endpoint = wrapClientTLS(self._tls, endpoint) if self._tls is not None else endpoint
        self._drop_connection()

    def _drop_connection(self) -> None:
        """Retire the current connection at once: nothing more is read from it."""
        proto, self._proto = self._proto, None
        if proto is not None and proto.alive:
            proto.transport.abortConnection()

    def _connection_lost(self, proto: _ClientProtocol, reason: Failure | None) -> None:
        for waiter in [w for w in self._close_waiters if w[0] is proto]:
            self._close_waiters.remove(waiter)
            waiter[1].callback(None)
        if proto is not self._proto:
            return  # retired on purpose, or never adopted
        self._proto = None
        why = reason.getErrorMessage() if reason is not None else "connection lost"
        log.info("mllp.client.connection_lost", peer=proto.peer, reason=why)
        item = self._in_flight
        if item is not None and item.written:
            self._in_flight = None
            if proto.exchanges and not proto.heard_since_write and not item.rewritten:
                log.info("mllp.client.stale_connection", peer=proto.peer, control_id=item.control_id, reason=why)
                if item.timer is not None and item.timer.active():
                    item.timer.cancel()
                item.timer = None
                item.written = False
                item.rewritten = True
                self._queue.appendleft(item)
            else:
                self._settle(item, failure=PeerUnavailable(f"connection lost before the answer: {why}",
                                                           written=proto.open_to_peer))
            self._next()

    def _reached(self, item: _Send) -> bool:
        """Whether ``item`` (in flight) went out on a connection open to the peer: it may have reached it."""
        return item.written and self._proto is not None and self._proto.open_to_peer

    @staticmethod
    def _settle(item: _Send, result: Message | None = None, failure: Exception | None = None) -> None:
        if item.timer is not None:
            if item.timer.active():
                item.timer.cancel()
            item.timer = None
        d = item.deferred
        if d.called:
            return
        if failure is not None:
            d.errback(failure)
        else:
            d.callback(result)
