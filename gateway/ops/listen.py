"""How the gates listen: on one network interface only, within connection limits, within the process's
file descriptors.

**One interface** (``inner.bind_device`` / ``outer.bind_device``), a few accepts per reactor turn
(:class:`GatePort`).

Linux uses the weak host model: a packet that arrives on the front server's internet NIC addressed to its
*intranet* address is delivered locally — no forwarding involved — so binding the inner gate to its intranet
address alone does not keep the internet out (tests/e2e/test_netns_e2e.py shows it).  ``SO_BINDTODEVICE``
makes the listening socket accept only what arrives on the named interface, whatever the routing.  (On Linux
before 5.7 it needs CAP_NET_RAW; a firewall on the front server remains the first line.)

**Connection limits** (:class:`ConnectionLimiter`): in all and per source address, refused at accept before
any TLS work, with capacity reserved for chosen addresses (the HIS's) that no one else can take.  Failed TLS
handshakes are counted and logged the same way (:func:`handshake_failures`).

**Descriptors** (:func:`ensure_descriptors`): at start the soft RLIMIT_NOFILE is raised to the hard one, and
the gateway refuses to start when its connection limits could hold more descriptors than it may open — running
out of them is what let a flood of connections take the HIS's MLLP link down with the FHIR port.
"""

from __future__ import annotations

import collections
import ipaddress
import re
import resource
import socket

import structlog
from twisted.internet import defer, endpoints, tcp
from twisted.internet.interfaces import IHandshakeListener, IStreamServerEndpoint
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import implementer

_TCP = re.compile(r"^tcp:(?P<port>\d+)(:interface=(?P<interface>[^:]+))?$")
log = structlog.get_logger("gateway.ops.listen")


#: connections a gate's port accepts in one reactor turn at most (Twisted's own port takes 100 and more, growing
#: while connects keep coming)
ACCEPTS_PER_TURN = 16


class GatePort(tcp.Port):
    """A gate's listening TCP port.  It accepts at most ACCEPTS_PER_TURN connections per reactor turn: a flood of
    connects then waits in the kernel's backlog (and past it the kernel drops SYNs, which clients retry) while the
    connections already open are served between its turns, instead of waiting behind hundreds of accepts and
    refusals in one turn.  With ``device``, only connections arriving on that network interface are accepted."""

    def __init__(self, port, factory, backlog, interface, reactor, device: str | None = None):
        super().__init__(port, factory, backlog, interface, reactor)
        self.device = device

    def createInternetSocket(self):
        s = super().createInternetSocket()
        if self.device:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.device.encode())
        return s

    def doRead(self):
        self.numberAccepts = min(self.numberAccepts, ACCEPTS_PER_TURN)
        super().doRead()


@implementer(IStreamServerEndpoint)
class GateEndpoint:
    """A gate's TCP listener (a :class:`GatePort`) on ``interface``:``port``, taking only connections that arrive
    on network interface ``device`` when one is given."""

    def __init__(self, reactor, port: int, interface: str = "", device: str | None = None, backlog: int = 50):
        self.reactor, self.port, self.interface, self.device, self.backlog = reactor, port, interface, device, backlog

    def listen(self, factory):
        return defer.execute(self._listen, factory)

    def _listen(self, factory):
        port = GatePort(self.port, factory, self.backlog, self.interface, self.reactor, self.device)
        port.startListening()
        return port


def gate_endpoint(reactor, description: str, device: str | None = None, backlog: int = 50):
    """A gate's listener from its config: ``tcp:PORT[:interface=ADDRESS]`` as a :class:`GateEndpoint`; another
    Twisted endpoint description as Twisted makes it (``device`` needs the tcp form: ValueError)."""
    try:
        port, interface = parse_tcp(description)
    except ValueError:
        if device:
            raise
        return endpoints.serverFromString(reactor, description)
    return GateEndpoint(reactor, port, interface, device, backlog)


def parse_tcp(description: str) -> tuple[int, str]:
    """'tcp:2575:interface=10.0.0.5' -> (2575, '10.0.0.5'); ValueError for other endpoint forms."""
    m = _TCP.match(description)
    if not m:
        raise ValueError(f"{description!r}: with bind_device, write the listener as tcp:PORT:interface=ADDRESS")
    return int(m.group("port")), m.group("interface") or ""


# -- connections: how many a listener holds, refused at accept -----------------------------------------------
#: why a connection is refused at accept: every shared connection is taken, or every one its source may hold
REFUSALS = ("total", "per_address")
#: refused sources told apart in one log line (past it they are counted, not named): a flood from many
#: addresses cannot grow the tally without bound
TRACKED_SOURCES = 10_000


