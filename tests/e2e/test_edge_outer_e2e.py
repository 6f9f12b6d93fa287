"""The outer gate's edge against the running daemon, over real TCP and TLS: what an anonymous or hostile
client can hold — connections, bytes, time — is bounded, and the lock (platforms' requests, the HIS's
messages) keeps working while it tries.

The gateway runs with RLIMIT_NOFILE 1024 (as a unit without LimitNOFILE gets), short deadlines and a
connection limit that fits; attackers connect from other loopback addresses (127.0.0.2 ...) than the
platform (127.0.0.1)."""

from __future__ import annotations

import http.client
import io
import json
import resource
import select
import socket
import ssl
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from adapters.hl7.er7 import parse
from gateway.ops.devca import issue_client_cert
from tests.e2e.harness import Lock, Proc, appointment_for, eventually, free_port, mllp_exchange, read_jsonl

LIMIT = 1 << 20  # outer.max_request_bytes (the default)
DEADLINES = {"tls_handshake_timeout": "5s", "header_timeout": "2s", "body_timeout": "3s", "idle_timeout": "30s"}
CONNECTIONS = {"max_connections": 600, "max_connections_per_address": 64}


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096 <= hard:  # this test process holds the attackers' 1,100 sockets itself
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))
    lock = Lock(tmp_path_factory.mktemp("edge"), descriptor_limit=(1024, 1024))
    lock.admin_port = free_port()
    lock.gateway_config["admin"] = {"listen": f"tcp:{lock.admin_port}:interface=127.0.0.1"}
    lock.gateway_config["outer"].update(DEADLINES, **CONNECTIONS)
    lock.gateway_config["platforms"][1]["scopes"] = ["Slot.read", "Schedule.read"]
    lock.write_configs()
    with lock:
        yield lock


