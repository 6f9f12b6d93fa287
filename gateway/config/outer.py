"""The outer gate's keys: ``outer`` (the FHIR API's listener, TLS, limits) and ``platforms`` (who may call it,
with which scopes, quotas, rate limits, certificates and tokens).

Part of :class:`gateway.config.model.GatewayConfig`; documented key by key like every section (``doc``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, Optional

from gateway.config.fields import Duration, Name, Pattern, Percent, Port, Range, ReadableFile, doc

Scope = Literal["Slot.read", "Schedule.read", "Appointment.read", "Appointment.write", "MedicationRequest.write",
                "MedicationRequest.read", "MedicationDispense.read", "MedicationRequest.claim"]
#: the scopes a platform gets when its config lists none (the prescription scopes of Scope only when listed)
SCOPES: tuple[str, ...] = ("Slot.read", "Schedule.read", "Appointment.read", "Appointment.write")
Serial = Annotated[str, Pattern(r"^(0[xX])?[0-9A-Fa-f]+(:[0-9A-Fa-f]+)*$",
                                "a certificate serial number in hexadecimal, as `openssl x509 -noout -serial` prints it")]


@dataclass(frozen=True)
class TlsConfig:
    certificate: ReadableFile = doc("The gateway's server certificate (PEM), with its chain.")
    private_key: ReadableFile = doc("The server certificate's private key (PEM).")
    client_ca: ReadableFile = doc(
        "CA certificate(s) (PEM) that sign platforms' client certificates; clients without one are refused "
        "(unless client_certificates: optional)."
    )
    client_certificates: Literal["required", "optional"] = doc(
        "'required': every client presents a certificate signed by client_ca, else the handshake fails (mutual "
        "TLS). 'optional': a certificate is asked for and checked when one is presented; a client without one "
        "(a platform behind a TLS-terminating proxy) must send a bearer token (platforms[].token) with every "
        "request, else 401. Certificate platforms work the same either way.",
        default="required",
    )
    crl: Optional[ReadableFile] = doc(
        "Certificate revocation list(s) of client_ca (PEM, one or more CRLs, or DER): a client certificate it "
        "lists is refused (403). Each CRL must be signed by a CA in client_ca. Re-read on SIGHUP; a CRL past "
        "its nextUpdate is still applied and logged as an error (outer.crl_expired).",
        default=None,
    )

    def __post_validate__(self):
        if self.crl is None:
            return []
        from adapters.tls import TlsConfigError, load_crl

        try:
            load_crl(self.crl, self.client_ca)
        except TlsConfigError as e:
            return [("crl", str(e))]
        return []


@dataclass(frozen=True)
class RateLimitConfig:
    per_second: Annotated[float, Range(0.001, 1_000_000)] = doc(
        "Requests per second allowed on average (the token bucket's refill rate)."
    )
    burst: Annotated[int, Range(1, 1_000_000)] = doc(
        "Most requests allowed at once after a quiet time (the token bucket's size)."
    )


@dataclass(frozen=True)
class OuterConfig:
    tls: TlsConfig = doc("TLS with mutual authentication: a platform presents a client certificate (or, with "
                         "client_certificates: optional, a bearer token).")
    host: str = doc("Address the FHIR API listens on (the internet-facing side).", default="127.0.0.1")
    port: Port = doc("Port of the FHIR API.", default=8443)
    base_path: Annotated[str, Pattern(r"^/[A-Za-z0-9/_-]*[A-Za-z0-9_-]$", "a path such as /fhir")] = doc(
        "Path of the FHIR base.", default="/fhir"
    )
    public_base_url: Optional[str] = doc(
        "The base URL platforms use (for Location headers and fullUrl), if a proxy changes it.", default=None
    )
    max_request_bytes: Annotated[int, Range(1024, 64 << 20)] = doc(
        "Largest request body accepted: a larger Content-Length is answered 413 before a byte of the body is read, "
        "a chunked body is cut off with 413 when it passes this size.", default=1 << 20
    )
    max_connections: Annotated[int, Range(1, 1_000_000)] = doc(
        "Most HTTPS connections open at once, from all addresses together; past it a new connection is closed at "
        "accept, before any TLS work. With the inner gate's connections it must fit the process's descriptor "
        "limit (the unit's LimitNOFILE), or the gateway refuses to start.",
        default=2048,
    )
    max_connections_per_address: Annotated[int, Range(1, 1_000_000)] = doc(
        "Most HTTPS connections open at once from one source address (an IPv6 /64 counts as one address); past "
        "it a new connection from that address is closed at accept. A platform behind NAT holds its pool of "
        "keep-alive connections from one address: leave room for it.",
        default=64,
    )
    tls_handshake_timeout: Annotated[Duration, Range(1, 300)] = doc(
        "Longest time from accepting a connection to the end of its TLS handshake; then the connection is cut.",
        default=Duration(10.0),
    )
    header_timeout: Annotated[Duration, Range(1, 300)] = doc(
        "Longest time from a request's first byte to the end of its headers, however the bytes trickle in; then "
        "408 and the connection is closed.",
        default=Duration(10.0),
    )
    body_timeout: Annotated[Duration, Range(1, 3600)] = doc(
        "Longest time to receive a request's whole body once its headers are in; then 408 and the connection is "
        "closed.",
        default=Duration(30.0),
    )
    idle_timeout: Annotated[Duration, Range(1, 3600)] = doc(
        "How long a connection may wait for its next request (or its first, after the TLS handshake); then it "
        "is closed.",
        default=Duration(60.0),
    )
    answer_within: Duration = doc(
        "How long a booking, a cancellation, an IHE $hold (with hold_at_his) or $book, or a prescription waits "
        "for the HIS's answer before answering 202 (it then completes in the background).",
        default=Duration(5.0),
    )
    hold_expires: Duration = doc(
        "How long a slot stays held (busy-tentative) waiting for the HIS, or after Appointment/$hold waiting "
        "for $book; then the hold is released (and the booking cancelled).",
        default=Duration(300.0),
    )
    hold_at_his: bool = doc(
        "Tell the HIS of an IHE $hold: $hold queues an SRM^S01 whose ARQ-8 is the hold_appointment_type "
        "(Tentative) of the HIS endpoint the booking is routed to, then waits up to answer_within for the HIS "
        "(200 held, 409 refused, 202 not answered yet); the hold is released at the HIS with the cancel message "
        "when it expires or is dropped. "
        "false: holds live in the gateway only and the HIS hears of nothing until $book.",
        default=False,
    )
    page_size: Annotated[int, Range(1, 1000)] = doc("Default and largest _count of a search.", default=100)
    bind_device: Optional[str] = doc(
        "Accept HTTPS connections only from this network interface (the internet/DMZ NIC), whatever the routing.",
        default=None,
    )
    his_name: Name = doc(
        "The HIS that outbound messages no route takes are addressed to (its inner.his.name; in split mode the "
        "outer gate knows only this name and the routes' endpoint names, never an address).",
        default="his",
    )
    max_backlog: Annotated[int, Range(1, 10_000_000)] = doc(
        "Most messages waiting for one HIS endpoint (each counted on its own); past it new bookings, or new "
        "prescriptions when the pharmacy endpoint is the one behind, get 503 with Retry-After.", default=1000
    )
    rate_limit: Optional[RateLimitConfig] = doc(
        "Requests per second for all platforms together (token bucket); past it 429 with Retry-After. "
        "Default 1000 per second, burst 2000; empty (~) for no global limit.",
        default_factory=lambda: RateLimitConfig(per_second=1000.0, burst=2000),
    )
    token_rate_limit: Optional[RateLimitConfig] = doc(
        "Requests per second to the OAuth2 token endpoint from one source address (token bucket), checked "
        "before the global limit: past it 429 with Retry-After, so one client flooding the endpoint cannot use up "
        "the global limit for everyone. Default 10 per second, burst 20; empty (~) for no such limit.",
        default_factory=lambda: RateLimitConfig(per_second=10.0, burst=20),
    )
    token_url: Optional[Annotated[str, Pattern(r"^https://[^\s/?#]+(/[^\s?#]*)?$", "an https:// URL")]] = doc(
        "The token endpoint's URL as platforms address it: client assertions must name it in 'aud'. The gateway "
        "serves it at /oauth/token. Default: the origin of public_base_url, else https://host:port, followed by "
        "/oauth/token.",
        default=None,
    )
    max_json_depth: Annotated[int, Range(2, 1000)] = doc(
        "Deepest nesting of objects and arrays accepted in a JSON body (400 beyond).", default=32
    )
    max_string_chars: Annotated[int, Range(256, 64 << 20)] = doc(
        "Longest string (value or key) accepted in a JSON body, in characters (400 beyond).", default=65536
    )


@dataclass(frozen=True)
class QuotaConfig:
    schedule: Annotated[str, Pattern(r"^(\*|[^\s*]{1,200})$", "a schedule id such as D001, or '*'")] = doc(
        "The schedule this quota applies to (its id, as in Schedule/<id>), or '*' for every schedule that "
        "has no entry of its own."
    )
    share: Optional[Percent] = doc(
        "The platform's share of the schedule's slots on each day, e.g. 5%: it may hold floor(share x slots "
        "of that schedule that day) of them. Give share or per_day, not both.",
        default=None,
    )
    per_day: Optional[Annotated[int, Range(0, 100_000)]] = doc(
        "How many of the schedule's slots the platform may hold per day (instead of share).", default=None
    )
    release_before: Optional[Duration] = doc(
        "Slots starting within this time from now are open to every platform, quota or not (unbooked quota "
        "returns to everyone). Empty (~): never released.",
        default=Duration(86400.0),
    )

    def __post_validate__(self):
        if (self.share is None) == (self.per_day is None):
            return [("", "give either share (e.g. 5%) or per_day (e.g. 10), not both or neither")]
        return []


SpkiPin = Annotated[str, Pattern(r"^([0-9A-Fa-f]{64}|[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){31}|[A-Za-z0-9+/]{43}=?)$",
                                 "the SHA-256 of a SubjectPublicKeyInfo, in base64 (44 characters) or hex (64)")]
JwsAlgorithm = Literal["RS384", "ES384", "RS256", "ES256"]


@dataclass(frozen=True)
class TokenConfig:
    public_keys: ReadableFile = doc(
        "The platform's public key(s) that verify its client assertions: a PEM file (PUBLIC KEY or CERTIFICATE "
        "blocks) or a JWKS file (JSON {\"keys\": [...]}, matched by the assertion's kid). Never a private key."
    )
    algorithms: list[JwsAlgorithm] = doc(
        "Signature algorithms the platform's assertions may use (SMART Backend Services: RS384, ES384).",
        default_factory=lambda: ["RS384", "ES384"],
    )
    lifetime: Annotated[Duration, Range(1, 300)] = doc(
        "How long an access token lasts (expires_in), at most 5 minutes.", default=Duration(300.0)
    )

    def __post_validate__(self):
        from adapters.outer.oauth import KeyFileError, load_public_keys

        issues = []
        if not self.algorithms:
            issues.append(("algorithms", "give at least one algorithm"))
        elif len(set(self.algorithms)) != len(self.algorithms):
            issues.append(("algorithms", "an algorithm is listed twice"))
        try:
            keys = load_public_keys(self.public_keys)
        except KeyFileError as e:
            issues.append(("public_keys", str(e)))
        else:
            if self.algorithms and not any(k.fits(alg) for k in keys for alg in self.algorithms):
                issues.append(("public_keys", f"no key in it fits {', '.join(self.algorithms)} (RS* need RSA keys "
                                              f"of 2048 bits or more, ES256 a P-256 key, ES384 a P-384 key)"))
        return issues


HttpsUrl = Annotated[str, Pattern(r"^https://[A-Za-z0-9.\-\[\]:]+(/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*)?$",
                                  "an https:// URL without query or fragment, e.g. https://platform.example/fhir-hook")]


@dataclass(frozen=True)
class NotifyConfig:
    endpoint: HttpsUrl = doc(
        "The platform's webhook (rest-hook) URL: every notification of its subscriptions is POSTed here, and only "
        "here (a Subscription's channel.endpoint must be absent or this URL; docs/subscriptions.md).")
    ca: ReadableFile = doc("CA certificate(s) (PEM) the endpoint's server certificate must chain to; its name "
                           "must match the URL's host.")
    client_certificate: ReadableFile = doc(
        "The gateway's TLS client certificate (PEM, with its chain) presented to the endpoint. Its key also signs "
        "each notification (X-Gatewayd-Signature: a detached JWS over the body).")
    client_key: ReadableFile = doc("The client certificate's private key (PEM, RSA or EC P-256).")
    timeout: Annotated[Duration, Range(1, 120)] = doc(
        "How long one delivery may take (connect, TLS, answer); past it the attempt failed.", default=Duration(10.0))
    retry_first: Annotated[Duration, Range(0.1, 3600)] = doc(
        "Wait after the first failed delivery; doubled after each failure up to retry_max.", default=Duration(1.0))
    retry_max: Annotated[Duration, Range(1, 86400)] = doc(
        "Longest wait between two deliveries of a notification.", default=Duration(300.0))
    give_up_after: Annotated[Duration, Range(1, 30 * 86400)] = doc(
        "A notification not delivered this long after it was committed is dead-lettered (state dead, visible to "
        "operators); the subscription's later notifications go on, and $events still serves it.",
        default=Duration(86400.0))
    max_subscriptions: Annotated[int, Range(1, 1000)] = doc(
        "Most subscriptions the platform may hold at once (POST /Subscription past it: 422).", default=10)

    def __post_validate__(self):
        from adapters.outer.delivery import SignerError, load_signer

        issues = []
        if self.retry_max < self.retry_first:
            issues.append(("retry_max", "must not be shorter than retry_first"))
        try:
            load_signer(self.client_certificate, self.client_key)
        except SignerError as e:
            issues.append(("client_key", str(e)))
        return issues


@dataclass(frozen=True)
class PlatformConfig:
    name: Name = doc("The platform's name (appears in the chamber and the logs).")
    certificate_subject: str = doc(
        "Subject of the platform's client certificate, RFC 4514 form, e.g. 'CN=platform-demo,O=gatewayd dev'. "
        "A subject with only a CN (e.g. 'CN=platform-demo') matches any certificate with that CN."
    )
    display: Optional[str] = doc("A human-readable name.", default=None)
    scopes: list[Scope] = doc(
        "What the platform may do: Slot.read, Schedule.read, Appointment.read (its own appointments), "
        "Appointment.write (book and cancel) — the default; and, only when listed, MedicationRequest.write "
        "(prescribe), MedicationRequest.read and MedicationDispense.read (its own prescriptions), "
        "MedicationRequest.claim (an outside pharmacy: list and claim released prescriptions). A request outside "
        "them gets 403.",
        default_factory=lambda: list(SCOPES),
    )
    quotas: list[QuotaConfig] = doc(
        "The platform's share of each schedule's slots (docs/security.md). A schedule with no quota here "
        "(and no '*' entry) is not limited.",
        default_factory=list,
    )
    rate_limit: Optional[RateLimitConfig] = doc(
        "Requests per second for this platform (token bucket); past it 429 with Retry-After. Default 100 "
        "per second, burst 200; empty (~) for no limit.",
        default_factory=lambda: RateLimitConfig(per_second=100.0, burst=200),
    )
    revoked_serials: list[Serial] = doc(
        "Serial numbers (hex) of this platform's client certificates that are no longer accepted (403), "
        "checked on every request; takes effect on SIGHUP.",
        default_factory=list,
    )
    certificate_spki_sha256: list[SpkiPin] = doc(
        "Pins: SHA-256 of the SubjectPublicKeyInfo (base64 or hex) of the platform's certificate key(s). When "
        "given, a certificate with the platform's subject but another key is refused (403); list two during a "
        "key change. Takes effect on SIGHUP.",
        default_factory=list,
    )
    token: Optional[TokenConfig] = doc(
        "Bearer tokens for this platform (OAuth2 client credentials with a signed JWT client assertion, SMART "
        "Backend Services), e.g. behind a TLS-terminating proxy. Its client_id is its name.",
        default=None,
    )
    notify: Optional[NotifyConfig] = doc(
        "Where and how the gateway delivers the notifications of the platform's subscriptions (FHIR "
        "Subscriptions, rest-hook; docs/subscriptions.md). Without it the platform cannot subscribe (422).",
        default=None,
    )

    def __post_validate__(self):
        issues = []
        seen: dict[str, int] = {}
        for i, q in enumerate(self.quotas):
            if q.schedule in seen:
                issues.append((f"quotas[{i}].schedule", f"schedule {q.schedule!r} has a quota already "
                                                        f"(quotas[{seen[q.schedule]}])"))
            seen[q.schedule] = i
        if len(set(self.scopes)) != len(self.scopes):
            issues.append(("scopes", "a scope is listed twice"))
        return issues

    def revoked_serial_numbers(self) -> frozenset[int]:
        return frozenset(serial_number(s) for s in self.revoked_serials)

    def spki_pins(self) -> frozenset[bytes]:
        """The pinned SubjectPublicKeyInfo SHA-256 digests (32 bytes each)."""
        import base64

        return frozenset(bytes.fromhex(p.replace(":", "")) if len(p) >= 64
                         else base64.b64decode(p + "=" * (-len(p) % 4)) for p in self.certificate_spki_sha256)


def serial_number(text: str) -> int:
    """'0x1A2B', '1a:2b' or '1A2B' (hex, as openssl prints it) -> the integer serial."""
    text = text.strip()
    if text[:2].lower() == "0x":
        text = text[2:]
    return int(text.replace(":", ""), 16)


def normalise_subject(subject: str) -> tuple[tuple[str, str], ...] | None:
    """'CN=a, O=b' -> (('CN','a'), ('O','b')) sorted; None when it is not of that form."""
    parts = []
    for piece in _split_rdns(subject):
        if "=" not in piece:
            return None
        k, v = piece.split("=", 1)
        k, v = k.strip().upper(), v.strip()
        if not k or not v:
            return None
        parts.append((k, v))
    if not parts:
        return None
    return tuple(sorted(parts))


def _split_rdns(subject: str) -> list[str]:
    out, cur, escaped = [], [], False
    for ch in subject:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch in ",+":
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if cur or out:
        out.append("".join(cur))
    return [p for p in (s.strip() for s in out) if p]
