"""Prescriptions through the chamber (gateway.domain.prescribing) with a real chamber, real signatures and the golden
HL7 files: submit -> order written on first send -> the HIS's answer -> dispensing; releases and claims. The domain
is wired as gateway/service.py wires it: its ports (the FHIR documents, the order writer) and the gates' readers
(the outer gate's SubmissionReader, the inner gate's PharmacyInbound and order_answer) around it."""

from __future__ import annotations

import functools
import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import task

from adapters.hl7.er7 import parse
from adapters.inner.pharmacy import PharmacyInbound, order_answer
from adapters.maps.fhir_documents import FhirDocuments, served, verify_release
from adapters.maps.fhir_prescription import SubmissionReader, prescription_from_request
from adapters.maps.pharmacy_codes import PharmacyProfile
from adapters.maps.rde_order import PharmacyOrderWriter
from adapters.maps.srm_booking import Hl7Header
from adapters.outer.pharmacy import REFUSALS
from gateway.chamber.engine import Chamber
from gateway.domain.prescribing import PrescriptionService, Refused, SignaturePolicy
from gateway.domain.model import HisAnswer
from gateway.domain.backlog import Overloaded
from gateway.domain.signatures import TrustStore, prescription_payload, sign_release
from tests.deferreds import failureResultOf, successResultOf

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "pharmacy"
TZ = ZoneInfo("Asia/Shanghai")
NOW = datetime.now(timezone.utc)
PROFILE = PharmacyProfile(drug_codes={("http://www.whocc.no/atc", "M01AE01"): "Y0002"})
READER = SubmissionReader(TZ, PROFILE)  # the outer gate's


def cert(subject: x509.Name, key, issuer: x509.Name, issuer_key, *, ca: bool):
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(NOW - timedelta(days=1))
         .not_valid_after(NOW + timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=not ca, content_commitment=not ca, key_encipherment=False,
                                      data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                                      encipher_only=False, decipher_only=False), critical=True))
    return b.sign(issuer_key, hashes.SHA256())


def name(cn: str, serial: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if serial:
        attrs.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial))
    return x509.Name(attrs)


class Pki:
    def __init__(self):
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca = cert(name("Prescriber CA"), self.ca_key, name("Prescriber CA"), self.ca_key, ca=True)
        self.trust = TrustStore([self.ca])

    def signer(self, licence: str = "D0042", ca=None, ca_key=None):
        key = ec.generate_private_key(ec.SECP256R1())
        return key, [cert(name("张医生", licence), key, (ca or self.ca).subject, ca_key or self.ca_key, ca=False)]


@pytest.fixture(scope="module")
def pki():
    return Pki()


@pytest.fixture()
def world(chamber_backend, pki):
    """(once on each chamber backend: tests/conftest.py)"""
    chamber = Chamber(backend=chamber_backend(), clock=time.time)
    chamber.open()
    gw_key = ec.generate_private_key(ec.SECP256R1())
    gw_cert = cert(name("gatewayd release"), gw_key, pki.ca.subject, pki.ca_key, ca=False)
    clock = task.Clock()
    clock.advance(NOW.timestamp())
    rx = PrescriptionService(
        chamber, tz=TZ, order_type="RDE^O11", documents=FhirDocuments(TZ, PROFILE),
        peer="pharmacy", clock=clock, signatures=SignaturePolicy(trust=pki.trust),
        writer=PharmacyOrderWriter(Hl7Header("GATEWAYD", "FRONT", "HIS-PHARMACY", "HOSPITAL")),
        from_request=functools.partial(prescription_from_request, tz=TZ, profile=PROFILE),
        release_signer=(gw_key, [gw_cert]))
    yield rx, chamber, clock, gw_cert
    rx.stop()
    chamber.close()


def bundle() -> dict:
    return json.loads((GOLDEN / "bundle_three_items.json").read_text(encoding="utf-8"))


