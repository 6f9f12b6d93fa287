"""Prescription signatures (gateway/domain/signatures.py): a test CA issues prescriber certificates (valid, expired,
not yet valid, from another CA, under sub-CAs with path length, name and ExtendedKeyUsage constraints); each
refusal the gateway promises is shown to happen with the check it names, a sign -> verify round trip works for
every accepted algorithm, a release signed by the gateway verifies with a few lines of plain ``cryptography``
(what a pharmacy would write) and with PyJWT, and a PyJWT signature verifies here — outside the libraries
gatewayd uses (joserfc, rfc8785). No I/O.
"""

from __future__ import annotations

import base64
import json
import struct
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from gateway.domain.signatures import (
    SignatureError,
    TrustStore,
    canonical_json,
    prescription_payload,
    sign_release,
    verify_detached,
)

NOW = datetime(2030, 1, 7, 8, 0, tzinfo=UTC)
DOCUMENT_SIGNING = x509.ObjectIdentifier("1.3.6.1.5.5.7.3.36")  # id-kp-documentSigning, RFC 9336
DAY = timedelta(days=1)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "互联网医院")])


def _cert(subject, key, issuer_name, issuer_key, *, ca: bool, start=NOW - 30 * DAY, end=NOW + 365 * DAY,
          serial=None, path_length=None, extensions=()):
    """A v3 certificate; ``extensions``: more (extension, critical) pairs (EKU, name constraints, SAN)."""
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name).public_key(key.public_key())
         .serial_number(serial or x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
         .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True))
    for extension, critical in extensions:
        b = b.add_extension(extension, critical=critical)
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                          crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
    else:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                          crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
    return b.sign(issuer_key, hashes.SHA256())


class Pki:
    def __init__(self):
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca = _cert(_name("Prescriber CA"), self.ca_key, _name("Prescriber CA"), self.ca_key, ca=True,
                        start=NOW - 3650 * DAY, end=NOW + 3650 * DAY)
        self.other_key = ec.generate_private_key(ec.SECP256R1())
        self.other_ca = _cert(_name("Prescriber CA"), self.other_key, _name("Prescriber CA"), self.other_key,
                              ca=True, start=NOW - 3650 * DAY, end=NOW + 3650 * DAY)  # same name, other key
        self.int_key = ec.generate_private_key(ec.SECP384R1())
        self.intermediate = _cert(_name("Internet hospital sub-CA"), self.int_key, self.ca.subject, self.ca_key,
                                  ca=True)
        self.trust = TrustStore.from_pem(self.ca.public_bytes(serialization.Encoding.PEM))

    def prescriber(self, key=None, *, issuer="ca", **kw):
        key = key or ec.generate_private_key(ec.SECP256R1())
        issuer_cert, issuer_key = {"ca": (self.ca, self.ca_key), "other": (self.other_ca, self.other_key),
                                   "int": (self.intermediate, self.int_key)}[issuer]
        cert = _cert(_name("张医生 Dr Zhang"), key, issuer_cert.subject, issuer_key, ca=False, **kw)
        chain = [cert, self.intermediate] if issuer == "int" else [cert]
        return key, chain


@pytest.fixture(scope="module")
def pki():
    return Pki()


PRESCRIPTION = {
    "resourceType": "MedicationRequest",
    "id": "server-assigned",
    "status": "active",
    "intent": "order",
    "medicationCodeableConcept": {"text": "阿莫西林胶囊 0.25g"},
    "dosageInstruction": [{"doseAndRate": [{"doseQuantity": {"value": 0.5, "unit": "g"}}]}],
    "dispenseRequest": {"quantity": {"value": 24, "unit": "粒"}},
}
PAYLOAD = prescription_payload(PRESCRIPTION)


def refused(check, jws, trust, payload=PAYLOAD, now=NOW):
    with pytest.raises(SignatureError) as e:
        verify_detached(jws, payload, trust, now)
    assert e.value.check == check, str(e.value)
    return e.value