def _ip(host: str):
    """``host`` as an IP address (an IPv4-mapped IPv6 one as IPv4), or None when it is not one."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return getattr(ip, "ipv4_mapped", None) or ip


def source_key(address) -> str:
    """The source a connection counts against: its IPv4 address (also when IPv4-mapped), or the /64 network of
    an IPv6 address (one host commonly holds a whole /64)."""
    host = getattr(address, "host", None)
    ip = _ip(host) if host is not None else None
    if ip is None:
        return str(host if host is not None else address)
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class RefusalLog:
    """Refusals of one kind (``event``), logged at most once per ``interval`` seconds: the first after a quiet
    interval at once, then one line for all refused since — how many, by reason, how many sources, the busiest
    one, the ``detail`` of the last — so a flood cannot flood the log.  ``fields()`` adds what the caller knows
    at the time of the line (connections open, limits)."""

    def __init__(self, event: str, clock, interval: float = 10.0, fields=dict):
        self.event, self.clock, self.interval, self.fields = event, clock, interval, fields
        self._reasons: collections.Counter = collections.Counter()  # since the last line
        self._sources: collections.Counter = collections.Counter()
        self._detail: dict = {}
        self._call = None

    def refused(self, reason: str, source: str, **detail) -> None:
        self._reasons[reason] += 1
        if source in self._sources or len(self._sources) < TRACKED_SOURCES:
            self._sources[source] += 1
        self._detail = detail
        if self._call is None:
            self._line()

    def flush(self) -> None:
        """Log what is pending now (a listener that stops), and stop."""
        if self._call is not None and self._call.active():
            self._call.cancel()
            self._line(again=False)

    def _line(self, again: bool = True) -> None:
        self._call = None
        if not self._reasons:
            return
        busiest, busiest_refused = self._sources.most_common(1)[0]
        sources = len(self._sources)
        # (no key naming an "address": the log's patient-data masking would hide its value)
        log.warning(self.event, refused=sum(self._reasons.values()),
                    reasons=", ".join(f"{reason}: {n}" for reason, n in self._reasons.most_common()),
                    sources=sources if sources < TRACKED_SOURCES else f"{TRACKED_SOURCES} or more",
                    busiest=busiest, busiest_refused=busiest_refused, **self._detail, **self.fields())
        self._reasons.clear()
        self._sources.clear()
        if again:
            self._call = self.clock.callLater(self.interval, self._line)


@implementer(IHandshakeListener)
class _Held(ProtocolWrapper):
    """A connection a ConnectionLimiter admitted, and the capacity it holds (``pool``, ``source``).  A protocol
    that starts TLS itself (the MLLP listener) learns of its handshake through it."""

    pool = "shared"
    source = ""

    def handshakeCompleted(self) -> None:
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()


class ConnectionLimiter(WrappingFactory):
    """Connections a listener holds, limited at accept: at most ``max_connections`` from all sources together and
    ``max_per_address`` from one source (:func:`source_key`).  A refused connection is closed by the reactor
    before the wrapped factory (TLS, HTTP, MLLP) builds anything for it: no handshake, no buffers.  Wrap it
    outside the TLS factory.

    ``reserved`` addresses (the HIS's own, on an MLLP listener) have ``reserved_connections`` of their own that no
    other source can take; when those are all in use, a reserved address competes for the shared capacity like
    any other.  Each refusal calls ``refused(reason)`` (``total`` or ``per_address``, e.g. to count it in a metric)
    and is logged (``connections.refused``, a RefusalLog) at most once per ``log_interval`` seconds.  ``open`` is
    the number of connections held."""

    protocol = _Held

    def __init__(self, wrapped_factory, *, gate: str, max_connections: int, max_per_address: int, clock,
                 reserved=(), reserved_connections: int = 0, refused=None, log_interval: float = 10.0):
        super().__init__(wrapped_factory)
        self.gate = gate
        self.max_connections, self.max_per_address = max_connections, max_per_address
        self.reserved = frozenset(_ip(a) for a in reserved)
        if None in self.reserved:
            raise ValueError(f"reserved: not IP addresses: {sorted(a for a in reserved if _ip(a) is None)}")
        self.reserved_connections = reserved_connections if self.reserved else 0
        self.refused = refused
        self.open = 0
        self._shared = 0
        self._reserved = 0
        self._per_source: dict[str, int] = {}
        self._log = RefusalLog("connections.refused", clock, log_interval, lambda: {
            "gate": gate, "open": self.open, "limits": f"{max_connections} in all, {max_per_address} per source"})

    def buildProtocol(self, addr):
        source = source_key(addr)
        pool = self._capacity(addr, source)
        if pool in REFUSALS:
            self._refuse(pool, source)
            return None
        wrapped = self.wrappedFactory.buildProtocol(addr)
        if wrapped is None:
            return None
        held = self.protocol(self, wrapped)
        held.pool, held.source = pool, source
        if pool == "reserved":
            self._reserved += 1
        else:
            self._shared += 1
            self._per_source[source] = self._per_source.get(source, 0) + 1
        self.open += 1
        return held

    def unregisterProtocol(self, p):
        super().unregisterProtocol(p)
        self.open -= 1
        if p.pool == "reserved":
            self._reserved -= 1
            return
        self._shared -= 1
        left = self._per_source[p.source] - 1
        if left:
            self._per_source[p.source] = left
        else:
            del self._per_source[p.source]

    def _capacity(self, addr, source: str) -> str:
        """The capacity a new connection from ``addr`` takes (``reserved`` or ``shared``), or why there is none for
        it (one of REFUSALS)."""
        if self._reserved < self.reserved_connections and _ip(getattr(addr, "host", "")) in self.reserved:
            return "reserved"
        if self._shared >= self.max_connections:
            return "total"
        if self._per_source.get(source, 0) >= self.max_per_address:
            return "per_address"
        return "shared"

    def _refuse(self, reason: str, source: str) -> None:
        if self.refused is not None:
            self.refused(reason)
        self._log.refused(reason, source)

    def doStop(self):
        self._log.flush()
        super().doStop()


def handshake_failures(metrics, gate: str, log_them: bool = True, *, clock=None):
    """Count (``gatewayd_tls_handshake_failures_total{gate=...}``) and log a gate's failed handshakes, at most once
    per 10 s on ``clock`` with their count, the busiest source address and the last reason (the MLLP listener
    logs its own)."""
    counter = metrics.tls_handshake_failures.labels(gate)  # shown as 0 from the start
    tally = RefusalLog("tls.handshake_failed", clock, fields=lambda: {"gate": gate}) if log_them else None

    def failed(peer, failure):
        counter.inc()
        if tally is not None:
            tally.refused("handshake", source_key(peer), error=failure.getErrorMessage()[:200])

    return failed


# -- descriptors: the connection limits must fit the process's RLIMIT_NOFILE -----------------------------------
#: connections the admin listener (loopback) holds at most
ADMIN_CONNECTIONS = 16
#: the chamber's files: the database, its WAL and shared memory, for each of its SQLite connections
CHAMBER_DESCRIPTORS = 12
#: everything else: stdio, the reactor's poller and wakers, the listening sockets, files read on reload, with room
#: to spare (an idle gateway holds about 20 descriptors in all)
PROCESS_DESCRIPTORS = 64


class DescriptorShortage(Exception):
    """The connection limits need more file descriptors than the process may open."""


def descriptor_needs(config, gate: str) -> list[tuple[str, int]]:
    """What the gateway's connection limits let it hold, in file descriptors: (what, how many), naming the config
    key where there is one."""
    needs = []
    if gate in ("both", "outer") and config.outer is not None:
        needs.append(("outer.max_connections", config.outer.max_connections))
    if gate in ("both", "inner") and config.inner is not None:
        needs.append(("inner.max_connections", config.inner.max_connections))
        if config.inner.his_addresses:
            needs.append(("inner.his_connections", config.inner.his_connections))
        his = sum(e.window + (e.slot_source == "poll") for e in (config.inner.his, *config.inner.endpoints))
        needs.append(("connections to the HIS (inner.his/endpoints window, polling)", his))
    if config.admin is not None:
        needs.append(("admin", ADMIN_CONNECTIONS))
    needs.append(("chamber files", CHAMBER_DESCRIPTORS))
    needs.append(("the process itself", PROCESS_DESCRIPTORS))
    return needs


def ensure_descriptors(needs: list[tuple[str, int]]) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit when it is lower (a shell's ``ulimit -n``, a unit's
    ``LimitNOFILE=soft:hard``); DescriptorShortage, naming what needs them, when ``needs`` still do not fit.
    Returns the limit the process runs with."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = sum(n for _, n in needs)
    if soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("descriptors.not_raised", soft=soft, hard=hard, error=str(e))
    if needed > soft:
        raise DescriptorShortage(
            f"the connection limits need {needed} file descriptors but this process may open {soft} "
            f"(RLIMIT_NOFILE): {' + '.join(f'{what} {n}' for what, n in needs)}. Raise LimitNOFILE= in the systemd "
            f"unit (or ulimit -n), or lower outer.max_connections / inner.max_connections")
    return soft