# -- clients ---------------------------------------------------------------------------------------------------------
def tls_socket(lock, platform: str = "demo", cert: tuple | None = None) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(lock.certs / "ca.pem"))
    ctx.load_cert_chain(*(cert or lock.cert(platform)))
    raw = socket.create_connection(("127.0.0.1", lock.fhir_port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


class _Received:
    """Bytes received, read back as an HTTP answer by http.client."""

    def __init__(self, data: bytes):
        self.data = data

    def makefile(self, mode):
        return io.BytesIO(self.data)


def http_answer(data: bytes):
    """(status, headers with lower-case names, JSON body or None) of an answer received whole."""
    assert data, "the gateway closed the connection without an answer"
    response = http.client.HTTPResponse(_Received(data))
    response.begin()
    body = response.read()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(body) if body else None


def operation_outcome(data: bytes, status: int) -> dict:
    got, headers, body = http_answer(data)
    assert got == status, (got, body)
    assert headers["content-type"].startswith("application/fhir+json")
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["severity"] == "error"
    assert "server" not in headers
    return body["issue"][0]


def exchange(sock: ssl.SSLSocket, head: bytes, body: bytes = b"", *, body_bytes: int = 0, chunked: bool = False,
             within: float = 10.0) -> tuple[bytes, int | None]:
    """Send ``head`` (and ``body``, then up to ``body_bytes`` more of body, as fast as the gateway reads them) while
    reading the gateway's answer until it closes the connection: (the answer, how many body bytes had been sent
    when its first byte arrived)."""
    sock.sendall(head + body)
    sock.setblocking(False)
    sent, pending, received, sent_at_answer = 0, b"", b"", None
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        sending = sent < body_bytes or pending
        readable, writable, _ = select.select([sock], [sock] if sending else [], [], 0.05)
        if readable or sock.pending():
            try:
                data = sock.recv(65536)
            except ssl.SSLWantReadError:
                data = None
            except (ConnectionError, ssl.SSLError):
                break
            if data == b"":
                break
            if data:
                sent_at_answer = sent if sent_at_answer is None else sent_at_answer
                received += data
        if writable and sent_at_answer is None:
            if not pending:
                piece = b"x" * min(65536, body_bytes - sent)
                pending = (b"%x\r\n%s\r\n" % (len(piece), piece)) if chunked else piece
            try:
                n = sock.send(pending)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                continue
            except OSError:
                body_bytes = sent
                continue
            sent += n
            pending = pending[n:]
    return received, sent_at_answer


def trickle(sock: ssl.SSLSocket, head: bytes, drip: bytes, every: float, within: float) -> tuple[bytes, float]:
    """Send ``head``, then ``drip`` one byte every ``every`` seconds until the gateway answers or closes (or
    ``within`` seconds pass): (what it answered, seconds from the first byte)."""
    started = time.monotonic()
    sock.sendall(head)
    received, i = b"", 0
    while time.monotonic() - started < within:
        readable, _, _ = select.select([sock], [], [], every)
        if readable:
            try:
                data = sock.recv(65536)
            except (ConnectionError, ssl.SSLError):
                break
            if not data:
                break
            received += data
            continue
        try:
            sock.sendall(drip[i % len(drip):][:1])
        except OSError:
            break
        i += 1
    return received, time.monotonic() - started


def plain_connections(lock, count: int, sources: list[str]) -> list[socket.socket]:
    """``count`` TCP connections to the FHIR port that send nothing (no TLS), spread over ``sources``."""
    out = []
    for i in range(count):
        s = socket.socket()
        s.bind((sources[i % len(sources)], 0))
        s.settimeout(10)
        s.connect(("127.0.0.1", lock.fhir_port))
        out.append(s)
    return out


def metric(lock, name: str, **labels) -> float:
    text = requests.get(f"http://127.0.0.1:{lock.admin_port}/metrics", timeout=5).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def log_events(lock, event: str) -> list[dict]:
    return [e for e in read_jsonl(lock.gateway.log_path) if e.get("event") == event]


def siu(control_id: str) -> bytes:
    return ("MSH|^~\\&|HIS|HOSPITAL|GATEWAYD|FRONT|20301010120000||SIU^S23^SIU_S12|" + control_id + "|P|2.5\r"
            "SCH|||||D001^x||||15|MIN|^^15^203010100800^203010100815|||||||||||||Blocked\r"
            "RGS|1\rAIS|1||x^y|203010100800|||15|MIN\r").encode()


def post_head(length: int | None, *, path: str = "/fhir/Appointment", extra: str = "") -> bytes:
    size = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/fhir+json\r\n{size}{extra}"
            f"\r\n").encode()


# -- connections -----------------------------------------------------------------------------------------------------
def test_a_flood_of_plain_connections_is_refused_at_accept_and_the_lock_still_works(edge):
    """Finding 1: 1,100 plain TCP connections (no TLS) no longer exhaust the descriptors: from one address the
    extras are refused at accept (per address), from many the total is held; a platform's request and the
    HIS's message still succeed while they are open, and the refusals are counted and logged once."""
    pooled = edge.session()  # a platform's keep-alive connection, open before the flood
    assert pooled.get(f"{edge.base}/metadata", timeout=5).status_code == 200
    flood = plain_connections(edge, 1100, ["127.0.0.2"])
    try:
        assert edge.session().get(f"{edge.base}/Slot", timeout=10).status_code == 200
        assert parse(mllp_exchange(edge.mllp_port, siu("EDGE-FLOOD-1"))).segment("MSA").get(1) == "AA"
        eventually(lambda: metric(edge, "gatewayd_connections_refused_total", gate="outer",
                                  reason="per_address") >= 1000, timeout=10, what="the flood past 64 to be refused")
    finally:
        for s in flood:
            s.close()
    eventually(lambda: metric(edge, "gatewayd_connections_open", gate="outer") <= 2,
               what="the flood's connections to go")
    flood = plain_connections(edge, 1100, [f"127.0.0.{i}" for i in range(3, 23)])  # 55 each: the total is hit
    try:
        assert pooled.get(f"{edge.base}/Slot", timeout=10).status_code == 200
        assert parse(mllp_exchange(edge.mllp_port, siu("EDGE-FLOOD-2"))).segment("MSA").get(1) == "AA"
        # (the port takes a few connects per reactor turn: the platform and the HIS may be served before the
        # last of the flood is taken from the kernel's backlog and refused)
        eventually(lambda: metric(edge, "gatewayd_connections_refused_total", gate="outer", reason="total") >= 400,
                   timeout=10, what="the flood past the total to be refused")
        assert metric(edge, "gatewayd_connections_open", gate="outer") == CONNECTIONS["max_connections"]
    finally:
        for s in flood:
            s.close()

    def logged():  # one line at the first refusal, then one per 10 s with the count: not one per connection
        lines = [e for e in log_events(edge, "connections.refused") if e["gate"] == "outer"]
        return lines if sum(e["refused"] for e in lines) >= 1400 else None

    lines = eventually(logged, timeout=20, what="the refusals to be logged")
    assert len(lines) <= 4, lines
    assert edge.gateway.alive()


def test_a_connection_that_never_completes_its_tls_handshake_is_cut(edge):
    with socket.create_connection(("127.0.0.1", edge.fhir_port), timeout=15) as s:
        started = time.monotonic()
        s.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello, then nothing
        with pytest.raises(ConnectionResetError):  # cut (reset), not closed politely
            s.recv(1)
        assert 4 <= time.monotonic() - started <= 8  # outer.tls_handshake_timeout: 5 s
    assert metric(edge, "gatewayd_connection_timeouts_total", gate="outer", deadline="tls_handshake") >= 1


# -- time ------------------------------------------------------------------------------------------------------------
def test_a_trickle_of_header_bytes_hits_the_header_deadline(edge):
    """Finding 2: one byte at a time no longer keeps a request open: the headers' deadline runs from the first
    byte (408, then the connection is closed)."""
    with tls_socket(edge) as s:
        answer, took = trickle(s, b"GET /fhir/metadata HTTP/1.1\r\nHost: x\r\nX-Slow: ", b"abcdef", 0.5, 8)
    assert operation_outcome(answer, 408)["code"] == "timeout"
    assert 1.5 <= took <= 4  # outer.header_timeout: 2 s


def test_a_trickle_of_body_bytes_hits_the_body_deadline(edge):
    with tls_socket(edge) as s:
        answer, took = trickle(s, post_head(1000), b"{", 0.5, 8)
    assert operation_outcome(answer, 408)["code"] == "timeout"
    assert 2.5 <= took <= 5  # outer.body_timeout: 3 s


# -- bytes -----------------------------------------------------------------------------------------------------------
def body_cut(lock, since: int) -> dict:
    """The gateway's account of the last request whose body it did not read whole (bytes it took)."""
    return eventually(lambda: log_events(lock, "outer.body_cut")[since:], what="outer.body_cut")[-1]


def test_a_10_mib_post_is_refused_with_413_before_its_body(edge):
    """Finding 2: a Content-Length over outer.max_request_bytes is answered 413 before the body is read (it used
    to be read whole first); the connection is closed after the answer."""
    before = len(log_events(edge, "outer.body_cut"))
    with tls_socket(edge) as s:
        answer, sent = exchange(s, post_head(10 << 20), body_bytes=10 << 20)
    assert operation_outcome(answer, 413)["code"] == "too-long"
    cut = body_cut(edge, before)
    print(f"10 MiB POST: the gateway took {cut['received']} body bytes; {sent} had been sent when it answered")
    assert cut["received"] <= 64 << 10 and cut["declared"] == 10 << 20
    assert sent < 8 << 20


def test_a_chunked_10_mib_post_is_cut_at_the_limit(edge):
    before = len(log_events(edge, "outer.body_cut"))
    with tls_socket(edge) as s:
        answer, sent = exchange(s, post_head(None), body_bytes=10 << 20, chunked=True)
    assert operation_outcome(answer, 413)["code"] == "too-long"
    cut = body_cut(edge, before)
    print(f"chunked 10 MiB POST: the gateway took {cut['received']} body bytes; {sent} had been sent when it answered")
    assert LIMIT < cut["received"] <= LIMIT + (128 << 10) and cut["declared"] is None


def test_a_10_gib_content_length_gets_413_at_once(edge):
    """Finding 2: ``Content-Length: 10737418240`` with 5 MiB sent used to hang with no answer."""
    started = time.monotonic()
    with tls_socket(edge) as s:
        answer, _ = exchange(s, post_head(10 << 30), body_bytes=5 << 20, within=5)
    assert operation_outcome(answer, 413)["code"] == "too-long"
    assert time.monotonic() - started < 3


def test_expect_100_continue_over_the_limit_gets_the_refusal_not_a_100(edge):
    with tls_socket(edge) as s:
        answer, _ = exchange(s, post_head(10 << 20, extra="Expect: 100-continue\r\n"), within=5)
    assert operation_outcome(answer, 413)["code"] == "too-long"
    with tls_socket(edge) as s:
        s.sendall(post_head(20, extra="Expect: 100-continue\r\n"))
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n")


def test_an_unregistered_certificate_gets_403_before_its_20_mib_upload(edge):
    """Finding 2: a certificate of an unregistered subject is refused in the headers phase (it could upload
    20 MiB before its 403), and the refusal is audited like any other."""
    stranger = issue_client_cert(edge.certs, "stranger")
    started = time.monotonic()
    with tls_socket(edge, cert=stranger) as s:
        answer, sent = exchange(s, post_head(20 << 20), within=5)
    assert operation_outcome(answer, 403)["code"] == "security"
    assert sent == 0 and time.monotonic() - started < 3
    outcome, subject = edge.chamber_rows("SELECT outcome, subject FROM audit_records ORDER BY seq DESC LIMIT 1")[0]
    assert (outcome, subject) == (403, "CN=platform-stranger,O=gatewayd dev")


def test_a_platform_without_the_scope_is_refused_before_the_body(edge):
    with tls_socket(edge, "other") as s:  # 'other' may read slots and schedules, not book
        answer, sent = exchange(s, post_head(5 << 20), within=5)
    assert operation_outcome(answer, 403)["code"] == "forbidden"
    assert sent == 0


def test_an_ordinary_booking_still_goes_through(edge):
    slot = edge.search_slots(status="free")[0]["id"]
    r = edge.session().post(f"{edge.base}/Appointment", json=appointment_for(slot),
                            headers={"Content-Type": "application/fhir+json", "Expect": "100-continue"}, timeout=10)
    assert r.status_code in (201, 202), r.text
    assert "server" not in {k.lower() for k in r.headers}


# -- Twisted's own answers -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /fhir/metadata\r\n\r\n", 400),  # no HTTP version
    (b"GET /fhir/metadata HTTP/1.1\r\nBad Header\r\n\r\n", 400),
    (b"GET /fhir/metadata HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n", 431),
    (b"GET /fhir/metadata HTTP/1.1\r\nX-Long: " + b"y" * 20000 + b"\r\n\r\n", 431),
    (b"GET /fhir/" + b"y" * 20000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"POST /fhir/Appointment HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"POST /fhir/Appointment HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nnot-hex\r\n", 400),
    (b"POST /fhir/Appointment HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nab", 400),
    (b"GET /fhir/metadata HTTP/1.1\r\nExpect: telepathy\r\n\r\n", 417),
])
def test_twisteds_own_errors_are_operation_outcomes(edge, request_bytes, status):
    """Finding 8: what twisted.web answered by itself (a bare 400, or nothing) is an OperationOutcome with its
    status, and no header names the server software."""
    with tls_socket(edge) as s:
        answer, _ = exchange(s, request_bytes, within=5)
    operation_outcome(answer, status)