# -- canonical JSON -----------------------------------------------------------------------------------------


def test_canonical_json_follows_rfc8785_for_what_fhir_needs():
    """Sorted keys (by UTF-16 code units), no whitespace, UTF-8 literal non-ASCII, ES number forms."""
    assert canonical_json({"b": 1, "a": [True, None, "x"]}) == b'{"a":[true,null,"x"],"b":1}'
    assert canonical_json({"药": "阿莫西林"}) == '{"药":"阿莫西林"}'.encode()
    assert canonical_json("\u2028\n\x1f\"\\/") == b'"\xe2\x80\xa8\\n\\u001f\\"\\\\/"'
    numbers = [1.0, 0.5, -0.0, 1e21, 1e20, 1e-7, 1.5e-6, 123.456, 4.5e-10, 333333333.33333329, 2.0**53]
    assert canonical_json(numbers) == \
        b"[1,0.5,0,1e+21,100000000000000000000,1e-7,0.0000015,123.456,4.5e-10,333333333.3333333,9007199254740992]"
    # RFC 8785 3.2.3 sorting example: UTF-16 code units, so U+10000 (a surrogate pair) sorts before U+FB33
    assert canonical_json({"\ufb33": 1, "\U00010000": 2, "\r": 3, "1": 4}) == \
        '{"\\r":3,"1":4,"\U00010000":2,"\ufb33":1}'.encode()


#: RFC 8785 appendix B: IEEE 754 bit patterns and their canonical number text
RFC8785_NUMBERS = [
    ("0000000000000000", "0"), ("8000000000000000", "0"), ("0000000000000001", "5e-324"),
    ("8000000000000001", "-5e-324"), ("7fefffffffffffff", "1.7976931348623157e+308"),
    ("ffefffffffffffff", "-1.7976931348623157e+308"), ("4340000000000000", "9007199254740992"),
    ("c340000000000000", "-9007199254740992"), ("4430000000000000", "295147905179352830000"),
    ("44b52d02c7e14af5", "9.999999999999997e+22"), ("44b52d02c7e14af6", "1e+23"),
    ("44b52d02c7e14af7", "1.0000000000000001e+23"), ("444b1ae4d6e2ef4e", "999999999999999700000"),
    ("444b1ae4d6e2ef4f", "999999999999999900000"), ("444b1ae4d6e2ef50", "1e+21"),
    ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"), ("3eb0c6f7a0b5ed8d", "0.000001"),
    ("41b3de4355555553", "333333333.3333332"), ("41b3de4355555554", "333333333.33333325"),
    ("41b3de4355555555", "333333333.3333333"), ("41b3de4355555556", "333333333.3333334"),
    ("41b3de4355555557", "333333333.33333343"), ("becbf647612f3696", "-0.0000033333333333333333"),
    ("43143ff3c1cb0959", "1424953923781206.2"),
]


@pytest.mark.parametrize("bits,text", RFC8785_NUMBERS)
def test_numbers_match_the_rfc8785_test_vectors(bits, text):
    assert canonical_json(struct.unpack(">d", bytes.fromhex(bits))[0]) == text.encode()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text()
    | st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not 2**53 <= abs(x) < 1e21),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(JSON)
def test_canonical_json_is_json_and_a_fixed_point(value):
    """Any JSON value canonicalizes to JSON that parses back to the same value and canonicalizes to the same
    bytes again: the verifier and the signer can each rebuild the bytes. (Lone surrogates are refused; doubles
    in [2**53, 1e21) are left out: JCS writes them as integers that Python reads back as ints beyond 2**53 - 1,
    which are refused — the documented limit.)"""
    try:
        data = canonical_json(value)
    except ValueError:
        return  # a lone surrogate in some string: refused, as documented
    parsed = json.loads(data)
    assert parsed == value or value != value  # noqa: PLR0124 (NaN never generated; -0.0 == 0)
    assert canonical_json(parsed) == data


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 2**53 + 1, 2**53, -(2**53), {1: "x"}, "\ud800",
                                 {"\udfff": 1}, b"bytes"])
