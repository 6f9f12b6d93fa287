"""adapters/outer/oauth.py: client assertions are verified (by joserfc, under the gateway's policy) and every kind of
bad one is refused as invalid_client (alg none, HS/RS confusion, exp too far or past, replayed jti — also after
the chamber is reopened —, wrong aud, wrong iss/sub, an unknown key); tokens are stored as hashes only, carry
the granted scopes and expire.  Assertions are signed with the tests' own small JWS writer
(tests/unit/client_assertions.py, plain cryptography) and, as an interoperability check, with PyJWT — never
with the module under test nor with joserfc, the library it verifies with."""

import hashlib
import json
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet import defer, task

from gateway.domain.audit import verify
from gateway.chamber.backends import SqliteBackend
from gateway.chamber.engine import Chamber
from gateway.config.model import load_config
from gateway.config.errors import ConfigError
from gateway.ops.devca import init_dev_ca
from adapters.outer.oauth import (
    ASSERTION_TYPE,
    InvalidToken,
    KeyFileError,
    OAuthClient,
    OAuthError,
    TokenService,
    granted_scopes,
    load_public_keys,
    verify_assertion,
)
from tests.deferreds import failureResultOf, successResultOf
from tests.unit.client_assertions import AUD, EC256_KEY, EC384_KEY, NOW, RSA_KEY, b64, claims, jwk, pem, sign

STRANGER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def refused(clients, assertion, now=NOW) -> OAuthError:
    with pytest.raises(OAuthError) as e:
        verify_assertion(assertion, clients, AUD, now)
    assert e.value.error == "invalid_client" and e.value.status == 401
    return e.value


# -- keys -------------------------------------------------------------------------------------------------------
def test_keys_are_read_from_pem_certificates_and_jwks(keyfiles, tmp_path):
    """PEM public keys and certificates, and a JWKS with kids (an encryption key in it is skipped)."""
    assert len(load_public_keys(keyfiles / "demo.pem")) == 1
    keys = load_public_keys(keyfiles / "other.jwks")
    assert [k.kid for k in keys] == ["ec-1", "ec-2"] and keys[0].fits("ES384") and not keys[0].fits("ES256")
    certs = init_dev_ca(tmp_path / "ca", platforms=("demo",))
    (key,) = load_public_keys(certs["platform-demo"])
    assert key.fits("ES256")
    mixed = tmp_path / "mixed.jwks"
    mixed.write_text(json.dumps({"keys": [jwk(RSA_KEY, "enc", use="enc"), jwk(EC256_KEY, "s", use="sig")]}))
    assert [k.kid for k in load_public_keys(mixed)] == ["s"]


@pytest.mark.parametrize("content, complaint", [
    (lambda: RSA_KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()), "private key"),
    (lambda: json.dumps({"keys": [{**jwk(EC256_KEY, "a"), "d": "AAAA"}]}).encode(), "private or secret"),
    (lambda: json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}).encode(), "private or secret"),
    (lambda: json.dumps({"keys": [{"kty": "oct"}]}).encode(), "never oct"),
    (lambda: pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)), "at least 2048"),
    (lambda: pem(ec.generate_private_key(ec.SECP521R1())), "P-256 or P-384"),
    (lambda: json.dumps({"keys": []}).encode(), "no signing key"),
    (lambda: b"hello", "neither PEM"),
    (lambda: json.dumps({"keys": [{**jwk(EC256_KEY, "a"), "alg": "ES384"}]}).encode(), "does not fit"),
])
def test_unusable_key_files_are_refused_with_the_reason(tmp_path, content, complaint):
    path = tmp_path / "k"
    path.write_bytes(content())
    with pytest.raises(KeyFileError, match=complaint):
        load_public_keys(path)


# -- assertions -------------------------------------------------------------------------------------------------
def test_good_assertions_verify(clients):
    """RS384 with a PEM key; ES384 and ES256 with a JWKS, chosen by kid; aud may be a list."""
    c = claims("demo")
    v = verify_assertion(sign(c), clients, AUD, NOW)
    assert (v.platform, v.jti) == ("demo", c["jti"]) and v.keep_until == c["exp"] + 10
    es384 = sign(claims("other"), EC384_KEY, "ES384", kid="ec-1")
    assert verify_assertion(es384, clients, AUD, NOW).platform == "other"
    assert verify_assertion(sign(claims("other", aud=["x", AUD]), EC256_KEY, "ES256", kid="ec-2"), clients, AUD,
                            NOW).platform == "other"


def test_alg_none_is_refused(clients):
    assert "never none" in refused(clients, sign(claims(), None, "none")).description


