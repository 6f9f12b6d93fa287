"""The outer gate: FHIR R4 over HTTPS (twisted.web), for registration and internet-hospital platforms.

Served (base ``https://HOST:PORT/fhir``)::

    GET    /metadata                       CapabilityStatement
    GET    /Slot?start=&status=&schedule=&service-type=&_count=&_offset=
    GET    /Slot/{id}
    GET    /Schedule[?_id=]   GET /Schedule/{id}
    POST   /Appointment                    book: 201 booked | 409 taken/refused | 202 pending (Location)
    GET    /Appointment  GET /Appointment/{id}     (a platform sees only its own)
    PUT    /Appointment/{id}               status -> cancelled (the only change a platform may make)
    PATCH  /Appointment/{id}               JSON Patch [{"op": "replace", "path": "/status", ...}] or a
                                           partial resource {"status": "cancelled"}

The platform is the one whose configured certificate subject matches the client certificate presented in
the TLS handshake (the handshake itself already refused certificates not signed by the configured CA).

Every error is an OperationOutcome: 400 unreadable request, 403 unknown platform, 404 unknown resource,
405 method, 409 conflict, 413 body too large, 415 media type, 422 valid FHIR we cannot act on, 500 (never
with internals), 503 chamber unavailable.  The handler never lets an exception escape to twisted.web.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
from typing import Any, Callable
from urllib.parse import parse_qs, urlencode
from zoneinfo import ZoneInfo

import structlog
from twisted.internet import defer
from twisted.web import resource, server

from adapters.mapping.fhir_scheduling import (
    FHIR_VERSION,
    InvalidResource,
    appointment_resource,
    booking_from_appointment,
    schedule_resource,
    search_instant,
    slot_resource,
)
from gateway.errors import ChamberError
from gateway.scheduling import AppointmentUnknown, IdempotencyConflict, Overloaded, SlotUnavailable, SlotUnknown

log = structlog.get_logger("gateway.outer")

FHIR_JSON = b"application/fhir+json; charset=utf-8"
_HOST = re.compile(rb"^[A-Za-z0-9.\-\[\]:]{1,255}$")
SLOT_STATUSES = ("free", "busy", "busy-unavailable", "busy-tentative", "entered-in-error")


class FhirError(Exception):
    def __init__(self, status: int, code: str, diagnostics: str, expression: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(diagnostics)
        self.status = status
        self.issues = [(code, diagnostics, expression)]
        self.headers = headers or {}


def operation_outcome(issues, severity: str = "error") -> dict:
    out = []
    for code, diagnostics, expression in issues:
        issue = {"severity": severity, "code": code, "diagnostics": diagnostics}
        if expression:
            issue["expression"] = [expression]
        out.append(issue)
    return {"resourceType": "OperationOutcome", "issue": out}


class BoundedContent(io.BytesIO):
    """Request body sink that keeps at most ``limit`` bytes and remembers that more came."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.overflow = False

    def write(self, data) -> int:
        if self.overflow or self.tell() + len(data) > self.limit:
            if not self.overflow:
                self.overflow = True
                self.seek(0)
                self.truncate()
            return len(data)
        return super().write(data)


def request_factory(max_body: int):
    class GatewayRequest(server.Request):
        def gotLength(self, length):
            self.content = BoundedContent(max_body)
            if length is not None and length > max_body:
                self.content.overflow = True

    return GatewayRequest


class PlatformDirectory:
    """Client certificate subject -> platform name."""

    def __init__(self, platforms: list[tuple[str, tuple]]):
        # platforms: (name, normalised subject) pairs; a subject of only a CN matches on the CN
        self._platforms = platforms

    def identify(self, subject_pairs: tuple) -> str | None:
        subject = tuple(sorted(subject_pairs))
        cn = tuple(p for p in subject if p[0] == "CN")
        for name, wanted in self._platforms:
            if wanted == subject or (all(k == "CN" for k, _ in wanted) and wanted == cn):
                return name
        return None


def peer_subject(request) -> tuple | None:
    transport = getattr(request.channel, "transport", None) or request.transport
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        return None
    cert = get()
    if cert is None:
        return None
    return tuple((k.decode().upper(), v.decode("utf-8", "replace")) for k, v in cert.get_subject().get_components())


