"""What the HIS pharmacy sends the gateway, read into domain values: RDS^O13 (dispensing) -> `Dispense`, and an
RDE^O11 (a prescription the HIS releases to outside pharmacies) -> `Prescription`. Pure: no I/O, no clock.

The fields are docs/pharmacy-profile.md; the golden files under tests/golden/pharmacy/ are the contract. Segment
maps follow the HL7 v2-to-FHIR mapping guide (RXE/RXR/TQ1 -> MedicationRequest, RXD -> MedicationDispense); the
FHIR the outer gate serves from these values is written by `adapters.maps.fhir_prescription`.

* `dispenses_from_rds`: RDS^O13 -> one `Dispense` per RXD (RXD-2 drug, RXD-3 when handed over, RXD-4/5 quantity,
  RXD-7 prescription number, RXD-9 note, RXD-10 dispenser, ORC-2 the gateway's item, PID-3 the patient,
  ``<ORC-3>-<RXD-1>`` the HIS's dispense id).
* `prescription_from_rde`: an RDE^O11 -> `Prescription` (the simulator reads the gateway's orders with it too);
  `released_prescription` insists on what a release needs (``RELEASE`` in ORC-16.1 of every ORC, ORC-3).

Errors are `Hl7Error` with segment and field (the inner gate NAKs with them).
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from zoneinfo import ZoneInfo

from adapters.hl7.er7 import Hl7Error, Message, Segment, parse_dtm
from adapters.maps.pharmacy_codes import frequency_text
from gateway.domain.model import Patient, PatientIdentifier
from gateway.domain.prescriptions import Code, Dispense, Prescriber, Prescription, PrescriptionItem

__all__ = ["RELEASE_MARK", "dispenses_from_rds", "prescription_from_rde", "released_prescription"]

RELEASE_MARK = "RELEASE"


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
                                    orc.get(12, 2) + orc.get(12, 3))
        if authored is None and (orc.get(9) or tq1.get(7)):
            seg, field_no = (orc, 9) if orc.get(9) else (tq1, 7)
            try:
                authored = parse_dtm(seg.get(field_no)).replace(tzinfo=None)
            except Hl7Error as e:
                raise Hl7Error(102, e.text, segment=seg.name, sequence=seq, field=field_no) from None
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
            frequency=Code(code, frequency_text(code), "HL70335"),
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


def dispenses_from_rds(message: Message, tz: ZoneInfo) -> list[Dispense]:
    """RDS^O13 -> one `Dispense` per RXD, its time handed over in the hospital's local time ``tz``."""
    if message.message_code != "RDS" or message.trigger != "O13":
        raise Hl7Error(200, f"not a pharmacy dispense: {message.type_name}", segment="MSH", field=9)
    patient, _, _ = _patient_from_pid(message)
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
            out.append(Dispense(
                his_dispense=f"{orc.get(3) or placer}-{rxd.get(1) or '1'}",
                placer_id=placer,
                patient=patient.identifiers[0],
                medication=drug,
                quantity_value=amount,
                quantity_unit=_code(rxd, 5),
                handed_over_local=handed.astimezone(tz).replace(tzinfo=None) if handed.tzinfo else handed,
                prescription_number=rxd.get(7),
                dispenser_id=rxd.get(10),
                dispenser_name=rxd.get(10, 2) + rxd.get(10, 3),
                route=_code(rxr, 1) if rxr is not None and rxr.get(1) else None,
                note=rxd.get(9),
            ))
    return out
