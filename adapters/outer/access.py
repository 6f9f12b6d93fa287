"""Who is asking on the outer gate, and whether they may come in (docs/security.md): the platforms and what each
is granted (:class:`PlatformDirectory`, :class:`PlatformGrant`), the client certificate a connection presented
(:func:`peer_identity`), the authentication of a request — a bearer token from ``POST /oauth/token``
(adapters/outer/oauth.py decides it), else the client certificate — its scopes, and the rate limits: the
:class:`Gatekeeper` takes these decisions for every request when its headers are in, before its body is read.
:class:`Access` notes what the audit needs to know about one request as it is understood.

A certificate is refused (403 ``security``) when it is registered for no platform, its serial is revoked in the
config, the CRL lists it, or the platform pins another public key; a bad or expired token is 401 with
``WWW-Authenticate: Bearer error="invalid_token"``, and a request with neither is 401 ``login``.  Over the global
or the platform's rate limit: 429 ``throttled`` with Retry-After.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass
from typing import Any

import structlog
from cryptography.hazmat.primitives import serialization

from adapters.outer.errors import FhirError
from adapters.outer.oauth import InvalidToken
from adapters.outer.ratelimit import Throttled
from gateway.config.outer import normalise_subject
from gateway.domain.audit import AuditEntry, ResourceNames

log = structlog.get_logger("gateway.outer")

ALL_SCOPES = frozenset({"Slot.read", "Schedule.read", "Appointment.read", "Appointment.write"})


@dataclass(frozen=True)
class PlatformGrant:
    """What the hospital grants a platform on the outer gate."""

    scopes: frozenset = ALL_SCOPES
    revoked_serials: frozenset = frozenset()  # certificate serial numbers (int) no longer accepted
    spki_pins: frozenset = frozenset()  # SHA-256 digests of accepted SubjectPublicKeyInfos (empty: any key)


def spki_sha256(certificate) -> bytes:
    """SHA-256 of a (cryptography) certificate's SubjectPublicKeyInfo, as pinned in certificate_spki_sha256."""
    return hashlib.sha256(certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).digest()


class PlatformDirectory:
    """Client certificate subject -> platform name; platform name -> its grant; whether a certificate is
    still accepted (revoked serials, the CRL, SPKI pins)."""

    def __init__(self, platforms: list[tuple[str, tuple]], grants: dict[str, PlatformGrant] | None = None,
                 crl=None):
        # platforms: (name, normalised subject) pairs; a subject of only a CN matches on the CN
        self._platforms = platforms
        self._grants = grants or {}
        self.crl = crl  # adapters.tls.RevocationList (None: no CRL configured)
        self._crl_expiry_logged = False

    @classmethod
    def from_config(cls, platforms, crl=None) -> "PlatformDirectory":
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


def source(request) -> str | None:
    """The client's address (None: an in-memory transport without one)."""
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


def require_scope(grant: PlatformGrant, platform: str, scope: str) -> None:
    """403 ``forbidden`` unless ``platform`` is granted ``scope``."""
    if scope not in grant.scopes:
        raise FhirError(403, "forbidden", f"platform {platform!r} is not granted the scope {scope}")


def _throttled(throttled: Throttled | None, platform: str | None) -> None:
    if throttled is None:
        return
    whose = "the gateway's overall" if throttled.scope == "global" else f"platform {platform!r}'s"
    raise FhirError(429, "throttled", f"too many requests: over {whose} rate limit; retry after "
                                      f"{throttled.retry_after} s", headers={"Retry-After": str(throttled.retry_after)})


class Gatekeeper:
    """The outer gate's access decisions: ``platforms`` (a PlatformDirectory), ``rate_limiter``
    (adapters.outer.ratelimit.RateLimiter; None: no limits) and ``oauth`` (adapters.outer.oauth.TokenService;
    None: no bearer tokens, no /oauth/token) are what a reload replaces; ``clock`` tells the CRL's expiry."""

    def __init__(self, platforms: PlatformDirectory, *, clock, rate_limiter=None, oauth=None):
        self.platforms = platforms
        self.rate_limiter = rate_limiter
        self.oauth = oauth
        self.clock = clock

    def admit(self, request, access: Access) -> tuple[str, PlatformGrant]:
        """The checks of docs/security.md before the route, in their order: the global rate limit (429), the
        platform's identity (401/403), the platform's rate limit (429).  The platform and what it is granted;
        the platform is also kept on the request (``gateway_platform``, for the log) once it is known."""
        if self.rate_limiter is not None:
            _throttled(self.rate_limiter.check_global(), None)
        platform, grant = self.authenticate(request, access)
        request.gateway_platform = platform
        if self.rate_limiter is not None:
            _throttled(self.rate_limiter.check_platform(platform), platform)
        return platform, grant

    @staticmethod
    def anonymous(request) -> bool:
        """The request presents no credentials: no client certificate, no Authorization header."""
        return request.getHeader(b"authorization") is None and peer_identity(request) is None

    def admit_public(self) -> None:
        """What a public document (the CapabilityStatement) asks of anyone: the global rate limit (429)."""
        if self.rate_limiter is not None:
            _throttled(self.rate_limiter.check_global(), None)

    def throttled_source(self, address: str | None) -> Throttled | None:
        """The token endpoint's rate limits, reached before anyone is authenticated: the source address's
        first (a flood spends its own tokens), then the global one."""
        if self.rate_limiter is None:
            return None
        return self.rate_limiter.check_source(address) or self.rate_limiter.check_global()

    def throttled_global(self) -> Throttled | None:
        return self.rate_limiter.check_global() if self.rate_limiter is not None else None

    # -- authentication: a bearer token, else the client certificate (docs/security.md) ----------------------
    def authenticate(self, request, access: Access) -> tuple[str, PlatformGrant]:
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
        refusal = self.platforms.certificate_refusal(platform, identity.certificate, self.clock.seconds())
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
