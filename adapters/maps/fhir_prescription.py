"""A platform's prescription, FHIR -> the domain's `Submission` and `Prescription`: pure, no I/O.

The full profile, with examples, is docs/pharmacy-profile.md; the golden files under tests/golden/pharmacy/
are the contract. What readers are served back in FHIR is `adapters.maps.fhir_documents`; the HL7 side is
`adapters.maps.rde_order` (orders and their answers) and `adapters.maps.rds_dispense` (dispensing, releases);
the vocabulary they share is `adapters.maps.pharmacy_codes`.

`SubmissionReader.read`: what the outer gate hands the domain, read once: the `Prescription`, the bytes the
prescriber signed (`gateway.domain.signatures.prescription_payload`: the canonical JSON of what the platform
sent; a body without one is `NotCanonical`), the JWS, and each MedicationRequest as the platform sent it
(without its narrative ``text``), kept for its readers.

FHIR -> `Prescription` (`prescription_from_fhir`): a MedicationRequest (one item) or a transaction Bundle
(several MedicationRequests sharing ``groupIdentifier``, with Patient, Practitioner, Encounter, Medication
entries). Validated with fhir.resources R4B first; then every missing field of every item is collected and
raised together as `InvalidPrescription` naming its FHIR path (``Bundle.entry[2].resource.dispenseRequest.
quantity``). Where each field goes in HL7 is the table of `adapters.maps.rde_order`; from FHIR:

======================  ==========================================================================
the `Prescription`      from FHIR
======================  ==========================================================================
patient.identifiers     Patient.identifier (system, value, type), or subject.identifier
patient.family, given   Patient.name (or subject.display)
birth_date / gender     Patient.birthDate / gender
patient_class           Encounter.class (AMB O, IMP I, EMER E)
encounter_id            Encounter.identifier / reference id
number                  groupIdentifier.value (Bundle) or identifier
authored_local          authoredOn, in the hospital's time zone
prescriber              requester -> Practitioner.identifier, name (or requester.identifier/display)
item.medication         medicationCodeableConcept / Medication.code, through the `PharmacyProfile`
item.dose_value, unit   dosageInstruction[0].doseAndRate[0].doseQuantity (value; code / unit)
item.instructions       dosageInstruction[0].patientInstruction (or text)
item.dispense_value     dispenseRequest.quantity (value; code / unit)
item.refills            dispenseRequest.numberOfRepeatsAllowed (0)
item.frequency          dosageInstruction[0].timing (code or repeat), asNeededBoolean -> PRN
item.days_supply        dispenseRequest.expectedSupplyDuration (days)
item.route              dosageInstruction[0].route
======================  ==========================================================================

Codes: a FHIR coding system URI maps to an HL7 coding-system name through `CODE_SYSTEMS` plus the hospital's
`PharmacyProfile` (``drug_systems``: its local drug code system first; ``drug_codes``: platform code -> local
code).
"""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import ValidationError

from adapters.maps.fhir_scheduling import InvalidResource
from adapters.maps.pharmacy_codes import (
    CODE_SYSTEMS,
    FREQUENCIES,
    UCUM,
    V2_0335,
    V3_GTS,
    PharmacyProfile,
    frequency_text,
)
from gateway.domain.model import Patient, PatientIdentifier
from gateway.domain.prescriptions import Code, Prescriber, Prescription, PrescriptionItem, Submission
from gateway.domain.signatures import prescription_payload

__all__ = [
    "InvalidPrescription",
    "NotCanonical",
    "SubmissionReader",
    "medication_request_entries",
    "prescription_from_fhir",
]

_BY_REPEAT = {(f, p, u): code for code, (f, p, u, _) in FREQUENCIES.items()}

#: Encounter.class code -> PV1-2, and back
PATIENT_CLASS = {"AMB": "O", "IMP": "I", "EMER": "E", "VR": "O", "HH": "O"}
GENDER = {"male": "M", "female": "F", "other": "O", "unknown": "U"}


class InvalidPrescription(InvalidResource):
    """A prescription the gateway cannot pass on: ``issues`` are (code, diagnostics, FHIR path) triples, all
    of them at once; ``status`` 400 (not valid FHIR) or 422 (valid FHIR, not a usable prescription)."""


class NotCanonical(InvalidPrescription):
    """A prescription whose content has no canonical JSON, so no signature can be checked over it (400)."""


