"""Prescription signatures: a detached JWS over canonical JSON, with the signer's X.509 chain.

A prescription is a legal document: the prescriber signs it at the platform, the gateway checks the signature
before anything reaches the HIS, and prescriptions the HIS releases to outside pharmacies are signed with the
gateway's own key. Design (docs/prescriptions.md has the carriers and the chamber columns). Maintained
libraries do the cryptography (JOSE: ``joserfc``; canonical JSON: ``rfc8785``; certificate paths:
``cryptography.x509.verification``); this module holds the gateway's policy on top of them.

**The signed bytes** are the *canonical JSON* of the prescription (`canonical_json`): RFC 8785 (JSON
Canonicalization Scheme, JCS), written by ``rfc8785``: members sorted by their names' UTF-16 code units, no
whitespace, UTF-8 text with only ``"``, ``\\`` and controls escaped (阿莫西林 stays as its UTF-8 bytes), numbers
as ECMAScript writes an IEEE 754 double (``1.0`` -> ``1``, ``1e21`` -> ``1e+21``). What has no canonical form is
refused (ValueError): NaN/Infinity, a lone surrogate, a member name that is not text, and integers beyond
+/-(2**53 - 1) (I-JSON's range: a bigger integer would be rounded, so two texts would sign the same bytes). A
*double* between 2**53 and 1e21 is written, as JCS says, as a long integer (``1e17`` -> ``100000000000000000``);
Python's json reads that text back as an int beyond the range, which is refused — so such numbers cannot cross
(FHIR has none). A FHIR ``decimal`` such as ``0.50`` reaches us as the double 0.5 after JSON parsing, so the
signer must canonicalize the same parsed value (``0.5``), not its text.

`prescription_payload` defines *what* is canonicalized for a FHIR resource: the resource without ``id``,
``meta``, ``text`` and ``signature`` (the server assigns the first three; the last carries the JWS itself),
as FHIR's own Bundle.signature rule excludes them.

**The JWS** (`verify_detached`, `sign_release`) is RFC 7515 compact serialization with a *detached* payload
(appendix F: the payload part is empty, ``<header>..<signature>``) and RFC 7797's unencoded payload option:
the protected header carries ``"b64": false`` and ``"crit": ["b64"]``, and the JWS signing input is
``ASCII(BASE64URL(header)) || '.' || canonical JSON bytes`` — the canonical bytes are signed as they are,
without a second base64url layer. We chose this over the classic detached form (``b64`` true) because the
payload is already text that both sides rebuild, and a verifier script can feed it to ``cryptography``
directly. The header must also carry ``x5c`` (RFC 7515 section 4.1.6): the signer's certificate first, then
each certificate's issuer in turn, each standard base64 (not base64url) DER.

**The chain** is validated by ``cryptography``'s RFC 5280 path validation (a client verifier, built per check
with ``now`` as its time), from the signer's certificate through the ``x5c`` intermediates to a CA of the
`TrustStore`: signatures, validity of every certificate (the trusted CA's too), basicConstraints and
pathLenConstraint, CA keyUsage (keyCertSign), name constraints (against the signer's subjectAltName; a critical
constraint on directory names, which it cannot evaluate, refuses the chain), unknown critical extensions
refused, at most ``MAX_CHAIN - 1`` intermediates, RSA issuer keys of 2048 bits or more, no SHA-1. Our policy
on top: the signer's certificate needs no subjectAltName (a prescriber is named in the subject, see
`gateway.domain.prescribing`'s ``signer_must_match_requester``) nor authorityKeyIdentifier (a path-building hint);
its key must fit ``alg``; it must not be a CA; its KeyUsage, when present, must allow signatures; its
ExtendedKeyUsage, when present, must name a purpose of `SIGNING_PURPOSES`; and a CA's ExtendedKeyUsage, when
present, must allow one of them too (a TLS-only sub-CA cannot certify a prescriber).

Checks, in order, each failure a `SignatureError` whose ``check`` names it:

==================  ==============================================================================
``missing``         no JWS at all (an unsigned prescription)
``malformed``       not ``header..signature`` (or the payload part is not empty), bad base64url, the
                    header not a JSON object naming its ``alg``
``algorithm``       ``alg`` is not one of ES256, ES384, RS256, PS256 (so ``none`` and ``HS*`` are
                    refused: a MAC key would have to be shared, and ``none`` signs nothing)
``header``          ``b64`` is not false, ``crit`` is not exactly ``["b64"]``, ``x5c`` absent or empty,
                    a registered header parameter of the wrong type (``kid`` not text...)
``certificate``     an ``x5c`` entry is not a DER certificate
``key``             the signer's key does not fit ``alg`` (EC P-256 for ES256, P-384 for ES384, RSA of at
                    least 2048 bits for RS256/PS256), or its KeyUsage lacks digitalSignature and
                    nonRepudiation, or its ExtendedKeyUsage names no purpose of `SIGNING_PURPOSES`, or
                    it is a CA certificate
``expired``         some certificate of the chain (the trusted CA included) ended before ``now``
``not-yet-valid``   some certificate of the chain starts after ``now``
``chain``           ``x5c`` is not in issuing order, or the chain breaks a rule of RFC 5280 or of our
                    policy (path length, name constraints, an intermediate that is not a CA, a CA whose
                    ExtendedKeyUsage excludes signing...): the text names it
``untrusted``       the chain does not end at (or under) a CA certificate the config trusts
``signature``       the signature does not match the payload with the signer's key: the prescription was
                    altered after signing, or it was signed with another key than the certificate's
==================  ==============================================================================

Limits (documented, not hidden): no revocation checking (CRL/OCSP) — an operator removes a CA or the
platform's grant instead; no certificate policies processing; ``kid``/``x5t`` are ignored; a chain of at most
5 certificates in ``x5c``. ``now`` is always passed in (no hidden clock).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import rfc8785
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import Criticality, ExtensionPolicy, PolicyBuilder, Store, VerificationError
from joserfc import jws
from joserfc.errors import JoseError, MissingCritHeaderError
from joserfc.jwk import ECKey, RSAKey

__all__ = [
    "ALGORITHMS",
    "SIGNING_PURPOSES",
    "SignatureCheck",
    "SignatureError",
    "TrustStore",
    "canonical_json",
    "prescription_payload",
    "sign_release",
    "verify_detached",
]

#: JWS ``alg`` values we accept: (key kind, EC curve or minimum RSA bits)
ALGORITHMS: dict[str, tuple[str, Any]] = {
    "ES256": ("ec", ec.SECP256R1),
    "ES384": ("ec", ec.SECP384R1),
    "RS256": ("rsa", 2048),
    "PS256": ("rsa", 2048),
}
#: ExtendedKeyUsage purposes that allow signing a prescription (a certificate without the extension may sign):
#: any purpose, document signing (RFC 9336), and e-mail protection — the signing purpose many national PKIs
#: give a person's certificate (S/MIME signatures)
SIGNING_PURPOSES = frozenset({
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
    x509.ObjectIdentifier("1.3.6.1.5.5.7.3.36"),
    ExtendedKeyUsageOID.EMAIL_PROTECTION,
})
MAX_CHAIN = 5
MAX_JWS_LENGTH = 64 * 1024

#: members of a FHIR resource that are not signed (server-assigned, or the signature itself)
UNSIGNED_MEMBERS = ("id", "meta", "text", "signature")

#: joserfc's registry with our algorithms and sizes: the header holds x5c (up to 5 certificates), the detached
#: payload is a whole prescription (its size is the HTTP body limit's business), RSA signatures up to 8192
#: bits; header parameters joserfc does not know are ignored, as RFC 7515 says (crit aside)
_JWS = jws.JWSRegistry(algorithms=list(ALGORITHMS), strict_check_header=False)
_JWS.max_header_length = MAX_JWS_LENGTH
_JWS.max_payload_length = 1 << 62
_JWS.max_signature_length = 2048

#: cryptography's VerificationError carries text only; these reasons mean that no trusted issuer was found
#: (no CA of that name, or none whose key made the signature), as opposed to a chain that breaks a rule
_NO_TRUSTED_ISSUER = ("all candidates exhausted with no interior errors", "signature does not match")
_NOT_VALID_NOW = "cert is not valid at validation time"


class SignatureError(ValueError):
    """A signature the gateway refuses. ``check`` is the machine name of the failed check (table in the
    module docstring); ``str()`` says why in words fit for an OperationOutcome's diagnostics."""

    def __init__(self, check: str, text: str):
        super().__init__(f"{check}: {text}")
        self.check = check
        self.text = text


