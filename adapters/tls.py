"""TLS for both gates, from PEM files: what `MLLPServerFactory(tls=...)` and `MLLPClient(tls=...)` take, the
outer gate's CRL, and the switch that lets either gate's listener take new certificates on reload.

* `server_options` - the listener's side (``inner.tls``): our certificate and key, and the CA(s) whose
  certificates the HIS's interface engines must present. With ``require_client_certificate`` (the default)
  a client without a certificate, or with one from another CA, is refused at the handshake: mutual TLS.
* `client_options` - the sender's side (``inner.his.tls``): the CA(s) that sign the HIS's server
  certificate (checked, and its name checked against ``hostname``), and optionally our own certificate and
  key, presented when the HIS asks for one.

* `load_crl` - a certificate revocation list (PEM, several CRLs allowed, or DER), each checked to be
  signed by one of the client CAs; the outer gate (``outer.tls.crl``) refuses certificates it lists.
* `TlsSwitch` - a listener's TLS settings (the outer gate's, the MLLP listener's), replaceable on reload.

TLS 1.2 is the least version offered. Keys must be unencrypted PEM (PKCS#8 or traditional); a certificate
file may carry the chain after the leaf. Errors reading or matching the files raise `TlsConfigError` naming
the file, so a config loader can report them with the key that named the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLContextFactory
from zope.interface import implementer

__all__ = ["RevocationList", "TlsConfigError", "TlsSwitch", "client_options", "load_crl", "server_options"]


class TlsConfigError(ValueError):
    """A PEM file that cannot be used: unreadable, not PEM, no certificate, or a key that does not match."""


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise TlsConfigError(f"{path}: cannot read the {what}: {e.strerror or e}") from None


def _certificates(path: str | Path, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(_read(path, what))
    except ValueError as e:
        raise TlsConfigError(f"{path}: not a PEM {what}: {e}") from None
    if not certs:
        raise TlsConfigError(f"{path}: no certificate in the {what} file")
    return certs


def _key(path: str | Path):
    try:
        return serialization.load_pem_private_key(_read(path, "private key"), password=None)
    except (ValueError, TypeError) as e:
        raise TlsConfigError(f"{path}: not an unencrypted PEM private key: {e}") from None


def _pair(certificate: str | Path, private_key: str | Path) -> tuple[list[x509.Certificate], object]:
    chain = _certificates(certificate, "certificate")
    key = _key(private_key)
    if chain[0].public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise TlsConfigError(f"{private_key}: this private key does not belong to the certificate in {certificate}")
    return chain, key


#: a certificate (PEM chain) and its private key, checked to belong together: (chain, key)
key_pair = _pair


def server_options(
    certificate: str | Path,
    private_key: str | Path,
    ca: str | Path | None,
    *,
    require_client_certificate: bool = True,
) -> ssl.CertificateOptions:
    """Listener TLS: ``certificate`` (PEM, leaf first, then its chain) and ``private_key``; ``ca`` (PEM, one
    or more certificates) signs the clients' certificates. With ``require_client_certificate`` a client must
    present a certificate signed by ``ca``; without it a certificate is asked for and verified when given.
    ``ca=None`` means no client certificates at all (plain server TLS)."""
    chain, key = _pair(certificate, private_key)
    if ca is None:
        if require_client_certificate:
            raise TlsConfigError("a client CA is needed to require client certificates")
        verify = {"verify": False}
    else:
        verify = {
            "verify": True,
            "requireCertificate": require_client_certificate,
            "caCerts": [crypto.X509.from_cryptography(c) for c in _certificates(ca, "CA certificate")],
        }
    return ssl.CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),
        certificate=crypto.X509.from_cryptography(chain[0]),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in chain[1:]],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        **verify,
    )


def client_options(
    hostname: str,
    ca: str | Path,
    certificate: str | Path | None = None,
    private_key: str | Path | None = None,
):
    """Sender TLS towards ``hostname`` (a DNS name or an IP address, checked against the server
    certificate's subjectAltName): the server's certificate must be signed by ``ca`` (PEM, one or more);
    ``certificate``/``private_key`` (both or neither) are presented as our client certificate."""
    if (certificate is None) != (private_key is None):
        raise TlsConfigError("give both a client certificate and its private key, or neither")
    trust = ssl.trustRootFromCertificates(
        [ssl.Certificate(crypto.X509.from_cryptography(c)) for c in _certificates(ca, "CA certificate")]
    )
    client_cert = None
    if certificate is not None:
        chain, key = _pair(certificate, private_key)
        client_cert = ssl.PrivateCertificate.fromCertificateAndKeyPair(
            ssl.Certificate(crypto.X509.from_cryptography(chain[0])),
            ssl.KeyPair(crypto.PKey.from_cryptography_key(key)),
        )
    return ssl.optionsForClientTLS(
        hostname, trustRoot=trust, clientCertificate=client_cert,
        extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2},
    )


@dataclass(frozen=True)
class RevocationList:
    """The certificates a CRL file revokes, by (issuer, serial number)."""

    path: str
    revoked: frozenset  # of (issuer's DER name, serial number)
    next_update: datetime | None  # the earliest nextUpdate of the file's CRLs (aware, UTC)
    issuers: tuple[str, ...] = ()  # RFC 4514 names of the CRLs' issuers

    def is_revoked(self, certificate: x509.Certificate) -> bool:
        return (certificate.issuer.public_bytes(), certificate.serial_number) in self.revoked

    def expired(self, now: float) -> bool:
        """True once the CRL is past its nextUpdate: a fresher one should have been published."""
        return self.next_update is not None and now > self.next_update.timestamp()


_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.*?-----END X509 CRL-----", re.DOTALL)


def load_crl(path: str | Path, ca: str | Path) -> RevocationList:
    """Read ``path`` (PEM with one or more CRLs, or one DER CRL); each CRL must be signed by a CA certificate
    in ``ca`` (PEM) with its issuer's name. Raises `TlsConfigError` naming the file otherwise."""
    data = _read(path, "CRL")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            blocks = _PEM_CRL.findall(data)
            if not blocks:
                raise TlsConfigError(f"{path}: no '-----BEGIN X509 CRL-----' block in the CRL file")
            crls = [x509.load_pem_x509_crl(b) for b in blocks]
        else:
            crls = [x509.load_der_x509_crl(data)]
    except ValueError as e:
        if isinstance(e, TlsConfigError):
            raise
        raise TlsConfigError(f"{path}: not a CRL (PEM or DER): {e}") from None
    cas = _certificates(ca, "CA certificate")
    revoked = set()
    for crl in crls:
        signers = [c for c in cas if c.subject == crl.issuer]
        if not any(crl.is_signature_valid(c.public_key()) for c in signers):
            raise TlsConfigError(f"{path}: the CRL of {crl.issuer.rfc4514_string()} is not signed by a CA in {ca}")
        issuer = crl.issuer.public_bytes()
        revoked.update((issuer, entry.serial_number) for entry in crl)
    updates = [c.next_update_utc for c in crls if c.next_update_utc is not None]
    return RevocationList(str(path), frozenset(revoked), min(updates) if updates else None,
                          tuple(c.issuer.rfc4514_string() for c in crls))


@implementer(IOpenSSLContextFactory)
class TlsSwitch:
    """A listener's TLS settings (the outer gate's, the MLLP listener's), replaceable on reload: every new
    handshake asks for the current context; connections already open keep theirs (nothing is dropped).
    Renegotiation is refused: a connection's peer certificate is the one of its handshake for its whole
    life (the outer gate reads it once per connection), and no renegotiation CPU exhaustion either."""

    def __init__(self, options: ssl.CertificateOptions):
        self.current = options

    @property
    def current(self) -> ssl.CertificateOptions:
        return self._current

    @current.setter
    def current(self, options: ssl.CertificateOptions) -> None:
        # (before any connection uses the context: pyOpenSSL refuses to change one in use)
        options.getContext().set_options(SSL.OP_NO_RENEGOTIATION)
        self._current = options

    def getContext(self):
        return self._current.getContext()
