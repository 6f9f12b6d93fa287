"""IHE ITI Scheduling on the outer gate (docs/ihe-scheduling.md): ``$find`` (ITI-115), ``$hold`` (ITI-116)
and ``$book`` (ITI-117) on ``Appointment``, each ``POST``ed a FHIR ``Parameters`` resource.

- ``$find`` answers a searchset Bundle of *proposed* Appointments, one per free slot the platform may see
  (its quota applies as in ``GET /Slot``); nothing is stored for them.  A proposed appointment's id is
  ``proposed-<Slot id>``.
- ``$hold`` holds one (the slot becomes ``busy-tentative``, the appointment ``pending`` until
  ``outer.hold_expires``); the HIS is not told, and an expired hold is released without any message.
- ``$book`` books a held or proposed appointment through the HIS exactly as ``POST /Appointment`` does
  (200 booked, 202 pending, 409 refused), or cancels one (``appointment-resource`` with status
  ``cancelled``).

Parameters outside the profile, or that the gateway cannot honour, are refused with 400 and an
OperationOutcome naming the parameter (ParameterError, a FhirError); nothing here raises anything but
FhirError/InvalidResource for a malformed request.  :class:`IheApi` handles the operations' HTTP requests over
the scheduling endpoints' handlers (adapters/outer/scheduling.py): a booking is answered exactly as
``POST /Appointment``'s, in the operation's Bundle.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import ValidationError

from adapters.maps.fhir_scheduling import (
    DEPARTMENT_SYSTEM,
    PRACTITIONER_SYSTEM,
    PROPOSED_PREFIX,
    SERVICE_SYSTEM,
    InvalidResource,
    appointment_patient,
    patient_from_resource,
    proposed_appointment,
    search_instant,
)
from adapters.outer.access import Access, PlatformGrant, require_scope
from adapters.outer.errors import FhirError, slot_refusals
from adapters.outer.intake import json_body, require_method
from adapters.outer.scheduling import SchedulingApi, location, page, searchset
from gateway.domain.booking import HoldUnanswered
from gateway.domain.model import AppointmentUnknown, BookingRequest, Patient, SlotUnavailable

IHE_BASE = "https://profiles.ihe.net/ITI/Scheduling/OperationDefinition/"
OPERATIONS = {
    "find": IHE_BASE + "appointment-find",
    "hold": IHE_BASE + "appointment-hold",
    "book": IHE_BASE + "appointment-book",
}

#: $find parameters the gateway honours, and what it does with each
FIND_PARAMETERS = {
    "start": "dateTime: slots starting at or after it (a date alone: from its start)",
    "end": "dateTime: slots starting before it (a date alone: up to its end)",
    "visit-type": "token [system|]code: the slot's service (system urn:gatewayd:his:service)",
    "service-type": "token [system|]code: same as visit-type (gatewayd extension, as GET /Slot)",
    "specialty": "token [system|]code: the schedule's department (system urn:gatewayd:his:department)",
    "practitioner": "Reference: Practitioner/<HIS doctor id>, Schedule/<id>, or identifier "
                    "urn:gatewayd:his:practitioner|<id>",
    "location-reference": "Reference: Location/<department code>, or identifier "
                          "urn:gatewayd:his:department|<code>",
    "patient-reference": "accepted and ignored: availability does not depend on the patient here",
    "patient-resource": "accepted and ignored: availability does not depend on the patient here",
    "_count": "integer: at most this many proposed appointments in one answer (at most outer.page_size); "
              "more are reached by the Bundle's next link",
    "_offset": "integer: skip this many (gatewayd paging, as in GET /Slot: what the next link carries)",
}
#: parameters of the profile the gateway cannot honour: refused rather than silently ignored
FIND_NOT_SUPPORTED = ("organization", "location-string", "reason", "referral-identifier", "timing",
                      "insurance-reference")
HOLD_BOOK_PARAMETERS = ("appointment-reference", "appointment-resource", "patient-resource")

_TOKEN_TYPES = ("valueString", "valueCode", "valueToken", "valueCoding")
_DATE_TYPES = ("valueDateTime", "valueDate", "valueInstant", "valueString")
_INT_TYPES = ("valueInteger", "valuePositiveInt", "valueUnsignedInt")


class ParameterError(FhirError):
    """A malformed or unsupported parameter: 400 with ``code`` (``invalid``, ``not-supported``,
    ``required``, ``structure``) and the parameter's name as expression."""

    def __init__(self, code: str, text: str, name: str | None = None):
        super().__init__(400, code, text, name)


