"""What readers of prescriptions are served, in FHIR, written from the domain's values: pure, no I/O.

The chamber keeps one document per item (a MedicationRequest) and per dispense (a MedicationDispense), and the
outer gate serves the stored bytes. `FhirDocuments` is the domain's `PrescriptionDocuments` port
(gateway/domain/ports.py, wired by gateway/service.py): the domain decides, this writes.

* An item a platform submitted is kept as the MedicationRequest it sent (without its narrative ``text``), with
  the gateway's id, its ``status`` and ``statusReason`` (on-hold "waiting for the hospital pharmacy"; active,
  with the HIS's order number as identifier ``urn:gatewayd:his:order``; cancelled with the reason; completed).
* `medication_requests`: a released `Prescription` -> one MedicationRequest per item (status active,
  groupIdentifier = the HIS's prescription number); its payload is their canonical JSON.
* `medication_dispense`: a `Dispense` -> a MedicationDispense (status completed; whenHandedOver, quantity, the
  HIS's prescription number, note, performer, authorizingPrescription ``MedicationRequest/<id>``,
  subject.identifier).
* The gateway's signature of a released item: a detached JWS over the canonical JSON of the unsigned resource,
  in the extension ``urn:gatewayd:prescription:signature``; `verify_release` is what a pharmacy does with it.
  `served` adds the claim, outside the signed content (``meta.tag`` ``urn:gatewayd:prescription:claimed-by``).

The fields are docs/pharmacy-profile.md; the golden files under tests/golden/pharmacy/ are the contract.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

from adapters.maps.pharmacy_codes import FREQUENCIES, UCUM, V2_0335, PharmacyProfile, frequency_text
from gateway.domain.prescriptions import Code, Dispense, Prescription
from gateway.domain.signatures import TrustStore, canonical_json, prescription_payload, verify_detached

__all__ = ["FhirDocuments", "medication_dispense", "medication_requests", "served", "verify_release"]

PRACTITIONER_SYSTEM = "urn:gatewayd:his:practitioner"
HIS_PRESCRIPTION_SYSTEM = "urn:gatewayd:his:prescription"
HIS_ORDER_SYSTEM = "urn:gatewayd:his:order"
HIS_DISPENSE_SYSTEM = "urn:gatewayd:his:dispense"
SIGNATURE_EXTENSION = "urn:gatewayd:prescription:signature"
CLAIMED_BY_TAG = "urn:gatewayd:prescription:claimed-by"


def _text(resource: dict) -> str:
    return json.dumps(resource, ensure_ascii=False)


class FhirDocuments:
    """The documents of one hospital's prescriptions (its time zone and `PharmacyProfile`): the domain's
    `PrescriptionDocuments` port."""

    def __init__(self, tz: ZoneInfo, profile: PharmacyProfile | None = None):
        self.tz = tz
        self.profile = profile or PharmacyProfile()

    def item(self, document: str, item_id: str, status: str, reason: str = "", his_order: str = "") -> str:
        resource = dict(json.loads(document), status=status)
        if reason:
            resource["statusReason"] = {"text": reason}
        else:
            resource.pop("statusReason", None)
        resource["id"] = item_id
        if his_order:
            resource.setdefault("identifier", []).append({"system": HIS_ORDER_SYSTEM, "value": his_order})
        return _text(resource)

    def released(self, prescription: Prescription, ids: Sequence[str]) -> tuple[bytes, list[str]]:
        resources = medication_requests(prescription, self.tz, list(ids), self.profile)
        return canonical_json(resources), [_text(r) for r in resources]

    def dispense(self, dispense: Dispense, dispense_id: str) -> str:
        return _text(dict(medication_dispense(dispense, self.tz, self.profile), id=dispense_id))

    def is_signed(self, document: str) -> bool:
        return _signed(json.loads(document))

    def signed(self, document: str, sign: Callable[[bytes], str]) -> str:
        resource = json.loads(document)
        jws = sign(prescription_payload(resource))
        resource.setdefault("extension", []).append({"url": SIGNATURE_EXTENSION, "valueString": jws})
        return _text(resource)


def _signed(resource: dict) -> bool:
    return any(e.get("url") == SIGNATURE_EXTENSION for e in resource.get("extension") or [])


def served(document: str, claimed_by: str | None = None) -> dict:
    """An item's stored document as it is served: claimed by a pharmacy, it names it in ``meta.tag`` (outside
    the signed content)."""
    resource = json.loads(document)
    if claimed_by:
        resource["meta"] = {"tag": [{"system": CLAIMED_BY_TAG, "code": claimed_by}]}
    return resource


def verify_release(resource: dict, certificate_pems: bytes, now: datetime) -> bool:
    """What a pharmacy does (documented for them; used by tests): remove the signature extension, verify the
    JWS over the rest's canonical JSON against the gateway's certificate at ``now`` (aware). Raises
    `gateway.domain.signatures.SignatureError` when it does not verify."""
    trust = TrustStore.from_pem(certificate_pems)
    ext = [e for e in resource.get("extension") or [] if e.get("url") == SIGNATURE_EXTENSION]
    if len(ext) != 1:
        return False
    verify_detached(ext[0]["valueString"], prescription_payload(_without_signature(resource)), trust, now)
    return True


def _without_signature(resource: dict) -> dict:
    out = {k: v for k, v in resource.items() if k != "extension"}
    rest = [e for e in resource.get("extension") or [] if e.get("url") != SIGNATURE_EXTENSION]
    if rest:
        out["extension"] = rest
    return out


def _fhir_code(c: Code, profile: PharmacyProfile) -> dict:
    coding = {k: v for k, v in (("system", profile.fhir_system(c.system) or None), ("code", c.code or None),
                                ("display", c.text or None)) if v}
    out: dict = {}
    if c.code:
        out["coding"] = [coding]
    if c.text:
        out["text"] = c.text
    return out


def _fhir_quantity(value: str, unit: Code) -> dict:
    number = Decimal(value)
    q: dict = {"value": int(number) if number == number.to_integral_value() else float(number)}
    if unit.text or unit.code:
        q["unit"] = unit.text or unit.code
    if unit.code and unit.system == "UCUM":
        q["system"] = UCUM
        q["code"] = unit.code
    return q


def _iso(local: datetime, tz: ZoneInfo) -> str:
    return local.replace(tzinfo=tz).isoformat(timespec="seconds")


def _timing(freq: Code) -> dict:
    timing: dict = {"code": {"coding": [{"system": V2_0335, "code": freq.code, "display": freq.text or
                                         frequency_text(freq.code)}], "text": freq.text or frequency_text(freq.code)}}
    rep = FREQUENCIES.get(freq.code)
    c = freq.code
    if rep is None and c.startswith("Q") and c[-1:] in ("H", "D") and c[1:-1].isdigit():
        rep = (1, int(c[1:-1]), c[-1].lower(), "")
    if rep is not None:
        timing["repeat"] = {"frequency": rep[0], "period": rep[1], "periodUnit": rep[2]}
    return timing


def medication_requests(prescription: Prescription, tz: ZoneInfo, ids: list[str],
                        profile: PharmacyProfile | None = None) -> list[dict]:
    """One MedicationRequest dict per item, for pharmacies (the released direction). ``ids``: the gateway's
    resource ids, one per item."""
    profile = profile or PharmacyProfile()
    p = prescription
    if len(ids) != len(p.items):
        raise ValueError("one id per item")
    subject = {"identifier": {k: v for k, v in (("system", p.patient.identifiers[0].system or None),
                                                ("value", p.patient.identifiers[0].value)) if v}}
    name = " ".join(x for x in (p.patient.family, p.patient.given) if x)
    if name:
        subject["display"] = p.patient.family + p.patient.given if not p.patient.given.isascii() else name
    requester = {"identifier": {"system": p.prescriber.system or PRACTITIONER_SYSTEM, "value": p.prescriber.id}}
    if p.prescriber.name:
        requester["display"] = p.prescriber.name
    out = []
    for rid, item in zip(ids, p.items):
        dosage: dict = {
            "sequence": 1,
            "timing": _timing(item.frequency),
            "route": _fhir_code(item.route, profile),
            "doseAndRate": [{"doseQuantity": _fhir_quantity(item.dose_value, item.dose_unit)}],
        }
        if item.instructions:
            dosage["patientInstruction"] = item.instructions
        dispense: dict = {"quantity": _fhir_quantity(item.dispense_value, item.dispense_unit)}
        if item.refills:
            dispense["numberOfRepeatsAllowed"] = item.refills
        if item.days_supply:
            dispense["expectedSupplyDuration"] = {"value": item.days_supply, "unit": "d", "system": UCUM,
                                                  "code": "d"}
        identifiers = [{"system": HIS_ORDER_SYSTEM, "value": item.filler_id}] if item.filler_id else []
        res: dict = {
            "resourceType": "MedicationRequest",
            "id": rid,
            **({"identifier": identifiers} if identifiers else {}),
            "status": "active",
            "intent": "order",
            "medicationCodeableConcept": _fhir_code(item.medication, profile),
            "subject": subject,
            **({"encounter": {"identifier": {"value": p.encounter_id}}} if p.encounter_id else {}),
            **({"authoredOn": _iso(p.authored_local, tz)} if p.authored_local else {}),
            "requester": requester,
            "groupIdentifier": {"system": HIS_PRESCRIPTION_SYSTEM, "value": p.number},
            "dosageInstruction": [dosage],
            "dispenseRequest": dispense,
        }
        out.append(res)
    return out

def medication_dispense(dispense: Dispense, tz: ZoneInfo, profile: PharmacyProfile | None = None) -> dict:
    """A `Dispense` -> a MedicationDispense dict (no ``id``: the gateway assigns it when it records it)."""
    profile = profile or PharmacyProfile()
    d = dispense
    res: dict = {
        "resourceType": "MedicationDispense",
        "identifier": [{"system": HIS_DISPENSE_SYSTEM, "value": d.his_dispense}]
        + ([{"system": HIS_PRESCRIPTION_SYSTEM, "value": d.prescription_number}] if d.prescription_number else []),
        "status": "completed",
        "medicationCodeableConcept": _fhir_code(d.medication, profile),
        "subject": {"identifier": {k: v for k, v in (("system", d.patient.system or None),
                                                     ("value", d.patient.value)) if v}},
    }
    if d.dispenser_id:
        performer = {"identifier": {"system": PRACTITIONER_SYSTEM, "value": d.dispenser_id}}
        if d.dispenser_name:
            performer["display"] = d.dispenser_name
        res["performer"] = [{"actor": performer}]
    if d.placer_id:
        res["authorizingPrescription"] = [{"reference": f"MedicationRequest/{d.placer_id}"}]
    res["quantity"] = _fhir_quantity(d.quantity_value, d.quantity_unit)
    res["whenHandedOver"] = _iso(d.handed_over_local, tz)
    if d.route is not None:
        res["dosageInstruction"] = [{"route": _fhir_code(d.route, profile)}]
    if d.note:
        res["note"] = [{"text": d.note}]
    return res
