"""The process's own services in the tree `gateway.service.make_service` builds: what opens and closes with the
process rather than with a gate.

    descriptors     the descriptor limit raised, and checked against the connection limits (first to start)
    chamber         the chamber opened before any listener accepts, closed last
    chamber-watch   split lock only: wakes this process when the other gate's process commits
    memory-trim     hands memory closed connections freed back to the system, every minute
    holds           the booking service's timers: holds the HIS did not answer in time are released

Each only starts and stops what it is given; the decisions stay with the chamber and the booking service.
"""

from __future__ import annotations

import ctypes

import structlog
from twisted.application import service
from twisted.internet import task

from gateway.chamber.engine import Chamber
from gateway.domain.booking import BookingService
from gateway.ops.listen import ensure_descriptors

log = structlog.get_logger("gateway.ops.services")


class ChamberService(service.Service):
    name = "chamber"

    def __init__(self, chamber: Chamber):
        self.chamber = chamber
        self._opened = False

    def privilegedStartService(self):
        # Opened before the listeners (which start in privilegedStartService) can accept anything.
        self._open()
        super().privilegedStartService()

    def startService(self):
        self._open()
        super().startService()

    def _open(self):
        if not self._opened:
            self.chamber.open()
            self._opened = True

    def stopService(self):
        super().stopService()
        self.chamber.close()
        self._opened = False


class DescriptorsService(service.Service):
    """The process's file descriptors, checked before anything opens one: the soft RLIMIT_NOFILE raised to the
    hard limit, and the start refused (naming the keys) when the connection limits ``needs`` could hold more
    descriptors than that (gateway/ops/listen.py) — a flood would otherwise take every gate down at once."""

    name = "descriptors"

    def __init__(self, needs: list[tuple[str, int]]):
        self.needs = needs
        self.limit: int | None = None

    def privilegedStartService(self):
        self._check()
        super().privilegedStartService()

    def startService(self):
        self._check()
        super().startService()

    def _check(self):
        if self.limit is None:
            self.limit = ensure_descriptors(self.needs)
            log.info("gateway.descriptors", limit=self.limit, needed=sum(n for _, n in self.needs))


#: how often memory that closed connections freed is handed back to the system
TRIM_EVERY = 60.0


def _malloc_trim():
    """The C library's malloc_trim (glibc), or None where there is none."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


class MemoryTrimService(service.Service):
    """Every ``every`` seconds, memory that is free again is handed back to the system (glibc's
    ``malloc_trim``).  OpenSSL allocates a connection's TLS buffers with malloc, and glibc keeps what a flood's
    connections held after they close: without this the process stays at the flood's peak (3,000 connections
    took it from 80 to 237 MB, and it stayed there).  Where the C library has no malloc_trim, nothing is done."""

    name = "memory-trim"

    def __init__(self, clock, every: float = TRIM_EVERY):
        self.clock, self.every = clock, every
        self.trim = _malloc_trim()
        self._loop: task.LoopingCall | None = None

    def startService(self):
        super().startService()
        if self.trim is not None:
            self._loop = task.LoopingCall(self.trim, 0)
            self._loop.clock = self.clock
            self._loop.start(self.every, now=False)

    def stopService(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return super().stopService()


class HoldsService(service.Service):
    name = "holds"

    def __init__(self, booking: BookingService):
        self.booking = booking

    def startService(self):
        super().startService()
        self.booking.start()
        self.booking.expire_holds()

    def stopService(self):
        super().stopService()
        self.booking.stop()


class ReleaseNotices(service.Service):
    """The outer gate's watch of slots released by the passage of time (``quotas[].release_before``) to limited
    platforms that subscribe to free slots (gateway.domain.notifications.notify_released), every ``interval``
    seconds from the start; ``quotas()``: the quotas now (reloaded on SIGHUP).  Releases while the gate was not
    running are not notified (GET /Slot shows them)."""

    name = "release-notices"

    def __init__(self, chamber: Chamber, quotas, clock, interval: float = 10.0):
        self.chamber = chamber
        self.quotas = quotas
        self.clock = clock
        self.interval = interval
        self._since: float | None = None
        self._loop = None

    def startService(self):
        super().startService()
        self._since = self.clock.seconds()
        self._loop = task.LoopingCall(self.tick)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def tick(self):
        from gateway.domain.notifications import notify_released

        since, until = self._since, self.clock.seconds()
        quotas = self.quotas()
        subscribers = self.chamber.read().subscriptions_to("free-slot") if quotas is not None else []
        if not any(quotas.release_periods(s.platform) for s in subscribers):
            self._since = until  # nobody to tell: nothing written
            return None

        def advanced(_):
            self._since = until

        return self.chamber.transact(lambda tx: notify_released(tx, quotas, since, until)).addCallbacks(
            advanced, lambda f: log.error("notify.release_failed", error=f.getErrorMessage()))


class WatchService(service.Service):
    """Split mode: wake this process when the other gate's process commits (``Chamber.watch``)."""

    name = "chamber-watch"

    def __init__(self, chamber: Chamber, clock, interval: float = 0.01):
        self.chamber = chamber
        self.clock = clock
        self.interval = interval
        self._loop = None

    def startService(self):
        super().startService()
        self._loop = self.chamber.watch(self.clock, self.interval)

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()


class HisLinkRecord:
    """What the inner gate's probe finds of a HIS endpoint, kept in the chamber (``his_links``): committed when
    it changes, read back at start; the outer gate and `gatewayd status` read it from there."""

    def __init__(self, chamber: Chamber, peer: str):
        self.chamber, self.peer = chamber, peer

    def known(self) -> tuple[bool, float] | None:
        row = self.chamber.read().his_links().get(self.peer)
        return (row.up, row.since) if row is not None else None

    def record(self, up: bool, since: float, detail: str | None):
        d = self.chamber.transact(lambda tx: tx.set_his_link(self.peer, up, since, detail))
        d.addErrback(lambda f: log.error("his.probe.not_recorded", peer=self.peer, error=f.getErrorMessage()))
        return d