def first_request(body: dict) -> dict:
    return next(e["resource"] for e in body["entry"] if e["resource"]["resourceType"] == "MedicationRequest")


def signed(body: dict, key, chain) -> str:
    return sign_release(prescription_payload(body), key, chain)


def submit(rx, pki, body=None, platform="ih1"):
    body = body or bundle()
    key, chain = pki.signer()
    return rx.submit(platform, READER.read(body, signed(body, key, chain)))


def decider(rx, message):
    """What the inner gate hands the inbound service for a pharmacy message."""
    return PharmacyInbound(rx, TZ).decider(message)


def serve(rx, item, p) -> dict:
    """An item as the outer gate serves it."""
    return served(successResultOf(rx.served(item, p)), p.claimed_by)


def answer_with(golden: str, ids: list[str]) -> HisAnswer:
    text = (GOLDEN / golden).read_bytes()
    for n, item_id in enumerate(ids, start=1):
        text = text.replace(f"mr-{n}^".encode(), f"{item_id}^".encode())
    message = parse(text)
    msa = message.segment("MSA")
    return HisAnswer(code=msa.get(1), text=msa.get(3), order=order_answer(message))


def test_a_signed_bundle_of_three_is_one_order_with_three_groups(world, pki):
    rx, chamber, _, _ = world
    p, created = successResultOf(submit(rx, pki))
    assert created and p.status == "pending" and p.number == "RX20300107-0001"
    check = json.loads(p.signature)
    assert check["signer_subject"].endswith("CN=张医生") or "张医生" in check["signer_subject"]
    reader = chamber.read()
    items = reader.medication_requests_of(p.id)
    assert [i.status for i in items] == ["on-hold"] * 3
    message = reader.message(p.message_id)
    assert (message.peer, message.type, message.body, message.state) == ("pharmacy", "RDE^O11", b"", "committed")
    body, mtype, charset = chamber.transact_now(lambda tx: rx.encode(tx, tx.message(p.message_id)))
    order = parse(body)
    assert mtype == "RDE^O11" and order.type_name == "RDE^O11" and charset == "utf-8"
    assert order.control_id == message.control_id
    assert [orc.get(2) for orc in order.all("ORC")] == [i.id for i in items]
    assert {orc.get(4) for orc in order.all("ORC")} == {"RX20300107-0001"}
    # the same bytes again (a resend re-encodes nothing, but the encoding itself is deterministic)
    again, _, _ = chamber.transact_now(lambda tx: rx.encode(tx, tx.message(p.message_id)))
    assert again == body


def test_the_his_accepting_makes_the_items_active_and_dispensing_completes_them(world, pki):
    rx, chamber, clock, _ = world
    p, _ = successResultOf(submit(rx, pki))
    ids = [i.id for i in chamber.read().medication_requests_of(p.id)]
    waiting = rx.wait_settled(p.id, 5)
    chamber.transact_now(lambda tx: rx.on_answer(tx, tx.message(p.message_id),
                                                 answer_with("rre_o12_accepted.hl7", ids)))
    rx._waiters.recheck()  # (transact_now wakes no observer)
    assert successResultOf(waiting) is True
    items = chamber.read().medication_requests_of(p.id)
    assert [i.status for i in items] == ["active"] * 3
    assert [i.his_order for i in items] == ["F1001", "F1002", "F1003"]
    assert json.loads(items[0].resource)["status"] == "active"
    rds = (GOLDEN / "rds_o13.hl7").read_bytes().replace(b"mr-1^", ids[0].encode() + b"^").replace(
        b"mr-2^", ids[1].encode() + b"^")
    decide = decider(rx, parse(rds))
    verdict = chamber.transact_now(decide)
    assert verdict.code == "AA" and "2 dispense" in verdict.text
    assert chamber.transact_now(decider(rx, parse(rds))).text.startswith("0 dispense")  # a resend adds nothing
    dispensed = [json.loads(d) for d in rx.dispenses(ids[0])]
    assert len(dispensed) == 1 and dispensed[0]["authorizingPrescription"] == [
        {"reference": f"MedicationRequest/{ids[0]}"}]
    assert [i.status for i in chamber.read().medication_requests_of(p.id)] == ["completed", "completed", "active"]
    assert chamber.read().prescription(p.id).status == "active"  # the third item is still to come


