"""Prescription signatures: detached JWS over canonical JSON, with the signer's X.509 chain (``cryptography`` only).

A prescription is a legal document: the prescriber signs it at the platform, the gateway checks the signature
before anything reaches the HIS, and prescriptions the HIS releases to outside pharmacies are signed with the
gateway's own key. Design (docs/prescriptions.md has the carriers and the chamber columns):

**The signed bytes** are the *canonical JSON* of the prescription (`canonical_json`): RFC 8785 (JSON
Canonicalization Scheme, JCS), the subset a FHIR resource needs —

* objects: members sorted by their names' UTF-16 code units (RFC 8785 section 3.2.3), no duplicate names
  (they cannot occur in a Python dict; a JSON text with duplicates must be refused by its reader);
* no whitespace between tokens; text encoded as UTF-8;
* strings as ECMAScript ``JSON.stringify`` writes them: ``"`` and ``\\`` escaped, ``\\b \\f \\n \\r \\t`` in short
  form, other controls below U+0020 as ``\\u00xx`` (lower-case hex), everything else literal (no ``\\u``
  escapes for non-ASCII: 阿莫西林 stays as its UTF-8 bytes). A lone surrogate is refused;
* numbers as ECMAScript ``Number.prototype.toString`` writes an IEEE 754 double (shortest round-trip digits,
  exponent form outside 1e-7 <= |x| < 1e21): ``1.0`` -> ``1``, ``0.5`` -> ``0.5``, ``1e21`` -> ``1e+21``.
  Limits: NaN/Infinity and Python integers beyond +/-2**53 are refused (JCS numbers are doubles; a bigger
  integer would be rounded, so two different texts would sign the same bytes). A *double* between 2**53 and
  1e21 is written, as JCS says, as a long integer (``1e17`` -> ``100000000000000000``); Python's json reads
  that text back as an int beyond 2**53, which is refused — so such numbers cannot cross (FHIR has none); a FHIR ``decimal`` such as ``0.50`` reaches us as the double
  0.5 after JSON parsing, so the signer must canonicalize the same parsed value (``0.5``), not its text.
* ``true``, ``false``, ``null``, arrays in their order.

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
intermediates, each standard base64 (not base64url) DER.

Checks, in order, each failure a `SignatureError` whose ``check`` names it:

==================  ==============================================================================
``missing``         no JWS at all (an unsigned prescription)
``malformed``       not ``header..signature`` (or the payload part is not empty), bad base64url, the
                    header not a JSON object
``algorithm``       ``alg`` is not one of ES256, ES384, RS256, PS256 (so ``none`` and ``HS*`` are
                    refused: a MAC key would have to be shared, and ``none`` signs nothing)
``header``          ``b64`` is not false, ``crit`` is not exactly ``["b64"]``, ``x5c`` absent or empty
``certificate``     an ``x5c`` entry is not a DER certificate
``key``             the leaf's key does not fit ``alg`` (EC P-256 for ES256, P-384 for ES384, RSA of at
                    least 2048 bits for RS256/PS256), or its KeyUsage lacks digitalSignature and
                    nonRepudiation, or the leaf is a CA
``expired``         some certificate of the chain ended before ``now``
``not-yet-valid``   some certificate of the chain starts after ``now``
``chain``           a certificate is not signed by the next one, or an intermediate is not a CA
``untrusted``       the chain does not end at (or under) a CA certificate the config trusts
``signature``       the signature does not match the payload with the leaf's key: the prescription was
                    altered after signing, or it was signed with another key than the certificate's
==================  ==============================================================================

Limits (documented, not hidden): no revocation checking (CRL/OCSP) — an operator removes a CA or the
platform's grant instead; no name constraints, policy or path-length processing; ``kid``/``x5t`` are
ignored; a chain of at most 5 certificates. ``now`` is always passed in (no hidden clock).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

__all__ = [
    "ALGORITHMS",
    "SignatureCheck",
    "SignatureError",
    "TrustStore",
    "canonical_json",
    "prescription_payload",
    "sign_release",
    "verify_detached",
]

#: JWS ``alg`` values we accept: (hash, key kind, EC curve or minimum RSA bits)
ALGORITHMS: dict[str, tuple[type[hashes.HashAlgorithm], str, Any]] = {
    "ES256": (hashes.SHA256, "ec", ec.SECP256R1),
    "ES384": (hashes.SHA384, "ec", ec.SECP384R1),
    "RS256": (hashes.SHA256, "rsa", 2048),
    "PS256": (hashes.SHA256, "rsa-pss", 2048),
}
MAX_CHAIN = 5
MAX_JWS_LENGTH = 64 * 1024

#: members of a FHIR resource that are not signed (server-assigned, or the signature itself)
UNSIGNED_MEMBERS = ("id", "meta", "text", "signature")


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
        self._by_subject: dict[bytes, list[x509.Certificate]] = {}
        for cert in self.certificates:
            self._by_subject.setdefault(cert.subject.public_bytes(), []).append(cert)
        self._fingerprints = {cert.fingerprint(hashes.SHA256()) for cert in self.certificates}

    @classmethod
    def from_pem(cls, *pems: bytes) -> TrustStore:
        """From PEM data (each argument may hold several certificates)."""
        certs: list[x509.Certificate] = []
        for pem in pems:
            certs.extend(x509.load_pem_x509_certificates(pem))
        return cls(certs)

    def is_anchor(self, cert: x509.Certificate) -> bool:
        return cert.fingerprint(hashes.SHA256()) in self._fingerprints

    def issuers_of(self, cert: x509.Certificate) -> list[x509.Certificate]:
        return self._by_subject.get(cert.issuer.public_bytes(), [])


# ------------------------------------------------------------------------------------------ canonical JSON


def _es_number(x: float) -> str:
    """ECMAScript Number::toString of a double (RFC 8785 section 3.2.2.3)."""
    if math.isnan(x) or math.isinf(x):
        raise ValueError("NaN and Infinity have no JSON form")
    if x == 0:
        return "0"  # -0 too
    sign = "-" if x < 0 else ""
    mantissa, _, exp_text = repr(abs(x)).partition("e")  # repr: shortest digits that round-trip
    exponent = int(exp_text or 0)
    int_part, _, frac_part = mantissa.partition(".")
    all_digits = int_part + frac_part
    leading = len(all_digits) - len(all_digits.lstrip("0"))
    digits = all_digits.lstrip("0").rstrip("0") or "0"
    k = len(digits)
    n = len(int_part) + exponent - leading  # value = 0.<digits> * 10**n
    if k <= n <= 21:
        out = digits + "0" * (n - k)
    elif 0 < n <= 21:
        out = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        out = "0." + "0" * (-n) + digits
    else:
        e = n - 1
        e_text = ("+" if e >= 0 else "-") + str(abs(e))
        out = (digits if k == 1 else digits[0] + "." + digits[1:]) + "e" + e_text
    return sign + out


def _utf16_key(name: str) -> bytes:
    return name.encode("utf-16-be", "surrogatepass")


def _write(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(json.dumps(value, ensure_ascii=False))
    elif isinstance(value, int):
        if abs(value) > 2**53:
            raise ValueError(f"integer {value} is beyond 2**53: not exactly representable in JSON numbers")
        out.append(str(value))
    elif isinstance(value, float):
        out.append(_es_number(value))
    elif isinstance(value, dict):
        out.append("{")
        for i, key in enumerate(sorted(value, key=_member_key)):
            if i:
                out.append(",")
            out.append(json.dumps(key, ensure_ascii=False))
            out.append(":")
            _write(value[key], out)
        out.append("}")
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _write(item, out)
        out.append("]")
    else:
        raise ValueError(f"{type(value).__name__} has no JSON form")


def _member_key(key: Any) -> bytes:
    if not isinstance(key, str):
        raise ValueError(f"JSON object member names must be strings, not {type(key).__name__}")  # noqa: TRY004
    return _utf16_key(key)


def canonical_json(value: Any) -> bytes:
    """RFC 8785 (JCS) bytes of a parsed JSON value; see the module docstring for the subset and its limits.
    Raises ValueError for what has no canonical form."""
    out: list[str] = []
    _write(value, out)
    try:
        return "".join(out).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("a string holds a lone surrogate: not representable in UTF-8") from None


def prescription_payload(resource: dict) -> bytes:
    """The signed bytes of a FHIR resource (a MedicationRequest or a transaction Bundle): its canonical JSON
    without the top-level ``id``, ``meta``, ``text`` and ``signature``."""
    if not isinstance(resource, dict):
        raise ValueError("a FHIR resource is a JSON object")  # noqa: TRY004 (callers catch ValueError)
    return canonical_json({k: v for k, v in resource.items() if k not in UNSIGNED_MEMBERS})


# ------------------------------------------------------------------------------------------------ JWS


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str, what: str) -> bytes:
    if not text or any(c not in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_" for c in text):
        raise SignatureError("malformed", f"the JWS {what} is not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise SignatureError("malformed", f"the JWS {what} is not base64url") from None


def _name(n: x509.Name) -> str:
    return n.rfc4514_string()


def _utc(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    return now.astimezone(UTC)


def _parse_header(jws: str) -> tuple[str, dict, bytes]:
    if not jws:
        raise SignatureError("missing", "the prescription carries no signature (a detached JWS is required)")
    if not isinstance(jws, str) or len(jws) > MAX_JWS_LENGTH:
        raise SignatureError("malformed", "the JWS is not text of a sensible length")
    parts = jws.strip().split(".")
    if len(parts) != 3:
        raise SignatureError("malformed", "a detached JWS has three parts: <header>..<signature>")
    header_b64, payload_part, sig_b64 = parts
    if payload_part:
        raise SignatureError("malformed", "the JWS payload part must be empty (detached content, RFC 7515 "
                             "appendix F): the payload is the prescription itself")
    try:
        header = json.loads(_b64url_decode(header_b64, "header"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SignatureError("malformed", "the JWS protected header is not JSON") from None
    if not isinstance(header, dict):
        raise SignatureError("malformed", "the JWS protected header is not a JSON object")
    return header_b64, header, _b64url_decode(sig_b64, "signature")


def _check_header(header: dict) -> str:
    alg = header.get("alg")
    if alg not in ALGORITHMS:
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


def _check_key(cert: x509.Certificate, alg: str) -> None:
    _, kind, param = ALGORITHMS[alg]
    key = cert.public_key()
    if kind == "ec":
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, param):
            raise SignatureError("key", f"{alg} needs an EC {param.name} key in the signer's certificate")
    elif not isinstance(key, rsa.RSAPublicKey) or key.key_size < param:
        raise SignatureError("key", f"{alg} needs an RSA key of at least {param} bits in the signer's certificate")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if bc.ca:
            raise SignatureError("key", "the signer's certificate is a CA certificate, not a person's")
    except x509.ExtensionNotFound:
        pass
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not (ku.digital_signature or ku.content_commitment):
            raise SignatureError("key", "the signer's certificate is not for signatures (KeyUsage has neither "
                                 "digitalSignature nor nonRepudiation)")
    except x509.ExtensionNotFound:
        pass


def _check_validity(chain: Sequence[x509.Certificate], now: datetime) -> None:
    for i, cert in enumerate(chain):
        who = "the signer's certificate" if i == 0 else f"certificate x5c[{i}]"
        if now > cert.not_valid_after_utc:
            raise SignatureError("expired", f"{who} ({_name(cert.subject)}) expired at "
                                 f"{cert.not_valid_after_utc.isoformat()}")
        if now < cert.not_valid_before_utc:
            raise SignatureError("not-yet-valid", f"{who} ({_name(cert.subject)}) is valid only from "
                                 f"{cert.not_valid_before_utc.isoformat()}")


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _check_chain(chain: Sequence[x509.Certificate], trust: TrustStore, now: datetime) -> x509.Certificate:
    """The trusted anchor the chain ends at; raises SignatureError ``chain``/``untrusted``/``expired``."""
    for i in range(len(chain) - 1):
        child, parent = chain[i], chain[i + 1]
        if not _is_ca(parent):
            raise SignatureError("chain", f"x5c[{i + 1}] ({_name(parent.subject)}) is not a CA certificate")
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature):
            raise SignatureError("chain", f"x5c[{i}] is not issued by x5c[{i + 1}]") from None
    top = chain[-1]
    if trust.is_anchor(top):
        return top
    for anchor in trust.issuers_of(top):
        try:
            top.verify_directly_issued_by(anchor)
        except (ValueError, TypeError, InvalidSignature):
            continue
        if now > anchor.not_valid_after_utc:
            raise SignatureError("expired", f"the trusted CA {_name(anchor.subject)} expired at "
                                 f"{anchor.not_valid_after_utc.isoformat()}")
        if now < anchor.not_valid_before_utc:
            raise SignatureError("not-yet-valid", f"the trusted CA {_name(anchor.subject)} is valid only from "
                                 f"{anchor.not_valid_before_utc.isoformat()}")
        return anchor
    raise SignatureError("untrusted", f"the signer's chain ends at {_name(top.issuer)}, which is not a CA this "
                         "gateway trusts for prescriptions")


def _verify_signature(cert: x509.Certificate, alg: str, signature: bytes, data: bytes) -> None:
    hash_cls, kind, _ = ALGORITHMS[alg]
    key = cert.public_key()
    try:
        if kind == "ec":
            size = (key.curve.key_size + 7) // 8
            if len(signature) != 2 * size:
                raise InvalidSignature()
            r = int.from_bytes(signature[:size], "big")
            s = int.from_bytes(signature[size:], "big")
            key.verify(encode_dss_signature(r, s), data, ec.ECDSA(hash_cls()))
        elif kind == "rsa":
            key.verify(signature, data, padding.PKCS1v15(), hash_cls())
        else:
            key.verify(signature, data, padding.PSS(mgf=padding.MGF1(hash_cls()), salt_length=hash_cls.digest_size),
                       hash_cls())
    except InvalidSignature:
        raise SignatureError("signature", "the signature does not match the prescription with the signer's "
                             "certificate: the prescription was altered after signing, or signed with another "
                             "key") from None


def verify_detached(jws: str | None, payload: bytes, trust: TrustStore, now: datetime) -> SignatureCheck:
    """Verify a detached, unencoded-payload JWS over ``payload`` (the canonical bytes: `canonical_json` or
    `prescription_payload`). Returns what to store with the message; raises `SignatureError`."""
    now = _utc(now)
    header_b64, header, signature = _parse_header(jws or "")
    alg = _check_header(header)
    chain = _load_chain(header["x5c"])
    leaf = chain[0]
    _check_key(leaf, alg)
    _check_validity(chain, now)
    anchor = _check_chain(chain, trust, now)
    _verify_signature(leaf, alg, signature, header_b64.encode("ascii") + b"." + payload)
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
    header_b64 = _b64url(canonical_json(header))
    signing_input = header_b64.encode("ascii") + b"." + data
    hash_cls, kind, _ = ALGORITHMS[alg]
    if kind == "ec":
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hash_cls())))
        size = (key.curve.key_size + 7) // 8
        signature = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    elif kind == "rsa":
        signature = key.sign(signing_input, padding.PKCS1v15(), hash_cls())
    else:
        signature = key.sign(signing_input, padding.PSS(mgf=padding.MGF1(hash_cls()), salt_length=hash_cls.digest_size),
                             hash_cls())
    return f"{header_b64}..{_b64url(signature)}"