def test_canonical_json_refuses_what_has_no_canonical_form(bad):
    """NaN, Infinity, lone surrogates, non-text names, and integers outside I-JSON's +/-(2**53 - 1): 2**53
    itself is refused too, since the double 2**53 is also what 2**53 + 1 rounds to."""
    with pytest.raises(ValueError):
        canonical_json(bad)


def test_the_payload_leaves_out_id_meta_text_and_signature():
    assert b"server-assigned" not in PAYLOAD
    assert prescription_payload({**PRESCRIPTION, "meta": {"versionId": "2"}, "signature": {"data": "x"}}) == PAYLOAD


# -- round trips --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg,make_key", [
    ("ES256", lambda: ec.generate_private_key(ec.SECP256R1())),
    ("ES384", lambda: ec.generate_private_key(ec.SECP384R1())),
    ("RS256", lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    ("PS256", lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)),
])
def test_sign_then_verify_round_trip(pki, alg, make_key):
    key, chain = pki.prescriber(make_key())
    jws = sign_release(PRESCRIPTION, key, chain, alg=alg)
    header_b64, empty, _ = jws.split(".")
    assert empty == ""
    header = json.loads(base64.urlsafe_b64decode(header_b64 + "=="))
    assert header["alg"] == alg and header["b64"] is False and header["crit"] == ["b64"]
    result = verify_detached(jws, PAYLOAD, pki.trust, NOW)
    assert result.alg == alg
    assert "Dr Zhang" in result.signer_subject
    assert result.signer_serial == format(chain[0].serial_number, "X")
    assert result.verified_at == NOW
    assert json.loads(json.dumps(result.to_json()))["signer_serial"] == result.signer_serial


def test_a_chain_through_an_intermediate_verifies(pki):
    key, chain = pki.prescriber(issuer="int")
    result = verify_detached(sign_release(PAYLOAD, key, chain), PAYLOAD, pki.trust, NOW)
    assert "sub-CA" in result.issuer and "Prescriber CA" in result.anchor_subject


def test_a_release_verifies_with_plain_cryptography_outside_gatewayd(pki):
    """What a pharmacy does with the gateway's certificate: rebuild header..payload and verify ECDSA."""
    key, chain = pki.prescriber()
    jws = sign_release(PRESCRIPTION, key, chain)
    header_b64, _, sig_b64 = jws.split(".")
    signed = header_b64.encode() + b"." + json.dumps(
        {k: v for k, v in PRESCRIPTION.items() if k not in ("id", "meta", "text", "signature")},
        ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()  # JCS == sort_keys here (ASCII keys)
    sig = base64.urlsafe_b64decode(sig_b64 + "=" * (-len(sig_b64) % 4))
    chain[0].public_key().verify(
        encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")), signed,
        ec.ECDSA(hashes.SHA256()))


# -- refusals -----------------------------------------------------------------------------------------------


def test_unsigned_is_refused(pki):
    refused("missing", None, pki.trust)
    refused("missing", "", pki.trust)


def test_tampered_payload_is_refused(pki):
    key, chain = pki.prescriber()
    jws = sign_release(PAYLOAD, key, chain)
    tampered = prescription_payload({**PRESCRIPTION, "dispenseRequest": {"quantity": {"value": 240, "unit": "粒"}}})
    err = refused("signature", jws, pki.trust, payload=tampered)
    assert "altered" in str(err)


def test_signed_with_another_key_than_the_certificate_is_refused(pki):
    """A well-formed JWS whose x5c names another prescriber's (valid, trusted) certificate."""
    key, _ = pki.prescriber()
    _, other_chain = pki.prescriber()
    header = {"alg": "ES256", "b64": False, "crit": ["b64"],
              "x5c": [base64.b64encode(other_chain[0].public_bytes(serialization.Encoding.DER)).decode()]}
    header_b64 = base64.urlsafe_b64encode(canonical_json(header)).rstrip(b"=").decode()
    r, s = decode_dss_signature(key.sign(header_b64.encode() + b"." + PAYLOAD, ec.ECDSA(hashes.SHA256())))
    sig = base64.urlsafe_b64encode(r.to_bytes(32, "big") + s.to_bytes(32, "big")).rstrip(b"=").decode()
    refused("signature", f"{header_b64}..{sig}", pki.trust)


def test_a_certificate_not_for_signatures_is_refused(pki):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("tls only")).issuer_name(pki.ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY).not_valid_after(NOW + DAY)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=True,
                                         data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(pki.ca_key, hashes.SHA256()))
    jws = _forge({"alg": "ES256", "b64": False, "crit": ["b64"],
                  "x5c": [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]})
    refused("key", jws, pki.trust)