@pytest.mark.parametrize("alg", [["RS384"], {"RS384": True}, 384, None])
def test_an_alg_that_is_not_a_name_is_refused_not_a_crash(clients, alg):
    assert "not accepted" in refused(clients, sign(claims(), header={"alg": alg})).description


def test_hs256_signed_with_the_public_key_is_refused(clients):
    """HS/RS confusion: an HMAC keyed with the registered public key's own bytes."""
    forged = sign(claims(), pem(RSA_KEY), "HS256")
    assert "HMAC" in refused(clients, forged).description


def test_an_unknown_key_is_refused(clients):
    assert "unknown key" in refused(clients, sign(claims(), STRANGER_KEY)).description


def test_a_jwks_kid_that_is_not_registered_is_refused(clients):
    assert "kid" in refused(clients, sign(claims("other"), EC384_KEY, "ES384", kid="nope")).description


def test_an_algorithm_the_platform_does_not_use_is_refused(clients):
    """RS256 is a valid algorithm, but demo is registered for RS384/ES384 only."""
    assert "RS256" in refused(clients, sign(claims(), RSA_KEY, "RS256")).description


def test_exp_more_than_five_minutes_ahead_is_refused(clients):
    assert "5 minutes" in refused(clients, sign(claims(exp=NOW + 301 + 10))).description
    assert verify_assertion(sign(claims(exp=NOW + 300)), clients, AUD, NOW)


def test_an_expired_or_exp_less_assertion_is_refused(clients):
    assert "expired" in refused(clients, sign(claims(exp=NOW - 60))).description
    assert "exp" in refused(clients, sign(claims(exp=None))).description
    assert "exp" in refused(clients, sign(claims(exp="soon"))).description
    assert "exp" in refused(clients, sign(claims(exp=float("nan")))).description  # would never expire
    assert "exp" in refused(clients, sign(claims(exp=True))).description


def test_numeric_dates_beyond_any_float_are_refused_not_a_crash(clients):
    """JSON numbers have no size limit: an exp, nbf or iat of 10**400 is an answer (invalid_client), not an
    OverflowError."""
    assert "5 minutes" in refused(clients, sign(claims(exp=10**400))).description
    assert "nbf" in refused(clients, sign(claims(nbf=10**400))).description
    assert "iat" in refused(clients, sign(claims(iat=10**400))).description


def test_wrong_aud_is_refused(clients):
    assert "aud" in refused(clients, sign(claims(aud="https://evil.example/oauth/token"))).description
    assert "aud" in refused(clients, sign(claims(aud=None))).description


def test_wrong_iss_or_sub_is_refused(clients):
    """An unknown issuer; demo's key claiming to be 'other'; iss and sub that differ."""
    assert "iss" in refused(clients, sign(claims("nobody"))).description
    refused(clients, sign(claims("other"), RSA_KEY, "RS384"))
    e = refused(clients, sign(claims("demo", sub="other")))
    assert "sub" in e.description and e.platform == "demo"


def test_other_malformed_assertions_are_refused(clients):
    good = sign(claims())
    h, _p, s = good.split(".")
    tampered = ".".join([h, b64(json.dumps(claims(exp=NOW + 200)).encode()), s])
    refused(clients, tampered)
    refused(clients, good + ".x")
    refused(clients, "a.b")
    refused(clients, "x" * 20000)
    refused(clients, sign(claims(), header={"crit": ["exp"]}))
    refused(clients, sign(None, raw_claims=b'{"iss":"demo","iss":"other"}'))
    refused(clients, sign(claims(jti=None)))
    refused(clients, sign(claims(nbf=NOW + 100)))


def test_pyjwt_assertions_verify(clients):
    """Interoperability: JWTs written by an independent JOSE library (PyJWT, as a platform might use) are
    accepted; its alg=none, an algorithm the platform does not use and an expired one are not."""
    import jwt

    token = jwt.encode(claims(), RSA_KEY, algorithm="RS384")
    assert verify_assertion(token, clients, AUD, NOW).platform == "demo"
    token = jwt.encode(claims("other"), EC384_KEY, algorithm="ES384", headers={"kid": "ec-1"})
    assert verify_assertion(token, clients, AUD, NOW).platform == "other"
    token = jwt.encode(claims("other", aud=["x", AUD]), EC256_KEY, algorithm="ES256", headers={"kid": "ec-2"})
    assert verify_assertion(token, clients, AUD, NOW).platform == "other"
    assert "never none" in refused(clients, jwt.encode(claims(), None, algorithm="none")).description
    refused(clients, jwt.encode(claims(), RSA_KEY, algorithm="RS256"))  # demo signs with RS384/ES384 only
    refused(clients, jwt.encode(claims(exp=NOW - 60), RSA_KEY, algorithm="RS384"))


