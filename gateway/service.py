"""The service tree: one function builds the whole gateway (:func:`make_service`).

Start order (stop order is the reverse)::

    descriptors        the process's descriptor limit raised, and checked against the connection limits
    chamber            opened first (before any listener accepts), closed last
    chamber-watch      split lock only: wakes this process when the other gate's process commits
    retention          deletes what is past chamber.keep_messages / keep_appointments (gateway/retention.py)
    memory-trim        hands memory closed connections freed back to the system, every minute
    inner gate         the MLLP listener for the HIS (intranet), then relay:<endpoint> (committed outbound
                       messages to each HIS endpoint; `routes` say which) and poller:<endpoint> (slot_source:
                       poll only)
    holds              releases bookings the HIS did not answer in time (outer gate's process)
    outer gate         FHIR over HTTPS with mutual TLS (internet), its connections limited at accept
    admin              /healthz and /metrics on loopback (admin.listen)

A child that fails to start (a port in use, a chamber that cannot be opened) fails the whole start.
The two gates share nothing but the chamber.
"""

from __future__ import annotations

import ctypes
import functools
from importlib import metadata
from zoneinfo import ZoneInfo

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto
from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from OpenSSL import SSL
from twisted.internet import endpoints, ssl, task
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web import server as web_server
from zope.interface import implementer

from adapters.fhir.channel import GatewaySite
from adapters.fhir.server import FhirApi, JsonLimits, PlatformDirectory
from adapters.hl7.identity import same_message
from adapters.inner_gate import HisDestination, InnerGateHandler, SlotPoller
from adapters.mapping.pharmacy import PharmacyProfile
from adapters.mapping.srm_booking import Hl7Header, build_sqm_s25, build_srm
from adapters.mllp import tls as mllp_tls
from adapters.mllp.client import MLLPClient
from adapters.mllp.server import MLLPServerFactory, no_delay
from gateway.audit import AuditTrail
from gateway.admin import AdminResource, Metrics
from gateway.booking import BookingService, HisLinkInfo, SlotBook
from gateway.patients import IdentifierRules
from gateway.chamber import Chamber
from gateway.config import GatewayConfig
from gateway.inbound import InboundService
from gateway.oauth import TokenService, clients_from_config, default_token_url
from gateway.listen import (ADMIN_CONNECTIONS, ConnectionLimiter, GateEndpoint, RefusalLog,
                            descriptor_needs, ensure_descriptors, gate_endpoint, source_key)
from gateway.quota import Quotas
from gateway.ratelimit import RateLimiter
from gateway.prescribing import PrescriptionService, SignaturePolicy
from gateway.relay import Relay
from gateway.retention import Retention, RetentionService
from gateway.signatures import TrustStore

log = structlog.get_logger("gateway.service")


def software_version() -> str:
    try:
        return metadata.version("gatewayd")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class ChamberService(service.Service):
    name = "chamber"

    def __init__(self, chamber: Chamber):
        self.chamber = chamber
        self._opened = False

    def privilegedStartService(self):
        # Opened before the listeners (which start in privilegedStartService) can accept anything.
        self._open()
        super().privilegedStartService()

    def startService(self):
        self._open()
        super().startService()

    def _open(self):
        if not self._opened:
            self.chamber.open()
            self._opened = True

    def stopService(self):
        super().stopService()
        self.chamber.close()
        self._opened = False


class DescriptorsService(service.Service):
    """The process's file descriptors, checked before anything opens one: the soft RLIMIT_NOFILE raised to the
    hard limit, and the start refused (naming the keys) when the connection limits ``needs`` could hold more
    descriptors than that (gateway/listen.py) — a flood would otherwise take every gate down at once."""

    name = "descriptors"

    def __init__(self, needs: list[tuple[str, int]]):
        self.needs = needs
        self.limit: int | None = None

    def privilegedStartService(self):
        self._check()
        super().privilegedStartService()

    def startService(self):
        self._check()
        super().startService()

    def _check(self):
        if self.limit is None:
            self.limit = ensure_descriptors(self.needs)
            log.info("gateway.descriptors", limit=self.limit, needed=sum(n for _, n in self.needs))