@dataclass(frozen=True)
class SignatureCheck:
    """A verified signature, to be stored with the message it came with."""

    alg: str
    signer_subject: str  # RFC 4514 string of the leaf certificate's subject
    signer_serial: str  # leaf serial number, upper-case hex
    issuer: str  # RFC 4514 string of the leaf's issuer
    cert_sha256: str  # hex SHA-256 of the leaf certificate's DER
    payload_sha256: str  # hex SHA-256 of the signed (canonical) bytes
    anchor_subject: str  # the trusted CA the chain ended at
    verified_at: datetime  # the ``now`` of the check (aware, UTC)

    def to_json(self) -> dict:
        return {
            "alg": self.alg,
            "signer_subject": self.signer_subject,
            "signer_serial": self.signer_serial,
            "issuer": self.issuer,
            "cert_sha256": self.cert_sha256,
            "payload_sha256": self.payload_sha256,
            "anchor_subject": self.anchor_subject,
            "verified_at": self.verified_at.isoformat(),
        }


class TrustStore:
    """The CA certificates the config trusts for prescribers' signatures."""

    def __init__(self, certificates: Iterable[x509.Certificate]):
        self.certificates = tuple(certificates)
        if not self.certificates:
            raise ValueError("a trust store needs at least one CA certificate")
        self.store = Store(list(self.certificates))
        self._by_subject: dict[bytes, list[x509.Certificate]] = {}
        for cert in self.certificates:
            self._by_subject.setdefault(cert.subject.public_bytes(), []).append(cert)

    @classmethod
    def from_pem(cls, *pems: bytes) -> TrustStore:
        """From PEM data (each argument may hold several certificates)."""
        certs: list[x509.Certificate] = []
        for pem in pems:
            certs.extend(x509.load_pem_x509_certificates(pem))
        return cls(certs)

    def issuers_of(self, cert: x509.Certificate) -> list[x509.Certificate]:
        """The trusted CAs named as ``cert``'s issuer (by name only: which one signed it is not checked)."""
        return self._by_subject.get(cert.issuer.public_bytes(), [])


