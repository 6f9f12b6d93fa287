"""FHIR R4 (4.0.1; R4B 4.3.0 on request, the same on the wire for these resources; fhir.resources' R4B models
validate them) <-> the gateway's scheduling types.

Outbound: chamber views (slot, schedule and appointment rows, passed in as plain objects) -> Slot,
Schedule, Appointment JSON.  Inbound: a platform's Appointment -> :class:`BookingRequest`, validated with
fhir.resources first — except the plain shape every booking has (see :func:`_plain_appointment`), which is
checked field by field without building a model (the same result, ~20x cheaper); anything else, and every
invalid body, goes through fhir.resources, so its errors are the model's.  Invalid input raises
:class:`InvalidResource` carrying OperationOutcome issues.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Any, Callable
from zoneinfo import ZoneInfo

from pydantic import ValidationError

from fhir.resources.R4B.appointment import Appointment
from adapters.maps.fhir_directory import DEPARTMENT_SYSTEM, PRACTITIONER_SYSTEM, schedule_actors
from gateway.domain.model import HELD_STATUS, BookingRequest, Patient, PatientIdentifier, slot_status

SERVICE_SYSTEM = "urn:gatewayd:his:service"
SCHEDULE_SYSTEM = "urn:gatewayd:his:schedule"
HIS_APPOINTMENT_SYSTEM = "urn:gatewayd:his:appointment"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"

HOLD_EXPIRES_EXTENSION = "urn:gatewayd:appointment:hold-expires"
#: one per Z-segment the HIS published with the slot (pass_z_segments): valueString = the segment's ER7
Z_SEGMENT_EXTENSION = "urn:gatewayd:hl7v2:z-segment"
#: Appointment.id of a proposed appointment ($find): this prefix + the Slot id (nothing is stored for it)
PROPOSED_PREFIX = "proposed-"

#: chamber appointment status -> FHIR Appointment.status
APPOINTMENT_STATUS = {"pending": "pending", "booked": "booked", "cancelled": "cancelled", "refused": "cancelled"}
#: chamber appointment status -> the patient participant's status
PARTICIPANT_STATUS = {"pending": "tentative", "booked": "accepted", "cancelled": "declined", "refused": "declined"}


class InvalidResource(ValueError):
    """The platform's resource cannot be used.  ``issues`` are (code, diagnostics, expression) triples;
    ``status`` is the HTTP status to answer with (400 malformed, 422 valid FHIR we cannot act on)."""

    def __init__(self, issues: list[tuple[str, str, str | None]], status: int = 400):
        super().__init__("; ".join(d for _, d, _ in issues))
        self.issues = issues
        self.status = status


def instant(ts: float, tz: ZoneInfo) -> str:
    return datetime.fromtimestamp(ts, tz).isoformat(timespec="seconds")


def local_to_ts(local: datetime, tz: ZoneInfo) -> float:
    return local.replace(tzinfo=tz).timestamp()


def _service(slot) -> dict:
    """``{"serviceType": [...]}`` of the slot's service, or nothing: FHIR strings are never empty, so a part the
    HIS left empty is left out, and with neither code nor text there is no serviceType."""
    concept: dict[str, Any] = {}
    if slot.service_code:
        concept["coding"] = [{"system": SERVICE_SYSTEM, "code": slot.service_code,
                              **({"display": slot.service_text} if slot.service_text else {})}]
    if slot.service_text:
        concept["text"] = slot.service_text
    return {"serviceType": [concept]} if concept else {}


def slot_resource(slot, tz: ZoneInfo) -> dict:
    resource = {
        "resourceType": "Slot",
        "id": slot.id,
        # versionId: the instant of its last change in microseconds (write transactions are one after another,
        # each at its own instant): a poller de-duplicates _lastUpdated=ge... answers by (id, versionId)
        "meta": {"versionId": str(round(slot.updated * 1_000_000)), "lastUpdated": instant(slot.updated, tz)},
        "identifier": [{"system": SCHEDULE_SYSTEM, "value": f"{slot.schedule_id}|{slot.start_local}"}],
        **_service(slot),
        "schedule": {"reference": f"Schedule/{slot.schedule_id}"},
        "status": slot_status(slot),
        "start": instant(slot.start_ts, tz),
        "end": instant(slot.end_ts, tz),
    }
    if slot.z_segments:  # the HIS's own segments, as it wrote them (ER7, its escapes kept), in its order
        resource["extension"] = [{"url": Z_SEGMENT_EXTENSION, "valueString": z} for z in slot.z_segments.split("\r")]
    return resource


def slot_status_filter(statuses: list[str]) -> dict:
    """A search for slots with these Slot.status values, as the chamber's slot filter (the keyword arguments
    ``his_statuses`` and ``or_held`` of ``Reader.search_slots``): a held slot shows ``busy-tentative``,
    any other what the HIS said."""
    return {"his_statuses": statuses, "or_held": HELD_STATUS in statuses}


def schedule_resource(schedule, tz: ZoneInfo) -> dict:
    return {
        "resourceType": "Schedule",
        "id": schedule.id,
        "meta": {"lastUpdated": instant(schedule.updated, tz)},
        "identifier": [{"system": SCHEDULE_SYSTEM, "value": schedule.id}],
        "active": True,
        "actor": schedule_actors(schedule),
        "comment": schedule.display,
    }


def _participants(slot, schedule) -> list[dict]:
    """The schedule's doctor and clinic as participants (R4 allows no Schedule there)."""
    if schedule is None:
        return [{"actor": {"display": slot.schedule_id}, "status": "accepted"}]
    return [{"actor": actor, "status": "accepted"} for actor in schedule_actors(schedule)]


