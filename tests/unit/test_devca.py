"""Tests for gateway.ops.devca: the development CA, server and platform certificates, and that they really
do mutual TLS (accepting our platforms, refusing clients without a certificate or from another CA)."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet import ssl as tssl
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient

from gateway.ops.devca import CA_COMMON_NAME, DevCAError, init_dev_ca, issue_client_cert

NOW = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)


def cert(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def key(path):
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def eku(certificate: x509.Certificate) -> list:
    return list(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


@pytest.fixture(scope='module')
def devca(tmp_path_factory):
    """One dev CA directory (with two platforms) shared by the read-only tests."""
    directory = tmp_path_factory.mktemp('certs')
    paths = init_dev_ca(directory, platforms=('demo', 'wechat'))
    return directory, paths


# --- what gets written --------------------------------------------------------------------------

def test_returns_every_path_by_name(devca):
    """The result names every file, and every file exists."""
    directory, paths = devca
    assert paths == {
        'ca': directory / 'ca.pem', 'ca_key': directory / 'ca.key',
        'server': directory / 'server.pem', 'server_key': directory / 'server.key',
        'platform-demo': directory / 'platform-demo.pem', 'platform-demo_key': directory / 'platform-demo.key',
        'platform-wechat': directory / 'platform-wechat.pem',
        'platform-wechat_key': directory / 'platform-wechat.key',
    }
    assert all(p.is_file() for p in paths.values())


def test_ca_is_a_self_signed_certificate_authority(devca):
    """ca.pem is a CA certificate named 'gatewayd development CA', allowed to sign certificates."""
    _, paths = devca
    ca = cert(paths['ca'])
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == CA_COMMON_NAME
    assert ca.issuer == ca.subject
    ca.verify_directly_issued_by(ca)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign


def test_leaf_certificates_chain_to_the_ca(devca):
    """The server and every platform certificate are directly issued by the dev CA, and are not CAs."""
    _, paths = devca
    ca = cert(paths['ca'])
    for name in ('server', 'platform-demo', 'platform-wechat'):
        leaf = cert(paths[name])
        leaf.verify_directly_issued_by(ca)
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_keys_are_p256_and_signatures_sha256(devca):
    """Every key is EC P-256 (PKCS#8, unencrypted) and matches its certificate; signatures use SHA-256."""
    _, paths = devca
    for name in ('ca', 'server', 'platform-demo'):
        private = key(paths[f'{name}_key'])
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.curve.name == 'secp256r1'
        assert b'BEGIN PRIVATE KEY' in paths[f'{name}_key'].read_bytes()  # PKCS#8
        certificate = cert(paths[name])
        assert certificate.public_key() == private.public_key()
        assert isinstance(certificate.signature_hash_algorithm, hashes.SHA256)


def test_server_certificate_names_and_usage(devca):
    """server.pem carries a DNS SAN for localhost, an IP SAN for 127.0.0.1, and serverAuth."""
    _, paths = devca
    server = cert(paths['server'])
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ['localhost']
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address('127.0.0.1')]
    assert eku(server) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_platform_certificate_subject_and_usage(devca):
    """platform-demo.pem is CN=platform-demo, O=gatewayd dev, for client authentication."""
    _, paths = devca
    demo = cert(paths['platform-demo'])
    assert demo.subject.rfc4514_string() == 'O=gatewayd dev,CN=platform-demo'
    assert eku(demo) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_key_files_are_private(devca):
    """Keys are mode 0600; certificates 0644."""
    _, paths = devca
    for name, path in paths.items():
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o600 if name.endswith('_key') else 0o644), (name, oct(mode))
    assert not [p for p in paths['ca'].parent.iterdir() if p.name.endswith('.tmp')]


def test_validity_period(tmp_path):
    """Certificates start a few minutes before now (clock skew) and last `days`; none outlives the CA."""
    paths = init_dev_ca(tmp_path, days=30, now=NOW)
    ca = cert(paths['ca'])
    assert ca.not_valid_before_utc == NOW - datetime.timedelta(minutes=5)
    assert ca.not_valid_after_utc == NOW + datetime.timedelta(days=30)
    later = NOW + datetime.timedelta(days=10)
    cert_path, _ = issue_client_cert(tmp_path, 'late', days=825, now=later)
    assert cert(cert_path).not_valid_after_utc == ca.not_valid_after_utc


