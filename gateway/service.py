"""The service tree: one function builds the whole gateway (:func:`make_service`).

Start order (stop order is the reverse)::

    chamber            opened first (before any listener accepts), closed last
    relay:<his>        delivers committed outbound messages to the HIS
    poller:<his>       only with slot_source: poll
    holds              releases bookings the HIS did not answer in time
    inner gate         MLLP listener for the HIS (intranet)
    outer gate         FHIR over HTTPS with mutual TLS (internet)

A child that fails to start (a port in use, a chamber that cannot be opened) fails the whole start.
The two gates share nothing but the chamber.
"""

from __future__ import annotations

import functools
from importlib import metadata
from zoneinfo import ZoneInfo

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto
from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints, ssl
from twisted.web import server as web_server

from adapters.fhir.server import FhirApi, JsonLimits, PlatformDirectory, request_factory
from adapters.inner_gate import HisDestination, InnerGateHandler, SlotPoller
from adapters.mapping.srm_booking import Hl7Header, build_sqm_s25, build_srm
from adapters.mllp import tls as mllp_tls
from adapters.mllp.client import MLLPClient
from adapters.mllp.server import MLLPServerFactory
from gateway.audit import AuditTrail
from gateway.admin import AdminResource, Metrics
from gateway.booking import BookingService, HisLinkInfo, SlotBook
from gateway.chamber import Chamber
from gateway.config import GatewayConfig
from gateway.inbound import InboundService
from gateway.listen import DeviceServerEndpoint, parse_tcp
from gateway.quota import Quotas
from gateway.ratelimit import RateLimiter
from gateway.relay import Relay

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
    """Server TLS with client certificates required and verified against ``client_ca``."""
    chain = x509.load_pem_x509_certificates(tls.certificate.read_bytes())
    key = serialization.load_pem_private_key(tls.private_key.read_bytes(), password=None)
    cas = x509.load_pem_x509_certificates(tls.client_ca.read_bytes())
    return ssl.CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),
        certificate=crypto.X509.from_cryptography(chain[0]),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in chain[1:]],
        verify=True,
        requireCertificate=True,
        caCerts=[crypto.X509.from_cryptography(c) for c in cas],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )


GATES = ("both", "inner", "outer")


class TlsSwitch:
    """The outer gate's TLS settings, replaceable on reload: every new handshake asks for the current
    context; connections already open keep theirs (nothing is dropped)."""

    def __init__(self, options: ssl.CertificateOptions):
        self.current = options

    def getContext(self):
        return self.current.getContext()


