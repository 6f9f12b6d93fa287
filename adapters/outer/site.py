"""The outer gate: FHIR R4 over HTTPS (twisted.web), for registration and internet-hospital platforms.  This is
its web resource: it routes a request to the handler that answers it, keeps the audit trail of what was asked,
and writes the answers.

Served (base ``https://HOST:PORT/fhir``)::

    GET    /metadata, /$versions            CapabilityStatement (adapters/outer/capability.py); versions served
    GET    /Slot, /Schedule; /Appointment: search, read, create, change, _history  (adapters/outer/scheduling.py)
    GET    /Practitioner, /PractitionerRole, /HealthcareService, /Location: read-only, from the schedules
    POST   /Appointment/$find | $hold | $book             IHE ITI Scheduling (adapters/outer/ihe.py)
    POST   /MedicationRequest, POST / (a Bundle), ...     prescriptions (adapters/outer/pharmacy.py)
    POST   /oauth/token, GET .well-known/smart-configuration   outside the FHIR base (adapters/outer/oauth_http.py)

The platform is the one whose configured certificate subject matches the client certificate presented in
the TLS handshake (the handshake itself already refused certificates not signed by the configured CA), or,
for a request with ``Authorization: Bearer <token>``, the platform the token was issued to at
``POST /oauth/token`` (adapters/outer/access.py decides, adapters/outer/oauth.py for tokens).

What a platform is granted (docs/security.md), checked in this order on every request: the global rate
limit (429), a registered and unrevoked certificate (403 ``security``), the platform's rate limit (429
``throttled`` with Retry-After), the route (404/405), the platform's scopes (403 ``forbidden``) — all of
these when the headers are in, before the body is read (:meth:`FhirApi.admit`, asked by the HTTP channel,
adapters/outer/http.py) — the body's size (413), then the request itself: JSON within depth, string and
number limits, with no key named twice and no lone surrogate, NUL or other control character FHIR text may
not hold (400, adapters/outer/intake.py), slots only within the platform's quota (a free slot it may not book
is not shown; booking past the quota is 409 ``business-rule``), and only its own appointments (another
platform's is 404, like one that does not exist).  Log events name a request by its route template
(``/fhir/Appointment/{id}``), never its path.  Every access to patient data and every refusal is audited
(gateway/domain/audit.py): an Appointment read or search is answered only after its audit record is committed;
a booking or cancellation is audited in the transaction that makes it.  References inside resources are never
fetched.

Every error is an OperationOutcome (adapters/outer/errors.py): 400 unreadable request (or a parameter, header
or value the gateway would not honour), 401 no credentials, 403 unknown platform or missing scope, 404 unknown
resource, 405 method, 406 a media type or FHIR version not served, 409 conflict, 412 If-Match on another
version, 413 body too large, 415 media type (XML too), 422 valid FHIR we cannot act on, 429 over a rate limit,
500 (never with internals), 503 chamber unavailable (and the HTTP channel's own: 408, 414, 417, 431, 501).  The
handler never lets an exception escape to twisted.web.  The form of an answer (version, Prefer, 304 for
If-None-Match, HEAD) is adapters/outer/negotiation.py's.
"""

from __future__ import annotations

import inspect
import json
import re
import time
from typing import Any, Callable
from zoneinfo import ZoneInfo

import structlog
from twisted.internet import defer
from twisted.web import resource, server

from adapters.outer import ihe
from adapters.outer.access import Access, Gatekeeper, PlatformDirectory, PlatformGrant, source
from adapters.outer.capability import SMART_CONFIGURATION, capability_statement
from adapters.outer.errors import FHIR_JSON, REASONS, FhirError, failure_answer, operation_outcome
from adapters.outer.http import BoundedContent
from adapters.outer.negotiation import AnswerForm, answer_form, etag_matches, versions
from adapters.outer.intake import JsonLimits, parse_query, refuse_write_query, require_method
from adapters.outer.oauth_http import OAuthEndpoints
from adapters.outer.pages import Rendered
from adapters.outer.pharmacy import PHARMACY_TYPES, PharmacyApi
from adapters.outer.scheduling import RESOURCE_TYPES, SchedulingApi
from gateway.domain.audit import AuditEntry, ResourceNames