def parameters(body: Any) -> list[tuple[str, str | None, Any]]:
    """A Parameters resource -> [(name, value[x] key or 'resource', value)].  Raises ParameterError."""
    from fhir.resources.R4B.parameters import Parameters

    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise ParameterError("invalid", "the body must be a Parameters resource")
    try:
        Parameters.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "__root__")
        raise ParameterError("structure", f"not a valid Parameters resource: {where or 'Parameters'}: "
                                          f"{first.get('msg', 'invalid')}") from None
    except Exception:  # noqa: BLE001 - whatever the model chokes on is the request's fault
        raise ParameterError("structure", "not a valid Parameters resource") from None
    out = []
    for p in body.get("parameter") or []:
        if not isinstance(p, dict) or not isinstance(p.get("name"), str):
            raise ParameterError("structure", "every parameter needs a name")
        if p.get("part"):
            raise ParameterError("not-supported", f"parameter {p['name']!r}: parts are not used here", p["name"])
        keys = [k for k in p if k.startswith("value") or k == "resource"]
        if len(keys) != 1:
            raise ParameterError("invalid", f"parameter {p['name']!r} needs exactly one value", p["name"])
        out.append((p["name"], keys[0], p[keys[0]]))
    return out


def _token(name: str, key: str, value: Any) -> tuple[str, str]:
    """(system, code); system '' when not given."""
    if key not in _TOKEN_TYPES:
        raise ParameterError("invalid", f"{name} takes a token ('[system|]code') or a Coding, not {key}", name)
    if key == "valueCoding":
        if not isinstance(value, dict) or not isinstance(value.get("code"), str):
            raise ParameterError("invalid", f"{name}: the Coding needs a code", name)
        return value.get("system") or "", value["code"]
    if not isinstance(value, str) or not value:
        raise ParameterError("invalid", f"{name}: empty token", name)
    system, _, code = value.rpartition("|")
    if not code:
        raise ParameterError("invalid", f"{name}: the token has no code", name)
    return system, code


def _reference(name: str, key: str, value: Any) -> tuple[str | None, str | None, str | None, str]:
    """(resource type, id, identifier system, identifier value) of a Reference parameter."""
    if key != "valueReference" or not isinstance(value, dict):
        raise ParameterError("invalid", f"{name} takes a Reference (valueReference)", name)
    ref = value.get("reference")
    if isinstance(ref, str) and ref:
        parts = [p for p in ref.split("?")[0].split("/") if p]
        if len(parts) >= 4 and parts[-2] == "_history":
            parts = parts[:-2]
        if len(parts) < 2:
            raise ParameterError("invalid", f"{name}: reference {ref!r} is not 'Type/id'", name)
        return parts[-2], parts[-1], None, ""
    ident = value.get("identifier")
    if isinstance(ident, dict) and isinstance(ident.get("value"), str) and ident["value"]:
        return value.get("type"), None, ident.get("system") or "", ident["value"]
    raise ParameterError("invalid", f"{name}: the Reference needs a reference or an identifier", name)


