"""The active HIS probe: is a HIS endpoint's link up, checked at an interval even while nothing is sent.

Without it an idle HIS outage is noticed only when a message is attempted. :class:`HisProbe` (one per HIS
endpoint, a service of the inner gate) runs a :class:`LinkCheck` every ``inner.his.probe_interval``:

* :class:`ConnectCheck` (always): a connection to the endpoint is opened (over TLS: the handshake completes)
  and closed again, within ``connect_timeout``. Nothing is written.
* :class:`HeartbeatCheck` (where the site sets ``inner.his.heartbeat``, e.g. ``NMQ^N01``): a message of that
  type (MSH only, its own control id ``P`` + 19 hex digits, never stored) is sent on a connection of its own,
  and any answer whose MSA-2 matches within ``ack_timeout`` counts (an AR for a type the HIS does not take
  still proves its application reads and answers); no answer, a refused connection or an unreadable answer
  is down.

A failed check turns the link down at once (with the check's reason), and it is checked again every
``RECHECK`` (1 s) while it stays down; a passed one turns it up, and so does an
answer the relay or the slot poller gets from the HIS (:meth:`HisProbe.answered`, called by their
`MLLPClient`); a message
the HIS sends us while its link is down has it checked at once (:meth:`HisProbe.heard`). Each change is
handed to ``on_change(up, since, detail)`` (the service tree commits it to the chamber's ``his_links``, which
the outer gate reads to answer a booking for a HIS known down at once, and `gatewayd status` reads) and
logged (``his.probe.down`` error, ``his.probe.up`` info); :meth:`HisProbe.status` is what /healthz, the
metrics and the console show. A check still running when the next is due is not doubled.

The interface another kind of HIS link implements (issue 22): an object with ``check() -> Deferred`` that
fires (with anything) when the link is up and fails with :class:`LinkDown` (its message the reason) when it
is not, settling within its own timeout. Hand it to :class:`HisProbe`. The database and web-service kinds use
:class:`CallCheck` over their link's ``ping`` (a ``SELECT 1`` on a pooled connection; an HTTP HEAD of the
service's URL with the link's own TLS, client certificate and headers).
"""

from __future__ import annotations

import os
from typing import Callable, Protocol

import structlog
from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol as TwistedProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from adapters.hl7.er7 import Hl7Error
from adapters.inner.client import AckTimeout, MLLPClient, PeerUnavailable

__all__ = ["CallCheck", "ConnectCheck", "HeartbeatCheck", "HisProbe", "LinkCheck", "LinkDown"]

log = structlog.get_logger("adapters.inner.probe")


class LinkDown(Exception):
    """A check found the link down; the message says why (never message contents)."""


class LinkCheck(Protocol):
    """One check of a HIS link: fires when the link is up, fails with LinkDown when it is not."""

    def check(self) -> defer.Deferred: ...


@implementer(IHandshakeListener)
class _Touch(TwistedProtocol):
    """Connects, tells whether the connection (and over TLS its handshake) completed, and closes."""

    def __init__(self, done: defer.Deferred, tls: bool):
        self.done, self.tls = done, tls

    def connectionMade(self) -> None:
        if not self.tls:
            self._finish(None)

    def handshakeCompleted(self) -> None:
        self._finish(None)

    def connectionLost(self, reason=None) -> None:
        if not self.done.called:
            why = reason.getErrorMessage() if reason is not None else "connection lost"
            self.done.errback(LinkDown(f"TLS handshake did not complete: {why}"))

    def _finish(self, _) -> None:
        if not self.done.called:
            self.done.callback(None)
        self.transport.loseConnection()