class SubmissionReader:
    """Reads platforms' prescriptions for one hospital: its time zone and `PharmacyProfile`."""

    def __init__(self, tz: ZoneInfo, profile: PharmacyProfile | None = None):
        self.tz = tz
        self.profile = profile or PharmacyProfile()

    def read(self, body: Any, jws: str | None) -> Submission:
        """A platform's MedicationRequest or transaction Bundle, with the prescriber's JWS as it came ->
        `Submission`. Raises `InvalidPrescription` with every problem found, then `NotCanonical`."""
        prescription = prescription_from_fhir(body, self.tz, self.profile)
        try:
            signed = prescription_payload(body)
        except ValueError as e:
            raise NotCanonical([("invalid", f"the prescription cannot be canonicalised: {e}", None)]) from None
        documents = tuple(json.dumps({k: v for k, v in r.items() if k != "text"}, ensure_ascii=False)
                          for r in medication_request_entries(body))
        return Submission(prescription, signed, jws, documents)


def medication_request_entries(body: dict) -> list[dict]:
    """The MedicationRequest resources of a submission, in entry order (the order of the mapping's items)."""
    if body.get("resourceType") == "MedicationRequest":
        return [body]
    return [e["resource"] for e in body.get("entry") or []
            if isinstance(e, dict) and isinstance(e.get("resource"), dict)
            and e["resource"].get("resourceType") == "MedicationRequest"]


# ============================================================================================ FHIR -> ours


def _decimal_text(value: Any) -> str:
    """A JSON number as plain decimal text: 0.5 -> '0.5', 24 -> '24', 24.0 -> '24', 1e-3 -> '0.001'."""
    if isinstance(value, bool):
        raise TypeError("not a number")
    try:
        d = Decimal(repr(value)) if isinstance(value, float) else Decimal(str(value))
    except InvalidOperation:
        raise ValueError("not a number") from None
    if not d.is_finite():
        raise ValueError("not a number")
    text = format(d.normalize(), "f")
    return text


class _Issues:
    def __init__(self):
        self.items: list[tuple[str, str, str | None]] = []

    def add(self, code: str, text: str, path: str | None) -> None:
        self.items.append((code, f"{path}: {text}" if path else text, path))


def _ref_id(ref: str) -> str:
    return ref.rsplit("/", 1)[-1] if "/" in ref else ref


class _Resolver:
    """References inside one submission: Bundle fullUrl / ``Type/id``, or ``#contained``."""

    def __init__(self, resources: list[dict], contained: list[dict] | None = None):
        self.by_ref: dict[str, dict] = {}
        for res in resources:
            full = res.get("__fullUrl")
            if full:
                self.by_ref[full] = res
            if res.get("id"):
                self.by_ref[f"{res.get('resourceType')}/{res['id']}"] = res
        for res in contained or []:
            if res.get("id"):
                self.by_ref["#" + res["id"]] = res

    def get(self, ref: str | None, kind: str) -> dict | None:
        res = self.by_ref.get(ref or "")
        return res if res is not None and res.get("resourceType") == kind else None


def _codeable_to_code(cc: dict | None, systems) -> Code | None:
    if not cc:
        return None
    for coding in cc.get("coding") or []:
        if coding.get("code"):
            return Code(coding["code"], coding.get("display") or cc.get("text") or "",
                        systems(coding.get("system") or ""))
    return None


def _quantity(q: dict | None) -> tuple[str, Code] | None:
    if not q or q.get("value") is None:
        return None
    value = _decimal_text(q["value"])
    unit_text = q.get("unit") or q.get("code") or ""
    if q.get("code") and q.get("system") == UCUM:
        return value, Code(q["code"], unit_text, "UCUM")
    return value, Code("", unit_text)


def _frequency(timing: dict | None, as_needed: bool) -> Code | None:
    if timing:
        code = timing.get("code") or {}
        for coding in code.get("coding") or []:
            if coding.get("code") and coding.get("system") in (V2_0335, V3_GTS, None):
                c = coding["code"].upper()
                return Code(c, coding.get("display") or code.get("text") or frequency_text(c), "HL70335")
        rep = timing.get("repeat") or {}
        f, p, u = rep.get("frequency"), rep.get("period"), rep.get("periodUnit")
        if f and p and u:
            try:
                key = (int(f), int(Decimal(str(p))), u)
            except (ValueError, InvalidOperation):
                return None
            c = _BY_REPEAT.get(key)
            if c is None and key[0] == 1 and u == "h":
                c = f"Q{key[1]}H"
            elif c is None and key[0] == 1 and u == "d":
                c = f"Q{key[1]}D"
            if c:
                return Code(c, code.get("text") or frequency_text(c), "HL70335")
    if as_needed:
        return Code("PRN", "必要时", "HL70335")
    return None


