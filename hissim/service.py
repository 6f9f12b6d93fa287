"""``make_service(config, reactor)``: the whole simulated HIS as one Twisted service.

Start order: journals open, the MLLP listener (``config.listen``) starts; once it listens (``listening``
fires; it errbacks if it cannot, and then nothing is pushed), one SIU^S24 per open slot is queued for the
gateway in start order (``publish: push``) and the counter clerk starts. Stop order is the reverse.
The reactor is passed in; nothing here touches the global reactor.
"""

from __future__ import annotations

import random
from datetime import date
from typing import Any
from zoneinfo import ZoneInfo

import structlog
from twisted.application import service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, serverFromString
from twisted.internet.interfaces import IListeningPort

from adapters.mllp.client import MLLPClient
from adapters.mllp.server import MLLPServerFactory
from hissim.clocks import HospitalClock
from hissim.config import HisSimConfig
from hissim.counter import CounterClerk
from hissim.handler import HisHandler
from hissim.inventory import Booking, Inventory
from hissim.journal import Journal
from hissim.messages import Header, Notification, build_siu, control_ids, run_prefix, slot_dtm
from hissim.notifier import Notifier

log = structlog.get_logger("hissim.service")


class HisSimulator(service.Service):
    """The simulated HIS: inventory, MLLP listener, notifier towards the gateway, counter clerk."""

    name = "his-sim"

    def __init__(self, config: HisSimConfig, reactor: Any, *, clock: Any = None, client: Any = None) -> None:
        self.config = config
        self.reactor = reactor
        self.clock = HospitalClock(clock if clock is not None else reactor, ZoneInfo(config.timezone))
        first_day = date.fromisoformat(config.start_date) if config.start_date else self.clock.local().date()
        self.inventory = Inventory.build(config.schedules(), first_day, config.days)
        self.header = Header(
            application=config.application,
            facility=config.facility,
            gateway_application=config.gateway_application,
            gateway_facility=config.gateway_facility,
            version=config.hl7_version,
            codec=config.codec,
            msh18_empty=config.msh18_empty,
        )
        self.control_ids = control_ids(run_prefix(self.clock.clock.seconds()))
        self.received = Journal(config.received_log)
        self.sent = Journal(config.sent_log)
        self.rng = random.Random(config.seed)

        self.client = None
        self.notifier: Notifier | None = None
        if config.publish == "push":
            self.client = client if client is not None else MLLPClient(
                reactor,
                HostnameEndpoint(reactor, config.gateway.host.encode("idna"), config.gateway.port,
                                 timeout=config.connect_timeout),
                default_charset=config.codec,
                max_message_bytes=config.max_message_bytes,
                clock=self.clock.clock,
                connect_timeout=config.connect_timeout,
            )
            self.notifier = Notifier(
                send=lambda payload, cid: self.client.send(payload, cid, timeout=config.ack_timeout),
                build=lambda note, cid, now: build_siu(note, header=self.header, control_id=cid, now=now),
                clock=self.clock,
                control_ids=self.control_ids,
                journal=self.sent,
                retry_initial=config.retry_initial,
                retry_max=config.retry_max,
            )
        self.handler = HisHandler(
            inventory=self.inventory,
            header=self.header,
            clock=self.clock,
            control_ids=self.control_ids,
            journal=self.received,
            notify=self.announce,
        )
        self.factory = MLLPServerFactory(
            self.handler,
            max_message_bytes=config.max_message_bytes,
            default_charset=config.codec,
            idle_timeout=config.idle_timeout,
            max_connections=config.max_connections,
            sending_application=config.application,
            sending_facility=config.facility,
            clock=self.clock.clock,
        )
        self.clerk = CounterClerk(self.clock.clock, self.rng, config.counter_bookings_per_minute,
                                  self.counter_booking_now)
        self.port: IListeningPort | None = None
        self.listening: Deferred = Deferred()

    # -- life cycle -----------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.received.open()
        self.sent.open()
        endpoint = serverFromString(self.reactor, self.config.listen)
        d = endpoint.listen(self.factory)
        d.addCallback(self._listening)
        d.chainDeferred(self.listening)

    def _listening(self, port: IListeningPort) -> IListeningPort:
        """Listening: now push the startup S24s (push mode) and open the counter."""
        if not self.running:  # stopped while the listener was starting
            port.stopListening()
            return port
        self.port = port
        log.info("his-sim.listening", port=port.getHost().port, endpoint=self.config.listen)
        if self.notifier is not None:
            for slot in self.inventory.open_slots():
                self.notifier.enqueue(Notification("S24", slot, "Open", "startup"))
            self.notifier.start()
        self.clerk.start()
        log.info("his-sim.started", slots=len(self.inventory.slots()), publish=self.config.publish,
                 gateway=f"{self.config.gateway.host}:{self.config.gateway.port}")
        return port

    def stopService(self) -> Deferred:
        super().stopService()
        self.clerk.stop()
        waits = []
        if self.notifier is not None:
            self.notifier.stop()
        if self.client is not None:
            waits.append(maybeDeferred(self.client.close))
        if self.port is not None:
            waits.append(maybeDeferred(self.port.stopListening))
            self.port = None
        d = DeferredList(waits) if waits else succeed(None)

        def closed(result: object) -> None:
            self.received.close()
            self.sent.close()
            log.info("his-sim.stopped")

        return d.addCallback(closed)

    # -- changes ----------------------------------------------------------------------------------

    def counter_booking_now(self) -> Booking | None:
        """The counter books one random open future slot now (also what SIGUSR1 does)."""
        booking = self.inventory.book_at_counter(self.rng, self.clock.local())
        if booking is None:
            log.info("his-sim.counter-found-no-free-slot")
            return None
        slot = self.inventory.slot(booking.schedule_id, booking.start)
        log.info("his-sim.counter-booked", schedule=booking.schedule_id, start=slot_dtm(booking.start),
                 appointment=booking.appointment_id)
        self.announce(Notification("S12", slot, "Booked", "counter", booking))
        return booking

    def announce(self, note: Notification) -> None:
        """Push a change to the gateway (push mode); with publish: none, only journal it (type null)."""
        if self.notifier is not None:
            self.notifier.enqueue(note)
            return
        self.sent.write({
            "time": self.clock.iso(),
            "control_id": None,
            "type": None,
            "schedule": note.slot.schedule.id,
            "start": slot_dtm(note.slot.start),
            "status": note.status,
            "reason": note.reason,
        })


def make_service(config: HisSimConfig, reactor: Any) -> service.IService:
    """The simulated HIS as an IService (see :class:`HisSimulator`)."""
    return HisSimulator(config, reactor)
