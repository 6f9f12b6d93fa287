"""Platforms' keys and the tests' own small JWS writer (plain cryptography) for SMART client assertions:
``sign(claims(...))`` is what a platform posts to /oauth/token; ``pem`` and ``jwk`` write the public keys as a
hospital registers them (the ``keyfiles`` and ``clients`` fixtures of tests/conftest.py).  Never the module
under test, nor joserfc, the library it verifies with."""

import base64
import hashlib
import hmac
import json
import uuid

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

AUD = "https://gw.example/oauth/token"
NOW = 1_900_000_000.0
SCOPES = ("Slot.read", "Schedule.read", "Appointment.read", "Appointment.write")

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC384_KEY = ec.generate_private_key(ec.SECP384R1())
EC256_KEY = ec.generate_private_key(ec.SECP256R1())


# -- the test's own JWS writer ----------------------------------------------------------------------------------
def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def sign(claims, key=RSA_KEY, alg="RS384", *, kid=None, header=None, raw_claims=None) -> str:
    head = {"alg": alg, "typ": "JWT", **({"kid": kid} if kid else {}), **(header or {})}
    payload = raw_claims if raw_claims is not None else json.dumps(claims).encode()
    signing_input = f"{b64(json.dumps(head).encode())}.{b64(payload)}".encode()
    digest = hashes.SHA384() if alg.endswith("384") else hashes.SHA256()
    if alg.startswith("RS"):
        sig = key.sign(signing_input, padding.PKCS1v15(), digest)
    elif alg.startswith("ES"):
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(digest)))
        size = (key.curve.key_size + 7) // 8
        sig = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    elif alg.startswith("HS"):
        sig = hmac.new(key, signing_input, hashlib.sha256).digest()
    else:  # "none"
        sig = b""
    return f"{signing_input.decode()}.{b64(sig)}"


def claims(iss="demo", *, now=NOW, **over):
    c = {"iss": iss, "sub": iss, "aud": AUD, "exp": now + 240, "iat": now, "jti": uuid.uuid4().hex}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def pem(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def jwk(key, kid, **extra) -> dict:
    numbers = key.public_key().public_numbers()
    if isinstance(key, rsa.RSAPrivateKey):
        out = {"kty": "RSA", "n": b64(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
               "e": b64(numbers.e.to_bytes(3, "big"))}
    else:
        size = (key.curve.key_size + 7) // 8
        out = {"kty": "EC", "crv": {"secp384r1": "P-384", "secp256r1": "P-256"}[key.curve.name],
               "x": b64(numbers.x.to_bytes(size, "big")), "y": b64(numbers.y.to_bytes(size, "big"))}
    return {**out, "kid": kid, **extra}
