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
    GET    /Appointment?patient=[system|]value&date=      the platform's own, by patient identifier and day
    POST   /Appointment/$find | $hold | $book             IHE ITI Scheduling (adapters/fhir/ihe.py)

The platform is the one whose configured certificate subject matches the client certificate presented in
the TLS handshake (the handshake itself already refused certificates not signed by the configured CA), or,
for a request with ``Authorization: Bearer <token>``, the platform the token was issued to at
``POST /oauth/token`` (outside the FHIR base; OAuth2 client credentials with a signed JWT assertion, decided
in gateway/oauth.py).  A certificate is then refused (403 ``security``) when its serial is revoked in the
config, the CRL lists it, or the platform pins another public key; a bad or expired token is 401 with
``WWW-Authenticate: Bearer error="invalid_token"``, and a request with neither is 401 ``login``.

What a platform is granted (docs/security.md), checked in this order on every request: the global rate
limit (429), a registered and unrevoked certificate (403 ``security``), the platform's rate limit (429
``throttled`` with Retry-After), the route (404/405), the platform's scopes (403 ``forbidden``) — all of
these when the headers are in, before the body is read (:meth:`FhirApi.admit`, asked by the HTTP channel,
adapters/fhir/channel.py) — the body's size (413), then the request itself: JSON within depth, string and
number limits, with no key named twice and no lone surrogate, NUL or other control character FHIR text may
not hold (400), slots only within the platform's quota (a free slot it may not book is not shown; booking
past the quota is 409 ``business-rule``), and only its own appointments (another platform's is 404, like one
that does not exist).  Log events name a request by its route template (``/fhir/Appointment/{id}``), never its
path.  Every access to patient data and every refusal is audited (gateway/audit.py): an Appointment read or
search is answered only after its audit record is committed; a booking or cancellation is audited in the
transaction that makes it.  References inside resources are never fetched.