def test_a_certificate_from_another_ca_is_refused(pki):
    key, chain = pki.prescriber(issuer="other")  # issuer has the trusted CA's name, but another key
    err = refused("untrusted", sign_release(PAYLOAD, key, chain), pki.trust)
    assert "Prescriber CA" in str(err)


def test_a_self_signed_signer_is_refused(pki):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert(_name("self"), key, _name("self"), key, ca=False)
    refused("untrusted", sign_release(PAYLOAD, key, [cert]), pki.trust)


def test_an_expired_certificate_is_refused(pki):
    key, chain = pki.prescriber(start=NOW - 400 * DAY, end=NOW - DAY)
    err = refused("expired", sign_release(PAYLOAD, key, chain), pki.trust)
    assert "expired" in str(err)


def test_a_not_yet_valid_certificate_is_refused(pki):
    key, chain = pki.prescriber(start=NOW + DAY, end=NOW + 400 * DAY)
    refused("not-yet-valid", sign_release(PAYLOAD, key, chain), pki.trust)


def _forge(header: dict, signature: bytes = b"\0" * 64) -> str:
    enc = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
    return f"{enc(json.dumps(header).encode())}..{enc(signature)}"


@pytest.mark.parametrize("alg", ["none", "HS256", "HS512", "ES512", None, "RS384", ["ES256"], {"ES256": 1}])
def test_alg_none_hmac_and_unlisted_algorithms_are_refused(pki, alg):
    _, chain = pki.prescriber()
    x5c = [base64.b64encode(chain[0].public_bytes(serialization.Encoding.DER)).decode()]
    refused("algorithm", _forge({"alg": alg, "b64": False, "crit": ["b64"], "x5c": x5c}), pki.trust)


def test_hmac_with_the_certificate_as_secret_is_refused(pki):
    """The classic confusion attack: HS256 keyed with the public certificate bytes."""
    import hmac as _hmac
    _, chain = pki.prescriber()
    der = chain[0].public_bytes(serialization.Encoding.DER)
    header = {"alg": "HS256", "b64": False, "crit": ["b64"], "x5c": [base64.b64encode(der).decode()]}
    h = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=")
    mac = _hmac.new(der, h + b"." + PAYLOAD, "sha256").digest()
    refused("algorithm", _forge(header, mac), pki.trust)


@pytest.mark.parametrize("change", [
    {"b64": True}, {"b64": None}, {"crit": []}, {"crit": ["b64", "exp"]}, {"x5c": []}, {"x5c": None},
])
def test_header_without_the_agreed_parameters_is_refused(pki, change):
    _, chain = pki.prescriber()
    header = {"alg": "ES256", "b64": False, "crit": ["b64"],
              "x5c": [base64.b64encode(chain[0].public_bytes(serialization.Encoding.DER)).decode()]}
    header.update(change)
    header = {k: v for k, v in header.items() if v is not None}
    refused("header", _forge(header), pki.trust)


