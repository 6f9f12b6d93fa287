"""The HIS's answers to what the booking service queued, and what follows when a message never reaches the HIS.

The relay calls :meth:`HisAnswers.on_answer` (AA/CA, AE/AR, with SCH-2 when an SRR carried it) and
:meth:`HisAnswers.on_dead` (dead-lettered) inside the transaction that records the answer, so an
appointment's change settles in the same commit: a booking is booked or refused, a hold the HIS took is
held there too, a cancellation takes effect or is refused, a move cancels the booking it replaces (cancel +
new: one cancel message queued; at a HIS that moves bookings itself, the old one is freed at once).  An AA
for a hold already released (expired or cancelled) is undone with a compensating cancel; a message that may
have reached the HIS before its answer was lost is undone the same way.  Each settlement is audited
(``book.settled`` / ``cancel.settled``).
"""

from __future__ import annotations

import structlog

from gateway.domain.ids import new_control_id, subject_of
from gateway.domain.model import HisAnswer, Patient

log = structlog.get_logger("gateway.domain.booking_answers")

#: the outcome of a booking the gateway cancels to move it (HisAnswers._moved)
RESCHEDULED_TO = "rescheduled to "


def cancel_reason(appt) -> str:
    """Why a cancellation the gateway asked the HIS for was made: a move's "rescheduled to <new id>" (set
    when its SRM^S04 was queued), else the platform's own cancellation."""
    outcome = appt.outcome or ""
    return outcome if outcome.startswith(RESCHEDULED_TO) else "cancelled by the platform"