def reload(root, config: GatewayConfig, gate: str) -> list[str]:
    """Apply a new config to a running service tree without dropping connections.  Applied live: log
    level, the outer gate's certificates and client CAs (for new connections), platforms (subjects, scopes,
    quotas, revoked serials, rate limits), the HIS's address (next connection).  Other changes (listen
    addresses, chamber path, ...) need a restart: they are named in the returned list.  Everything is built
    before anything is swapped, so a new config that fails (a certificate that does not parse) changes
    nothing."""
    from gateway import logs

    old: GatewayConfig = root.config
    swaps: list = []
    applied: list[str] = [f"logging.level={config.logging.level}"]
    if gate in ("both", "outer") and config.outer is not None:
        tls = tls_options(config.outer.tls)
        tz = ZoneInfo(config.hospital.timezone)
        platforms = PlatformDirectory.from_config(config.platforms)
        quotas = Quotas.from_config(config.platforms, tz)
        limiter = _rate_limiter(config, root.reactor)

        def outer_swap():
            root.tls_switch.current = tls
            root.api.platforms, root.api.quotas, root.api.rate_limiter = platforms, quotas, limiter
            root.booking.quotas = quotas

        swaps.append(outer_swap)
        applied += ["outer.tls", f"platforms ({len(config.platforms)})"]
    if gate in ("both", "inner") and config.inner is not None:
        his, was = config.inner.his, old.inner.his
        if (his.host, his.port) != (was.host, was.port):
            endpoint = endpoints.HostnameEndpoint(root.reactor, his.host, his.port, timeout=his.connect_timeout)
            swaps.append(lambda: [client.retarget(endpoint) for client in root.his_clients])
            applied.append(f"inner.his {his.host}:{his.port}")
    restart = [name for name, before, after in (
        ("chamber.path", old.chamber.path, config.chamber.path),
        ("inner.listen", old.inner and old.inner.listen, config.inner and config.inner.listen),
        ("outer.host/port", old.outer and (old.outer.host, old.outer.port),
         config.outer and (config.outer.host, config.outer.port)),
        ("admin.listen", old.admin and old.admin.listen, config.admin and config.admin.listen),
    ) if before != after]
    logs.configure(config.logging.level, config.logging.format)
    for swap in swaps:
        swap()
    root.config = config
    return applied + [f"needs a restart: {name}" for name in restart]


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
    chamber = Chamber(config.chamber.path, reactor=reactor, clock=reactor.seconds)
    ChamberService(chamber).setServiceParent(root)
    if gate != "both":
        WatchService(chamber, reactor).setServiceParent(root)

    his = config.inner.his if config.inner is not None else None
    if his is not None:
        header = Hl7Header(
            sending_application=config.inner.sending_application, sending_facility=config.inner.sending_facility,
            receiving_application=his.receiving_application, receiving_facility=his.receiving_facility,
            version=his.hl7_version, charset=his.charset,
        )
        link = HisLinkInfo(peer=his.name, charset=his.charset, cancel_trigger=his.cancel_message.split("^")[1],
                           build_srm=functools.partial(build_srm, header=header))
    else:
        header = None
        link = HisLinkInfo(peer=config.outer.his_name)  # the outer gate knows the HIS by name only
    outer_cfg = config.outer
    booking = BookingService(
        chamber, link, tz=tz, hold_seconds=outer_cfg.hold_expires if outer_cfg else 300.0, clock=reactor,
        max_backlog=outer_cfg.max_backlog if outer_cfg else 1000,
        retry_after=max(1, int(his.retry_max)) if his else 30,
        quotas=Quotas.from_config(config.platforms, tz),
    )
    metrics = Metrics(chamber)
    relays = []
    if gate in ("both", "inner"):
        inner, relay = _inner_gate(config, reactor, tz, chamber, booking, header, metrics)
        inner.setServiceParent(root)
        relays.append(relay)
        root.his_clients = [lane.destination.client for lane in relay.lanes]
    if gate in ("both", "outer"):
        HoldsService(booking).setServiceParent(root)
        listener, root.api, root.tls_switch = _outer_gate(config, reactor, tz, chamber, booking, metrics)
        listener.setServiceParent(root)
    if config.admin is not None:  # last to start, first to stop
        admin_site = web_server.Site(AdminResource(chamber, metrics, relays))
        admin_site.log = lambda request: None
        admin = StreamServerEndpointService(endpoints.serverFromString(reactor, config.admin.listen), admin_site)
        admin._raiseSynchronously = True
        admin.setName("admin")
        admin.setServiceParent(root)
    root.chamber = chamber  # for the CLI's ready message and tests
    root.metrics = metrics
    root.config, root.booking, root.reactor = config, booking, reactor  # for reload()
    return root


