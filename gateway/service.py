"""The service tree: one function builds the whole gateway (:func:`make_service`).

Start order (stop order is the reverse)::

    descriptors        the process's descriptor limit raised, and checked against the connection limits
    chamber            opened first (before any listener accepts), closed last
    chamber-watch      split lock only: wakes this process when the other gate's process commits
    retention          deletes what is past chamber.keep_messages / keep_appointments (gateway/chamber/retention.py)
    memory-trim        hands memory closed connections freed back to the system, every minute
    inner gate         the MLLP listener for the HIS (intranet), then relay:<endpoint> (committed outbound
                       messages to each HIS endpoint; `routes` say which), poller:<endpoint> (slot_source:
                       poll only) and probe:<endpoint> (is it up: adapters/inner/probe.py; probe_interval > 0)
    holds              releases bookings the HIS did not answer in time (outer gate's process)
    outer gate         FHIR over HTTPS with mutual TLS (internet), its connections limited at accept
    admin              /healthz, /metrics and /status on loopback (admin.listen)

A child that fails to start (a port in use, a chamber that cannot be opened) fails the whole start.
The two gates share nothing but the chamber.

This module only builds and connects: the process's services are in gateway/ops/services.py, each gate's
parts in adapters/inner/ and adapters/outer/, what a reload changes in gateway/ops/reload.py.  The tree is a
:class:`Gateway`, which names the parts a reload swaps.
"""

from __future__ import annotations

import functools
from datetime import datetime
from importlib import metadata
from zoneinfo import ZoneInfo

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.web import server as web_server

from adapters.outer.http import GatewaySite
from adapters.outer.access import PlatformDirectory
from adapters.outer.intake import JsonLimits
from adapters.outer.pharmacy import Prescriptions
from adapters.outer.pages import SlotPages
from adapters.outer.site import FhirApi
from adapters.outer.delivery import Delivery, hooks_from_config
from adapters.outer.subscriptions import SubscriptionsApi, focus_resource
from adapters.outer.tls import HandshakeWatch, read_crl, tls_options
from adapters.hl7.identity import same_message
from adapters.inner.database import DatabaseDestination, DatabaseLink, slot_poller as database_slots
from adapters.inner.his import HisDestination
from adapters.inner.webservice import WebServiceDestination, WebServiceLink, slot_poller as webservice_slots
from adapters.inner.pharmacy import PharmacyInbound
from adapters.inner.poller import SlotPoller
from adapters.inner.probe import CallCheck, ConnectCheck, HeartbeatCheck, HisProbe
from adapters.inner.receiver import InnerGateHandler, make_reprocessor
from adapters.maps.fhir_documents import FhirDocuments
from adapters.maps.fhir_prescription import SubmissionReader, prescription_from_request
from adapters.maps.fhir_scheduling import appointment_resource
from adapters.maps.pharmacy_codes import PharmacyProfile
from adapters.maps.rde_order import ORDER_TYPES, PharmacyOrderWriter
from adapters.maps.srm_booking import Hl7Header, build_heartbeat, build_sqm_s25, build_srm
from adapters import tls as mllp_tls
from adapters.tls import TlsSwitch
from adapters.inner.client import MLLPClient
from adapters.inner.listener import MLLPServerFactory
from gateway.domain.audit import AuditTrail
from gateway.ops.admin import AdminResource, AuditChainWatch, Metrics
from gateway.ops.console import Console
from gateway.domain.booking import BookingService, HisLinkInfo
from gateway.domain.slot_book import SlotBook
from gateway.domain.patients import IdentifierRules
from gateway.chamber.backends import backend_for
from gateway.chamber.engine import Chamber
from gateway.domain.notifications import Notifications, Subscriptions
from gateway.config.model import GatewayConfig
from gateway.domain.outbox import Outbox
from gateway.domain.inbound import InboundService
from adapters.outer.oauth import EXPIRED_TOKENS_KEPT, TokenService, clients_from_config, default_token_url
from gateway.ops.status import certificate_files
from gateway.ops.listen import (ADMIN_CONNECTIONS, ConnectionLimiter, GateEndpoint, descriptor_needs,
                                gate_endpoint, handshake_failures)