class HisAnswers:
    """The booking service's side of the relay: part of :class:`gateway.domain.booking.BookingService` (mixed
    in), whose ``links`` (every HIS endpoint by name), ``_queue`` (what the HIS must be told), ``_audit`` and
    ``_settled`` (the audit trail) it uses."""

    def on_answer(self, tx, message, answer: HisAnswer) -> None:
        if not (message.subject or "").startswith("appointment:"):
            return
        appt = tx.appointment(message.subject.split(":", 1)[1])
        if appt is None:
            return
        slot = tx.slot(appt.slot_id)
        kind = message.type.split("^")[-1]
        source = f"his:{message.peer}"
        if kind == "S01" and appt.status == "pending" and appt.pending_change == "hold":
            self._answer_hold(tx, appt, slot, answer, source)
        elif kind in ("S01", "hold"):
            self._answer_booking(tx, appt, slot, answer, source)
        elif self._is_move(message, appt):
            self._answer_booking(tx, appt, slot, answer, source, moved_at_his=True)
        else:
            self._answer_cancel(tx, appt, slot, answer, source)

    def _is_move(self, message, appt) -> bool:
        """Did this message (for ``appt``) move a booking at the HIS (:meth:`BookingService._moving`)?  An
        SRM^S03 for an appointment that replaces another and is not being cancelled (a HIS cannot both move and
        cancel with SRM^S03: the config refuses it, the answers could not be told apart)."""
        link = self.links.get(message.peer)
        move_trigger = link.move_trigger if link is not None else None
        return (move_trigger is not None and message.type == f"SRM^{move_trigger}"
                and appt.replaces is not None and appt.pending_change != "cancel")

    def _answer_booking(self, tx, appt, slot, answer: HisAnswer, source: str, moved_at_his: bool = False) -> None:
        if appt.status == "pending" and appt.pending_change == "book":
            if answer.accepted:
                his_appointment = answer.his_appointment
                if moved_at_his and not his_appointment:  # the HIS kept its appointment, on the new slot
                    old = tx.appointment(appt.replaces)
                    his_appointment = old.his_appointment if old is not None else None
                tx.update_appointment(appt.id, status="booked", pending_change=None, hold_expires=None,
                                      his_appointment=his_appointment, outcome=None)
                tx.update_slot(slot.id, held_by=None, booked_by=appt.id, his_status="busy",
                               his_appointment=his_appointment or slot.his_appointment)
                self._settled(tx, appt, "book.settled", 201, f"booked by the HIS ({answer.code})", source)
                if appt.replaces and moved_at_his:
                    self._moved_at_his(tx, appt, source)
                elif appt.replaces:
                    self._moved(tx, appt)
            else:
                tx.update_appointment(appt.id, status="refused", pending_change=None, hold_expires=None,
                                      outcome=f"refused by the HIS ({answer.code}): {answer.text or 'no reason given'}")
                if slot.held_by == appt.id:
                    tx.update_slot(slot.id, held_by=None)
                self._settled(tx, appt, "book.settled", 409, f"refused by the HIS ({answer.code})", source)
                self._not_moved(tx, appt, f"the new booking was refused by the HIS ({answer.code})")
                if any(m.type == "SRM^S01" and m.state == "delivered"  # the HIS took its hold (hold_at_his)
                       for m in tx.messages_for_subject(subject_of(appt.id))):
                    self._queue_compensating_cancel(tx, appt, slot, None)
        elif answer.accepted and moved_at_his:
            # The move was given up (the hold expired or was cancelled) but the HIS made it: a cancel would
            # cancel the patient's only booking there.  The HIS's SIU^S13 moves the old one in the mirror.
            log.error("booking.moved_after_release", appointment=appt.id, replaces=appt.replaces)
            self._settled(tx, appt, "book.settled", 409,
                          f"the HIS moved the booking ({answer.code}) after the move was given up; nothing undone",
                          source)
        elif answer.accepted:
            # The hold was released (expired or cancelled) before the HIS accepted: undo it at the HIS.
            self._queue_compensating_cancel(tx, appt, slot, answer.his_appointment)
            self._settled(tx, appt, "book.settled", 409,
                          f"accepted by the HIS ({answer.code}) after the hold was released; cancel queued", source)

    def _answer_hold(self, tx, appt, slot, answer: HisAnswer, source: str) -> None:
        """The HIS's answer to a tentative SRM^S01 (outer.hold_at_his): accepted, the slot is held there too
        until $book confirms it or the hold is released with a cancel; refused, the hold is released."""
        if answer.accepted:
            tx.update_appointment(appt.id, pending_change=None, his_appointment=answer.his_appointment)
            self._audit(tx, None, appt.platform, "hold", 200, appt.id, f"held at the HIS too ({answer.code})",
                        source=source)
            return
        tx.update_appointment(appt.id, status="refused", pending_change=None, hold_expires=None,
                              outcome=f"the HIS refused the hold ({answer.code}): {answer.text or 'no reason given'}")
        if slot is not None and slot.held_by == appt.id:
            tx.update_slot(slot.id, held_by=None)
        self._settled(tx, appt, "book.settled", 409, f"hold refused by the HIS ({answer.code})", source)

    def _answer_cancel(self, tx, appt, slot, answer: HisAnswer, source: str) -> None:
        if appt.pending_change != "cancel":
            return  # a compensating cancel: the appointment is already cancelled on our side
        if answer.accepted:
            tx.update_appointment(appt.id, status="cancelled", pending_change=None, outcome=cancel_reason(appt))
            if slot.booked_by == appt.id:
                tx.update_slot(slot.id, booked_by=None, his_status="free", his_appointment=None)
            self._settled(tx, appt, "cancel.settled", 200, f"cancelled by the HIS ({answer.code})", source)
        else:
            tx.update_appointment(appt.id, pending_change=None,
                                  outcome=f"cancellation refused by the HIS ({answer.code}): "
                                          f"{answer.text or 'no reason given'}")
            self._settled(tx, appt, "cancel.settled", 409, f"cancellation refused by the HIS ({answer.code})", source)
            self._freed_meanwhile(tx, appt, slot)

    @staticmethod
    def _freed_meanwhile(tx, appt, slot) -> None:
        """Our cancellation did not take effect, yet the HIS has freed the slot meanwhile (SlotBook marked the
        appointment cancelled with our reason while the cancellation was pending): the hospital cancelled it."""
        freed = slot is not None and slot.booked_by != appt.id and slot.his_status == "free"
        if freed or appt.status == "cancelled":
            tx.update_appointment(appt.id, status="cancelled", outcome="cancelled by the hospital")

    def _queue_compensating_cancel(self, tx, appt, slot, his_appointment) -> None:
        control_id = new_control_id()
        if his_appointment and not appt.his_appointment:
            tx.update_appointment(appt.id, his_appointment=his_appointment)  # the cancel names it
        self._queue(tx, control_id, "cancel", appt.id, Patient.from_json(appt.patient),
                    f"compensating cancellation of {appt.id}")
        log.warning("booking.compensating_cancel", appointment=appt.id, control_id=control_id)

    def on_dead(self, tx, message, reason: str) -> None:
        """The relay gave up on a message (dead-lettered): settle the appointment it carried."""
        if not (message.subject or "").startswith("appointment:"):
            return
        appt = tx.appointment(message.subject.split(":", 1)[1])
        if appt is None:
            return
        kind = message.type.split("^")[-1]
        if self._is_move(message, appt) and appt.status == "pending" and appt.pending_change == "book":
            kind = "move"
        if kind in ("S01", "hold", "move") and appt.status == "pending" and appt.pending_change in ("book", "hold"):
            what = "hold" if appt.pending_change == "hold" else "booking"
            tx.update_appointment(appt.id, status="refused", pending_change=None, hold_expires=None,
                                  outcome=f"the HIS did not take the {what}: {reason}")
            slot = tx.slot(appt.slot_id)
            if slot is not None and slot.held_by == appt.id:
                tx.update_slot(slot.id, held_by=None)
            if message.attempts > 0 and kind != "move":  # it may have reached the HIS before its answer was lost
                self._queue_compensating_cancel(tx, appt, slot, None)
            elif message.attempts > 0:  # a cancel would cancel the patient's booking: the HIS's SIU^S13 tells
                log.error("booking.move_unanswered", appointment=appt.id, replaces=appt.replaces)
            self._settled(tx, appt, "book.settled", 409, f"dead-lettered: the HIS did not take the {what}",
                          f"his:{message.peer}")
            self._not_moved(tx, appt, "the new booking did not reach the HIS")
        elif kind not in ("S01", "hold", "move") and appt.pending_change == "cancel":
            tx.update_appointment(appt.id, pending_change=None,
                                  outcome=f"the cancellation did not reach the HIS: {reason}")
            self._settled(tx, appt, "cancel.settled", 409, "dead-lettered: the cancellation did not reach the HIS",
                          f"his:{message.peer}")
            self._freed_meanwhile(tx, appt, tx.slot(appt.slot_id))

    def _moved(self, tx, new) -> None:
        """The HIS accepted ``new``, which replaces a booked appointment: cancel the old one at the HIS."""
        old = tx.appointment(new.replaces)
        if old is None or old.status != "booked" or old.pending_change != "reschedule":
            return  # the platform cancelled it meanwhile, or the hospital did
        tx.update_appointment(old.id, pending_change="cancel", outcome=f"{RESCHEDULED_TO}{new.id}")
        self._queue(tx, new_control_id(), "cancel", old.id, Patient.from_json(old.patient),
                    f"cancellation of {old.id}: rescheduled to {new.id}")
        self._audit(tx, None, old.platform, "cancel", 202, old.id, f"rescheduled to {new.id}; cancellation queued",
                    source="gateway")

    def _moved_at_his(self, tx, new, source: str) -> None:
        """The HIS accepted the SRM^S03 that moved the booking ``new`` replaces: the old appointment is cancelled
        ("rescheduled to <new id>") and its slot is free, in the same transaction; nothing more is sent."""
        old = tx.appointment(new.replaces)
        if old is None or old.status != "booked":
            return
        tx.update_appointment(old.id, status="cancelled", pending_change=None, outcome=f"{RESCHEDULED_TO}{new.id}")
        old_slot = tx.slot(old.slot_id)
        if old_slot is not None and old_slot.booked_by == old.id:
            tx.update_slot(old_slot.id, booked_by=None, his_status="free", his_appointment=None)
        self._settled(tx, old, "cancel.settled", 200, f"moved by the HIS to {new.slot_id} (rescheduled to {new.id})",
                      source)

    @staticmethod
    def _not_moved(tx, new, reason: str) -> None:
        """``new`` will not be booked: the appointment it was to replace stays as it is."""
        if not new.replaces:
            return
        old = tx.appointment(new.replaces)
        if old is not None and old.pending_change == "reschedule":
            tx.update_appointment(old.id, pending_change=None, outcome=f"not rescheduled: {reason}")