#: how often memory that closed connections freed is handed back to the system
TRIM_EVERY = 60.0


def _malloc_trim():
    """The C library's malloc_trim (glibc), or None where there is none."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


class MemoryTrimService(service.Service):
    """Every ``every`` seconds, memory that is free again is handed back to the system (glibc's
    ``malloc_trim``).  OpenSSL allocates a connection's TLS buffers with malloc, and glibc keeps what a flood's
    connections held after they close: without this the process stays at the flood's peak (3,000 connections
    took it from 80 to 237 MB, and it stayed there).  Where the C library has no malloc_trim, nothing is done."""

    name = "memory-trim"

    def __init__(self, clock, every: float = TRIM_EVERY):
        self.clock, self.every = clock, every
        self.trim = _malloc_trim()
        self._loop: task.LoopingCall | None = None

    def startService(self):
        super().startService()
        if self.trim is not None:
            self._loop = task.LoopingCall(self.trim, 0)
            self._loop.clock = self.clock
            self._loop.start(self.every, now=False)

    def stopService(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return super().stopService()


class HoldsService(service.Service):
    name = "holds"

    def __init__(self, booking: BookingService):
        self.booking = booking

    def startService(self):
        super().startService()
        self.booking.start()
        self.booking.expire_holds()

    def stopService(self):
        super().stopService()
        self.booking.stop()


def tls_options(tls) -> ssl.CertificateOptions:
    """Server TLS with client certificates verified against ``client_ca``: required, or with
    ``client_certificates: optional`` asked for and verified when presented (bearer-token platforms)."""
    chain = x509.load_pem_x509_certificates(tls.certificate.read_bytes())
    key = serialization.load_pem_private_key(tls.private_key.read_bytes(), password=None)
    cas = x509.load_pem_x509_certificates(tls.client_ca.read_bytes())
    return ssl.CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),
        certificate=crypto.X509.from_cryptography(chain[0]),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in chain[1:]],
        verify=True,
        requireCertificate=getattr(tls, "client_certificates", "required") == "required",
        caCerts=[crypto.X509.from_cryptography(c) for c in cas],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )


GATES = ("both", "inner", "outer")


@implementer(IOpenSSLContextFactory)
class TlsSwitch:
    """A listener's TLS settings (the outer gate's, the MLLP listener's), replaceable on reload: every new
    handshake asks for the current context; connections already open keep theirs (nothing is dropped).
    Renegotiation is refused: a connection's peer certificate is the one of its handshake for its whole
    life (the outer gate reads it once per connection), and no renegotiation CPU exhaustion either."""

    def __init__(self, options: ssl.CertificateOptions):
        self.current = options

    @property
    def current(self) -> ssl.CertificateOptions:
        return self._current

    @current.setter
    def current(self, options: ssl.CertificateOptions) -> None:
        # (before any connection uses the context: pyOpenSSL refuses to change one in use)
        options.getContext().set_options(SSL.OP_NO_RENEGOTIATION)
        self._current = options

    def getContext(self):
        return self._current.getContext()


class _WatchedTLSProtocol(TLSMemoryBIOFactory.protocol):
    _handshake_deadline = None
    _started = False  # TLS starts with the client's first byte

    def makeConnection(self, transport):
        """Only note the connection: TLS (OpenSSL's connection and its buffers, ~45 KB) starts with the client's
        first byte, so a connection that sends nothing costs next to nothing until its deadline."""
        no_delay(transport)  # an answer's last TLS record must not wait for the client's delayed ACK
        self.transport = transport
        self._handshake_deadline = self.factory.clock.callLater(self.factory.handshake_timeout, self._too_slow)

    def dataReceived(self, data):
        if not self._started:
            self._started = True
            super().makeConnection(self.transport)
        super().dataReceived(data)

    def _too_slow(self):
        self._handshake_deadline = None
        if not self._handshakeDone:
            self.factory.on_timeout()
            self.abortConnection()

    def abortConnection(self):
        if self._started:
            super().abortConnection()
        else:
            self.transport.abortConnection()

    def connectionLost(self, reason):
        if self._handshake_deadline is not None:
            self._handshake_deadline.cancel()
            self._handshake_deadline = None
        if not self._started:  # nothing was built that needs telling
            return
        why = self._reason or reason  # the TLS error that ended the connection, if one did
        if not self._handshakeDone and why is not None and why.check(SSL.Error):
            self.factory.on_failure(self.transport.getPeer(), why)
        super().connectionLost(reason)


class HandshakeWatch(TLSMemoryBIOFactory):
    """TLS over a listener's factory, like ``SSL4ServerEndpoint`` does it, that calls ``on_failure(peer,
    failure)`` for each handshake that fails with a TLS error (no certificate, one from another CA, no common
    protocol, ...); a connection closed before or without a TLS error is not counted.  A handshake not done
    ``handshake_timeout`` seconds after accept (on ``clock``) is cut, and ``on_timeout()`` called: a trickle
    of bytes cannot hold it open.  TLS starts with the client's first byte (until then a connection holds no
    TLS state)."""

    protocol = _WatchedTLSProtocol

    def __init__(self, context_factory, wrapped_factory, on_failure, *, clock, handshake_timeout: float,
                 on_timeout=lambda: None):
        super().__init__(context_factory, False, wrapped_factory)
        self.on_failure = on_failure
        self.clock, self.handshake_timeout, self.on_timeout = clock, handshake_timeout, on_timeout


def _handshake_failures(metrics, gate: str, log_them: bool = True, *, clock=None):
    """Count (``gatewayd_tls_handshake_failures_total{gate=...}``) and log a gate's failed handshakes, at most once
    per 10 s on ``clock`` with their count, the busiest source address and the last reason (the MLLP listener
    logs its own)."""
    counter = metrics.tls_handshake_failures.labels(gate)  # shown as 0 from the start
    tally = RefusalLog("tls.handshake_failed", clock, fields=lambda: {"gate": gate}) if log_them else None

    def failed(peer, failure):
        counter.inc()
        if tally is not None:
            tally.refused("handshake", source_key(peer), error=failure.getErrorMessage()[:200])

    return failed


def _load_crl(tls, now: float):
    """``outer.tls.crl`` read and checked against ``client_ca`` (None without one); logs an error when it is
    past its nextUpdate (it is applied all the same)."""
    if getattr(tls, "crl", None) is None:
        return None
    crl = mllp_tls.load_crl(tls.crl, tls.client_ca)
    if crl.expired(now):
        log.error("outer.crl_expired", crl=crl.path, next_update=crl.next_update.isoformat(),
                  hint="publish a fresh CRL and send SIGHUP; the expired one is still applied")
    return crl


def _token_url(outer) -> str:
    return outer.token_url or default_token_url(outer.public_base_url, outer.host, outer.port)


def reload(root, config: GatewayConfig, gate: str) -> list[str]:
    """Apply a new config to a running service tree without dropping connections.  Applied live: log
    level, the outer gate's certificates, client CAs and CRL (for new connections; the CRL for every request),
    platforms (subjects, scopes, quotas, revoked serials, SPKI pins, token keys, rate limits), the patient
    identifier rules (patients.identifiers), the MLLP listener's certificates and CA (new connections), the
    HIS's address (next connection), the routes while the endpoints stay (new bookings and prescriptions; a
    cancellation follows its booking).  Every other key whose value changed (listen addresses, chamber path,
    timeouts, ...) needs a restart: each is named in the returned list.  Everything is built
    before anything is swapped, so a new config that fails (a certificate that does not parse) changes
    nothing."""
    from gateway import logs

    old: GatewayConfig = root.config
    swaps: list = []
    applied: list[str] = [f"logging.level={config.logging.level}"]
    if gate in ("both", "outer") and config.outer is not None:
        tls = tls_options(config.outer.tls)
        tz = ZoneInfo(config.hospital.timezone)
        crl = _load_crl(config.outer.tls, root.reactor.seconds())
        platforms = PlatformDirectory.from_config(config.platforms, crl)
        oauth_clients, token_url = clients_from_config(config.platforms), _token_url(config.outer)
        quotas = Quotas.from_config(config.platforms, tz)
        limiter = _rate_limiter(config, root.reactor)

        def outer_swap():
            root.tls_switch.current = tls
            root.api.platforms, root.api.quotas, root.api.rate_limiter = platforms, quotas, limiter
            root.api.oauth.clients, root.api.oauth.token_url = oauth_clients, token_url
            root.booking.quotas = quotas

        swaps.append(outer_swap)
        applied += ["outer.tls" + (" (with CRL)" if crl is not None else ""), f"platforms ({len(config.platforms)})"]
    if gate in ("both", "inner") and config.inner is not None:
        inner_tls = config.inner.tls
        if inner_tls is not None and getattr(root, "inner_tls_switch", None) is not None:
            mllp_options = mllp_tls.server_options(inner_tls.certificate, inner_tls.private_key, inner_tls.client_ca)
            swaps.append(lambda: setattr(root.inner_tls_switch, "current", mllp_options))
            applied.append("inner.tls")
        his, was = config.inner.his, old.inner.his
        if (his.host, his.port) != (was.host, was.port):
            endpoint = endpoints.HostnameEndpoint(root.reactor, his.host, his.port, timeout=his.connect_timeout)
            swaps.append(lambda: [client.retarget(endpoint) for client in root.his_clients])
            applied.append(f"inner.his {his.host}:{his.port}")
    endpoints_kept = (old.inner and old.inner.endpoints) == (config.inner and config.inner.endpoints)
    if config.routes != old.routes and endpoints_kept:  # (a route to a new endpoint waits for the restart)
        booking, prescribing = root.booking, root.prescribing
        pharmacy = _pharmacy_route(config, gate)

        def routes_swap():
            booking.route = config.route_taken
            booking.by_facility = any(r.facility is not None for r in config.routes)
            prescribing.peer, prescribing.header = pharmacy

        swaps.append(routes_swap)
        applied.append(f"routes ({len(config.routes)})")
    if getattr(root, "booking", None) is not None:  # accepted systems (outer gate), PID-3 (inner gate)
        patients = IdentifierRules.from_config(config.patients)
        swaps.append(lambda: setattr(root.booking, "patients", patients))
        applied.append(f"patients.identifiers ({len(config.patients.identifiers)})")
    live = {"logging", "inner.his.host", "inner.his.port"}
    if gate in ("both", "outer") and config.outer is not None:
        live |= {"outer.tls", "outer.rate_limit", "outer.token_rate_limit", "outer.token_url", "platforms"}
    if "inner.tls" in applied:
        live.add("inner.tls")
    if config.routes != old.routes and endpoints_kept:
        live.add("routes")
    if getattr(root, "booking", None) is not None:
        live.add("patients")
    restart = [key for key in _changed_keys(old, config)
               if not any(key == k or key.startswith(k + ".") or key.startswith(k + "[") for k in live)]
    logs.configure(config.logging.level, config.logging.format)
    for swap in swaps:
        swap()
    root.config = config
    return applied + [f"needs a restart: {name}" for name in restart]


def _changed_keys(old, new, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two configs (sections compared field by field, lists as a
    whole, a section added or removed as its own key)."""
    import dataclasses

    if dataclasses.is_dataclass(old) and dataclasses.is_dataclass(new) and type(old) is type(new):
        keys: list[str] = []
        for f in dataclasses.fields(old):
            keys += _changed_keys(getattr(old, f.name), getattr(new, f.name), f"{prefix}.{f.name}" if prefix else f.name)
        return keys
    return [] if old == new else [prefix]