# ------------------------------------------------------------------------------------------ canonical JSON


def canonical_json(value: Any) -> bytes:
    """RFC 8785 (JCS) bytes of a parsed JSON value (``rfc8785``); see the module docstring for what has none.
    Raises ValueError for such a value."""
    return rfc8785.dumps(value)


def prescription_payload(resource: dict) -> bytes:
    """The signed bytes of a FHIR resource (a MedicationRequest or a transaction Bundle): its canonical JSON
    without the top-level ``id``, ``meta``, ``text`` and ``signature``."""
    if not isinstance(resource, dict):
        raise ValueError("a FHIR resource is a JSON object")  # noqa: TRY004 (callers catch ValueError)
    return canonical_json({k: v for k, v in resource.items() if k not in UNSIGNED_MEMBERS})


# ------------------------------------------------------------------------------------------------ JWS


def _name(n: x509.Name) -> str:
    return n.rfc4514_string()


def _utc(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    return now.astimezone(UTC)


def _jose_key(key):
    """joserfc's key object for a ``cryptography`` EC or RSA key (public or private)."""
    return ECKey.import_key(key) if isinstance(key, (ec.EllipticCurvePublicKey, ec.EllipticCurvePrivateKey)) \
        else RSAKey.import_key(key)


def _read_jws(text: str, payload: bytes) -> jws.CompactSignature:
    """The detached JWS read by joserfc, with ``payload`` as its content (not yet verified)."""
    if not text:
        raise SignatureError("missing", "the prescription carries no signature (a detached JWS is required)")
    if not isinstance(text, str) or len(text) > MAX_JWS_LENGTH:
        raise SignatureError("malformed", "the JWS is not text of a sensible length")
    parts = text.strip().split(".")
    if len(parts) != 3:
        raise SignatureError("malformed", "a detached JWS has three parts: <header>..<signature>")
    if parts[1]:
        raise SignatureError("malformed", "the JWS payload part must be empty (detached content, RFC 7515 "
                             "appendix F): the payload is the prescription itself")
    try:
        return jws.extract_compact(text.strip().encode("ascii"), payload, _JWS)
    except MissingCritHeaderError:
        raise SignatureError("header", 'the header must carry "crit": ["b64"] and no other critical '
                             "parameter") from None
    except (JoseError, UnicodeEncodeError, RecursionError):
        raise SignatureError("malformed", "the JWS protected header is not base64url JSON: an object naming "
                             "its alg") from None


def _check_header(header: dict) -> str:
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ALGORITHMS:
        raise SignatureError("algorithm", f"alg {alg!r} is not accepted (accepted: {', '.join(ALGORITHMS)}; "
                             "never none or HMAC)")
    if header.get("b64") is not False:
        raise SignatureError("header", 'the header must carry "b64": false (RFC 7797 unencoded payload)')
    if header.get("crit") != ["b64"]:
        raise SignatureError("header", 'the header must carry "crit": ["b64"] and no other critical parameter')
    x5c = header.get("x5c")
    if not isinstance(x5c, list) or not x5c or not all(isinstance(c, str) for c in x5c):
        raise SignatureError("header", "the header must carry x5c: the signer's certificate chain")
    if len(x5c) > MAX_CHAIN:
        raise SignatureError("header", f"x5c has more than {MAX_CHAIN} certificates")
    return alg


def _load_chain(x5c: Sequence[str]) -> list[x509.Certificate]:
    chain = []
    for i, text in enumerate(x5c):
        try:
            der = base64.b64decode(text, validate=True)
            chain.append(x509.load_der_x509_certificate(der))
        except (binascii.Error, ValueError):
            raise SignatureError("certificate", f"x5c[{i}] is not a base64 DER certificate") from None
    return chain


def _extension(cert: x509.Certificate, kind):
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _purposes(eku: x509.ExtendedKeyUsage) -> str:
    """The purposes an ExtendedKeyUsage names, by cryptography's names (serverAuth...) or else their OIDs."""
    return ", ".join(p.dotted_string if p._name == "Unknown OID" else p._name for p in eku)


def _check_key(cert: x509.Certificate, alg: str) -> None:
    """Our policy for the signer's certificate: its key fits ``alg``, it is a person's (not a CA's), and its
    key usages, when it lists them, allow signing documents."""
    kind, param = ALGORITHMS[alg]
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise SignatureError("key", "the signer's certificate holds no public key that can be read") from None
    if kind == "ec":
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, param):
            raise SignatureError("key", f"{alg} needs an EC {param.name} key in the signer's certificate")
    elif not isinstance(key, rsa.RSAPublicKey) or key.key_size < param:
        raise SignatureError("key", f"{alg} needs an RSA key of at least {param} bits in the signer's certificate")
    bc = _extension(cert, x509.BasicConstraints)
    if bc is not None and bc.ca:
        raise SignatureError("key", "the signer's certificate is a CA certificate, not a person's")
    ku = _extension(cert, x509.KeyUsage)
    if ku is not None and not (ku.digital_signature or ku.content_commitment):
        raise SignatureError("key", "the signer's certificate is not for signatures (KeyUsage has neither "
                             "digitalSignature nor nonRepudiation)")
    eku = _extension(cert, x509.ExtendedKeyUsage)
    if eku is not None and not SIGNING_PURPOSES.intersection(eku):
        raise SignatureError("key", "the signer's certificate is not for signing documents (its ExtendedKeyUsage "
                             f"names only {_purposes(eku)})")


