"""Prescription PKI for end-to-end tests: a prescribers' CA and a prescriber (licence D0042, as in the golden
Bundle), a CA nobody trusts, the gateway's release key, and the signed Bundle an internet hospital sends."""

from __future__ import annotations

import base64
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.signatures import prescription_payload, sign_release

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "pharmacy"
NOW = datetime.now(timezone.utc)
PRESCRIBER_SCOPES = ["Slot.read", "MedicationRequest.write", "MedicationRequest.read", "MedicationDispense.read"]


def _cert(subject, key, issuer, issuer_key, *, ca: bool):
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(NOW - timedelta(days=1))
            .not_valid_after(NOW + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=not ca, content_commitment=not ca, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=ca,
                                         crl_sign=ca, encipher_only=False, decipher_only=False), critical=True)
            .sign(issuer_key, hashes.SHA256()))


def _name(cn, serial=None):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]
                     + ([x509.NameAttribute(NameOID.SERIAL_NUMBER, serial)] if serial else []))


def pem(obj) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class RxPki:
    """The prescribers' CA (an internet hospital's), a prescriber (licence D0042, as in the golden Bundle),
    a CA nobody trusts, and the gateway's release key."""

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca = _cert(_name("Prescriber CA"), self.ca_key, _name("Prescriber CA"), self.ca_key, ca=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.chain = [_cert(_name("张医生", "D0042"), self.key, self.ca.subject, self.ca_key, ca=False)]
        rogue_key = ec.generate_private_key(ec.SECP256R1())
        rogue = _cert(_name("Prescriber CA"), rogue_key, _name("Prescriber CA"), rogue_key, ca=True)
        self.rogue_chain = [_cert(_name("张医生", "D0042"), self.key, rogue.subject, rogue_key, ca=False)]
        release_key = ec.generate_private_key(ec.SECP256R1())
        self.release_cert = _cert(_name("gatewayd release"), release_key, _name("gatewayd release"), release_key,
                                  ca=False)
        for name, obj in (("prescriber-ca.pem", self.ca), ("release.key", release_key),
                          ("release.pem", self.release_cert)):
            (directory / name).write_bytes(pem(obj))


def signed_bundle(body: dict, key, chain) -> dict:
    jws = sign_release(prescription_payload(body), key, chain)
    return dict(body, signature={"type": [{"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.1"}],
                                 "when": NOW.isoformat(), "who": {"reference": "Practitioner/D0042"},
                                 "sigFormat": "application/jose", "data": base64.b64encode(jws.encode()).decode()})


def golden_bundle() -> dict:
    """The three-item transaction Bundle of tests/golden/pharmacy (unsigned)."""
    import json

    return json.loads((GOLDEN / "bundle_three_items.json").read_text(encoding="utf-8"))
