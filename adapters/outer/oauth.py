"""Bearer tokens for platforms behind TLS-terminating proxies: OAuth2 client credentials with signed JWT
client assertions (SMART Backend Services, RFC 6749 section 4.4, RFC 7523), the decisions only.

A platform registered with ``token:`` settings (its public key(s), the algorithms it signs with, the token
lifetime) asks for a token with ``POST /oauth/token`` (outside the FHIR base; the HTTP handling is in
adapters/outer/oauth_http.py)::

    grant_type=client_credentials
    scope=system/Slot.read system/Appointment.write
    client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer
    client_assertion=<JWT signed with the platform's private key>

Its ``client_id`` is the platform's name. The assertion is read and its signature and registered claims
checked by ``joserfc`` (JWS, and ``JWTClaimsRegistry`` for sub, aud, exp, nbf, iat, jti), with the gateway's
policy on top (the algorithm allow-list, keys only from the config, the 5-minute limit, the jti store); every
failure of it is ``invalid_client`` (401), as RFC 7523 section 3.2 and SMART say:

================================  ================================================================
what                              refused when
================================  ================================================================
form                              a JWS compact serialization ``header.payload.signature`` of
                                  base64url parts, header and payload JSON objects (a member named
                                  twice is refused), at most 16 KiB; registered header parameters of
                                  their registered types
``alg``                           not one of RS384, ES384, RS256, ES256 -- so ``none`` and every
                                  ``HS*`` are refused before a key is looked at (an HMAC "signed"
                                  with the public key's bytes is the HS/RS confusion attack) -- or
                                  not among the platform's ``token.algorithms``
``crit``                          present (no critical extension is understood)
key                               the signature verifies with none of the platform's registered
                                  keys that fit ``alg`` (RSA of 2048 bits or more for RS*, P-256
                                  for ES256, P-384 for ES384) and, in a JWKS, match ``kid``. Keys
                                  are never taken from the header (``jwk``, ``jku``, ``x5c``,
                                  ``x5u`` are ignored) and nothing is ever fetched
``iss``, ``sub``                  not both the client id of a platform with ``token`` settings
``aud``                           does not name the token URL (``outer.token_url``)
``exp``                           absent, not a number, past, or more than 5 minutes ahead (10 s of
                                  clock skew allowed either way); ``nbf``/``iat`` not numbers or in
                                  the future. When several claims are wrong, the answer names one
``jti``                           absent, or already used by this platform: every jti is kept in
                                  the chamber (``oauth_assertions``) until its assertion expires,
                                  so a replay is refused after a restart too
================================  ================================================================

Then ``scope`` (``system/Slot.read``, SMART v2 letters ``system/Slot.rs`` (r/s: read, c/u/d: write), wildcards
``system/*.read`` and ``system/Appointment.*``, or the bare names ``Slot.read``) is intersected with the platform's configured ``scopes``; nothing left is
``invalid_scope`` (400). The token is 32 random bytes (base64url); only its SHA-256 is stored
(``oauth_tokens``) with the platform, the granted scopes and the expiry (``token.lifetime``, at most 300 s).
Other errors: a missing or repeated parameter is ``invalid_request``, a grant type other than
client_credentials ``unsupported_grant_type`` (both 400). ``invalid_grant`` is part of the vocabulary
(`OAuthError`) but never answered: every assertion problem is a client-authentication failure.

A FHIR request with ``Authorization: Bearer <token>`` is the token's platform, with the token's scopes
that the platform still holds in the running config (a SIGHUP that removes a scope, or the platform's
``token`` settings, takes effect on tokens already issued). An unknown or expired token is `InvalidToken`.

Issuing a token and its audit record (action ``token``) commit in one transaction, together with the jti;
refusals are audited as their own records. Tokens and assertions are never logged; the audit and the log
name a token by the first 16 hex digits of its SHA-256 only.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jws
from joserfc.errors import ClaimError, ExpiredTokenError, JoseError
from joserfc.jwk import ECKey, RSAKey
from joserfc.jwt import JWTClaimsRegistry
from joserfc.util import urlsafe_b64decode

from gateway.domain.audit import AuditEntry, AuditTrail, append
from gateway.chamber.errors import ChamberError

log = structlog.get_logger("adapters.outer.oauth")

__all__ = [
    "ALGORITHMS",
    "ASSERTION_TYPE",
    "TOKEN_PATH",
    "BearerGrant",
    "ClientKey",
    "InvalidToken",
    "KeyFileError",
    "OAuthClient",
    "OAuthError",
    "TokenService",
    "VerifiedAssertion",
    "clients_from_config",
    "default_token_url",
    "granted_scopes",
    "load_public_keys",
    "token_id",
    "verify_assertion",
]

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: JWS algorithms a client assertion may use: (key kind, EC curve name or least RSA bits)
ALGORITHMS: dict[str, tuple[str, Any]] = {
    "RS384": ("rsa", 2048),
    "ES384": ("ec", "secp384r1"),
    "RS256": ("rsa", 2048),
    "ES256": ("ec", "secp256r1"),
}
DEFAULT_ALGORITHMS = ("RS384", "ES384")  # what SMART Backend Services requires servers to support
MAX_ASSERTION_LIFETIME = 300.0  # an assertion's exp at most this far ahead (SMART: 5 minutes)
MAX_TOKEN_LIFETIME = 300.0
CLOCK_SKEW = 10.0  # seconds allowed between the platform's clock and ours, either way
MAX_ASSERTION_CHARS = 16 * 1024
MAX_KEY_FILE_BYTES = 1 << 20
EXPIRED_TOKENS_KEPT = 3600.0  # an expired token is answered "expired" (not "unknown") this long
_TOKEN = re.compile(r"^[A-Za-z0-9._~+/-]+=*$")  # RFC 6750 b64token
_JTI = re.compile(r"^[\x21-\x7e]{1,255}$")
#: joserfc's registry with our algorithms; an assertion may be up to 16 KiB in all (its header too); header
#: parameters joserfc does not know are ignored, as RFC 7515 says (crit is refused before)
_JWS = jws.JWSRegistry(algorithms=list(ALGORITHMS), strict_check_header=False)
_JWS.max_header_length = _JWS.max_payload_length = MAX_ASSERTION_CHARS


# ------------------------------------------------------------------------------------------------ errors


_STATUS = {"invalid_request": 400, "invalid_client": 401, "invalid_grant": 400, "unauthorized_client": 400,
           "unsupported_grant_type": 400, "invalid_scope": 400}


class OAuthError(Exception):
    """A token request refused, as RFC 6749 section 5.2 answers it: ``error`` (the code), ``description``
    (words for ``error_description``, never a secret), the HTTP status (401 for ``invalid_client``, else
    400), and the platform when the assertion's signature had already been verified (for the audit)."""

    def __init__(self, error: str, description: str, platform: str | None = None):
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.platform = platform
        self.status = _STATUS[error]

    def body(self) -> dict:
        return {"error": self.error, "error_description": self.description}