def _instant(name: str, key: str, value: Any, tz: ZoneInfo, upper: bool) -> float:
    if key not in _DATE_TYPES or not isinstance(value, str):
        raise ParameterError("invalid", f"{name} takes a dateTime", name)
    if not value[:1].isdigit() or len(value) > 40:
        raise ParameterError("invalid", f"{name}: {value[:40]!r} is not a dateTime", name)
    try:
        _, low, high = search_instant(value, tz)
    except (ValueError, OverflowError, TypeError) as e:
        raise ParameterError("invalid", f"{name}: {value!r} is not a dateTime ({e})", name) from None
    partial = len(value) <= 10  # a year, month or date: the whole of it
    return high if (upper and partial) else low


class FindQuery:
    """What ``$find`` asks for, in the gateway's terms."""

    def __init__(self):
        self.start: float | None = None
        self.end: float | None = None
        self.services: list[tuple[str, str]] = []
        self.specialties: list[tuple[str, str]] = []
        self.practitioners: list[tuple[str | None, str | None, str | None, str]] = []
        self.locations: list[tuple[str | None, str | None, str | None, str]] = []
        self.count: int | None = None
        self.offset = 0

    def to_query(self, tz: ZoneInfo) -> dict[str, list[str]]:
        """The same request as ``GET /Appointment/$find`` parameters (paging aside), for the Bundle's links.
        A reference by identifier becomes the reference it matches (``Practitioner/<id>``, ``Location/<code>``);
        one of another system matches nothing and is left out (what it ORs with still matches the same)."""
        def token(system, code):
            return f"{system}|{code}" if system else code

        def reference(default_type, rtype, rid, system, value, own_system):
            if rid is not None:
                return f"{rtype or default_type}/{rid}"
            return f"{default_type}/{value}" if system in ("", own_system) else None

        query: dict[str, list[str]] = {
            "start": [_iso(self.start, tz)], "end": [_iso(self.end, tz)],
            "service-type": [token(s, c) for s, c in self.services],
            "specialty": [token(s, c) for s, c in self.specialties],
            "practitioner": [r for r in (reference("Practitioner", *p, PRACTITIONER_SYSTEM)
                                         for p in self.practitioners) if r],
            "location-reference": [r for r in (reference("Location", *loc, DEPARTMENT_SYSTEM)
                                               for loc in self.locations) if r],
        }
        if self.count is not None:
            query["_count"] = [str(self.count)]
        return {k: v for k, v in query.items() if v}


def _iso(timestamp: float, tz: ZoneInfo) -> str:
    return datetime.fromtimestamp(timestamp, tz).isoformat()


def query_parameters(query: dict[str, list[str]]) -> list[tuple[str, str | None, Any]]:
    """``GET /Appointment/$find?start=...&end=...`` -> the same (name, value[x], value) list as a Parameters
    body (FHIR: an operation with only simple parameters may be invoked by GET)."""
    out: list[tuple[str, str | None, Any]] = []
    for name, values in query.items():
        if name in ("_format", "_pretty"):
            continue
        for value in values:
            if name in ("practitioner", "location-reference", "patient-reference"):
                out.append((name, "valueReference", {"reference": value}))
            elif name in ("_count", "_offset"):
                if not value.isascii() or not value.isdigit() or len(value) > 9:
                    raise ParameterError("invalid", f"{name} takes a non-negative integer", name)
                out.append((name, "valueInteger", int(value)))
            elif name == "patient-resource":
                raise ParameterError("not-supported", "patient-resource cannot be given in a GET; POST a "
                                                      "Parameters resource", name)
            else:
                out.append((name, "valueString", value))
    return out