def _inner_gate(config, reactor, tz, chamber, booking, header, metrics):
    """Intranet side: the relay (and poller) towards the HIS, and the MLLP listener for its notifications."""
    his = config.inner.his
    gate = service.MultiService()
    gate.setName("inner")
    slot_book = SlotBook(tz)
    inbound = InboundService(chamber, slot_book)
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
    relay = Relay(chamber, his.name, lanes, booking.on_answer, clock=reactor,
                  ack_timeout=his.ack_timeout, retry_initial=his.retry_initial, retry_max=his.retry_max,
                  max_attempts=his.max_attempts, max_age=his.max_age, on_dead=booking.on_dead,
                  ordering=his.ordering, encode=booking.encode, send_types=tuple(his.send_types), metrics=metrics)
    relay.setServiceParent(gate)
    if his.slot_source == "poll":
        SlotPoller(his_client(64 << 20), inbound, peer=his.name,
                   build_query=functools.partial(build_sqm_s25, header=header), interval=his.poll_interval,
                   days=his.poll_days, tz=tz, ack_timeout=his.ack_timeout, retry_initial=his.retry_initial,
                   retry_max=his.retry_max, clock=reactor).setServiceParent(gate)
    handler = InnerGateHandler(inbound, peer=his.name, sending_application=config.inner.sending_application,
                               sending_facility=config.inner.sending_facility, tz=tz, clock=reactor,
                               validation=config.inner.validation, accept_types=config.inner.accept_types,
                               on_answer=lambda outcome: metrics.hl7_answers.labels(outcome).inc())
    mllp_factory = MLLPServerFactory(
        handler, max_message_bytes=config.inner.max_message_bytes, default_charset=his.charset,
        idle_timeout=config.inner.idle_timeout, max_connections=config.inner.max_connections,
        sending_application=config.inner.sending_application, sending_facility=config.inner.sending_facility,
        clock=reactor, release=config.inner.mllp_release,
        tls=(mllp_tls.server_options(config.inner.tls.certificate, config.inner.tls.private_key,
                                     config.inner.tls.client_ca) if config.inner.tls is not None else None),
    )
    if config.inner.bind_device:
        port, interface = parse_tcp(config.inner.listen)
        inner_endpoint = DeviceServerEndpoint(reactor, port, interface, config.inner.bind_device)
    else:
        inner_endpoint = endpoints.serverFromString(reactor, config.inner.listen)
    listener = StreamServerEndpointService(inner_endpoint, mllp_factory)
    listener._raiseSynchronously = True
    listener.setName("inner-gate")
    listener.setServiceParent(gate)
    return gate, relay


def _outer_gate(config, reactor, tz, chamber, booking, metrics) -> service.Service:
    """Internet side: the FHIR API over HTTPS with mutual TLS."""
    platforms = PlatformDirectory.from_config(config.platforms)
    api = FhirApi(
        booking=booking, reader=chamber.read, platforms=platforms, tz=tz, base_path=config.outer.base_path,
        public_base_url=config.outer.public_base_url, answer_within=config.outer.answer_within,
        page_size=config.outer.page_size, hospital_name=config.hospital.name,
        software_version=software_version(), audit=AuditTrail(chamber), quotas=booking.quotas,
        rate_limiter=_rate_limiter(config, reactor),
        json_limits=JsonLimits(config.outer.max_json_depth, config.outer.max_string_chars), clock=reactor,
        strict_audit=config.audit.strict,
    )
    site = web_server.Site(api)
    site.requestFactory = request_factory(config.outer.max_request_bytes)
    site.displayTracebacks = False
    # requests are logged by the API as structured events; here they are only counted
    site.log = lambda request: metrics.http_answers.labels(str(request.code)).inc()
    tls_switch = TlsSwitch(tls_options(config.outer.tls))
    if config.outer.bind_device:
        outer_endpoint = DeviceServerEndpoint(reactor, config.outer.port, config.outer.host,
                                              config.outer.bind_device, tls=tls_switch)
    else:
        outer_endpoint = endpoints.SSL4ServerEndpoint(reactor, config.outer.port, tls_switch,
                                                      interface=config.outer.host)
    listener = StreamServerEndpointService(outer_endpoint, site)
    listener._raiseSynchronously = True
    listener.setName("outer-gate")
    return listener, api, tls_switch


def _rate_limiter(config, reactor) -> RateLimiter:
    limit = lambda rl: (rl.per_second, rl.burst) if rl is not None else None  # noqa: E731
    return RateLimiter({p.name: limit(p.rate_limit) for p in config.platforms}, limit(config.outer.rate_limit),
                       reactor)
