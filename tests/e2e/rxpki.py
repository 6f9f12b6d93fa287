"""Prescription PKI for end-to-end tests: a prescribers' CA and a prescriber (licence D0042, as in the golden
Bundle), a CA nobody trusts, certificates of the same prescriber that RFC 5280 or our policy refuse, the
gateway's release key, and the signed Bundle an internet hospital sends."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import jwt
import rfc8785
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "pharmacy"
NOW = datetime.now(timezone.utc)
PRESCRIBER_SCOPES = ["Slot.read", "MedicationRequest.write", "MedicationRequest.read", "MedicationDispense.read"]
DOCUMENT_SIGNING = x509.ObjectIdentifier("1.3.6.1.5.5.7.3.36")  # id-kp-documentSigning, RFC 9336


def _cert(subject, key, issuer, issuer_key, *, ca: bool, path_length=None, purposes=None):
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(NOW - timedelta(days=1))
         .not_valid_after(NOW + timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=not ca, content_commitment=not ca, key_encipherment=False,
                                      data_encipherment=False, key_agreement=False, key_cert_sign=ca,
                                      crl_sign=ca, encipher_only=False, decipher_only=False), critical=True))
    if purposes:
        b = b.add_extension(x509.ExtendedKeyUsage(purposes), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _name(cn, serial=None):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]
                     + ([x509.NameAttribute(NameOID.SERIAL_NUMBER, serial)] if serial else []))


def pem(obj) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class RxPki:
    """The prescribers' CA (an internet hospital's), a prescriber (licence D0042, as in the golden Bundle,
    certified for document signing), a CA nobody trusts, and the gateway's release key. The same prescriber's
    key also has a TLS client certificate from the trusted CA (``tls_chain``: its ExtendedKeyUsage forbids
    signing) and a certificate from a department CA under a sub-CA whose pathLenConstraint 0 forbids it
    (``too_deep_chain``)."""

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca = _cert(_name("Prescriber CA"), self.ca_key, _name("Prescriber CA"), self.ca_key, ca=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.chain = [_cert(_name("张医生", "D0042"), self.key, self.ca.subject, self.ca_key, ca=False,
                            purposes=[DOCUMENT_SIGNING])]
        rogue_key = ec.generate_private_key(ec.SECP256R1())
        rogue = _cert(_name("Prescriber CA"), rogue_key, _name("Prescriber CA"), rogue_key, ca=True)
        self.rogue_chain = [_cert(_name("张医生", "D0042"), self.key, rogue.subject, rogue_key, ca=False)]
        self.tls_chain = [_cert(_name("张医生", "D0042"), self.key, self.ca.subject, self.ca_key, ca=False,
                                purposes=[ExtendedKeyUsageOID.CLIENT_AUTH])]
        sub_key, dept_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        sub = _cert(_name("Internet hospital sub-CA"), sub_key, self.ca.subject, self.ca_key, ca=True, path_length=0)
        dept = _cert(_name("Department CA"), dept_key, sub.subject, sub_key, ca=True)
        self.too_deep_chain = [_cert(_name("张医生", "D0042"), self.key, dept.subject, dept_key, ca=False), dept, sub]
        release_key = ec.generate_private_key(ec.SECP256R1())
        self.release_cert = _cert(_name("gatewayd release"), release_key, _name("gatewayd release"), release_key,
                                  ca=False)
        for name, obj in (("prescriber-ca.pem", self.ca), ("release.key", release_key),
                          ("release.pem", self.release_cert)):
            (directory / name).write_bytes(pem(obj))


def signed_bundle(body: dict, key, chain) -> dict:
    """``body`` signed as an internet hospital would, with no gatewayd code: PyJWT's detached JWS (RFC 7797,
    unencoded) over the RFC 8785 canonical JSON of the Bundle without id, meta, text and signature."""
    payload = rfc8785.dumps({k: v for k, v in body.items() if k not in ("id", "meta", "text", "signature")})
    x5c = [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode("ascii") for c in chain]
    jws = jwt.api_jws.encode(payload, key, algorithm="ES256", headers={"b64": False, "crit": ["b64"], "x5c": x5c},
                             is_payload_detached=True)
    return dict(body, signature={"type": [{"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.1"}],
                                 "when": NOW.isoformat(), "who": {"reference": "Practitioner/D0042"},
                                 "sigFormat": "application/jose", "data": base64.b64encode(jws.encode()).decode()})


def golden_bundle() -> dict:
    """The three-item transaction Bundle of tests/golden/pharmacy (unsigned)."""
    return json.loads((GOLDEN / "bundle_three_items.json").read_text(encoding="utf-8"))