def test_custom_server_names(tmp_path):
    """Any mix of DNS names and IPv4/IPv6 addresses becomes SANs; the first is the subject CN."""
    paths = init_dev_ca(tmp_path, server_names=['gateway.hospital.test', '10.0.0.5', '::1'], platforms=())
    server = cert(paths['server'])
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ['gateway.hospital.test']
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address('10.0.0.5'),
                                                       ipaddress.ip_address('::1')]
    assert server.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == 'gateway.hospital.test'
    assert set(paths) == {'ca', 'ca_key', 'server', 'server_key'}


@pytest.mark.parametrize('kwargs', [
    {'platforms': ['../evil']}, {'platforms': ['']}, {'platforms': ['a b']},
    {'server_names': []}, {'server_names': ['bad name']}, {'server_names': ['医院.test']}, {'days': 0},
])
def test_bad_arguments_are_refused_before_writing(tmp_path, kwargs):
    """Unsafe platform names (they become file names), bad server names and days < 1 raise ValueError and
    write nothing."""
    with pytest.raises(ValueError):
        init_dev_ca(tmp_path / 'certs', **kwargs)
    assert not (tmp_path / 'certs').exists()


# --- idempotency and completing an existing directory -------------------------------------------

def contents(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_running_again_keeps_every_file(tmp_path):
    """A second run returns the same paths and leaves every file byte-for-byte unchanged."""
    first = init_dev_ca(tmp_path)
    before = contents(tmp_path)
    assert init_dev_ca(tmp_path) == first
    assert contents(tmp_path) == before


def test_overwrite_replaces_everything(tmp_path):
    """overwrite=True issues a new CA and new certificates that chain to it."""
    init_dev_ca(tmp_path)
    before = contents(tmp_path)
    paths = init_dev_ca(tmp_path, overwrite=True)
    after = contents(tmp_path)
    assert all(before[name] != after[name] for name in before)
    cert(paths['platform-demo']).verify_directly_issued_by(cert(paths['ca']))


def test_missing_platform_is_issued_from_the_existing_ca(tmp_path):
    """Adding a platform later keeps the CA and server files and issues the new one from the same CA."""
    init_dev_ca(tmp_path)
    before = contents(tmp_path)
    paths = init_dev_ca(tmp_path, platforms=('demo', 'alipay'))
    after = contents(tmp_path)
    assert {name: after[name] for name in before} == before
    cert(paths['platform-alipay']).verify_directly_issued_by(cert(paths['ca']))


def test_deleted_platform_certificate_is_reissued(tmp_path):
    """A platform pair removed by hand is issued again from the existing CA."""
    paths = init_dev_ca(tmp_path)
    ca_before = paths['ca'].read_bytes()
    paths['platform-demo'].unlink()
    paths['platform-demo_key'].unlink()
    init_dev_ca(tmp_path)
    assert paths['ca'].read_bytes() == ca_before
    cert(paths['platform-demo']).verify_directly_issued_by(cert(paths['ca']))


def test_new_ca_reissues_leaves_from_the_old_ca(tmp_path):
    """If the CA is gone (both files), the new CA re-issues the server and platform certificates, which
    could not be trusted any more otherwise."""
    paths = init_dev_ca(tmp_path)
    paths['ca'].unlink()
    paths['ca_key'].unlink()
    init_dev_ca(tmp_path)
    ca = cert(paths['ca'])
    cert(paths['server']).verify_directly_issued_by(ca)
    cert(paths['platform-demo']).verify_directly_issued_by(ca)


@pytest.mark.parametrize('removed', ['ca.key', 'ca.pem', 'server.key', 'platform-demo.pem'])
def test_half_a_pair_is_an_error(tmp_path, removed):
    """A certificate without its key (or the reverse) is not silently replaced."""
    init_dev_ca(tmp_path)
    (tmp_path / removed).unlink()
    with pytest.raises(DevCAError, match='exists but'):
        init_dev_ca(tmp_path)


def test_certificate_from_another_ca_is_an_error(tmp_path):
    """A leftover platform certificate from a different CA is reported, not trusted or replaced."""
    init_dev_ca(tmp_path / 'a')
    other = init_dev_ca(tmp_path / 'b')
    for suffix in ('.pem', '.key'):
        (tmp_path / 'a' / f'platform-demo{suffix}').write_bytes(
            other[f'platform-demo{"_key" if suffix == ".key" else ""}'].read_bytes())
    with pytest.raises(DevCAError, match='was not issued by the CA'):
        init_dev_ca(tmp_path / 'a')


def test_mismatched_key_is_an_error(tmp_path):
    """A key file that does not belong to its certificate is reported."""
    paths = init_dev_ca(tmp_path, platforms=('demo', 'other'))
    paths['platform-demo_key'].write_bytes(paths['platform-other_key'].read_bytes())
    with pytest.raises(DevCAError, match='is not the key of'):
        init_dev_ca(tmp_path, platforms=('demo', 'other'))


# --- issue_client_cert --------------------------------------------------------------------------

def test_issue_client_cert_uses_the_existing_ca(tmp_path):
    """issue_client_cert writes platform-<name>.pem/.key issued by the existing CA, key mode 0600."""
    paths = init_dev_ca(tmp_path)
    ca_before = paths['ca'].read_bytes()
    cert_path, key_path = issue_client_cert(tmp_path, 'his-sim')
    assert (cert_path, key_path) == (tmp_path / 'platform-his-sim.pem', tmp_path / 'platform-his-sim.key')
    certificate = cert(cert_path)
    certificate.verify_directly_issued_by(cert(paths['ca']))
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == 'platform-his-sim'
    assert eku(certificate) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert paths['ca'].read_bytes() == ca_before


def test_issue_client_cert_keeps_or_overwrites(tmp_path):
    """An existing client pair is kept, unless overwrite=True."""
    init_dev_ca(tmp_path)
    cert_path, _ = issue_client_cert(tmp_path, 'demo')
    first = cert_path.read_bytes()
    issue_client_cert(tmp_path, 'demo')
    assert cert_path.read_bytes() == first
    issue_client_cert(tmp_path, 'demo', overwrite=True)
    assert cert_path.read_bytes() != first


def test_issue_client_cert_without_a_ca(tmp_path):
    """Without a CA there is nothing to issue from: a DevCAError says how to create one."""
    with pytest.raises(DevCAError, match='gatewayd certs init'):
        issue_client_cert(tmp_path, 'demo')


# --- real TLS: mutual authentication with the generated files ------------------------------------

@pytest.fixture(scope='module')
def foreign(tmp_path_factory):
    """A second, unrelated dev CA: its platform certificate must be refused by the first."""
    return init_dev_ca(tmp_path_factory.mktemp('foreign'))


def stdlib_server_context(paths) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(paths['server'], paths['server_key'])
    context.load_verify_locations(paths['ca'])
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def stdlib_client_context(paths, client=None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(paths['ca']))
    if client is not None:
        context.load_cert_chain(client[0], client[1])
    return context


def loopback_exchange(server_context, client_context, server_hostname='localhost'):
    """One TLS connection over a real loopback socket: the client sends b'ping', the server echoes it.
    Returns (what the server saw, what the client got or the client's exception)."""
    listener = socket.create_server(('127.0.0.1', 0))
    listener.settimeout(10)
    seen: dict = {}

    def serve():
        try:
            raw, _ = listener.accept()
            raw.settimeout(10)
            with server_context.wrap_socket(raw, server_side=True) as conn:
                seen['peer'] = conn.getpeercert()
                data = conn.recv(4)
                seen['data'] = data
                conn.sendall(data)
        except (ssl.SSLError, OSError) as exc:
            seen['error'] = exc
        finally:
            listener.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=10) as raw, \
                client_context.wrap_socket(raw, server_hostname=server_hostname) as conn:
            conn.sendall(b'ping')
            got = conn.recv(4)
    except (ssl.SSLError, OSError) as exc:
        got = exc
    thread.join(15)
    assert not thread.is_alive()
    return seen, got


