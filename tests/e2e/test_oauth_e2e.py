"""Bearer tokens over the real sockets (SMART Backend Services): with ``outer.tls.client_certificates:
optional`` a platform without a client certificate (as behind a TLS-terminating proxy) gets a token at
POST /oauth/token with a signed JWT assertion and uses it on FHIR requests; every bad assertion is refused
401 invalid_client (alg none, HS/RS confusion, exp too far or past, replayed jti — also after a restart —,
wrong aud, wrong iss, an unknown key); a bad or expired token is 401 with an OperationOutcome and
WWW-Authenticate; certificate platforms keep working.  Assertions are signed by this test's own JWS writer."""

import base64
import json
import time
import uuid

import pytest
import requests
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from tests.e2e.harness import Lock, eventually, read_jsonl

EC_KEY = ec.generate_private_key(ec.SECP384R1())  # platform "proxied", registered as a JWKS (kid p-1)
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # platform "demo", a PEM file
STRANGER = ec.generate_private_key(ec.SECP384R1())
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jws(claims: dict, key, alg: str, kid: str | None = None) -> str:
    header = {"alg": alg, "typ": "JWT", **({"kid": kid} if kid else {})}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}".encode()
    if alg == "ES384":
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA384())))
        sig = r.to_bytes(48, "big") + s.to_bytes(48, "big")
    elif alg == "RS384":
        sig = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA384())
    elif alg == "HS256":
        import hashlib
        import hmac

        sig = hmac.new(key, signing_input, hashlib.sha256).digest()
    else:
        sig = b""
    return f"{signing_input.decode()}.{b64(sig)}"