def test_the_his_refusing_cancels_the_items_with_its_reason(world, pki):
    rx, chamber, _, _ = world
    p, _ = successResultOf(submit(rx, pki))
    ids = [i.id for i in chamber.read().medication_requests_of(p.id)]
    chamber.transact_now(lambda tx: rx.on_answer(tx, tx.message(p.message_id),
                                                 answer_with("rre_o12_refused.hl7", ids)))
    p2 = chamber.read().prescription(p.id)
    assert p2.status == "refused" and p2.outcome
    resource = json.loads(chamber.read().medication_requests_of(p.id)[0].resource)
    assert resource["status"] == "cancelled" and "refused by the hospital pharmacy" in resource["statusReason"]["text"]


def test_a_dispense_for_an_order_never_sent_is_refused_and_records_nothing(world):
    rx, chamber, _, _ = world
    verdict = chamber.transact_now(decider(rx, parse((GOLDEN / "rds_o13.hl7").read_bytes())))
    assert verdict.code == "AE" and "unknown order" in verdict.text
    assert rx.dispenses("mr-1") == []


@pytest.mark.parametrize("how, check", [
    ("unsigned", "missing"),
    ("tampered", "signature"),
    ("other CA", "untrusted"),
    ("other prescriber", "signer"),
])
def test_bad_signatures_are_refused_with_the_check_named_and_nothing_is_stored(world, pki, how, check):
    rx, chamber, _, _ = world
    body = bundle()
    key, chain = pki.signer()
    jws = signed(body, key, chain)
    if how == "unsigned":
        jws = None
    elif how == "tampered":
        first_request(body)["dispenseRequest"]["quantity"]["value"] = 240
    elif how == "other CA":
        other_key = ec.generate_private_key(ec.SECP256R1())
        other = cert(name("Prescriber CA"), other_key, name("Prescriber CA"), other_key, ca=True)
        jws = signed(body, *pki.signer(ca=other, ca_key=other_key))
    else:
        jws = signed(body, *pki.signer(licence="D9999"))
    with pytest.raises(Refused) as e:
        rx.submit("ih1", READER.read(body, jws))
    assert REFUSALS[e.value.kind][0] == 403 and e.value.check == check, (e.value.check, e.value.text)
    assert not chamber.read().messages()  # nothing queued for the HIS


def test_the_same_prescription_again_is_the_first_one_and_other_content_is_refused(world, pki):
    rx, chamber, _, _ = world
    first, created = successResultOf(submit(rx, pki))
    again, created_again = successResultOf(submit(rx, pki))
    assert created and not created_again and again.id == first.id
    changed = bundle()
    first_request(changed)["dispenseRequest"]["quantity"]["value"] = 48
    e = failureResultOf(submit(rx, pki, changed), Refused)
    assert REFUSALS[e.value.kind][0] == 409
    assert len(chamber.read().messages(direction="outbound")) == 1


def renumbered(number: str) -> dict:
    body = bundle()
    for entry in body["entry"]:
        if entry["resource"]["resourceType"] == "MedicationRequest":
            entry["resource"]["groupIdentifier"]["value"] = number
    return body


