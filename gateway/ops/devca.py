"""Development certificates: a throw-away CA, the gateway's server certificate, platform client certificates.

FOR DEVELOPMENT AND TESTING ONLY. The private keys are written unencrypted (PKCS#8 PEM, file mode 0600)
so that a developer's gateway, the HIS simulator and demo platforms can start without a passphrase. In
production the hospital's own CA issues the certificates and the keys never come from this module.

``init_dev_ca(DIR)`` writes into DIR:

=======================  ====================================================================
``ca.pem``, ``ca.key``   the dev CA (CN 'gatewayd development CA'); gatewayd trusts client
                         certificates issued by it, and platforms trust the server with it
``server.pem/.key``      the gateway's TLS server certificate, with a subjectAltName for each
                         server name (DNS names and IP addresses), extended key usage serverAuth
``platform-<name>.pem``  one client certificate per platform, subject ``CN=platform-<name>,
``platform-<name>.key``  O=gatewayd dev``, extended key usage clientAuth
=======================  ====================================================================

``write_crl(DIR, [certificate paths])`` writes ``crl.pem``, a CRL of the dev CA revoking those certificates
(for ``outer.tls.crl``).

All keys are EC P-256 and all signatures ECDSA with SHA-256. Files that already exist are kept (so running
it again is harmless) unless ``overwrite=True``; a missing platform certificate is issued from the existing
CA. When the CA itself is created (first run, or ``overwrite``), every other certificate is issued anew,
because certificates from an earlier CA would no longer be trusted. Leftovers that cannot work (a
certificate without its key, a key that does not match its certificate, a certificate from another CA)
raise ``DevCAError`` rather than being replaced silently.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import tempfile
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ['DevCAError', 'init_dev_ca', 'issue_client_cert', 'write_crl', 'CA_COMMON_NAME', 'ORGANIZATION']

CA_COMMON_NAME = 'gatewayd development CA'
ORGANIZATION = 'gatewayd dev'
CLOCK_SKEW = datetime.timedelta(minutes=5)
"""Certificates are valid from a few minutes in the past, so a peer whose clock is slightly behind
accepts them."""

_PLATFORM_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9._-]{0,54}')
_KEY_MODE = 0o600
_CERT_MODE = 0o644


class DevCAError(Exception):
    """The certificate directory is in a state the tool will not repair on its own."""


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------

def init_dev_ca(directory: Path, *, platforms: Sequence[str] = ('demo',),
                server_names: Sequence[str] = ('localhost', '127.0.0.1'), days: int = 825,
                overwrite: bool = False, now: datetime.datetime | None = None) -> dict[str, Path]:
    """Create (or complete) a development CA with a server certificate and platform client certificates.

    DEVELOPMENT ONLY: keys are unencrypted PKCS#8 PEM files with mode 0600.

    Returns the paths by name: ``'ca'``, ``'ca_key'``, ``'server'``, ``'server_key'``, and
    ``'platform-<name>'``, ``'platform-<name>_key'`` for each platform, whether the files were created now
    or already existed. ``days`` is the validity of new certificates (825 days is the longest that common
    TLS clients accept for a server certificate); ``now`` (UTC) defaults to the current time.
    """
    directory = Path(directory)
    for name in platforms:
        _check_platform_name(name)
    sans = _subject_alt_names(server_names)
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    now = _utc_now(now)
    directory.mkdir(parents=True, exist_ok=True)

    paths: dict[str, Path] = {}
    ca_cert, ca_key, ca_created = _ensure_ca(directory, days, overwrite, now)
    paths['ca'], paths['ca_key'] = directory / 'ca.pem', directory / 'ca.key'
    reissue = overwrite or ca_created

    first_name = str(server_names[0])
    paths['server'], paths['server_key'] = _ensure_leaf(
        directory, 'server', ca_cert, ca_key, reissue, now, days,
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, first_name[:64]),
                           x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)]),
        usage=ExtendedKeyUsageOID.SERVER_AUTH, sans=sans)
    for name in platforms:
        cert_path, key_path = _ensure_platform(directory, name, ca_cert, ca_key, reissue, now, days)
        paths[f'platform-{name}'], paths[f'platform-{name}_key'] = cert_path, key_path
    return paths


def issue_client_cert(directory: Path, name: str, *, days: int = 825, overwrite: bool = False,
                      now: datetime.datetime | None = None) -> tuple[Path, Path]:
    """Issue ``platform-<name>.pem`` / ``platform-<name>.key`` from the dev CA already in ``directory``.

    ``name`` is the platform's name (``'demo'`` gives ``platform-demo.pem``, subject
    ``CN=platform-demo,O=gatewayd dev``). An existing pair is kept unless ``overwrite``. DEVELOPMENT ONLY:
    the key is written unencrypted with mode 0600. Raises ``DevCAError`` if there is no CA in the
    directory.
    """
    directory = Path(directory)
    _check_platform_name(name)
    ca_pem, ca_key_path = directory / 'ca.pem', directory / 'ca.key'
    if not ca_pem.exists() or not ca_key_path.exists():
        raise DevCAError(f"no development CA in {directory} (ca.pem and ca.key); "
                         f"create one first with 'gatewayd certs init {directory}'")
    ca_cert, ca_key = _load_pair(ca_pem, ca_key_path)
    return _ensure_platform(directory, name, ca_cert, ca_key, overwrite, _utc_now(now), days)


def write_crl(directory: Path, revoked: Sequence[Path], *, days: int = 7, der: bool = False,
              path: Path | None = None, now: datetime.datetime | None = None) -> Path:
    """Write a CRL signed by the dev CA in ``directory`` that revokes the certificates in the PEM files
    ``revoked`` (possibly none): ``crl.pem`` (or ``crl.der`` with ``der``, or ``path``), valid from ``now``
    for ``days`` (a negative number gives a CRL already past its nextUpdate, for tests). Written atomically,
    so a gateway reloading on SIGHUP never reads half a file. DEVELOPMENT ONLY."""
    directory = Path(directory)
    ca_pem, ca_key_path = directory / 'ca.pem', directory / 'ca.key'
    if not ca_pem.exists() or not ca_key_path.exists():
        raise DevCAError(f"no development CA in {directory} (ca.pem and ca.key)")
    ca_cert, ca_key = _load_pair(ca_pem, ca_key_path)
    now = _utc_now(now)
    this_update = min(now, now + datetime.timedelta(days=days)) - CLOCK_SKEW
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(ca_cert.subject)
               .last_update(this_update)
               .next_update(now + datetime.timedelta(days=days)))
    for cert_path in revoked:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(cert.serial_number).revocation_date(this_update).build())
    crl = builder.sign(ca_key, hashes.SHA256())
    target = Path(path) if path is not None else directory / ('crl.der' if der else 'crl.pem')
    _write_atomically(target, crl.public_bytes(serialization.Encoding.DER if der else serialization.Encoding.PEM),
                      _CERT_MODE)
    return target


# --------------------------------------------------------------------------------------------------
# Building certificates
# --------------------------------------------------------------------------------------------------

def _utc_now(now: datetime.datetime | None) -> datetime.datetime:
    if now is None:
        return datetime.datetime.now(datetime.timezone.utc)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    return now


def _check_platform_name(name: str) -> None:
    if not isinstance(name, str) or not _PLATFORM_NAME.fullmatch(name):
        raise ValueError(f"platform name {name!r} must start with a letter or digit and contain only "
                         f"letters, digits, '.', '_' and '-' (at most 55 characters)")


def _subject_alt_names(server_names: Sequence[str]) -> list[x509.GeneralName]:
    if isinstance(server_names, str) or not server_names:
        raise ValueError("server_names must be a non-empty list of DNS names or IP addresses")
    names: list[x509.GeneralName] = []
    for raw in server_names:
        name = str(raw).strip()
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
            continue
        except ValueError:
            pass
        if not name or not name.isascii() or any(c.isspace() for c in name):
            raise ValueError(f"server name {raw!r} is neither an IP address nor an ASCII DNS name "
                             f"(write internationalised names in their xn-- form)")
        names.append(x509.DNSName(name.lower()))
    return names


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _sign(builder: x509.CertificateBuilder, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    return builder.sign(key, hashes.SHA256())


def _make_ca(days: int, now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     key_cert_sign=True, crl_sign=True, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return _sign(builder, key), key


def _make_leaf(subject: x509.Name, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
               usage: x509.ObjectIdentifier, sans: list[x509.GeneralName] | None,
               days: int, now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    not_after = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     key_cert_sign=False, crl_sign=False, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return _sign(builder, ca_key), key


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------

def _ensure_ca(directory: Path, days: int, overwrite: bool, now: datetime.datetime
               ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, bool]:
    cert_path, key_path = directory / 'ca.pem', directory / 'ca.key'
    if not overwrite and (cert_path.exists() or key_path.exists()):
        if not (cert_path.exists() and key_path.exists()):
            present, absent = (cert_path, key_path) if cert_path.exists() else (key_path, cert_path)
            raise DevCAError(f"{present} exists but {absent} does not; restore it, or remove {present} "
                             f"(every certificate it issued becomes useless) and run again")
        cert, key = _load_pair(cert_path, key_path)
        return cert, key, False
    cert, key = _make_ca(days, now)
    _write_pair(cert_path, key_path, cert, key)
    return cert, key, True


def _ensure_platform(directory: Path, name: str, ca_cert: x509.Certificate,
                     ca_key: ec.EllipticCurvePrivateKey, overwrite: bool, now: datetime.datetime,
                     days: int) -> tuple[Path, Path]:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f'platform-{name}'),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)])
    return _ensure_leaf(directory, f'platform-{name}', ca_cert, ca_key, overwrite, now, days,
                        subject=subject, usage=ExtendedKeyUsageOID.CLIENT_AUTH, sans=None)


def _ensure_leaf(directory: Path, stem: str, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                 overwrite: bool, now: datetime.datetime, days: int, *, subject: x509.Name,
                 usage: x509.ObjectIdentifier, sans: list[x509.GeneralName] | None) -> tuple[Path, Path]:
    cert_path, key_path = directory / f'{stem}.pem', directory / f'{stem}.key'
    if not overwrite and (cert_path.exists() or key_path.exists()):
        if not (cert_path.exists() and key_path.exists()):
            present, absent = (cert_path, key_path) if cert_path.exists() else (key_path, cert_path)
            raise DevCAError(f"{present} exists but {absent} does not; remove {present} and run again, "
                             f"or run with overwrite")
        cert, _key = _load_pair(cert_path, key_path)
        try:
            cert.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature):
            raise DevCAError(f"{cert_path} was not issued by the CA in {directory / 'ca.pem'}; remove "
                             f"{cert_path} and {key_path} and run again, or run with overwrite") from None
        return cert_path, key_path
    cert, key = _make_leaf(subject, ca_cert, ca_key, usage, sans, days, now)
    _write_pair(cert_path, key_path, cert, key)
    return cert_path, key_path


def _load_pair(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError as exc:
        raise DevCAError(f"{cert_path} is not a PEM certificate: {exc}") from None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise DevCAError(f"{key_path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise DevCAError(f"{key_path} is not an EC key")
    if key.public_key() != cert.public_key():
        raise DevCAError(f"{key_path} is not the key of {cert_path}")
    return cert, key


def _write_pair(cert_path: Path, key_path: Path, cert: x509.Certificate,
                key: ec.EllipticCurvePrivateKey) -> None:
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    _write_atomically(key_path, key_pem, _KEY_MODE)
    _write_atomically(cert_path, cert.public_bytes(serialization.Encoding.PEM), _CERT_MODE)


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write via a temporary file created with mode 0600 (a key is never readable by others, not even for
    a moment), then set the final mode and rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
