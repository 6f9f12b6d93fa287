"""The outer gate's Slot, Schedule, Appointment and directory endpoints (docs/security.md for who may call them)::

    GET    /Slot?_id=&start=&status=&schedule=&service-type=     (status=free: not started yet)
    GET    /Slot/{id}
    GET    /Schedule[?_id=]   GET /Schedule/{id}
           every search: _count, _offset (exact, stable paging: total on every page, a next link while more
           follow), _summary=count, _total, _elements, _sort (Slot: start; Appointment: date, _lastUpdated)
    POST   /Appointment                    book: 201 booked | 409 taken/refused | 202 pending (Location)
    GET    /Appointment  GET /Appointment/{id}     (a platform sees only its own)
    PUT    /Appointment/{id}               status -> cancelled (the only change a platform may make; a PUT
                                           that changes anything else is 422 naming it, adapters/maps/
                                           fhir_changes.py); If-Match: W/"n" -> 412 unless n is current
    PATCH  /Appointment/{id}               JSON Patch [{"op": "replace", "path": "/status", ...}], FHIRPath
                                           Patch (Parameters), or a partial resource {"status": "cancelled"}
    GET    /Appointment?status=&_id=&patient[:identifier]=[system|]value&date=   the platform's own
    GET    /Appointment/{id}/_history[/{vid}]     instance history, vread (every version is kept)
    GET    /Practitioner, /PractitionerRole, /HealthcareService, /Location [/{id}]   read-only, from the schedules
           the HIS publishes (adapters/maps/fhir_directory.py); Schedule?actor=, Slot?schedule.actor=,
           _include=Slot:schedule, PractitionerRole _include / the others' _revinclude of PractitionerRole

Thin HTTP handling over the booking service (gateway/domain/booking.py), which decides, and the chamber's
reader; adapters/maps/fhir_scheduling.py maps between FHIR and the domain.  Slots are shown only within the
platform's quota (a free slot it may not book is not shown; booking past the quota is 409 ``business-rule``),
and appointments only to the platform that made them (another platform's is 404, like one that does not exist).
A booking waits up to ``outer.answer_within`` for the HIS.  The paging and searchset Bundles here serve the IHE
``$find`` too (adapters/outer/ihe.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any, Callable
from urllib.parse import parse_qs, urlencode
from zoneinfo import ZoneInfo

from adapters.maps.fhir_changes import patch_status, put_status
from adapters.maps.fhir_directory import DIRECTORY_TYPES, directory, schedule_has_actor
from adapters.maps.fhir_scheduling import (
    APPOINTMENT_STATUS,
    appointment_resource,
    booking_from_appointment,
    schedule_resource,
    search_instant,
    slot_resource,
    slot_status_filter,
)
from adapters.outer.access import Access, PlatformGrant, require_scope
from adapters.outer.errors import FhirError, slot_refusals
from adapters.outer.intake import JsonLimits, json_body, raw_body, require_method
from gateway.domain.model import AppointmentUnknown, IdempotencyConflict, VersionConflict, slot_status

#: the resource types served here
RESOURCE_TYPES = ("Slot", "Schedule", "Appointment", *DIRECTORY_TYPES)
SLOT_STATUSES = ("free", "busy", "busy-unavailable", "busy-tentative", "entered-in-error")
MAX_OFFSET = 1_000_000


def page(count: int, offset: int, page_size: int) -> tuple[int, int]:
    """A page of a search (GET /Slot, $find): ``count`` at most ``page_size``, ``offset`` bounded."""
    if count < 0 or offset < 0:
        raise FhirError(400, "invalid", "_count and _offset must not be negative")
    if offset > MAX_OFFSET:
        raise FhirError(400, "too-costly", f"_offset must be at most {MAX_OFFSET}; narrow the search")
    return min(count, page_size), offset


#: what every search takes besides its own parameters (their meaning: SearchControls)
CONTROLS = {"_format", "_pretty", "_count", "_offset", "_total", "_totalMethod", "_summary", "_elements", "_sort"}
SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}
_ELEMENT = re.compile(r"[A-Za-z][A-Za-z0-9]{0,63}")


def check_params(query, allowed: set[str]) -> None:
    unknown = sorted(set(query) - allowed - CONTROLS)
    if unknown:
        raise FhirError(400, "not-supported", f"unsupported search parameter(s): {', '.join(unknown)}",
                        expression=unknown[0])


class SearchControls:
    """A search's result parameters: ``_summary=count`` (the total only), ``_total`` (none | estimate |
    accurate: the total is always accurate and always given; also as ``_totalMethod`` none | estimate | count), ``_elements`` (entries cut to these elements,
    tagged SUBSETTED) and ``_sort`` (one of ``sorts``, a search parameter name -> the reader's sort key, with
    ``-`` for descending).  Anything else they could say is refused (400), never dropped."""

    def __init__(self, query, sorts: dict[str, str] | None = None, default_sort: tuple[str, bool] | None = None):
        summary = query.get("_summary", [])
        if summary and summary[-1:] != ["count"] and summary[-1:] != ["false"]:
            raise FhirError(400, "not-supported", "_summary: only count (and false) are supported", "_summary")
        self.count_only = summary[-1:] == ["count"]
        for value in query.get("_total", []):
            if value not in ("none", "estimate", "accurate"):
                raise FhirError(400, "invalid", "_total must be none, estimate or accurate", "_total")
        for value in query.get("_totalMethod", []):  # (Aidbox's name for it, which fhirpy's .count() sends)
            if value not in ("none", "estimate", "count"):
                raise FhirError(400, "invalid", "_totalMethod must be none, estimate or count", "_totalMethod")
        elements = [e for v in query.get("_elements", []) for e in v.split(",") if e]
        for element in elements:
            if not _ELEMENT.fullmatch(element):
                raise FhirError(400, "invalid", "_elements: give element names, comma-separated", "_elements")
        self.elements = set(elements) or None
        self.sort = default_sort
        sorts = sorts or {}
        given = [k for v in query.get("_sort", []) for k in v.split(",") if k]
        if given:
            if len(given) > 1 or given[0].lstrip("-") not in sorts:
                raise FhirError(400, "not-supported", f"_sort: one of {', '.join(sorted(sorts)) or '(none)'}, with "
                                                      f"- for descending", "_sort")
            self.sort = (sorts[given[0].lstrip("-")], given[0].startswith("-"))

    def shaped(self, resource: dict) -> dict:
        """``resource`` with only the asked ``_elements`` (and the mandatory ones), tagged SUBSETTED."""
        if self.elements is None:
            return resource
        out = {k: v for k, v in resource.items() if k in self.elements or k in ("resourceType", "id")}
        out["meta"] = {**resource.get("meta", {}), "tag": [*resource.get("meta", {}).get("tag", []), SUBSETTED]}
        return out


def searchset(base, rtype, resources, query, offset, count, total: int, path: str | None = None,
              controls: SearchControls | None = None) -> dict:
    """A searchset page of ``rtype`` resources (``count`` from ``offset`` of ``total``), with its self link and,
    when more follow, a next link to ``path`` (default the type) carrying every value of ``query`` (a repeated
    parameter stays repeated)."""
    path = path or rtype
    params = [(k, v) for k, values in query.items() if k not in ("_offset", "_count") for v in values]
    given = query.get("_count", [])[-1:]
    links = [{"relation": "self", "url": f"{base}/{path}?{urlencode([*params, *(('_count', c) for c in given), ('_offset', offset)])}"}]
    if offset + count < total and count > 0:  # (_count=0 asks for no entries: nothing to page through)
        links.append({"relation": "next",
                      "url": f"{base}/{path}?{urlencode([*params, ('_count', count), ('_offset', offset + count)])}"})
    if controls is not None:
        resources = [controls.shaped(r) for r in resources]
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": links,
        **({"entry": [{"fullUrl": f"{base}/{rtype}/{r['id']}", "resource": r, "search": {"mode": "match"}}
                      for r in resources]} if resources else {}),
    }


def etag(appt) -> dict:
    return {"ETag": f'W/"{appt.version}"'}


def if_match_version(header: bytes | None) -> int | None:
    """``If-Match: W/"n"`` (or ``"n"``) -> n; None without the header (400 for anything else: a condition the
    gateway cannot read is not dropped)."""
    if header is None:
        return None
    text = header.decode("ascii", "replace").strip()
    tag = text[2:] if text.startswith("W/") else text
    if len(tag) >= 3 and tag[0] == tag[-1] == '"' and tag[1:-1].isdigit() and len(tag) < 20:
        return int(tag[1:-1])
    raise FhirError(400, "invalid", 'If-Match must be one ETag as the gateway gives it: W/"<versionId>"')


def location(base: str, appt, settled: bool = True) -> dict:
    """Location and ETag of an answer about ``appt``: its version's URL, or (not ``settled``: a 202, the HIS has
    not answered) the resource's, the one to poll."""
    version = f"/_history/{appt.version}" if settled else ""
    return {"Location": f"{base}/Appointment/{appt.id}{version}", **etag(appt)}


