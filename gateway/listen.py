"""Listening on one network interface only (``inner.bind_device`` / ``outer.bind_device``).

Linux uses the weak host model: a packet that arrives on the front server's internet NIC addressed to its
*intranet* address is delivered locally — no forwarding involved — so binding the inner gate to its intranet
address alone does not keep the internet out (tests/e2e/test_netns_e2e.py shows it).  ``SO_BINDTODEVICE``
makes the listening socket accept only what arrives on the named interface, whatever the routing.  (On Linux
before 5.7 it needs CAP_NET_RAW; a firewall on the front server remains the first line.)
"""

from __future__ import annotations

import re
import socket

from twisted.internet import defer, tcp
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

_TCP = re.compile(r"^tcp:(?P<port>\d+)(:interface=(?P<interface>[^:]+))?$")


class DevicePort(tcp.Port):
    def __init__(self, port, factory, backlog, interface, reactor, device: str):
        super().__init__(port, factory, backlog, interface, reactor)
        self.device = device

    def createInternetSocket(self):
        s = super().createInternetSocket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.device.encode())
        return s


@implementer(IStreamServerEndpoint)
class DeviceServerEndpoint:
    """A TCP (optionally TLS) listener that accepts only connections arriving on ``device``."""

    def __init__(self, reactor, port: int, interface: str, device: str, tls=None, backlog: int = 50):
        self.reactor, self.port, self.interface, self.device = reactor, port, interface, device
        self.tls, self.backlog = tls, backlog

    def listen(self, factory):
        return defer.execute(self._listen, factory)

    def _listen(self, factory):
        if self.tls is not None:
            factory = TLSMemoryBIOFactory(self.tls, False, factory)
        port = DevicePort(self.port, factory, self.backlog, self.interface, self.reactor, self.device)
        port.startListening()
        return port


def parse_tcp(description: str) -> tuple[int, str]:
    """'tcp:2575:interface=10.0.0.5' -> (2575, '10.0.0.5'); ValueError for other endpoint forms."""
    m = _TCP.match(description)
    if not m:
        raise ValueError(f"{description!r}: with bind_device, write the listener as tcp:PORT:interface=ADDRESS")
    return int(m.group("port")), m.group("interface") or ""