class FhirApi(resource.Resource):
    isLeaf = True

    def __init__(self, *, booking, reader: Callable[[], Any], platforms: PlatformDirectory, tz: ZoneInfo,
                 base_path: str, public_base_url: str | None, answer_within: float, page_size: int,
                 hospital_name: str, software_version: str):
        super().__init__()
        self.booking = booking
        self.reader = reader
        self.platforms = platforms
        self.tz = tz
        self.base_parts = [p.encode() for p in base_path.strip("/").split("/") if p]
        self.public_base_url = public_base_url
        self.answer_within = answer_within
        self.page_size = page_size
        self.hospital_name = hospital_name
        self.software_version = software_version

    # -- twisted.web entry ----------------------------------------------------------------------------------
    def render(self, request):
        started = time.monotonic()
        gone = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = defer.ensureDeferred(self._dispatch(request))
        d.addErrback(self._unexpected, request)
        d.addCallback(self._respond, request, started, gone)
        return server.NOT_DONE_YET

    def _unexpected(self, failure, request):
        if failure.check(FhirError):
            e = failure.value
            return e.status, operation_outcome(e.issues), e.headers
        if failure.check(InvalidResource):
            e = failure.value
            return e.status, operation_outcome(e.issues), {}
        if failure.check(Overloaded):
            e = failure.value
            return 503, operation_outcome([("transient", str(e), None)]), {"Retry-After": str(e.retry_after)}
        if failure.check(ChamberError):
            log.error("outer.chamber_unavailable", error=failure.getErrorMessage())
            return 503, operation_outcome([("transient", "the gateway cannot store requests right now; nothing "
                                            "was recorded, try again later", None)]), {"Retry-After": "30"}
        log.error("outer.internal_error", method=request.method.decode(), error=failure.getErrorMessage(),
                  error_type=failure.type.__name__)
        return 500, operation_outcome([("exception", "internal error; the request was not completed", None)]), {}

    def _respond(self, result, request, started, gone):
        status, body, headers = result
        platform = getattr(request, "gateway_platform", None)
        log.info("outer.request", platform=platform, method=request.method.decode(), path=request.path.decode(
            "utf-8", "replace"), status=status, ms=round((time.monotonic() - started) * 1000, 1))
        if gone:
            return
        request.setResponseCode(status)
        request.setHeader(b"content-type", FHIR_JSON)
        for k, v in headers.items():
            request.setHeader(k.encode(), v.encode())
        if body is not None:
            request.write(json.dumps(body, ensure_ascii=False).encode("utf-8"))
        request.finish()

    # -- routing ---------------------------------------------------------------------------------------------
    async def _dispatch(self, request):
        content = request.content
        if isinstance(content, BoundedContent) and content.overflow:
            raise FhirError(413, "too-long", f"the request body is larger than {content.limit} bytes")
        subject = peer_subject(request)
        platform = self.platforms.identify(subject) if subject else None
        if platform is None:
            raise FhirError(403, "security", "this client certificate is not registered for any platform")
        request.gateway_platform = platform
        base = self._base_url(request)

        parts = request.postpath
        if request.prepath[: len(self.base_parts)] == self.base_parts:
            parts = request.prepath[len(self.base_parts):] + parts
        else:
            parts = (request.prepath + parts)
            if parts[: len(self.base_parts)] != self.base_parts:
                raise FhirError(404, "not-found", "not a FHIR endpoint of this gateway")
            parts = parts[len(self.base_parts):]
        parts = [p.decode("utf-8", "replace") for p in parts if p]
        method = request.method.decode()
        query = self._query(request)

        if parts == ["metadata"]:
            self._method(method, "GET")
            return 200, self.capability_statement(base), {}
        if not parts or parts[0] not in ("Slot", "Schedule", "Appointment"):
            raise FhirError(404, "not-supported", f"resource type {parts[0] if parts else '(none)'} is not served here")
        rtype, rest = parts[0], parts[1:]
        if len(rest) > 1:
            raise FhirError(404, "not-supported", "history and operations are not supported")
        if rtype == "Slot":
            self._method(method, "GET")
            return self.slot_read(rest[0]) if rest else self.slot_search(query, base)
        if rtype == "Schedule":
            self._method(method, "GET")
            return self.schedule_read(rest[0]) if rest else self.schedule_search(query, base)
        if not rest:
            self._method(method, "GET", "POST")
            if method == "POST":
                return await self.appointment_create(platform, self._body(request), base, request)
            return self.appointment_search(platform, query, base)
        self._method(method, "GET", "PUT", "PATCH")
        if method == "GET":
            return self.appointment_read(platform, rest[0])
        return await self.appointment_change(platform, rest[0], method, self._body(request), base)

    @staticmethod
    def _method(method: str, *allowed: str) -> None:
        if method not in allowed:
            raise FhirError(405, "not-supported", f"{method} is not allowed here (allowed: {', '.join(allowed)})",
                            headers={"Allow": ", ".join(allowed)})

    @staticmethod
    def _query(request) -> dict[str, list[str]]:
        raw = request.uri.split(b"?", 1)[1] if b"?" in request.uri else b""
        try:
            return parse_qs(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            raise FhirError(400, "invalid", "the query string is not UTF-8") from None

    @staticmethod
    def _body(request) -> Any:
        ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if ctype not in (b"application/fhir+json", b"application/json", b"application/json-patch+json",
                         b"application/merge-patch+json"):
            raise FhirError(415, "not-supported", "send application/fhir+json")
        data = request.content.read()
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FhirError(400, "structure", f"the body is not valid JSON: {e}") from None

    def _base_url(self, request) -> str:
        """The base platforms address: the configured public URL, else this request's Host."""
        if self.public_base_url:
            return self.public_base_url.rstrip("/")
        path = "/" + b"/".join(self.base_parts).decode()
        host = request.getHeader(b"host") or b""
        return f"https://{host.decode('ascii')}{path}" if _HOST.match(host) else path

    # -- metadata --------------------------------------------------------------------------------------------
    def capability_statement(self, base: str) -> dict:
        def sp(name, type_, doc):
            return {"name": name, "type": type_, "documentation": doc}

        return {
            "resourceType": "CapabilityStatement",
            "status": "active",
            "date": "2026-11-23",
            "kind": "instance",
            "publisher": self.hospital_name,
            "software": {"name": "gatewayd", "version": self.software_version},
            "implementation": {"description": f"{self.hospital_name} front-end gateway", "url": base},
            "fhirVersion": FHIR_VERSION,
            "format": ["application/fhir+json"],
            "rest": [{
                "mode": "server",
                "documentation": "FHIR R4B (4.3.0), wire-compatible with R4 (4.0.1) for Slot, Schedule and "
                                 "Appointment. Bookings are held in the gateway and confirmed by the HIS.",
                "security": {
                    "cors": False,
                    "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                             "code": "Certificates"}]}],
                    "description": "Mutual TLS: each platform presents the client certificate registered for it.",
                },
                "resource": [
                    {"type": "Slot", "interaction": [{"code": "read"}, {"code": "search-type"}],
                     "searchParam": [sp("start", "date", "slot start, with prefixes ge/gt/le/lt/eq"),
                                     sp("status", "token", "free | busy | busy-unavailable | busy-tentative"),
                                     sp("schedule", "reference", "Schedule/<id>"),
                                     sp("service-type", "token", "[system|]code"),
                                     sp("_count", "number", f"page size, at most {self.page_size}")]},
                    {"type": "Schedule", "interaction": [{"code": "read"}, {"code": "search-type"}],
                     "searchParam": [sp("_id", "token", "schedule id")]},
                    {"type": "Appointment",
                     "interaction": [{"code": "create"}, {"code": "read"}, {"code": "update"}, {"code": "patch"},
                                     {"code": "search-type"}],
                     "documentation": "create books the referenced Slot (201 booked, 409 refused, 202 pending); "
                                      "update or patch status to 'cancelled' cancels it.",
                     "searchParam": [sp("status", "token", "appointment status"), sp("_id", "token", "id")]},
                ],
            }],
        }

    # -- Slot and Schedule ------------------------------------------------------------------------------------
    def _count(self, query) -> tuple[int, int]:
        try:
            count = int(query.get("_count", [self.page_size])[-1])
            offset = int(query.get("_offset", ["0"])[-1])
        except ValueError:
            raise FhirError(400, "invalid", "_count and _offset must be whole numbers") from None
        if count < 0 or offset < 0:
            raise FhirError(400, "invalid", "_count and _offset must not be negative")
        return min(count, self.page_size), offset

    @staticmethod
    def _check_params(query, allowed: set[str]) -> None:
        unknown = sorted(set(query) - allowed - {"_format", "_pretty"})
        if unknown:
            raise FhirError(400, "not-supported", f"unsupported search parameter(s): {', '.join(unknown)}",
                            expression=unknown[0])

    def slot_search(self, query, base: str):
        self._check_params(query, {"start", "status", "schedule", "service-type", "_count", "_offset"})
        count, offset = self._count(query)
        kw: dict[str, Any] = {}
        for value in query.get("start", []):
            try:
                prefix, low, high = search_instant(value, self.tz)
            except ValueError as e:
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
        if statuses:
            kw["statuses"] = statuses
        schedules = [s.split("/")[-1] for v in query.get("schedule", []) for s in v.split(",") if s]
        if schedules:
            kw["schedule_ids"] = schedules
        services = [s.split("|")[-1] for v in query.get("service-type", []) for s in v.split(",") if s]
        if services:
            kw["service_codes"] = services
        rows = self.reader().search_slots(limit=count + 1, offset=offset, **kw)
        more = len(rows) > count
        resources = [slot_resource(r, self.tz) for r in rows[:count]]
        return 200, self._bundle(base, "Slot", resources, query, offset, count, more), {}

    def slot_read(self, slot_id: str):
        slot = self.reader().slot(slot_id)
        if slot is None:
            raise FhirError(404, "not-found", f"no Slot {slot_id!r}")
        return 200, slot_resource(slot, self.tz), {}

    def schedule_search(self, query, base: str):
        self._check_params(query, {"_id", "_count", "_offset"})
        ids = [s for v in query.get("_id", []) for s in v.split(",") if s]
        rows = self.reader().schedules()
        if ids:
            rows = [r for r in rows if r.id in ids]
        resources = [schedule_resource(r, self.tz) for r in rows]
        return 200, self._bundle(base, "Schedule", resources, query, 0, len(resources), False), {}

    def schedule_read(self, schedule_id: str):
        rows = self.reader().schedules(schedule_id)
        if not rows:
            raise FhirError(404, "not-found", f"no Schedule {schedule_id!r}")
        return 200, schedule_resource(rows[0], self.tz), {}

    @staticmethod
    def _bundle(base, rtype, resources, query, offset, count, more) -> dict:
        params = {k: v[-1] for k, v in query.items() if k not in ("_offset",)}
        links = [{"relation": "self", "url": f"{base}/{rtype}?{urlencode({**params, '_offset': offset})}"}]
        if more:
            links.append({"relation": "next",
                          "url": f"{base}/{rtype}?{urlencode({**params, '_count': count, '_offset': offset + count})}"})
        return {
            "resourceType": "Bundle",
            "type": "searchset",
            "link": links,
            "entry": [{"fullUrl": f"{base}/{rtype}/{r['id']}", "resource": r, "search": {"mode": "match"}}
                      for r in resources],
            **({"total": len(resources)} if not more and offset == 0 else {}),
        }

    # -- Appointment -----------------------------------------------------------------------------------------
    def _appointment_json(self, appt) -> dict:
        reader = self.reader()
        return appointment_resource(appt, reader.slot(appt.slot_id), self.tz,
                                    reader.appointment_identifiers(appt.id))

    @staticmethod
    def _location(base, appt) -> dict:
        return {"Location": f"{base}/Appointment/{appt.id}",
                "ETag": f'W/"{appt.version}"'}

    async def appointment_create(self, platform: str, body, base: str, http_request):
        request = booking_from_appointment(body)
        key = http_request.getHeader(b"idempotency-key")
        if key is not None:
            key = key.decode("utf-8", "replace").strip()
            if not 1 <= len(key) <= 255:
                raise FhirError(400, "invalid", "Idempotency-Key must be 1 to 255 characters")
        condition = self._if_none_exist(http_request.getHeader(b"if-none-exist"))
        request_hash = hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        try:
            appointment_id, how = await self.booking.book(platform, request, idempotency_key=key,
                                                          request_hash=request_hash, if_none_exist=condition)
        except SlotUnknown as e:
            raise FhirError(422, "not-found", str(e), "Appointment.slot") from None
        except SlotUnavailable as e:
            raise FhirError(409, "conflict", str(e), "Appointment.slot") from None
        except IdempotencyConflict as e:
            raise FhirError(422, "business-rule", str(e)) from None
        if how == "existing":  # FHIR conditional create: the match is returned, nothing is created
            appt = self.booking.appointment(platform, appointment_id)
            return 200, self._appointment_json(appt), self._location(base, appt)
        await self.booking.wait_settled(appointment_id, self.answer_within)
        appt = self.booking.appointment(platform, appointment_id)
        resource_json = self._appointment_json(appt)
        if appt.status == "booked":
            return 201, resource_json, self._location(base, appt)
        if appt.status == "pending":
            return 202, resource_json, self._location(base, appt)
        raise FhirError(409, "conflict", f"the booking was not made: {appt.outcome}", "Appointment.slot",
                        headers={"Content-Location": self._location(base, appt)["Location"]})

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

    def appointment_read(self, platform: str, appointment_id: str):
        try:
            appt = self.booking.appointment(platform, appointment_id)
        except AppointmentUnknown as e:
            raise FhirError(404, "not-found", str(e)) from None
        return 200, self._appointment_json(appt), {"ETag": f'W/"{appt.version}"'}

    def appointment_search(self, platform: str, query, base: str):
        self._check_params(query, {"status", "_id", "_count", "_offset"})
        count, _ = self._count(query)
        rows = self.reader().appointments_for(platform, limit=1000)
        statuses = {s for v in query.get("status", []) for s in v.split(",") if s}
        ids = {s for v in query.get("_id", []) for s in v.split(",") if s}
        resources = []
        for appt in rows:
            res = self._appointment_json(appt)
            if (statuses and res["status"] not in statuses) or (ids and appt.id not in ids):
                continue
            resources.append(res)
        return 200, self._bundle(base, "Appointment", resources[:count], query, 0, count, False), {}

    async def appointment_change(self, platform: str, appointment_id: str, method: str, body, base: str):
        try:
            current = self.booking.appointment(platform, appointment_id)
        except AppointmentUnknown as e:
            raise FhirError(404, "not-found", str(e)) from None
        wanted = self._wanted_status(method, body, appointment_id)
        current_status = self._appointment_json(current)["status"]
        if wanted == current_status:
            return 200, self._appointment_json(current), {"ETag": f'W/"{current.version}"'}
        if wanted != "cancelled":
            raise FhirError(422, "business-rule", "the only change a platform can make is status -> cancelled",
                            "Appointment.status")
        result = await self.booking.cancel(platform, appointment_id)
        if result == "sent":
            await self.booking.wait_settled(appointment_id, self.answer_within)
        appt = self.booking.appointment(platform, appointment_id)
        resource_json = self._appointment_json(appt)
        if resource_json["status"] == "cancelled":
            return 200, resource_json, {"ETag": f'W/"{appt.version}"'}
        if appt.pending_change == "cancel":
            return 202, resource_json, self._location(base, appt)
        raise FhirError(409, "conflict", f"the HIS did not cancel the appointment: {appt.outcome}",
                        "Appointment.status")

    @staticmethod
    def _wanted_status(method: str, body, appointment_id: str) -> str:
        if method == "PATCH" and isinstance(body, list):
            for op in body:
                if isinstance(op, dict) and op.get("path") == "/status" and op.get("op") in ("replace", "add"):
                    return str(op.get("value"))
            raise FhirError(422, "business-rule", "the patch must replace /status", "Appointment.status")
        if not isinstance(body, dict):
            raise FhirError(400, "structure", "the body must be an Appointment (or a JSON Patch for PATCH)")
        if method == "PUT":
            if body.get("resourceType") != "Appointment":
                raise FhirError(400, "invalid", "the body must be an Appointment resource")
            if body.get("id") not in (None, appointment_id):
                raise FhirError(400, "invalid", "the resource id does not match the URL", "Appointment.id")
        status = body.get("status")
        if not isinstance(status, str):
            raise FhirError(422, "required", "Appointment.status is required", "Appointment.status")
        return status