class WatchService(service.Service):
    """Split mode: wake this process when the other gate's process commits (``Chamber.watch``)."""

    name = "chamber-watch"

    def __init__(self, chamber: Chamber, clock, interval: float = 0.01):
        self.chamber = chamber
        self.clock = clock
        self.interval = interval
        self._loop = None

    def startService(self):
        super().startService()
        self._loop = self.chamber.watch(self.clock, self.interval)

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()


def make_service(config: GatewayConfig, reactor, gate: str = "both") -> service.MultiService:
    """The whole service tree for ``gate``: ``both`` (one process), or one gate of the split lock."""
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}")
    tz = ZoneInfo(config.hospital.timezone)
    root = service.MultiService()
    DescriptorsService(descriptor_needs(config, gate)).setServiceParent(root)
    chamber = Chamber(config.chamber.path, reactor=reactor, clock=reactor.seconds)
    ChamberService(chamber).setServiceParent(root)
    if gate != "both":
        WatchService(chamber, reactor).setServiceParent(root)
    metrics = Metrics(chamber)
    keep = config.chamber
    RetentionService(chamber, Retention(keep.keep_messages, keep.keep_appointments), reactor,
                     keep.prune_every, metrics).setServiceParent(root)
    MemoryTrimService(reactor).setServiceParent(root)

    his = config.inner.his if config.inner is not None else None
    if his is not None:
        links = {e.name: _his_link(config, e) for e in (his, *config.inner.endpoints)}
        link = links[his.name]
    else:
        links = None
        link = HisLinkInfo(peer=config.outer.his_name)  # the outer gate knows the HIS by name only
    outer_cfg = config.outer
    booking = BookingService(
        chamber, link, tz=tz, hold_seconds=outer_cfg.hold_expires if outer_cfg else 300.0, clock=reactor,
        max_backlog=outer_cfg.max_backlog if outer_cfg else 1000,
        retry_after=max(1, int(his.retry_max)) if his else 30,
        quotas=Quotas.from_config(config.platforms, tz), patients=IdentifierRules.from_config(config.patients),
        hold_at_his=outer_cfg.hold_at_his if outer_cfg else False,
        route=config.route_taken, by_facility=any(r.facility is not None for r in config.routes), links=links,
    )
    prescribing = _prescribing(config, reactor, tz, chamber, gate)
    relays = []
    if gate in ("both", "inner"):
        inner, relays = _inner_gate(config, reactor, tz, chamber, booking, metrics, prescribing)
        inner.setServiceParent(root)
        root.inner_tls_switch = inner.tls_switch  # None without inner.tls (reload swaps its options)
        root.his_clients = [lane.destination.client for lane in relays[0].lanes]  # inner.his (reload retargets)
        if gate == "both":  # a booking's commit also starts its delivery (Relay.claim_soon)
            booking.after_queue = lambda: [relay.claim_soon() for relay in relays]
    if gate in ("both", "outer"):
        HoldsService(booking).setServiceParent(root)
        listener, root.api, root.tls_switch = _outer_gate(config, reactor, tz, chamber, booking, metrics,
                                                          prescribing)
        listener.setServiceParent(root)
    if config.admin is not None:  # last to start, first to stop
        admin_site = web_server.Site(AdminResource(chamber, metrics, relays), reactor=reactor)
        admin_site.log = lambda request: None
        admin_limited = _connection_limiter(admin_site, metrics, "admin", reactor, max_connections=ADMIN_CONNECTIONS,
                                            max_per_address=ADMIN_CONNECTIONS)
        admin = StreamServerEndpointService(endpoints.serverFromString(reactor, config.admin.listen), admin_limited)
        admin._raiseSynchronously = True
        admin.setName("admin")
        admin.setServiceParent(root)
    root.chamber = chamber  # for the CLI's ready message and tests
    root.metrics = metrics
    root.config, root.booking, root.reactor = config, booking, reactor  # for reload()
    root.prescribing = prescribing
    return root