from gateway.ops.services import (ChamberService, DescriptorsService, HisLinkRecord, HoldsService, ReleaseNotices,
                                  MemoryTrimService, WatchService)
from gateway.domain.quota import Quotas
from adapters.outer.ratelimit import RateLimiter
from gateway.domain.prescribing import PrescriptionService, SignaturePolicy
from gateway.relay import Relay
from gateway.chamber.retention import Retention, RetentionService
from gateway.domain.signatures import TrustStore

log = structlog.get_logger("gateway.service")


def software_version() -> str:
    try:
        return metadata.version("gatewayd")
    except metadata.PackageNotFoundError:
        return "0+unknown"


GATES = ("both", "inner", "outer")


class Gateway(service.MultiService):
    """The service tree :func:`make_service` builds, and the parts of it that a running gateway changes in place:
    what :func:`gateway.ops.reload.reload` swaps on SIGHUP (gatewayd run starts and stops the tree)."""

    def __init__(self, config: GatewayConfig, gate: str, reactor, booking: BookingService,
                 prescribing: PrescriptionService):
        super().__init__()
        self.config = config  # the running config (a reload replaces it)
        self.gate = gate  # both, inner or outer
        self.reactor = reactor
        self.booking = booking
        self.prescribing = prescribing
        self.api: FhirApi | None = None  # the outer gate's FHIR API (gate both or outer)
        self.outer_tls: TlsSwitch | None = None  # the outer gate's TLS (gate both or outer)
        self.delivery: Delivery | None = None  # the outer gate's deliveries of notifications (gate both or outer)
        self.inner_tls: TlsSwitch | None = None  # the MLLP listener's TLS (gate both or inner, with inner.tls)
        self.his_clients: list[MLLPClient] = []  # inner.his's connections (gate both or inner)
        self.probes: dict[str, HisProbe] = {}  # each HIS endpoint's probe (gate both or inner, probe_interval > 0)
        self.started = reactor.seconds()  # when the tree was built (the process started)
        self.last_reload: dict | None = None  # the last SIGHUP's outcome (gatewayd run records it)

    def live(self) -> dict:
        """What only the running process knows, for `gatewayd status` (the admin listener's /status)."""
        return {"gate": self.gate, "started": self.started, "version": software_version(),
                "last_reload": self.last_reload}


