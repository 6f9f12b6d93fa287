"""The outer gate's edge in-process, on a task.Clock with connections in memory: connections limited at accept
(gateway/ops/listen.py ConnectionLimiter, reusable on the MLLP listener), deadlines no trickle can reset, the body
limit and the API's decisions before the body is read, and every answer twisted.web gave by itself an
OperationOutcome (adapters/outer/http.py), over the real FhirApi on a real chamber (the unit Gate of
tests/unit/outer_gate.py)."""

from __future__ import annotations

import http.client
import io
import json
import resource as rlimit
import time
from types import SimpleNamespace

import pytest
from OpenSSL import crypto
from structlog.testing import capture_logs
from twisted.internet import protocol, task
from twisted.internet.error import ConnectionDone
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import StringTransport
from twisted.python import failure
from twisted.web import resource

from adapters.outer.http import CLOSE_GRACE, MAX_HEADERS, GatewaySite
from gateway.ops.devca import init_dev_ca
from gateway.ops.listen import (ACCEPTS_PER_TURN, ConnectionLimiter, DescriptorShortage, GatePort, descriptor_needs,
                            ensure_descriptors, source_key)
from tests.unit.outer_gate import PLATFORMS, SID, appointment

LIMIT = 4096  # outer.max_request_bytes in these tests
DEADLINES = {"header_timeout": 10.0, "body_timeout": 30.0, "idle_timeout": 60.0}


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("certs")
    init_dev_ca(directory, platforms=(*PLATFORMS, "stranger"))
    return {p: crypto.load_certificate(crypto.FILETYPE_PEM, (directory / f"platform-{p}.pem").read_bytes())
            for p in (*PLATFORMS, "stranger")}