def appointment_resource(appt, slot, tz: ZoneInfo, identifiers=(), schedule=None) -> dict:
    """``identifiers``: the platform's own (system, value) pairs, given back as Appointment.identifier;
    ``schedule``: the slot's (its doctor and clinic are the other participants)."""
    patient = Patient.from_json(appt.patient)
    contained: dict[str, Any] = {
        "resourceType": "Patient",
        "id": "patient",
        "identifier": [
            {"system": i.system, "value": i.value,
             **({"type": {"coding": [{"system": V2_0203, "code": i.type_code}]}} if i.type_code else {})}
            for i in patient.identifiers
        ],
    }
    if patient.family or patient.given:
        contained["name"] = [{k: v for k, v in (("family", patient.family),
                                                 ("given", [patient.given] if patient.given else None)) if v}]
    if patient.phone:
        contained["telecom"] = [{"system": "phone", "value": patient.phone}]
    if patient.gender:
        contained["gender"] = patient.gender
    if patient.birth_date:
        contained["birthDate"] = patient.birth_date
    has_patient = bool(patient.identifiers or patient.family or patient.given or patient.phone)
    resource: dict[str, Any] = {
        "resourceType": "Appointment",
        "id": appt.id,
        "meta": {"versionId": str(appt.version), "lastUpdated": instant(appt.updated, tz)},
        **({"contained": [contained]} if has_patient else {}),  # a $hold may come without its patient
        "status": APPOINTMENT_STATUS[appt.status],
        **_service(slot),
        "slot": [{"reference": f"Slot/{slot.id}"}],
        "start": instant(slot.start_ts, tz),
        "end": instant(slot.end_ts, tz),
        "minutesDuration": slot.minutes,
        "created": instant(appt.created, tz)[:10],
        "participant": [
            *([{"actor": {"reference": "#patient"}, "status": PARTICIPANT_STATUS[appt.status]}] if has_patient
              else []),
            *_participants(slot, schedule),
        ],
    }
    if not patient.identifiers:
        contained.pop("identifier")
    if appt.status == "pending" and appt.pending_change in (None, "hold") and appt.hold_expires is not None:
        # held by $hold, not booked yet: when the hold ends unless $book comes first
        resource["extension"] = [{"url": HOLD_EXPIRES_EXTENSION, "valueInstant": instant(appt.hold_expires, tz)}]
    ids = [{"system": system, "value": value} if system else {"value": value} for system, value in identifiers]
    if appt.his_appointment:
        ids.append({"system": HIS_APPOINTMENT_SYSTEM, "value": appt.his_appointment})
    if ids:
        resource["identifier"] = ids
    if appt.description:
        resource["description"] = appt.description
    if appt.status in ("cancelled", "refused") and appt.outcome:
        resource["cancelationReason"] = {"text": appt.outcome}
    elif appt.outcome:
        resource["comment"] = appt.outcome
    return resource


def proposed_id(slot_id: str) -> str | None:
    """The id of the proposed appointment for a slot (None if it would not be a FHIR id)."""
    out = PROPOSED_PREFIX + slot_id
    return out if len(out) <= 64 else None