@pytest.fixture(scope="module")
def lock(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("oauth")
    lock = Lock(workdir, platforms=("demo", "other", "proxied"))
    keys = workdir / "keys"
    keys.mkdir()
    n = EC_KEY.public_key().public_numbers()
    (keys / "proxied.jwks").write_text(json.dumps({"keys": [
        {"kty": "EC", "crv": "P-384", "kid": "p-1", "use": "sig",
         "x": b64(n.x.to_bytes(48, "big")), "y": b64(n.y.to_bytes(48, "big"))}]}))
    (keys / "demo.pem").write_bytes(RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    lock.gateway_config["outer"]["tls"]["client_certificates"] = "optional"
    by_name = {p["name"]: p for p in lock.gateway_config["platforms"]}
    by_name["proxied"].update(scopes=["Slot.read", "Schedule.read"],
                              token={"public_keys": "keys/proxied.jwks", "lifetime": "3s"})
    by_name["demo"]["token"] = {"public_keys": "keys/demo.pem"}
    lock.write_configs()
    with lock:
        lock.token_url = f"https://127.0.0.1:{lock.fhir_port}/oauth/token"
        yield lock


def bare(lock) -> requests.Session:
    """A client without a certificate, as a platform behind a TLS-terminating proxy."""
    s = requests.Session()
    s.trust_env = False
    s.verify = str(lock.certs / "ca.pem")
    return s


def claims(lock, iss="proxied", **over) -> dict:
    now = time.time()
    c = {"iss": iss, "sub": iss, "aud": lock.token_url, "exp": now + 240, "iat": now, "jti": uuid.uuid4().hex}
    c.update(over)
    return c


def ask(lock, assertion: str, scope: str = "system/Slot.read system/Schedule.read system/Appointment.read"):
    return bare(lock).post(lock.token_url, headers=FORM, timeout=10, data={
        "grant_type": "client_credentials", "scope": scope, "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": assertion})


def token(lock, platform="proxied", **kw) -> str:
    key, alg, kid = (EC_KEY, "ES384", "p-1") if platform == "proxied" else (RSA_KEY, "RS384", None)
    r = ask(lock, jws(claims(lock, platform), key, alg, kid), **kw)
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


def bearer_get(lock, tok: str, path: str = "/Slot", **params):
    return bare(lock).get(f"{lock.base}{path}", headers={"Authorization": f"Bearer {tok}"}, params=params, timeout=10)


def test_a_token_from_a_signed_assertion_authenticates_fhir_requests_with_its_scopes(lock):
    r = ask(lock, jws(claims(lock), EC_KEY, "ES384", "p-1"))
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["token_type"] == "bearer" and body["expires_in"] == 3
    assert body["scope"] == "system/Slot.read system/Schedule.read"  # Appointment.read is not granted to it
    slots = bearer_get(lock, body["access_token"], _count=5)
    assert slots.status_code == 200 and slots.json()["resourceType"] == "Bundle" and slots.json()["entry"]
    forbidden = bearer_get(lock, body["access_token"], "/Appointment")
    assert forbidden.status_code == 403 and forbidden.json()["issue"][0]["code"] == "forbidden"


def test_a_client_discovers_the_token_endpoint_and_uses_it(lock):
    """SMART discovery, as a Backend Services client library does it: GET [base]/.well-known/smart-configuration
    without any credentials names the token endpoint and what it takes; an assertion addressed to that
    endpoint gets a token. The CapabilityStatement names the same endpoint (oauth-uris)."""
    found = bare(lock).get(f"{lock.base}/.well-known/smart-configuration", timeout=10)
    assert found.status_code == 200 and found.headers["content-type"].startswith("application/json")
    config = found.json()
    assert config["token_endpoint"] == lock.token_url
    assert "private_key_jwt" in config["token_endpoint_auth_methods_supported"]
    assert {"RS384", "ES384"} <= set(config["token_endpoint_auth_signing_alg_values_supported"])
    assert config["grant_types_supported"] == ["client_credentials"]
    assert "system/Appointment.write" in config["scopes_supported"]
    r = bare(lock).post(config["token_endpoint"], headers=FORM, timeout=10, data={
        "grant_type": "client_credentials", "scope": "system/Slot.read", "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": jws(claims(lock, aud=config["token_endpoint"]), EC_KEY, "ES384", "p-1")})
    assert r.status_code == 200, r.text
    metadata = bearer_get(lock, r.json()["access_token"], "/metadata").json()
    security = metadata["rest"][0]["security"]
    uris = {e["url"]: e["valueUri"] for e in security["extension"][0]["extension"]}
    assert uris == {"token": lock.token_url}
    assert bare(lock).post(f"{lock.base}/.well-known/smart-configuration", timeout=10).status_code == 405


def test_a_token_expires(lock):
    tok = token(lock)
    assert bearer_get(lock, tok, "/metadata").status_code == 200

    def expired():
        r = bearer_get(lock, tok, "/metadata")
        return [r] if r.status_code == 401 else None  # a list: a 401 Response is falsy

    (r,) = eventually(expired, timeout=8, interval=0.5, what="the 3 s token to expire")
    assert r.json()["resourceType"] == "OperationOutcome" and r.json()["issue"][0]["code"] == "expired"
    assert 'error="invalid_token"' in r.headers["www-authenticate"]


def test_an_unknown_token_or_none_at_all_is_401(lock):
    r = bearer_get(lock, "Zm9yZ2VkLXRva2Vu", "/Slot")
    assert r.status_code == 401 and r.json()["resourceType"] == "OperationOutcome"
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith("Bearer ") and 'error="invalid_token"' in challenge
    r = bare(lock).get(f"{lock.base}/Slot", timeout=10)
    assert r.status_code == 401 and r.json()["issue"][0]["code"] == "login"
    assert r.headers["www-authenticate"].startswith("Bearer")


BAD = {
    "alg none": lambda lock: jws(claims(lock), None, "none"),
    "HS256 keyed with the public key": lambda lock: jws(
        claims(lock), (lock.workdir / "keys" / "demo.pem").read_bytes(), "HS256"),
    "exp 10 minutes ahead": lambda lock: jws(claims(lock, exp=time.time() + 600), EC_KEY, "ES384", "p-1"),
    "expired": lambda lock: jws(claims(lock, exp=time.time() - 60), EC_KEY, "ES384", "p-1"),
    "wrong aud": lambda lock: jws(claims(lock, aud=f"{lock.base}/token"), EC_KEY, "ES384", "p-1"),
    "wrong iss": lambda lock: jws(claims(lock, "demo"), EC_KEY, "ES384", "p-1"),
    "unknown key": lambda lock: jws(claims(lock), STRANGER, "ES384", "p-1"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_assertion_is_refused_401_invalid_client(lock, case):
    r = ask(lock, BAD[case](lock))
    assert r.status_code == 401, r.text
    assert r.json()["error"] == "invalid_client" and r.headers["content-type"].startswith("application/json")


def test_other_token_request_errors(lock):
    s = bare(lock)
    r = s.post(lock.token_url, headers=FORM, data={"grant_type": "password"}, timeout=10)
    assert (r.status_code, r.json()["error"]) == (400, "unsupported_grant_type")
    r = ask(lock, jws(claims(lock), EC_KEY, "ES384", "p-1"), scope="system/Appointment.write")
    assert (r.status_code, r.json()["error"]) == (400, "invalid_scope")
    r = s.post(lock.token_url, json={"grant_type": "client_credentials"}, timeout=10)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_request")
    assert s.get(lock.token_url, timeout=10).status_code == 405


def test_certificate_platforms_keep_working(lock):
    """client_certificates: optional changes nothing for a platform that presents its certificate; one from
    another CA is still refused at the handshake."""
    assert lock.session("other").get(f"{lock.base}/Slot", params={"_count": 1}, timeout=10).status_code == 200
    r = lock.session("demo").get(f"{lock.base}/Appointment", timeout=10)
    assert r.status_code == 200  # a platform with token settings may still use its certificate
    rogue = lock.workdir / "rogue"
    from gateway.ops.devca import init_dev_ca

    init_dev_ca(rogue, platforms=("other",))
    with pytest.raises(requests.exceptions.ConnectionError):  # SSLError, or a reset under TLS 1.3
        bare(lock).get(f"{lock.base}/Slot", cert=(str(rogue / "platform-other.pem"), str(rogue / "platform-other.key")),
                       timeout=10)


def test_tokens_and_assertions_stay_out_of_the_log_and_issuance_is_audited(lock):
    assertion = jws(claims(lock), EC_KEY, "ES384", "p-1")
    r = ask(lock, assertion)
    tok = r.json()["access_token"]
    assert bearer_get(lock, tok, "/Slot", _count=1).status_code == 200
    time.sleep(0.3)
    log = lock.gateway.log_path.read_text()
    assert tok not in log and assertion not in log and assertion.split(".")[2] not in log
    events = [e for e in read_jsonl(lock.gateway.log_path) if e.get("event") == "oauth.token_issued"]
    assert events and all(len(e["token"]) == 16 for e in events)


def test_a_replayed_assertion_is_refused_also_after_a_restart_and_tokens_survive_it(lock):
    assertion = jws(claims(lock, "demo"), RSA_KEY, "RS384")
    first = ask(lock, assertion, scope="system/*.read")
    assert first.status_code == 200
    tok = first.json()["access_token"]
    assert ask(lock, assertion, scope="system/*.read").json()["error"] == "invalid_client"
    lock.gateway.stop()
    lock.start_gateway()
    again = ask(lock, assertion, scope="system/*.read")
    assert again.status_code == 401 and "jti" in again.json()["error_description"]
    assert bearer_get(lock, tok, "/Slot", _count=1).status_code == 200


def test_one_address_flooding_the_token_endpoint_is_throttled_alone(lock):
    """outer.token_rate_limit (default 10/s, burst 20) per source address, checked before the global limit:
    a client flooding /oauth/token gets 429 with Retry-After once its own bucket is empty, without using up
    the global limit — a certificate platform's FHIR requests are answered meanwhile — and a good assertion
    gets its token again once the address's bucket has refilled."""
    s = bare(lock)
    answers = [s.post(lock.token_url, headers=FORM, timeout=10, data={"grant_type": "client_credentials"})
               for _ in range(40)]
    throttled = [r for r in answers if r.status_code == 429]
    assert throttled, [r.status_code for r in answers]
    assert {r.status_code for r in answers} - {429} == {401}, [r.text for r in answers[:2]]  # (no assertion)
    assert throttled[0].json()["error"] == "temporarily_unavailable" and int(throttled[0].headers["Retry-After"]) >= 1
    assert lock.session("other").get(f"{lock.base}/Slot", params={"_count": 1}, timeout=10).status_code == 200
    time.sleep(int(throttled[-1].headers["Retry-After"]) + 0.5)
    assert token(lock)