def find_query(body: Any, tz: ZoneInfo, query: dict[str, list[str]] | None = None) -> FindQuery:
    """The ``$find`` request: a Parameters ``body`` (POST), or the ``query`` string (GET)."""
    q = FindQuery()
    for name, key, value in (parameters(body) if query is None else query_parameters(query)):
        if name in FIND_NOT_SUPPORTED:
            raise ParameterError("not-supported", f"$find parameter {name!r} is not supported by this gateway "
                                                  f"(supported: {', '.join(FIND_PARAMETERS)})", name)
        if name not in FIND_PARAMETERS:
            raise ParameterError("not-supported", f"unknown $find parameter {name[:64]!r} "
                                                  f"(supported: {', '.join(FIND_PARAMETERS)})", name[:64])
        if name in ("start", "end"):
            if getattr(q, name) is not None:
                raise ParameterError("invalid", f"{name} may be given once", name)
            setattr(q, name, _instant(name, key, value, tz, upper=name == "end"))
        elif name in ("visit-type", "service-type"):
            q.services.append(_token(name, key, value))
        elif name == "specialty":
            q.specialties.append(_token(name, key, value))
        elif name == "practitioner":
            ref = _reference(name, key, value)
            if ref[0] not in (None, "Practitioner", "Schedule") or (ref[1] is None and ref[0] == "Schedule"):
                raise ParameterError("invalid", "practitioner must reference a Practitioner (or a Schedule)", name)
            q.practitioners.append(ref)
        elif name == "location-reference":
            ref = _reference(name, key, value)
            if ref[0] not in (None, "Location"):
                raise ParameterError("invalid", "location-reference must reference a Location", name)
            q.locations.append(ref)
        elif name in ("_count", "_offset"):
            if key not in _INT_TYPES or not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ParameterError("invalid", f"{name} takes a non-negative integer", name)
            setattr(q, name[1:], value)
        # patient-reference / patient-resource: accepted, not used for availability
    if q.start is None or q.end is None:
        missing = "start" if q.start is None else "end"
        raise ParameterError("required", f"$find needs both start and end (dateTime); {missing} is missing", missing)
    if q.end <= q.start:
        raise ParameterError("invalid", "end must be after start", "end")
    return q


def _matches_schedule(q: FindQuery, schedule) -> bool:
    def token_ok(tokens, system, code):
        return not tokens or any(s in ("", system) and c == code for s, c in tokens)

    if not token_ok(q.specialties, DEPARTMENT_SYSTEM, schedule.department_code):
        return False
    if q.practitioners and not any(
            (rtype == "Practitioner" and rid == schedule.practitioner_id)
            or (rtype == "Schedule" and rid == schedule.id)
            or (rid is None and system in ("", PRACTITIONER_SYSTEM) and value == schedule.practitioner_id)
            for rtype, rid, system, value in q.practitioners):
        return False
    if q.locations and not any(
            (rid is not None and rid == schedule.department_code)
            or (rid is None and system in ("", DEPARTMENT_SYSTEM) and value == schedule.department_code)
            for _rtype, rid, system, value in q.locations):
        return False
    return True


def find_proposed(reader, q: FindQuery, *, platform: str, quotas, tz: ZoneInfo, count: int,
                  offset: int) -> tuple[list[dict], int]:
    """The proposed Appointments for the free slots matching ``q`` that ``platform`` may book: ``count`` of
    them from ``offset`` on, and how many there are in all."""
    schedules = {s.id: s for s in reader.schedules()}
    # slots that have started cannot be booked: from now on (exclusive), or from start (inclusive)
    kw: dict[str, Any] = {"his_statuses": ["free"], "start_from": max(q.start, reader.now),
                          "start_from_inclusive": q.start > reader.now, "start_to": q.end,
                          "start_to_inclusive": False}
    if q.specialties or q.practitioners or q.locations:
        kw["schedule_ids"] = [sid for sid, s in schedules.items() if _matches_schedule(q, s)]
        if not kw["schedule_ids"]:
            return [], 0
    if q.services:
        codes = [c for s, c in q.services if s in ("", SERVICE_SYSTEM)]
        if not codes:
            return [], 0
        kw["service_codes"] = codes
    if quotas is not None:
        kw["hidden"] = quotas.hidden(reader, platform, reader.now)
    total = reader.count_slots(**kw)
    rows = reader.search_slots(limit=count, offset=offset, **kw) if count else []
    return [proposed_appointment(r, schedules.get(r.schedule_id), tz) for r in rows], total