def make_service(config: GatewayConfig, reactor, gate: str = "both") -> Gateway:
    """The whole service tree for ``gate``: ``both`` (one process), or one gate of the split lock."""
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}")
    tz = ZoneInfo(config.hospital.timezone)
    chamber = Chamber(backend=backend_for(config.chamber), reactor=reactor, clock=reactor.seconds)
    # every unit of work in either gate writes the notifications its changes owe (issue 23), in its transaction
    notifications = Notifications()
    chamber.on_unit(notifications.after_unit)
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
    notifications.quotas = lambda: booking.quotas  # (the free-slot topic: the quotas now, reloaded on SIGHUP)
    prescribing = _prescribing(config, reactor, tz, chamber, gate)
    root = Gateway(config, gate, reactor, booking, prescribing)
    DescriptorsService(descriptor_needs(config, gate)).setServiceParent(root)
    ChamberService(chamber).setServiceParent(root)
    slot_pages = None
    if gate == "both":  # GET /Slot pages kept until the chamber changes (adapters/outer/pages.py): this process's
        slot_pages = SlotPages.attached(chamber, reactor.seconds)  # units drop them before their COMMIT, every
        # commit after; the split lock keeps none
    else:
        WatchService(chamber, reactor).setServiceParent(root)
    metrics = Metrics(chamber, peers=_his_names(config), certificates=lambda: certificate_files(root.config),
                      platforms=lambda: [p.name for p in root.config.platforms])
    AuditChainWatch(chamber, reactor, metrics.audit_chain).setServiceParent(root)
    keep = config.chamber
    RetentionService(chamber, Retention(keep.keep_messages, keep.keep_appointments, EXPIRED_TOKENS_KEPT), reactor,
                     keep.prune_every, metrics).setServiceParent(root)
    MemoryTrimService(reactor).setServiceParent(root)
    relays = []
    if gate in ("both", "inner"):
        inner, relays, root.inner_tls = _inner_gate(config, reactor, tz, chamber, booking, metrics, prescribing,
                                                    root.probes)
        inner.setServiceParent(root)
        root.his_clients = [lane.destination.client for lane in relays[0].lanes  # inner.his (reload retargets)
                            if isinstance(lane.destination, HisDestination)]
        if gate == "both":  # a booking's commit also starts its delivery (Relay.claim_soon)
            booking.after_queue = lambda: [relay.claim_soon() for relay in relays]
    if gate in ("both", "outer"):
        HoldsService(booking).setServiceParent(root)
        ReleaseNotices(chamber, lambda: booking.quotas, reactor).setServiceParent(root)
        listener, root.api, root.outer_tls = _outer_gate(config, reactor, tz, chamber, booking, metrics,
                                                         prescribing, slot_pages)
        listener.setServiceParent(root)
        root.delivery = _delivery(config, reactor, chamber, root.api.subscriptions)
        root.delivery.setServiceParent(root)
    if config.admin is not None:  # last to start, first to stop
        admin = AdminResource(chamber, metrics, relays, root.probes, live=root.live)
        admin.console = Console(chamber, lambda: root.config, admin.status_body, clock=reactor,
                                reprocess=make_reprocessor(SlotBook(tz), config.inner.his.charset,
                                                           config.inner.z_segment_peers())
                                if config.inner is not None else None)
        admin_site = web_server.Site(admin, reactor=reactor)
        admin_site.log = lambda request: None
        admin_limited = _connection_limiter(admin_site, metrics, "admin", reactor, max_connections=ADMIN_CONNECTIONS,
                                            max_per_address=ADMIN_CONNECTIONS)
        _listener(endpoints.serverFromString(reactor, config.admin.listen), admin_limited,
                  "admin").setServiceParent(root)
    return root


def _his_names(config: GatewayConfig) -> list[str]:
    """The HIS endpoints the config names (their queue metrics are 0, not absent, before any message)."""
    if config.inner is None:
        return []
    return [his.name for his in (config.inner.his, *config.inner.endpoints)]


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


def _pharmacy_profile(config: GatewayConfig) -> PharmacyProfile:
    ph = config.pharmacy
    return PharmacyProfile(message=ph.message, drug_systems=dict(ph.drug_systems),
                           drug_codes={(c.system, c.code): c.his_code for c in ph.drug_codes})


def pharmacy_route(config: GatewayConfig, gate: str):
    """(the HIS endpoint prescriptions go to by ``routes``, the writer of its orders — inner gate only, else
    None)."""
    peer = config.route(ORDER_TYPES[config.pharmacy.message])
    writer = None
    if config.inner is not None and gate != "outer":
        writer = PharmacyOrderWriter(_header(config, config.inner.endpoint(peer) or config.inner.his),
                                     config.pharmacy.message)
    return peer, writer


def _prescribing(config: GatewayConfig, reactor, tz, chamber, gate: str) -> PrescriptionService:
    """Prescriptions: the documents readers are served (both gates), the signature policy and release key
    (outer), the pharmacy endpoint's order writer (inner)."""
    peer, writer = pharmacy_route(config, gate)
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
    profile = _pharmacy_profile(config)
    return PrescriptionService(chamber, tz=tz, order_type=ORDER_TYPES[config.pharmacy.message],
                               documents=FhirDocuments(tz, profile), peer=peer, clock=reactor,
                               signatures=signatures, writer=writer, release_signer=release_signer,
                               from_request=functools.partial(prescription_from_request, tz=tz, profile=profile)
                               if writer is not None else None,
                               max_backlog=outer.max_backlog if outer is not None else 1000,
                               retry_after=max(1, int(his.retry_max)) if his is not None else 30)