class ConnectCheck:
    """Up when a connection to ``endpoint`` opens (and, with ``tls``, a client connection creator as
    `adapters.tls.client_options` gives, its handshake completes) within ``timeout``; the connection is closed
    at once and nothing is written."""

    def __init__(self, endpoint: IStreamClientEndpoint, *, clock, timeout: float, tls: object | None = None):
        self.clock, self.timeout, self.tls = clock, timeout, tls
        self.retarget(endpoint)

    def retarget(self, endpoint: IStreamClientEndpoint) -> None:
        """Check ``endpoint`` from now on (a config reload moved the HIS)."""
        self.endpoint = wrapClientTLS(self.tls, endpoint) if self.tls is not None else endpoint

    def check(self) -> defer.Deferred:
        done: defer.Deferred = defer.Deferred()
        tls = self.tls is not None
        connecting = self.endpoint.connect(Factory.forProtocol(lambda: _Touch(done, tls)))
        holder: dict = {}

        def connected(proto):
            holder["proto"] = proto

        def refused(failure):
            if not done.called:
                done.errback(LinkDown(f"no connection: {failure.getErrorMessage()}"))

        connecting.addCallbacks(connected, refused)

        def too_slow():
            if done.called:
                return
            done.errback(LinkDown(f"no connection within {self.timeout:g}s"))
            proto = holder.get("proto")
            if proto is not None and proto.transport is not None:
                proto.transport.abortConnection()
            else:
                connecting.cancel()

        timer = self.clock.callLater(self.timeout, too_slow)
        done.addBoth(lambda r: (timer.active() and timer.cancel(), r)[1])
        return done


class CallCheck:
    """Up when ``call()`` (a Deferred: a HIS link's own ping, e.g. `DatabaseLink.ping` or `WebServiceLink.ping`,
    bounded by the link's call timeout) fires; any failure is down, its message the reason (the kinds' errors
    say what failed, never what was sent)."""

    def __init__(self, call: Callable[[], defer.Deferred], what: str):
        self.call, self.what = call, what

    def check(self) -> defer.Deferred:
        def down(failure):
            raise LinkDown(f"{self.what}: {failure.type.__name__}: {failure.getErrorMessage()}")

        try:
            d = self.call()
        except Exception as e:  # a link that cannot even start the call is down, not a crashed probe
            return defer.fail(LinkDown(f"{self.what}: {type(e).__name__}: {e}"))
        return d.addCallbacks(lambda _ok: None, down)


def heartbeat_control_id() -> str:
    """A heartbeat's MSH-10: ``P`` + 19 hex digits (the gateway's own messages are ``G`` + 19)."""
    return "P" + os.urandom(10).hex()[:19].upper()


class HeartbeatCheck:
    """Up when the HIS answers a heartbeat message (``build(control_id) -> bytes``) with its MSA-2, whatever
    its code, within ``timeout``; each check uses a new connection (``new_client() -> MLLPClient``), closed
    after it, so the relay's connections and its order are untouched."""

    def __init__(self, new_client: Callable[[], MLLPClient], build: Callable[[str], bytes], *, timeout: float):
        self.new_client, self.build, self.timeout = new_client, build, timeout
        self.endpoint: IStreamClientEndpoint | None = None  # set by a reload that moved the HIS

    def retarget(self, endpoint: IStreamClientEndpoint) -> None:
        self.endpoint = endpoint

    def check(self) -> defer.Deferred:
        client = self.new_client()
        if self.endpoint is not None:
            client.retarget(self.endpoint)
        control_id = heartbeat_control_id()
        d = client.send(self.build(control_id), control_id, self.timeout)

        def down(failure):
            failure.trap(AckTimeout, PeerUnavailable, Hl7Error)
            raise LinkDown(f"heartbeat: {failure.type.__name__}: {failure.getErrorMessage()}")

        def closed(result):
            client.close()
            return result

        return d.addCallbacks(lambda _answer: None, down).addBoth(closed)


#: how often a link found down is checked again (so a HIS that is back is seen as up within about this long,
#: and a booking for it is not answered 202 at once for longer)
RECHECK = 1.0
#: at most one check per this many seconds on messages the HIS sends while its link is down (HisProbe.heard)
HEARD_EVERY = 0.2