class HoldOrBook:
    """What ``$hold`` or ``$book`` is asked to act on."""

    def __init__(self):
        self.appointment_id: str | None = None  # one of the platform's own (held) appointments
        self.slot_id: str | None = None  # a proposed appointment: the slot to hold or book (with
        #                                  appointment_id: the slot to move a booked appointment to)
        self.patient: Patient | None = None
        self.cancel = False
        self.description = ""
        self.identifiers: tuple[tuple[str, str], ...] = ()

    def booking_request(self) -> BookingRequest:
        return BookingRequest(slot_id=self.slot_id or "", patient=self.patient, description=self.description,
                              identifiers=self.identifiers)


def hold_or_book(body: Any, operation: str) -> HoldOrBook:
    from fhir.resources.R4B.appointment import Appointment

    what = HoldOrBook()
    given: dict[str, Any] = {}
    for name, key, value in parameters(body):
        if name not in HOLD_BOOK_PARAMETERS:
            raise ParameterError("not-supported", f"unknown ${operation} parameter {name[:64]!r} "
                                                  f"(supported: {', '.join(HOLD_BOOK_PARAMETERS)})", name[:64])
        if name in given:
            raise ParameterError("invalid", f"{name} may be given once", name)
        expected = "valueReference" if name == "appointment-reference" else "resource"
        if key != expected:
            raise ParameterError("invalid", f"{name} takes {'a Reference' if expected != 'resource' else 'a resource'}",
                                 name)
        given[name] = value
    if ("appointment-reference" in given) == ("appointment-resource" in given):
        raise ParameterError("required", f"${operation} needs exactly one of appointment-reference and "
                                         f"appointment-resource", "appointment-reference")
    if "patient-resource" in given:
        try:
            what.patient = patient_from_resource(given["patient-resource"])
        except InvalidResource as e:
            raise ParameterError("invalid", f"patient-resource: {e}", "patient-resource") from None
        except Exception:  # noqa: BLE001 - whatever the model chokes on is the request's fault
            raise ParameterError("structure", "patient-resource is not a valid Patient", "patient-resource") from None
    if "appointment-reference" in given:
        rtype, rid, _system, _value = _reference("appointment-reference", "valueReference",
                                                 given["appointment-reference"])
        if rtype != "Appointment" or rid is None:
            raise ParameterError("invalid", "appointment-reference must be 'Appointment/<id>'", "appointment-reference")
        _target(what, rid)
        return what
    resource = given["appointment-resource"]
    if not isinstance(resource, dict) or resource.get("resourceType") != "Appointment":
        raise ParameterError("invalid", "appointment-resource must be an Appointment", "appointment-resource")
    try:
        appt = Appointment.model_validate(resource)
    except ValidationError as e:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "__root__")
        raise ParameterError("structure", f"appointment-resource: {where or 'Appointment'}: "
                                          f"{first.get('msg', 'invalid')}", "appointment-resource") from None
    except Exception:  # noqa: BLE001
        raise ParameterError("structure", "appointment-resource is not a valid Appointment",
                             "appointment-resource") from None
    allowed = ("proposed", "pending", "booked", "cancelled") if operation == "book" else ("proposed", "pending")
    if appt.status not in allowed:
        raise ParameterError("invalid", f"appointment-resource: status {appt.status!r} cannot be used with "
                                        f"${operation} (use {', '.join(allowed)})", "appointment-resource")
    what.cancel = appt.status == "cancelled"
    try:
        patient = appointment_patient(appt)
    except InvalidResource as e:
        raise ParameterError("invalid", f"appointment-resource: {e}", "appointment-resource") from None
    if patient is not None and what.patient is None:
        what.patient = patient
    what.description = appt.description or ""
    what.identifiers = tuple((i.system or "", i.value) for i in (appt.identifier or []) if i.value)
    slots = appt.slot or []
    slot_ref = (slots[0].reference or "") if len(slots) == 1 else ""
    if appt.id and not appt.id.startswith(PROPOSED_PREFIX):
        what.appointment_id = appt.id
        if slot_ref.startswith("Slot/") and not what.cancel:
            what.slot_id = slot_ref.split("/", 1)[1]  # another slot than its own: rescheduling
        return what
    if what.cancel:
        raise ParameterError("invalid", "cancelling needs the id of a booked appointment", "appointment-resource")
    if not slot_ref.startswith("Slot/"):
        if appt.id:
            _target(what, appt.id)
            return what
        raise ParameterError("required", "appointment-resource must reference exactly one Slot "
                                         "(slot: [{reference: 'Slot/<id>'}])", "appointment-resource")
    what.slot_id = slot_ref.split("/", 1)[1]
    return what


