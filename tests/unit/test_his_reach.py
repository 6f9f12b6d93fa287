"""Did the message reach the HIS?  The MLLP sender says so with every failure (``PeerUnavailable.written``), and
the HIS link turns it into the relay's two failures: HisUnreachable (never written: not an attempt) or
DeliveryFailed (written, no proper answer: an attempt).

Real MLLPClient connections on a MemoryReactorClock with iosim pumps (tests/unit/test_mllp_protocols.World),
over TLS with certificates from the development CA; the peer is the scripted HIS of that module. (Over plain
TCP, ``written`` is checked by that module's tests of refused, timed-out, lost and closed connections.)
"""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import ConnectionCompleter

from adapters.inner.his import HisDestination
from adapters.inner.client import MLLPClient, PeerUnavailable
from adapters.tls import client_options, server_options
from gateway.ops.devca import init_dev_ca
from gateway.relay import DeliveryFailed, HisUnreachable
from tests.deferreds import failureResultOf, successResultOf
from tests.unit.test_mllp_protocols import FakeHIS, World, ack_for, siu


# -- over TLS: our bytes wait in the TLS layer until the handshake completed ----------------------------------


@pytest.fixture(scope="module")
def dev_ca(tmp_path_factory):
    return init_dev_ca(tmp_path_factory.mktemp("ca"), platforms=("gateway",))


class TlsWorld(World):
    """World with the HIS behind TLS (``server``: a protocol factory, default the scripted HIS) and the client
    speaking TLS to it.  The TLS layers aggregate small writes on their clock: this world's reactor."""

    def __init__(self, dev_ca, server=None, script=lambda m: [ack_for(m)]):
        self.reactor = MemoryReactorClock()
        self.received, self.script, self.his, self.pumps = [], script, [], []
        world = self

        class HISFactory(Factory):
            def buildProtocol(self, addr):
                world.his.append(FakeHIS(world))
                return world.his[-1]

        tls = TLSMemoryBIOFactory(server_options(dev_ca["server"], dev_ca["server_key"], dev_ca["ca"]), False,
                                  HISFactory())
        tls._clock = self.reactor
        TCP4ServerEndpoint(self.reactor, 2575).listen(server or tls)
        self.client = MLLPClient(self.reactor, TCP4ClientEndpoint(self.reactor, "127.0.0.1", 2575),
                                 clock=self.reactor, connect_timeout=5.0,
                                 tls=client_options("127.0.0.1", dev_ca["ca"], dev_ca["platform-gateway"],
                                                    dev_ca["platform-gateway_key"]))
        self.completer = ConnectionCompleter(self.reactor)

    def complete(self):
        self.reactor.tcpClients[0][2]._wrappedFactory._clock = self.reactor  # the TLS factory of wrapClientTLS
        pump = super().complete()
        for _ in range(4):  # handshake, then the aggregated writes
            self.reactor.advance(0)
            pump.flush()
        return pump


class Junk(Protocol):
    """Not TLS: answers the ClientHello with an HTTP error and closes."""

    def dataReceived(self, data):
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        self.transport.loseConnection()


class Mute(Protocol):
    """Accepts the connection and never says a word (a handshake that never completes)."""


def test_over_tls_the_message_is_answered_once_the_handshake_completed(dev_ca):
    w = TlsWorld(dev_ca)
    d = w.client.send(siu("G1"), "G1", timeout=10)
    w.complete()
    answer = successResultOf(d)
    assert answer.segment("MSA").get(2) == "G1"


def test_a_failed_tls_handshake_never_wrote_the_message(dev_ca):
    w = TlsWorld(dev_ca, server=Factory.forProtocol(Junk))
    d = w.client.send(siu("G1"), "G1", timeout=10)
    with capture_logs():
        w.complete()
    failure = failureResultOf(d, PeerUnavailable).value
    assert failure.written is False


def test_a_tls_handshake_that_never_completes_is_no_ack_timeout(dev_ca):
    """The peer accepts TCP and stays mute: the send fails after its timeout as not written, not AckTimeout."""
    w = TlsWorld(dev_ca, server=Factory.forProtocol(Mute))
    d = w.client.send(siu("G1"), "G1", timeout=10)
    w.complete()
    with capture_logs() as logs:
        w.reactor.advance(10)
    failure = failureResultOf(d).value
    assert type(failure) is PeerUnavailable and failure.written is False and "handshake" in failure.reason
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["mllp.client.handshake_timeout"]


def test_over_tls_a_connection_lost_after_the_handshake_may_have_delivered_it(dev_ca):
    w = TlsWorld(dev_ca, script=lambda m: [])
    d = w.client.send(siu("G1"), "G1", timeout=10)
    pump = w.complete()
    assert [m.control_id for m in w.received] == ["G1"]
    with capture_logs():
        w.his[0].transport.loseConnection()
        w.reactor.advance(0)
        pump.flush()
    assert failureResultOf(d).value.written is True


# -- the HIS link: the relay's two failures ----------------------------------------------------------------


def test_the_his_link_tells_unreachable_from_unanswered():
    """HisDestination: a send that never went out fails with HisUnreachable; one that went out and was not
    answered (timeout, lost connection) with DeliveryFailed, never HisUnreachable."""
    w = World(script=lambda m: [])
    link = HisDestination(w.client)
    with capture_logs():
        refused = link.deliver(siu("G1"), "G1", 10)
        w.completer.failOnce(Failure(ConnectionRefusedError("HIS down")))
        timed_out = link.deliver(siu("G2"), "G2", 10)
        w.complete()
        w.reactor.advance(10)
        lost = link.deliver(siu("G3"), "G3", 10)
        pump = w.complete()
        w.his[-1].transport.loseConnection()
        pump.flush()
    assert "HIS down" in str(failureResultOf(refused, HisUnreachable).value)
    for d in (timed_out, lost):
        failure = failureResultOf(d, DeliveryFailed).value
        assert not isinstance(failure, HisUnreachable)