@pytest.mark.parametrize("jws", ["abc", "a.b.c", "!!!..AAAA", "e30..", "WzFd..AAAA", "bm90IGpzb24..AAAA"])
def test_malformed_jws_is_refused(pki, jws):
    refused("malformed", jws, pki.trust)


def test_an_attached_payload_is_refused(pki):
    key, chain = pki.prescriber()
    h, _, s = sign_release(PAYLOAD, key, chain).split(".")
    refused("malformed", f"{h}.{base64.urlsafe_b64encode(PAYLOAD).decode().rstrip('=')}.{s}", pki.trust)


def test_a_key_that_does_not_fit_the_algorithm_is_refused(pki):
    key, chain = pki.prescriber(ec.generate_private_key(ec.SECP384R1()))
    jws = sign_release(PAYLOAD, key, chain)  # ES384
    h = json.loads(base64.urlsafe_b64decode(jws.split(".")[0] + "=="))
    h["alg"] = "ES256"
    refused("key", _forge(h), pki.trust)


def test_a_ca_certificate_cannot_sign_a_prescription(pki):
    jws = _forge({"alg": "ES256", "b64": False, "crit": ["b64"],
                  "x5c": [base64.b64encode(pki.ca.public_bytes(serialization.Encoding.DER)).decode()]})
    refused("key", jws, pki.trust)


def test_a_certificate_whose_key_cannot_be_read_is_refused_not_a_crash(pki):
    """A certificate that parses but whose EC point is not on the curve (one byte changed)."""
    _, chain = pki.prescriber()
    der = chain[0].public_bytes(serialization.Encoding.DER)
    point = chain[0].public_key().public_bytes(serialization.Encoding.X962,
                                               serialization.PublicFormat.UncompressedPoint)
    end = der.index(point) + len(point) - 1
    broken = der[:end] + bytes([der[end] ^ 1]) + der[end + 1:]
    refused("key", _forge({"alg": "ES256", "b64": False, "crit": ["b64"], "x5c": [base64.b64encode(broken).decode()]}),
            pki.trust)


def test_an_x5c_entry_that_is_not_a_certificate_is_refused(pki):
    refused("certificate", _forge({"alg": "ES256", "b64": False, "crit": ["b64"], "x5c": ["bm90IGEgY2VydA=="]}),
            pki.trust)


def test_a_broken_chain_is_refused(pki):
    key, chain = pki.prescriber(issuer="int")
    jws = sign_release(PAYLOAD, key, [chain[0], pki.ca])  # leaf not issued by the root directly
    refused("chain", jws, pki.trust)


def test_sign_release_refuses_a_key_that_is_not_the_certificates(pki):
    _, chain = pki.prescriber()
    with pytest.raises(ValueError):
        sign_release(PAYLOAD, ec.generate_private_key(ec.SECP256R1()), chain)


def test_now_must_be_aware(pki):
    key, chain = pki.prescriber()
    with pytest.raises(ValueError):
        verify_detached(sign_release(PAYLOAD, key, chain), PAYLOAD, pki.trust, NOW.replace(tzinfo=None))