def _days(duration: dict | None) -> int | None:
    if not duration or duration.get("value") is None:
        return None
    unit = duration.get("code") or duration.get("unit") or "d"
    factor = {"d": 1, "day": 1, "days": 1, "wk": 7, "week": 7, "weeks": 7}.get(unit)
    if factor is None:
        return None
    return int(Decimal(str(duration["value"])) * factor)


def _human_name(names: list | None) -> tuple[str, str]:
    if not names:
        return "", ""
    n = names[0]
    family, given = n.get("family") or "", " ".join(g for g in n.get("given") or () if g)
    if not family and not given and n.get("text"):
        family = n["text"]
    return family, given


def _type_code(ident: dict) -> str:
    for coding in (ident.get("type") or {}).get("coding") or []:
        if coding.get("code"):
            return coding["code"]
    return ""


def _local(text: str, tz: ZoneInfo) -> datetime:
    value = datetime.fromisoformat(text)  # 3.11 reads a trailing Z
    if value.tzinfo is None:
        return value
    return value.astimezone(tz).replace(tzinfo=None)


def _validate(body: Any) -> None:
    from fhir.resources.R4B.bundle import Bundle
    from fhir.resources.R4B.medicationrequest import MedicationRequest

    if not isinstance(body, dict) or body.get("resourceType") not in ("MedicationRequest", "Bundle"):
        raise InvalidPrescription([("invalid", "the body must be a MedicationRequest or a transaction Bundle",
                                    None)])
    model = MedicationRequest if body["resourceType"] == "MedicationRequest" else Bundle
    try:
        model.model_validate(body)
    except ValidationError as e:
        issues = []
        for err in e.errors()[:20]:
            path = body["resourceType"] + "".join(f"[{p}]" if isinstance(p, int) else f".{p}"
                                                  for p in err.get("loc", ()) if p != "__root__")
            issues.append(("structure", f"{path}: {err.get('msg')}", path))
        raise InvalidPrescription(issues) from None
    except (KeyError, TypeError):  # fhir.resources' answer to a nested resource of no FHIR type: a 400 too
        raise InvalidPrescription([("structure", f"{body['resourceType']}: a resource in it has a resourceType "
                                    "that is not a FHIR resource type", body["resourceType"])]) from None