# -- scopes ---------------------------------------------------------------------------------------------------
def test_scopes_are_the_requested_ones_the_platform_holds():
    held = ("Slot.read", "Schedule.read", "Appointment.write")
    assert granted_scopes("system/Slot.read system/Appointment.write system/Appointment.read", held) == \
        ("Slot.read", "Appointment.write")
    assert granted_scopes("system/*.read", held) == ("Slot.read", "Schedule.read")
    assert granted_scopes("system/Appointment.cruds Slot.read", held) == ("Slot.read", "Appointment.write")
    for bad in ("", None, "patient/Slot.read", "system/Appointment.read", "openid"):
        with pytest.raises(OAuthError) as e:
            granted_scopes(bad, held)
        assert (e.value.error, e.value.status) == ("invalid_scope", 400)


# -- the token service on a real chamber -----------------------------------------------------------------------
class Tokens:
    def __init__(self, backend, clients, clock):
        self.chamber = Chamber(backend=backend, clock=clock.seconds)
        self.chamber.open()
        self.service = TokenService(self.chamber, clients, AUD, clock=clock)

    def request(self, assertion=None, over=None):
        """The token request's Deferred (the chamber answers synchronously without a reactor)."""
        form = {"grant_type": ["client_credentials"], "client_assertion_type": [ASSERTION_TYPE],
                "client_assertion": [assertion], "scope": ["system/Slot.read system/Appointment.write"]}
        form.update(over or {})
        form = {k: v for k, v in form.items() if v is not None}
        return defer.ensureDeferred(self.service.token_request(form, "192.0.2.1"))

    def ask(self, assertion=None, over=None):
        """The token response of a request that was granted."""
        return successResultOf(self.request(assertion, over))

    def table(self, name):
        return [tuple(r) for r in self.chamber.read()._c.execute(f"SELECT * FROM {name}")]


@pytest.fixture
def clock():
    c = task.Clock()
    c.advance(NOW)
    return c


def test_a_token_is_issued_stored_as_a_hash_audited_and_authenticates(tmp_path, clients, clock):
    t = Tokens(SqliteBackend(tmp_path / "c.sqlite3"), clients, clock)  # (it reads the file's bytes: SQLite's)
    answer = t.ask(sign(claims()))
    assert answer["token_type"] == "bearer" and answer["expires_in"] == 300
    assert answer["scope"] == "system/Slot.read system/Appointment.write"
    token = answer["access_token"]
    assert len(token) >= 43
    rows = t.table("oauth_tokens")
    assert rows == [(hashlib.sha256(token.encode()).hexdigest(), "demo", "Slot.read Appointment.write", NOW + 300)]
    raw = (tmp_path / "c.sqlite3").read_bytes() + (tmp_path / "c.sqlite3-wal").read_bytes()
    assert token.encode() not in raw  # only the hash reaches the disk
    grant = t.service.authenticate(token)
    assert (grant.platform, grant.scopes) == ("demo", frozenset({"Slot.read", "Appointment.write"}))
    record = [r for r in t.chamber.read().audit_records() if r.action == "token"]
    assert [(r.outcome, r.platform, r.source) for r in record] == [(200, "demo", "192.0.2.1")]
    assert token not in record[0].detail and verify(t.chamber.read()).ok
    clock.advance(301)
    with pytest.raises(InvalidToken) as e:
        t.service.authenticate(token)
    assert e.value.reason == "expired"
    with pytest.raises(InvalidToken) as e:
        t.service.authenticate("not-a-token-we-issued")
    assert e.value.reason == "unknown"


def test_a_replayed_jti_is_refused_also_after_the_chamber_is_reopened(chamber_backend, clients, clock):
    t = Tokens(chamber_backend(), clients, clock)
    assertion = sign(claims())
    t.ask(assertion)
    e = failureResultOf(t.request(assertion), OAuthError)
    assert (e.value.error, e.value.status) == ("invalid_client", 401) and "jti" in e.value.description
    t.chamber.close()
    again = Tokens(chamber_backend(), clients, clock)  # a restarted gateway: new service, same chamber
    clock.advance(60)
    assert "jti" in str(failureResultOf(again.request(assertion), OAuthError).value)
    refusals = [r for r in again.chamber.read().audit_records() if r.action == "token" and r.outcome == 401]
    assert len(refusals) == 2 and all(r.detail == "invalid_client" for r in refusals)


def test_expired_rows_are_pruned_when_tokens_are_issued(chamber_backend, clients, clock):
    t = Tokens(chamber_backend(), clients, clock)
    t.ask(sign(claims()))
    clock.advance(4000)  # the assertion's jti and the token are long expired
    t.ask(sign(claims(now=clock.seconds())))
    assert len(t.table("oauth_assertions")) == 1 and len(t.table("oauth_tokens")) == 1