def test_past_the_backlog_of_its_pharmacy_a_new_prescription_is_refused_but_a_repeat_still_answered(world, pki):
    """Two orders wait for the pharmacy endpoint and the limit is 2: a third prescription is refused with
    Overloaded (503 + Retry-After at the API) and nothing of it is stored; repeating the first is still answered
    with the first (no new work); once the pharmacy has answered one, new work is taken again."""
    rx, chamber, _, _ = world
    rx.max_backlog, rx.retry_after = 2, 7
    first, _ = successResultOf(submit(rx, pki, renumbered("RX-1")))
    successResultOf(submit(rx, pki, renumbered("RX-2")))
    e = failureResultOf(submit(rx, pki, renumbered("RX-3")), Overloaded)
    assert e.value.retry_after == 7 and "'pharmacy'" in str(e.value)
    assert len(chamber.read().messages(direction="outbound")) == 2
    again, created = successResultOf(submit(rx, pki, renumbered("RX-1")))
    assert again.id == first.id and not created
    chamber.transact_now(lambda tx: tx.set_message_state(first.message_id, "delivered", detail="AA"))
    third, created = successResultOf(submit(rx, pki, renumbered("RX-3")))
    assert created and third.status == "pending"


def test_a_released_prescription_is_claimed_once_and_verifies_with_the_gateways_certificate(world):
    rx, chamber, _, gw_cert = world
    release = parse((GOLDEN / "rde_o11_release.gb18030.hl7").read_bytes())
    assert chamber.transact_now(decider(rx, release)).code == "AA"
    assert "before" in chamber.transact_now(decider(rx, release)).text  # released once
    pairs = rx.released("pharmacy-a", 0.0, 10)
    assert len(pairs) == 1
    item, p = pairs[0]
    shown = serve(rx, item, p)
    assert verify_release(shown, gw_cert.public_bytes(serialization.Encoding.PEM), NOW)
    assert serve(rx, item, p) == shown  # the same signature on every read
    tampered = dict(shown, status="completed")
    with pytest.raises(Exception):
        verify_release(tampered, gw_cert.public_bytes(serialization.Encoding.PEM), NOW)
    a = rx.claim("pharmacy-a", item.id)
    b = rx.claim("pharmacy-b", item.id)
    outcomes = sorted([successResultOf(a)[2], successResultOf(b)[2]])
    assert outcomes == [False, True]
    assert rx.released("pharmacy-b", 0.0, 10) == []  # gone for everyone else
    assert len(rx.released("pharmacy-a", 0.0, 10)) == 1  # still listed for the one that claimed it
    claimed = serve(rx, *rx.released("pharmacy-a", 0.0, 10)[0])
    assert claimed["meta"]["tag"][0]["code"] == "pharmacy-a"
    assert verify_release(claimed, gw_cert.public_bytes(serialization.Encoding.PEM), NOW)  # meta is not signed


def test_pharmacies_page_through_releases_without_a_prescription_split_or_lost(world):
    """Three released prescriptions (one of two items): pages of two items hold whole prescriptions only,
    each page's cursor leads to the next, and every item is listed exactly once."""
    rx, chamber, _, _ = world
    golden = (GOLDEN / "rde_o11_release.gb18030.hl7").read_bytes().decode("gb18030")
    for n, groups in ((1, 1), (2, 2), (3, 1)):
        text = golden.replace("H0100", f"H010{n}").replace("HISRX-77", f"HISRX-7{n}")
        order = text[text.index("ORC|"):]
        text = text + "".join(order.replace(f"HISRX-7{n}-1", f"HISRX-7{n}-{g}") for g in range(2, groups + 1))
        assert chamber.transact_now(decider(rx, parse(text.encode("gb18030")))).code == "AA"
    pages, after, after_id = [], 0.0, None
    while True:
        pairs, more = rx.released_page("pharmacy-a", after, 2, after_id)
        pages.append([(p.number, item.id) for item, p in pairs])
        if more is None:
            break
        after, after_id = more
    numbers = [[number for number, _ in page] for page in pages]
    assert numbers == [["HISRX-71"], ["HISRX-72", "HISRX-72"], ["HISRX-73"]]  # 71 + 72 would be three items
    items = [i for page in pages for _, i in page]
    assert len(items) == len(set(items)) == 4
    assert rx.released_page("pharmacy-a", 0.0, 0) == ([], None)