log = structlog.get_logger("gateway.outer")

_HOST = re.compile(rb"^[A-Za-z0-9.\-\[\]:]{1,255}$")
#: the resource types a route names, and the other fixed words of routes: what a logged route template
#: keeps of a path (everything else in a path is an id, or whatever a client put there)
ROUTE_TYPES = frozenset({*(t.encode() for t in RESOURCE_TYPES), *(t.encode() for t in PHARMACY_TYPES)})
ROUTE_WORDS = ROUTE_TYPES | {b"metadata", b"$versions", b"_history", b"$claim", *(f"${name}".encode() for name in ihe.OPERATIONS),
                             *SMART_CONFIGURATION, b"Subscription", b"$status", b"$events"}
MAX_TEMPLATE_SEGMENTS = 8


class FhirApi(resource.Resource):
    """The outer gate's twisted.web resource.  Its parts: the Gatekeeper (who may come in), the OAuth2 endpoints,
    and the handlers of the scheduling endpoints, the IHE operations and (with ``prescriptions``) the prescription
    endpoints; ``clock`` (the reactor) folds a burst of 429 refusals into one audit record per second."""

    isLeaf = True

    def __init__(self, *, booking, reader: Callable[[], Any], platforms: PlatformDirectory, tz: ZoneInfo,
                 base_path: str, public_base_url: str | None, answer_within: float, page_size: int,
                 hospital_name: str, software_version: str, clock, audit=None, quotas=None, rate_limiter=None,
                 json_limits: JsonLimits | None = None, strict_audit: bool = False, prescriptions=None,
                 oauth=None, subscriptions=None, slot_pages=None):
        super().__init__()
        json_limits = json_limits or JsonLimits()
        # oauth: adapters.outer.oauth.TokenService (None: no bearer tokens, no /oauth/token)
        self.gatekeeper = Gatekeeper(platforms, clock=clock, rate_limiter=rate_limiter, oauth=oauth)
        self.base_parts = [p.encode() for p in base_path.strip("/").split("/") if p]
        self.oauth_endpoints = OAuthEndpoints(self.gatekeeper, self.base_parts)
        # quotas: gateway.domain.quota.Quotas (None: no platform is limited)
        self.scheduling = SchedulingApi(booking, reader, tz=tz, quotas=quotas, answer_within=answer_within,
                                        page_size=page_size, json_limits=json_limits, slot_pages=slot_pages)
        self.ihe = ihe.IheApi(self.scheduling)
        # prescriptions (adapters.outer.pharmacy.Prescriptions; None: not served)
        self.pharmacy = PharmacyApi(prescriptions, answer_within=answer_within, page_size=page_size,
                                    json_limits=json_limits) if prescriptions is not None else None
        self.subscriptions = subscriptions  # adapters.outer.subscriptions.SubscriptionsApi (None: not served)
        self.audit = audit  # gateway.domain.audit.AuditTrail (None: nothing is audited, for tests of other things)
        self.resource_names = ResourceNames(reader)  # how a record names the resource a request was about
        self.strict_audit = strict_audit  # unrecordable patient-data reads: 503 (True) or answered + logged
        self.clock = clock
        self._folds: dict[tuple, list] = {}
        self.public_base_url = public_base_url
        self.page_size = page_size
        self.hospital_name = hospital_name
        self.software_version = software_version

    def reconfigure(self, *, platforms: PlatformDirectory, quotas, rate_limiter, oauth_clients,
                    token_url: str) -> None:
        """A reload's platforms, quotas, rate limits and token clients (gateway.service.reload), from the next
        request on."""
        self.gatekeeper.platforms, self.gatekeeper.rate_limiter = platforms, rate_limiter
        self.gatekeeper.oauth.clients, self.gatekeeper.oauth.token_url = oauth_clients, token_url
        self.scheduling.quotas = quotas

    # -- twisted.web entry ----------------------------------------------------------------------------------
    def render(self, request):
        outside = self.oauth_endpoints.renderer(request)
        if outside is not None:
            return outside(request)
        if getattr(request, "gateway_admission", None) is None:  # (not decided before its body: see admit)
            self.admit(request)
        started = time.monotonic()
        gone = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = defer.ensureDeferred(self._dispatch(request))
        d.addErrback(failure_answer, request)
        d.addCallback(self._audited, request)
        d.addErrback(failure_answer, request)
        d.addCallback(self._respond, request, started, gone)
        return server.NOT_DONE_YET

    # -- audit -------------------------------------------------------------------------------------------------
    def _audited(self, result, request):
        """Record the request in the audit trail if it touched patient data or was refused; the answer
        waits for the record's commit.  If the record cannot be committed, a refusal is answered anyway;
        patient data is refused with 503 under ``audit.strict``, else answered with the record written
        to the log instead (``audit.not_recorded``)."""
        status, body, _headers = result
        access: Access = request.gateway_access
        if self.audit is None or access.recorded or not (status >= 400 or access.patient_data):
            return result
        issue_code = None
        if status >= 400 and isinstance(body, dict) and body.get("issue"):
            issue_code = body["issue"][0].get("code")
        entry = access.entry(status, issue_code, self.resource_names)
        if status == 429 and self._fold(entry):
            return result
        d = self.audit.record(entry)

        def failed(failure):
            log.error("audit.not_recorded", error=failure.getErrorMessage(), audit_action=entry.action,
                      outcome=entry.outcome, platform=entry.platform, subject=entry.subject, serial=entry.serial,
                      source=entry.source, resource_type=entry.resource_type, resource_id=entry.resource_id,
                      detail=entry.detail)
            if status < 400 and self.strict_audit:
                return 503, operation_outcome([("transient", "the gateway cannot record this access right now; "
                                                "nothing was disclosed, try again later", None)]), {"Retry-After": "30"}
            return result

        return d.addCallbacks(lambda _row: result, failed)

    def _fold(self, entry: AuditEntry) -> bool:
        """429s from one platform and address within a second: the first is recorded at once, the rest are
        counted and recorded as one more record a second later.  Returns True when ``entry`` was folded."""
        key = (entry.platform, entry.subject, entry.source)
        fold = self._folds.get(key)
        if fold is not None:
            fold[1] += 1
            return True
        self._folds[key] = [entry, 0]
        self.clock.callLater(1.0, self._unfold, key)
        return False

    def _unfold(self, key) -> None:
        entry, more = self._folds.pop(key)
        if more:
            folded = AuditEntry(**{**entry.__dict__, "detail": f"throttled: {more} more request(s) refused within "
                                                              f"the second after the previous record",
                                   "resource_type": None, "resource_id": None, "action": "access"})
            self.audit.record(folded).addErrback(
                lambda f: log.error("audit.not_recorded", error=f.getErrorMessage(), audit_action="access",
                                    outcome=429, platform=entry.platform, source=entry.source, detail=folded.detail))

    # -- answering -------------------------------------------------------------------------------------------
    def _route_template(self, request) -> str:
        """The request's path as log events name it: the FHIR base, resource types, operations and other
        fixed words are kept; every other segment (an id, or whatever a client put there) becomes ``{id}``
        after a resource type or ``_history`` and ``{?}`` elsewhere, so that no identifier in a URL reaches
        the log: ``/fhir/Appointment/{id}``, ``/fhir/Appointment/$hold``, ``/{?}``.  At most
        MAX_TEMPLATE_SEGMENTS segments, then ``…``."""
        segments = [s for s in request.prepath + request.postpath if s]
        out, previous = [], b""
        for segment in segments[:MAX_TEMPLATE_SEGMENTS]:
            if segment in ROUTE_WORDS or segment in self.base_parts:
                out.append(segment.decode("ascii"))
            else:
                out.append("{id}" if previous in ROUTE_TYPES or previous == b"_history" else "{?}")
            previous = segment
        if len(segments) > MAX_TEMPLATE_SEGMENTS:
            out.append("…")
        return "/" + "/".join(out)

    def _respond(self, result, request, started, gone):
        status, body, headers = self._as_preferred(*result, request)
        platform = getattr(request, "gateway_platform", None)
        log.info("outer.request", platform=platform, method=request.method.decode("ascii", "replace"),
                 path=self._route_template(request), status=status, ms=round((time.monotonic() - started) * 1000, 1))
        if gone:
            return
        form = getattr(request, "gateway_form", None) or AnswerForm()
        request.setResponseCode(status, REASONS.get(status))
        request.setHeader(b"content-type", form.content_type())
        for k, v in headers.items():
            request.setHeader(k.encode(), v.encode())
        if body is None:
            data = b""
        elif isinstance(body, Rendered) and not form.pretty:  # (a kept page: its JSON written once)
            data = body.encoded()
        else:
            data = json.dumps(body, ensure_ascii=False, indent=2 if form.pretty else None).encode("utf-8")
        if status != 304:
            request.setHeader(b"content-length", b"%d" % len(data))
        if data and request.method != b"HEAD":  # (HEAD: the length a GET would have, no body)
            request.write(data)
        request.finish()

    @staticmethod
    def _as_preferred(status, body, headers, request):
        """The answer as the request's conditions and preferences shape it: 304 for a read whose If-None-Match
        names the current ETag; for a write's success, ``Prefer: return=minimal`` (no body) or
        ``return=OperationOutcome``."""
        form = getattr(request, "gateway_form", None)
        method = request.method
        if status == 200 and method in (b"GET", b"HEAD") and "ETag" in headers:
            condition = request.getHeader(b"if-none-match")
            if condition is not None and etag_matches(condition, headers["ETag"]):
                return 304, None, headers
        if form is not None and status < 300 and method in (b"POST", b"PUT", b"PATCH") and form.prefer_return:
            if form.prefer_return == "minimal":
                return status, None, headers
            if form.prefer_return == "OperationOutcome":
                what = body.get("resourceType", "request") if isinstance(body, dict) else "request"
                return status, operation_outcome([("informational", f"{what} answered with status {status}",
                                                   None)], severity="information"), headers
        return status, body, headers

    # -- routing ---------------------------------------------------------------------------------------------
    def _route(self, request, access: Access) -> list[str] | None:
        """The path below the FHIR base as text segments (None: not under the base); notes in ``access``
        what the request is about."""
        parts = request.postpath
        if request.prepath[: len(self.base_parts)] == self.base_parts:
            parts = request.prepath[len(self.base_parts):] + parts
        else:
            parts = (request.prepath + parts)
            if parts[: len(self.base_parts)] != self.base_parts:
                return None
            parts = parts[len(self.base_parts):]
        parts = [p.decode("utf-8", "replace") for p in parts if p]
        if parts[:1] and parts[0] in RESOURCE_TYPES:
            access.resource_type = parts[0]
            access.resource_id = parts[1] if len(parts) > 1 else None
            access.action = "read" if len(parts) > 1 else "search"
            if parts[0] == "Appointment":
                method = request.method.decode("ascii", "replace")
                access.action = {"POST": "book", "PUT": "cancel", "PATCH": "cancel"}.get(method, access.action)
            if len(parts) == 2 and parts[1].startswith("$"):  # an operation (IHE ITI Scheduling)
                access.resource_id = None
                access.action = {"$find": "search", "$hold": "hold", "$book": "book"}.get(parts[1], "access")
        return parts

    # -- admission: every decision that needs no body, taken once, before the body is read ---------------------
    def admit(self, request) -> bool:
        """Decide what a FHIR request's line, headers and connection decide — the checks of docs/security.md up to
        the scope, in their order — before its body is read: the outer gate's channel asks when the headers are
        in (a request that did not come that way is decided when rendered).  The outcome is kept on the request
        (``gateway_admission``: the handler that will answer it, or the refusal) and answered by
        :meth:`_dispatch` like any other.  True when the request is refused."""
        if self.oauth_endpoints.renderer(request) is not None:  # decided by their own renderers
            return False
        request.gateway_access = Access(source=source(request))
        try:
            request.gateway_admission = self._admission(request, request.gateway_access)
        except Exception as e:  # a refusal (FhirError), or a fault answered as one (500) when it is dispatched
            request.gateway_admission = e
            return True
        return False

    def _admission(self, request, access: Access):
        parts = self._route(request, access)
        if parts in (["metadata"], ["$versions"]) and self.gatekeeper.anonymous(request):
            # public, like SMART discovery: what the server is, no data (credentials presented are still checked)
            self.gatekeeper.admit_public()
            return self._handler(parts, request.method.decode("ascii", "replace"), PlatformGrant(), "", request,
                                 access)
        platform, grant = self.gatekeeper.admit(request, access)
        if parts is None:
            raise FhirError(404, "not-found", "not a FHIR endpoint of this gateway")
        return self._handler(parts, request.method.decode("ascii", "replace"), grant, platform, request, access)

    async def _dispatch(self, request):
        admission = request.gateway_admission
        if isinstance(admission, Exception):
            raise admission
        content = request.content
        if isinstance(content, BoundedContent) and content.overflow:
            raise FhirError(413, "too-long", f"the request body is larger than {content.limit} bytes")
        answer = admission()
        return await answer if inspect.isawaitable(answer) else answer

    def _handler(self, parts: list[str], method: str, grant: PlatformGrant, platform: str, request, access: Access):
        """The route (404), method (405) and scope (403) of a request: the handler that answers it, not called
        yet (it reads the body, if any, when it is)."""
        base = self._base_url(request)
        query = parse_query(request)
        request.gateway_form = form = answer_form(request, query, method)
        if method == "HEAD":  # answered as GET, without the body (twisted.web writes none)
            method = "GET"
        if method != "GET":
            refuse_write_query(query)
        if parts == ["metadata"]:
            require_method(method, "GET")
            return lambda: (200, self._capability_statement(base, form.fhir_version), {})
        if parts == ["$versions"]:
            require_method(method, "GET")
            return lambda: (200, versions(), {})
        if self.subscriptions is not None and parts[:1] == ["Subscription"]:
            return self.subscriptions.handler(parts, method, grant, platform, request, query, base, access)
        if self.pharmacy is not None and (not parts or parts[0] in PHARMACY_TYPES):
            return self.pharmacy.handler(parts, method, grant, platform, request, query, base, access)
        if not parts or parts[0] not in RESOURCE_TYPES:
            raise FhirError(404, "not-supported", f"resource type {parts[0] if parts else '(none)'} is not served here")
        if parts[0] == "Appointment" and len(parts) == 2 and parts[1].startswith("$"):
            return self.ihe.handler(parts[1][1:], method, grant, platform, request, query, base, access)
        return self.scheduling.handler(parts, method, grant, platform, request, query, base, access)

    def _capability_statement(self, base: str, fhir_version: str) -> dict:
        oauth = self.gatekeeper.oauth
        tokens = oauth is not None and bool(oauth.clients)  # (SMART only when some platform can get a token)
        return capability_statement(base, hospital_name=self.hospital_name, software_version=self.software_version,
                                    page_size=self.page_size, token_url=oauth.token_url if tokens else None,
                                    fhir_version=fhir_version, prescriptions=self.pharmacy is not None,
                                    subscriptions=self.subscriptions is not None)

    def _base_url(self, request) -> str:
        """The base platforms address: the configured public URL, else this request's Host."""
        if self.public_base_url:
            return self.public_base_url.rstrip("/")
        path = "/" + b"/".join(self.base_parts).decode()
        host = request.getHeader(b"host") or b""
        return f"https://{host.decode('ascii')}{path}" if _HOST.match(host) else path