def _header(config: GatewayConfig, his) -> Hl7Header:
    """MSH of the messages the gateway sends to the HIS endpoint ``his`` (an ``inner.his``-like config)."""
    return Hl7Header(
        sending_application=config.inner.sending_application, sending_facility=config.inner.sending_facility,
        receiving_application=his.receiving_application, receiving_facility=his.receiving_facility,
        version=his.hl7_version, charset=his.charset,
    )


def _his_link(config: GatewayConfig, his) -> HisLinkInfo:
    """What the booking service needs to write SRMs for the HIS endpoint ``his``."""
    return HisLinkInfo(peer=his.name, charset=his.charset, cancel_trigger=his.cancel_message.split("^")[1],
                       build_srm=functools.partial(build_srm, header=_header(config, his)),
                       z_segments=tuple(his.z_segments), hold_type=his.hold_appointment_type,
                       move_trigger="S03" if his.reschedule_message == "SRM^S03" else None)


def _pharmacy_route(config: GatewayConfig, gate: str):
    """(the HIS endpoint prescriptions go to by ``routes``, its MSH header — inner gate only, else None)."""
    peer = config.route(f"{'RDE^O11' if config.pharmacy.message == 'RDE' else 'OMP^O09'}")
    header = None
    if config.inner is not None and gate != "outer":
        header = _header(config, config.inner.endpoint(peer) or config.inner.his)
    return peer, header