class Peer(StringTransport):
    """A TLS connection as the channel sees it: bytes in memory and the handshake's client certificate."""

    def __init__(self, cert):
        super().__init__(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
        self.cert = cert

    def getPeerCertificate(self):
        return self.cert


class Edge:
    """The outer gate's GatewaySite over a Gate's FhirApi, on the Gate's clock."""

    def __init__(self, gate, api=None):
        self.gate, self.answered, self.timed_out = gate, [], []
        self.site = GatewaySite(api or gate.api, reactor=gate.clock, max_request_bytes=LIMIT, **DEADLINES,
                                answered=self.answered.append, timed_out=self.timed_out.append)

    def connect(self, platform: str = "demo"):
        channel = self.site.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
        transport = Peer(self.gate.certs[platform])
        channel.makeConnection(transport)
        return channel, transport


@pytest.fixture
def edge(gate):
    return Edge(gate)


class _Written(io.BytesIO):
    """What was written to a transport, read answer after answer by http.client (which closes each when read)."""

    def close(self):
        pass

    def makefile(self, mode):
        return self


def answers(transport) -> list[SimpleNamespace]:
    """The HTTP answers written to ``transport``, in order (100 Continue skipped, as clients do)."""
    data = transport.value()
    stream, out = _Written(data), []
    while stream.tell() < len(data):
        r = http.client.HTTPResponse(stream)
        r.begin()
        body = r.read()
        out.append(SimpleNamespace(status=r.status, headers={k.lower(): v for k, v in r.getheaders()},
                                   json=json.loads(body) if body else None))
    return out


def outcome(answer, status: int, code: str) -> str:
    assert answer.status == status, answer.json
    assert answer.headers["content-type"].startswith("application/fhir+json")
    assert answer.json["resourceType"] == "OperationOutcome" and answer.json["issue"][0]["code"] == code
    assert "server" not in answer.headers
    return answer.json["issue"][0]["diagnostics"]


def post(path: str, length: int | None, extra: bytes = b"") -> bytes:
    size = b"Content-Length: %d\r\n" % length if length is not None else b"Transfer-Encoding: chunked\r\n"
    return b"POST /fhir" + path.encode() + b" HTTP/1.1\r\nHost: gw\r\nContent-Type: application/fhir+json\r\n" + \
        size + extra + b"\r\n"


# -- deadlines -------------------------------------------------------------------------------------------------------
def test_a_trickle_of_header_bytes_does_not_reset_the_header_deadline(edge, gate):
    channel, transport = edge.connect()
    channel.dataReceived(b"GET /fhir/metadata HTTP/1.1\r\nX-Slow: ")
    for _ in range(9):
        gate.clock.advance(1)
        channel.dataReceived(b"a")
    assert not transport.value() and not transport.disconnecting
    gate.clock.advance(1)  # 10 s since the first byte: outer.header_timeout
    [answer] = answers(transport)
    assert "headers did not arrive within 10 s" in outcome(answer, 408, "timeout")
    assert answer.headers["connection"] == "close" and transport.disconnecting
    assert edge.timed_out == ["header"] and edge.answered == [408]


def test_a_trickle_of_body_bytes_does_not_reset_the_body_deadline(edge, gate):
    channel, transport = edge.connect()
    channel.dataReceived(post("/Appointment", 100))
    for _ in range(29):
        gate.clock.advance(1)
        channel.dataReceived(b"{")
    assert not transport.value()
    gate.clock.advance(1)  # 30 s since the headers: outer.body_timeout
    assert "body did not arrive within 30 s" in outcome(answers(transport)[0], 408, "timeout")
    assert edge.timed_out == ["body"]


def test_an_idle_connection_is_closed_and_a_keep_alive_one_waits_again_for_its_next_request(edge, gate):
    channel, transport = edge.connect()
    gate.clock.advance(59)
    channel.dataReceived(b"GET /fhir/metadata HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert answers(transport)[0].status == 200
    gate.clock.advance(59)  # the idle deadline starts again after each answer
    assert not transport.disconnecting
    gate.clock.advance(1)
    assert transport.disconnecting and len(answers(transport)) == 1  # closed without a word
    assert edge.timed_out == ["idle"]
    gate.clock.advance(CLOSE_GRACE)
    assert transport.disconnected  # a client that does not go is cut


def test_pipelined_requests_are_each_answered_in_order(edge, gate):
    channel, transport = edge.connect()
    channel.dataReceived(b"GET /fhir/metadata HTTP/1.1\r\nHost: gw\r\n\r\nGET /fhir/Slot/nope HTTP/1.1\r\n"
                         b"Host: gw\r\n\r\n")
    assert [a.status for a in answers(transport)] == [200, 404]
    assert not transport.disconnecting


# -- the body limit and the API's decisions, before the body ---------------------------------------------------------
def test_a_content_length_over_the_limit_is_413_before_the_body_without_100_continue(edge, gate):
    channel, transport = edge.connect()
    with capture_logs() as logs:
        channel.dataReceived(post("/Appointment", 10 << 30, b"Expect: 100-continue\r\n"))
    assert b"100 Continue" not in transport.value()
    [answer] = answers(transport)
    assert str(LIMIT) in outcome(answer, 413, "too-long")
    assert answer.headers["connection"] == "close" and transport.disconnecting
    channel.dataReceived(b"x" * 100_000)  # what the client still sends is dropped, not kept
    assert channel._dataBuffer == [] and len(answers(transport)) == 1
    assert [(e["received"], e["declared"]) for e in logs if e["event"] == "outer.body_cut"] == [(0, 10 << 30)]
    [record] = gate.audit()
    assert (record.platform, record.action, record.outcome) == ("demo", "book", 413)


def test_a_chunked_body_is_cut_at_the_limit(edge, gate):
    channel, transport = edge.connect()
    channel.dataReceived(post("/Appointment", None))
    chunk = b"400\r\n" + b"x" * 1024 + b"\r\n"
    with capture_logs() as logs:
        for _ in range(LIMIT // 1024):
            channel.dataReceived(chunk)
        assert not transport.value()  # up to the limit the body is read
        channel.dataReceived(chunk)
    outcome(answers(transport)[0], 413, "too-long")
    assert transport.disconnecting
    [cut] = [e for e in logs if e["event"] == "outer.body_cut"]
    assert LIMIT < cut["received"] <= LIMIT + 2 * len(chunk) and cut["declared"] is None


def test_an_unregistered_certificate_is_refused_before_its_body_and_audited(edge, gate):
    channel, transport = edge.connect("stranger")
    channel.dataReceived(post("/Appointment", 20 << 20))
    assert "not registered" in outcome(answers(transport)[0], 403, "security")
    assert transport.disconnecting
    [record] = gate.audit()
    assert (record.subject, record.action, record.outcome) == ("CN=platform-stranger,O=gatewayd dev", "book", 403)


def test_a_route_without_the_platforms_scope_is_refused_before_the_body(edge, gate):
    channel, transport = edge.connect("readonly")
    channel.dataReceived(post("/Appointment", 1000))
    assert "Appointment.write" in outcome(answers(transport)[0], 403, "forbidden")
    channel, transport = edge.connect("demo")
    channel.dataReceived(post("/Slot", 1000))
    outcome(answers(transport)[0], 405, "not-supported")


def test_rate_limits_are_decided_once_before_the_body(edge, gate):
    """'limited' may send 2 requests at once: the third is 429 at its headers, and the two admitted did not
    spend a second token each when their bodies were in."""
    body = b'{"resourceType": "Appointment"}'  # admitted, then refused for what it says (400)
    for _ in range(2):
        channel, transport = edge.connect("limited")
        channel.dataReceived(post("/Appointment", len(body)))
        channel.dataReceived(body)
        assert answers(transport)[0].status == 400
    channel, transport = edge.connect("limited")
    channel.dataReceived(post("/Appointment", len(body)))
    assert outcome(answers(transport)[0], 429, "throttled")


def test_an_admitted_body_within_the_limit_is_read_and_answered(edge, gate):
    body = json.dumps(appointment(SID[1])).encode()
    channel, transport = edge.connect()
    channel.dataReceived(post("/Appointment", len(body), b"Expect: 100-continue\r\n"))
    assert transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    channel.dataReceived(body)
    gate.clock.advance(5)
    [answer] = answers(transport)
    assert answer.status == 202 and answer.json["resourceType"] == "Appointment"
    assert not transport.disconnecting


# -- twisted.web's own answers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("request_bytes, status, code", [
    (b"GET /fhir/metadata\r\n\r\n", 400, "structure"),
    (b"GET /fhir/metadata HTTP/1.1\r\nBad Header\r\n\r\n", 400, "structure"),
    (b"GET /fhir/metadata HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(MAX_HEADERS + 1)) + b"\r\n",
     431, "too-costly"),
    (b"GET /fhir/metadata HTTP/1.1\r\n" + b"X-A: " + b"y" * 9000 + b"\r\nX-B: " + b"y" * 9000 + b"\r\n\r\n",
     431, "too-long"),
    (b"GET /fhir/metadata HTTP/1.1\r\nX-Long: " + b"y" * 20000, 431, "too-long"),
    (b"GET /fhir/" + b"y" * 20000, 414, "too-long"),
    (b"POST /fhir/Appointment HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501, "not-supported"),
    (b"POST /fhir/Appointment HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "structure"),
    (b"POST /fhir/Appointment HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n", 400,
     "structure"),
    (b"GET /fhir/metadata HTTP/1.1\r\nExpect: telepathy\r\n\r\n", 417, "not-supported"),
])
def test_what_twisted_answered_by_itself_is_an_operation_outcome(edge, request_bytes, status, code):
    channel, transport = edge.connect()
    channel.dataReceived(request_bytes)
    [answer] = answers(transport)
    outcome(answer, status, code)
    assert answer.headers["connection"] == "close" and transport.disconnecting
    assert edge.answered == [status]


def test_no_answer_names_the_server_software(edge):
    channel, transport = edge.connect()
    channel.dataReceived(b"GET /fhir/metadata HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert answers(transport)[0].status == 200
    assert b"server:" not in transport.value().lower() and b"twisted" not in transport.value().lower()


def test_a_request_for_star_is_answered_by_the_api(edge):
    channel, transport = edge.connect()
    channel.dataReceived(b"OPTIONS * HTTP/1.1\r\nHost: gw\r\n\r\n")
    outcome(answers(transport)[0], 404, "not-found")


def test_an_exception_that_escapes_the_api_is_a_500_operation_outcome(gate):
    class Broken(resource.Resource):  # stands in for an API with a bug: FhirApi lets nothing escape
        isLeaf = True

        def admit(self, request):
            return False

        def render(self, request):
            raise RuntimeError("a bug")

    channel, transport = Edge(gate, Broken()).connect()
    with capture_logs() as logs:
        channel.dataReceived(b"GET /fhir/metadata HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert "internal error" in outcome(answers(transport)[0], 500, "exception")
    assert b"a bug" not in transport.value()
    assert any(e["event"] == "outer.internal_error" for e in logs)


# -- the TLS handshake's deadline ------------------------------------------------------------------------------------
def test_a_tls_handshake_not_done_in_time_is_cut(tmp_path):
    from adapters.outer.tls import HandshakeWatch, tls_options
    from adapters.tls import TlsSwitch

    init_dev_ca(tmp_path, platforms=("demo",))
    tls = SimpleNamespace(certificate=tmp_path / "server.pem", private_key=tmp_path / "server.key",
                          client_ca=tmp_path / "ca.pem", client_certificates="required")
    clock, timeouts = task.Clock(), []
    watch = HandshakeWatch(TlsSwitch(tls_options(tls)), protocol.Factory.forProtocol(protocol.Protocol),
                           lambda peer, why: None, clock=clock, handshake_timeout=10,
                           on_timeout=lambda: timeouts.append(1))
    connection = watch.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
    transport = StringTransport()
    connection.makeConnection(transport)
    connection.dataReceived(b"\x16\x03\x01\x02\x00")  # a ClientHello's record header, then a trickle of it
    for _ in range(9):
        clock.advance(1)
        connection.dataReceived(b"\x00")
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnected and timeouts == [1]
    connection.connectionLost(failure.Failure(ConnectionAbortedError()))
    assert not clock.getDelayedCalls()
    silent = watch.buildProtocol(IPv4Address("TCP", "192.0.2.8", 40000))  # TLS starts with the first byte:
    silent.makeConnection(StringTransport())  # one that sends nothing and goes needs no TLS
    silent.connectionLost(failure.Failure(ConnectionDone()))
    assert not clock.getDelayedCalls() and timeouts == [1]


def test_a_flood_of_failed_handshakes_is_logged_once_per_interval_and_each_counted():
    from gateway.ops.admin import Metrics
    from gateway.chamber.engine import Chamber
    from gateway.ops.listen import handshake_failures

    clock, metrics = task.Clock(), Metrics(Chamber(":memory:", clock=time.time))
    failed = handshake_failures(metrics, "outer", clock=clock)
    with capture_logs() as logs:
        for i in range(100):
            failed(IPv4Address("TCP", f"198.51.100.{1 + i % 2}", 40000),
                   failure.Failure(ValueError("peer did not return a certificate")))
        clock.advance(10)
    lines = [e for e in logs if e["event"] == "tls.handshake_failed"]
    assert [e["refused"] for e in lines] == [1, 99] and lines[1]["sources"] == 2
    assert lines[1]["error"] == "peer did not return a certificate" and lines[1]["gate"] == "outer"
    assert metrics.registry.get_sample_value("gatewayd_tls_handshake_failures_total", {"gate": "outer"}) == 100


# -- connection limits -----------------------------------------------------------------------------------------------
class Limited:
    """A ConnectionLimiter over a plain factory, its refusals counted as a metric would."""

    def __init__(self, **limits):
        self.clock, self.refused = task.Clock(), []
        self.limiter = ConnectionLimiter(protocol.Factory.forProtocol(protocol.Protocol), gate="test",
                                         clock=self.clock, refused=self.refused.append, **limits)

    def connect(self, host: str):
        address = (IPv6Address if ":" in host else IPv4Address)("TCP", host, 40000)
        held = self.limiter.buildProtocol(address)
        if held is not None:
            held.makeConnection(StringTransport(peerAddress=address))
        return held


def test_connections_are_limited_per_source_and_in_all():
    limited = Limited(max_connections=3, max_per_address=2)
    a1, a2 = limited.connect("198.51.100.1"), limited.connect("198.51.100.1")
    assert a1 is not None and a2 is not None
    assert limited.connect("198.51.100.1") is None  # its source holds 2
    b1 = limited.connect("198.51.100.2")
    assert limited.connect("198.51.100.3") is None  # 3 in all
    assert limited.refused == ["per_address", "total"] and limited.limiter.open == 3
    a1.connectionLost(failure.Failure(ConnectionError()))  # a connection that ends frees its place
    assert limited.connect("198.51.100.3") is not None and limited.limiter.open == 3
    assert b1 is not None


def test_an_ipv6_64_is_one_source():
    assert source_key(IPv6Address("TCP", "2001:db8:1:2:aaaa::1", 1)) == "2001:db8:1:2::/64"
    assert source_key(IPv6Address("TCP", "::ffff:198.51.100.7", 1)) == "198.51.100.7"
    limited = Limited(max_connections=10, max_per_address=1)
    assert limited.connect("2001:db8:1:2::1") is not None
    assert limited.connect("2001:db8:1:2::2") is None
    assert limited.connect("2001:db8:1:3::1") is not None


def test_reserved_addresses_have_capacity_no_other_source_can_take():
    """As on an MLLP listener: the HIS (10.0.0.5) has 2 connections of its own; others fill the rest and can
    never take those; when the HIS holds its 2 it competes for the shared ones like anyone."""
    limited = Limited(max_connections=2, max_per_address=2, reserved=["10.0.0.5"], reserved_connections=2)
    assert [limited.connect(h) is not None for h in ("10.0.0.7", "10.0.0.8", "10.0.0.9")] == [True, True, False]
    assert limited.connect("10.0.0.5") is not None and limited.connect("10.0.0.5") is not None
    assert limited.connect("10.0.0.5") is None  # its 2 and the shared ones are taken
    assert limited.refused == ["total", "total"] and limited.limiter.open == 4
    limited = Limited(max_connections=2, max_per_address=2, reserved=["::ffff:10.0.0.5"], reserved_connections=1)
    his = [limited.connect("10.0.0.5") for _ in range(3)]  # its reserved one, then two shared
    assert [h.pool for h in his] == ["reserved", "shared", "shared"]
    assert limited.connect("10.0.0.7") is None
    his[1].connectionLost(failure.Failure(ConnectionError()))
    assert limited.connect("10.0.0.7") is not None


def test_refusals_are_logged_once_per_interval_with_their_count():
    limited = Limited(max_connections=1, max_per_address=1)
    limited.connect("198.51.100.1")
    with capture_logs() as logs:
        for i in range(500):
            limited.connect(f"198.51.100.{2 + i % 3}")
        limited.clock.advance(10)
        limited.clock.advance(10)  # nothing more refused: nothing more logged
    lines = [e for e in logs if e["event"] == "connections.refused"]
    assert [e["refused"] for e in lines] == [1, 499]
    assert lines[1]["reasons"] == "total: 499" and lines[1]["sources"] == 3 and lines[1]["gate"] == "test"
    assert len(limited.refused) == 500 and not limited.clock.getDelayedCalls()


# -- descriptors -----------------------------------------------------------------------------------------------------
def test_a_gate_port_accepts_a_few_connections_per_reactor_turn():
    """A flood of connects waiting in the kernel's backlog is taken ACCEPTS_PER_TURN at a time, so the reactor
    serves the connections already open between turns (Twisted's own port took 100 and more per turn, growing
    while connects kept coming: under a siege the legitimate traffic waited behind them). Real sockets; the
    port's turns are called by hand, the reactor does not run."""
    import socket

    from twisted.internet import reactor

    built = []

    class Count(protocol.Factory):
        def buildProtocol(self, addr):
            built.append(addr)
            return None  # refused, as the connection limiter refuses: closed at once

    port = GatePort(0, Count(), 128, "127.0.0.1", reactor)
    port.startListening()
    clients = []
    try:
        for _ in range(3 * ACCEPTS_PER_TURN + 5):
            clients.append(socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5))
        turns = []
        while len(built) < len(clients) and len(turns) < 10:
            before = len(built)
            port.doRead()
            turns.append(len(built) - before)
        assert turns[:3] == [ACCEPTS_PER_TURN] * 3 and sum(turns) == len(clients), turns
    finally:
        for c in clients:
            c.close()
        port.stopListening()


def test_the_descriptors_the_limits_need_name_their_keys():
    his = SimpleNamespace(window=2, slot_source="poll")
    inner = SimpleNamespace(max_connections=32, his=his, endpoints=[his], his_addresses=[], his_connections=8)
    config = SimpleNamespace(outer=SimpleNamespace(max_connections=2048), inner=inner, admin=object())
    needs = dict(descriptor_needs(config, "both"))
    assert needs["outer.max_connections"] == 2048 and needs["inner.max_connections"] == 32
    assert sum(needs.values()) == 2048 + 32 + 6 + 16 + 12 + 64
    inner.his_addresses = ["10.1.2.3"]  # the HIS's reserved connections come on top
    assert dict(descriptor_needs(config, "both"))["inner.his_connections"] == 8
    assert "inner.max_connections" not in dict(descriptor_needs(config, "outer"))
    assert "outer.max_connections" not in dict(descriptor_needs(config, "inner"))


def test_limits_that_do_not_fit_the_descriptor_limit_are_refused_naming_the_keys():
    hard = rlimit.getrlimit(rlimit.RLIMIT_NOFILE)[1]
    too_many = (hard if hard != rlimit.RLIM_INFINITY else 1 << 30) + 1
    with pytest.raises(DescriptorShortage) as refused:
        ensure_descriptors([("outer.max_connections", too_many), ("inner.max_connections", 32)])
    assert "outer.max_connections" in str(refused.value) and "LimitNOFILE" in str(refused.value)
    assert ensure_descriptors([("outer.max_connections", 10)]) == rlimit.getrlimit(rlimit.RLIMIT_NOFILE)[0]


# -- memory a flood leaves behind ------------------------------------------------------------------------------------
def rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def test_memory_closed_connections_freed_is_handed_back_to_the_system():
    """As a flood's TLS buffers: 100 MB freed below one that is still in use stays with the process (glibc
    cannot shrink its heap past it) until the service's next tick hands it back."""
    from gateway.ops.services import MemoryTrimService

    clock = task.Clock()
    trim = MemoryTrimService(clock, every=60)
    assert trim.trim is not None  # glibc
    trim.startService()
    buffers = [bytearray(64 << 10) for _ in range(1600)]
    last = buffers.pop()
    del buffers[:]
    freed = rss_mb()
    clock.advance(60)
    assert rss_mb() < freed - 50
    trim.stopService()
    assert not clock.getDelayedCalls() and len(last) == 64 << 10