@pytest.mark.parametrize('hostname', ['localhost', '127.0.0.1'])
def test_tls_handshake_with_platform_certificate_succeeds(devca, hostname):
    """Over a real loopback socket, a client presenting platform-demo.pem completes mutual TLS with a
    server using server.pem and requiring certificates from ca.pem; the client verifies the server's
    name (DNS and IP SAN) and the server sees CN=platform-demo."""
    _, paths = devca
    seen, got = loopback_exchange(
        stdlib_server_context(paths),
        stdlib_client_context(paths, (paths['platform-demo'], paths['platform-demo_key'])), hostname)
    assert got == b'ping', got
    assert seen['data'] == b'ping'
    assert dict(x[0] for x in seen['peer']['subject'])['commonName'] == 'platform-demo'


def test_tls_client_without_certificate_is_refused(devca):
    """A client that presents no certificate never gets data through: the server aborts the handshake."""
    _, paths = devca
    seen, got = loopback_exchange(stdlib_server_context(paths), stdlib_client_context(paths))
    assert isinstance(seen.get('error'), ssl.SSLError), seen
    assert 'data' not in seen
    assert got != b'ping'


def test_tls_client_from_another_ca_is_refused(devca, foreign):
    """A client certificate issued by a different CA is refused by the server."""
    _, paths = devca
    client_context = stdlib_client_context(paths, (foreign['platform-demo'], foreign['platform-demo_key']))
    seen, got = loopback_exchange(stdlib_server_context(paths), client_context)
    assert isinstance(seen.get('error'), ssl.SSLError), seen
    assert 'certificate verify failed' in str(seen['error'])
    assert got != b'ping'


