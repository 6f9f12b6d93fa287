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

from adapters.fhir.server import FhirApi, PlatformDirectory, request_factory
from adapters.inner_gate import HisDestination, InnerGateHandler, SlotPoller
from adapters.mapping.srm_booking import Hl7Header, build_sqm_s25, build_srm
from adapters.mllp.client import MLLPClient
from adapters.mllp.server import MLLPServerFactory
from gateway.booking import BookingService, HisLinkInfo, SlotBook
from gateway.chamber import Chamber
from gateway.config import GatewayConfig, normalise_subject
from gateway.inbound import InboundService
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


def make_service(config: GatewayConfig, reactor) -> service.MultiService:
    tz = ZoneInfo(config.hospital.timezone)
    his = config.inner.his
    root = service.MultiService()

    chamber = Chamber(config.chamber.path, reactor=reactor, clock=reactor.seconds)
    ChamberService(chamber).setServiceParent(root)

    header = Hl7Header(
        sending_application=config.inner.sending_application, sending_facility=config.inner.sending_facility,
        receiving_application=his.receiving_application, receiving_facility=his.receiving_facility,
        version=his.hl7_version, charset=his.charset,
    )
    booking = BookingService(
        chamber,
        HisLinkInfo(peer=his.name, charset=his.charset, cancel_trigger=his.cancel_message.split("^")[1],
                    build_srm=functools.partial(build_srm, header=header)),
        tz=tz, hold_seconds=config.outer.hold_expires, clock=reactor, max_backlog=his.max_backlog,
        retry_after=max(1, int(his.retry_max)),
    )
    slot_book = SlotBook(tz)
    inbound = InboundService(chamber, slot_book)

    his_endpoint = endpoints.HostnameEndpoint(reactor, his.host, his.port, timeout=his.connect_timeout)
    lanes = [HisDestination(MLLPClient(reactor, his_endpoint, default_charset=his.charset,
                                       max_message_bytes=config.inner.max_message_bytes, clock=reactor,
                                       connect_timeout=his.connect_timeout))
             for _ in range(his.window)]
    Relay(chamber, his.name, lanes, booking.on_answer, clock=reactor,
          ack_timeout=his.ack_timeout, retry_initial=his.retry_initial, retry_max=his.retry_max,
          max_attempts=his.max_attempts, max_age=his.max_age, on_dead=booking.on_dead, ordering=his.ordering,
          ).setServiceParent(root)
    if his.slot_source == "poll":
        query_client = MLLPClient(reactor, his_endpoint, default_charset=his.charset,
                                  max_message_bytes=64 << 20, clock=reactor, connect_timeout=his.connect_timeout)
        SlotPoller(query_client, inbound, peer=his.name,
                   build_query=functools.partial(build_sqm_s25, header=header), interval=his.poll_interval,
                   days=his.poll_days, tz=tz, ack_timeout=his.ack_timeout, retry_initial=his.retry_initial,
                   retry_max=his.retry_max, clock=reactor).setServiceParent(root)
    HoldsService(booking).setServiceParent(root)

    # inner gate: the HIS's notifications
    handler = InnerGateHandler(inbound, peer=his.name, sending_application=config.inner.sending_application,
                               sending_facility=config.inner.sending_facility, tz=tz, clock=reactor)
    mllp_factory = MLLPServerFactory(
        handler, max_message_bytes=config.inner.max_message_bytes, default_charset=his.charset,
        idle_timeout=config.inner.idle_timeout, max_connections=config.inner.max_connections,
        sending_application=config.inner.sending_application, sending_facility=config.inner.sending_facility,
        clock=reactor,
    )
    inner = StreamServerEndpointService(endpoints.serverFromString(reactor, config.inner.listen), mllp_factory)
    inner._raiseSynchronously = True
    inner.setName("inner-gate")
    inner.setServiceParent(root)

    # outer gate: platforms over HTTPS
    platforms = PlatformDirectory([(p.name, normalise_subject(p.certificate_subject)) for p in config.platforms])
    api = FhirApi(
        booking=booking, reader=chamber.read, platforms=platforms, tz=tz, base_path=config.outer.base_path,
        public_base_url=config.outer.public_base_url, answer_within=config.outer.answer_within,
        page_size=config.outer.page_size, hospital_name=config.hospital.name,
        software_version=software_version(),
    )
    site = web_server.Site(api)
    site.requestFactory = request_factory(config.outer.max_request_bytes)
    site.displayTracebacks = False
    site.log = lambda request: None  # requests are logged by the API as structured events
    outer_endpoint = endpoints.SSL4ServerEndpoint(reactor, config.outer.port, tls_options(config.outer.tls),
                                                  interface=config.outer.host)
    outer = StreamServerEndpointService(outer_endpoint, site)
    outer._raiseSynchronously = True
    outer.setName("outer-gate")
    outer.setServiceParent(root)

    root.chamber = chamber  # for the CLI's ready message and tests
    return root

