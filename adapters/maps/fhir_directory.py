"""The hospital's directory as FHIR, read-only, from what the HIS publishes with its schedules (SIU/SQR: AIP the
doctor, AIL/SCH the department): Practitioner (the doctor), HealthcareService (the department's clinic), Location
(the department) and PractitionerRole (a doctor in a department) — what a platform needs for a "pick a
department, then a doctor, then a time" screen, and what Schedule.actor and Appointment.participant.actor refer
to (R4 allows neither a Schedule there, nor an identifier-only reference a client cannot follow).

Ids: a Practitioner's is the HIS's practitioner id, a HealthcareService's and a Location's the department code,
a PractitionerRole's ``<practitioner id>.<department code>`` — each only when it is a valid FHIR id (otherwise
the resource is not served and references to it carry the identifier and display instead).  Pure: no I/O.
"""

from __future__ import annotations

import re
from typing import Iterable

PRACTITIONER_SYSTEM = "urn:gatewayd:his:practitioner"
DEPARTMENT_SYSTEM = "urn:gatewayd:his:department"
DIRECTORY_TYPES = ("Practitioner", "PractitionerRole", "HealthcareService", "Location")

_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def fhir_id(value: str) -> str | None:
    return value if value and _ID.fullmatch(value) else None


def role_id(schedule) -> str | None:
    if not (schedule.practitioner_id and schedule.department_code):
        return None
    return fhir_id(f"{schedule.practitioner_id}.{schedule.department_code}")


def _department(schedule) -> dict:
    return {"coding": [{"system": DEPARTMENT_SYSTEM, "code": schedule.department_code,
                        "display": schedule.department_name or schedule.department_code}],
            "text": schedule.department_name or schedule.department_code}


def _ref(rtype: str, his_id: str, display: str, system: str) -> dict:
    """A reference to the ``rtype`` the HIS names ``his_id``: by id when that is a FHIR id, else by identifier."""
    rid = fhir_id(his_id)
    if rid:
        return {"reference": f"{rtype}/{rid}", "display": display}
    ref = {"type": rtype, "display": display}
    if his_id:
        ref["identifier"] = {"system": system, "value": his_id}
    return ref


def practitioner_ref(schedule) -> dict | None:
    """A reference to the schedule's doctor (None: the schedule names none)."""
    if not (schedule.practitioner_id or schedule.practitioner_name):
        return None
    return _ref("Practitioner", schedule.practitioner_id, schedule.practitioner_name or schedule.practitioner_id,
                PRACTITIONER_SYSTEM)


def department_ref(schedule, rtype: str = "Location") -> dict | None:
    """A reference to the schedule's department as ``rtype`` (Location or HealthcareService)."""
    if not (schedule.department_code or schedule.department_name):
        return None
    return _ref(rtype, schedule.department_code, schedule.department_name or schedule.department_code,
                DEPARTMENT_SYSTEM)


def schedule_actors(schedule) -> list[dict]:
    """Schedule.actor / Appointment.participant.actor for a schedule: its doctor and its department's clinic
    (or, naming neither, a reference with only its display)."""
    actors = [a for a in (practitioner_ref(schedule), department_ref(schedule, "HealthcareService")) if a]
    return actors or [{"display": schedule.display or schedule.id}]


def directory(schedules: Iterable) -> dict[str, dict[str, dict]]:
    """Every directory resource the schedules name: {resource type: {id: resource}}."""
    out: dict[str, dict[str, dict]] = {t: {} for t in DIRECTORY_TYPES}
    for s in schedules:
        pid, dept = fhir_id(s.practitioner_id), fhir_id(s.department_code)
        if pid:
            out["Practitioner"].setdefault(pid, {
                "resourceType": "Practitioner", "id": pid, "active": True,
                "identifier": [{"system": PRACTITIONER_SYSTEM, "value": s.practitioner_id}],
                **({"name": [{"text": s.practitioner_name}]} if s.practitioner_name else {})})
        if dept:
            name = s.department_name or s.department_code
            out["Location"].setdefault(dept, {
                "resourceType": "Location", "id": dept, "status": "active", "mode": "instance",
                "identifier": [{"system": DEPARTMENT_SYSTEM, "value": s.department_code}], "name": name})
            out["HealthcareService"].setdefault(dept, {
                "resourceType": "HealthcareService", "id": dept, "active": True,
                "identifier": [{"system": DEPARTMENT_SYSTEM, "value": s.department_code}],
                "specialty": [_department(s)], "name": name,
                "location": [{"reference": f"Location/{dept}", "display": name}]})
        rid = role_id(s)
        if rid and pid and dept:
            out["PractitionerRole"].setdefault(rid, {
                "resourceType": "PractitionerRole", "id": rid, "active": True,
                "practitioner": practitioner_ref(s), "specialty": [_department(s)],
                "location": [department_ref(s, "Location")],
                "healthcareService": [department_ref(s, "HealthcareService")]})
    return out


def schedule_has_actor(schedule, reference: str) -> bool:
    """``reference`` (``Type/id``, or an id of any directory type) names one of the schedule's actors."""
    rtype, _, rid = reference.rpartition("/")
    wanted = {"Practitioner": [fhir_id(schedule.practitioner_id)],
              "Location": [fhir_id(schedule.department_code)],
              "HealthcareService": [fhir_id(schedule.department_code)],
              "PractitionerRole": [role_id(schedule)]}
    if rtype:
        return rid in wanted.get(rtype, [])
    return any(rid in ids for ids in wanted.values())
