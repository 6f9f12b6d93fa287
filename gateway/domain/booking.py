"""The booking service: platforms book and cancel, hold -> confirm.

:class:`BookingService` books, holds, moves and cancels for platforms.  A booking holds the slot
(``busy-tentative``) and queues SRM^S01 in the same committed transaction; the relay delivers it and calls
:meth:`BookingService.on_answer` inside the transaction that records the HIS's answer (the answers:
:mod:`gateway.domain.booking_answers`).  A hold the HIS does not answer within ``hold_seconds`` is released
by :meth:`BookingService.expire_holds`; if the HIS accepts a booking whose hold has already been released, a
compensating cancel is queued.  What the HIS says about its slots is :mod:`gateway.domain.slot_book`'s.

Appointment states (chamber): ``pending`` -> ``booked`` | ``refused`` | ``cancelled``; ``booked`` ->
``cancelled``.  ``pending_change`` names what we are waiting for from the HIS ('book', 'cancel', 'hold' or
'reschedule'): a platform's request is answered when it clears (:mod:`gateway.domain.settle`), or after
``answer_within`` with 202.

An IHE ``$hold`` (:meth:`BookingService.hold`) holds the slot the same way but queues nothing: the
appointment is ``pending`` with ``pending_change`` None until ``$book`` (:meth:`BookingService.book_held`)
queues the SRM^S01, or its hold expires and is released without any message to the HIS.  With
``hold_at_his`` (outer.hold_at_his) the HIS is told: a tentative SRM^S01 (ARQ-8 Tentative) is queued and
``pending_change`` is 'hold' until it answers; ``$book``'s ordinary SRM^S01 confirms it, and the release of a
hold the HIS took queues the cancel message.

Quotas (:mod:`gateway.domain.quota`) are checked inside the transaction that holds the slot.  Every change to
an appointment is audited (:mod:`gateway.domain.audit`) in the transaction that makes it: ``book`` (the hold,
outcome 202), ``cancel`` (200 cancelled at once, 202 sent to the HIS), and ``book.settled`` /
``cancel.settled`` when the HIS answers, the hold expires or the message is dead-lettered (outcome: the
status the platform sees for it, 201/200 done or 409 not done).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Callable
from zoneinfo import ZoneInfo

import structlog
from twisted.internet import defer

from gateway.domain import audit
from gateway.domain.audit import AuditEntry
from gateway.domain.backlog import check_backlog
from gateway.domain.booking_answers import HisAnswers
from gateway.domain.ids import new_appointment_id, new_control_id, subject_of
from gateway.domain.patients import IdentifierRules, order_key
from gateway.domain.settle import SettlementWaiters

from gateway.domain.model import (
    AppointmentUnknown,
    BookingRequest,
    IdempotencyConflict,
    Patient,
    SchedulingError,
    SlotForHis,
    SlotUnavailable,
    SlotUnknown,
    VersionConflict,
    slot_status,
)

log = structlog.get_logger("gateway.domain.booking")


#: what BookingService._queue commits, by kind: the inner gate encodes each (BookingService.encode)
_INTENT_TYPES = {"S01": "SRM^S01", "hold": "SRM^hold", "cancel": "SRM^cancel"}


class HoldUnanswered(SchedulingError):
    """$book of a hold the HIS has not answered yet (outer.hold_at_his)."""

    code = "hold-unanswered"


class PatientRequired(SchedulingError):
    """A booking needs a patient the HIS can identify, and none was given."""

    code = "patient-required"


@dataclass(frozen=True)
class HisLinkInfo:
    """What the booking service needs to know about the HIS.  The outer gate needs only ``peer`` (the name
    its messages are addressed to); the inner gate, which turns them into HL7, also ``charset``,
    ``cancel_trigger`` and ``build_srm``."""

    peer: str
    charset: str = "utf-8"
    cancel_trigger: str = "S04"  # 'S04' or 'S03'
    build_srm: Callable[..., bytes] | None = None  # adapters.maps.srm_booking.build_srm, header bound
    z_segments: tuple[str, ...] = ()  # added to every SRM ('{platform}' -> the platform's name)
    hold_type: str = "Tentative"  # ARQ-8 of the SRM^S01 that holds a slot at the HIS (outer.hold_at_his)
    move_trigger: str | None = None  # 'S03': a reschedule is one SRM^S03 (reschedule_message); None: cancel + new


class BookingService(HisAnswers):
    """Books and cancels on behalf of platforms; keeps the hold -> confirm rules.  The HIS's answers are
    :class:`~gateway.domain.booking_answers.HisAnswers`'s part of it."""

    def __init__(self, chamber, his: HisLinkInfo, *, tz: ZoneInfo, hold_seconds: float, clock,
                 max_backlog: int = 1000, retry_after: int = 30, quotas=None, patients: IdentifierRules | None = None,
                 hold_at_his: bool = False, route=None, by_facility: bool = False,
                 links: dict[str, HisLinkInfo] | None = None):
        self.chamber = chamber
        # called right after each unit that may queue a message for the HIS is handed to the chamber (in the
        # same reactor turn, so into the same batch): this process's relays join that batch to prepare the
        # send (Relay.claim_soon); None in the split lock's outer gate, which has no relay
        self.after_queue: Callable[[], None] | None = None
        self.hold_at_his = hold_at_his  # $hold queues a tentative SRM^S01 (and its release a cancel)
        self.quotas = quotas  # gateway.domain.quota.Quotas, or None: no platform is limited
        self.patients = patients or IdentifierRules()  # which identifier systems, and how PID-3 writes them
        self.his = his
        # route(message type, facility or None) -> the first matching route (``.to``, ``.facility``) or None
        # for the HIS (GatewayConfig.route_taken); by_facility: some route names a facility (only then is a
        # booking's schedule looked up for it).  links: every HIS endpoint by name (inner gate: to encode).
        self.route = route
        self.by_facility = by_facility
        self.links = links or {his.peer: his}
        self.tz = tz
        self.hold_seconds = hold_seconds
        self.max_backlog = max_backlog
        self.retry_after = retry_after
        self.clock = clock
        self._expiry_call = None
        # Waiters are settled by the commits that clear their appointments' pending change: this process's
        # tell us which (no query); another process's (the split lock's inner gate, noticed by the watch)
        # do not, so they are looked up (one query for all waiters).
        self._waiters = SettlementWaiters(clock, lambda ids: chamber.read().settled_among(ids))
        self._stop_observing = chamber.observe(self._waiters.recheck, own_commits=False)
        self._stop_observing_settled = chamber.observe_settled(self._waiters.settled)

    # -- platform requests ---------------------------------------------------------------------------------
    def book(self, platform: str, request: BookingRequest, *, idempotency_key: str | None = None,
             request_hash: str = "", if_none_exist: tuple[str, str] | None = None,
             who: AuditEntry | None = None, raw: bytes | None = None) -> defer.Deferred:
        """Hold the slot and queue SRM^S01, in one committed transaction (with its audit record, which
        takes platform, certificate and source from ``who``).

        Fires with ``(appointment id, how)``: ``how`` is ``'new'``, ``'replayed'`` (an Idempotency-Key seen
        before with the same request) or ``'existing'`` (If-None-Exist matched the platform's identifier);
        only a new booking is audited here.  Fails with SlotUnknown, SlotUnavailable, QuotaExhausted,
        IdempotencyConflict or Overloaded."""
        appointment_id = new_appointment_id()
        control_id = new_control_id()

        def work(tx):
            from gateway.chamber.rows import AppointmentRow

            if idempotency_key is not None:
                earlier = tx.idempotent_request(platform, idempotency_key)
                if earlier is not None:
                    if earlier[0] != request_hash:
                        raise IdempotencyConflict("this Idempotency-Key was used for a different request")
                    return earlier[1], "replayed"
            if if_none_exist is not None:
                existing = tx.appointment_by_identifier(platform, *if_none_exist)
                if existing is not None:
                    return existing, "existing"
            self.patients.check(request.patient)
            slot = self._bookable_slot(tx, platform, request.slot_id)
            peer = self._check_backlog(tx, slot)
            tx.insert_appointment(AppointmentRow(
                id=appointment_id, platform=platform, slot_id=slot.id, status="pending",
                patient=request.patient.to_json(), description=request.description or None,
                his_appointment=None, hold_expires=tx.now + self.hold_seconds, outcome=None,
                pending_change="book", version=1, created=tx.now, updated=tx.now,
            ))
            if raw is not None:  # the platform's request as received, kept with what it created
                tx.keep_request(appointment_id, raw)
            for system, value in request.identifiers:
                tx.add_appointment_identifier(platform, system, value, appointment_id)
            if idempotency_key is not None:
                tx.remember_request(platform, idempotency_key, request_hash, appointment_id)
            tx.update_slot(slot.id, held_by=appointment_id)
            self._queue(tx, control_id, "S01", appointment_id, request.patient, f"booking {appointment_id}", peer)
            self._audit(tx, who, platform, "book", 202, appointment_id, f"slot {slot.id} held; SRM^S01 queued")
            return appointment_id, "new"

        d = self._transact(work)
        d.addCallback(self._booked, platform, control_id)
        return d

    def _bookable_slot(self, tx, platform: str, wanted: str):
        """The slot ``wanted``, if ``platform`` may hold it now (free, not held, not started, within its
        quota); else SlotUnknown, SlotUnavailable or QuotaExhausted."""
        slot = tx.slot(wanted)
        if slot is None:
            raise SlotUnknown(f"no slot {wanted!r}")
        if slot.held_by or slot.his_status != "free":
            raise SlotUnavailable(f"slot {wanted} is {slot_status(slot)}")
        if slot.start_ts <= tx.now:
            raise SlotUnavailable(f"slot {wanted} has already started")
        if self.quotas is not None:
            self.quotas.check(tx, platform, slot)
        return slot

    def _transact(self, work) -> defer.Deferred:
        d = self.chamber.transact(work)
        if self.after_queue is not None:
            self.after_queue()
        return d

    def _check_backlog(self, tx, slot) -> str:
        """The HIS endpoint a booking of ``slot`` goes to; Overloaded when too much waits for it."""
        peer = self._booking_peer(tx, slot)
        check_backlog(tx, peer, self.max_backlog, self.retry_after)
        return peer

    def _facility(self, tx, slot) -> str | None:
        """The facility that published ``slot``'s schedule (None: none known, or no route asks)."""
        if not self.by_facility or slot is None:
            return None
        schedule = tx.schedule(slot.schedule_id)
        return (schedule.facility or None) if schedule is not None else None

    def _booking_peer(self, tx, slot) -> str:
        """Where SRM^S01 for ``slot`` goes: the first route for SRM^S01 and the schedule's facility, else the
        HIS."""
        if self.route is None:
            return self.his.peer
        r = self.route("SRM^S01", self._facility(tx, slot))
        return r.to if r is not None else self.his.peer

    def _cancel_peer(self, tx, appointment_id: str) -> str:
        """A cancellation (or the confirmation of a hold told to the HIS) goes where the booking went (the HIS
        that has it), whatever the routes say now: the appointment's first message is its booking (SRM^S01,
        a move, or a hold told to the HIS)."""
        first = next(iter(tx.messages_for_subject(subject_of(appointment_id))), None)
        return first.peer if first is not None else self.his.peer

    def hold(self, platform: str, slot_id_: str, patient: Patient | None = None,
             who: AuditEntry | None = None) -> defer.Deferred:
        """Hold a slot for ``platform`` without telling the HIS (IHE ITI-116 ``$hold``): the slot becomes
        ``busy-tentative`` and an appointment ``pending`` with no change awaited from the HIS
        (``pending_change`` None) and ``hold_expires`` = now + ``hold_seconds``, audited (``hold``, 200) in
        the same transaction.  Nothing is queued for the HIS, so an expired hold is released without any
        message.  Fires with the appointment id; fails like :meth:`book` (SlotUnknown, SlotUnavailable,
        QuotaExhausted).

        With ``hold_at_his`` the HIS is told: a tentative SRM^S01 (ARQ-8 ``his.hold_type``) is queued in the
        same transaction and ``pending_change`` is 'hold' until the HIS answers (:meth:`_answer_hold`); the
        release of a hold the HIS took queues the cancel message (:meth:`_release_hold`)."""
        appointment_id = new_appointment_id()
        empty = Patient(identifiers=())
        control_id = new_control_id()

        def work(tx):
            from gateway.chamber.rows import AppointmentRow

            self.patients.check(patient or empty)
            slot = self._bookable_slot(tx, platform, slot_id_)
            peer = self._check_backlog(tx, slot) if self.hold_at_his else None
            tx.insert_appointment(AppointmentRow(
                id=appointment_id, platform=platform, slot_id=slot.id, status="pending",
                patient=(patient or empty).to_json(), description=None, his_appointment=None,
                hold_expires=tx.now + self.hold_seconds, outcome=None,
                pending_change="hold" if self.hold_at_his else None, version=1, created=tx.now, updated=tx.now,
            ))
            tx.update_slot(slot.id, held_by=appointment_id)
            if self.hold_at_his:
                self._queue(tx, control_id, "hold", appointment_id, patient or empty, f"hold {appointment_id}",
                            peer)
            self._audit(tx, who, platform, "hold", 200, appointment_id,
                        f"slot {slot.id} held; " + ("tentative SRM^S01 queued" if self.hold_at_his
                                                    else "the HIS is not told until $book"))
            return appointment_id

        def held(appointment):
            log.info("booking.hold_only" if not self.hold_at_his else "booking.hold_queued", appointment=appointment,
                     platform=platform)
            self._schedule_expiry()
            return appointment

        return self._transact(work).addCallback(held)

    def book_held(self, platform: str, appointment_id: str, patient: Patient | None = None,
                  who: AuditEntry | None = None) -> defer.Deferred:
        """Book an appointment held by :meth:`hold` (IHE ITI-117 ``$book``): queue SRM^S01 exactly as
        :meth:`book` does, in one transaction with its audit record; the hold is renewed for the HIS's
        answer.  ``patient`` replaces the one given at the hold (one is needed by now).  Fires with
        ``'new'`` (queued) or ``'already'`` (already booked or being booked: nothing is done).  Fails with
        AppointmentUnknown, SlotUnavailable (the hold expired or was cancelled), PatientRequired or
        Overloaded."""
        control_id = new_control_id()

        def work(tx):
            appt = self._own(tx, platform, appointment_id)
            if appt.status == "booked" or (appt.status == "pending" and appt.pending_change == "book"):
                return "already"
            if appt.status == "pending" and appt.pending_change == "hold":
                raise HoldUnanswered(f"the HIS has not answered the hold on appointment {appointment_id} yet; "
                                     f"$book it once the hold is answered")
            if appt.status != "pending" or appt.pending_change is not None:
                raise SlotUnavailable(f"appointment {appointment_id} is no longer held "
                                      f"({appt.outcome or appt.status})")
            if appt.hold_expires is not None and appt.hold_expires <= tx.now:
                raise SlotUnavailable(f"the hold on appointment {appointment_id} has expired")
            slot = tx.slot(appt.slot_id)
            if slot is None or slot.his_status != "free":  # the HIS booked or blocked it meanwhile
                raise SlotUnavailable(f"slot {appt.slot_id} is no longer free at the HIS")
            if slot.start_ts <= tx.now:
                raise SlotUnavailable(f"slot {appt.slot_id} has already started")
            who_for = patient if patient is not None and patient.identifiers else Patient.from_json(appt.patient)
            if not who_for.identifiers:
                raise PatientRequired("booking needs the patient: a Patient with an identifier the HIS knows "
                                      "(patient-resource, or a contained Patient in appointment-resource)")
            self.patients.check(who_for)
            peer = self._check_backlog(tx, slot)
            if tx.messages_for_subject(subject_of(appt.id)):  # the HIS holds it (outer.hold_at_his): confirm
                peer = self._cancel_peer(tx, appt.id)  # where the hold went, whatever the routes say now
                check_backlog(tx, peer, self.max_backlog, self.retry_after)
            tx.update_appointment(appt.id, patient=who_for.to_json(), pending_change="book",
                                  hold_expires=tx.now + self.hold_seconds)
            self._queue(tx, control_id, "S01", appt.id, who_for, f"booking {appt.id} (held)", peer)
            self._audit(tx, who, platform, "book", 202, appt.id, f"slot {appt.slot_id} held; SRM^S01 queued")
            return "new"

        d = self._transact(work)
        d.addCallback(lambda how: (self._booked((appointment_id, how), platform, control_id), how)[1])
        return d

    def reschedule(self, platform: str, appointment_id: str, new_slot_id: str,
                   who: AuditEntry | None = None) -> defer.Deferred:
        """Move a booked appointment to another slot (IHE ``$book`` rescheduling), as cancel + new: in one
        transaction a new appointment (``replaces`` the old one) holds the new slot and SRM^S01 is queued,
        audited ``book`` 202; the old one waits (``pending_change`` 'reschedule').  When the HIS accepts the
        new booking, SRM^S04 cancels the old one (:meth:`_answer_booking`) and its slot is freed when the HIS
        accepts that; if the new booking is refused, expires or is dead-lettered, the old one stays booked.
        At a HIS that moves bookings itself (``his.move_trigger`` S03) the inner gate encodes the queued
        request as one SRM^S03 naming the old booking (:meth:`encode`, :meth:`_moving`), and its AA settles
        both appointments at once (:meth:`_moved_at_his`).
        Fires with the new appointment's id.  Fails with AppointmentUnknown, SlotUnknown, SlotUnavailable
        (the old one is not booked, or already changing; the new slot is taken), QuotaExhausted or
        Overloaded."""
        new_id = new_appointment_id()
        control_id = new_control_id()

        def work(tx):
            from gateway.chamber.rows import AppointmentRow

            old = self._own(tx, platform, appointment_id)
            if old.status != "booked" or old.pending_change is not None:
                raise SlotUnavailable(f"appointment {appointment_id} cannot be moved now (it is {old.status}"
                                      f"{', waiting for the HIS' if old.pending_change else ''})")
            slot = self._bookable_slot(tx, platform, new_slot_id)
            peer = self._check_backlog(tx, slot)
            tx.insert_appointment(AppointmentRow(
                id=new_id, platform=platform, slot_id=slot.id, status="pending", patient=old.patient,
                description=old.description, his_appointment=None, hold_expires=tx.now + self.hold_seconds,
                outcome=None, pending_change="book", version=1, created=tx.now, updated=tx.now,
                replaces=old.id,
            ))
            tx.update_appointment(old.id, pending_change="reschedule")
            tx.update_slot(slot.id, held_by=new_id)
            self._queue(tx, control_id, "S01", new_id, Patient.from_json(old.patient),
                        f"booking {new_id} (rescheduling {old.id})", peer)
            self._audit(tx, who, platform, "book", 202, new_id,
                        f"rescheduling {old.id}: slot {slot.id} held; SRM^S01 queued")
            return new_id, "new"

        d = self._transact(work)
        d.addCallback(self._booked, platform, control_id)
        return d.addCallback(lambda result: result[0])


    def _booked(self, result, platform, control_id):
        appointment_id, how = result
        if how == "new":
            log.info("booking.held", appointment=appointment_id, platform=platform, control_id=control_id)
            self._schedule_expiry()
        else:
            log.info("booking.repeated", appointment=appointment_id, platform=platform, how=how)
        return result

    def cancel(self, platform: str, appointment_id: str, who: AuditEntry | None = None,
               if_version: int | None = None) -> defer.Deferred:
        """Ask the HIS to cancel (queues SRM^S04); a booking still pending is cancelled at once.  Fires with
        'sent', 'cancelled' (both audited in the same transaction) or 'unchanged'.  ``if_version``: only if the
        appointment is still at that version (else VersionConflict, nothing changed)."""
        control_id = new_control_id()

        def work(tx):
            appt = self._own(tx, platform, appointment_id)
            if if_version is not None and appt.version != if_version:
                raise VersionConflict(f"appointment {appointment_id} is at version {appt.version}, not {if_version}")
            if appt.status in ("cancelled", "refused"):
                return "unchanged"
            if appt.pending_change == "cancel":
                return "unchanged"
            slot = tx.slot(appt.slot_id)
            if appt.status == "pending":
                self._release_hold(tx, appt, slot, "cancelled by the platform before the HIS answered")
                self._audit(tx, who, platform, "cancel", 200, appt.id, "cancelled before the HIS answered")
                return "cancelled"
            tx.update_appointment(appt.id, pending_change="cancel")
            self._queue(tx, control_id, "cancel", appt.id, Patient.from_json(appt.patient),
                        f"cancellation of {appt.id}")
            self._audit(tx, who, platform, "cancel", 202, appt.id, "cancellation queued")
            return "sent"

        d = self._transact(work)
        d.addCallback(lambda what: (log.info("booking.cancel", appointment=appointment_id, platform=platform,
                                             result=what), what)[1])
        return d

    @staticmethod
    def _audit(tx, who: AuditEntry | None, platform: str, action: str, outcome: int, appointment_id: str,
               detail: str, source: str | None = None) -> None:
        audit.append(tx, AuditEntry(
            action=action, outcome=outcome, platform=platform, subject=who.subject if who else None,
            serial=who.serial if who else None, source=source or (who.source if who else None),
            resource_type="Appointment", resource_id=appointment_id, detail=detail))

    def _settled(self, tx, appt, action: str, outcome: int, detail: str, source: str) -> None:
        """Audit how a change the platform asked for ended; ``source``: 'his:<endpoint>' that answered, or
        'gateway'."""
        self._audit(tx, None, appt.platform, action, outcome, appt.id, detail, source)

    def appointment(self, platform: str, appointment_id: str):
        return self._own(self.chamber.read(), platform, appointment_id)

    def appointment_versions(self, platform: str, appointment_id: str) -> list:
        """Every kept version of one of the platform's appointments, the current one first (then newest first)."""
        reader = self.chamber.read()
        self._own(reader, platform, appointment_id)
        return reader.appointment_versions(appointment_id)

    @staticmethod
    def _own(tx, platform, appointment_id):
        appt = tx.appointment(appointment_id)
        if appt is None or appt.platform != platform:
            # Another platform's appointment is as invisible as one that does not exist.
            raise AppointmentUnknown(f"no appointment {appointment_id!r}")
        return appt

    def _queue(self, tx, control_id: str, kind: str, appointment_id: str, patient: Patient, detail: str,
               peer: str | None = None) -> None:
        """Commit what the HIS must be told, as an outbound message without HL7 bytes yet: the inner gate
        encodes it (:meth:`encode`) once, on its first send, and every resend carries the same bytes.  So
        the outer gate never writes HL7, and needs nothing but the HIS endpoints' names.  ``peer``: where a
        booking (or a hold told to the HIS) goes (:meth:`_check_backlog`); a cancellation follows its booking."""
        if peer is None:
            peer = self._cancel_peer(tx, appointment_id)
        tx.add_message(direction="outbound", peer=peer, control_id=control_id,
                       type=_INTENT_TYPES[kind], state="committed", body=b"",
                       charset="", subject=subject_of(appointment_id), order_key=order_key(patient),
                       detail=detail)

    # -- the inner gate: what the HIS is sent ----------------------------------------------------------------
    def encode(self, tx, message) -> tuple[bytes, str, str]:
        """(HL7 bytes, message type, charset) for an outbound message committed by :meth:`_queue`."""
        appt = tx.appointment((message.subject or "").split(":", 1)[-1])
        link = self.links.get(message.peer)
        if appt is None or link is None or link.build_srm is None:
            raise ValueError(f"message {message.id} cannot be encoded: no appointment or no HIS link here")
        slot = tx.slot(appt.slot_id)
        patient = Patient.from_json(appt.patient)
        appointment_type, placer = "", appt.id
        moves = self._moving(tx, appt, link) if message.type == "SRM^S01" else None
        if moves is not None:  # the HIS moves the old booking itself: SRM^S03 naming it, with the new slot
            trigger, his_appointment, placer = link.move_trigger, moves.his_appointment, moves.id
        elif message.type == "SRM^S01":
            trigger, his_appointment = "S01", None
        elif message.type == "SRM^hold":
            trigger, his_appointment, appointment_type = "S01", None, link.hold_type
        else:
            trigger, his_appointment = link.cancel_trigger, appt.his_appointment
        body = self._srm(tx, link, message.peer, trigger, message.control_id, appt, placer, slot, patient,
                         his_appointment, appointment_type)
        return body, f"SRM^{trigger}", link.charset

    def _moving(self, tx, appt, link):
        """The booked appointment that ``appt`` replaces, when the HIS is to move it in one SRM^S03
        (reschedule_message of the endpoint ``link``, which holds the old booking); None for an ordinary
        SRM^S01 (a new booking, or the new half of cancel + new — also a move to another endpoint's slot)."""
        if link.move_trigger is None or not appt.replaces:
            return None
        old = tx.appointment(appt.replaces)
        if old is None or old.status != "booked" or old.pending_change != "reschedule":
            return None  # cancelled meanwhile: the new one is booked as an ordinary new booking
        if self._cancel_peer(tx, old.id) != link.peer:
            return None  # the old booking is at another HIS endpoint (another facility): cancel + new
        return old

    def _srm(self, tx, link, peer, trigger, control_id, appt, placer, slot, patient, his_appointment,
             appointment_type="") -> bytes:
        schedule = tx.schedule(slot.schedule_id)
        practitioner = schedule.practitioner_id if schedule is not None else ""
        start_local = datetime.strptime(slot.start_local, "%Y%m%d%H%M")
        # Routed by facility (the booking's route, which its cancellation follows): MSH-6 names the facility.
        facility = schedule.facility if schedule is not None and self.by_facility else ""
        r = self.route("SRM^S01", facility) if facility and self.route is not None else None
        return link.build_srm(
            trigger, control_id=control_id, appointment_id=placer,
            slot=SlotForHis(schedule_id=slot.schedule_id, start_local=start_local, minutes=slot.minutes,
                            service_code=slot.service_code, service_text=slot.service_text,
                            practitioner_id=practitioner),
            patient=self.patients.for_his(patient), now=datetime.fromtimestamp(tx.now, self.tz).replace(tzinfo=None),
            his_appointment=his_appointment,
            receiving_facility=r.facility if r is not None and r.facility and r.to == peer else None,
            z_segments=[z.replace("{platform}", appt.platform) for z in link.z_segments],
            **({"appointment_type": appointment_type} if appointment_type else {}),
        )

    # -- holds -----------------------------------------------------------------------------------------------
    def _release_hold(self, tx, appt, slot, reason: str) -> bool:
        """Release a pending booking's hold.  Its SRM^S01 (or tentative hold SRM^S01), if still waiting in the
        chamber, is withdrawn (a booking the platform was told is cancelled must not reach the HIS later); if
        an earlier attempt may have reached the HIS, or the HIS took the hold (outer.hold_at_his: a pending
        appointment's only delivered SRM^S01 is an accepted hold), one cancel follows.  An SRM in flight right
        now is left to its answer: an AA for it is compensated in :meth:`_answer_booking`.  Returns whether a
        cancel was queued."""
        tx.update_appointment(appt.id, status="cancelled", pending_change=None, hold_expires=None, outcome=reason)
        if slot is not None and slot.held_by == appt.id:
            tx.update_slot(slot.id, held_by=None)
        self._not_moved(tx, appt, reason)
        at_his = False
        for msg in tx.messages_for_subject(subject_of(appt.id)):
            move = self._is_move(msg, appt)
            if msg.type not in ("SRM^S01", "SRM^hold") and not move:
                continue
            if msg.state in ("committed", "retrying"):
                tx.set_message_state(msg.id, "withdrawn", detail=reason)
                at_his = at_his or (msg.attempts > 0 and not move)  # (a move is never undone by a cancel)
            elif msg.state == "delivered":
                at_his = True
        if at_his:
            self._queue_compensating_cancel(tx, appt, slot, None)
        return at_his

    def expire_holds(self) -> defer.Deferred:
        def work(tx):
            expired = tx.expired_holds(tx.now)
            for appt in expired:
                if appt.pending_change is None:  # a $hold: no message at all, or (hold_at_his) its release
                    told = self._release_hold(tx, appt, tx.slot(appt.slot_id), "the hold expired before it was booked")
                    self._settled(tx, appt, "book.settled", 409, "the hold expired before it was booked " + (
                        "(released at the HIS: cancel queued)" if told else "(the HIS was never told)"),
                        source="gateway")
                    continue
                self._release_hold(tx, appt, tx.slot(appt.slot_id),
                                   "the HIS did not answer in time; the hold expired")
                self._settled(tx, appt, "book.settled", 409, "the hold expired before the HIS answered",
                              source="gateway")
            return [a.id for a in expired]

        d = self._transact(work)

        def done(ids):
            for i in ids:
                log.warning("booking.hold_expired", appointment=i)
            self._schedule_expiry()
            return ids

        return d.addCallback(done)

    def _schedule_expiry(self) -> None:
        nxt = self.chamber.read().next_hold_expiry()
        if self._expiry_call is not None and self._expiry_call.active():
            self._expiry_call.cancel()
        self._expiry_call = None
        if nxt is not None:
            delay = max(0.0, nxt - self.clock.seconds()) + 0.01
            self._expiry_call = self.clock.callLater(delay, self.expire_holds)

    def start(self) -> None:
        self._schedule_expiry()

    def stop(self) -> None:
        if self._expiry_call is not None and self._expiry_call.active():
            self._expiry_call.cancel()
        self._expiry_call = None
        self._waiters.stop(None)

    # -- waiting for the HIS -----------------------------------------------------------------------------------
    def wait_settled(self, appointment_id: str, timeout: float) -> defer.Deferred:
        """Fires with True once no change to the appointment awaits the HIS, or False after ``timeout`` — at
        once when what it waits for is addressed to a HIS endpoint the inner gate's probe found down (the
        platform gets its 202 without waiting for an answer that cannot come; the message waits for the HIS)."""
        if self.chamber.read().waiting_for_a_down_his(subject_of(appointment_id)) is not None:
            return defer.succeed(False)
        return self._waiters.wait(appointment_id, timeout)

