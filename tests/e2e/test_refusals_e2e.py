"""Bad input gets a clear answer over the real sockets: OperationOutcome on the outer gate, NAK with ERR
on the inner gate, a refused TLS handshake for strangers, file:line:key for a config typo."""

import socket
import ssl
import subprocess
import sys
import time

import pytest
import requests

from adapters.hl7.er7 import parse
from gateway.chamber.engine import Chamber
from gateway.ops.devca import init_dev_ca, issue_client_cert
from tests.e2e.harness import REPO, appointment_for, mllp_exchange

JSON = {"Content-Type": "application/fhir+json"}


def outcome(response, status):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["severity"] == "error"
    return body["issue"][0]


def test_malformed_json_is_400(lock):
    r = lock.session().post(f"{lock.base}/Appointment", data=b'{"resourceType": "Appointment", ',
                            headers=JSON)
    assert "not valid JSON" in outcome(r, 400)["diagnostics"]


def test_invalid_appointment_is_400_naming_the_field(lock):
    body = appointment_for("x")
    del body["status"]
    issue = outcome(lock.session().post(f"{lock.base}/Appointment", json=body, headers=JSON), 400)
    assert "status" in issue["diagnostics"]


def test_appointment_without_a_slot_is_422(lock):
    body = appointment_for("x")
    del body["slot"]
    issue = outcome(lock.session().post(f"{lock.base}/Appointment", json=body, headers=JSON), 422)
    assert issue["expression"] == ["Appointment.slot"]


def test_unknown_slot_is_422(lock):
    issue = outcome(lock.session().post(f"{lock.base}/Appointment", json=appointment_for("D009-203001010800"),
                                        headers=JSON), 422)
    assert "D009-203001010800" in issue["diagnostics"]


def test_other_refusals_have_their_status(lock):
    s = lock.session()
    assert outcome(s.post(f"{lock.base}/Appointment", data=b"<xml/>", headers={"Content-Type": "text/xml"}),
                   415)["code"] == "not-supported"
    assert outcome(s.get(f"{lock.base}/Patient"), 404)["code"] == "not-supported"
    assert outcome(s.get(f"{lock.base}/Slot/nope"), 404)["code"] == "not-found"
    assert outcome(s.delete(f"{lock.base}/Slot"), 405)["code"] == "not-supported"
    assert outcome(s.get(f"{lock.base}/Slot", params={"start": "tomorrow"}), 400)["code"] == "invalid"
    assert outcome(s.get(f"{lock.base}/Slot", params={"colour": "red"}), 400)["code"] == "not-supported"
    big = b'{"resourceType": "Appointment", "description": "' + b"x" * (2 << 20) + b'"}'
    assert outcome(s.post(f"{lock.base}/Appointment", data=big, headers=JSON), 413)["code"] == "too-long"


def test_client_without_a_certificate_is_refused_at_the_handshake(lock):
    s = requests.Session()
    s.trust_env = False
    with pytest.raises(requests.exceptions.SSLError):
        s.get(f"{lock.base}/metadata", verify=str(lock.certs / "ca.pem"), timeout=5)


