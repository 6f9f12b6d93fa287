"""Prescriptions between FHIR (platforms, pharmacies) and HL7 v2 pharmacy orders (the HIS): pure, no I/O.

The full profile, with examples, is docs/pharmacy-profile.md; the golden files under tests/golden/pharmacy/
are the contract. Segment maps follow the HL7 v2-to-FHIR mapping guide (RXO/RXE/RXR/TQ1 -> MedicationRequest,
RXD -> MedicationDispense); the guide has no RDE_O11 / OMP_O09 / RDS_O13 message maps, so the message-level
choices below are ours.

FHIR -> `Prescription` (`prescription_from_fhir`): a MedicationRequest (one item) or a transaction Bundle
(several MedicationRequests sharing ``groupIdentifier``, with Patient, Practitioner, Encounter, Medication
entries). Validated with fhir.resources R4B first; then every missing field of every item is collected and
raised together as `InvalidPrescription` naming its FHIR path (``Bundle.entry[2].resource.dispenseRequest.
quantity``).

`Prescription` -> HL7 (`build_order`): RDE^O11 (default) or OMP^O09, written with the light writer
(``adapters.hl7.er7.format_message`` + ``escape``), every segment ending with CR. Each item is one group:

======================  =====================================  ==========================================
HL7 field               RDE^O11 (ORC RXE TQ1 RXR)               from FHIR
======================  =====================================  ==========================================
MSH-9                   ``RDE^O11^RDE_O11`` / ``OMP^O09^OMP_O09``
MSH-10                  ``G`` + 19 random hex digits, given at commit, kept on every resend
MSH-18                  header charset (``UNICODE UTF-8``, ``GB 18030-2000``)
PID-3                   ``value^^^authority^type`` repeated     Patient.identifier (system, value, type)
PID-5                   ``family^given``                        Patient.name
PID-7 / PID-8           birth date ``YYYYMMDD`` / M F O U       Patient.birthDate / gender
PV1-2                   patient class (O, I, E)                 Encounter.class (AMB O, IMP I, EMER E)
PV1-19                  visit number                            Encounter.identifier / reference id
ORC-1                   ``NW``
ORC-2                   ``<item id>^GATEWAYD``                  the gateway's MedicationRequest id
ORC-4                   ``<prescription number>^GATEWAYD``     groupIdentifier.value (Bundle) or identifier
ORC-9                   order date/time (local DTM)             authoredOn (else now)
ORC-12                  ``id^name``                             requester -> Practitioner.identifier, name
RXE-2 / RXO-1           drug ``code^text^system``               medicationCodeableConcept / Medication.code
RXE-3 / RXO-2           dose value                              dosageInstruction[0].doseAndRate[0].doseQuantity.value
RXE-5 / RXO-4           dose unit ``code^text^UCUM`` or ``^text``  doseQuantity.code / unit
RXE-7 / RXO-7           ``^instructions``                       dosageInstruction[0].patientInstruction (or text)
RXE-10 / RXO-11         dispense amount                         dispenseRequest.quantity.value
RXE-11 / RXO-12         dispense units                          dispenseRequest.quantity.code / unit
RXE-12 / RXO-13         refills                                 dispenseRequest.numberOfRepeatsAllowed (0)
RXE-15                  prescription number                     (as ORC-4)
TQ1-1, TQ1-3            ``1``, repeat pattern (table 0335)      dosageInstruction[0].timing (code or repeat)
TQ1-6                   days supply ``<n>^d``                   dispenseRequest.expectedSupplyDuration (days)
TQ1-7                   start (local DTM)                       authoredOn
RXR-1                   route ``code^text^system``              dosageInstruction[0].route
======================  =====================================  ==========================================

Group order follows the v2.5 message structures: RDE_O11 ``ORC [RXO] RXE {TQ1} {RXR}``; OMP_O09
``ORC {TQ1} RXO {RXR}``.

HL7 -> FHIR:

* `read_order_answer`: ACK, RRE^O12, ORP^O10 (also v2.3's ORR) -> `OrderAnswer`: accepted when MSA-1 is AA/CA
  and no ORC-1 says UA/DE/UM/UX; the reason is ERR-8, else ERR-3.2, else MSA-3, else ORC-16.2.
* `dispenses_from_rds`: RDS^O13 -> one MedicationDispense dict per RXD (status completed; RXD-2 drug, RXD-3
  whenHandedOver, RXD-4/5 quantity, RXD-7 prescription number, RXD-9 note, RXD-10 performer, ORC-2 ->
  authorizingPrescription ``MedicationRequest/<id>``, PID-3 -> subject.identifier).
* `prescription_from_rde` + `medication_requests`: an RDE^O11 from the HIS (for an outside pharmacy, marked
  ``RELEASE`` in ORC-16.1 of each ORC: `released_prescription` insists on it) -> `Prescription` -> one
  MedicationRequest dict per item (status active, groupIdentifier = the HIS's prescription number).

Errors reading HL7 are `Hl7Error` with segment and field (the inner gate NAKs with them). Codes: a FHIR coding
system URI maps to an HL7 coding-system name through `CODE_SYSTEMS` plus the hospital's `PharmacyProfile`
(``drug_systems``: its local drug code system first; ``drug_codes``: platform code -> local code).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import ValidationError

from adapters.hl7.er7 import (
    Hl7Error,
    Message,
    Segment,
    dtm,
    escape,
    format_message,
    hl7_charset_name,
    parse_dtm,
)
from adapters.mapping.fhir_scheduling import InvalidResource
from adapters.mapping.srm_booking import Hl7Header
from gateway.prescriptions import (
    Code,
    ItemAnswer,
    OrderAnswer,
    Prescriber,
    Prescription,
    PrescriptionItem,
)
from gateway.scheduling import Patient, PatientIdentifier

__all__ = [
    "CODE_SYSTEMS",
    "InvalidPrescription",
    "PharmacyProfile",
    "build_order",
    "dispenses_from_rds",
    "medication_requests",
    "prescription_from_fhir",
    "prescription_from_rde",
    "read_order_answer",
    "released_prescription",
]

PLACER_NAMESPACE = "GATEWAYD"
RELEASE_MARK = "RELEASE"

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
V2_0162 = "http://terminology.hl7.org/CodeSystem/v2-0162"
V2_0335 = "http://terminology.hl7.org/CodeSystem/v2-0335"
V3_GTS = "http://terminology.hl7.org/CodeSystem/v3-GTSAbbreviation"
UCUM = "http://unitsofmeasure.org"
PRACTITIONER_SYSTEM = "urn:gatewayd:his:practitioner"
PRESCRIPTION_SYSTEM = "urn:gatewayd:prescription"
HIS_PRESCRIPTION_SYSTEM = "urn:gatewayd:his:prescription"
HIS_ORDER_SYSTEM = "urn:gatewayd:his:order"
HIS_DISPENSE_SYSTEM = "urn:gatewayd:his:dispense"

#: FHIR code system URI -> HL7 coding system name (table 0396). Drug systems come from the profile.
CODE_SYSTEMS: dict[str, str] = {
    V2_0162: "HL70162",
    V2_0335: "HL70335",
    V3_GTS: "HL70335",
    UCUM: "UCUM",
    "http://snomed.info/sct": "SCT",
    "http://www.whocc.no/atc": "ATC",
}

#: HL7 table 0335 frequency -> FHIR Timing.repeat (frequency, period, periodUnit), and its display
FREQUENCIES: dict[str, tuple[int, int, str, str]] = {
    "QD": (1, 1, "d", "每日一次"),
    "BID": (2, 1, "d", "每日两次"),
    "TID": (3, 1, "d", "每日三次"),
    "QID": (4, 1, "d", "每日四次"),
    "QOD": (1, 2, "d", "隔日一次"),
    "QW": (1, 1, "wk", "每周一次"),
}
_BY_REPEAT = {(f, p, u): code for code, (f, p, u, _) in FREQUENCIES.items()}

#: Encounter.class code -> PV1-2, and back
PATIENT_CLASS = {"AMB": "O", "IMP": "I", "EMER": "E", "VR": "O", "HH": "O"}
GENDER = {"male": "M", "female": "F", "other": "O", "unknown": "U"}


class InvalidPrescription(InvalidResource):
    """A prescription the gateway cannot pass on: ``issues`` are (code, diagnostics, FHIR path) triples, all
    of them at once; ``status`` 400 (not valid FHIR) or 422 (valid FHIR, not a usable prescription)."""


@dataclass(frozen=True)
class PharmacyProfile:
    """Per-hospital choices (from the YAML): the order message, and how drug codes reach the HIS.

    ``drug_systems``: FHIR code system URI -> HL7 coding system name, in order of preference (the hospital's
    local drug code system first). ``drug_codes``: ``(uri, code)`` of a platform's coding -> the code in the
    first of ``drug_systems``, used when no coding is already in a system the HIS knows."""

    message: str = "RDE"  # or "OMP"
    drug_systems: Mapping[str, str] = field(default_factory=lambda: {"urn:gatewayd:his:drug": "99HIS"})
    drug_codes: Mapping[tuple[str, str], str] = field(default_factory=dict)

    def __post_init__(self):
        if self.message not in ("RDE", "OMP"):
            raise ValueError(f"pharmacy order message must be RDE or OMP, not {self.message!r}")
        if not self.drug_systems:
            raise ValueError("drug_systems needs at least the hospital's drug code system")

    def hl7_system(self, uri: str) -> str:
        return self.drug_systems.get(uri) or CODE_SYSTEMS.get(uri) or ""

    def fhir_system(self, name: str) -> str:
        for uri, hl7 in self.drug_systems.items():
            if hl7 == name:
                return uri
        for uri, hl7 in CODE_SYSTEMS.items():
            if hl7 == name:
                return uri
        return ""


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
                return Code(c, coding.get("display") or code.get("text") or _freq_text(c), "HL70335")
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
                return Code(c, code.get("text") or _freq_text(c), "HL70335")
    if as_needed:
        return Code("PRN", "必要时", "HL70335")
    return None


def _freq_text(code: str) -> str:
    if code in FREQUENCIES:
        return FREQUENCIES[code][3]
    if code.startswith("Q") and code.endswith("H") and code[1:-1].isdigit():
        return f"每{code[1:-1]}小时一次"
    if code.startswith("Q") and code.endswith("D") and code[1:-1].isdigit():
        return f"每{code[1:-1]}日一次"
    return {"PRN": "必要时"}.get(code, code)


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
    family, given = n.get("family") or "", " ".join(n.get("given") or [])
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


# ============================================================================================ ours -> HL7


def _cwe(c: Code) -> str:
    return "^".join((escape(c.code), escape(c.text), escape(c.system))).rstrip("^")


def _segment(name: str, fields: dict[int, str]) -> list[str]:
    last = max([n for n, v in fields.items() if v] + [1])
    out = [name] + [""] * last
    for n, v in fields.items():
        if n <= last:
            out[n] = v
    return out


def build_order(prescription: Prescription, *, header: Hl7Header, control_id: str, now: datetime,
                message: str = "RDE") -> bytes:
    """RDE^O11 (``message='RDE'``) or OMP^O09 (``'OMP'``) for a prescription, encoded in the header's
    charset. ``now`` (naive local) is MSH-7, and ORC-9/TQ1-7 when the prescription has no authoring time."""
    if message not in ("RDE", "OMP"):
        raise ValueError(f"pharmacy order message must be RDE or OMP, not {message!r}")
    p = prescription
    mtype = "RDE^O11^RDE_O11" if message == "RDE" else "OMP^O09^OMP_O09"
    when = dtm(p.authored_local or now)
    pat = p.patient
    segments = [
        _segment("MSH", {
            1: "^~\\&", 2: escape(header.sending_application), 3: escape(header.sending_facility),
            4: escape(header.receiving_application), 5: escape(header.receiving_facility), 6: dtm(now),
            8: mtype, 9: escape(control_id), 10: "P", 11: header.version, 17: hl7_charset_name(header.charset),
        }),
        _segment("PID", {
            1: "1",
            3: "~".join("^".join((escape(i.value), "", "", escape(i.system), escape(i.type_code or "PT")))
                        for i in pat.identifiers),
            5: "^".join((escape(pat.family), escape(pat.given))).rstrip("^"),
            7: escape(p.birth_date), 8: p.gender, 13: escape(pat.phone),
        }),
        _segment("PV1", {1: "1", 2: p.patient_class or "O", 19: escape(p.encounter_id)}),
    ]
    prescriber = "^".join((escape(p.prescriber.id), escape(p.prescriber.name))).rstrip("^")
    for item in p.items:
        orc = _segment("ORC", {
            1: "NW", 2: f"{escape(item.placer_id)}^{PLACER_NAMESPACE}",
            4: f"{escape(p.number)}^{PLACER_NAMESPACE}", 9: when, 12: prescriber,
        })
        tq1 = _segment("TQ1", {
            1: "1", 3: escape(item.frequency.code),
            6: f"{item.days_supply}^d" if item.days_supply else "", 7: when,
        })
        rxr = _segment("RXR", {1: _cwe(item.route)})
        instructions = f"^{escape(item.instructions)}" if item.instructions else ""
        if message == "RDE":
            rx = _segment("RXE", {
                2: _cwe(item.medication), 3: item.dose_value, 5: _cwe(item.dose_unit), 7: instructions,
                10: item.dispense_value, 11: _cwe(item.dispense_unit), 12: str(item.refills),
                15: escape(p.number),
            })
            segments += [orc, rx, tq1, rxr]
        else:
            rx = _segment("RXO", {
                1: _cwe(item.medication), 2: item.dose_value, 4: _cwe(item.dose_unit), 7: instructions,
                11: item.dispense_value, 12: _cwe(item.dispense_unit), 13: str(item.refills),
            })
            segments += [orc, tq1, rx, rxr]
    return format_message(segments).encode(header.charset)


# ============================================================================================ HL7 -> ours

_REFUSING_ORDER_CONTROL = frozenset({"UA", "DE", "UM", "UX", "UC", "UD", "UF", "UH", "UN", "UR"})


def read_order_answer(message: Message) -> OrderAnswer:
    """The HIS's answer to an RDE/OMP: ACK, RRE^O12, ORP^O10 (ORR^O02/O10 too). Does not compare MSA-2 with
    what was sent: `OrderAnswer.acknowledges` is for the caller (the relay) to match."""
    if message.message_code not in ("ACK", "RRE", "ORP", "ORR"):
        raise Hl7Error(200, f"not an answer to a pharmacy order: {message.type_name}", segment="MSH", field=9)
    msa = message.segment("MSA")
    if msa is None:
        raise Hl7Error(101, "answer without an MSA segment", segment="MSA")
    code = msa.get(1).upper()
    if code not in ("AA", "AE", "AR", "CA", "CE", "CR"):
        raise Hl7Error(103, f"MSA-1 {msa.get(1)!r} is not an acknowledgment code", segment="MSA", field=1)
    items = tuple(
        ItemAnswer(placer_id=orc.get(2), filler_id=orc.get(3), order_control=orc.get(1).upper())
        for orc in message.all("ORC")
    )
    refused_items = [i for i in items if i.order_control in _REFUSING_ORDER_CONTROL]
    accepted = code in ("AA", "CA") and not refused_items
    reason = ""
    err = message.segment("ERR")
    if err is not None:
        reason = err.get(8) or err.get(3, 2) or ""
    reason = reason or msa.get(3)
    if not reason:
        for orc in message.all("ORC"):
            if orc.get(1).upper() in _REFUSING_ORDER_CONTROL:
                reason = orc.get(16, 2) or orc.get(16, 1)
                break
    return OrderAnswer(acknowledges=msa.get(2), code=code, accepted=accepted, reason=reason, items=items)


def _required(seg: Segment, field_no: int, what: str, seq: int, component: int = 1) -> str:
    value = seg.get(field_no, component)
    if not value:
        raise Hl7Error(101, f"{seg.name}-{field_no} ({what}) is required", segment=seg.name, sequence=seq,
                       field=field_no)
    return value


def _code(seg: Segment, field_no: int) -> Code:
    return Code(seg.get(field_no, 1), seg.get(field_no, 2), seg.get(field_no, 3))


def _patient_from_pid(message: Message) -> tuple[Patient, str, str]:
    pid = message.segment("PID")
    if pid is None:
        raise Hl7Error(101, "PID segment is required", segment="PID")
    ids = []
    for r in range(pid.repetitions(3)):
        value = pid.get(3, 1, r)
        if value:
            ids.append(PatientIdentifier(pid.get(3, 4, r), value, pid.get(3, 5, r)))
    if not ids:
        raise Hl7Error(101, "PID-3 (patient identifier) is required", segment="PID", field=3)
    return Patient(tuple(ids), pid.get(5, 1), pid.get(5, 2), pid.get(13)), pid.get(7), pid.get(8)


def prescription_from_rde(message: Message) -> Prescription:
    """An RDE^O11 from the HIS -> `Prescription` (items from each ORC/RXE/TQ1/RXR group). The prescription
    number is ORC-4.1 of the first group, else RXE-15; ``released`` is True when every ORC-16.1 is
    ``RELEASE``."""
    if message.message_code != "RDE" or message.trigger not in ("O11", "O01"):
        raise Hl7Error(200, f"not a pharmacy encoded order: {message.type_name}", segment="MSH", field=9)
    patient, birth, gender = _patient_from_pid(message)
    pv1 = message.segment("PV1")
    groups = message.groups("ORC")
    if not groups:
        raise Hl7Error(101, "RDE without an ORC segment", segment="ORC")
    items, released, number, prescriber, authored = [], True, "", None, None
    for seq, group in enumerate(groups, start=1):
        orc = group[0]
        by_name: dict[str, Segment] = {}
        for seg in group[1:]:
            by_name.setdefault(seg.name, seg)
        rxe, tq1, rxr = by_name.get("RXE"), by_name.get("TQ1"), by_name.get("RXR")
        if rxe is None:
            raise Hl7Error(101, "each ORC needs its RXE", segment="RXE", sequence=seq)
        if rxr is None:
            raise Hl7Error(101, "each RXE needs an RXR (route)", segment="RXR", sequence=seq)
        if tq1 is None or not tq1.get(3):
            raise Hl7Error(101, "each RXE needs a TQ1 with TQ1-3 (frequency)", segment="TQ1", sequence=seq, field=3)
        released = released and orc.get(16).upper() == RELEASE_MARK
        number = number or orc.get(4) or rxe.get(15)
        if prescriber is None:
            prescriber = Prescriber(_required(orc, 12, "ordering provider", seq),
                                    orc.get(12, 2) + orc.get(12, 3), PRACTITIONER_SYSTEM)
        if authored is None and (orc.get(9) or tq1.get(7)):
            authored = parse_dtm(orc.get(9) or tq1.get(7)).replace(tzinfo=None)
        days = tq1.get(6)
        try:
            days_supply = int(Decimal(days)) if days else None
            refills = int(rxe.get(12) or 0)
            Decimal(_required(rxe, 3, "give amount", seq))
            Decimal(_required(rxe, 10, "dispense amount", seq))
        except (InvalidOperation, ValueError):
            raise Hl7Error(102, "RXE-3/RXE-10/RXE-12/TQ1-6 must be numbers", segment="RXE", sequence=seq) from None
        code = tq1.get(3).upper()
        if not (orc.get(2) or orc.get(3)):
            raise Hl7Error(101, "ORC-2 or ORC-3 (placer or filler order number) is required", segment="ORC",
                           sequence=seq, field=3)
        items.append(PrescriptionItem(
            placer_id=orc.get(2) or orc.get(3),
            filler_id=orc.get(3),
            medication=Code(_required(rxe, 2, "give code", seq), rxe.get(2, 2), rxe.get(2, 3)),
            dose_value=rxe.get(3),
            dose_unit=_code(rxe, 5),
            route=Code(_required(rxr, 1, "route", seq), rxr.get(1, 2), rxr.get(1, 3)),
            frequency=Code(code, _freq_text(code), "HL70335"),
            dispense_value=rxe.get(10),
            dispense_unit=_code(rxe, 11),
            days_supply=days_supply,
            refills=refills,
            instructions=rxe.get(7, 2) or rxe.get(7, 1),
        ))
    if not number:
        raise Hl7Error(101, "prescription number (ORC-4 or RXE-15) is required", segment="ORC", field=4)
    return Prescription(
        number=number, items=tuple(items), patient=patient, prescriber=prescriber, authored_local=authored,
        encounter_id=pv1.get(19) if pv1 is not None else "",
        patient_class=(pv1.get(2) if pv1 is not None else "") or "O",
        birth_date=birth, gender=gender, released=released,
    )


def released_prescription(message: Message) -> Prescription:
    """`prescription_from_rde` for the outside-pharmacy direction: every ORC needs ORC-3, the HIS's order
    number (else 101); an RDE whose ORCs are not all marked ``RELEASE`` is refused (103 at ORC-16)."""
    p = prescription_from_rde(message)
    for seq, orc in enumerate(message.all("ORC"), start=1):
        if not orc.get(3):
            raise Hl7Error(101, "ORC-3 (the HIS's order number) is required on a released prescription",
                           segment="ORC", sequence=seq, field=3)
    if not p.released:
        raise Hl7Error(103, f"not released for outside pharmacies: every ORC-16.1 must be {RELEASE_MARK}",
                       segment="ORC", field=16)
    return p


# ============================================================================================ ours -> FHIR


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
                                         _freq_text(freq.code)}], "text": freq.text or _freq_text(freq.code)}}
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


def dispenses_from_rds(message: Message, tz: ZoneInfo, profile: PharmacyProfile | None = None) -> list[dict]:
    """RDS^O13 -> one MedicationDispense dict per RXD (no ``id``: the chamber assigns it)."""
    profile = profile or PharmacyProfile()
    if message.message_code != "RDS" or message.trigger != "O13":
        raise Hl7Error(200, f"not a pharmacy dispense: {message.type_name}", segment="MSH", field=9)
    patient, _, _ = _patient_from_pid(message)
    ident = patient.identifiers[0]
    subject = {"identifier": {k: v for k, v in (("system", ident.system or None), ("value", ident.value)) if v}}
    groups = message.groups("ORC")
    if not groups:
        raise Hl7Error(101, "RDS without an ORC segment", segment="ORC")
    out = []
    for seq, group in enumerate(groups, start=1):
        orc = group[0]
        rxds = [s for s in group if s.name == "RXD"]
        if not rxds:
            raise Hl7Error(101, "each ORC of an RDS needs its RXD", segment="RXD", sequence=seq)
        rxr = next((s for s in group if s.name == "RXR"), None)
        placer = orc.get(2)
        for rxd in rxds:
            drug = Code(_required(rxd, 2, "dispense/give code", seq), rxd.get(2, 2), rxd.get(2, 3))
            amount = _required(rxd, 4, "actual dispense amount", seq)
            try:
                Decimal(amount)
            except InvalidOperation:
                raise Hl7Error(102, "RXD-4 must be a number", segment="RXD", sequence=seq, field=4) from None
            when = _required(rxd, 3, "date/time dispensed", seq)
            try:
                handed = parse_dtm(when)
            except Hl7Error as e:
                raise Hl7Error(102, e.text, segment="RXD", sequence=seq, field=3) from None
            handed_local = handed.astimezone(tz).replace(tzinfo=None) if handed.tzinfo else handed
            res: dict = {
                "resourceType": "MedicationDispense",
                "identifier": [{"system": HIS_DISPENSE_SYSTEM, "value": f"{orc.get(3) or placer}-{rxd.get(1) or '1'}"}]
                + ([{"system": HIS_PRESCRIPTION_SYSTEM, "value": rxd.get(7)}] if rxd.get(7) else []),
                "status": "completed",
                "medicationCodeableConcept": _fhir_code(drug, profile),
                "subject": subject,
            }
            if rxd.get(10):
                performer = {"identifier": {"system": PRACTITIONER_SYSTEM, "value": rxd.get(10)}}
                if rxd.get(10, 2) or rxd.get(10, 3):
                    performer["display"] = rxd.get(10, 2) + rxd.get(10, 3)
                res["performer"] = [{"actor": performer}]
            if placer:
                res["authorizingPrescription"] = [{"reference": f"MedicationRequest/{placer}"}]
            res["quantity"] = _fhir_quantity(amount, _code(rxd, 5))
            res["whenHandedOver"] = _iso(handed_local, tz)
            if rxr is not None and rxr.get(1):
                res["dosageInstruction"] = [{"route": _fhir_code(_code(rxr, 1), profile)}]
            if rxd.get(9):
                res["note"] = [{"text": rxd.get(9)}]
            out.append(res)
    return out