class InvalidToken(Exception):
    """A bearer token that does not authenticate: ``reason`` is ``unknown`` or ``expired``."""

    def __init__(self, reason: str, description: str):
        super().__init__(description)
        self.reason = reason
        self.description = description


class KeyFileError(ValueError):
    """A platform's key file that cannot be used (named with the reason)."""


# -------------------------------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class ClientKey:
    """One registered public key: ``kid`` (from a JWKS; None matches any kid), ``alg`` (a JWK's own
    ``alg``; None: whatever algorithm fits the key)."""

    key: Any
    kid: str | None = None
    alg: str | None = None

    def fits(self, alg: str) -> bool:
        if self.alg is not None and self.alg != alg:
            return False
        kind, param = ALGORITHMS[alg]
        if kind == "rsa":
            return isinstance(self.key, rsa.RSAPublicKey) and self.key.key_size >= param
        return isinstance(self.key, ec.EllipticCurvePublicKey) and self.key.curve.name == param


def _check_key(key, where: str):
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise KeyFileError(f"{where}: an RSA key of {key.key_size} bits; at least 2048 are needed")
        return key
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1"):
            raise KeyFileError(f"{where}: EC curve {key.curve.name} is not accepted (P-256 or P-384)")
        return key
    raise KeyFileError(f"{where}: a {type(key).__name__} is not accepted (RSA or EC P-256/P-384 keys)")


def _jwk_key(jwk: dict, where: str):
    """The public key of one JWK (read by joserfc), if it is one we accept."""
    kty = jwk.get("kty")
    if "d" in jwk or "p" in jwk or "k" in jwk:
        raise KeyFileError(f"{where} holds private or secret key material (d, p or k): register only the "
                           f"platform's public keys")
    if kty not in ("RSA", "EC"):
        raise KeyFileError(f"{where}: kty {kty!r} is not accepted (RSA or EC; never oct, a shared secret)")
    try:
        key = (RSAKey if kty == "RSA" else ECKey).import_key(jwk)
    except (JoseError, ValueError, TypeError, KeyError) as e:
        raise KeyFileError(f"{where}: not a valid {kty} public key ({e})") from None
    return _check_key(key.public_key, where)


