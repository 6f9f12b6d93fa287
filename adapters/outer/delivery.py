"""The outer gate delivers the platforms' notifications (docs/subscriptions.md): what the domain committed to the
chamber with each change (gateway/domain/notifications.py), POSTed over HTTPS to the platform's own endpoint in
the YAML (``platforms[].notify``), never one a request named.

- TLS with the gateway's client certificate (``notify.client_certificate``), the endpoint's certificate checked
  against ``notify.ca`` and the URL's host.
- Each body is signed: ``X-Gatewayd-Signature`` is a JWS with a detached payload (RFC 7515 appendix F) over the
  exact body bytes, ES256 or RS256 by the client key, its header naming the certificate (``x5t#S256``) — the one
  the platform sees in the TLS handshake, so it needs no shared secret.
- Per subscription in order: only its first pending notification is sent; the next waits until that one is
  delivered (a 2xx answer) or dead.  A failure (no connection, TLS, timeout, any other status) is retried after
  ``retry_first``, doubling up to ``retry_max``; past ``give_up_after`` since its commit it is dead (logged
  ``notify.dead``, state ``dead`` in the chamber) and the subscription goes on with the next.
- At least once: the state is committed after the answer, so a notification whose delivery a crash interrupted
  is sent again (same event number: the platform drops a repeat).
- A subscription's handshake (event 0, committed with it) goes first; one that asked for heartbeats gets a
  heartbeat Bundle after that many seconds without a delivery (not kept in the chamber, not retried).
- A full-resource delivery (the focus resource in the body) is written to the audit trail with each attempt's
  outcome (action ``notify``, the platform, the resource; 502 when no answer came), in the transaction that
  records the attempt.
- Nothing here holds up anything else: each endpoint's requests run on their own (at most one per subscription,
  ``MAX_IN_FLIGHT`` in all); the inner gate's ACKs never wait for a delivery.
"""

from __future__ import annotations

import base64
import hashlib
import json
from io import BytesIO
from urllib.parse import urlsplit

import structlog
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from twisted.application import service
from twisted.internet import defer, protocol
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from adapters.tls import TlsConfigError, client_options, key_pair
from gateway.domain.audit import AuditEntry, append

log = structlog.get_logger("gateway.outer.delivery")

SIGNATURE_HEADER = b"X-Gatewayd-Signature"
#: most deliveries in flight at once (all platforms)
MAX_IN_FLIGHT = 64


class _Discard(protocol.Protocol):
    """Reads an endpoint's answer body and keeps none of it (an endpoint may answer anything, of any size: only
    its status counts); ``done`` fires when the body has ended."""

    def __init__(self):
        self.done = defer.Deferred()

    def dataReceived(self, data):
        pass

    def connectionLost(self, reason=None):
        self.done.callback(None)


def _status(response) -> defer.Deferred:
    """The answer's status code, once its body (discarded) has been read."""
    body = _Discard()
    response.deliverBody(body)
    return body.done.addCallback(lambda _: response.code)