def _out_of_validity(cert: x509.Certificate, who: str, now: datetime) -> SignatureError | None:
    """``expired`` or ``not-yet-valid`` for a certificate outside its validity period at ``now``, else None."""
    if now > cert.not_valid_after_utc:
        return SignatureError("expired", f"{who} expired at {cert.not_valid_after_utc.isoformat()}")
    if now < cert.not_valid_before_utc:
        return SignatureError("not-yet-valid", f"{who} is valid only from {cert.not_valid_before_utc.isoformat()}")
    return None


def _check_validity(chain: Sequence[x509.Certificate], now: datetime) -> None:
    for i, cert in enumerate(chain):
        who = "the signer's certificate" if i == 0 else f"certificate x5c[{i}]"
        error = _out_of_validity(cert, f"{who} ({_name(cert.subject)})", now)
        if error is not None:
            raise error


def _ca_may_certify_signers(_policy, ca: x509.Certificate, eku: x509.ExtendedKeyUsage | None) -> None:
    """A CA whose ExtendedKeyUsage is limited to other purposes (TLS...) may not certify a prescriber."""
    if eku is not None and not SIGNING_PURPOSES.intersection(eku):
        raise ValueError(f"{_name(ca.subject)} may certify only {_purposes(eku)}, not signing documents")


#: the signer's certificate: webpki rules, but no subjectAltName or authorityKeyIdentifier required, and any
#: ExtendedKeyUsage (`_check_key` has checked it allows signing documents)
_SIGNER_EXTENSIONS = (ExtensionPolicy.webpki_defaults_ee()
                      .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
                      .may_be_present(x509.AuthorityKeyIdentifier, Criticality.NON_CRITICAL, None)
                      .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, None))
#: CAs: webpki rules, and an ExtendedKeyUsage that allows certifying signers
_CA_EXTENSIONS = (ExtensionPolicy.webpki_defaults_ca()
                  .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _ca_may_certify_signers))