def test_a_reload_narrows_what_existing_tokens_grant(chamber_backend, clients, clock):
    """Tokens carry their scopes, but only those the platform still holds count; a platform without
    token settings any more has its tokens refused."""
    t = Tokens(chamber_backend(), clients, clock)
    token = t.ask(sign(claims()))["access_token"]
    t.service.clients = {**clients, "demo": OAuthClient("demo", clients["demo"].keys, scopes=("Slot.read",))}
    assert t.service.authenticate(token).scopes == frozenset({"Slot.read"})
    t.service.clients = {"other": clients["other"]}
    with pytest.raises(InvalidToken):
        t.service.authenticate(token)


@pytest.mark.parametrize("over, error, status", [
    ({"grant_type": ["authorization_code"]}, "unsupported_grant_type", 400),
    ({"grant_type": None}, "invalid_request", 400),
    ({"scope": ["system/Slot.read", "system/Slot.read"]}, "invalid_request", 400),
    ({"client_assertion_type": ["urn:other"]}, "invalid_client", 401),
    ({"client_assertion": None}, "invalid_client", 401),
    ({"scope": ["system/MedicationRequest.read"]}, "invalid_scope", 400),
    ({"client_id": ["other"]}, "invalid_client", 401),
])
def test_token_request_errors_follow_rfc_6749(chamber_backend, clients, clock, over, error, status):
    t = Tokens(chamber_backend(), clients, clock)
    e = failureResultOf(t.request(sign(claims()), over), OAuthError)
    assert (e.value.error, e.value.status) == (error, status)
    assert e.value.body() == {"error": error, "error_description": e.value.description}
    assert t.table("oauth_tokens") == []
    if error == "invalid_scope":  # refused after the signature was verified: the audit names the platform
        assert [r.platform for r in t.chamber.read().audit_records()] == ["demo"]


# -- config ---------------------------------------------------------------------------------------------------
HEAD = """
inner: {his: {host: 127.0.0.1, port: 2576}}
outer:
  tls: {certificate: certs/server.pem, private_key: certs/server.key, client_ca: certs/ca.pem}
"""


def test_token_settings_are_read_and_bad_key_files_named_with_their_key(tmp_path):
    init_dev_ca(tmp_path / "certs")
    (tmp_path / "demo.pem").write_bytes(pem(RSA_KEY))
    (tmp_path / "priv.pem").write_bytes(RSA_KEY.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path = tmp_path / "g.yaml"
    path.write_text(HEAD + """platforms:
  - {name: demo, certificate_subject: CN=platform-demo, token: {public_keys: demo.pem}}
""")
    token = load_config(path).platforms[0].token
    assert (token.algorithms, token.lifetime) == (["RS384", "ES384"], 300)
    path.write_text(HEAD + """platforms:
  - {name: demo, certificate_subject: CN=platform-demo, token: {public_keys: priv.pem, lifetime: 10m}}
  - {name: ec, certificate_subject: CN=ec, token: {public_keys: demo.pem, algorithms: [ES384, HS256]}}
  - {name: es, certificate_subject: CN=es, token: {public_keys: demo.pem, algorithms: [ES256]}}
""")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    text = "\n".join(f"{i.line}:{i.key}: {i.message}" for i in e.value.issues)
    assert "platforms[0].token.lifetime" in text
    assert "platforms[1].token.algorithms[1]" in text
    with pytest.raises(ConfigError) as e:
        path.write_text(HEAD + """platforms:
  - {name: demo, certificate_subject: CN=platform-demo, token: {public_keys: priv.pem}}
  - {name: es, certificate_subject: CN=es, token: {public_keys: demo.pem, algorithms: [ES256]}}
""")
        load_config(path)
    text = "\n".join(f"{i.line}:{i.key}: {i.message}" for i in e.value.issues)
    assert "platforms[0].token.public_keys" in text and "private key" in text
    assert "platforms[1].token.public_keys" in text and "fits ES256" in text


def test_remember_assertion_is_true_once_per_platform_and_jti():
    """The chamber primitive behind replay refusal: the (platform, jti) primary key decides."""
    chamber = Chamber(":memory:", clock=time.time)
    chamber.open()
    assert chamber.transact_now(lambda tx: tx.remember_assertion("demo", "j1", NOW))
    assert not chamber.transact_now(lambda tx: tx.remember_assertion("demo", "j1", NOW))
    assert chamber.transact_now(lambda tx: tx.remember_assertion("other", "j1", NOW))
    assert chamber.transact_now(lambda tx: tx.prune_oauth(NOW + 1)) == (2, 0)
    chamber.close()