class SignerError(ValueError):
    """A client certificate and key that cannot sign notifications."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class Signer:
    """Signs bodies with the client key: ``sign(body)`` -> the compact JWS with the payload left out
    (``<header>..<signature>``)."""

    def __init__(self, certificate, key):
        if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1":
            self.alg = "ES256"
        elif isinstance(key, rsa.RSAPrivateKey) and key.key_size >= 2048:
            self.alg = "RS256"
        else:
            raise SignerError("the client key must be EC P-256 or RSA of 2048 bits or more to sign notifications")
        self.key = key
        thumb = _b64(hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).digest())
        self.header = _b64(json.dumps({"alg": self.alg, "x5t#S256": thumb}, separators=(",", ":")).encode())

    def sign(self, body: bytes) -> str:
        signing_input = f"{self.header}.{_b64(body)}".encode("ascii")
        if self.alg == "ES256":
            r, s = decode_dss_signature(self.key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
            signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        else:
            signature = self.key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        return f"{self.header}..{_b64(signature)}"


def load_signer(certificate: str, private_key: str) -> Signer:
    try:
        chain, key = key_pair(certificate, private_key)
    except TlsConfigError as e:
        raise SignerError(str(e)) from None
    return Signer(chain[0], key)


@implementer(IPolicyForHTTPS)
class _Tls:
    def __init__(self, options):
        self.options = options

    def creatorForNetloc(self, hostname, port):
        return self.options


class Hook:
    """One platform's endpoint: its URL, TLS, signer and retry policy (``cfg``: its NotifyConfig)."""

    def __init__(self, cfg, reactor):
        self.cfg = cfg
        self.url = cfg.endpoint.encode("ascii")
        host = urlsplit(cfg.endpoint).hostname
        self.signer = load_signer(cfg.client_certificate, cfg.client_key)
        self.pool = pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 2
        self.agent = Agent(reactor, contextFactory=_Tls(client_options(host, cfg.ca, cfg.client_certificate,
                                                                       cfg.client_key)),
                           connectTimeout=cfg.timeout, pool=pool)

    def retry_after(self, attempts: int) -> float:
        return min(self.cfg.retry_first * 2 ** max(0, attempts - 1), self.cfg.retry_max)


