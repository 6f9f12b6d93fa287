"""E-prescriptions through the real lock: the gateway and the HIS simulator (with its pharmacy, a second HIS
endpoint on its own port) as processes, FHIR over mutual TLS, HL7 over MLLP, signatures checked for real.

- A signed transaction Bundle of three items crosses as one RDE^O11 with three ORC groups, routed to the
  pharmacy endpoint (not the registration HIS); the items turn active, the pharmacy's RDS^O13 comes back and
  MedicationDispense is readable; the items are completed.
- Unsigned, tampered and foreign-CA prescriptions, and those signed with a TLS certificate or through a CA
  beyond its path length, are refused (403, the failed check named) and nothing reaches the HIS.
- A prescription the HIS releases is listed for outside pharmacies, verifies with the gateway's certificate
  using plain `cryptography` (no gatewayd code), and of two pharmacies claiming it at once exactly one wins.
"""

from __future__ import annotations

import base64
import copy
import json
import signal
import threading
import time

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from tests.e2e.harness import Lock, eventually, free_port, read_jsonl
from gateway.domain.signatures import prescription_payload, sign_release
from tests.e2e.rxpki import GOLDEN, PRESCRIBER_SCOPES, RxPki, pem, golden_bundle, signed_bundle


def verify_with_plain_cryptography(resource: dict, certificate_pem: bytes) -> None:
    """What a pharmacy would write: no gatewayd code. Canonical JSON = sorted keys, no spaces, UTF-8 (RFC 8785
    for the values a prescription holds); the signature extension and id/meta/text are not signed."""
    ext = [e for e in resource["extension"] if e["url"] == "urn:gatewayd:prescription:signature"]
    rest = [e for e in resource["extension"] if e["url"] != "urn:gatewayd:prescription:signature"]
    content = {k: v for k, v in resource.items() if k not in ("id", "meta", "text", "signature", "extension")}
    if rest:
        content["extension"] = rest
    payload = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    header_b64, empty, sig_b64 = ext[0]["valueString"].split(".")
    assert empty == ""  # detached
    header = json.loads(base64.urlsafe_b64decode(header_b64 + "=" * (-len(header_b64) % 4)))
    assert header["alg"] == "ES256" and header["b64"] is False
    leaf = x509.load_der_x509_certificate(base64.b64decode(header["x5c"][0]))
    assert leaf == x509.load_pem_x509_certificate(certificate_pem)
    raw = base64.urlsafe_b64decode(sig_b64 + "=" * (-len(sig_b64) % 4))
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    leaf.public_key().verify(der, header_b64.encode() + b"." + payload, ec.ECDSA(hashes.SHA256()))


def prescribing_lock(tmp_path) -> Lock:
    """A Lock (not started) whose HIS simulator has its pharmacy on ``lock.pharmacy_port`` and whose gateway
    routes prescriptions there, signed by ``lock.pki``'s prescriber; platform demo prescribes, pa and pb
    claim released prescriptions."""
    pki = RxPki(tmp_path / "rx")
    pharmacy_port = free_port()
    lock = Lock(tmp_path, platforms=("demo", "pa", "pb"), doctors=1, days=1,
                sim={"pharmacy": {"listen": f"tcp:{pharmacy_port}:interface=127.0.0.1", "dispense_delay": "500ms"}})
    cfg = lock.gateway_config
    cfg["inner"]["accept_types"] = ["SIU^*", "RDS^O13", "RDE^O11"]
    cfg["inner"]["endpoints"] = [{"name": "pharmacy", "host": "127.0.0.1", "port": pharmacy_port,
                                  "receiving_application": "HIS-PHARMACY", "send_types": ["RDE^O11", "OMP^O09"],
                                  "ack_timeout": "3s", "retry_initial": "200ms", "retry_max": "2s"}]
    cfg["routes"] = [{"types": ["RDE^O11", "OMP^O09"], "to": "pharmacy"}]
    # the golden Bundle's third item is coded in ATC only: the hospital's override maps it to its own code
    cfg["pharmacy"] = {"drug_codes": [{"system": "http://www.whocc.no/atc", "code": "M01AE01", "his_code": "Y0002"}]}
    cfg["prescriptions"] = {"prescriber_cas": [str(tmp_path / "rx" / "prescriber-ca.pem")],
                            "release_key": str(tmp_path / "rx" / "release.key"),
                            "release_chain": str(tmp_path / "rx" / "release.pem")}
    cfg["platforms"][0]["scopes"] = list(PRESCRIBER_SCOPES)  # a copy: callers add scopes to it
    for p in cfg["platforms"][1:]:
        p["scopes"] = ["MedicationRequest.claim"]
    lock.write_configs()
    lock.pki, lock.pharmacy_port = pki, pharmacy_port
    return lock


