"""Withdrawing a platform's certificate before it expires: a CRL file (PEM or DER, signed by the client CA,
still applied and logged when past its nextUpdate) and SPKI pins, as PlatformDirectory applies them, and
their YAML keys."""

import base64
import datetime
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from structlog.testing import capture_logs

from adapters.outer.access import PlatformDirectory, PlatformGrant, spki_sha256
from adapters.tls import TlsConfigError, load_crl
from gateway.config.model import load_config
from gateway.config.outer import normalise_subject
from gateway.config.errors import ConfigError
from gateway.ops.devca import init_dev_ca, write_crl

PLATFORMS = ("a", "b")


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    d = tmp_path_factory.mktemp("ca")
    init_dev_ca(d, platforms=PLATFORMS)
    return d


def cert(ca, name):
    return x509.load_pem_x509_certificate((ca / f"platform-{name}.pem").read_bytes())


def directory(ca, crl=None, grants=None):
    return PlatformDirectory([(p, normalise_subject(f"CN=platform-{p}")) for p in PLATFORMS], grants or {}, crl)


def test_a_certificate_listed_in_the_crl_is_refused_and_others_are_not(ca, tmp_path):
    for der in (False, True):
        crl = load_crl(write_crl(ca, [ca / "platform-a.pem"], der=der, path=tmp_path / f"crl{der}"), ca / "ca.pem")
        platforms = directory(ca, crl)
        now = datetime.datetime.now(datetime.UTC).timestamp()
        assert "revoked (CRL)" in platforms.certificate_refusal("a", cert(ca, "a"), now)
        assert platforms.certificate_refusal("b", cert(ca, "b"), now) is None


def test_a_crl_from_another_ca_or_not_a_crl_is_refused(ca, tmp_path):
    other = tmp_path / "other"
    init_dev_ca(other)
    with pytest.raises(TlsConfigError, match="not signed by a CA in"):
        load_crl(write_crl(other, []), ca / "ca.pem")
    (tmp_path / "junk.pem").write_text("-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n")
    with pytest.raises(TlsConfigError, match="not a CRL"):
        load_crl(tmp_path / "junk.pem", ca / "ca.pem")


def test_an_expired_crl_is_still_applied_and_logged_once(ca, tmp_path):
    crl = load_crl(write_crl(ca, [ca / "platform-a.pem"], days=-1, path=tmp_path / "old.pem"), ca / "ca.pem")
    now = datetime.datetime.now(datetime.UTC).timestamp()
    assert crl.expired(now)
    platforms = directory(ca, crl)
    with capture_logs() as logs:
        assert platforms.certificate_refusal("a", cert(ca, "a"), now) is not None
        assert platforms.certificate_refusal("b", cert(ca, "b"), now) is None
    assert [e["event"] for e in logs] == ["outer.crl_expired"] and logs[0]["log_level"] == "error"


def test_an_spki_pin_admits_only_its_key(ca):
    pin_a = spki_sha256(cert(ca, "a"))
    platforms = directory(ca, grants={"a": PlatformGrant(spki_pins=frozenset({pin_a})),
                                      "b": PlatformGrant(spki_pins=frozenset({b"\0" * 32, pin_a}))})
    assert platforms.certificate_refusal("a", cert(ca, "a"), 0) is None
    assert "pinned" in platforms.certificate_refusal("b", cert(ca, "b"), 0)


HEAD = """
inner: {his: {host: 127.0.0.1, port: 2576}}
outer:
  tls: {certificate: ca/server.pem, private_key: ca/server.key, client_ca: ca/ca.pem%s}
"""


def test_pins_and_crl_in_the_yaml(ca, tmp_path):
    """Pins in base64 or hex (with or without colons) are the same digest; a CRL from another CA is named
    with its key."""
    import shutil

    shutil.copytree(ca, tmp_path / "ca")
    spki = cert(ca, "a").public_key().public_bytes(serialization.Encoding.DER,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashlib.sha256(spki).digest()
    b64, hex_, colons = base64.b64encode(digest).decode(), digest.hex(), ":".join(f"{b:02X}" for b in digest)
    write_crl(tmp_path / "ca", [tmp_path / "ca" / "platform-b.pem"])
    path = tmp_path / "g.yaml"
    path.write_text(HEAD % ", crl: ca/crl.pem" + f"""platforms:
  - {{name: a, certificate_subject: CN=platform-a, certificate_spki_sha256: ["{b64}", "{hex_}", "{colons}"]}}
""")
    config = load_config(path)
    assert config.platforms[0].spki_pins() == frozenset({digest})
    assert config.outer.tls.crl.name == "crl.pem" and config.outer.tls.client_certificates == "required"

    other = tmp_path / "other"
    init_dev_ca(other)
    write_crl(other, [], path=tmp_path / "foreign.pem")
    path.write_text(HEAD % ", crl: foreign.pem, client_certificates: sometimes" + """platforms:
  - {name: a, certificate_subject: CN=platform-a, certificate_spki_sha256: ["abc"]}
""")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    keys = sorted(i.key for i in e.value.issues)
    assert keys == ["outer.tls.client_certificates", "platforms[0].certificate_spki_sha256[0]"]
    path.write_text(HEAD % ", crl: foreign.pem" + "platforms: [{name: a, certificate_subject: CN=platform-a}]\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert [i.key for i in e.value.issues] == ["outer.tls.crl"] and "not signed" in e.value.issues[0].message