def _jwks_keys(text: str, path: Path) -> list[ClientKey]:
    try:
        jwks = json.loads(text)
    except json.JSONDecodeError as e:
        raise KeyFileError(f"{path}: not JSON ({e})") from None
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
        raise KeyFileError(f"{path}: a JWKS is a JSON object with a 'keys' list")
    keys = []
    for i, jwk in enumerate(jwks["keys"]):
        where = f"{path}: keys[{i}]"
        if not isinstance(jwk, dict):
            raise KeyFileError(f"{where} is not a JSON object")
        key = _jwk_key(jwk, where)
        if jwk.get("use") not in (None, "sig"):
            continue  # an encryption key: not for assertions
        alg, kid = jwk.get("alg"), jwk.get("kid")
        if alg is not None and alg not in ALGORITHMS:
            raise KeyFileError(f"{where}: alg {alg!r} is not accepted ({', '.join(ALGORITHMS)})")
        if kid is not None and not isinstance(kid, str):
            raise KeyFileError(f"{where}: kid must be text")
        entry = ClientKey(key, kid, alg)
        if alg is not None and not entry.fits(alg):
            raise KeyFileError(f"{where}: the key does not fit its alg {alg}")
        keys.append(entry)
    return keys


_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL)


def _pem_keys(text: str, path: Path) -> list[ClientKey]:
    keys = []
    for i, match in enumerate(_PEM_BLOCK.finditer(text)):
        label, block = match.group(1), match.group(0).encode("ascii")
        where = f"{path}: PEM block {i + 1} ({label})"
        try:
            if label in ("PUBLIC KEY", "RSA PUBLIC KEY"):
                key = serialization.load_pem_public_key(block)
            elif label == "CERTIFICATE":
                key = x509.load_pem_x509_certificate(block).public_key()
            elif "PRIVATE KEY" in label:
                raise KeyFileError(f"{where} is a private key: register only the platform's public key")
            else:
                raise KeyFileError(f"{where}: expected PUBLIC KEY or CERTIFICATE")
        except ValueError as e:
            if isinstance(e, KeyFileError):
                raise
            raise KeyFileError(f"{where}: cannot be read ({e})") from None
        keys.append(ClientKey(_check_key(key, where)))
    return keys