class SchedulingApi:
    """The handlers of the Slot, Schedule and Appointment endpoints: ``booking`` (the BookingService),
    ``reader`` (the chamber's), ``quotas`` (gateway.domain.quota.Quotas; None: no platform is limited)."""

    def __init__(self, booking, reader: Callable[[], Any], *, tz: ZoneInfo, quotas, answer_within: float,
                 page_size: int, json_limits: JsonLimits):
        self.booking = booking
        self.reader = reader
        self.tz = tz
        self.quotas = quotas
        self.answer_within = answer_within
        self.page_size = page_size
        self.json_limits = json_limits

    def handler(self, parts: list[str], method: str, grant: PlatformGrant, platform: str, request, query,
                base: str, access: Access):
        """The route (404), method (405) and scope (403) of a Slot, Schedule or Appointment request (``parts``:
        the path below the FHIR base): the handler that answers it, not called yet (it reads the body, if any,
        when it is)."""
        rtype, rest = parts[0], parts[1:]
        if rest == ["_history"] and rtype == "Appointment":  # type-level history: what changed since
            require_method(method, "GET")
            require_scope(grant, platform, "Appointment.read")
            return lambda: self.appointment_changes(platform, query, base, access)
        if rest[:1] == ["_history"]:
            raise FhirError(404, "not-supported", f"no {rtype} history is kept: GET /{rtype}?_lastUpdated=ge<instant> "
                                                  f"gives what changed since" if rtype == "Slot" else
                            f"history is served for Appointment only (GET /Appointment/_history?_since=)")
        if rtype == "Appointment" and len(rest) in (2, 3) and rest[1] == "_history":
            require_method(method, "GET")
            require_scope(grant, platform, "Appointment.read")
            return lambda: self.appointment_history(platform, rest[0], rest[2] if len(rest) == 3 else None, base,
                                                    access)
        if len(rest) > 1:
            raise FhirError(404, "not-supported", "history (other than an Appointment's) and operations other than "
                                                  "the IHE ones are not supported")
        if rtype == "Slot":
            require_method(method, "GET")
            require_scope(grant, platform, "Slot.read")
            if rest:
                return lambda: self.slot_read(platform, rest[0])
            return lambda: self.slot_search(platform, query, base)
        if rtype == "Schedule":
            require_method(method, "GET")
            require_scope(grant, platform, "Schedule.read")
            if rest:
                return lambda: self.schedule_read(rest[0])
            return lambda: self.schedule_search(query, base)
        if rtype in DIRECTORY_TYPES:  # the HIS's doctors and departments, read-only (scope Schedule.read)
            require_method(method, "GET")
            require_scope(grant, platform, "Schedule.read")
            if rest:
                return lambda: self.directory_read(rtype, rest[0])
            return lambda: self.directory_search(rtype, query, base)
        if not rest:
            require_method(method, "GET", "POST")
            if method == "POST":
                require_scope(grant, platform, "Appointment.write")
                return lambda: self.appointment_create(platform, json_body(request, self.json_limits), base,
                                                       request)
            require_scope(grant, platform, "Appointment.read")
            return lambda: self.appointment_search(platform, query, base, access)
        require_method(method, "GET", "PUT", "PATCH")
        if method == "GET":
            require_scope(grant, platform, "Appointment.read")
            return lambda: self.appointment_read(platform, rest[0], access)
        require_scope(grant, platform, "Appointment.write")
        return lambda: self.appointment_change(platform, rest[0], method, json_body(request, self.json_limits), base,
                                               access, request.getHeader(b"if-match"))

    # -- Slot and Schedule ------------------------------------------------------------------------------------
    def _count(self, query) -> tuple[int, int]:
        try:
            count = int(query.get("_count", [self.page_size])[-1])
            offset = int(query.get("_offset", ["0"])[-1])
        except ValueError:
            raise FhirError(400, "invalid", "_count and _offset must be whole numbers") from None
        return page(count, offset, self.page_size)

    def slot_search(self, platform: str, query, base: str):
        check_params(query, {"_id", "start", "status", "schedule", "schedule.actor", "service-type", "_include",
                             "_lastUpdated"})
        controls = SearchControls(query, {"start": "start"})
        includes = query.get("_include", [])
        if any(i != "Slot:schedule" for i in includes):
            raise FhirError(400, "not-supported", "_include: only Slot:schedule", "_include")
        count, offset = self._count(query)
        kw: dict[str, Any] = {"updated_ranges": self._date_ranges(query, "_lastUpdated")}
        for value in query.get("start", []):
            try:
                prefix, low, high = search_instant(value, self.tz)
            except (ValueError, OverflowError) as e:
                raise FhirError(400, "invalid", f"start={value!r}: {e}", "start") from None
            if prefix in ("ge", "sa", "eq"):
                kw["start_from"] = low if prefix != "sa" else high
            if prefix == "gt":
                kw["start_from"], kw["start_from_inclusive"] = high, True
            if prefix in ("le", "eq"):
                kw["start_to"], kw["start_to_inclusive"] = high, False
            if prefix in ("lt", "eb"):
                kw["start_to"], kw["start_to_inclusive"] = low, False
            if prefix == "ne":
                raise FhirError(400, "not-supported", "start=ne... is not supported", "start")
        statuses = [s for v in query.get("status", []) for s in v.split(",") if s]
        for s in statuses:
            if s not in SLOT_STATUSES:
                raise FhirError(400, "code-invalid", f"unknown slot status {s!r}", "status")
        reader = self.reader()
        if statuses:  # (a free slot that has started can no longer be booked: it is not listed as free)
            kw.update(slot_status_filter(statuses), free_after=reader.now)
        ids = [s for v in query.get("_id", []) for s in v.split(",") if s]
        if ids:
            kw["ids"] = ids
        schedules = [s.split("/")[-1] for v in query.get("schedule", []) for s in v.split(",") if s]
        actors = [a for v in query.get("schedule.actor", []) for a in v.split(",") if a]
        if actors:  # the schedules of these doctors / departments (and of the schedule= ones, if given)
            found = [r.id for r in reader.schedules() if any(schedule_has_actor(r, a) for a in actors)]
            schedules = [s for s in schedules if s in found] if schedules else found or ["(none)"]
        if schedules:
            kw["schedule_ids"] = schedules
        services = [s.split("|")[-1] for v in query.get("service-type", []) for s in v.split(",") if s]
        if services:
            kw["service_codes"] = services
        if self.quotas is not None:  # free slots the platform may not book are not shown to it
            kw["hidden"] = self.quotas.hidden(reader, platform, reader.now)
        total = reader.count_slots(**kw)
        rows = [] if controls.count_only or count == 0 else reader.search_slots(
            limit=count, offset=offset, descending=bool(controls.sort and controls.sort[1]), **kw)
        resources = [slot_resource(r, self.tz) for r in rows]
        bundle = searchset(base, "Slot", resources, query, offset, count, total, controls=controls)
        if includes and rows:
            wanted = {r.schedule_id for r in rows}
            bundle.setdefault("entry", []).extend(
                {"fullUrl": f"{base}/Schedule/{r.id}", "resource": schedule_resource(r, self.tz),
                 "search": {"mode": "include"}} for r in reader.schedules() if r.id in wanted)
        return 200, bundle, {}

    def slot_read(self, platform: str, slot_id: str):
        reader = self.reader()
        slot = reader.slot(slot_id)
        if slot is None:
            raise FhirError(404, "not-found", f"no Slot {slot_id!r}")
        if (self.quotas is not None and slot_status(slot) == "free"
                and not self.quotas.may_book(reader, platform, slot, reader.now)):
            raise FhirError(404, "not-found", f"Slot {slot_id!r} is not offered to platform {platform!r} (its quota "
                                              f"for that schedule and day is used up)")
        return 200, slot_resource(slot, self.tz), {}

    def schedule_search(self, query, base: str):
        check_params(query, {"_id", "actor"})
        controls = SearchControls(query)
        count, offset = self._count(query)
        ids = [s for v in query.get("_id", []) for s in v.split(",") if s]
        rows = self.reader().schedules()  # (a hospital's schedules: hundreds at most)
        if ids:
            rows = [r for r in rows if r.id in ids]
        for v in query.get("actor", []):  # (repeated: all of them; a comma: any)
            rows = [r for r in rows if any(schedule_has_actor(r, a) for a in v.split(",") if a)]
        shown = [] if controls.count_only else rows[offset:offset + count]
        resources = [schedule_resource(r, self.tz) for r in shown]
        return 200, searchset(base, "Schedule", resources, query, offset, count, len(rows), controls=controls), {}

    def schedule_read(self, schedule_id: str):
        rows = self.reader().schedules(schedule_id)
        if not rows:
            raise FhirError(404, "not-found", f"no Schedule {schedule_id!r}")
        return 200, schedule_resource(rows[0], self.tz), {}

    # -- the directory: Practitioner, PractitionerRole, HealthcareService, Location ------------------------
    #: each directory type's search parameters: name -> what of the resource it matches
    DIRECTORY_PARAMS = {"PractitionerRole": {"specialty", "practitioner", "location", "service"}}

    def directory_read(self, rtype: str, rid: str):
        found = directory(self.reader().schedules())[rtype].get(rid)
        if found is None:
            raise FhirError(404, "not-found", f"no {rtype} {rid[:64]!r}")
        return 200, found, {}

    #: the cheap _include/_revinclude of directory searches: value -> (resource type, the PractitionerRole
    #: element that refers)
    DIRECTORY_INCLUDES = {
        "PractitionerRole": {"_include": {"PractitionerRole:practitioner": ("Practitioner", "practitioner"),
                                          "PractitionerRole:service": ("HealthcareService", "healthcareService"),
                                          "PractitionerRole:location": ("Location", "location")}},
        "Practitioner": {"_revinclude": {"PractitionerRole:practitioner": ("PractitionerRole", "practitioner")}},
        "HealthcareService": {"_revinclude": {"PractitionerRole:service": ("PractitionerRole", "healthcareService")}},
        "Location": {"_revinclude": {"PractitionerRole:location": ("PractitionerRole", "location")}},
    }

    def directory_search(self, rtype: str, query, base: str):
        includes = self.DIRECTORY_INCLUDES.get(rtype, {})
        check_params(query, {"_id", *self.DIRECTORY_PARAMS.get(rtype, ()), *includes})
        for kind, allowed in includes.items():
            for value in query.get(kind, []):
                if value not in allowed:
                    raise FhirError(400, "not-supported", f"{kind}: only {', '.join(allowed)}", kind)
        controls = SearchControls(query)
        count, offset = self._count(query)
        everything = directory(self.reader().schedules())
        found = list(everything[rtype].values())
        ids = [s for v in query.get("_id", []) for s in v.split(",") if s]
        if ids:
            found = [r for r in found if r["id"] in ids]
        for value in query.get("specialty", []):
            codes = [(t.rpartition("|")[0] if "|" in t else None, t.rpartition("|")[2]) for t in value.split(",")]
            found = [r for r in found if any(c["code"] == code and (system is None or c["system"] == system)
                                             for s in r["specialty"] for c in s["coding"] for system, code in codes)]
        for name, key in (("practitioner", "practitioner"), ("location", "location"), ("service", "healthcareService")):
            for value in query.get(name, []):
                refs = set(value.split(","))
                found = [r for r in found if any(
                    ref.get("reference") in refs or ref.get("reference", "").split("/")[-1] in refs
                    for ref in (r[key] if isinstance(r[key], list) else [r[key]]))]
        shown = [] if controls.count_only else found[offset:offset + count]
        bundle = searchset(base, rtype, shown, query, offset, count, len(found), controls=controls)
        extra: dict[str, dict] = {}
        for kind, allowed in includes.items():
            for value in query.get(kind, []):
                other, key = allowed[value]
                for r in shown:
                    if kind == "_include":
                        refs = r[key] if isinstance(r[key], list) else [r[key]]
                        for ref in refs:
                            target = everything[other].get(ref.get("reference", "").split("/")[-1])
                            if target is not None:
                                extra[f"{other}/{target['id']}"] = target
                    else:
                        for role in everything[other].values():
                            refs = role[key] if isinstance(role[key], list) else [role[key]]
                            if any(ref.get("reference") == f"{rtype}/{r['id']}" for ref in refs):
                                extra[f"{other}/{role['id']}"] = role
        if extra:
            bundle.setdefault("entry", []).extend({"fullUrl": f"{base}/{url}", "resource": res,
                                                   "search": {"mode": "include"}} for url, res in extra.items())
        return 200, bundle, {}

    # -- Appointment -----------------------------------------------------------------------------------------
    def appointment_json(self, appt) -> dict:
        reader = self.reader()
        slot = reader.slot(appt.slot_id)
        schedule = next(iter(reader.schedules(slot.schedule_id)), None)
        return appointment_resource(appt, slot, self.tz, reader.appointment_identifiers(appt.id), schedule)

    async def appointment_create(self, platform: str, body, base: str, http_request):
        access: Access = http_request.gateway_access
        access.patient_data = True  # the answer carries the Appointment, with its patient
        request = booking_from_appointment(body)
        key = http_request.getHeader(b"idempotency-key")
        if key is not None:
            key = key.decode("utf-8", "replace").strip()
            if not 1 <= len(key) <= 255:
                raise FhirError(400, "invalid", "Idempotency-Key must be 1 to 255 characters")
        condition = self._if_none_exist(http_request.getHeader(b"if-none-exist"))
        request_hash = hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        try:
            appointment_id, how = await slot_refusals(self.booking.book(
                platform, request, idempotency_key=key, request_hash=request_hash, if_none_exist=condition,
                who=access.who(), raw=raw_body(http_request)))
        except IdempotencyConflict as e:
            raise FhirError(422, "business-rule", str(e)) from None
        access.resource_id = appointment_id
        access.recorded = how == "new"  # audited in the transaction that held the slot
        access.detail = None if how == "new" else f"{how} appointment returned"
        if how == "existing":  # FHIR conditional create: the match is returned, nothing is created
            appt = self.booking.appointment(platform, appointment_id)
            return 200, self.appointment_json(appt), location(base, appt)
        return await self.booking_answer(platform, appointment_id, base, 201, "the booking was not made")

    async def booking_answer(self, platform: str, appointment_id: str, base: str, booked: int, not_made: str):
        """Wait up to outer.answer_within for the HIS, then answer with the appointment: ``booked`` (201 create,
        200 $book), 202 still pending, else 409 saying ``not_made`` and why."""
        await self.booking.wait_settled(appointment_id, self.answer_within)
        appt = self.booking.appointment(platform, appointment_id)
        resource_json = self.appointment_json(appt)
        if appt.status == "booked":
            return booked, resource_json, location(base, appt)
        if appt.status == "pending":
            return 202, resource_json, location(base, appt, settled=False)
        raise FhirError(409, "conflict", f"{not_made}: {appt.outcome}", "Appointment.slot",
                        headers={"Content-Location": location(base, appt, settled=False)["Location"]})

    @staticmethod
    def _if_none_exist(header: bytes | None) -> tuple[str, str] | None:
        """``If-None-Exist: identifier=[system|]value`` -> (system, value)."""
        if header is None:
            return None
        params = parse_qs(header.decode("utf-8", "replace"), keep_blank_values=True)
        if set(params) != {"identifier"} or len(params["identifier"]) != 1 or not params["identifier"][0]:
            raise FhirError(400, "not-supported", "If-None-Exist supports exactly one 'identifier=[system|]value'")
        system, _, value = params["identifier"][0].rpartition("|")
        if not value:
            raise FhirError(400, "invalid", "If-None-Exist: the identifier has no value")
        return system, value

    def appointment_read(self, platform: str, appointment_id: str, access: Access):
        try:
            appt = self.booking.appointment(platform, appointment_id)
        except AppointmentUnknown as e:
            raise FhirError(404, "not-found", str(e)) from None
        access.patient_data = True
        return 200, self.appointment_json(appt), etag(appt)

    def appointment_history(self, platform: str, appointment_id: str, version: str | None, base: str,
                            access: Access):
        """vread (``version``) or the instance history of one of the platform's appointments: every version is
        kept (a chamber upgraded from schema 8 only those made since)."""
        try:
            versions = self.booking.appointment_versions(platform, appointment_id)
        except AppointmentUnknown as e:
            raise FhirError(404, "not-found", str(e)) from None
        access.patient_data = True
        if version is not None:
            appt = next((a for a in versions if str(a.version) == version), None)
            if appt is None:
                raise FhirError(404, "not-found", f"the appointment has no version {version[:20]} (its versions "
                                                  f"kept: {', '.join(str(a.version) for a in versions)})")
            return 200, self.appointment_json(appt), etag(appt)
        entries = [self._history_entry(appt, base) for appt in versions]
        return 200, {"resourceType": "Bundle", "type": "history", "total": len(entries),
                     "link": [{"relation": "self", "url": f"{base}/Appointment/{appointment_id}/_history"}],
                     "entry": entries}, {}

    def appointment_changes(self, platform: str, query, base: str, access: Access):
        """Type-level history: every version of the platform's appointments made at or after ``_since``
        (inclusive: a poller passes the latest ``meta.lastUpdated`` it has seen and drops the (id, versionId)
        pairs it has already had, so a change committed in that same second is not missed), newest first."""
        check_params(query, {"_since", "_count", "_offset"})
        values = query.get("_since", [])
        if len(values) != 1:
            raise FhirError(400, "invalid", "give _since=<instant> once (what changed since then)", "_since")
        try:
            _, since, _ = search_instant(values[0], self.tz)
        except (ValueError, OverflowError) as e:
            raise FhirError(400, "invalid", f"_since={values[0][:40]!r}: {e}", "_since") from None
        count, offset = self._count(query)
        total, versions = self.reader().appointment_history(platform, since, limit=count, offset=offset)
        access.patient_data = True
        entries = [self._history_entry(appt, base) for appt in versions]
        path = f"{base}/Appointment/_history"
        links = [{"relation": "self", "url": f"{path}?{urlencode({'_since': values[0], '_count': count, '_offset': offset})}"}]
        if offset + len(entries) < total:
            links.append({"relation": "next", "url": f"{path}?"
                          f"{urlencode({'_since': values[0], '_count': count, '_offset': offset + count})}"})
        return 200, {"resourceType": "Bundle", "type": "history", "total": total, "link": links,
                     "entry": entries}, {}

    def _history_entry(self, appt, base: str) -> dict:
        resource_json = self.appointment_json(appt)
        return {"fullUrl": f"{base}/Appointment/{appt.id}", "resource": resource_json,
                "request": {"method": "POST" if appt.version == 1 else "PUT",
                            "url": f"Appointment/{appt.id}" if appt.version > 1 else "Appointment"},
                "response": {"status": "200 OK", "etag": etag(appt)["ETag"],
                             "lastModified": resource_json["meta"]["lastUpdated"]}}

    def appointment_search(self, platform: str, query, base: str, access: Access):
        check_params(query, {"status", "_id", "patient", "patient:identifier", "date", "_lastUpdated"})
        controls = SearchControls(query, {"date": "date", "_lastUpdated": "_lastUpdated"}, ("created", True))
        count, offset = self._count(query)
        kw: dict[str, Any] = {"start_ranges": self._date_ranges(query), "patients": self._patient_tokens(query),
                              "updated_ranges": self._date_ranges(query, "_lastUpdated")}
        statuses = {s for v in query.get("status", []) for s in v.split(",") if s}
        if statuses:
            kw["statuses"] = [c for c, fhir in APPOINTMENT_STATUS.items() if fhir in statuses]
        ids = [s for v in query.get("_id", []) for s in v.split(",") if s]
        if ids:
            kw["ids"] = ids
        reader = self.reader()
        total = reader.count_appointments(platform, **kw)  # only ever the platform's own
        rows = [] if controls.count_only or count == 0 else reader.search_appointments(
            platform, sort=controls.sort, limit=count, offset=offset, **kw)
        resources = [self.appointment_json(appt) for appt in rows]
        access.patient_data = True
        shown = [r["id"] for r in resources]
        access.detail = f"{len(shown)} result(s)" + (": " + ",".join(shown[:100]) if shown else "") + \
            (" ..." if len(shown) > 100 else "")
        return 200, searchset(base, "Appointment", resources, query, offset, count, total, controls=controls), {}

    @staticmethod
    def _patient_tokens(query) -> list[tuple[str | None, str]] | None:
        """``patient`` / ``patient:identifier`` = ``[system|]value`` (a patient identifier, ITI-118 style; a
        comma is OR): [(system or None, value)], or None when not asked.  The values are compared, never
        logged nor audited."""
        values = query.get("patient", []) + query.get("patient:identifier", [])
        if not values:
            return None
        tokens = []
        for v in values:
            for item in v.split(","):
                if "|" not in item and "/" in item:
                    raise FhirError(400, "not-supported", "patient: the gateway keeps no Patient resources to refer "
                                    "to; search by the patient's identifier, patient:identifier=[system|]value",
                                    "patient")
                system, bar, value = item.rpartition("|")
                if not value:
                    raise FhirError(400, "invalid", "patient: give the patient's identifier as [system|]value",
                                    "patient")
                tokens.append((system if bar else None, value))
        return tokens

    def _date_ranges(self, query, name: str = "date") -> list[tuple[float, float]]:
        """``date`` (the appointment's start) or ``_lastUpdated`` (``name``), FHIR date search with prefixes and
        the value's implicit precision (a day, a second, a millisecond...): [(low, high)] to satisfy all."""
        out = []
        for value in query.get(name, []):
            try:
                prefix, low, high = search_instant(value, self.tz)
            except (ValueError, OverflowError) as e:
                raise FhirError(400, "invalid", f"{name}={value[:40]!r}: {e}", name) from None
            ranges = {"eq": (low, high), "ge": (low, math.inf), "sa": (high, math.inf), "gt": (high, math.inf),
                      "le": (-math.inf, high), "lt": (-math.inf, low), "eb": (-math.inf, low)}
            if prefix not in ranges:
                raise FhirError(400, "not-supported", f"{name}={prefix}... is not supported", name)
            out.append(ranges[prefix])
        return out

    async def appointment_change(self, platform: str, appointment_id: str, method: str, body, base: str,
                                 access: Access, if_match: bytes | None = None):
        try:
            current = self.booking.appointment(platform, appointment_id)
        except AppointmentUnknown as e:
            raise FhirError(404, "not-found", str(e)) from None
        version = if_match_version(if_match)
        if version is not None and version != current.version:
            raise FhirError(412, "conflict", f"If-Match: the appointment is at version {current.version}, not "
                                             f"{version}; read it again", headers=etag(current))
        served = self.appointment_json(current)
        wanted = put_status(body, served, appointment_id) if method == "PUT" else patch_status(body, served)
        current_status = served["status"]
        access.patient_data = True
        if wanted == current_status:
            access.action, access.detail = "update", f"no change (already {current_status})"
            return 200, served, etag(current)
        if wanted != "cancelled":
            access.action = "update"
            raise FhirError(422, "business-rule", "the only change a platform can make is status -> cancelled",
                            "Appointment.status")
        try:
            result = await self.booking.cancel(platform, appointment_id, who=access.who(), if_version=version)
        except VersionConflict as e:
            raise FhirError(412, "conflict", f"If-Match: {e}") from None
        access.recorded = result in ("sent", "cancelled")  # audited in the cancellation's transaction
        if result == "sent":
            await self.booking.wait_settled(appointment_id, self.answer_within)
        appt = self.booking.appointment(platform, appointment_id)
        resource_json = self.appointment_json(appt)
        if resource_json["status"] == "cancelled":
            return 200, resource_json, etag(appt)
        if appt.pending_change == "cancel":
            return 202, resource_json, location(base, appt, settled=False)
        raise FhirError(409, "conflict", f"the HIS did not cancel the appointment: {appt.outcome}",
                        "Appointment.status")