# --- the same with Twisted/pyOpenSSL, in memory (how the gateway itself will do TLS) ---------------

# Twisted (26.x) hands pyOpenSSL X509/PKey objects to the SSL context, which pyOpenSSL 26 deprecates;
# that is Twisted's business, not something these tests are about.
pytestmark_twisted = pytest.mark.filterwarnings('ignore:Passing pyOpenSSL:DeprecationWarning')

class Echo(Protocol):
    def connectionMade(self):
        self.received = b''
        self.lost = None

    def dataReceived(self, data):
        self.received += data
        self.transport.write(data)

    def connectionLost(self, reason):
        self.lost = reason


class Ping(Protocol):
    def connectionMade(self):
        self.received = b''
        self.lost = None
        self.transport.write(b'ping')

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.lost = reason


def private_certificate(cert_path, key_path) -> tssl.PrivateCertificate:
    return tssl.PrivateCertificate.loadPEM(cert_path.read_bytes() + key_path.read_bytes())


def twisted_exchange(paths, client_cert=None):
    """Mutual TLS through Twisted's TLSMemoryBIOProtocol over an in-memory iosim pump (no reactor)."""
    ca = tssl.Certificate.loadPEM(paths['ca'].read_bytes())
    server_options = private_certificate(paths['server'], paths['server_key']).options(ca)
    client_options = tssl.optionsForClientTLS(
        'localhost', trustRoot=ca,
        clientCertificate=private_certificate(*client_cert) if client_cert else None)
    clock = Clock()  # the TLS transport aggregates small writes until the next tick of this clock
    echo, ping = Echo(), Ping()
    server_factory = TLSMemoryBIOFactory(server_options, False, Factory.forProtocol(lambda: echo), clock)
    client_factory = TLSMemoryBIOFactory(client_options, True, Factory.forProtocol(lambda: ping), clock)
    client_tls, server_tls, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(None), lambda: client_factory.buildProtocol(None),
        clock=clock)
    for _ in range(10):
        pump.flush()
    return ping, echo, client_tls, server_tls


@pytestmark_twisted
def test_twisted_mutual_tls_with_platform_certificate(devca):
    """Twisted's CertificateOptions built from the generated files accept platform-demo and the client
    verifies the server as 'localhost'; the peer certificate seen by the server is CN=platform-demo."""
    _, paths = devca
    ping, echo, _client_tls, server_tls = twisted_exchange(
        paths, (paths['platform-demo'], paths['platform-demo_key']))
    assert echo.received == b'ping'
    assert ping.received == b'ping'
    assert echo.lost is None and ping.lost is None
    peer = server_tls.getPeerCertificate().to_cryptography()
    assert peer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == 'platform-demo'


@pytestmark_twisted
@pytest.mark.parametrize('which', ['no certificate', 'another CA'])
def test_twisted_refuses_bad_clients(devca, foreign, which):
    """Without a client certificate, or with one from another CA, the server drops the connection with a
    TLS error before any application data arrives."""
    _, paths = devca
    client_cert = None if which == 'no certificate' else (foreign['platform-demo'],
                                                          foreign['platform-demo_key'])
    ping, echo, _client_tls, _server_tls = twisted_exchange(paths, client_cert)
    assert echo.received == b''
    assert ping.received == b''
    assert echo.lost is not None and echo.lost.check(SSL.Error), echo.lost
    assert ping.lost is not None