class HisProbe(service.Service):
    """Checks one HIS endpoint's link every ``interval`` seconds (the first at start) with ``checks`` (all
    must pass: the connection first, then the heartbeat) — every ``recheck`` seconds while it finds the link
    down — and tells ``on_change`` when what it finds changes.
    ``known() -> (up, since) | None``: what was last recorded (the chamber's), read at start, so a restart
    does not report a change that was not one."""

    def __init__(self, peer: str, checks: list, *, interval: float, clock,
                 on_change: Callable[[bool, float, str | None], object] | None = None,
                 known: Callable[[], tuple[bool, float] | None] | None = None, recheck: float = RECHECK):
        self.setName(f"probe:{peer}")
        self.peer, self.checks, self.interval, self.clock = peer, list(checks), interval, clock
        self.on_change = on_change
        self.known = known
        self.up: bool | None = None  # None: not checked yet
        self.since: float | None = None
        self.checked: float | None = None  # when the last check finished
        self.last_error: str | None = None
        self.checks_run = 0
        self.recheck = min(interval, recheck)  # the interval while the link is down
        self._next = None  # the next check's timer
        self._running: defer.Deferred | None = None
        self._heard_during_check = False

    def startService(self):
        super().startService()
        last = self.known() if self.known is not None else None
        if last is not None:
            self.up, self.since = last
        self.probe()

    def stopService(self):
        super().stopService()
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        running, self._running = self._running, None
        if running is not None:
            running.cancel()

    def status(self) -> dict:
        """For /healthz, the metrics, `gatewayd status` and the console."""
        now = self.clock.seconds()
        return {"up": self.up, "since": self.since,
                "for_seconds": None if self.since is None else round(now - self.since, 3),
                "checked": self.checked, "interval": self.interval, "last_error": self.last_error}

    def probe(self) -> None:
        """Run the checks now (not while the previous run is still going), then again after ``interval``
        (``recheck`` while the link is down)."""
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        if self._running is not None or not self.running:
            return
        self._running = d = self._run()
        d.addBoth(self._finished)

    @defer.inlineCallbacks
    def _run(self):
        for check in self.checks:
            yield check.check()

    def _finished(self, result) -> None:
        self._running = None
        if not self.running:  # stopped meanwhile (the check was cancelled): nothing found
            return None
        self.checks_run += 1
        now = self.clock.seconds()
        self.checked = now
        if isinstance(result, Failure):
            reason = (result.getErrorMessage() if result.check(LinkDown)
                      else f"{result.type.__name__}: {result.getErrorMessage()}")
            self._found(False, now, reason)
        else:
            self._found(True, now, None)
        heard, self._heard_during_check = self._heard_during_check, False
        if heard and not self.up:
            self.heard()
        else:
            self._next = self.clock.callLater(self.interval if self.up else self.recheck, self.probe)
        return None

    def retarget(self, endpoint: IStreamClientEndpoint) -> None:
        """A config reload moved the HIS endpoint: check the new address from now on, and at once."""
        for check in self.checks:
            if hasattr(check, "retarget"):
                check.retarget(endpoint)
        if self.running and self._running is None:
            self.probe()

    def heard(self) -> None:
        """The HIS endpoint sent us a message: while the link is not known up, check it now (a HIS that starts,
        or comes back, usually speaks first) rather than at the next interval — or, within ``HEARD_EVERY``
        seconds of the last check, that long after it: one check however much it sends."""
        if self.up is True or not self.running:
            return
        if self._running is not None:  # a check began before this message: check again after it if it fails
            self._heard_during_check = True
            return
        wait = 0.0 if self.checked is None else self.checked + HEARD_EVERY - self.clock.seconds()
        if wait <= 0:
            self.probe()
        elif self._next is None or not self._next.active() or self._next.getTime() > self.clock.seconds() + wait:
            if self._next is not None and self._next.active():
                self._next.cancel()
            self._next = self.clock.callLater(wait, self.probe)

    def answered(self) -> None:
        """The HIS answered one of our messages (the relay's, the poller's: their `MLLPClient` calls this): the
        link is up, whatever the last
        check found, so a HIS that came back is shown up without waiting for the next check."""
        now = self.clock.seconds()
        self.checked = now
        self._found(True, now, None)

    def _found(self, up: bool, now: float, reason: str | None) -> None:
        self.last_error = reason
        if self.up is up:
            return
        self.up, self.since = up, now
        if up:
            log.info("his.probe.up", peer=self.peer)
        else:
            log.error("his.probe.down", peer=self.peer, reason=reason)
        if self.on_change is not None:
            self.on_change(up, now, reason)
