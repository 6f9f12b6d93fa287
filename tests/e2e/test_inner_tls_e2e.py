"""The inner gate's options as hospital IT sets them in the YAML: TLS with client certificates and MLLP
release 2 on the listener."""

import socket
import ssl

import pytest

from adapters.hl7.er7 import parse
from adapters.inner.framing import frame
from tests.e2e.harness import Lock

SIU = ("MSH|^~\\&|HIS|HOSPITAL|GATEWAYD|FRONT|20301010120000||SIU^S24^SIU_S12|TLS-1|P|2.5\r"
       "SCH|||||D001^x||||15|MIN|^^15^203010100800^203010100815|||||||||||||Open\r"
       "RGS|1\rAIS|1||x^y|203010100800|||15|MIN\r").encode()


@pytest.fixture
def tls_gateway(tmp_path):
    lock = Lock(tmp_path)
    lock.gateway_config["inner"].update(
        mllp_release=2, tls={"certificate": "certs/server.pem", "private_key": "certs/server.key",
                             "client_ca": "certs/ca.pem"})
    lock.write_configs()
    lock.start_gateway()
    yield lock
    lock.stop()


def read_until(sock, predicate, limit=65536):
    data = b""
    while not predicate(data):
        chunk = sock.recv(limit)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def test_mllp_over_mutual_tls_with_release_2(tls_gateway):
    """A HIS presenting a certificate from the configured CA gets the release-2 commit block (0x06) and
    then the ACK; one without a certificate is refused in the handshake."""
    lock = tls_gateway
    ctx = ssl.create_default_context(cafile=str(lock.certs / "ca.pem"))
    ctx.load_cert_chain(*lock.cert("demo"))
    with socket.create_connection(("127.0.0.1", lock.mllp_port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            s.sendall(frame(SIU))
            data = read_until(s, lambda d: d.count(b"\x1c\r") >= 2)
    commit, ack = data.split(b"\x1c\r")[:2]
    assert commit == b"\x0b\x06"
    assert parse(ack.lstrip(b"\x0b")).segment("MSA").get(1) == "AA"

    bare = ssl.create_default_context(cafile=str(lock.certs / "ca.pem"))
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError, AssertionError)):
        with socket.create_connection(("127.0.0.1", lock.mllp_port), timeout=5) as raw:
            with bare.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(frame(SIU))
                read_until(s, lambda d: b"\x1c\r" in d)