def test_pss_signature_is_checked_with_pss_not_pkcs1(pki):
    key, chain = pki.prescriber(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    jws = sign_release(PAYLOAD, key, chain, alg="RS256")
    h = json.loads(base64.urlsafe_b64decode(jws.split(".")[0] + "=="))
    h["alg"] = "PS256"
    hb = base64.urlsafe_b64encode(canonical_json(h)).rstrip(b"=").decode()
    sig = key.sign(hb.encode() + b"." + PAYLOAD, padding.PKCS1v15(), hashes.SHA256())
    refused("signature", f"{hb}..{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}", pki.trust)


# -- the chain under RFC 5280 rules (cryptography.x509.verification) ---------------------------------------------


def _ca(pki, cn, *, issuer=None, issuer_key=None, **kw):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert(_name(cn), key, (issuer or pki.ca).subject, issuer_key or pki.ca_key, ca=True, **kw)
    return key, cert


def _signer(issuer_cert, issuer_key, extensions=()):
    key = ec.generate_private_key(ec.SECP256R1())
    return key, _cert(_name("张医生 Dr Zhang"), key, issuer_cert.subject, issuer_key, ca=False, extensions=extensions)


def test_a_ca_whose_path_length_forbids_the_chain_is_refused(pki):
    """The sub-CA may issue only end-entity certificates (pathLenConstraint 0); a CA under it issuing the
    signer's certificate makes a chain RFC 5280 forbids, although every signature in it is good."""
    sub_key, sub = _ca(pki, "Internet hospital sub-CA", path_length=0)
    dept_key, dept = _ca(pki, "Department CA", issuer=sub, issuer_key=sub_key)
    key, leaf = _signer(dept, dept_key)
    err = refused("chain", sign_release(PAYLOAD, key, [leaf, dept, sub]), pki.trust)
    assert "path length" in str(err)
    key, leaf = _signer(sub, sub_key)  # directly under the sub-CA: allowed
    assert verify_detached(sign_release(PAYLOAD, key, [leaf, sub]), PAYLOAD, pki.trust, NOW)


def test_a_signer_outside_its_cas_name_constraints_is_refused(pki):
    """The hospital's sub-CA may certify only hospital-a.cn mailboxes; a signer named dr@evil.example under it
    is refused, one at the hospital is taken."""
    constraints = x509.NameConstraints(permitted_subtrees=[x509.RFC822Name("hospital-a.cn")], excluded_subtrees=None)
    sub_key, sub = _ca(pki, "Hospital A sub-CA", extensions=[(constraints, True)])

    def signer(mailbox):
        return _signer(sub, sub_key, [(x509.SubjectAlternativeName([x509.RFC822Name(mailbox)]), False)])

    key, leaf = signer("dr@evil.example")
    err = refused("chain", sign_release(PAYLOAD, key, [leaf, sub]), pki.trust)
    assert "name constraint" in str(err)
    key, leaf = signer("dr.zhang@hospital-a.cn")
    assert verify_detached(sign_release(PAYLOAD, key, [leaf, sub]), PAYLOAD, pki.trust, NOW)


def test_a_directory_name_constraint_that_cannot_be_checked_refuses_the_chain(pki):
    """A critical constraint on the subject's directory name cannot be evaluated (cryptography matches names
    in subjectAltName only): the chain is refused rather than the constraint ignored."""
    allowed = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Hospital A")])
    constraints = x509.NameConstraints(permitted_subtrees=[x509.DirectoryName(allowed)], excluded_subtrees=None)
    sub_key, sub = _ca(pki, "Hospital A sub-CA", extensions=[(constraints, True)])
    key, leaf = _signer(sub, sub_key)  # its subject's O is 互联网医院, outside the subtree
    refused("chain", sign_release(PAYLOAD, key, [leaf, sub]), pki.trust)


@pytest.mark.parametrize("purposes", [[ExtendedKeyUsageOID.SERVER_AUTH], [ExtendedKeyUsageOID.CLIENT_AUTH],
                                      [ExtendedKeyUsageOID.CODE_SIGNING, ExtendedKeyUsageOID.TIME_STAMPING]])
def test_a_signer_whose_extended_key_usage_forbids_signing_documents_is_refused(pki, purposes):
    """A TLS or code-signing certificate (its ExtendedKeyUsage names only those purposes) cannot sign a
    prescription, although its KeyUsage has digitalSignature."""
    key, leaf = _signer(pki.ca, pki.ca_key, [(x509.ExtendedKeyUsage(purposes), False)])
    x5c = [base64.b64encode(leaf.public_bytes(serialization.Encoding.DER)).decode()]
    err = refused("key", _forge({"alg": "ES256", "b64": False, "crit": ["b64"], "x5c": x5c}), pki.trust)
    assert "ExtendedKeyUsage" in str(err)
    with pytest.raises(SignatureError, match="ExtendedKeyUsage"):  # nor does the gateway sign with one
        sign_release(PAYLOAD, key, [leaf])


@pytest.mark.parametrize("purposes", [[DOCUMENT_SIGNING], [ExtendedKeyUsageOID.EMAIL_PROTECTION,
                                                           ExtendedKeyUsageOID.CLIENT_AUTH],
                                      [ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE]])
def test_a_signer_whose_extended_key_usage_allows_signing_documents_is_taken(pki, purposes):
    key, leaf = _signer(pki.ca, pki.ca_key, [(x509.ExtendedKeyUsage(purposes), False)])
    assert verify_detached(sign_release(PAYLOAD, key, [leaf]), PAYLOAD, pki.trust, NOW)


def test_a_ca_whose_extended_key_usage_is_for_tls_cannot_certify_a_signer(pki):
    """ExtendedKeyUsage in a CA certificate limits what it may certify: a TLS-only sub-CA's signer is refused."""
    sub_key, sub = _ca(pki, "TLS sub-CA", extensions=[(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                                                        False)])
    key, leaf = _signer(sub, sub_key)
    err = refused("chain", sign_release(PAYLOAD, key, [leaf, sub]), pki.trust)
    assert "TLS sub-CA" in str(err)


def test_an_intermediate_that_is_not_a_ca_is_refused(pki):
    not_ca_key = ec.generate_private_key(ec.SECP256R1())
    not_ca = _cert(_name("Another doctor"), not_ca_key, pki.ca.subject, pki.ca_key, ca=False)
    key, leaf = _signer(not_ca, not_ca_key)
    refused("chain", sign_release(PAYLOAD, key, [leaf, not_ca]), pki.trust)


def test_an_expired_trusted_ca_is_refused(pki):
    old_root = _cert(pki.ca.subject, pki.ca_key, pki.ca.subject, pki.ca_key, ca=True, start=NOW - 3650 * DAY,
                     end=NOW - DAY)
    trust = TrustStore.from_pem(old_root.public_bytes(serialization.Encoding.PEM))
    key, chain = pki.prescriber()
    err = refused("expired", sign_release(PAYLOAD, key, chain), trust)
    assert "trusted CA" in str(err)


def test_a_header_nested_beyond_reason_is_malformed_not_a_crash(pki):
    deep = base64.urlsafe_b64encode(b"[" * 40000).rstrip(b"=").decode()
    refused("malformed", f"{deep}..AAAA", pki.trust)


# -- interoperability with an independent JOSE library (PyJWT) ---------------------------------------------------


def test_a_prescriber_signing_with_pyjwt_is_verified(pki):
    """A platform that signs with PyJWT (RFC 7797 detached, unencoded payload, x5c) is understood."""
    import jwt

    key, chain = pki.prescriber()
    x5c = [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode() for c in chain]
    token = jwt.api_jws.encode(PAYLOAD, key, algorithm="ES256", headers={"b64": False, "crit": ["b64"], "x5c": x5c},
                               is_payload_detached=True)
    assert token.split(".")[1] == ""
    assert verify_detached(token, PAYLOAD, pki.trust, NOW).alg == "ES256"


@pytest.mark.parametrize("alg,make_key", [
    ("ES256", lambda: ec.generate_private_key(ec.SECP256R1())),
    ("PS256", lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)),
])
def test_a_release_verifies_with_pyjwt(pki, alg, make_key):
    """A pharmacy using PyJWT verifies the gateway's release signature; an altered payload fails there too."""
    import jwt

    key, chain = pki.prescriber(make_key())
    token = sign_release(PRESCRIPTION, key, chain, alg=alg)
    assert jwt.api_jws.decode_complete(token, chain[0].public_key(), algorithms=[alg], detached_payload=PAYLOAD)
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.api_jws.decode_complete(token, chain[0].public_key(), algorithms=[alg],
                                    detached_payload=PAYLOAD.replace(b"24", b"240"))
