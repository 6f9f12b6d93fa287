"""Prescriptions, in the gateway's own terms: what a prescription is, independent of FHIR and HL7 v2.

The pharmacy maps (``adapters/maps/fhir_prescription.py``, ``rde_order.py``, ``rds_dispense.py``) read a
platform's MedicationRequest / transaction Bundle, a HIS's answers, dispensing and releases into these types, and
write them out as RDE^O11 / OMP^O09, MedicationRequest or MedicationDispense. Values are kept as the text they
were written in (a dose of ``"0.5"`` stays ``"0.5"``: no float rounding between a signed prescription and the
HIS). A `Prescription` is also the gateway's own record of a platform's prescription (`Prescription.to_json`,
kept in the chamber): the inner gate writes the order from it. Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime

from gateway.domain.model import Patient, PatientIdentifier

__all__ = ["Code", "Dispense", "ItemAnswer", "OrderAnswer", "Prescriber", "Prescription", "PrescriptionItem",
           "Submission"]


@dataclass(frozen=True)
class Code:
    """A coded value as the HIS sees it: ``code^text^coding system`` (HL7 CWE), e.g. ``PO^口服^HL70162``.
    ``system`` is the HL7 coding-system name (table 0396, ``99xxx`` for local systems), not a FHIR URI."""

    code: str
    text: str = ""
    system: str = ""


@dataclass(frozen=True)
class Prescriber:
    """The doctor who signed the prescription; ``id`` is the identifier the HIS knows (staff or licence
    number)."""

    id: str
    name: str = ""
    system: str = ""  # FHIR identifier system (kept for the way back to FHIR)


@dataclass(frozen=True)
class PrescriptionItem:
    """One drug of a prescription (one MedicationRequest; one ORC/RXE or ORC/RXO group)."""

    placer_id: str  # the gateway's id for this item (its MedicationRequest id); ORC-2.1
    medication: Code
    dose_value: str  # decimal text, e.g. "0.5"
    dose_unit: Code  # e.g. Code("g", "g", "UCUM") or Code("", "粒")
    route: Code  # e.g. Code("PO", "口服", "HL70162")
    frequency: Code  # HL7 table 0335, e.g. Code("BID", "每日两次", "HL70335")
    dispense_value: str
    dispense_unit: Code
    days_supply: int | None = None
    refills: int = 0
    instructions: str = ""  # for the patient (Dosage.patientInstruction / RXE-7)
    filler_id: str = ""  # the HIS's order number, when it told us (ORC-3.1)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> PrescriptionItem:
        codes = {name: Code(**data[name]) for name in ("medication", "dose_unit", "route", "frequency",
                                                       "dispense_unit")}
        return cls(**{**data, **codes})


@dataclass(frozen=True)
class Prescription:
    """One prescription: several items under one prescription number, one patient, one prescriber."""

    number: str  # the prescription number (处方号): groupIdentifier, ORC-4.1, RXE-15
    items: tuple[PrescriptionItem, ...]
    patient: Patient
    prescriber: Prescriber
    authored_local: datetime | None = None  # naive, hospital local time
    encounter_id: str = ""  # PV1-19 visit number
    patient_class: str = "O"  # PV1-2: O outpatient, I inpatient, E emergency
    birth_date: str = ""  # YYYYMMDD (PID-7)
    gender: str = ""  # HL7 table 0001: M F O U (PID-8)
    released: bool = False  # the HIS released it to outside pharmacies (ORC-16 RELEASE)

    def to_json(self) -> dict:
        """The gateway's own record of the prescription (JSON types only); `from_json` gives it back equal."""
        return {
            "number": self.number,
            "items": [item.to_json() for item in self.items],
            "patient": self.patient.to_json(),
            "prescriber": asdict(self.prescriber),
            "authored_local": self.authored_local.isoformat() if self.authored_local is not None else None,
            "encounter_id": self.encounter_id,
            "patient_class": self.patient_class,
            "birth_date": self.birth_date,
            "gender": self.gender,
            "released": self.released,
        }

    @classmethod
    def from_json(cls, data: dict) -> Prescription:
        authored = data["authored_local"]
        return cls(
            number=data["number"],
            items=tuple(PrescriptionItem.from_json(item) for item in data["items"]),
            patient=Patient.from_json(data["patient"]),
            prescriber=Prescriber(**data["prescriber"]),
            authored_local=datetime.fromisoformat(authored) if authored is not None else None,
            encounter_id=data["encounter_id"],
            patient_class=data["patient_class"],
            birth_date=data["birth_date"],
            gender=data["gender"],
            released=data["released"],
        )


@dataclass(frozen=True)
class Submission:
    """A platform's prescription as the outer gate read it, before the gateway decides on it."""

    prescription: Prescription  # its items' placer ids are the platform's until the gateway gives its own
    signed: bytes  # what the prescriber signed: the canonical JSON of what the platform sent (opaque here)
    jws: str | None  # the prescriber's detached JWS over ``signed``, as it came (None: unsigned)
    documents: tuple[str, ...]  # each item as the platform sent it, one per item, kept for its readers (opaque)


@dataclass(frozen=True)
class ItemAnswer:
    """What the HIS said about one item (ORC of an RRE^O12 / ORP^O10)."""

    placer_id: str
    filler_id: str
    order_control: str  # OK accepted, UA unable to accept, DE data errors, ...


@dataclass(frozen=True)
class OrderAnswer:
    """The HIS's answer to one pharmacy order message (ACK, RRE^O12, ORP^O10)."""

    acknowledges: str  # MSA-2: the control id it answers; the caller checks it against what was sent
    code: str  # MSA-1: AA AE AR CA CE CR
    accepted: bool
    reason: str = ""
    items: tuple[ItemAnswer, ...] = ()


@dataclass(frozen=True)
class Dispense:
    """What the HIS pharmacy handed over for one item (an RXD of an RDS^O13)."""

    his_dispense: str  # the HIS's id of this dispense (ORC-3 or ORC-2, then RXD-1): a resend adds nothing
    placer_id: str  # the item it fills: the gateway's item id (ORC-2.1); "" when the HIS named none
    patient: PatientIdentifier
    medication: Code
    quantity_value: str  # decimal text
    quantity_unit: Code
    handed_over_local: datetime  # naive, hospital local time
    prescription_number: str = ""  # the HIS's prescription number (RXD-7)
    dispenser_id: str = ""  # the pharmacist (RXD-10)
    dispenser_name: str = ""
    route: Code | None = None
    note: str = ""