def test_certificate_from_another_ca_is_refused_at_the_handshake(lock, tmp_path):
    init_dev_ca(tmp_path / "rogue", platforms=("demo",))
    ctx = ssl.create_default_context(cafile=str(lock.certs / "ca.pem"))
    ctx.load_cert_chain(tmp_path / "rogue" / "platform-demo.pem", tmp_path / "rogue" / "platform-demo.key")
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        with socket.create_connection(("127.0.0.1", lock.fhir_port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"GET /fhir/metadata HTTP/1.1\r\nHost: x\r\n\r\n")
                if not tls.recv(1):  # TLS 1.3: the server's refusal arrives after the client's finish
                    raise ConnectionResetError("closed")


def test_trusted_certificate_of_an_unregistered_platform_is_403(lock):
    cert, key = issue_client_cert(lock.certs, "stranger")
    s = requests.Session()
    s.trust_env = False
    r = s.get(f"{lock.base}/Slot", cert=(str(cert), str(key)), verify=str(lock.certs / "ca.pem"), timeout=5)
    assert outcome(r, 403)["code"] == "security"


def test_hl7_that_does_not_parse_gets_ar_with_err(lock):
    ack = parse(mllp_exchange(lock.mllp_port, b"this is not HL7 at all"))
    assert ack.segment("MSA").get(1) == "AR"
    err = ack.segment("ERR")
    assert err is not None and err.get(3) == "100"


def test_siu_without_schedule_id_gets_ae_pointing_at_sch_5(lock):
    siu = ("MSH|^~\\&|HIS|HOSPITAL|GATEWAYD|FRONT|20301010120000||SIU^S24^SIU_S12|BAD-SCH-5|P|2.5\r"
           "SCH|||||||||15|MIN|^^15^203010100800^203010100815|||||||||||||Open\r"
           "RGS|1\rAIS|1||x^y|203010100800|||15|MIN\r").encode()
    ack = parse(mllp_exchange(lock.mllp_port, siu))
    assert ack.segment("MSA").get(1) == "AE"
    assert ack.segment("MSA").get(2) == "BAD-SCH-5"
    assert [ack.segment("ERR").get(2, c) for c in (1, 2, 3)] == ["SCH", "1", "5"]
    assert ack.segment("ERR").get(3) == "101"


def test_unsupported_message_type_gets_ar_200(lock):
    adt = b"MSH|^~\\&|HIS|HOSPITAL|GATEWAYD|FRONT|20301010120000||ADT^A01^ADT_A01|ADT-1|P|2.5\rEVN|A01\r"
    ack = parse(mllp_exchange(lock.mllp_port, adt))
    assert (ack.segment("MSA").get(1), ack.segment("ERR").get(3)) == ("AR", "200")


def test_resent_siu_is_acked_again_and_reused_control_id_is_refused(lock):
    siu = ("MSH|^~\\&|HIS|HOSPITAL|GATEWAYD|FRONT|20301010120000||SIU^S23^SIU_S12|DUP-1|P|2.5\r"
           "SCH|||||D001^x||||15|MIN|^^15^203010100800^203010100815|||||||||||||Blocked\r"
           "RGS|1\rAIS|1||x^y|203010100800|||15|MIN\r")
    first = parse(mllp_exchange(lock.mllp_port, siu.encode()))
    again = parse(mllp_exchange(lock.mllp_port, siu.encode()))
    assert first.segment("MSA").get(1) == again.segment("MSA").get(1) == "AA"
    changed = parse(mllp_exchange(lock.mllp_port, siu.replace("Blocked", "Open").encode()))
    assert changed.segment("MSA").get(1) == "AR"
    chamber = Chamber(lock.workdir / "chamber.sqlite3", clock=time.time)
    chamber.open()
    try:
        original = chamber.read().message_by_control_id("inbound", "his", "DUP-1", "HIS|HOSPITAL")
        story = [detail for _, _, detail in chamber.read().message_events(original.id)]
    finally:
        chamber.close()
    assert original.body == siu.encode()  # the first message is kept as it was
    assert any("refused (AR) a different message with this control id" in (d or "") for d in story)
    assert lock.session().get(f"{lock.base}/Slot/D001-203010100800").json()["status"] == "busy-unavailable"


def test_config_with_a_typo_names_file_line_and_key(tmp_path):
    config = tmp_path / "gw.yaml"
    config.write_text((REPO / "config" / "gateway.example.yaml").read_text(encoding="utf-8")
                      .replace("  answer_within: 5s", "  answer_witin: 5s"), encoding="utf-8")
    init_dev_ca(tmp_path / "certs")
    run = subprocess.run([sys.executable, "-m", "gateway", "check-config", str(config)], cwd=REPO,
                         capture_output=True, text=True)
    assert run.returncode == 1
    line = next(i for i, t in enumerate(config.read_text().splitlines(), 1) if "answer_witin" in t)
    assert f"{config}:{line}:3: outer.answer_witin: unknown key 'answer_witin'" in run.stderr
    assert "answer_within" in run.stderr  # the suggestion


def test_example_config_checks_ok_once_certificates_exist(tmp_path):
    config = tmp_path / "gateway.yaml"
    config.write_text((REPO / "config" / "gateway.example.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    missing = subprocess.run([sys.executable, "-m", "gateway", "check-config", str(config)], cwd=REPO,
                             capture_output=True, text=True)
    assert missing.returncode == 1 and "outer.tls.certificate" in missing.stderr
    assert subprocess.run([sys.executable, "-m", "gateway", "certs", "init", str(tmp_path / "certs")],
                          cwd=REPO, capture_output=True).returncode == 0
    ok = subprocess.run([sys.executable, "-m", "gateway", "check-config", str(config)], cwd=REPO,
                        capture_output=True, text=True)
    assert (ok.returncode, ok.stdout.strip()) == (0, "ok")