def prescription_from_fhir(body: Any, tz: ZoneInfo, profile: PharmacyProfile | None = None,
                           item_ids: list[str] | None = None) -> Prescription:
    """A platform's MedicationRequest or transaction Bundle -> `Prescription`. ``item_ids``: the gateway's ids
    for the items (its MedicationRequest ids, in entry order); default: each request's ``id`` or
    ``<number>-<n>``. Raises `InvalidPrescription` with every problem found."""
    profile = profile or PharmacyProfile()
    _validate(body)
    if body["resourceType"] == "Bundle":
        if body.get("type") != "transaction":
            raise InvalidPrescription([("invalid", "a prescription Bundle must be a transaction", "Bundle.type")])
        resources, paths = [], []
        for i, entry in enumerate(body.get("entry") or []):
            res = dict(entry.get("resource") or {})
            if entry.get("fullUrl"):
                res["__fullUrl"] = entry["fullUrl"]
            resources.append(res)
            paths.append(f"Bundle.entry[{i}].resource")
        requests = [(r, p) for r, p in zip(resources, paths) if r.get("resourceType") == "MedicationRequest"]
        if not requests:
            raise InvalidPrescription([("required", "the Bundle holds no MedicationRequest", "Bundle.entry")], 422)
        resolver = _Resolver(resources)
    else:
        requests = [(body, "MedicationRequest")]
        resolver = _Resolver([], body.get("contained"))

    issues = _Issues()
    first, first_path = requests[0]
    # the prescription number: groupIdentifier shared by all, else (one item) its identifier
    groups = {(r.get("groupIdentifier") or {}).get("value") for r, _ in requests}
    number = (first.get("groupIdentifier") or {}).get("value") or ""
    if len(groups) > 1:
        issues.add("invalid", "all MedicationRequests of one prescription must share groupIdentifier",
                   "Bundle.entry.resource.groupIdentifier")
    if not number and len(requests) == 1:
        number = next((i.get("value") for i in first.get("identifier") or [] if i.get("value")), "")
    if not number:
        issues.add("required", "the prescription number is missing (groupIdentifier.value)",
                   f"{first_path}.groupIdentifier")

    patient, birth, gender = _patient(first, first_path, resolver, issues)
    prescriber = _prescriber(first, first_path, resolver, issues)
    for r, p in requests[1:]:
        if (r.get("subject") or {}) != (first.get("subject") or {}):
            issues.add("invalid", "every item must name the same patient", f"{p}.subject")
        if (r.get("requester") or {}) != (first.get("requester") or {}):
            issues.add("invalid", "every item must name the same prescriber", f"{p}.requester")
    encounter_id, patient_class = _encounter(first, resolver)

    items = []
    for n, (req, path) in enumerate(requests, start=1):
        if req.get("status") not in ("active", "draft"):
            issues.add("business-rule", f"a new prescription item must be active, not {req.get('status')}",
                       f"{path}.status")
        if req.get("intent") not in ("order", "original-order", "instance-order"):
            issues.add("business-rule", f"intent must be order, not {req.get('intent')}", f"{path}.intent")
        if item_ids is not None and n <= len(item_ids):
            placer = item_ids[n - 1]
        else:
            placer = req.get("id") or f"{number}-{n}"
        item = _item(req, path, placer, resolver, profile, issues)
        if item is not None:
            items.append(item)
    if issues.items:
        raise InvalidPrescription(issues.items, 422)
    authored = first.get("authoredOn")
    return Prescription(
        number=number,
        items=tuple(items),
        patient=patient,
        prescriber=prescriber,
        authored_local=_local(authored, tz) if authored else None,
        encounter_id=encounter_id,
        patient_class=patient_class,
        birth_date=birth,
        gender=gender,
    )


def _patient(req: dict, path: str, resolver: _Resolver, issues: _Issues) -> tuple[Patient, str, str]:
    subject = req.get("subject") or {}
    res = resolver.get(subject.get("reference"), "Patient")
    empty = Patient(identifiers=())
    if res is not None:
        ids = tuple(PatientIdentifier(i.get("system") or "", i["value"], _type_code(i))
                    for i in res.get("identifier") or [] if i.get("value"))
        if not ids:
            issues.add("required", "the Patient needs an identifier the HIS knows", f"{path}.subject")
            return empty, "", ""
        family, given = _human_name(res.get("name"))
        phone = next((t.get("value") for t in res.get("telecom") or [] if t.get("system") == "phone"), "") or ""
        birth = (res.get("birthDate") or "").replace("-", "")
        return Patient(ids, family, given, phone), birth, GENDER.get(res.get("gender") or "", "")
    ident = subject.get("identifier") or {}
    if ident.get("value"):
        return Patient((PatientIdentifier(ident.get("system") or "", ident["value"], _type_code(ident)),),
                       subject.get("display") or ""), "", ""
    issues.add("required", "the patient is missing: subject must reference a Patient in the submission or "
               "carry subject.identifier", f"{path}.subject")
    return empty, "", ""


def _prescriber(req: dict, path: str, resolver: _Resolver, issues: _Issues) -> Prescriber:
    requester = req.get("requester") or {}
    res = resolver.get(requester.get("reference"), "Practitioner")
    if res is not None:
        ident = next((i for i in res.get("identifier") or [] if i.get("value")), None)
        family, given = _human_name(res.get("name"))
        if ident is None:
            issues.add("required", "the prescriber (Practitioner) needs an identifier the HIS knows",
                       f"{path}.requester")
            return Prescriber("")
        return Prescriber(ident["value"], (family + given) if family and given and not given.isascii()
                          else " ".join(x for x in (family, given) if x), ident.get("system") or "")
    ident = requester.get("identifier") or {}
    if ident.get("value"):
        return Prescriber(ident["value"], requester.get("display") or "", ident.get("system") or "")
    issues.add("required", "the prescriber is missing: requester must reference a Practitioner in the "
               "submission or carry requester.identifier", f"{path}.requester")
    return Prescriber("")