@pytest.fixture()
def lock(tmp_path):
    with prescribing_lock(tmp_path) as lock:
        yield lock


def post(lock, body, platform="demo"):
    return lock.session(platform).post(lock.base, json=body, headers={"Content-Type": "application/fhir+json"},
                                       timeout=15)


def test_a_signed_bundle_reaches_the_pharmacy_and_its_dispensing_comes_back(lock):
    body = golden_bundle()
    r = post(lock, signed_bundle(body, lock.pki.key, lock.pki.chain))
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["type"] == "transaction-response"
    assert [e["response"]["status"] for e in answer["entry"]] == ["201 Created"] * 3
    ids = [e["resource"]["id"] for e in answer["entry"]]
    assert [e["resource"]["status"] for e in answer["entry"]] == ["active"] * 3
    orders = [m for m in read_jsonl(lock.workdir / "his-received.jsonl") if m["type"].startswith("RDE")]
    assert len(orders) == 1 and orders[0]["placers"] == ids  # one message, three groups, at the pharmacy
    s = lock.session("demo")
    dispensed = eventually(lambda: s.get(f"{lock.base}/MedicationDispense", params={"prescription": ids[0]},
                                         timeout=5).json().get("entry"), timeout=20, what="the RDS^O13")
    assert dispensed[0]["resource"]["authorizingPrescription"] == [{"reference": f"MedicationRequest/{ids[0]}"}]
    eventually(lambda: all(s.get(f"{lock.base}/MedicationRequest/{i}", timeout=5).json()["status"] == "completed"
                           for i in ids), timeout=20, what="every item completed")
    # another platform cannot read it (404, not 403: no probing of ids)
    assert lock.session("pa").get(f"{lock.base}/MedicationRequest/{ids[0]}", timeout=5).status_code == 404
    records = lock.chamber_rows("SELECT action, resource_type, resource_id FROM audit_records WHERE platform = 'demo'"
                                " AND action IN ('prescribe', 'access') ORDER BY seq")
    assert ("prescribe", "MedicationRequest", ids[0]) in records  # the Bundle's record names what it created
    assert ("access", "MedicationRequest", ids[0]) in records  # the dispense search: whose dispenses were read


def test_a_medication_request_signed_in_the_header_is_taken(lock):
    """One MedicationRequest with the prescriber's JWS in X-Prescription-Signature (the way docs/prescriptions.md
    gives for a resource without a signature element): verified and sent to the pharmacy.  The header reached
    the check as bytes and every such prescription was refused as "malformed"; a header that is not ASCII
    text is refused as malformed (403), not a 500."""
    body = json.loads((GOLDEN / "medicationrequest_single.json").read_text(encoding="utf-8"))
    jws = sign_release(prescription_payload(body), lock.pki.key, lock.pki.chain)
    s = lock.session("demo")
    r = s.post(f"{lock.base}/MedicationRequest", json=body, timeout=15,
               headers={"Content-Type": "application/fhir+json", "X-Prescription-Signature": jws})
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "active"
    other = dict(body, groupIdentifier={"value": "RX-NOT-ASCII"})
    r = s.post(f"{lock.base}/MedicationRequest", json=other, timeout=15,
               headers={"Content-Type": "application/fhir+json", "X-Prescription-Signature": "签名".encode()})
    assert r.status_code == 403 and "malformed" in r.json()["issue"][0]["diagnostics"], r.text


@pytest.mark.parametrize("how, check", [("unsigned", "missing"), ("tampered", "signature"),
                                        ("other CA", "untrusted"), ("TLS certificate", "key"),
                                        ("beyond a path length", "chain")])
