"""The outer gate's TLS: server options from ``outer.tls``, the handshake's watch and deadline, the CRL.

* `tls_options` - server TLS with platforms' client certificates verified against ``client_ca``: required, or
  with ``client_certificates: optional`` asked for and verified when presented (bearer-token platforms).
* `HandshakeWatch` - TLS over the site's factory that counts failed handshakes and cuts one not done in time.
* `read_crl` - ``outer.tls.crl`` read and checked, an expired one logged (and applied all the same).

What both gates share (PEM loading for MLLP, the CRL reader, `TlsSwitch`) is in adapters/tls.py.
"""

from __future__ import annotations

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.protocols.tls import TLSMemoryBIOFactory

from adapters.net import no_delay
from adapters.tls import RevocationList, load_crl

log = structlog.get_logger("adapters.outer.tls")


def tls_options(tls) -> ssl.CertificateOptions:
    """Server TLS with client certificates verified against ``client_ca``: required, or with
    ``client_certificates: optional`` asked for and verified when presented (bearer-token platforms)."""
    chain = x509.load_pem_x509_certificates(tls.certificate.read_bytes())
    key = serialization.load_pem_private_key(tls.private_key.read_bytes(), password=None)
    cas = x509.load_pem_x509_certificates(tls.client_ca.read_bytes())
    return ssl.CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),
        certificate=crypto.X509.from_cryptography(chain[0]),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in chain[1:]],
        verify=True,
        requireCertificate=getattr(tls, "client_certificates", "required") == "required",
        caCerts=[crypto.X509.from_cryptography(c) for c in cas],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )


class _WatchedTLSProtocol(TLSMemoryBIOFactory.protocol):
    _handshake_deadline = None
    _started = False  # TLS starts with the client's first byte

    def makeConnection(self, transport):
        """Only note the connection: TLS (OpenSSL's connection and its buffers, ~45 KB) starts with the client's
        first byte, so a connection that sends nothing costs next to nothing until its deadline."""
        no_delay(transport)  # an answer's last TLS record must not wait for the client's delayed ACK
        self.transport = transport
        self._handshake_deadline = self.factory.clock.callLater(self.factory.handshake_timeout, self._too_slow)

    def dataReceived(self, data):
        if not self._started:
            self._started = True
            super().makeConnection(self.transport)
        super().dataReceived(data)

    def _too_slow(self):
        self._handshake_deadline = None
        if not self._handshakeDone:
            self.factory.on_timeout()
            self.abortConnection()

    def abortConnection(self):
        if self._started:
            super().abortConnection()
        else:
            self.transport.abortConnection()

    def connectionLost(self, reason):
        if self._handshake_deadline is not None:
            self._handshake_deadline.cancel()
            self._handshake_deadline = None
        if not self._started:  # nothing was built that needs telling
            return
        why = self._reason or reason  # the TLS error that ended the connection, if one did
        if not self._handshakeDone and why is not None and why.check(SSL.Error):
            self.factory.on_failure(self.transport.getPeer(), why)
        super().connectionLost(reason)


class HandshakeWatch(TLSMemoryBIOFactory):
    """TLS over a listener's factory, like ``SSL4ServerEndpoint`` does it, that calls ``on_failure(peer,
    failure)`` for each handshake that fails with a TLS error (no certificate, one from another CA, no common
    protocol, ...); a connection closed before or without a TLS error is not counted.  A handshake not done
    ``handshake_timeout`` seconds after accept (on ``clock``) is cut, and ``on_timeout()`` called: a trickle
    of bytes cannot hold it open.  TLS starts with the client's first byte (until then a connection holds no
    TLS state)."""

    protocol = _WatchedTLSProtocol

    def __init__(self, context_factory, wrapped_factory, on_failure, *, clock, handshake_timeout: float,
                 on_timeout=lambda: None):
        super().__init__(context_factory, False, wrapped_factory)
        self.on_failure = on_failure
        self.clock, self.handshake_timeout, self.on_timeout = clock, handshake_timeout, on_timeout


def read_crl(tls, now: float) -> RevocationList | None:
    """``outer.tls.crl`` read and checked against ``client_ca`` (None without one); logs an error when it is
    past its nextUpdate (it is applied all the same)."""
    if getattr(tls, "crl", None) is None:
        return None
    crl = load_crl(tls.crl, tls.client_ca)
    if crl.expired(now):
        log.error("outer.crl_expired", crl=crl.path, next_update=crl.next_update.isoformat(),
                  hint="publish a fresh CRL and send SIGHUP; the expired one is still applied")
    return crl