Every error is an OperationOutcome: 400 unreadable request, 403 unknown platform or missing scope, 404
unknown resource, 405 method, 409 conflict, 413 body too large, 415 media type (XML too), 422 valid FHIR
we cannot act on, 429 over a rate limit, 500 (never with internals), 503 chamber unavailable (and the HTTP
channel's own: 408, 414, 417, 431, 501).  The handler never lets an exception escape to twisted.web.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import math
import re
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, get_args
from urllib.parse import parse_qs, urlencode
from zoneinfo import ZoneInfo

import structlog
from twisted.internet import defer
from twisted.web import resource, server

from adapters.fhir.pharmacy import PHARMACY_TYPES, PharmacyApi
from adapters.mapping.fhir_scheduling import (
    FHIR_VERSION,
    InvalidResource,
    appointment_resource,
    booking_from_appointment,
    schedule_resource,
    search_instant,
    slot_resource,
)
from adapters.fhir import ihe
from gateway.audit import AuditEntry, ResourceNames
from gateway.config import Scope
from gateway.booking import HoldUnanswered, PatientRequired
from gateway.patients import IdentifierRefused
from gateway.errors import ChamberError
from gateway.oauth import ALGORITHMS as OAUTH_ALGORITHMS
from gateway.oauth import TOKEN_PATH, InvalidToken, OAuthError
from gateway.quota import QuotaExhausted
from gateway.scheduling import AppointmentUnknown, IdempotencyConflict, Overloaded, SlotUnavailable, SlotUnknown

#: [base]/.well-known/smart-configuration, as path segments below the FHIR base
SMART_CONFIGURATION = (b".well-known", b"smart-configuration")
log = structlog.get_logger("gateway.outer")

FHIR_JSON = b"application/fhir+json; charset=utf-8"
_HOST = re.compile(rb"^[A-Za-z0-9.\-\[\]:]{1,255}$")
SLOT_STATUSES = ("free", "busy", "busy-unavailable", "busy-tentative", "entered-in-error")
ALL_SCOPES = frozenset({"Slot.read", "Schedule.read", "Appointment.read", "Appointment.write"})
MAX_OFFSET = 1_000_000
MAX_QUERY_FIELDS = 100
MAX_SAFE_INTEGER = 2 ** 53
JSON_TYPES = (b"application/fhir+json", b"application/json", b"application/json-patch+json",
              b"application/merge-patch+json")
#: the resource types a route names, and the other fixed words of routes: what a logged route template
#: keeps of a path (everything else in a path is an id, or whatever a client put there)
ROUTE_TYPES = frozenset({b"Slot", b"Schedule", b"Appointment", *(t.encode() for t in PHARMACY_TYPES)})
ROUTE_WORDS = ROUTE_TYPES | {b"metadata", b"_history", b"$claim", *(f"${name}".encode() for name in ihe.OPERATIONS),
                             *SMART_CONFIGURATION}
MAX_TEMPLATE_SEGMENTS = 8


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


@dataclass(frozen=True)
class PlatformGrant:
    """What the hospital grants a platform on the outer gate."""

    scopes: frozenset = ALL_SCOPES
    revoked_serials: frozenset = frozenset()  # certificate serial numbers (int) no longer accepted
    spki_pins: frozenset = frozenset()  # SHA-256 digests of accepted SubjectPublicKeyInfos (empty: any key)


def spki_sha256(certificate) -> bytes:
    """SHA-256 of a (cryptography) certificate's SubjectPublicKeyInfo, as pinned in certificate_spki_sha256."""
    from cryptography.hazmat.primitives import serialization

    return hashlib.sha256(certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).digest()


def _raw_body(request) -> bytes | None:
    """The request body exactly as received (kept in the chamber with what it created)."""
    content = request.content
    return content.getvalue() if hasattr(content, "getvalue") else None


class PlatformDirectory:
    """Client certificate subject -> platform name; platform name -> its grant; whether a certificate is
    still accepted (revoked serials, the CRL, SPKI pins)."""

    def __init__(self, platforms: list[tuple[str, tuple]], grants: dict[str, PlatformGrant] | None = None,
                 crl=None):
        # platforms: (name, normalised subject) pairs; a subject of only a CN matches on the CN
        self._platforms = platforms
        self._grants = grants or {}
        self.crl = crl  # adapters.mllp.tls.RevocationList (None: no CRL configured)
        self._crl_expiry_logged = False

    @classmethod
    def from_config(cls, platforms, crl=None) -> "PlatformDirectory":
        from gateway.config import normalise_subject

        return cls([(p.name, normalise_subject(p.certificate_subject)) for p in platforms],
                   {p.name: PlatformGrant(frozenset(p.scopes), p.revoked_serial_numbers(), p.spki_pins())
                    for p in platforms}, crl)

    def certificate_refusal(self, platform: str, certificate, now: float) -> str | None:
        """Why ``platform``'s client certificate (a cryptography certificate) is refused, or None."""
        grant = self.grant(platform)
        serial = format(certificate.serial_number, "X")
        if certificate.serial_number in grant.revoked_serials:
            return f"this client certificate (serial {serial}) has been revoked"
        if self.crl is not None:
            if not self._crl_expiry_logged and self.crl.expired(now):
                self._crl_expiry_logged = True
                log.error("outer.crl_expired", crl=self.crl.path, next_update=self.crl.next_update.isoformat(),
                          hint="publish a fresh CRL and send SIGHUP; the expired one is still applied")
            if self.crl.is_revoked(certificate):
                return f"this client certificate (serial {serial}) has been revoked (CRL)"
        if grant.spki_pins and spki_sha256(certificate) not in grant.spki_pins:
            return f"this client certificate's public key is not the one pinned for platform {platform!r}"
        return None

    def grant(self, platform: str) -> PlatformGrant:
        return self._grants.get(platform, PlatformGrant())

    def identify(self, subject_pairs: tuple) -> str | None:
        subject = tuple(sorted(subject_pairs))
        cn = tuple(p for p in subject if p[0] == "CN")
        for name, wanted in self._platforms:
            if wanted == subject or (all(k == "CN" for k, _ in wanted) and wanted == cn):
                return name
        return None


def _tls_transport(request):
    return getattr(request.channel, "transport", None) or request.transport


def peer_certificate(request):
    get = getattr(_tls_transport(request), "getPeerCertificate", None)
    return get() if get is not None else None


@dataclass(frozen=True)
class PeerIdentity:
    """A connection's client certificate, read once: the certificate (cryptography), its subject as
    (attribute, value) pairs and its serial in hex."""

    certificate: Any
    subject: tuple
    serial: str


#: per TLS connection (its transport): the peer's identity, read at its first request.  Safe to keep for the
#: connection's life because the listeners refuse renegotiation (TlsSwitch), the only way a peer could
#: present another certificate on the same connection.
_peer_identities: "weakref.WeakKeyDictionary[Any, PeerIdentity]" = weakref.WeakKeyDictionary()


def peer_identity(request) -> PeerIdentity | None:
    transport = _tls_transport(request)
    try:
        known = _peer_identities.get(transport)
    except TypeError:  # a transport that cannot be weakly referenced: read it every time
        known, transport = None, None
    if known is not None:
        return known
    cert = peer_certificate(request)
    if cert is None:
        return None
    certificate = cert.to_cryptography()
    identity = PeerIdentity(certificate,
                            tuple((a.rfc4514_attribute_name.upper(), str(a.value)) for a in certificate.subject),
                            format(certificate.serial_number, "X"))
    if transport is not None:
        _peer_identities[transport] = identity
    return identity


def _subject_text(pairs: tuple) -> str:
    return ",".join(f"{k}={v}" for k, v in pairs)


def _source(request) -> str | None:
    try:
        return getattr(request.getClientAddress(), "host", None)
    except Exception:  # an in-memory transport without an address
        return None


@dataclass
class Access:
    """What the audit needs to know about one request, filled in as the request is understood."""

    platform: str | None = None
    subject: str | None = None
    serial: str | None = None
    source: str | None = None
    action: str = "access"
    resource_type: str | None = None
    resource_id: str | None = None
    patient_data: bool = False  # the answer carries patient data: audited (and committed) before it is sent
    recorded: bool = False  # already audited in the transaction that made the change
    detail: str | None = None

    def who(self) -> AuditEntry:
        return AuditEntry(action=self.action, outcome=0, platform=self.platform, subject=self.subject,
                          serial=self.serial, source=self.source)

    def entry(self, status: int, issue_code: str | None, name: ResourceNames) -> AuditEntry:
        """The record: the resource as ``name`` gives it (its id when the chamber holds it, else a keyed
        hash of whatever the request gave: no identifier a platform put in a URL is kept in clear)."""
        detail = self.detail
        if status >= 400:  # a refusal: its issue code, and what the handler noted (e.g. the failed check)
            detail = f"{issue_code}: {self.detail}" if issue_code and self.detail else (issue_code or self.detail)
        return AuditEntry(action=self.action, outcome=status, platform=self.platform, subject=self.subject,
                          serial=self.serial, source=self.source, resource_type=self.resource_type,
                          resource_id=name(self.resource_type, self.resource_id), detail=detail)


class _RepeatedKey(dict):
    """A JSON object whose text names ``key`` more than once (refused by :meth:`JsonLimits._check`, which
    knows where the object is)."""

    key: str


def _object(pairs: list) -> dict:
    """json's object_pairs_hook: the object, or a _RepeatedKey saying which key came twice."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set = set()
        repeated = _RepeatedKey(obj)
        repeated.key = next(k for k, _ in pairs if k in seen or seen.add(k))
        return repeated
    return obj


#: text a FHIR string may not hold (characters below U+0020 other than TAB, LF and CR), and lone UTF-16
#: surrogates (JSON can write one as an escape; it is no character, cannot be stored nor encoded)
_UNFIT_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff]")
_MEMBER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def _expression(path: tuple) -> str:
    """Where in the body ``path`` (keys and indexes from the root) is, FHIRPath style:
    ``Appointment.contained[0].name[0].family``.  Stops before a key that is no plain element name (it
    could be anything the client wrote)."""
    out = ""
    for step in path:
        if isinstance(step, int):
            out += f"[{step}]"
        elif _MEMBER_NAME.match(step):
            out += f".{step}" if out else step
        else:
            break
    return out


class JsonLimits:
    """Parse a JSON body, refusing what would cost too much to hold or to pass on: nesting deeper than
    ``max_depth``, strings (values or keys) longer than ``max_chars``, integers beyond 2^53 (not exact in
    JavaScript or a double), numbers written with more than 64 characters, NaN/Infinity; and what the
    gateway could not keep or pass on faithfully: a key named twice in one object (which one counts?),
    lone surrogates, NUL and the other control characters FHIR strings may not hold.  Refusals name the
    element (``expression``) where the body says what it is."""

    def __init__(self, max_depth: int = 32, max_chars: int = 65536):
        self.max_depth = max_depth
        self.max_chars = max_chars

    @staticmethod
    def _number(text: str):
        if len(text) > 64:
            raise FhirError(400, "too-long", "a number in the body is written with more than 64 characters")
        if any(c in text for c in ".eE"):
            value = float(text)
            if not math.isfinite(value) or abs(value) > MAX_SAFE_INTEGER:
                raise FhirError(400, "invalid", "a number in the body is beyond 2^53")
            return value
        value = int(text)
        if abs(value) > MAX_SAFE_INTEGER:
            raise FhirError(400, "invalid", "an integer in the body is beyond 2^53")
        return value

    @staticmethod
    def _constant(text: str):
        raise FhirError(400, "structure", f"the body is not valid JSON: {text} is not a JSON value")

    def parse(self, data: bytes) -> Any:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise FhirError(400, "structure", "the body is not UTF-8") from None
        try:
            value = json.loads(text, parse_int=self._number, parse_float=self._number,
                               parse_constant=self._constant, object_pairs_hook=_object)
        except RecursionError:
            raise FhirError(400, "too-costly", f"the body is nested deeper than {self.max_depth} levels") from None
        except json.JSONDecodeError as e:
            raise FhirError(400, "structure", f"the body is not valid JSON: {e}") from None
        self._check(value)
        return value

    def _check(self, value) -> None:
        root = value.get("resourceType") if isinstance(value, dict) else None
        stack = [(value, 1, (None, root) if isinstance(root, str) else None)]  # path: (parent path, step)
        while stack:
            item, depth, path = stack.pop()
            if isinstance(item, str):
                self._check_text(item, "a string", path)
            elif isinstance(item, (dict, list)):
                if depth > self.max_depth:
                    raise FhirError(400, "too-costly", f"the body is nested deeper than {self.max_depth} levels")
                if isinstance(item, _RepeatedKey):
                    raise FhirError(400, "invalid", f"the body names the key {item.key[:64]!r} more than once in "
                                                    f"one object", self._where(path))
                if isinstance(item, dict):
                    for k, v in item.items():
                        self._check_text(k, "a key", path)
                        stack.append((v, depth + 1, (path, k)))
                else:
                    stack.extend((v, depth + 1, (path, i)) for i, v in enumerate(item))

    def _check_text(self, text: str, what: str, path) -> None:
        if len(text) > self.max_chars:
            raise FhirError(400, "too-long", f"{what} in the body is longer than {self.max_chars} characters")
        unfit = _UNFIT_TEXT.search(text)
        if unfit is not None:
            code = ord(unfit.group())
            why = ("a lone UTF-16 surrogate, which is no character" if 0xD800 <= code <= 0xDFFF else
                   "a control character FHIR strings may not hold (below U+0020, only TAB, LF and CR are text)")
            raise FhirError(400, "invalid", f"{what} in the body holds U+{code:04X}: {why}", self._where(path))

    @staticmethod
    def _where(path) -> str | None:
        steps = []
        while path is not None:
            path, step = path
            steps.append(step)
        return _expression(tuple(reversed(steps))) or None


class FhirApi(resource.Resource):
    isLeaf = True

    def __init__(self, *, booking, reader: Callable[[], Any], platforms: PlatformDirectory, tz: ZoneInfo,
                 base_path: str, public_base_url: str | None, answer_within: float, page_size: int,
                 hospital_name: str, software_version: str, audit=None, quotas=None, rate_limiter=None,
                 json_limits: JsonLimits | None = None, clock=None, strict_audit: bool = False, prescriptions=None,
                 oauth=None):
        super().__init__()
        self.oauth = oauth  # gateway.oauth.TokenService (None: no bearer tokens, no /oauth/token)
        # prescriptions (gateway.prescribing.PrescriptionService; None: not served): adapters/fhir/pharmacy.py
        self.pharmacy = PharmacyApi(self, prescriptions) if prescriptions is not None else None
        self.audit = audit  # gateway.audit.AuditTrail (None: nothing is audited, for tests of other things)
        self.resource_names = ResourceNames(reader)  # how a record names the resource a request was about
        self.strict_audit = strict_audit  # unrecordable patient-data reads: 503 (True) or answered + logged
        self.quotas = quotas  # gateway.quota.Quotas (None: no platform is limited)
        self.rate_limiter = rate_limiter  # gateway.ratelimit.RateLimiter (None: no limits)
        self.json_limits = json_limits or JsonLimits()
        self.clock = clock  # folds a burst of 429 refusals into one audit record per second (None: no folding)
        self._folds: dict[tuple, list] = {}
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
        outside = self._outside_fhir(request)
        if outside is not None:
            return outside(request)
        if getattr(request, "gateway_admission", None) is None:  # (not decided before its body: see admit)
            self.admit(request)
        started = time.monotonic()
        gone = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = defer.ensureDeferred(self._dispatch(request))
        d.addErrback(self._unexpected, request)
        d.addCallback(self._audited, request)
        d.addErrback(self._unexpected, request)
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
        if status == 429 and self.clock is not None and self._fold(entry):
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

    def _unexpected(self, failure, request):
        if failure.check(FhirError):
            e = failure.value
            return e.status, operation_outcome(e.issues), e.headers
        if failure.check(ihe.ParameterError):
            e = failure.value
            return 400, operation_outcome([(e.code, str(e), e.name)]), {}
        if failure.check(IdentifierRefused):
            e = failure.value
            return 422, operation_outcome([("code-invalid", str(e), e.element)]), {}
        if failure.check(PatientRequired):
            return 422, operation_outcome([("required", failure.getErrorMessage(), "Appointment.participant")]), {}
        if failure.check(InvalidResource):
            e = failure.value
            return e.status, operation_outcome(e.issues), {}
        if failure.check(Overloaded):
            e = failure.value
            return 503, operation_outcome([("transient", str(e), None)]), {"Retry-After": str(e.retry_after)}
        if failure.check(QuotaExhausted):
            return 409, operation_outcome([("business-rule", failure.getErrorMessage(), "Appointment.slot")]), {}
        if failure.check(ChamberError):
            log.error("outer.chamber_unavailable", error=failure.getErrorMessage())
            return 503, operation_outcome([("transient", "the gateway cannot store requests right now; nothing "
                                            "was recorded, try again later", None)]), {"Retry-After": "30"}
        log.error("outer.internal_error", method=request.method.decode("ascii", "replace"),
                  error=failure.getErrorMessage(),
                  error_type=failure.type.__name__)
        return 500, operation_outcome([("exception", "internal error; the request was not completed", None)]), {}

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
        status, body, headers = result
        platform = getattr(request, "gateway_platform", None)
        log.info("outer.request", platform=platform, method=request.method.decode("ascii", "replace"),
                 path=self._route_template(request), status=status, ms=round((time.monotonic() - started) * 1000, 1))
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
    def _throttled(self, throttled, platform: str | None):
        if throttled is None:
            return
        whose = "the gateway's overall" if throttled.scope == "global" else f"platform {platform!r}'s"
        raise FhirError(429, "throttled", f"too many requests: over {whose} rate limit; retry after "
                                          f"{throttled.retry_after} s", headers={"Retry-After": str(throttled.retry_after)})

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
        if parts[:1] in (["Slot"], ["Schedule"], ["Appointment"]):
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

    def _outside_fhir(self, request):
        """The renderer of an endpoint served here outside the FHIR API (the OAuth2 token endpoint, the SMART
        configuration), or None."""
        if self.oauth is None:
            return None
        if request.path == TOKEN_PATH.encode():
            return self._render_token
        if request.path == b"/".join([b"", *self.base_parts, *SMART_CONFIGURATION]):
            return self._render_smart_configuration
        return None

    # -- admission: every decision that needs no body, taken once, before the body is read ---------------------
    def admit(self, request) -> bool:
        """Decide what a FHIR request's line, headers and connection decide — the checks of docs/security.md up to
        the scope, in their order — before its body is read: the outer gate's channel asks when the headers are
        in (a request that did not come that way is decided when rendered).  The outcome is kept on the request
        (``gateway_admission``: the handler that will answer it, or the refusal) and answered by
        :meth:`_dispatch` like any other.  True when the request is refused."""
        if self._outside_fhir(request) is not None:  # decided by their own renderers
            return False
        request.gateway_access = Access(source=_source(request))
        try:
            request.gateway_admission = self._admission(request, request.gateway_access)
        except Exception as e:  # a refusal (FhirError), or a fault answered as one (500) when it is dispatched
            request.gateway_admission = e
            return True
        return False

    def _admission(self, request, access: Access):
        parts = self._route(request, access)
        if self.rate_limiter is not None:
            self._throttled(self.rate_limiter.check_global(), None)
        platform, grant = self._authenticate(request, access)
        request.gateway_platform = platform
        if self.rate_limiter is not None:
            self._throttled(self.rate_limiter.check_platform(platform), platform)
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
        query = self._query(request)
        if parts == ["metadata"]:
            self._method(method, "GET")
            return lambda: (200, self.capability_statement(base), {})
        if self.pharmacy is not None and (not parts or parts[0] in PHARMACY_TYPES):
            return self.pharmacy.handler(parts, method, grant, platform, request, query, base, access)
        if not parts or parts[0] not in ("Slot", "Schedule", "Appointment"):
            raise FhirError(404, "not-supported", f"resource type {parts[0] if parts else '(none)'} is not served here")
        rtype, rest = parts[0], parts[1:]
        if rtype == "Appointment" and len(rest) == 1 and rest[0].startswith("$"):
            return self._operation(rest[0][1:], method, grant, platform, request, base)
        if len(rest) > 1:
            raise FhirError(404, "not-supported", "history and operations are not supported")
        if rtype == "Slot":
            self._method(method, "GET")
            self._scope(grant, platform, "Slot.read")
            if rest:
                return lambda: self.slot_read(platform, rest[0])
            return lambda: self.slot_search(platform, query, base)
        if rtype == "Schedule":
            self._method(method, "GET")
            self._scope(grant, platform, "Schedule.read")
            if rest:
                return lambda: self.schedule_read(rest[0])
            return lambda: self.schedule_search(query, base)
        if not rest:
            self._method(method, "GET", "POST")
            if method == "POST":
                self._scope(grant, platform, "Appointment.write")
                return lambda: self.appointment_create(platform, self._body(request), base, request)
            self._scope(grant, platform, "Appointment.read")
            return lambda: self.appointment_search(platform, query, base, access)
        self._method(method, "GET", "PUT", "PATCH")
        if method == "GET":
            self._scope(grant, platform, "Appointment.read")
            return lambda: self.appointment_read(platform, rest[0], access)
        self._scope(grant, platform, "Appointment.write")
        return lambda: self.appointment_change(platform, rest[0], method, self._body(request), base, access)

    # -- authentication: a bearer token, else the client certificate (docs/security.md) ----------------------
    def _authenticate(self, request, access: Access) -> tuple[str, PlatformGrant]:
        scheme, _, token = (request.getHeader(b"authorization") or b"").strip().partition(b" ")
        if self.oauth is not None and scheme.lower() == b"bearer":
            return self._bearer(token.strip(), access)
        identity = peer_identity(request)
        if identity is None:
            raise FhirError(401, "login", "authenticate with a client certificate, or with a bearer token from "
                                          "POST /oauth/token", headers={"WWW-Authenticate": 'Bearer realm="gatewayd"'})
        subject = identity.subject
        access.subject = _subject_text(subject)
        access.serial = identity.serial
        platform = self.platforms.identify(subject) if subject else None
        if platform is None:
            raise FhirError(403, "security", "this client certificate is not registered for any platform")
        access.platform = platform
        refusal = self.platforms.certificate_refusal(platform, identity.certificate,
                                                     self.clock.seconds() if self.clock is not None else time.time())
        if refusal is not None:
            raise FhirError(403, "security", refusal)
        return platform, self.platforms.grant(platform)

    def _bearer(self, token: bytes, access: Access) -> tuple[str, PlatformGrant]:
        try:
            bearer = self.oauth.authenticate(token.decode("ascii"))
        except (InvalidToken, UnicodeDecodeError) as e:
            reason = e.reason if isinstance(e, InvalidToken) else "unknown"
            text = e.description if isinstance(e, InvalidToken) else "the bearer token is malformed"
            raise FhirError(401, reason, text, headers={
                "WWW-Authenticate": f'Bearer realm="gatewayd", error="invalid_token", error_description="{text}"'
            }) from None
        access.platform, access.subject = bearer.platform, f"bearer:{bearer.token_id}"
        return bearer.platform, PlatformGrant(scopes=bearer.scopes)

    # -- the OAuth2 token endpoint: HTTP only, gateway/oauth.py decides -----------------------------------------
    def _render_token(self, request):
        started, gone = time.monotonic(), []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = defer.ensureDeferred(self._token(request))
        d.addErrback(self._token_failed)
        d.addCallback(self._json_respond, request, started, gone, TOKEN_PATH)
        return server.NOT_DONE_YET

    def _render_smart_configuration(self, request):
        """``GET [base]/.well-known/smart-configuration`` (SMART App Launch 2.x discovery, as SMART Backend
        Services clients use it): where the token endpoint is and what it takes.  No platform data, so no
        platform authentication beyond the TLS handshake; the global rate limit applies."""
        throttled = self.rate_limiter.check_global() if self.rate_limiter is not None else None
        if throttled is not None:
            result = 429, {"error": "too many requests"}, {"Retry-After": str(throttled.retry_after)}
        elif request.method not in (b"GET", b"HEAD"):
            result = 405, {"error": "the SMART configuration is read with GET"}, {"Allow": "GET"}
        else:
            result = 200, {
                "token_endpoint": self.oauth.token_url,
                "grant_types_supported": ["client_credentials"],
                "token_endpoint_auth_methods_supported": ["private_key_jwt"],
                "token_endpoint_auth_signing_alg_values_supported": list(OAUTH_ALGORITHMS),
                "scopes_supported": [f"system/{scope}" for scope in get_args(Scope)],
                "capabilities": ["client-confidential-asymmetric", "permission-v2"],
            }, {}
        path = "/" + "/".join(p.decode() for p in (*self.base_parts, *SMART_CONFIGURATION))
        self._json_respond(result, request, time.monotonic(), [], path, no_store=False)
        return server.NOT_DONE_YET

    async def _token(self, request):
        def refused(status, text, headers=None):
            return status, {"error": "invalid_request", "error_description": text}, headers or {}

        if self.rate_limiter is not None:  # this address's limit first: a flood spends its own tokens
            throttled = self.rate_limiter.check_source(_source(request)) or self.rate_limiter.check_global()
            if throttled is not None:
                return 429, {"error": "temporarily_unavailable", "error_description": "too many requests"}, \
                    {"Retry-After": str(throttled.retry_after)}
        if request.method != b"POST":
            return refused(405, "the token endpoint takes POST", {"Allow": "POST"})
        content = request.content
        if isinstance(content, BoundedContent) and content.overflow:
            return refused(413, f"the request body is larger than {content.limit} bytes")
        if (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower() != \
                b"application/x-www-form-urlencoded":
            return refused(400, "send the parameters as application/x-www-form-urlencoded")
        content.seek(0)
        try:
            form = parse_qs(content.read().decode("utf-8"), keep_blank_values=True, strict_parsing=True,
                            max_num_fields=20)
        except (UnicodeDecodeError, ValueError):
            return refused(400, "the form cannot be read")
        try:
            return 200, await self.oauth.token_request(form, _source(request)), {}
        except OAuthError as e:
            return e.status, e.body(), {}

    @staticmethod
    def _token_failed(failure):
        if failure.check(ChamberError):
            log.error("outer.chamber_unavailable", error=failure.getErrorMessage())
            return 503, {"error": "temporarily_unavailable", "error_description": "try again later"}, \
                {"Retry-After": "30"}
        log.error("outer.internal_error", error=failure.getErrorMessage(), error_type=failure.type.__name__)
        return 500, {"error": "server_error", "error_description": "internal error"}, {}

    @staticmethod
    def _json_respond(result, request, started, gone, path: str, no_store: bool = True):
        """A plain JSON answer (OAuth2 and SMART endpoints are not FHIR): status, body, headers."""
        status, body, headers = result
        log.info("outer.request", method=request.method.decode("ascii", "replace"), path=path,
                 status=status, ms=round((time.monotonic() - started) * 1000, 1))
        if gone:
            return
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        if no_store:
            request.setHeader(b"cache-control", b"no-store")
            request.setHeader(b"pragma", b"no-cache")
        for k, v in headers.items():
            request.setHeader(k.encode(), v.encode())
        request.write(json.dumps(body).encode("utf-8"))
        request.finish()

    @staticmethod
    def _scope(grant: PlatformGrant, platform: str, scope: str) -> None:
        if scope not in grant.scopes:
            raise FhirError(403, "forbidden", f"platform {platform!r} is not granted the scope {scope}")

    @staticmethod
    def _method(method: str, *allowed: str) -> None:
        if method not in allowed:
            raise FhirError(405, "not-supported", f"{method} is not allowed here (allowed: {', '.join(allowed)})",
                            headers={"Allow": ", ".join(allowed)})

    @staticmethod
    def _query(request) -> dict[str, list[str]]:
        raw = request.uri.split(b"?", 1)[1] if b"?" in request.uri else b""
        try:
            return parse_qs(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False,
                            max_num_fields=MAX_QUERY_FIELDS)
        except UnicodeDecodeError:
            raise FhirError(400, "invalid", "the query string is not UTF-8") from None
        except ValueError:
            raise FhirError(400, "too-costly", f"more than {MAX_QUERY_FIELDS} query parameters") from None

    def _body(self, request) -> Any:
        ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if ctype not in JSON_TYPES:
            what = "XML is not accepted" if b"xml" in ctype else "this media type is not accepted"
            raise FhirError(415, "not-supported", f"{what}: send application/fhir+json")
        request.content.seek(0)
        return self.json_limits.parse(request.content.read())

    def _base_url(self, request) -> str:
        """The base platforms address: the configured public URL, else this request's Host."""
        if self.public_base_url:
            return self.public_base_url.rstrip("/")
        path = "/" + b"/".join(self.base_parts).decode()
        host = request.getHeader(b"host") or b""
        return f"https://{host.decode('ascii')}{path}" if _HOST.match(host) else path

    # -- metadata --------------------------------------------------------------------------------------------
    def _security(self) -> dict:
        services = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                 "code": "Certificates"}]}]
        security = {"cors": False, "service": services,
                    "description": "Mutual TLS: each platform presents the client certificate registered for it."}
        if self.oauth is not None:
            services.append({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                         "code": "SMART-on-FHIR"}]})
            security["extension"] = [{"url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                                      "extension": [{"url": "token", "valueUri": self.oauth.token_url}]}]
            security["description"] += (" Or a bearer token from the token endpoint (SMART Backend Services: "
                                         "client credentials with a signed JWT assertion; discovery at "
                                         ".well-known/smart-configuration).")
        return security

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
                "security": self._security(),
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
                                      "update or patch status to 'cancelled' cancels it. IHE ITI Scheduling: "
                                      "$find (ITI-115), $hold (ITI-116, the HIS is not told), $book (ITI-117, "
                                      "200 booked, 202 pending, 409 refused; status 'cancelled' cancels).",
                     "searchParam": [sp("status", "token", "appointment status"), sp("_id", "token", "id"),
                                     sp("patient", "token", "the patient's identifier, [system|]value "
                                                            "(also patient:identifier)"),
                                     sp("date", "date", "the appointment's start, with prefixes ge/gt/le/lt/eq")],
                     "operation": [{"name": name, "definition": url,
                                    "documentation": doc} for name, url, doc in (
                         ("find", ihe.OPERATIONS["find"], "proposed Appointments for free slots (scope Slot.read)"),
                         ("hold", ihe.OPERATIONS["hold"], "hold a proposed appointment until outer.hold_expires "
                                                          "(scope Appointment.write)"),
                         ("book", ihe.OPERATIONS["book"], "book a held or proposed appointment through the HIS, "
                                                          "or cancel one (scope Appointment.write)"))]},
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
        return self._page(count, offset)

    def _page(self, count: int, offset: int) -> tuple[int, int]:
        """A page of a search (GET /Slot, $find): ``count`` at most ``page_size``, ``offset`` bounded."""
        if count < 0 or offset < 0:
            raise FhirError(400, "invalid", "_count and _offset must not be negative")
        if offset > MAX_OFFSET:
            raise FhirError(400, "too-costly", f"_offset must be at most {MAX_OFFSET}; narrow the search")
        return min(count, self.page_size), offset

    @staticmethod
    def _check_params(query, allowed: set[str]) -> None:
        unknown = sorted(set(query) - allowed - {"_format", "_pretty"})
        if unknown:
            raise FhirError(400, "not-supported", f"unsupported search parameter(s): {', '.join(unknown)}",
                            expression=unknown[0])

    def slot_search(self, platform: str, query, base: str):
        self._check_params(query, {"start", "status", "schedule", "service-type", "_count", "_offset"})
        count, offset = self._count(query)
        kw: dict[str, Any] = {}
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
        if statuses:
            kw["statuses"] = statuses
        schedules = [s.split("/")[-1] for v in query.get("schedule", []) for s in v.split(",") if s]
        if schedules:
            kw["schedule_ids"] = schedules
        services = [s.split("|")[-1] for v in query.get("service-type", []) for s in v.split(",") if s]
        if services:
            kw["service_codes"] = services
        reader = self.reader()
        if self.quotas is not None:  # free slots the platform may not book are not shown to it
            kw["hidden"] = self.quotas.hidden(reader, platform, reader.now)
        rows = reader.search_slots(limit=count + 1, offset=offset, **kw)
        more = len(rows) > count
        resources = [slot_resource(r, self.tz) for r in rows[:count]]
        return 200, self._bundle(base, "Slot", resources, query, offset, count, more), {}

    def slot_read(self, platform: str, slot_id: str):
        reader = self.reader()
        slot = reader.slot(slot_id)
        if slot is None:
            raise FhirError(404, "not-found", f"no Slot {slot_id!r}")
        if (self.quotas is not None and slot.visible_status == "free"
                and not self.quotas.may_book(reader, platform, slot, reader.now)):
            raise FhirError(404, "not-found", f"Slot {slot_id!r} is not offered to platform {platform!r} (its quota "
                                              f"for that schedule and day is used up)")
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
    def _bundle(base, rtype, resources, query, offset, count, more, path: str | None = None) -> dict:
        """A searchset page of ``rtype`` resources, with its self and next links to ``path`` (default the type)
        carrying every value of ``query`` (a repeated parameter stays repeated)."""
        path = path or rtype
        params = [(k, v) for k, values in query.items() if k not in ("_offset", "_count") for v in values]
        given = query.get("_count", [])[-1:]
        links = [{"relation": "self", "url": f"{base}/{path}?{urlencode([*params, *(('_count', c) for c in given), ('_offset', offset)])}"}]
        if more and count > 0:  # (_count=0 asks for no entries: nothing to page through)
            links.append({"relation": "next",
                          "url": f"{base}/{path}?{urlencode([*params, ('_count', count), ('_offset', offset + count)])}"})
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
            appointment_id, how = await self._slot_refusals(self.booking.book(
                platform, request, idempotency_key=key, request_hash=request_hash, if_none_exist=condition,
                who=access.who(), raw=_raw_body(http_request)))
        except IdempotencyConflict as e:
            raise FhirError(422, "business-rule", str(e)) from None
        access.resource_id = appointment_id
        access.recorded = how == "new"  # audited in the transaction that held the slot
        access.detail = None if how == "new" else f"{how} appointment returned"
        if how == "existing":  # FHIR conditional create: the match is returned, nothing is created
            appt = self.booking.appointment(platform, appointment_id)
            return 200, self._appointment_json(appt), self._location(base, appt)
        return await self._booking_answer(platform, appointment_id, base, 201, "the booking was not made")

    @staticmethod
    async def _slot_refusals(pending):
        """Await a booking service call that takes a slot (book, hold, reschedule); its refusals as the
        platform is told them."""
        try:
            return await pending
        except SlotUnknown as e:
            raise FhirError(422, "not-found", str(e), "Appointment.slot") from None
        except SlotUnavailable as e:
            raise FhirError(409, "conflict", str(e), "Appointment.slot") from None
        except QuotaExhausted as e:
            raise FhirError(409, "business-rule", str(e), "Appointment.slot") from None

    async def _booking_answer(self, platform: str, appointment_id: str, base: str, booked: int, not_made: str,
                              operation: str | None = None):
        """Wait up to outer.answer_within for the HIS, then answer with the appointment (in an operation's
        Bundle for IHE operations): ``booked`` (201 create, 200 $book), 202 still pending, else 409 saying
        ``not_made`` and why."""
        await self.booking.wait_settled(appointment_id, self.answer_within)
        appt = self.booking.appointment(platform, appointment_id)
        resource_json = self._appointment_json(appt)
        body = self._operation_bundle(base, operation, [resource_json]) if operation else resource_json
        if appt.status == "booked":
            return booked, body, self._location(base, appt)
        if appt.status == "pending":
            return 202, body, self._location(base, appt)
        raise FhirError(409, "conflict", f"{not_made}: {appt.outcome}", "Appointment.slot",
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

    def appointment_read(self, platform: str, appointment_id: str, access: Access | None = None):
        try:
            appt = self.booking.appointment(platform, appointment_id)
        except AppointmentUnknown as e:
            raise FhirError(404, "not-found", str(e)) from None
        if access is not None:
            access.patient_data = True
        return 200, self._appointment_json(appt), {"ETag": f'W/"{appt.version}"'}

    def appointment_search(self, platform: str, query, base: str, access: Access | None = None):
        self._check_params(query, {"status", "_id", "_count", "_offset", "patient", "patient:identifier", "date"})
        count, _ = self._count(query)
        statuses = {s for v in query.get("status", []) for s in v.split(",") if s}
        ids = {s for v in query.get("_id", []) for s in v.split(",") if s}
        patients = self._patient_tokens(query)
        dates = self._date_ranges(query)
        reader = self.reader()
        rows = reader.appointments_for(platform, limit=1000)  # only ever the platform's own
        resources = []
        for appt in rows:
            if patients is not None and not self._patient_matches(appt.patient, patients):
                continue
            if dates:
                slot = reader.slot(appt.slot_id)
                if slot is None or not all(low <= slot.start_ts < high for low, high in dates):
                    continue
            res = self._appointment_json(appt)
            if (statuses and res["status"] not in statuses) or (ids and appt.id not in ids):
                continue
            resources.append(res)
        resources = resources[:count]
        if access is not None:
            access.patient_data = True
            shown = [r["id"] for r in resources]
            access.detail = f"{len(shown)} result(s)" + (": " + ",".join(shown[:100]) if shown else "") + \
                (" ..." if len(shown) > 100 else "")
        return 200, self._bundle(base, "Appointment", resources, query, 0, count, False), {}

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
                system, bar, value = item.rpartition("|")
                if not value:
                    raise FhirError(400, "invalid", "patient: give the patient's identifier as [system|]value",
                                    "patient")
                tokens.append((system if bar else None, value))
        return tokens

    @staticmethod
    def _patient_matches(patient: dict, tokens) -> bool:
        for ident in patient.get("identifiers", []):
            for system, value in tokens:
                if ident.get("value") == value and (system is None or ident.get("system") == system):
                    return True
        return False

    def _date_ranges(self, query) -> list[tuple[float, float]]:
        """``date`` (the appointment's start), FHIR date search with prefixes: [(low, high)] to satisfy all."""
        out = []
        for value in query.get("date", []):
            try:
                prefix, low, high = search_instant(value, self.tz)
            except (ValueError, OverflowError) as e:
                raise FhirError(400, "invalid", f"date={value[:40]!r}: {e}", "date") from None
            ranges = {"eq": (low, high), "ge": (low, math.inf), "sa": (high, math.inf), "gt": (high, math.inf),
                      "le": (-math.inf, high), "lt": (-math.inf, low), "eb": (-math.inf, low)}
            if prefix not in ranges:
                raise FhirError(400, "not-supported", f"date={prefix}... is not supported", "date")
            out.append(ranges[prefix])
        return out

    async def appointment_change(self, platform: str, appointment_id: str, method: str, body, base: str,
                                 access: Access | None = None):
        access = access or Access(platform=platform)
        try:
            current = self.booking.appointment(platform, appointment_id)
        except AppointmentUnknown as e:
            raise FhirError(404, "not-found", str(e)) from None
        wanted = self._wanted_status(method, body, appointment_id)
        current_status = self._appointment_json(current)["status"]
        access.patient_data = True
        if wanted == current_status:
            access.action, access.detail = "update", f"no change (already {current_status})"
            return 200, self._appointment_json(current), {"ETag": f'W/"{current.version}"'}
        if wanted != "cancelled":
            access.action = "update"
            raise FhirError(422, "business-rule", "the only change a platform can make is status -> cancelled",
                            "Appointment.status")
        result = await self.booking.cancel(platform, appointment_id, who=access.who())
        access.recorded = result in ("sent", "cancelled")  # audited in the cancellation's transaction
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

    # -- IHE ITI Scheduling: $find, $hold, $book (adapters/fhir/ihe.py, docs/ihe-scheduling.md) -----------------
    def _operation(self, name: str, method: str, grant: PlatformGrant, platform: str, request, base: str):
        """An IHE operation's method and scope: its handler (see _handler)."""
        if name not in ihe.OPERATIONS:
            raise FhirError(404, "not-supported", f"operation ${name[:40]} is not supported on Appointment "
                                                  f"(supported: $find, $hold, $book)")
        if name == "find":  # POST a Parameters resource, or GET with the parameters in the query
            self._method(method, "POST", "GET")
            self._scope(grant, platform, "Slot.read")  # it shows slot availability, no patient data
            if method == "GET":
                return lambda: self.ihe_find(platform, None, base, self._query(request))
            return lambda: self.ihe_find(platform, self._body(request), base)
        self._method(method, "POST")
        self._scope(grant, platform, "Appointment.write")
        operation = self.ihe_hold if name == "hold" else self.ihe_book
        return lambda: operation(platform, self._body(request), base, request.gateway_access)

    @staticmethod
    def _operation_bundle(base: str, operation: str, resources: list[dict]) -> dict:
        return {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(resources),
            "link": [{"relation": "self", "url": f"{base}/Appointment/${operation}"}],
            "entry": [{**({"fullUrl": f"{base}/Appointment/{r['id']}"} if r.get("id") else {}),
                       "resource": r, "search": {"mode": "match"}} for r in resources],
        }

    def ihe_find(self, platform: str, body, base: str, query_string: dict[str, list[str]] | None = None):
        query = ihe.find_query(body, self.tz, query_string)
        count, offset = self._page(self.page_size if query.count is None else query.count, query.offset)
        resources, more = ihe.find(self.reader(), query, platform=platform, quotas=self.quotas, tz=self.tz,
                                   count=count, offset=offset)
        return 200, self._bundle(base, "Appointment", resources, query.to_query(self.tz), offset, count, more,
                                 path="Appointment/$find"), {}

    async def ihe_hold(self, platform: str, body, base: str, access: Access):
        access.patient_data = True
        what = ihe.hold_or_book(body, "hold")
        if what.appointment_id is not None:  # one of its own appointments: a repeated $hold
            try:
                appt = self.booking.appointment(platform, what.appointment_id)
            except AppointmentUnknown as e:
                raise FhirError(404, "not-found", str(e)) from None
            access.resource_id, access.detail = appt.id, "hold repeated"
            return self._hold_answer(base, appt)
        appointment_id = await self._slot_refusals(self.booking.hold(platform, what.slot_id, what.patient,
                                                                     who=access.who()))
        access.resource_id, access.recorded = appointment_id, True  # audited in the hold's transaction
        if self.booking.hold_at_his:  # the HIS is told of the hold (outer.hold_at_his): wait for its answer
            await self.booking.wait_settled(appointment_id, self.answer_within)
        return self._hold_answer(base, self.booking.appointment(platform, appointment_id))

    def _hold_answer(self, base: str, appt):
        """$hold's answer: 200 held, 202 held here while the HIS has not answered the hold yet
        (outer.hold_at_his), 409 not held (refused by the HIS, expired, cancelled, booked)."""
        if appt.status == "pending" and appt.pending_change in (None, "hold"):
            status = 200 if appt.pending_change is None else 202
            return status, self._operation_bundle(base, "hold", [self._appointment_json(appt)]), self._location(base, appt)
        raise FhirError(409, "conflict", f"appointment {appt.id} is not held ({appt.outcome or appt.status})",
                        "Appointment.status")

    async def ihe_book(self, platform: str, body, base: str, access: Access):
        access.patient_data = True
        what = ihe.hold_or_book(body, "book")
        if what.cancel:
            access.action = "cancel"
            status, resource_json, headers = await self.appointment_change(
                platform, what.appointment_id, "PATCH", {"status": "cancelled"}, base, access)
            return status, self._operation_bundle(base, "book", [resource_json]), headers
        if what.appointment_id is not None and what.slot_id is not None:
            try:
                current = self.booking.appointment(platform, what.appointment_id)
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
                how = await self.booking.book_held(platform, what.appointment_id, what.patient, who=access.who())
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
            appointment_id, how = await self._slot_refusals(self.booking.book(platform, what.booking_request(),
                                                                              who=access.who()))
        access.resource_id = appointment_id
        access.recorded = how == "new"  # audited in the transaction that queued the SRM^S01
        access.detail = None if how == "new" else "already booked or being booked"
        return await self._booking_answer(platform, appointment_id, base, 200, "the booking was not made", "book")

    async def _reschedule(self, platform: str, current, slot_id: str, base: str, access: Access):
        """$book of a booked appointment with another slot: cancel + new (BookingService.reschedule).  Answered
        like a booking of the new appointment; the old one is cancelled at the HIS once it accepted the new."""
        new_id = await self._slot_refusals(self.booking.reschedule(platform, current.id, slot_id, who=access.who()))
        access.resource_id, access.recorded = new_id, True
        return await self._booking_answer(platform, new_id, base, 200, "the appointment was not moved", "book")

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