def test_an_order_committed_before_chamber_schema_v6_is_written_from_its_request(world, pki):
    """A prescription an older gatewayd committed has no record (chamber schema v6 added it): its order, still
    waiting at the upgrade, is written from the platform's request as stored, read once with the map it went
    through then — the same order a record gives — and the record is kept. Without the map wired (not the inner
    gate), encoding says why instead of guessing."""
    rx, chamber, _, _ = world
    p, _ = successResultOf(submit(rx, pki))
    message_id = p.message_id
    from_record, _, _ = chamber.transact_now(lambda tx: rx.encode(tx, tx.message(message_id)))
    record = chamber.read().prescription(p.id).record
    chamber.transact_now(lambda tx: tx._c.execute("UPDATE prescriptions SET record = NULL WHERE id = ?", (p.id,)))

    unwired = rx.from_request
    rx.from_request = None
    with pytest.raises(ValueError, match="before chamber schema v6"):
        chamber.transact_now(lambda tx: rx.encode(tx, tx.message(message_id)))
    rx.from_request = unwired
    from_request, _, _ = chamber.transact_now(lambda tx: rx.encode(tx, tx.message(message_id)))
    assert from_request == from_record
    kept = chamber.read().prescription(p.id)
    assert kept.record == record and kept.version == p.version


def test_the_prescribing_platform_is_notified_of_its_items_answers_and_dispensing_no_one_else(world, pki):
    """The prescription-status topic (issue 23): each item's acceptance, dispensing and completion, numbered, to
    the prescribing platform's subscriptions only; a refusal is notified as refused."""
    from gateway.domain.notifications import Notifications
    rx, chamber, _, _ = world
    chamber.on_unit(Notifications().after_unit)
    for sub_id, platform in (("mine", "ih1"), ("theirs", "ih2")):
        chamber.transact_now(lambda tx: tx.add_subscription(id=sub_id, platform=platform,
                                                            topic="prescription-status", payload="id-only"))
    p, _ = successResultOf(submit(rx, pki))
    ids = [i.id for i in chamber.read().medication_requests_of(p.id)]
    chamber.transact_now(lambda tx: rx.on_answer(tx, tx.message(p.message_id),
                                                 answer_with("rre_o12_accepted.hl7", ids)))
    rds = (GOLDEN / "rds_o13.hl7").read_bytes().replace(b"mr-1^", ids[0].encode() + b"^").replace(
        b"mr-2^", ids[1].encode() + b"^")
    chamber.transact_now(decider(rx, parse(rds)))
    chamber.transact_now(decider(rx, parse(rds)))  # a resend: nothing new, nothing notified
    got = [(n.event, n.focus, n.what) for n in chamber.read().notifications_of("mine")]
    assert got == [(1, f"MedicationRequest/{ids[0]}", "active"), (2, f"MedicationRequest/{ids[1]}", "active"),
                   (3, f"MedicationRequest/{ids[2]}", "active"),
                   (4, f"MedicationRequest/{ids[0]}", "dispensed"), (5, f"MedicationRequest/{ids[1]}", "dispensed"),
                   (6, f"MedicationRequest/{ids[0]}", "completed"), (7, f"MedicationRequest/{ids[1]}", "completed")]
    assert chamber.read().notifications_of("theirs") == []
    refused, _ = successResultOf(submit(rx, pki, renumbered("RX20300107-0002")))
    refused_ids = [i.id for i in chamber.read().medication_requests_of(refused.id)]
    chamber.transact_now(lambda tx: rx.on_answer(tx, tx.message(refused.message_id),
                                                 answer_with("rre_o12_refused.hl7", refused_ids)))
    assert [n.what for n in chamber.read().notifications_of("mine")][7:] == ["refused"] * 3
