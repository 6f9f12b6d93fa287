"""``make_service(config, reactor)``: the whole simulated HIS as one Twisted service.

Building it opens the store (`hissim.store`, ``config.store``; a config made in code without one: in memory)
and loads what the hospital already knows: every slot and booking, the next appointment id, the answers given,
what the gateway has not acknowledged yet. The slots the config adds to it (all of them in a new store; later,
a day further ahead or a new doctor) are opened and, with ``publish: push``, each announced by one SIU^S24 in
start order, in the same transaction. Nothing else is announced again at a restart: a real HIS does not
re-publish its schedule, and a booked slot published as open would make the gateway cancel its booking.

Start order: journals open, the MLLP listener (``config.listen``) starts, then the pharmacy's
(``pharmacy.listen``, when configured); once both listen (``listening`` fires; it errbacks with
`CannotListen` if one cannot, and then nothing is pushed), the notifier starts sending its queue (what an
earlier run left unacknowledged first), the pharmacy starts (dispensing, releases) and the counter clerk
starts. Stop order is the reverse; the store is closed last. The reactor is passed in; nothing here touches
the global reactor.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable
from datetime import date
from typing import Any
from zoneinfo import ZoneInfo

import structlog
from twisted.application import service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, serverFromString
from twisted.internet.interfaces import IListeningPort

from adapters.inner.client import MLLPClient
from adapters.inner.listener import MLLPServerFactory
from hissim.clocks import HospitalClock
from hissim.config import HisSimConfig
from hissim.counter import CounterClerk
from hissim.handler import HisHandler
from hissim.inventory import Booking, Inventory, Slot, SlotStatus
from hissim.journal import Journal
from hissim.messages import (
    Header,
    Notification,
    build_siu,
    control_ids,
    run_id,
    slot_dtm,
)
from hissim.notifier import Notifier
from hissim.pharmacy import Pharmacy
from hissim.store import Store

log = structlog.get_logger("hissim.service")


class CannotListen(Exception):
    """A listener could not start: ``endpoint`` (the config string) and ``reason``."""

    def __init__(self, endpoint: str, reason: str) -> None:
        super().__init__(f"cannot listen on {endpoint}: {reason}")
        self.endpoint = endpoint
        self.reason = reason


class HisSimulator(service.Service):
    """The simulated HIS: inventory, MLLP listener, notifier towards the gateway, counter clerk, and the
    pharmacy (its listener and notifier) when configured. ``client`` / ``pharmacy_client`` replace the MLLP
    clients towards the gateway (tests)."""

    name = "his-sim"

    def __init__(self, config: HisSimConfig, reactor: Any, *, clock: Any = None, client: Any = None,
                 pharmacy_client: Any = None) -> None:
        self.config = config
        self.reactor = reactor
        self.clock = HospitalClock(clock if clock is not None else reactor, ZoneInfo(config.timezone))
        self.store = Store(config.store if config.store is not None else ":memory:")
        self.store.open()
        self.store.save_schedules(config.schedules())
        self.inventory = self.store.load_inventory()
        self.header = Header(
            application=config.application,
            facility=config.facility,
            gateway_application=config.gateway_application,
            gateway_facility=config.gateway_facility,
            version=config.hl7_version,
            codec=config.codec,
            msh18_empty=config.msh18_empty,
        )
        run = run_id(self.clock.clock.seconds())
        self.control_ids = control_ids("S" + run)
        self.received = Journal(config.received_log)
        self.sent = Journal(config.sent_log)
        self.rng = random.Random(config.seed)

        self.client = None
        self.notifier: Notifier | None = None
        if config.publish == "push":
            self.client = client if client is not None else self._client(config.codec)
            self.notifier = Notifier(
                send=lambda payload, cid: self.client.send(payload, cid, timeout=config.ack_timeout),
                build=lambda note, cid, now: build_siu(note, header=self.header, control_id=cid, now=now),
                clock=self.clock,
                control_ids=self.control_ids,
                journal=self.sent,
                store=self.store,
                role="his",
                retry_initial=config.retry_initial,
                retry_max=config.retry_max,
            )
        self.handler = HisHandler(
            inventory=self.inventory,
            store=self.store,
            header=self.header,
            clock=self.clock,
            control_ids=self.control_ids,
            journal=self.received,
            notify=self.announce,
        )
        self.factory = self._factory(self.handler, config.codec, config.application)
        self.clerk = CounterClerk(self.clock.clock, self.rng, config.counter_bookings_per_minute,
                                  self.counter_booking_now)
        self.port: IListeningPort | None = None
        self.listening: Deferred = Deferred()

        self.pharmacy: Pharmacy | None = None
        self.pharmacy_client = self.pharmacy_factory = self.pharmacy_port = None
        if config.pharmacy is not None:
            codec = config.pharmacy_codec
            self.pharmacy_client = pharmacy_client if pharmacy_client is not None else self._client(codec)
            self.pharmacy = Pharmacy(
                config.pharmacy,
                store=self.store,
                header=dataclasses.replace(self.header, application=config.pharmacy.application, codec=codec),
                clock=self.clock,
                control_ids=self.control_ids,
                run=run,
                rng=random.Random(config.seed),
                received=self.received,
                sent=self.sent,
                send=lambda payload, cid: self.pharmacy_client.send(payload, cid, timeout=config.ack_timeout),
                retry_initial=config.retry_initial,
                retry_max=config.retry_max,
            )
            self.pharmacy_factory = self._factory(self.pharmacy.handler, codec, config.pharmacy.application)
        first_day = date.fromisoformat(config.start_date) if config.start_date else self.clock.local().date()
        self.planned = Inventory.build(config.schedules(), first_day, config.days)
        held = config.held_schedules()
        self.opened = self._open_slots([s for s in self.planned.slots() if s.schedule.id not in held], "startup")

    def _open_slots(self, planned: Iterable[Slot], reason: str) -> int:
        """Open the planned slots the hospital does not have yet and announce each (S24, push mode), in one
        transaction; how many were opened."""
        with self.store.changing(self.inventory):
            opened = self.inventory.add_slots(planned)
            if self.notifier is not None:
                for slot in opened:
                    if slot.status is SlotStatus.OPEN:
                        self.notifier.enqueue(Notification("S24", slot, "Open", reason))
        return len(opened)

    def _client(self, codec: str) -> MLLPClient:
        """An MLLP client towards the gateway's inner listener."""
        config = self.config
        return MLLPClient(
            self.reactor,
            HostnameEndpoint(self.reactor, config.gateway.host.encode("idna"), config.gateway.port,
                             timeout=config.connect_timeout),
            default_charset=codec,
            max_message_bytes=config.max_message_bytes,
            clock=self.clock.clock,
            connect_timeout=config.connect_timeout,
        )

    def _factory(self, handler: Any, codec: str, application: str) -> MLLPServerFactory:
        """An MLLP listener's factory for ``handler`` (NAKs it writes itself come from ``application``)."""
        config = self.config
        return MLLPServerFactory(
            handler,
            max_message_bytes=config.max_message_bytes,
            default_charset=codec,
            idle_timeout=config.idle_timeout,
            max_connections=config.max_connections,
            sending_application=application,
            sending_facility=config.facility,
            clock=self.clock.clock,
        )

    # -- life cycle -----------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.received.open()
        self.sent.open()
        d = self._listen(self.config.listen, self.factory, "port")
        if self.pharmacy is not None:
            d.addCallback(lambda port: self._listen(self.config.pharmacy.listen, self.pharmacy_factory,
                                                    "pharmacy_port").addCallback(lambda _: port))
        d.addCallback(self._listening)
        d.chainDeferred(self.listening)

    def _listen(self, description: str, factory: MLLPServerFactory, attribute: str) -> Deferred:
        """Listen on ``description``; the port is kept as ``attribute`` (closed at once if stopped meanwhile)."""

        def listening(port: IListeningPort) -> IListeningPort:
            if self.running:
                setattr(self, attribute, port)
            else:
                port.stopListening()
            return port

        def failed(failure):
            raise CannotListen(description, failure.getErrorMessage())

        return serverFromString(self.reactor, description).listen(factory).addCallbacks(listening, failed)

    def _listening(self, port: IListeningPort) -> IListeningPort:
        """Listening: now push what is queued (push mode), start the pharmacy and open the counter."""
        if not self.running:  # stopped while the listeners were starting
            return port
        log.info("his-sim.listening", port=port.getHost().port, endpoint=self.config.listen)
        if self.notifier is not None:
            self.notifier.start()
        if self.pharmacy is not None:
            log.info("his-sim.pharmacy-listening", port=self.pharmacy_port.getHost().port,
                     endpoint=self.config.pharmacy.listen)
            self.pharmacy.start()
        self.clerk.start()
        log.info("his-sim.started", slots=len(self.inventory.slots()), opened=self.opened,
                 publish=self.config.publish, gateway=f"{self.config.gateway.host}:{self.config.gateway.port}")
        return port

    def stopService(self) -> Deferred:
        super().stopService()
        self.clerk.stop()
        waits = []
        if self.pharmacy is not None:
            self.pharmacy.stop()
        if self.notifier is not None:
            self.notifier.stop()
        for client in (self.pharmacy_client, self.client):
            if client is not None:
                waits.append(maybeDeferred(client.close))
        for attribute in ("pharmacy_port", "port"):
            port = getattr(self, attribute)
            if port is not None:
                waits.append(maybeDeferred(port.stopListening))
                setattr(self, attribute, None)
        d = DeferredList(waits) if waits else succeed(None)

        def closed(result: object) -> None:
            self.received.close()
            self.sent.close()
            self.store.close()
            log.info("his-sim.stopped")

        return d.addCallback(closed)

    # -- changes ----------------------------------------------------------------------------------

    def counter_booking_now(self) -> Booking | None:
        """The counter books one random open future slot now (also what SIGUSR1 does)."""
        with self.store.changing(self.inventory):
            booking = self.inventory.book_at_counter(self.rng, self.clock.local())
            if booking is None:
                log.info("his-sim.counter-found-no-free-slot")
                return None
            slot = self.inventory.slot(booking.schedule_id, booking.start)
            self.announce(Notification("S12", slot, "Booked", "counter", booking))
        log.info("his-sim.counter-booked", schedule=booking.schedule_id, start=slot_dtm(booking.start),
                 appointment=booking.appointment_id)
        return booking

    def suspend_clinic(self, schedule_id: str, day: date) -> tuple[int, int]:
        """The doctor's clinic is suspended for ``day`` (停诊): each booking of that day is cancelled (SIU^S15),
        then every slot of the day is blocked (SIU^S23), in one store transaction, pushed in that order.
        Returns (bookings cancelled, slots blocked).  What SIGHUP also does with the --suspend-file's lines."""
        cancelled = blocked = 0
        with self.store.changing(self.inventory):
            day_slots = [slot for slot in self.inventory.slots() if slot.schedule.id == schedule_id
                         and slot.start.date() == day and slot.status is not SlotStatus.BLOCKED]
            for slot in day_slots:
                if slot.booking is not None:
                    booking = self.inventory.cancel(appointment_id=slot.booking.appointment_id)
                    self.announce(Notification("S15", self.inventory.slot(schedule_id, slot.start), "Cancelled",
                                               "suspended", booking))
                    cancelled += 1
            for slot in day_slots:
                self.announce(Notification("S23", self.inventory.block(schedule_id, slot.start), "Blocked",
                                           "suspended"))
                blocked += 1
        log.info("his-sim.clinic-suspended", schedule=schedule_id, day=day.isoformat(), cancelled=cancelled,
                 blocked=blocked)
        return cancelled, blocked

    def release_held_slots(self) -> int:
        """Open the held doctors' slots (config ``held``) it does not have yet, all in one transaction, each
        announced by an S24 with reason 'release' (also what SIGHUP does); how many were opened (0 the second
        time)."""
        held = self.config.held_schedules()
        opened = self._open_slots([s for s in self.planned.slots() if s.schedule.id in held], "release")
        log.info("his-sim.released", slots=opened, schedules=sorted(held))
        return opened

    def release_now(self) -> None:
        """The pharmacy releases a random prescription now (what SIGUSR2 does); without a pharmacy, nothing."""
        if self.pharmacy is None:
            log.info("his-sim.no-pharmacy-configured")
            return
        self.pharmacy.release_now()

    def announce(self, note: Notification) -> None:
        """Push a change to the gateway (push mode); with publish: none, only journal it (type null). Called in
        the store's transaction of the change."""
        if self.notifier is not None:
            self.notifier.enqueue(note)
            return
        entry = {"time": self.clock.iso(), "control_id": None, "type": None, **note.facts()}
        self.store.after_commit(lambda: self.sent.write(entry))


def make_service(config: HisSimConfig, reactor: Any) -> service.IService:
    """The simulated HIS as an IService (see :class:`HisSimulator`)."""
    return HisSimulator(config, reactor)