class Delivery(service.Service):
    """Sends what is pending, each subscription in order; wakes on every commit (the chamber's observers, the
    other gate's included) and when the soonest retry is due.  ``body(subscription row, notification row)``
    -> the notification Bundle (dict)."""

    def __init__(self, chamber, reactor, hooks: dict[str, Hook], body, on_start=None):
        self.on_start = on_start  # () -> Deferred: run first (the subscriptions the configuration withdrew)
        self.chamber = chamber
        self.reactor = reactor
        self.hooks = hooks
        self.body = body
        self._busy: set[str] = set()  # subscriptions with a delivery in flight
        self._last: dict[str, float] = {}  # heartbeat subscriptions: when their last delivery ended (or first seen)
        self._call = None
        self._timer = None
        self._unobserve = None

    def startService(self):
        super().startService()
        self._unobserve = self.chamber.observe(self.wake)
        if self.on_start is not None:
            self.on_start().addErrback(lambda f: log.error("notify.withdraw_failed", error=f.getErrorMessage()))
        self.wake()

    def stopService(self):
        super().stopService()
        if self._unobserve is not None:
            self._unobserve()
        for call in (self._call, self._timer):
            if call is not None and call.active():
                call.cancel()
        self._call = self._timer = None
        pools = [hook.pool for hook in self.hooks.values() if getattr(hook, "pool", None) is not None]
        return defer.DeferredList([pool.closeCachedConnections() for pool in pools])

    def wake(self) -> None:
        if self.running and self._call is None and self.hooks:
            self._call = self.reactor.callLater(0, self._pump)

    def _pump(self) -> None:
        self._call = None
        if not self.running:
            return
        now = self.reactor.seconds()
        soonest = None
        reader = self.chamber.read()
        heads = reader.notification_heads()
        for n in heads:
            hook = self.hooks.get(n.platform)
            if n.subscription_id in self._busy or hook is None:
                continue
            if n.next_attempt > now:
                soonest = n.next_attempt if soonest is None else min(soonest, n.next_attempt)
                continue
            if len(self._busy) >= MAX_IN_FLIGHT:
                break
            self._busy.add(n.subscription_id)
            self._attempt(hook, n)
        waiting = {n.subscription_id for n in heads}
        beating = reader.heartbeat_subscriptions()
        self._last = {sub.id: self._last.get(sub.id, now) for sub in beating}  # (from now on for a new one)
        for sub in beating:
            hook = self.hooks.get(sub.platform)
            if sub.id in self._busy or sub.id in waiting or hook is None:
                continue
            due = self._last[sub.id] + sub.heartbeat
            if due <= now and len(self._busy) < MAX_IN_FLIGHT:
                self._busy.add(sub.id)
                self._heartbeat(hook, sub)
            else:
                soonest = due if soonest is None else min(soonest, due)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self.reactor.callLater(max(0.0, soonest - now), self.wake) if soonest is not None else None

    def _post(self, hook: Hook, bundle: dict):
        """POST ``bundle``, signed: a Deferred firing (status code, None) for a 2xx, else (code or None, why)."""
        body = json.dumps(bundle, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        headers = Headers({b"Content-Type": [b"application/fhir+json; charset=utf-8"],
                           SIGNATURE_HEADER: [hook.signer.sign(body).encode("ascii")]})
        d = hook.agent.request(b"POST", hook.url, headers, FileBodyProducer(BytesIO(body)))
        d.addCallback(_status)
        d.addTimeout(hook.cfg.timeout, self.reactor)
        return d.addCallbacks(lambda code: (code, None) if 200 <= code < 300 else (code, f"answered {code}"),
                              lambda failure: (None, f"{failure.type.__name__}: {failure.getErrorMessage()}"[:300]))

    def _attempt(self, hook: Hook, n) -> None:
        sub = self.chamber.read().subscription(n.subscription_id)
        bundle = self.body(sub, n)
        carried = [e["request"]["url"] for e in bundle.get("entry", [])[1:] if "request" in e]  # full-resource
        d = self._post(hook, bundle)
        d.addCallback(lambda result: self._settle(hook, n, *result, carried=carried))
        d.addErrback(lambda failure: log.error("notify.settle_failed", subscription=n.subscription_id,
                                               event=n.event, error=failure.getErrorMessage()))
        d.addBoth(lambda _: self._done(n.subscription_id))

    def _heartbeat(self, hook: Hook, sub) -> None:
        """A heartbeat: nothing in the chamber, not retried (the next one is due a period later)."""
        def sent(result):
            if result[1] is not None:
                log.warning("notify.heartbeat_failed", platform=sub.platform, subscription=sub.id, error=result[1])

        d = self._post(hook, self.body(sub, None)).addCallback(sent)
        d.addErrback(lambda failure: log.error("notify.heartbeat_failed", subscription=sub.id,
                                               error=failure.getErrorMessage()))
        d.addBoth(lambda _: self._done(sub.id))

    def _done(self, subscription_id: str) -> None:
        self._busy.discard(subscription_id)
        if subscription_id in self._last:
            self._last[subscription_id] = self.reactor.seconds()  # the heartbeat's period starts again
        self.wake()

    def _settle(self, hook: Hook, n, code, error, carried=()):
        def work(tx):
            for focus in carried:  # a resource sent out: audited with the attempt's outcome (502: no answer)
                rtype, _, rid = focus.partition("/")
                append(tx, AuditEntry(action="notify", outcome=code or 502, platform=n.platform, source="gateway",
                                      resource_type=rtype, resource_id=rid,
                                      detail=f"Subscription/{n.subscription_id} event {n.event}"
                                             + (f": {error}" if error else "")))
            cur = tx.notification(n.subscription_id, n.event)
            if cur is None or cur.state != "pending":
                return None
            attempts = cur.attempts + 1
            if error is None:
                tx.set_notification_state(n.subscription_id, n.event, "delivered", attempts=attempts,
                                          next_attempt=tx.now)
                return "delivered"
            if tx.now - cur.created >= hook.cfg.give_up_after:
                tx.set_notification_state(n.subscription_id, n.event, "dead", attempts=attempts,
                                          next_attempt=tx.now, last_error=error)
                return "dead"
            tx.set_notification_state(n.subscription_id, n.event, "pending", attempts=attempts,
                                      next_attempt=tx.now + hook.retry_after(attempts), last_error=error)
            return "retrying"

        def logged(state):
            if state == "dead":
                log.error("notify.dead", platform=n.platform, subscription=n.subscription_id, event=n.event,
                          error=error)
            elif state == "retrying":
                log.warning("notify.retrying", platform=n.platform, subscription=n.subscription_id, event=n.event,
                            error=error)
            return state

        return self.chamber.transact(work).addCallback(logged)


def hooks_from_config(platforms, reactor) -> dict[str, Hook]:
    return {p.name: Hook(p.notify, reactor) for p in platforms if p.notify is not None}