def _prescribing(config: GatewayConfig, reactor, tz, chamber, gate: str) -> PrescriptionService:
    """Prescriptions: the pharmacy profile (both gates), the signature policy and release key (outer), the
    pharmacy endpoint's MSH header (inner)."""
    ph = config.pharmacy
    profile = PharmacyProfile(message=ph.message, drug_systems=dict(ph.drug_systems),
                              drug_codes={(c.system, c.code): c.his_code for c in ph.drug_codes})
    peer, header = _pharmacy_route(config, gate)
    signatures = release_signer = None
    rx = config.prescriptions
    if rx is not None and gate != "inner":
        trust = TrustStore.from_pem(*(p.read_bytes() for p in rx.prescriber_cas)) if rx.prescriber_cas else None
        signatures = SignaturePolicy(trust=trust, required=rx.require_signature,
                                     signer_must_match_requester=rx.signer_must_match_requester,
                                     id_attribute=rx.prescriber_id_attribute)
        if not rx.require_signature:
            log.warning("prescriptions.unsigned_allowed", reason="prescriptions.require_signature is false: "
                                                                  "unsigned prescriptions reach the HIS")
        if rx.release_key is not None:
            release_signer = (serialization.load_pem_private_key(rx.release_key.read_bytes(), password=None),
                              x509.load_pem_x509_certificates(rx.release_chain.read_bytes()))
    outer, his = config.outer, config.inner.endpoint(peer) if config.inner is not None else None
    return PrescriptionService(chamber, tz=tz, profile=profile, peer=peer, clock=reactor, signatures=signatures,
                               header=header, release_signer=release_signer,
                               max_backlog=outer.max_backlog if outer is not None else 1000,
                               retry_after=max(1, int(his.retry_max)) if his is not None else 30)


