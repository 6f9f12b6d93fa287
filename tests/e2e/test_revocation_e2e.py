"""Revocation and TLS material on SIGHUP, with the real daemon: a certificate revoked in the CRL file is
refused after SIGHUP while the process keeps running and other platforms keep working; an SPKI pin admits
only its key; the MLLP listener takes a renewed certificate on SIGHUP without dropping an open connection;
failed handshakes are counted per gate in /metrics."""

import signal
import socket
import ssl

import pytest
import requests
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from adapters.outer.access import spki_sha256
from adapters.hl7.er7 import parse
from adapters.inner.framing import frame
from gateway.ops.devca import init_dev_ca, write_crl
from tests.e2e.harness import Lock, eventually, free_port, read_jsonl

SIU = ("MSH|^~\\&|HIS|HOSPITAL|GATEWAYD|FRONT|20301010120000||SIU^S24^SIU_S12|{id}|P|2.5\r"
       "SCH|||||D001^x||||15|MIN|^^15^203010100800^203010100815|||||||||||||Open\r"
       "RGS|1\rAIS|1||x^y|203010100800|||15|MIN\r")
TLS = {"certificate": "certs/server.pem", "private_key": "certs/server.key", "client_ca": "certs/ca.pem"}


def status(lock, platform: str) -> int:
    return lock.session(platform).get(f"{lock.base}/metadata", timeout=10).status_code


def hup(lock) -> None:
    lock.write_configs()
    lock.gateway.popen.send_signal(signal.SIGHUP)


def test_a_certificate_revoked_in_the_crl_is_refused_after_sighup(tmp_path):
    lock = Lock(tmp_path)
    write_crl(lock.certs, [])  # an empty CRL to start with
    lock.gateway_config["outer"]["tls"]["crl"] = "certs/crl.pem"
    lock.write_configs()
    lock.start_gateway()
    try:
        pid = lock.gateway.popen.pid
        assert status(lock, "demo") == 200 and status(lock, "other") == 200
        write_crl(lock.certs, [lock.certs / "platform-demo.pem"])
        lock.gateway.popen.send_signal(signal.SIGHUP)
        r = eventually(lambda: [r for r in [lock.session("demo").get(f"{lock.base}/metadata", timeout=10)]
                                if r.status_code == 403], what="the certificate revoked by the CRL to be refused")[0]
        assert r.json()["issue"][0]["code"] == "security" and "CRL" in r.json()["issue"][0]["diagnostics"]
        assert status(lock, "other") == 200
        assert lock.gateway.alive() and lock.gateway.popen.pid == pid

        # a CRL past its nextUpdate is logged as an error and still applied
        write_crl(lock.certs, [lock.certs / "platform-demo.pem"], days=-1)
        lock.gateway.popen.send_signal(signal.SIGHUP)
        expired = eventually(lambda: [e for e in read_jsonl(lock.gateway.log_path)
                                      if e.get("event") == "outer.crl_expired"], what="outer.crl_expired")
        assert expired[0]["level"] == "error"
        assert status(lock, "demo") == 403 and status(lock, "other") == 200

        # a CRL signed by another CA is refused on SIGHUP: the running one stays
        init_dev_ca(tmp_path / "rogue")
        write_crl(tmp_path / "rogue", [], path=lock.certs / "crl.pem")
        lock.gateway.popen.send_signal(signal.SIGHUP)
        refused = eventually(lambda: [e for e in read_jsonl(lock.gateway.log_path)
                                      if e.get("event") == "gateway.reload_refused"], what="the foreign CRL refused")
        assert any("not signed" in err for err in refused[0]["errors"])
        assert status(lock, "demo") == 403 and status(lock, "other") == 200
    finally:
        lock.stop()


def test_an_spki_pin_admits_only_the_pinned_key_and_changes_on_sighup(tmp_path):
    lock = Lock(tmp_path)
    lock.start_gateway()
    try:
        demo = x509.load_pem_x509_certificate((lock.certs / "platform-demo.pem").read_bytes())
        other = x509.load_pem_x509_certificate((lock.certs / "platform-other.pem").read_bytes())
        lock.gateway_config["platforms"][0]["certificate_spki_sha256"] = [spki_sha256(other).hex()]
        hup(lock)
        eventually(lambda: status(lock, "demo") == 403, what="demo's key to be refused by the pin")
        assert "pinned" in lock.session("demo").get(f"{lock.base}/metadata").json()["issue"][0]["diagnostics"]
        import base64

        lock.gateway_config["platforms"][0]["certificate_spki_sha256"] = [base64.b64encode(spki_sha256(demo)).decode()]
        hup(lock)
        eventually(lambda: status(lock, "demo") == 200, what="demo's own pinned key to be accepted")
        assert status(lock, "other") == 200
    finally:
        lock.stop()