def load_public_keys(path: str | Path) -> tuple[ClientKey, ...]:
    """The public keys in a PEM file (PUBLIC KEY or CERTIFICATE blocks) or a JWKS file (JSON); raises
    `KeyFileError` for a file that cannot be used: unreadable, neither form, a private key or a shared
    secret in it, an unaccepted key type or size, no key at all."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KeyFileError(f"{path}: cannot be read: {e.strerror or e}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{path}: larger than {MAX_KEY_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise KeyFileError(f"{path}: not text (give a PEM or a JWKS file)") from None
    if text.startswith("{"):
        keys = _jwks_keys(text, path)
    elif text.startswith("-----BEGIN"):
        keys = _pem_keys(text, path)
    else:
        raise KeyFileError(f"{path}: neither PEM (-----BEGIN PUBLIC KEY-----) nor a JWKS ({{\"keys\": [...]}})")
    if not keys:
        raise KeyFileError(f"{path}: no signing key in it")
    return tuple(keys)


# ---------------------------------------------------------------------------------------------- clients


@dataclass(frozen=True)
class OAuthClient:
    """A platform that may ask for tokens; its client id is its name."""

    platform: str
    keys: tuple[ClientKey, ...]
    algorithms: frozenset[str] = frozenset(DEFAULT_ALGORITHMS)
    lifetime: float = MAX_TOKEN_LIFETIME
    scopes: tuple[str, ...] = ()  # what the platform holds, in the config's order

    def candidates(self, alg: str, kid: Any) -> list[ClientKey]:
        fitting = [k for k in self.keys if k.fits(alg)]
        if isinstance(kid, str):
            named = [k for k in fitting if k.kid == kid]
            return named or [k for k in fitting if k.kid is None]
        return fitting


def clients_from_config(platforms: Iterable) -> dict[str, OAuthClient]:
    """The OAuth clients of a config's ``platforms`` (those with ``token`` settings); reads their key files
    (`KeyFileError` if one cannot be used)."""
    clients = {}
    for p in platforms:
        if getattr(p, "token", None) is None:
            continue
        clients[p.name] = OAuthClient(
            platform=p.name, keys=load_public_keys(p.token.public_keys), algorithms=frozenset(p.token.algorithms),
            lifetime=min(float(p.token.lifetime), MAX_TOKEN_LIFETIME), scopes=tuple(p.scopes))
    return clients


# ------------------------------------------------------------------------------------------- assertions


@dataclass(frozen=True)
class VerifiedAssertion:
    platform: str
    jti: str
    keep_until: float  # the jti is remembered until then: the assertion's exp plus the clock skew


def _refuse(text: str, platform: str | None = None):
    raise OAuthError("invalid_client", text, platform)


def _json_object(data: bytes, what: str) -> dict:
    """A JSON object in which no member is named twice (joserfc's own reading lets the last one win)."""
    def no_duplicates(pairs):
        out = {}
        for k, v in pairs:
            if k in out:
                _refuse(f"the assertion's {what} names {k!r} twice")
            out[k] = v
        return out

    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        _refuse(f"the assertion's {what} is not JSON")
    if not isinstance(value, dict):
        _refuse(f"the assertion's {what} is not a JSON object")
    return value


def _verifies(signed: jws.CompactSignature, key: ClientKey, alg: str) -> bool:
    jose_key = (RSAKey if ALGORITHMS[alg][0] == "rsa" else ECKey).import_key(key.key)
    try:
        return jws.validate_compact(signed, jose_key, registry=_JWS)
    except JoseError as e:
        _refuse(f"the assertion's header is not valid ({e.description})")


#: what a claim refused by joserfc is answered (the claim's name -> the text)
_CLAIM_REFUSALS = {
    "sub": "sub must be the client id, like iss",
    "aud": "aud must be this gateway's token URL, {audience}",
    "exp": "exp (a NumericDate) is required",
    "nbf": "nbf must be a NumericDate not in the future",
    "iat": "iat must be a NumericDate not in the future",
    "jti": "jti (a unique id of 1 to 255 printable characters) is required",
}


def _check_claims(claims: dict, iss: str, audience: str, now: float, platform: str) -> None:
    """sub, aud, exp, nbf, iat and jti by joserfc's rules (with CLOCK_SKEW), then our own: exp at most
    5 minutes ahead, jti printable."""
    rules = JWTClaimsRegistry(now=now, leeway=CLOCK_SKEW, sub={"essential": True, "value": iss},
                              aud={"essential": True, "value": audience}, exp={"essential": True},
                              jti={"essential": True})
    try:
        rules.validate(claims)
    except ExpiredTokenError:
        _refuse("the assertion has expired (exp is past)", platform)
    except ClaimError as e:  # a missing claim, or one of the wrong type or time (e.claim: "exp", or "aud,jti")
        names = e.claim.split(",")
        _refuse(next((text.format(audience=audience) for name, text in _CLAIM_REFUSALS.items() if name in names),
                     f"claim {e.claim} is not valid"), platform)
    if claims["exp"] > now + MAX_ASSERTION_LIFETIME + CLOCK_SKEW:
        _refuse("exp is more than 5 minutes ahead: an assertion may live 5 minutes at most", platform)
    if not _JTI.match(claims["jti"]):
        _refuse(_CLAIM_REFUSALS["jti"], platform)


def verify_assertion(assertion: Any, clients: Mapping[str, OAuthClient], audience: str,
                     now: float) -> VerifiedAssertion:
    """Check a client assertion (the table in the module docstring) at time ``now``; returns who signed it
    and its jti (the caller checks the jti was never used). Raises `OAuthError` ``invalid_client``."""
    if not isinstance(assertion, str) or not assertion or len(assertion) > MAX_ASSERTION_CHARS:
        _refuse("client_assertion must be a JWT of at most 16 KiB")
    try:
        signed = jws.extract_compact(assertion.encode("ascii"), registry=_JWS)
    except (JoseError, UnicodeEncodeError, RecursionError):
        _refuse("client_assertion is not a signed JWT (header.payload.signature, base64url JSON)")
    header = _json_object(urlsafe_b64decode(signed.segments["header"]), "header")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ALGORITHMS:
        _refuse(f"alg {str(alg)[:20]!r} is not accepted (accepted: {', '.join(ALGORITHMS)}; never none or HMAC)")
    if "crit" in header:
        _refuse("the assertion's header has critical parameters (crit), none of which this gateway understands")
    claims = _json_object(signed.payload, "payload")
    iss = claims.get("iss")
    client = clients.get(iss) if isinstance(iss, str) else None
    if client is None:
        _refuse("iss is not the client id of a platform registered for tokens")
    if alg not in client.algorithms:
        _refuse(f"platform {client.platform!r} is not registered to sign with {alg} "
                f"(it may use {', '.join(sorted(client.algorithms))})")
    kid = header.get("kid")
    candidates = client.candidates(alg, kid)
    if not candidates:
        _refuse(f"none of platform {client.platform!r}'s registered keys fits alg {alg}"
                + (f" and kid {str(kid)[:64]!r}" if kid is not None else ""))
    if not any(_verifies(signed, k, alg) for k in candidates):
        _refuse(f"the signature does not verify with platform {client.platform!r}'s registered key(s): "
                f"an unknown key, or an altered assertion")
    _check_claims(claims, iss, audience, now, client.platform)
    return VerifiedAssertion(client.platform, claims["jti"], claims["exp"] + CLOCK_SKEW)


# ------------------------------------------------------------------------------------------------ scopes


def _scope_matcher(item: str) -> tuple[str, frozenset[str] | None] | None:
    """One requested scope -> (resource or '*', its actions or None for any); None for what is not ours."""
    if "/" in item:
        context, _, item = item.partition("/")
        if context != "system":  # patient/ and user/ scopes belong to other SMART flows
            return None
    resource, dot, action = item.partition(".")
    if not dot or not re.fullmatch(r"\*|[A-Z][A-Za-z]{0,63}", resource) or not action:
        return None
    if action == "*":
        return resource, None
    if re.fullmatch(r"c?r?u?d?s?", action):  # SMART v2 letters: r/s read, c/u/d write
        return resource, frozenset(({"read"} if set(action) & set("rs") else set())
                                   | ({"write"} if set(action) & set("cud") else set()))
    return (resource, frozenset({action})) if re.fullmatch(r"[a-z]{1,32}", action) else None


def granted_scopes(requested: Any, configured: Iterable[str]) -> tuple[str, ...]:
    """The scopes to grant: those of the platform's ``configured`` scopes (in their order) that a requested
    scope (space-separated, see the module docstring) asks for. Raises `OAuthError` ``invalid_scope`` when
    that leaves nothing."""
    if not isinstance(requested, str) or not requested.strip():
        raise OAuthError("invalid_scope", "scope is required, e.g. 'system/Slot.read system/Appointment.write'")
    matchers = [m for m in (_scope_matcher(item) for item in requested.split()) if m is not None]
    granted = []
    for scope in configured:
        resource, _, action = scope.partition(".")
        if any(r in ("*", resource) and (actions is None or action in actions) for r, actions in matchers):
            granted.append(scope)
    if not granted:
        raise OAuthError("invalid_scope", "none of the requested scopes is granted to this platform")
    return tuple(granted)


# --------------------------------------------------------------------------------------------- tokens


TOKEN_PATH = "/oauth/token"


def default_token_url(public_base_url: str | None, host: str, port: int) -> str:
    """``outer.token_url`` when the config leaves it out: the origin of the public base URL (else
    ``https://host:port``) followed by ``/oauth/token``."""
    if public_base_url:
        parts = urlsplit(public_base_url)
        return f"{parts.scheme}://{parts.netloc}{TOKEN_PATH}"
    netloc = f"[{host}]" if ":" in host else host
    return f"https://{netloc}{'' if port == 443 else f':{port}'}{TOKEN_PATH}"


def token_id(token_sha256: str) -> str:
    """How the log and the audit name a token: the first 16 hex digits of its SHA-256."""
    return token_sha256[:16]


@dataclass(frozen=True)
class BearerGrant:
    """What a valid bearer token grants right now."""

    platform: str
    scopes: frozenset[str]
    token_id: str


class TokenService:
    """Issues access tokens at the token endpoint and authenticates bearer tokens on FHIR requests.

    ``clients``: platform name -> `OAuthClient` (replaced as a whole on SIGHUP); ``token_url``: the URL
    assertions must name in ``aud``; ``clock``: an IReactorTime; ``audit``: record issuance and refusals
    (an `AuditTrail` is built on the chamber)."""

    def __init__(self, chamber, clients: Mapping[str, OAuthClient], token_url: str, *, clock, audit: bool = True):
        self.chamber = chamber
        self.clients = dict(clients)
        self.token_url = token_url
        self.clock = clock
        self.audit = AuditTrail(chamber) if audit else None

    # -- the token endpoint ---------------------------------------------------------------------------------
    async def token_request(self, form: Mapping[str, list[str]], source: str | None = None) -> dict:
        """Answer a token request (the form's fields, each a list as parse_qs gives them): the JSON body of
        a 200 answer, or `OAuthError` (already audited and logged)."""
        try:
            return await self._token_request(form, source)
        except OAuthError as e:
            log.info("oauth.token_refused", error=e.error, reason=e.description, platform=e.platform, source=source)
            await self._record(AuditEntry(action="token", outcome=e.status, platform=e.platform, source=source,
                                          detail=e.error))
            raise

    async def _token_request(self, form: Mapping[str, list[str]], source: str | None) -> dict:
        params = {}
        for name, values in form.items():
            if len(values) != 1:
                raise OAuthError("invalid_request", f"parameter {name[:40]!r} is given more than once")
            params[name] = values[0]
        grant_type = params.get("grant_type")
        if not grant_type:
            raise OAuthError("invalid_request", "grant_type is required (client_credentials)")
        if grant_type != "client_credentials":
            raise OAuthError("unsupported_grant_type", "only grant_type=client_credentials is supported")
        if params.get("client_assertion_type") != ASSERTION_TYPE or not params.get("client_assertion"):
            raise OAuthError("invalid_client", f"authenticate with client_assertion_type={ASSERTION_TYPE} and a "
                                               f"signed client_assertion")
        now = self.clock.seconds()
        verified = verify_assertion(params["client_assertion"], self.clients, self.token_url, now)
        if params.get("client_id") not in (None, verified.platform):
            raise OAuthError("invalid_client", "client_id is not the assertion's issuer", verified.platform)
        client = self.clients[verified.platform]
        try:
            scopes = granted_scopes(params.get("scope"), client.scopes)
        except OAuthError as e:
            e.platform = verified.platform
            raise
        token = secrets.token_urlsafe(32)
        digest = hashlib.sha256(token.encode("ascii")).hexdigest()
        lifetime = int(min(client.lifetime, MAX_TOKEN_LIFETIME))

        def issue(tx):
            tx.prune_oauth(tx.now, EXPIRED_TOKENS_KEPT)
            if not tx.remember_assertion(verified.platform, verified.jti, verified.keep_until):
                raise OAuthError("invalid_client", "this assertion was used already (its jti is not new)",
                                 verified.platform)
            tx.add_access_token(digest, verified.platform, " ".join(scopes), tx.now + lifetime)
            if self.audit is not None:
                append(tx, AuditEntry(action="token", outcome=200, platform=verified.platform,
                                      subject=f"bearer:{token_id(digest)}", source=source,
                                      detail=f"token {token_id(digest)} for {lifetime} s: {' '.join(scopes)}"))

        await self.chamber.transact(issue)
        log.info("oauth.token_issued", platform=verified.platform, token=token_id(digest), scopes=list(scopes),
                 expires_in=lifetime, source=source)
        return {"access_token": token, "token_type": "bearer", "expires_in": lifetime,
                "scope": " ".join(f"system/{s}" for s in scopes)}

    async def _record(self, entry: AuditEntry) -> None:
        if self.audit is None:
            return
        try:
            await self.audit.record(entry)
        except ChamberError as e:  # the refusal is answered anyway; the record goes to the log
            log.error("audit.not_recorded", error=str(e), audit_action=entry.action, outcome=entry.outcome,
                      platform=entry.platform, source=entry.source, detail=entry.detail)

    # -- FHIR requests ----------------------------------------------------------------------------------------
    def authenticate(self, token: str, now: float | None = None) -> BearerGrant:
        """The grant of a bearer token at ``now``; raises `InvalidToken`."""
        if not isinstance(token, str) or not _TOKEN.match(token) or len(token) > 512:
            raise InvalidToken("unknown", "the bearer token is malformed")
        now = self.clock.seconds() if now is None else now
        digest = hashlib.sha256(token.encode("ascii")).hexdigest()
        row = self.chamber.read().access_token(digest)
        if row is None:
            raise InvalidToken("unknown", "the access token is not known to this gateway")
        platform, scopes, expires = row
        if expires <= now:
            raise InvalidToken("expired", "the access token has expired: ask /oauth/token for a new one")
        client = self.clients.get(platform)
        if client is None:
            raise InvalidToken("unknown", "the access token's platform is no longer registered for tokens")
        return BearerGrant(platform, frozenset(scopes.split()) & frozenset(client.scopes), token_id(digest))
