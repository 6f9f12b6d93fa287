"""Scheduling, in the gateway's own terms: schedules, slots, bookings, patients, the HIS's answers, and the
errors a request for them may meet.

The adapters translate HL7 v2 and FHIR into these types; the decisions on them are made in
:mod:`gateway.domain.slot_book` (the HIS's slot notices) and :mod:`gateway.domain.booking` (the platforms'
bookings).  Types and errors only; the ids the gateway gives them are in :mod:`gateway.domain.ids`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from gateway.domain.prescriptions import OrderAnswer


class SchedulingError(Exception):
    """A request the slot book refuses; ``code`` is a short machine name, ``str()`` says why."""

    code = "refused"


class SlotUnknown(SchedulingError):
    code = "slot-unknown"


class SlotUnavailable(SchedulingError):
    code = "slot-unavailable"


class AppointmentUnknown(SchedulingError):
    code = "appointment-unknown"


@dataclass(frozen=True)
class ScheduleInfo:
    """A bookable calendar at the HIS (a doctor's clinic sessions)."""

    id: str
    display: str
    practitioner_id: str = ""
    practitioner_name: str = ""
    department_code: str = ""
    department_name: str = ""
    facility: str = ""  # the facility that published it: MSH-4.1 of the HIS's message (routes by facility)


NoticeAction = Literal["open", "block", "book", "free", "reschedule", "noshow"]


@dataclass(frozen=True)
class SlotNotice:
    """What the HIS said about one slot (from SIU or one SCH group of SQR^S25)."""

    action: NoticeAction
    schedule: ScheduleInfo
    start_local: datetime  # naive, hospital local time
    minutes: int
    service_code: str
    service_text: str
    his_appointment: str | None = None
    placer: str | None = None
    z_segments: tuple[str, ...] = ()  # the HIS's Z-segments with this notice, each its ER7 text (escapes kept)


#: a slot's status while a booking of the gateway holds it (its HIS status stays what the HIS said)
HELD_STATUS = "busy-tentative"


def slot_status(slot) -> str:
    """A slot's status as the gateway shows it (and names it in refusals): ``busy-tentative`` while a booking
    of the gateway holds it, else what the HIS last said (free, busy, busy-unavailable) — FHIR's Slot.status
    codes, which platforms see as they are."""
    return HELD_STATUS if slot.held_by else slot.his_status


@dataclass(frozen=True)
class PatientIdentifier:
    system: str
    value: str
    type_code: str = ""
    #: PID-3.4 (CX.4, an HD) as the HIS names the issuer, its parts; empty: the system.  Set only on the way
    #: to the HIS (gateway.domain.patients.IdentifierRules.for_his), never stored.
    assigning_authority: tuple[str, ...] = ()


@dataclass(frozen=True)
class Patient:
    """What the HIS needs to book for a patient, and nothing more."""

    identifiers: tuple[PatientIdentifier, ...]
    family: str = ""
    given: str = ""
    phone: str = ""
    birth_date: str = ""  # as FHIR writes a date: YYYY, YYYY-MM or YYYY-MM-DD
    gender: str = ""  # FHIR administrative gender: male | female | other | unknown

    def to_json(self) -> dict:
        out = {
            "identifiers": [
                {"system": i.system, "value": i.value, "type": i.type_code} for i in self.identifiers
            ],
            "family": self.family,
            "given": self.given,
            "phone": self.phone,
        }
        if self.birth_date:
            out["birth_date"] = self.birth_date
        if self.gender:
            out["gender"] = self.gender
        return out

    @classmethod
    def from_json(cls, data: dict) -> "Patient":
        return cls(
            identifiers=tuple(
                PatientIdentifier(i["system"], i["value"], i.get("type", "")) for i in data.get("identifiers", [])
            ),
            family=data.get("family", ""),
            given=data.get("given", ""),
            phone=data.get("phone", ""),
            birth_date=data.get("birth_date", ""),
            gender=data.get("gender", ""),
        )


@dataclass(frozen=True)
class BookingRequest:
    slot_id: str
    patient: Patient
    description: str = ""
    identifiers: tuple[tuple[str, str], ...] = ()  # the platform's own Appointment.identifier (system, value)


class IdempotencyConflict(SchedulingError):
    """An Idempotency-Key was used again with a different request."""

    code = "idempotency-conflict"


class VersionConflict(SchedulingError):
    """A change made on a version of the appointment that is no longer its current one (HTTP If-Match)."""

    code = "version-conflict"


@dataclass(frozen=True)
class SlotForHis:
    """The facts about a slot that a message to the HIS carries."""

    schedule_id: str
    start_local: datetime
    minutes: int
    service_code: str
    service_text: str
    practitioner_id: str


@dataclass(frozen=True)
class HisAnswer:
    """The HIS's answer to a message we sent: MSA-1, MSA-3/ERR-8, SCH-2 when an SRR carried it, and the answer
    read as one to a pharmacy order (ACK, RRE^O12, ORP^O10: what it said of each item) when it reads as one."""

    code: str
    text: str = ""
    his_appointment: str | None = None
    order: OrderAnswer | None = None

    @property
    def accepted(self) -> bool:
        return self.code in ("AA", "CA")