class _ByKind:
    """The relay's encode/on_answer/on_dead: prescriptions to the prescription service, the rest (bookings)
    to the booking service (which ignores what it does not own)."""

    def __init__(self, booking, prescribing):
        self.booking, self.prescribing = booking, prescribing

    def encode(self, tx, message):
        target = self.prescribing if self.prescribing.owns(message) else self.booking
        return target.encode(tx, message)

    def on_answer(self, tx, message, answer):
        (self.prescribing if self.prescribing.owns(message) else self.booking).on_answer(tx, message, answer)

    def on_dead(self, tx, message, reason):
        (self.prescribing if self.prescribing.owns(message) else self.booking).on_dead(tx, message, reason)


def _inner_gate(config, reactor, tz, chamber, booking, metrics, prescribing):
    """Intranet side: a relay (and poller) per HIS endpoint, and the MLLP listener for their messages."""
    his = config.inner.his
    gate = service.MultiService()
    gate.setName("inner")
    slot_book = SlotBook(tz)
    inbound = InboundService(chamber, slot_book, config.inner.z_segment_peers(), same_message=same_message)
    by_kind = _ByKind(booking, prescribing)
    relays = [_relay(config, reactor, chamber, endpoint, by_kind, metrics, gate, inbound, tz)
              for endpoint in (his, *config.inner.endpoints)]
    handler = InnerGateHandler(inbound, peer=his.name, sending_application=config.inner.sending_application,
                               sending_facility=config.inner.sending_facility, tz=tz, clock=reactor,
                               validation=config.inner.validation, accept_types=config.inner.accept_types,
                               on_answer=lambda outcome: metrics.hl7_answers.labels(outcome).inc(),
                               pharmacy=prescribing,
                               peers_by_application={e.receiving_application: e.name
                                                     for e in (his, *config.inner.endpoints)}
                               if config.inner.endpoints else None)
    tls_switch = gate.tls_switch = (TlsSwitch(mllp_tls.server_options(
        config.inner.tls.certificate, config.inner.tls.private_key, config.inner.tls.client_ca))
        if config.inner.tls is not None else None)
    mllp_factory = MLLPServerFactory(
        handler, max_message_bytes=config.inner.max_message_bytes, default_charset=his.charset,
        idle_timeout=config.inner.idle_timeout,
        max_connections=config.inner.max_connections + config.inner.his_connections,  # (the limiter's, below)
        frame_timeout=config.inner.frame_timeout, tls_handshake_timeout=config.inner.tls_handshake_timeout,
        max_junk_bytes=config.inner.max_junk_bytes,
        sending_application=config.inner.sending_application, sending_facility=config.inner.sending_facility,
        clock=reactor, release=config.inner.mllp_release, tls=tls_switch,
        on_tls_failure=_handshake_failures(metrics, "inner", False) if tls_switch is not None else None,
    )
    inner_endpoint = gate_endpoint(reactor, config.inner.listen, config.inner.bind_device)
    limited = _connection_limiter(mllp_factory, metrics, "inner", reactor,
                                  max_connections=config.inner.max_connections,
                                  max_per_address=config.inner.max_connections_per_address,
                                  reserved=config.inner.his_addresses,
                                  reserved_connections=config.inner.his_connections)
    listener = StreamServerEndpointService(inner_endpoint, limited)
    listener._raiseSynchronously = True
    listener.setName("inner-gate")
    listener.setServiceParent(gate)
    return gate, relays