def _check_chain(chain: Sequence[x509.Certificate], trust: TrustStore, now: datetime) -> x509.Certificate:
    """The trusted anchor the chain ends at (path validation by ``cryptography``); raises SignatureError
    ``chain``/``untrusted``/``expired``/``not-yet-valid``."""
    for i in range(len(chain) - 1):
        if chain[i].issuer != chain[i + 1].subject:
            raise SignatureError("chain", f"x5c[{i}] is not issued by x5c[{i + 1}] (x5c lists the signer's "
                                 "certificate, then each issuer in turn)")
    verifier = (PolicyBuilder().store(trust.store).time(now).max_chain_depth(MAX_CHAIN - 1)
                .extension_policies(ca_policy=_CA_EXTENSIONS, ee_policy=_SIGNER_EXTENSIONS)
                .build_client_verifier())
    try:
        return verifier.verify(chain[0], list(chain[1:])).chain[-1]
    except VerificationError as e:
        raise _chain_refusal(str(e), chain[-1], trust, now) from None


def _chain_refusal(reason: str, top: x509.Certificate, trust: TrustStore, now: datetime) -> SignatureError:
    """The check a refused path names (the x5c certificates' own validity was checked before)."""
    reason = (reason.removeprefix("validation failed: ").split(" (encountered processing")[0]
              .replace("Python extension validator failed: ValueError: ", ""))  # our own policy's words
    if reason.endswith(_NOT_VALID_NOW):
        for anchor in trust.issuers_of(top):
            error = _out_of_validity(anchor, f"the trusted CA {_name(anchor.subject)}", now)
            if error is not None:
                return error
    if reason.endswith(_NO_TRUSTED_ISSUER):
        return SignatureError("untrusted", f"the signer's chain ends at {_name(top.issuer)}, which is not a CA "
                              "this gateway trusts for prescriptions")
    return SignatureError("chain", f"the signer's certificate chain is not valid: {reason}")


def verify_detached(jws_text: str | None, payload: bytes, trust: TrustStore, now: datetime) -> SignatureCheck:
    """Verify a detached, unencoded-payload JWS over ``payload`` (the canonical bytes: `canonical_json` or
    `prescription_payload`). Returns what to store with the message; raises `SignatureError`."""
    now = _utc(now)
    signed = _read_jws(jws_text or "", payload)
    header = signed.headers()
    alg = _check_header(header)
    chain = _load_chain(header["x5c"])
    leaf = chain[0]
    _check_key(leaf, alg)
    _check_validity(chain, now)
    anchor = _check_chain(chain, trust, now)
    try:
        valid = jws.validate_compact(signed, _jose_key(leaf.public_key()), registry=_JWS)
    except JoseError as e:
        raise SignatureError("header", f"the JWS header is not valid: {e.description}") from None
    if not valid:
        raise SignatureError("signature", "the signature does not match the prescription with the signer's "
                             "certificate: the prescription was altered after signing, or signed with another "
                             "key")
    return SignatureCheck(
        alg=alg,
        signer_subject=_name(leaf.subject),
        signer_serial=format(leaf.serial_number, "X"),
        issuer=_name(leaf.issuer),
        cert_sha256=leaf.fingerprint(hashes.SHA256()).hex(),
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        anchor_subject=_name(anchor.subject),
        verified_at=now,
    )


def _default_alg(key) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if isinstance(key.curve, ec.SECP256R1):
            return "ES256"
        if isinstance(key.curve, ec.SECP384R1):
            return "ES384"
        raise ValueError(f"EC curve {key.curve.name} is not supported (P-256 or P-384)")
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    raise ValueError(f"{type(key).__name__} keys are not supported (EC P-256/P-384 or RSA)")


def sign_release(payload: bytes | dict, key, cert_chain: Sequence[x509.Certificate], alg: str | None = None) -> str:
    """The gateway's detached JWS over a prescription the HIS releases. ``payload``: the canonical bytes,
    or a FHIR resource (dict) that is reduced with `prescription_payload` first. ``key``: the gateway's
    private key (EC P-256 -> ES256, P-384 -> ES384, RSA -> RS256 unless ``alg`` says PS256); ``cert_chain``:
    its certificate first, then intermediates (not the root). Returns ``<header>..<signature>``."""
    data = prescription_payload(payload) if isinstance(payload, dict) else bytes(payload)
    alg = alg or _default_alg(key)
    if alg not in ALGORITHMS:
        raise ValueError(f"alg {alg!r} is not supported")
    if not cert_chain:
        raise ValueError("cert_chain needs at least the signing certificate")
    leaf_key = cert_chain[0].public_key()
    if leaf_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
            key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise ValueError("the key does not belong to cert_chain[0]")
    _check_key(cert_chain[0], alg)
    header = {
        "alg": alg,
        "b64": False,
        "crit": ["b64"],
        "x5c": [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode("ascii") for c in cert_chain],
    }
    return jws.detach_content(jws.serialize_compact(header, data, _jose_key(key), registry=_JWS))
