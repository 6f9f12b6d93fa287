"""Fuzz harness: what an anonymous client hands the token endpoint (adapters/outer/oauth.py) — the signed
client assertion (`verify_assertion`) and the requested scope (`granted_scopes`).

Input: byte 0 picks what the rest is (even: a client assertion, odd: a scope string), the rest is that text
(UTF-8, invalid bytes replaced, as a form field arrives decoded). One platform, ``demo``, is registered with
the P-256 key below (ES256 only); the audience is ``AUDIENCE``; the time is ``NOW`` (the seeds were signed for
it: `python -m tests.fuzz.fuzz_token --seeds DIR` writes them).

Invariants (anything else is a crash):
* `verify_assertion` returns, or raises OAuthError ``invalid_client``; nothing else. When it returns, the
  assertion is a compact JWS whose ES256 signature verifies with the registered key by an independent check
  (cryptography, not joserfc), whose header names no ``crit`` and whose claims are what the gateway's policy
  asks: iss = sub = ``demo``, aud = ``AUDIENCE``, exp after NOW - skew and at most 5 minutes (+ skew) ahead,
  a printable jti of 1-255 characters — and the platform it names is ``demo``.
* `granted_scopes` returns a non-empty tuple of the configured scopes, in their configured order, or raises
  OAuthError ``invalid_scope``; nothing else.
"""

from __future__ import annotations

import base64
import json
import sys

import atheris

with atheris.instrument_imports(include=["adapters.outer.oauth"]):
    from adapters.outer.oauth import (CLOCK_SKEW, MAX_ASSERTION_LIFETIME, ClientKey, OAuthClient, OAuthError,
                                      granted_scopes, verify_assertion)

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from tests.fuzz.campaign import main

#: a key for this harness only (never a platform's)
PRIVATE_PEM = b"""-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgi6rv4Dvwdd+HJHBo
60AzlRMB46twt8an95u7oJIho8yhRANCAASJRBbjsG4FioHTRcbXMTFWEPNB130B
rHHilC+nRrDkPlTO1fsjnH7zxm507c/HzOMP6LuaD39Z0th5aA9Eut1s
-----END PRIVATE KEY-----
"""
PRIVATE = serialization.load_pem_private_key(PRIVATE_PEM, None)
PUBLIC = PRIVATE.public_key()
AUDIENCE = "https://gateway.example.cn:8443/oauth/token"
NOW = 1_900_000_000.0
SCOPES = ("Slot.read", "Schedule.read", "Appointment.read", "Appointment.write", "MedicationRequest.write")
CLIENTS = {"demo": OAuthClient("demo", (ClientKey(PUBLIC, kid="k1"),), algorithms=frozenset({"ES256"}),
                               scopes=SCOPES)}


def _b64(data: str) -> bytes:
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


def signature_verifies(assertion: str) -> bool:
    header, payload, signature = assertion.split(".")
    raw = _b64(signature)
    if len(raw) != 64:
        return False
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    try:
        PUBLIC.verify(der, f"{header}.{payload}".encode("ascii"), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def check_verified(assertion: str, verified) -> None:
    assert verified.platform == "demo", verified
    assert signature_verifies(assertion), assertion
    header_b64, payload_b64, _ = assertion.split(".")
    header, claims = json.loads(_b64(header_b64)), json.loads(_b64(payload_b64))
    assert header.get("alg") == "ES256" and "crit" not in header, header
    assert claims["iss"] == claims["sub"] == "demo" and claims["aud"] in (AUDIENCE, [AUDIENCE]), claims
    assert NOW - CLOCK_SKEW < claims["exp"] <= NOW + MAX_ASSERTION_LIFETIME + CLOCK_SKEW, claims
    jti = claims["jti"]
    assert isinstance(jti, str) and 1 <= len(jti) <= 255 and all("\x21" <= c <= "\x7e" for c in jti), claims
    assert verified.jti == jti, (verified, claims)


def check(data: bytes) -> None:
    if not data:
        return
    text = data[1:].decode("utf-8", "replace")
    if data[0] % 2 == 0:
        try:
            verified = verify_assertion(text, CLIENTS, AUDIENCE, NOW)
        except OAuthError as e:
            assert e.error == "invalid_client", (e.error, e.description)
            return
        check_verified(text, verified)
    else:
        try:
            granted = granted_scopes(text, SCOPES)
        except OAuthError as e:
            assert e.error == "invalid_scope", (e.error, e.description)
            return
        assert granted and list(granted) == [s for s in SCOPES if s in granted], granted


def write_seeds(directory: str) -> None:
    """The seeds: assertions signed for NOW (valid, and with each claim the policy refuses), and scopes."""
    import pathlib

    import jwt

    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    good = {"iss": "demo", "sub": "demo", "aud": AUDIENCE, "exp": int(NOW) + 240, "jti": "seed-1"}
    variants = {
        "valid": good,
        "valid_aud_list": {**good, "aud": [AUDIENCE], "jti": "seed-2"},
        "expired": {**good, "exp": int(NOW) - 60},
        "too_long": {**good, "exp": int(NOW) + 3600},
        "other_sub": {**good, "sub": "other"},
        "other_aud": {**good, "aud": "https://elsewhere/oauth/token"},
        "no_jti": {k: v for k, v in good.items() if k != "jti"},
        "unknown_iss": {**good, "iss": "nobody", "sub": "nobody"},
    }
    for name, claims in variants.items():
        token = jwt.encode(claims, PRIVATE, algorithm="ES256", headers={"kid": "k1"})
        (out / f"assertion_{name}").write_bytes(b"\x00" + token.encode("ascii"))
    (out / "assertion_crit").write_bytes(b"\x00" + jwt.encode(good, PRIVATE, algorithm="ES256",
                                                               headers={"crit": ["exp"], "exp": 1}).encode())
    for i, scope in enumerate(("system/Slot.read system/Appointment.write", "system/*.read", "system/Appointment.cruds",
                               "patient/Slot.read", "system/*.*", "Slot.read")):
        (out / f"scope_{i}").write_bytes(b"\x01" + scope.encode("ascii"))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--seeds"]:
        write_seeds(sys.argv[2])
    else:
        main(check)