def _relay(config, reactor, chamber, his, by_kind, metrics, gate, inbound, tz) -> Relay:
    """One HIS endpoint: its MLLP client(s), the relay for its queue, and its slot poller if it polls."""
    his_endpoint = endpoints.HostnameEndpoint(reactor, his.host, his.port, timeout=his.connect_timeout)
    his_tls = None
    if his.tls is not None:
        his_tls = mllp_tls.client_options(his.tls.server_name or his.host, his.tls.ca, his.tls.certificate,
                                          his.tls.private_key)

    def his_client(max_bytes: int) -> MLLPClient:
        return MLLPClient(reactor, his_endpoint, default_charset=his.charset, max_message_bytes=max_bytes,
                          clock=reactor, connect_timeout=his.connect_timeout, release=his.mllp_release,
                          tls=his_tls)

    lanes = [HisDestination(his_client(config.inner.max_message_bytes)) for _ in range(his.window)]
    relay = Relay(chamber, his.name, lanes, by_kind.on_answer, clock=reactor,
                  ack_timeout=his.ack_timeout, retry_initial=his.retry_initial, retry_max=his.retry_max,
                  max_attempts=his.max_attempts, max_age=his.max_age, on_dead=by_kind.on_dead,
                  ordering=his.ordering, encode=by_kind.encode, send_types=tuple(his.send_types), metrics=metrics)
    relay.setServiceParent(gate)
    if his.slot_source == "poll":
        poll_header = _header(config, his)
        SlotPoller(his_client(64 << 20), inbound, peer=his.name,
                   build_query=functools.partial(build_sqm_s25, header=poll_header), interval=his.poll_interval,
                   days=his.poll_days, tz=tz, ack_timeout=his.ack_timeout, retry_initial=his.retry_initial,
                   retry_max=his.retry_max, clock=reactor).setServiceParent(gate)
    return relay