def _target(what: HoldOrBook, appointment_id: str) -> None:
    if appointment_id.startswith(PROPOSED_PREFIX):
        what.slot_id = appointment_id[len(PROPOSED_PREFIX):]
        if not what.slot_id:
            raise ParameterError("invalid", "not a proposed appointment id", "appointment-reference")
    else:
        what.appointment_id = appointment_id


def operation_bundle(base: str, operation: str, resources: list[dict]) -> dict:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources),
        "link": [{"relation": "self", "url": f"{base}/Appointment/${operation}"}],
        "entry": [{**({"fullUrl": f"{base}/Appointment/{r['id']}"} if r.get("id") else {}),
                   "resource": r, "search": {"mode": "match"}} for r in resources],
    }


class IheApi:
    """The handlers of ``$find``, ``$hold`` and ``$book`` on Appointment, over the scheduling endpoints'
    handlers (``scheduling``): the same booking service, chamber reader, quotas, page size and wait for the HIS;
    bookings, cancellations and appointments are answered as the Appointment endpoints answer them."""

    def __init__(self, scheduling: SchedulingApi):
        self.scheduling = scheduling

    def handler(self, name: str, method: str, grant: PlatformGrant, platform: str, request, query, base: str,
                access: Access):
        """An IHE operation's method and scope: its handler, not called yet (as SchedulingApi.handler)."""
        if name not in OPERATIONS:
            raise FhirError(404, "not-supported", f"operation ${name[:40]} is not supported on Appointment "
                                                  f"(supported: $find, $hold, $book)")
        if name == "find":  # POST a Parameters resource, or GET with the parameters in the query
            require_method(method, "POST", "GET")
            require_scope(grant, platform, "Slot.read")  # it shows slot availability, no patient data
            if method == "GET":
                return lambda: self.find(platform, None, base, query)
            return lambda: self.find(platform, json_body(request, self.scheduling.json_limits), base)
        require_method(method, "POST")
        require_scope(grant, platform, "Appointment.write")
        operation = self.hold if name == "hold" else self.book
        return lambda: operation(platform, json_body(request, self.scheduling.json_limits), base, access)

    def find(self, platform: str, body, base: str, query_string: dict[str, list[str]] | None = None):
        s = self.scheduling
        query = find_query(body, s.tz, query_string)
        count, offset = page(s.page_size if query.count is None else query.count, query.offset, s.page_size)
        resources, total = find_proposed(s.reader(), query, platform=platform, quotas=s.quotas, tz=s.tz,
                                         count=count, offset=offset)
        return 200, searchset(base, "Appointment", resources, query.to_query(s.tz), offset, count, total,
                              path="Appointment/$find"), {}

    async def hold(self, platform: str, body, base: str, access: Access):
        booking = self.scheduling.booking
        access.patient_data = True
        what = hold_or_book(body, "hold")
        if what.appointment_id is not None:  # one of its own appointments: a repeated $hold
            try:
                appt = booking.appointment(platform, what.appointment_id)
            except AppointmentUnknown as e:
                raise FhirError(404, "not-found", str(e)) from None
            access.resource_id, access.detail = appt.id, "hold repeated"
            return self._hold_answer(base, appt)
        appointment_id = await slot_refusals(booking.hold(platform, what.slot_id, what.patient, who=access.who()))
        access.resource_id, access.recorded = appointment_id, True  # audited in the hold's transaction
        if booking.hold_at_his:  # the HIS is told of the hold (outer.hold_at_his): wait for its answer
            await booking.wait_settled(appointment_id, self.scheduling.answer_within)
        return self._hold_answer(base, booking.appointment(platform, appointment_id))

    def _hold_answer(self, base: str, appt):
        """$hold's answer: 200 held, 202 held here while the HIS has not answered the hold yet
        (outer.hold_at_his), 409 not held (refused by the HIS, expired, cancelled, booked)."""
        if appt.status == "pending" and appt.pending_change in (None, "hold"):
            status = 200 if appt.pending_change is None else 202
            return (status, operation_bundle(base, "hold", [self.scheduling.appointment_json(appt)]),
                    location(base, appt, settled=False))
        raise FhirError(409, "conflict", f"appointment {appt.id} is not held ({appt.outcome or appt.status})",
                        "Appointment.status")

    async def book(self, platform: str, body, base: str, access: Access):
        booking = self.scheduling.booking
        access.patient_data = True
        what = hold_or_book(body, "book")
        if what.cancel:
            access.action = "cancel"
            status, resource_json, headers = await self.scheduling.appointment_change(
                platform, what.appointment_id, "PATCH", {"status": "cancelled"}, base, access)
            return status, operation_bundle(base, "book", [resource_json]), headers
        if what.appointment_id is not None and what.slot_id is not None:
            try:
                current = booking.appointment(platform, what.appointment_id)
            except AppointmentUnknown as e:
                raise FhirError(404, "not-found", str(e)) from None
            if current.slot_id != what.slot_id:
                if current.status != "booked":
                    raise FhirError(422, "business-rule", f"only a booked appointment can be moved to another slot; "
                                                          f"$hold the new slot instead (appointment {current.id} "
                                                          f"is {current.status})", "Appointment.slot")
                return await self._reschedule(platform, current, what.slot_id, base, access)
        if what.appointment_id is not None:
            try:
                how = await booking.book_held(platform, what.appointment_id, what.patient, who=access.who())
            except AppointmentUnknown as e:
                raise FhirError(404, "not-found", str(e)) from None
            except (SlotUnavailable, HoldUnanswered) as e:
                raise FhirError(409, "conflict", str(e), "Appointment.slot") from None
            appointment_id = what.appointment_id
        else:
            if what.patient is None:
                raise FhirError(422, "required", "booking needs the patient: a Patient with an identifier the HIS "
                                                 "knows (patient-resource, or a contained Patient in "
                                                 "appointment-resource)", "Appointment.participant")
            appointment_id, how = await slot_refusals(booking.book(platform, what.booking_request(),
                                                                   who=access.who()))
        access.resource_id = appointment_id
        access.recorded = how == "new"  # audited in the transaction that queued the SRM^S01
        access.detail = None if how == "new" else "already booked or being booked"
        return await self._booked(platform, appointment_id, base, "the booking was not made")

    async def _reschedule(self, platform: str, current, slot_id: str, base: str, access: Access):
        """$book of a booked appointment with another slot: cancel + new (BookingService.reschedule).  Answered
        like a booking of the new appointment; the old one is cancelled at the HIS once it accepted the new."""
        new_id = await slot_refusals(self.scheduling.booking.reschedule(platform, current.id, slot_id,
                                                                        who=access.who()))
        access.resource_id, access.recorded = new_id, True
        return await self._booked(platform, new_id, base, "the appointment was not moved")

    async def _booked(self, platform: str, appointment_id: str, base: str, not_made: str):
        """$book's answer: as POST /Appointment's (SchedulingApi.booking_answer), 200 when booked, in the
        operation's Bundle."""
        status, resource_json, headers = await self.scheduling.booking_answer(platform, appointment_id, base, 200,
                                                                              not_made)
        return status, operation_bundle(base, "book", [resource_json]), headers