def test_unsigned_tampered_and_foreign_prescriptions_are_refused_and_nothing_reaches_the_his(lock, how, check):
    body = golden_bundle()
    if how == "unsigned":
        sent = body
    elif how == "tampered":
        sent = copy.deepcopy(signed_bundle(body, lock.pki.key, lock.pki.chain))
        next(e for e in sent["entry"] if e["resource"]["resourceType"] == "MedicationRequest")[
            "resource"]["dispenseRequest"]["quantity"]["value"] = 2400
    else:
        chain = {"other CA": lock.pki.rogue_chain, "TLS certificate": lock.pki.tls_chain,
                 "beyond a path length": lock.pki.too_deep_chain}[how]
        sent = signed_bundle(body, lock.pki.key, chain)
    r = post(lock, sent)
    assert r.status_code == 403, r.text
    issue = r.json()["issue"][0]
    assert issue["code"] == "security" and check in issue["diagnostics"], issue
    received = read_jsonl(lock.workdir / "his-received.jsonl") if (lock.workdir / "his-received.jsonl").exists() else []
    assert not [m for m in received if m["type"].startswith("RDE")]
    refusal = lock.chamber_rows("SELECT outcome, detail FROM audit_records WHERE action = 'prescribe' "
                                "ORDER BY seq DESC LIMIT 1")
    assert refusal == [(403, f"security: {check}")]  # the audit trail says which check failed


def test_a_released_prescription_verifies_and_is_claimed_by_exactly_one_pharmacy(lock):
    lock.sim.popen.send_signal(signal.SIGUSR2)  # the HIS releases a prescription
    pa, pb = lock.session("pa"), lock.session("pb")
    listed = eventually(lambda: pa.get(f"{lock.base}/MedicationRequest", params={"status": "active"},
                                       timeout=5).json().get("entry"), timeout=20, what="the released prescription")
    resource = listed[0]["resource"]
    verify_with_plain_cryptography(resource, pem(lock.pki.release_cert))
    tampered = copy.deepcopy(resource)
    tampered["dispenseRequest"]["quantity"]["value"] = 999
    with pytest.raises(InvalidSignature):
        verify_with_plain_cryptography(tampered, pem(lock.pki.release_cert))
    # the prescribing platform has no claim scope
    assert lock.session("demo").post(f"{lock.base}/MedicationRequest/{resource['id']}/$claim",
                                   timeout=5).status_code == 403
    answers = {}
    start = threading.Barrier(2)

    def claim(name, session):
        start.wait()
        answers[name] = session.post(f"{lock.base}/MedicationRequest/{resource['id']}/$claim", timeout=10)

    threads = [threading.Thread(target=claim, args=a) for a in (("pa", pa), ("pb", pb))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(a.status_code for a in answers.values())
    assert codes == [200, 409], {k: (v.status_code, v.text[:200]) for k, v in answers.items()}
    winner = next(k for k, v in answers.items() if v.status_code == 200)
    loser = lock.session("pb" if winner == "pa" else "pa")
    assert loser.get(f"{lock.base}/MedicationRequest", params={"status": "active"}, timeout=5).json()["total"] == 0
    assert answers[winner].json()["meta"]["tag"][0]["code"] == winner


def test_pharmacies_page_through_releases_by_next_links(lock):
    """The HIS releases three prescriptions: with _count=1 a pharmacy follows `next` links page by page and
    lists every item exactly once, the same items one big page lists; each carries meta.lastUpdated."""
    for _ in range(3):
        lock.sim.popen.send_signal(signal.SIGUSR2)
        time.sleep(0.2)
    pa = lock.session("pa")
    everything = eventually(lambda: (b := pa.get(f"{lock.base}/MedicationRequest", params={"_count": 50},
                                                 timeout=5).json()).get("total", 0) >= 3 and b,
                            timeout=20, what="three released prescriptions")
    assert "link" not in everything  # all on one page: no next
    seen, url, pages = [], f"{lock.base}/MedicationRequest?status=active&_count=1", 0
    while url:
        page = pa.get(url, timeout=5).json()
        pages += 1
        for entry in page["entry"]:
            seen.append(entry["resource"]["id"])
            assert entry["resource"]["meta"]["lastUpdated"].endswith("+00:00")
        url = next((link["url"] for link in page.get("link", []) if link["relation"] == "next"), None)
        assert url is None or "total" not in page  # (a page's own count was given as the search's total)
    assert pages >= 3 and len(seen) == len(set(seen))
    assert sorted(seen) == sorted(e["resource"]["id"] for e in everything["entry"])
    assert pa.get(f"{lock.base}/MedicationRequest", params={"_page": "not-a-page"}, timeout=5).status_code == 400