def proposed_appointment(slot, schedule, tz: ZoneInfo) -> dict:
    """A proposed Appointment for a free slot (IHE ITI-115 ``$find``): nothing is stored or held for it."""
    participants = _participants(slot, schedule)
    resource: dict[str, Any] = {"resourceType": "Appointment"}
    pid = proposed_id(slot.id)
    if pid:
        resource["id"] = pid
    resource.update({
        "status": "proposed",
        **_service(slot),
        "slot": [{"reference": f"Slot/{slot.id}"}],
        "start": instant(slot.start_ts, tz),
        "end": instant(slot.end_ts, tz),
        "minutesDuration": slot.minutes,
        "participant": participants,
    })
    if schedule is not None and schedule.department_code:
        resource["specialty"] = [{"coding": [{"system": DEPARTMENT_SYSTEM, "code": schedule.department_code,
                                              "display": schedule.department_name or schedule.department_code}]}]
    return resource


def patient_from_resource(body: Any) -> Patient:
    """A Patient resource (IHE ``patient-resource``) -> the patient to book for.  Raises InvalidResource."""
    from fhir.resources.R4B.patient import Patient as FhirPatient

    if not isinstance(body, dict) or body.get("resourceType") != "Patient":
        raise InvalidResource([("invalid", "patient-resource must be a Patient resource", None)])
    return _from_patient_resource(_validated(FhirPatient, body))


def appointment_patient(appt: Appointment) -> Patient | None:
    """The patient an Appointment names (contained Patient or actor.identifier), or None if it names none."""
    if not appt.participant:
        return None
    try:
        return _patient(appt)
    except InvalidResource as e:
        if e.issues[0][0] == "required" and e.issues[0][2] == "Appointment.participant" \
                and "needs a patient participant" in e.issues[0][1]:
            return None
        raise


# -- inbound -----------------------------------------------------------------------------------------------