def _encounter(req: dict, resolver: _Resolver) -> tuple[str, str]:
    enc = req.get("encounter") or {}
    res = resolver.get(enc.get("reference"), "Encounter")
    if res is not None:
        ident = next((i.get("value") for i in res.get("identifier") or [] if i.get("value")), "")
        return ident or res.get("id") or "", PATIENT_CLASS.get((res.get("class") or {}).get("code", ""), "O")
    if (enc.get("identifier") or {}).get("value"):
        return enc["identifier"]["value"], "O"
    if enc.get("reference", "").startswith("Encounter/"):
        return _ref_id(enc["reference"]), "O"
    return "", "O"


def _medication(req: dict, path: str, resolver: _Resolver, profile: PharmacyProfile, issues: _Issues) -> Code | None:
    cc, where = req.get("medicationCodeableConcept"), f"{path}.medicationCodeableConcept"
    ref = (req.get("medicationReference") or {}).get("reference")
    if cc is None and ref:
        med = resolver.get(ref, "Medication")
        if med is None:
            issues.add("required", f"medicationReference {ref} is not a Medication in the submission",
                       f"{path}.medicationReference")
            return None
        cc, where = med.get("code"), f"{path}.medicationReference.resolve().code"
    if not cc:
        issues.add("required", "the drug is missing", f"{path}.medication[x]")
        return None
    text = cc.get("text") or ""
    codings = [c for c in cc.get("coding") or [] if c.get("code")]
    for uri, name in profile.drug_systems.items():
        for c in codings:
            if c.get("system") == uri:
                return Code(c["code"], c.get("display") or text, name)
    first_name = next(iter(profile.drug_systems.values()))
    for c in codings:
        local = profile.drug_codes.get((c.get("system") or "", c["code"]))
        if local:
            return Code(local, text or c.get("display") or "", first_name)
    issues.add("code-invalid", "no coding in a drug code system the HIS knows (" +
               ", ".join(profile.drug_systems) + ") and no configured translation", f"{where}.coding")
    return None


def _item(req: dict, path: str, placer: str, resolver: _Resolver, profile: PharmacyProfile,
          issues: _Issues) -> PrescriptionItem | None:
    before = len(issues.items)
    medication = _medication(req, path, resolver, profile, issues)
    dosages = req.get("dosageInstruction") or []
    dosage = dosages[0] if dosages else {}
    dpath = f"{path}.dosageInstruction[0]"
    if not dosages:
        issues.add("required", "dosageInstruction is missing (dose, route and frequency)", f"{path}.dosageInstruction")
    dose = None
    for dr in dosage.get("doseAndRate") or []:
        dose = _quantity(dr.get("doseQuantity"))
        if dose:
            break
    if dosages and dose is None:
        issues.add("required", "the dose is missing", f"{dpath}.doseAndRate[0].doseQuantity")
    route = _codeable_to_code(dosage.get("route"), lambda s: CODE_SYSTEMS.get(s, ""))
    if route is None and (dosage.get("route") or {}).get("text"):
        route = Code("", dosage["route"]["text"])
    if dosages and route is None:
        issues.add("required", "the route is missing", f"{dpath}.route")
    frequency = _frequency(dosage.get("timing"), bool(dosage.get("asNeededBoolean")))
    if dosages and frequency is None:
        issues.add("required", "the frequency is missing or not expressible in HL7 table 0335 (timing.code, or "
                   "timing.repeat frequency/period/periodUnit)", f"{dpath}.timing")
    disp = req.get("dispenseRequest") or {}
    quantity = _quantity(disp.get("quantity"))
    if quantity is None:
        issues.add("required", "the quantity to dispense is missing", f"{path}.dispenseRequest.quantity")
    if len(issues.items) > before:
        return None
    return PrescriptionItem(
        placer_id=placer,
        medication=medication,
        dose_value=dose[0],
        dose_unit=dose[1],
        route=route,
        frequency=frequency,
        dispense_value=quantity[0],
        dispense_unit=quantity[1],
        days_supply=_days(disp.get("expectedSupplyDuration")),
        refills=int(disp.get("numberOfRepeatsAllowed") or 0),
        instructions=dosage.get("patientInstruction") or dosage.get("text") or "",
    )


def prescription_from_request(payload: bytes, item_ids: list[str], *, tz: ZoneInfo,
                              profile: PharmacyProfile | None = None) -> Prescription:
    """A prescription as the platform's request stored it (its canonical JSON), with the gateway's ids of its
    items: what an order committed before chamber schema v6 (which keeps the domain's record) is written from."""
    return prescription_from_fhir(json.loads(payload), tz, profile, item_ids)