def test_no_header_names_the_server_software(edge):
    r = edge.session().get(f"{edge.base}/metadata", timeout=5)
    assert r.status_code == 200
    assert "server" not in {k.lower() for k in r.headers}
    assert not any("twisted" in v.lower() for v in r.headers.values())


# -- descriptors -----------------------------------------------------------------------------------------------------
def test_limits_that_do_not_fit_the_descriptor_limit_refuse_to_start_and_a_low_soft_limit_is_raised(tmp_path):
    """Finding 1: the default limits need more descriptors than a unit without LimitNOFILE gives (1,024): the
    gateway refuses to start naming the keys; with a higher hard limit it raises its soft one and starts."""
    lock = Lock(tmp_path, descriptor_limit=(1024, 1024))
    gateway = Proc("gateway", ["run", "--config", "gateway.yaml"], tmp_path, (1024, 1024))
    assert gateway.popen.wait(30) == 1
    text = gateway.log_path.read_text()
    assert "outer.max_connections" in text and "inner.max_connections" in text and "LimitNOFILE" in text
    gateway.stop()
    lock.descriptor_limit = (256, 16384)
    lock.start_gateway()
    try:
        limits = (f"/proc/{lock.gateway.popen.pid}/limits")
        line = next(x for x in open(limits) if x.startswith("Max open files"))
        assert line.split()[3:5] == ["16384", "16384"]
    finally:
        lock.stop()