def _validated(model, body: dict):
    """``model`` read from ``body``; InvalidResource (400) when the body is not one.  fhir.resources raises
    KeyError or TypeError, not a ValidationError, for a contained resource (at any depth) whose resourceType
    is not a FHIR resource type: an invalid body as well, never a server error."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise InvalidResource(_pydantic_issues(e)) from None
    except (KeyError, TypeError):
        where = f"{body['resourceType']}.contained"
        raise InvalidResource([("structure", f"{where}: a resource in it has a resourceType that is not a FHIR "
                                "resource type", where)]) from None


def _pydantic_issues(err: ValidationError) -> list[tuple[str, str, str | None]]:
    issues = []
    for e in err.errors()[:20]:
        path = ".".join(str(p) for p in e.get("loc", ()) if p != "__root__")
        issues.append(("structure", f"{path or 'Appointment'}: {e.get('msg')}", path or None))
    return issues


def booking_from_appointment(body: Any, *, strict: bool = False) -> BookingRequest:
    """A platform's POSTed Appointment -> what to book.  Raises InvalidResource.  ``strict``: always build
    the fhir.resources model (the plain shape is otherwise read without it: the same result)."""
    if not isinstance(body, dict) or body.get("resourceType") != "Appointment":
        raise InvalidResource([("invalid", "the body must be an Appointment resource", None)])
    appt = None if strict else _plain_appointment(body)
    if appt is None:
        appt = _validated(Appointment, body)
    if appt.status not in ("proposed", "pending", "booked"):
        raise InvalidResource([("business-rule", f"a new Appointment must be proposed, pending or booked, "
                                f"not {appt.status}", "Appointment.status")], 422)
    slots = appt.slot or []
    if len(slots) != 1 or not (slots[0].reference or "").startswith("Slot/"):
        raise InvalidResource([("required", "the Appointment must reference exactly one Slot "
                                "(slot: [{reference: 'Slot/<id>'}])", "Appointment.slot")], 422)
    slot_id = slots[0].reference.split("/", 1)[1]
    patient = _patient(appt)
    identifiers = tuple((i.system or "", i.value) for i in (appt.identifier or [])
                        if i.value and i.system != HIS_APPOINTMENT_SYSTEM)
    return BookingRequest(slot_id=slot_id, patient=patient, description=appt.description or "",
                          identifiers=identifiers)


# -- the plain Appointment, read without a model ---------------------------------------------------------------
#
# A booking's Appointment nearly always has the same few elements (status, one slot, a participant naming a
# contained Patient or an identifier, the platform's identifiers, a description).  Building the pydantic model
# for it was ~10% of a booking's CPU.  _plain_appointment accepts exactly that shape, element by element, with
# the FHIR datatypes' own rules (regexes of string, id, code, uri; no empty strings, arrays or objects; no
# unknown element; a status that a booking may have), i.e. only bodies fhir.resources accepts as well; it
# returns them wrapped so that the code after validation reads them as it reads the model.  Anything else —
# other elements, extensions, anything invalid — returns None: the model decides, with its own errors.
# tests/unit/test_fhir_plain_appointment.py holds both paths to the same answers.

_MAX_STRING = 1 << 20
# FHIR's own patterns, without lone surrogates (U+D800..U+DFFF, which JSON's \u escapes can carry): the model
# refuses them (not Unicode text), so the plain shape must send them to the model too
_is_string = re.compile(r"(?:[ \r\n\t]|[^\s\ud800-\udfff])+").fullmatch
_is_id = re.compile(r"[A-Za-z0-9\-.]{1,64}").fullmatch
_is_code = re.compile(r"[^\s\ud800-\udfff]+( [^\s\ud800-\udfff]+)*").fullmatch
_is_uri = re.compile(r"[^\s\ud800-\udfff]+").fullmatch
# FHIR's date (YYYY, YYYY-MM, YYYY-MM-DD)
_is_date = re.compile(r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1]))?)?"
                      ).fullmatch


def _string(value) -> bool:
    return type(value) is str and len(value) <= _MAX_STRING and _is_string(value) is not None


def _of(pattern) -> Callable[[Any], bool]:
    return lambda value: type(value) is str and len(value) <= _MAX_STRING and pattern(value) is not None


def _fhir_date(value) -> bool:
    """A FHIR date the model takes too: the pattern, and a day that exists."""
    if type(value) is not str or _is_date(value) is None:
        return False
    if len(value) == 10:
        try:
            datetime.strptime(value, "%Y-%m-%d")
        except ValueError:
            return False
    return True


def _one_of(*values: str) -> Callable[[Any], bool]:
    return lambda value: type(value) is str and value in values


def _list(item) -> Callable[[Any], bool]:
    def check(value) -> bool:
        if type(value) is not list or not value:
            return False
        for v in value:
            if not item(v):
                return False
        return True

    return check


def _element(required: tuple[str, ...] = (), **fields) -> Callable[[Any], bool]:
    def check(value) -> bool:
        if type(value) is not dict or not value:
            return False
        for k in required:
            if k not in value:
                return False
        for k, v in value.items():
            field = fields.get(k)
            if field is None or not field(v):
                return False
        return True

    return check


_coding = _element(system=_of(_is_uri), code=_of(_is_code), display=_string)
_identifier = _element(system=_of(_is_uri), value=_string,
                       type=_element(coding=_list(_coding), text=_string))
_reference = _element(reference=_string, type=_of(_is_uri), identifier=_identifier, display=_string)
_contained_patient = _element(
    ("resourceType",), resourceType=_one_of("Patient"), id=_of(_is_id), identifier=_list(_identifier),
    name=_list(_element(family=_string, given=_list(_string), text=_string)),
    birthDate=_fhir_date, gender=_one_of("male", "female", "other", "unknown"),
    telecom=_list(_element(system=_one_of("phone", "fax", "email", "pager", "url", "sms", "other"),
                           value=_string)))
_plain = _element(
    ("status", "participant"),
    resourceType=_one_of("Appointment"), status=_one_of("proposed", "pending", "booked"),
    slot=_list(_element(("reference",), reference=_string)), identifier=_list(_identifier), description=_string,
    contained=_list(_contained_patient),
    participant=_list(_element(("status",), actor=_reference,
                               status=_one_of("accepted", "declined", "tentative", "needs-action"))))


class _Read:
    """A FHIR element read from JSON without a model: its elements as attributes (None when absent), as
    the fhir.resources model gives them."""

    def __init__(self, json_object: dict):
        attrs = self.__dict__
        for name, value in json_object.items():
            if type(value) is dict:
                value = _Read(value)
            elif type(value) is list:
                value = [_Read(v) if type(v) is dict else v for v in value]
            attrs[name] = value

    def __getattr__(self, name: str):  # (only for an element that is absent)
        if name.startswith("_"):
            raise AttributeError(name)
        return None

    def get_resource_type(self) -> str:
        return self.resourceType


def _plain_appointment(body: dict) -> _Read | None:
    """``body`` read as it is, if it is a plain booking Appointment (see above); None: use the model."""
    return _Read(body) if _plain(body) else None


def _patient(appt: Appointment) -> Patient:
    contained = {c.id: c for c in (appt.contained or []) if c.get_resource_type() == "Patient"}
    for participant in appt.participant or []:
        actor = participant.actor
        if actor is None:
            continue
        ref = actor.reference or ""
        if ref.startswith("#"):
            pat = contained.get(ref[1:])
            if pat is None:
                raise InvalidResource([("invalid", f"participant reference {ref} is not a contained Patient",
                                        "Appointment.participant.actor")], 422)
            return _from_patient_resource(pat)
        if ref.startswith("Patient") or actor.type == "Patient" or (actor.identifier and not ref):
            if actor.identifier is None or not actor.identifier.value:
                raise InvalidResource([("required", "a Patient participant needs an identifier the HIS knows "
                                        "(actor.identifier) or a contained Patient", "Appointment.participant")], 422)
            ident = actor.identifier
            return Patient(identifiers=(PatientIdentifier(ident.system or "", ident.value, _type_code(ident)),),
                           family="", given=actor.display or "")
    raise InvalidResource([("required", "the Appointment needs a patient participant: a contained Patient "
                            "(actor.reference '#id') or actor.identifier", "Appointment.participant")], 422)


def _type_code(identifier) -> str:
    if identifier.type and identifier.type.coding:
        return identifier.type.coding[0].code or ""
    return ""


def _from_patient_resource(pat) -> Patient:
    identifiers = tuple(
        PatientIdentifier(i.system or "", i.value, _type_code(i)) for i in (pat.identifier or []) if i.value
    )
    if not identifiers:
        raise InvalidResource([("required", "the contained Patient needs at least one identifier "
                                "(national id card, medical record number or the platform's own)",
                                "Patient.identifier")], 422)
    family = given = ""
    if pat.name:
        family = pat.name[0].family or ""
        given = " ".join(g for g in pat.name[0].given or () if g)
        if not family and not given and pat.name[0].text:
            family = pat.name[0].text
    phone = next((t.value for t in (pat.telecom or []) if t.system == "phone" and t.value), "")
    birth = pat.birthDate
    birth_date = birth.isoformat() if hasattr(birth, "isoformat") else str(birth or "")
    return Patient(identifiers=identifiers, family=family, given=given, phone=phone, birth_date=birth_date,
                   gender=pat.gender or "")


def search_instant(value: str, tz: ZoneInfo) -> tuple[str, float, float]:
    """A FHIR date search value ('ge2026-11-24', 'lt2026-11-24T10:00:00+08:00') -> (prefix, low, high):
    the value's range as timestamps, per FHIR's implicit precision.  Raises ValueError."""
    prefix = "eq"
    if len(value) > 2 and value[:2].isalpha():
        prefix, value = value[:2], value[2:]
    if prefix not in ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb"):
        raise ValueError(f"unknown prefix {prefix!r}")
    if len(value) == 4:
        low = datetime(int(value), 1, 1, tzinfo=tz)
        high = datetime(int(value) + 1, 1, 1, tzinfo=tz)
    elif len(value) == 7:
        y, m = int(value[:4]), int(value[5:7])
        low = datetime(y, m, 1, tzinfo=tz)
        high = datetime(y + (m == 12), m % 12 + 1, 1, tzinfo=tz)
    elif len(value) == 10:
        low = datetime.fromisoformat(value).replace(tzinfo=tz)
        high = low + timedelta(days=1)
    else:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=tz)
        low = parsed
        clock = value[11:].split("+")[0].split("-")[0].rstrip("Z")  # hh:mm[:ss[.fff]]
        digits = len(clock.partition(".")[2])  # the precision given: minutes, seconds, or a fraction of one
        high = parsed + (timedelta(minutes=1) if clock.count(":") == 1 else timedelta(seconds=10.0 ** -digits))
    return prefix, low.astimezone(timezone.utc).timestamp(), high.astimezone(timezone.utc).timestamp()
