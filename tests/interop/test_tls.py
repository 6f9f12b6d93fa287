"""Mutual TLS on MLLP and MLLP release 2, over real loopback sockets.

Our listener (MLLPServerFactory with adapters.tls.server_options) and our sender (MLLPClient with
client_options) run as processes (tests/interop/mllp_tool.py); certificates come from the development CA
(gateway.ops.devca.init_dev_ca); Python's ssl module is the independent client.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from adapters.hl7.ack import read_ack
from adapters.hl7.er7 import parse
from adapters.inner.framing import COMMIT_ACK, MLLPFramer, frame
from adapters.tls import TlsConfigError, client_options, server_options
from gateway.ops.devca import init_dev_ca
from tests.interop.test_peers import REPO, run_tool

SIU = ("MSH|^~\\&|HIS|HOSPITAL|GATEWAYD|FRONT|20301124073000||SIU^S12^SIU_S12|{id}|P|2.5\r"
       "SCH||HA1^HIS||||S12^booked|||15|MIN|^^15^203011240800^203011240815\r"
       "RGS|1\rAIS|1||cardio^心内科门诊|203011240800|||15|MIN\r")


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tls")
    paths = init_dev_ca(base / "ca", platforms=("his",))
    rogue = init_dev_ca(base / "rogue", platforms=("his",))
    return {**paths, "rogue_ca": rogue["ca"], "rogue_cert": rogue["platform-his"],
            "rogue_key": rogue["platform-his_key"], "dir": base}


class Listener:
    """`mllp_tool listen` as a process; ``port`` once it listens."""

    def __init__(self, *args: str):
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.interop.mllp_tool", "listen", *args],
                                     cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        line = self.proc.stdout.readline()
        assert line, "the listener did not start"
        self.port = json.loads(line)["port"]

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def tls_listener(certs):
    listener = Listener("--tls", str(certs["server"]), str(certs["server_key"]), str(certs["ca"]))
    yield listener
    listener.stop()


def stdlib_exchange(port: int, payload: bytes, ca: Path, cert: Path | None = None, key: Path | None = None
                    ) -> bytes | None:
    """One MLLP exchange over Python's ssl; the answer's payload, or None when the server refused us."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(frame(payload))
                framer = MLLPFramer()
                while True:
                    data = tls.recv(65536)
                    if not data:
                        return None
                    frames = framer.feed(data)
                    if frames:
                        return frames[0]
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return None


def message_file(tmp_path: Path, control_id: str) -> Path:
    path = tmp_path / f"{control_id}.hl7"
    path.write_bytes(SIU.format(id=control_id).encode())
    return path


def test_client_with_a_certificate_from_the_ca_gets_acks(tls_listener, certs, tmp_path):
    """Mutual TLS: Python's ssl client with a certificate signed by the listener's CA gets its AA; so does
    our own MLLPClient (which also checks the listener's certificate against the CA and 127.0.0.1)."""
    answer = stdlib_exchange(tls_listener.port, SIU.format(id="T1").encode(), certs["ca"],
                             certs["platform-his"], certs["platform-his_key"])
    assert answer is not None and read_ack(parse(answer))[:2] == ("AA", "T1")
    code, results, stderr = run_tool(
        "send", "--port", str(tls_listener.port), "--ca", str(certs["ca"]), "--cert", str(certs["platform-his"]),
        "--key", str(certs["platform-his_key"]), str(message_file(tmp_path, "T2")),
        str(message_file(tmp_path, "T3")))
    assert code == 0, stderr
    assert [(r["code"], r["answered"]) for r in results] == [("AA", "T2"), ("AA", "T3")]


def test_client_without_a_certificate_is_refused(tls_listener, certs, tmp_path):
    """Without a client certificate the handshake is refused: Python's ssl client gets no answer, and our
    sender's send fails (PeerUnavailable), never an ACK."""
    assert stdlib_exchange(tls_listener.port, SIU.format(id="N1").encode(), certs["ca"]) is None
    code, results, _ = run_tool("send", "--port", str(tls_listener.port), "--ca", str(certs["ca"]),
                                "--timeout", "2", str(message_file(tmp_path, "N2")))
    assert code == 1 and results[0]["ok"] is False and "PeerUnavailable" in results[0]["error"]
    assert "certificate required" in results[0]["error"]  # the listener's TLS alert


def test_certificate_from_another_ca_is_refused(tls_listener, certs):
    assert stdlib_exchange(tls_listener.port, SIU.format(id="R1").encode(), certs["ca"],
                           certs["rogue_cert"], certs["rogue_key"]) is None


def test_sender_refuses_a_listener_its_ca_did_not_sign(tls_listener, certs, tmp_path):
    """Our sender trusting only another CA does not talk to the listener (whose certificate it cannot
    verify): the send fails, nothing is delivered."""
    code, results, _ = run_tool(
        "send", "--port", str(tls_listener.port), "--ca", str(certs["rogue_ca"]), "--cert",
        str(certs["platform-his"]), "--key", str(certs["platform-his_key"]), "--timeout", "2",
        str(message_file(tmp_path, "V1")))
    assert code == 1 and results[0]["ok"] is False and "PeerUnavailable" in results[0]["error"]
    assert "certificate verify failed" in results[0]["error"]


def test_release2_over_real_sockets(tmp_path):
    """Release 2 listener and release 2 sender on loopback: each message is committed (0x06) and answered;
    a plain client sees the commit block before the ACK."""
    listener = Listener("--release", "2")
    try:
        code, results, stderr = run_tool("send", "--port", str(listener.port), "--release", "2",
                                         str(message_file(tmp_path, "C1")), str(message_file(tmp_path, "C2")))
        assert code == 0, stderr
        assert [(r["code"], r["answered"]) for r in results] == [("AA", "C1"), ("AA", "C2")]
        with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as s:
            s.sendall(frame(SIU.format(id="C3").encode()))
            framer, frames = MLLPFramer(), []
            while len(frames) < 2:
                data = s.recv(65536)
                assert data
                frames += framer.feed(data)
        assert frames[0] == COMMIT_ACK and read_ack(parse(frames[1]))[:2] == ("AA", "C3")
    finally:
        listener.stop()


def test_tls_helper_names_the_file_that_is_wrong(certs, tmp_path):
    """The helper the config will use reports unreadable files, non-PEM files and a key that does not
    belong to the certificate, naming the file."""
    with pytest.raises(TlsConfigError, match="missing.pem"):
        server_options(tmp_path / "missing.pem", certs["server_key"], certs["ca"])
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(TlsConfigError, match="junk.pem"):
        client_options("127.0.0.1", tmp_path / "junk.pem")
    with pytest.raises(TlsConfigError, match="does not belong"):
        server_options(certs["server"], certs["platform-his_key"], certs["ca"])
    with pytest.raises(TlsConfigError, match="both"):
        client_options("127.0.0.1", certs["ca"], certs["platform-his"])