def metric(admin_port: int, gate: str) -> float:
    text = requests.get(f"http://127.0.0.1:{admin_port}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        if family.name == "gatewayd_tls_handshake_failures":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels.get("gate") == gate:
                    return sample.value
    raise AssertionError(f"no gatewayd_tls_handshake_failures_total{{gate={gate!r}}} in /metrics")


def rogue_context(lock, rogue) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(lock.certs / "ca.pem"))
    ctx.load_cert_chain(rogue / "platform-demo.pem", rogue / "platform-demo.key")
    return ctx


def try_handshake(ctx, port: int, payload: bytes) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(payload)
                s.recv(1)  # TLS 1.3: the server's refusal arrives after the client's finish
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        pass


@pytest.fixture
def inner_tls(tmp_path):
    lock = Lock(tmp_path)
    lock.admin_port = free_port()
    lock.gateway_config["admin"] = {"listen": f"tcp:{lock.admin_port}:interface=127.0.0.1"}
    lock.gateway_config["inner"]["tls"] = dict(TLS)
    lock.write_configs()
    lock.start_gateway()
    yield lock
    lock.stop()


def test_failed_handshakes_are_counted_per_gate(inner_tls, tmp_path):
    """A client with a certificate from another CA increments the gate's counter; a good one does not."""
    lock = inner_tls
    assert metric(lock.admin_port, "outer") == 0 and metric(lock.admin_port, "inner") == 0
    assert status(lock, "demo") == 200
    init_dev_ca(tmp_path / "rogue", platforms=("demo",))
    ctx = rogue_context(lock, tmp_path / "rogue")
    try_handshake(ctx, lock.fhir_port, b"GET /fhir/metadata HTTP/1.1\r\nHost: x\r\n\r\n")
    eventually(lambda: metric(lock.admin_port, "outer") == 1, what="the outer counter to count the failure")
    assert metric(lock.admin_port, "inner") == 0
    try_handshake(ctx, lock.mllp_port, frame(SIU.format(id="ROGUE-1").encode()))
    try_handshake(ctx, lock.mllp_port, frame(SIU.format(id="ROGUE-2").encode()))
    eventually(lambda: metric(lock.admin_port, "inner") == 2, what="the inner counter to count both failures")
    assert metric(lock.admin_port, "outer") == 1
    assert status(lock, "demo") == 200 and metric(lock.admin_port, "outer") == 1


def read_until(sock, predicate):
    data = b""
    while not predicate(data):
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def test_the_mllp_listener_takes_a_renewed_certificate_on_sighup_without_dropping_connections(inner_tls, tmp_path):
    lock = inner_tls
    ctx = ssl.create_default_context(cafile=str(lock.certs / "ca.pem"))
    ctx.load_cert_chain(*lock.cert("demo"))

    def exchange(s, control_id: str) -> str:
        s.sendall(frame(SIU.format(id=control_id).encode()))
        ack = read_until(s, lambda d: b"\x1c\r" in d).split(b"\x1c\r")[0].lstrip(b"\x0b")
        return parse(ack).segment("MSA").get(1)

    def served_serial() -> int:
        with socket.create_connection(("127.0.0.1", lock.mllp_port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                return x509.load_der_x509_certificate(s.getpeercert(binary_form=True)).serial_number

    raw = socket.create_connection(("127.0.0.1", lock.mllp_port), timeout=10)
    held = ctx.wrap_socket(raw, server_hostname="127.0.0.1")  # open across the reload
    try:
        assert exchange(held, "KEEP-1") == "AA"
        before = served_serial()
        new_serial = lock.renew_server_certificate()
        assert new_serial != before
        eventually(lambda: served_serial() == new_serial, what="the renewed certificate on new MLLP connections")
        applied = [e for e in read_jsonl(lock.gateway.log_path) if e.get("event") == "gateway.reloaded"][-1]["applied"]
        assert "inner.tls" in applied
        assert exchange(held, "KEEP-2") == "AA"  # the connection opened before the reload still works
        assert x509.load_der_x509_certificate(held.getpeercert(binary_form=True)).serial_number == before
    finally:
        held.close()