#: the outer gate's listen backlog: room for a burst of connections while the gateway is busy, so a flood's
#: (refused at once when accepted) does not make platforms' connections wait for SYN retransmits
OUTER_BACKLOG = 1024


def _outer_gate(config, reactor, tz, chamber, booking, metrics, prescribing) -> service.Service:
    """Internet side: the FHIR API over HTTPS with mutual TLS (and bearer tokens from /oauth/token)."""
    platforms = PlatformDirectory.from_config(config.platforms, _load_crl(config.outer.tls, reactor.seconds()))
    oauth = TokenService(chamber, clients_from_config(config.platforms), _token_url(config.outer), clock=reactor)
    api = FhirApi(
        booking=booking, reader=chamber.read, platforms=platforms, tz=tz, base_path=config.outer.base_path,
        public_base_url=config.outer.public_base_url, answer_within=config.outer.answer_within,
        page_size=config.outer.page_size, hospital_name=config.hospital.name,
        software_version=software_version(), audit=AuditTrail(chamber), quotas=booking.quotas,
        rate_limiter=_rate_limiter(config, reactor),
        json_limits=JsonLimits(config.outer.max_json_depth, config.outer.max_string_chars), clock=reactor,
        strict_audit=config.audit.strict,
        prescriptions=prescribing if config.prescriptions is not None else None,
        oauth=oauth,
    )
    outer, timeouts = config.outer, metrics.connection_timeouts
    site = GatewaySite(api, reactor=reactor, max_request_bytes=outer.max_request_bytes,
                       header_timeout=outer.header_timeout, body_timeout=outer.body_timeout,
                       idle_timeout=outer.idle_timeout,
                       answered=lambda status: metrics.http_answers.labels(str(status)).inc(),
                       timed_out=lambda deadline: timeouts.labels("outer", deadline).inc())
    tls_switch = TlsSwitch(tls_options(outer.tls))
    tls_site = HandshakeWatch(tls_switch, site, _handshake_failures(metrics, "outer", clock=reactor),
                              clock=reactor, handshake_timeout=outer.tls_handshake_timeout,
                              on_timeout=timeouts.labels("outer", "tls_handshake").inc)
    limited = _connection_limiter(tls_site, metrics, "outer", reactor, max_connections=outer.max_connections,
                                  max_per_address=outer.max_connections_per_address)
    outer_endpoint = GateEndpoint(reactor, outer.port, outer.host, outer.bind_device, backlog=OUTER_BACKLOG)
    listener = StreamServerEndpointService(outer_endpoint, limited)
    listener._raiseSynchronously = True
    listener.setName("outer-gate")
    return listener, api, tls_switch


def _connection_limiter(factory, metrics, gate: str, reactor, **limits) -> ConnectionLimiter:
    """``factory`` behind a ConnectionLimiter (outside any TLS), its refusals and open connections in
    ``gatewayd_connections_refused_total{gate,reason}`` and ``gatewayd_connections_open{gate}``."""
    limiter = ConnectionLimiter(factory, gate=gate, clock=reactor,
                                refused=lambda reason: metrics.connections_refused.labels(gate, reason).inc(), **limits)
    metrics.connections_open.labels(gate).set_function(lambda: limiter.open)
    return limiter


def _rate_limiter(config, reactor) -> RateLimiter:
    limit = lambda rl: (rl.per_second, rl.burst) if rl is not None else None  # noqa: E731
    return RateLimiter({p.name: limit(p.rate_limit) for p in config.platforms}, limit(config.outer.rate_limit),
                       reactor, source_limit=limit(config.outer.token_rate_limit))