def _inner_gate(config, reactor, tz, chamber, booking, metrics, prescribing, probes):
    """Intranet side: a relay (and poller, and probe: into ``probes``) per HIS endpoint, and the MLLP listener for
    their messages; with the relays and the listener's TLS switch (None without inner.tls)."""
    his = config.inner.his
    gate = service.MultiService()
    gate.setName("inner")
    slot_book = SlotBook(tz)
    inbound = InboundService(chamber, slot_book, config.inner.z_segment_peers(), same_message=same_message)
    outbox = Outbox(booking, prescribing)
    relays = [_relay(config, reactor, chamber, endpoint, outbox, metrics, gate, inbound, tz, probes)
              for endpoint in (his, *config.inner.endpoints)]

    def heard(peer: str) -> None:
        if peer in probes:
            probes[peer].heard()

    handler = InnerGateHandler(inbound, peer=his.name, sending_application=config.inner.sending_application,
                               sending_facility=config.inner.sending_facility, tz=tz, clock=reactor,
                               validation=config.inner.validation, accept_types=config.inner.accept_types,
                               on_answer=lambda outcome: metrics.hl7_answers.labels(outcome).inc(),
                               pharmacy=PharmacyInbound(prescribing, tz),
                               peers_by_application={e.receiving_application: e.name
                                                     for e in (his, *config.inner.endpoints)}
                               if config.inner.endpoints else None, on_message=heard)
    tls_switch = (TlsSwitch(mllp_tls.server_options(
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
        on_tls_failure=handshake_failures(metrics, "inner", False) if tls_switch is not None else None,
    )
    inner_endpoint = gate_endpoint(reactor, config.inner.listen, config.inner.bind_device)
    limited = _connection_limiter(mllp_factory, metrics, "inner", reactor,
                                  max_connections=config.inner.max_connections,
                                  max_per_address=config.inner.max_connections_per_address,
                                  reserved=config.inner.his_addresses,
                                  reserved_connections=config.inner.his_connections)
    _listener(inner_endpoint, limited, "inner-gate").setServiceParent(gate)
    return gate, relays, tls_switch


def _relay(config, reactor, chamber, his, outbox, metrics, gate, inbound, tz, probes) -> Relay:
    """One HIS endpoint: its lanes (MLLP clients; for kind database or webservice its link, started before and
    stopped after the relay), the relay for its queue, its slot poller if it polls (SQM^S25, the
    database's slot view, the web service's schedule query), and its probe (into ``probes``) unless
    probe_interval is 0."""
    probe = None
    if his.kind == "database":
        link = DatabaseLink(his.database, peer=his.name, reactor=reactor)
        link.setServiceParent(gate)
        lanes = [DatabaseDestination(link, charset=his.charset, tz=tz, clock=reactor) for _ in range(his.window)]
        poller = database_slots(link, inbound, tz=tz, clock=reactor) if his.database.slots is not None else None
        probe = _probe(chamber, his, lambda: [CallCheck(link.ping, "database")], reactor)
    elif his.kind == "webservice":
        link = WebServiceLink(his.webservice, peer=his.name, reactor=reactor)
        link.setServiceParent(gate)
        lanes = [WebServiceDestination(link, charset=his.charset) for _ in range(his.window)]
        poller = webservice_slots(link, inbound, tz=tz, clock=reactor) if his.webservice.slots is not None else None
        probe = _probe(chamber, his, lambda: [CallCheck(link.ping, "web service")], reactor)
    else:
        lanes, poller, probe = _mllp_lanes(config, reactor, chamber, his, inbound, tz)
    relay = Relay(chamber, his.name, lanes, outbox.on_answer, clock=reactor,
                  ack_timeout=his.ack_timeout, retry_initial=his.retry_initial, retry_max=his.retry_max,
                  max_attempts=his.max_attempts, max_age=his.max_age, on_dead=outbox.on_dead,
                  ordering=his.ordering, encode=outbox.encode, send_types=tuple(his.send_types), metrics=metrics)
    relay.setServiceParent(gate)
    if poller is not None:
        poller.setServiceParent(gate)
    if probe is not None:
        probe.setServiceParent(gate)
        metrics.watch_probe(his.name, probe.status)
        probes[his.name] = probe
    return relay


def _mllp_lanes(config, reactor, chamber, his, inbound, tz):
    """An MLLP endpoint's HisDestinations (one client each), its SQM^S25 poller (slot_source: poll) or None, and
    its probe or None."""
    his_endpoint = endpoints.HostnameEndpoint(reactor, his.host, his.port, timeout=his.connect_timeout)
    his_tls = None
    if his.tls is not None:
        his_tls = mllp_tls.client_options(his.tls.server_name or his.host, his.tls.ca, his.tls.certificate,
                                          his.tls.private_key)

    probe = None

    def his_client(max_bytes: int) -> MLLPClient:
        return MLLPClient(reactor, his_endpoint, default_charset=his.charset, max_message_bytes=max_bytes,
                          clock=reactor, connect_timeout=his.connect_timeout, release=his.mllp_release,
                          tls=his_tls, on_answer=probe.answered if probe is not None else None)

    def checks():
        found = [ConnectCheck(his_endpoint, clock=reactor, timeout=his.connect_timeout, tls=his_tls)]
        if his.heartbeat is not None:
            header = _header(config, his)
            found.append(HeartbeatCheck(
                lambda: his_client(config.inner.max_message_bytes),
                lambda control_id: build_heartbeat(his.heartbeat, header=header, control_id=control_id,
                                                   now=datetime.fromtimestamp(reactor.seconds(), tz)),
                timeout=his.ack_timeout))
        return found

    probe = _probe(chamber, his, checks, reactor)
    lanes = [HisDestination(his_client(config.inner.max_message_bytes)) for _ in range(his.window)]
    poller = None
    if his.slot_source == "poll":
        poll_header = _header(config, his)
        poller = SlotPoller(his_client(64 << 20), inbound, peer=his.name,
                            build_query=functools.partial(build_sqm_s25, header=poll_header),
                            interval=his.poll_interval, days=his.poll_days, tz=tz, ack_timeout=his.ack_timeout,
                            retry_initial=his.retry_initial, retry_max=his.retry_max, clock=reactor)
    return lanes, poller, probe


def _probe(chamber, his, checks, reactor) -> HisProbe | None:
    """The HIS endpoint ``his``'s probe with the checks ``checks()`` makes (None, and no checks made, with
    probe_interval 0); what it finds kept in the chamber (his_links)."""
    if his.probe_interval == 0:
        return None
    record = HisLinkRecord(chamber, his.name)
    return HisProbe(his.name, checks(), interval=his.probe_interval, clock=reactor, on_change=record.record,
                    known=record.known)


#: the outer gate's listen backlog: room for a burst of connections while the gateway is busy, so a flood's
#: (refused at once when accepted) does not make platforms' connections wait for SYN retransmits
OUTER_BACKLOG = 1024


def _outer_gate(config, reactor, tz, chamber, booking, metrics, prescribing, slot_pages=None) -> service.Service:
    """Internet side: the FHIR API over HTTPS with mutual TLS (and bearer tokens from /oauth/token)."""
    platforms = PlatformDirectory.from_config(config.platforms, read_crl(config.outer.tls, reactor.seconds()))
    oauth = TokenService(chamber, clients_from_config(config.platforms), token_url(config.outer), clock=reactor)
    api = FhirApi(
        booking=booking, reader=chamber.read, platforms=platforms, tz=tz, base_path=config.outer.base_path,
        public_base_url=config.outer.public_base_url, answer_within=config.outer.answer_within,
        page_size=config.outer.page_size, hospital_name=config.hospital.name,
        software_version=software_version(), audit=AuditTrail(chamber), quotas=booking.quotas,
        rate_limiter=rate_limiter(config, reactor),
        json_limits=JsonLimits(config.outer.max_json_depth, config.outer.max_string_chars), clock=reactor,
        strict_audit=config.audit.strict,
        prescriptions=Prescriptions(prescribing, SubmissionReader(tz, _pharmacy_profile(config)))
        if config.prescriptions is not None else None,
        oauth=oauth, subscriptions=_subscriptions(config, reactor, tz, chamber, lambda: booking.quotas),
        slot_pages=slot_pages,
    )
    outer, timeouts = config.outer, metrics.connection_timeouts
    site = GatewaySite(api, reactor=reactor, max_request_bytes=outer.max_request_bytes,
                       header_timeout=outer.header_timeout, body_timeout=outer.body_timeout,
                       idle_timeout=outer.idle_timeout,
                       answered=metrics.http_answered,
                       timed_out=lambda deadline: timeouts.labels("outer", deadline).inc())
    tls_switch = TlsSwitch(tls_options(outer.tls))
    tls_site = HandshakeWatch(tls_switch, site, handshake_failures(metrics, "outer", clock=reactor),
                              clock=reactor, handshake_timeout=outer.tls_handshake_timeout,
                              on_timeout=timeouts.labels("outer", "tls_handshake").inc)
    limited = _connection_limiter(tls_site, metrics, "outer", reactor, max_connections=outer.max_connections,
                                  max_per_address=outer.max_connections_per_address)
    outer_endpoint = GateEndpoint(reactor, outer.port, outer.host, outer.bind_device, backlog=OUTER_BACKLOG)
    return _listener(outer_endpoint, limited, "outer-gate"), api, tls_switch


def _subscriptions(config, reactor, tz, chamber, booking_quotas) -> SubscriptionsApi:
    """The Subscription endpoints (issue 23, docs/subscriptions.md)."""
    def focus_json(platform: str, focus: str) -> dict | None:
        return focus_resource(chamber.read(), platform, focus, tz, booking_quotas())

    return SubscriptionsApi(Subscriptions(chamber), notify={p.name: p.notify for p in config.platforms if p.notify},
                            tz=tz, json_limits=JsonLimits(config.outer.max_json_depth, config.outer.max_string_chars),
                            focus_json=focus_json)


def notification_base(config) -> str:
    """The FHIR base notifications name resources under: outer.public_base_url, else the listener's address."""
    outer = config.outer
    return (outer.public_base_url or f"https://{outer.host}:{outer.port}{outer.base_path}").rstrip("/")


def _delivery(config, reactor, chamber, api: SubscriptionsApi) -> Delivery:
    """The outer gate's deliveries of notifications (idle while no platform has a notify endpoint)."""
    base = notification_base(config)
    granted = notify_grants(config.platforms)
    return Delivery(chamber, reactor, hooks_from_config(config.platforms, reactor),
                    lambda sub, n: api.notification(sub, n, base, reactor.seconds()),
                    on_start=lambda: api.subs.withdraw(granted))


def notify_grants(platforms) -> dict[str, frozenset]:
    """Each platform with a ``notify`` endpoint -> its scopes: what its subscriptions may go on receiving."""
    return {p.name: frozenset(p.scopes) for p in platforms if p.notify is not None}


def _listener(endpoint, factory, name: str) -> StreamServerEndpointService:
    """A gate's (or the admin's) listening service: a port that cannot be opened (in use, not allowed) fails the
    whole start, instead of being only logged as Twisted's listener services do by default."""
    listener = StreamServerEndpointService(endpoint, factory)
    listener._raiseSynchronously = True
    listener.setName(name)
    return listener


def _connection_limiter(factory, metrics, gate: str, reactor, **limits) -> ConnectionLimiter:
    """``factory`` behind a ConnectionLimiter (outside any TLS), its refusals and open connections in
    ``gatewayd_connections_refused_total{gate,reason}`` and ``gatewayd_connections_open{gate}``."""
    limiter = ConnectionLimiter(factory, gate=gate, clock=reactor,
                                refused=lambda reason: metrics.connections_refused.labels(gate, reason).inc(), **limits)
    metrics.connections_open.labels(gate).set_function(lambda: limiter.open)
    return limiter


def token_url(outer) -> str:
    """The token endpoint's URL as platforms address it (``outer.token_url``, else from the public base)."""
    return outer.token_url or default_token_url(outer.public_base_url, outer.host, outer.port)


def rate_limiter(config, reactor) -> RateLimiter:
    """The outer gate's rate limits: each platform's, all platforms' together, the token endpoint's per source."""
    limit = lambda rl: (rl.per_second, rl.burst) if rl is not None else None  # noqa: E731
    return RateLimiter({p.name: limit(p.rate_limit) for p in config.platforms}, limit(config.outer.rate_limit),
                       reactor, source_limit=limit(config.outer.token_rate_limit))
