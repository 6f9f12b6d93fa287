"""The HIS's slot book, mirrored: what the HIS says about its slots (SIU^S12..S26, SQR^S25, read by the inner
gate into :class:`~gateway.domain.model.SlotNotice`) applied to the chamber's schedules and slots.

A slot row keeps what the HIS says (``his_status``, ``his_appointment``) apart from what the gateway does
with it (``held_by``, ``booked_by``): a notice never overrides a platform's hold, and the HIS freeing or
moving a slot one of our platforms booked settles that appointment here — as the gateway's own
cancellation or move when it had asked for one (the HIS's SIU and its answer to our SRM come in either
order, :mod:`gateway.domain.booking_answers`), else as the hospital's.
"""

from __future__ import annotations

from zoneinfo import ZoneInfo

from gateway.domain.booking_answers import cancel_reason
from gateway.domain.ids import slot_id
from gateway.domain.model import SlotNotice
from gateway.domain.notifications import note

#: slot action -> the HIS status it leaves
_HIS_STATUS = {"open": "free", "free": "free", "block": "busy-unavailable", "book": "busy",
               "reschedule": "busy", "noshow": "busy"}
#: slot actions that publish the slot (no patient's appointment on it): they set its Z-segments
_PUBLICATIONS = frozenset({"open", "block"})


class SlotBook:
    """The mirror of the HIS's slot book."""

    def __init__(self, tz: ZoneInfo):
        self.tz = tz
        self._instants: dict[tuple, float] = {}  # hospital wall-clock time -> timestamp (zoneinfo is slow)

    def apply(self, tx, notices: list[SlotNotice]) -> list[str]:
        """Apply notices inside a chamber transaction; returns the ids of the slots they touched."""
        return [self._apply_one(tx, n) for n in notices]

    def _apply_one(self, tx, n: SlotNotice) -> str:
        from gateway.chamber.rows import ScheduleRow, SlotRow  # row types only: the chamber is our store

        tx.upsert_schedule(ScheduleRow(
            id=n.schedule.id, display=n.schedule.display, practitioner_id=n.schedule.practitioner_id,
            practitioner_name=n.schedule.practitioner_name, department_code=n.schedule.department_code,
            department_name=n.schedule.department_name, facility=n.schedule.facility, updated=tx.now,
        ))
        sid = slot_id(n.schedule.id, n.start_local)
        instant = (n.start_local, n.start_local.fold)  # (equal naive datetimes may differ in fold)
        start_ts = self._instants.get(instant)
        if start_ts is None:
            if len(self._instants) > 100_000:
                self._instants.clear()
            start_ts = self._instants[instant] = n.start_local.replace(tzinfo=self.tz).timestamp()
        end_ts = start_ts + n.minutes * 60
        his_status = _HIS_STATUS[n.action]
        his_appointment = n.his_appointment if his_status == "busy" else None
        # Z-segments only from the HIS publishing the slot (open, blocked): notices about a patient's
        # appointment may carry that patient's data in theirs, and every platform reads the Slot.
        publication = n.action in _PUBLICATIONS
        z_segments = "\r".join(n.z_segments) or None if publication else None

        moved = None  # the appointment of ours the hospital moved to this slot (SIU^S13)
        if n.action == "reschedule" and n.his_appointment:
            old = tx.slot_by_his_appointment(n.his_appointment)
            if old is not None and old.id != sid:
                tx.update_slot(old.id, his_status="free", his_appointment=None, booked_by=None)
                moved = self._move_appointment(tx, old, sid)

        if n.action == "noshow":
            known = tx.slot(sid)
            if known is not None and known.booked_by:
                note(tx, known.booked_by, "noshow")  # its subscribers are told (gateway/domain/notifications.py)
        if his_status != "free":  # no booking of ours to release: one statement, new slot or known
            tx.insert_slot(SlotRow(
                id=sid, schedule_id=n.schedule.id, start_local=f"{n.start_local:%Y%m%d%H%M}",
                start_ts=start_ts, end_ts=end_ts, minutes=n.minutes, service_code=n.service_code,
                service_text=n.service_text, his_status=his_status, his_appointment=his_appointment,
                held_by=None, booked_by=None, updated=tx.now, z_segments=z_segments,
            ), or_update=True, publication=publication)
            if moved is not None:  # the slot carries the booking now: its cancellation, its no-show
                tx.update_slot(sid, booked_by=moved)
            return sid
        slot = tx.slot(sid)
        if slot is None:
            tx.insert_slot(SlotRow(
                id=sid, schedule_id=n.schedule.id, start_local=f"{n.start_local:%Y%m%d%H%M}",
                start_ts=start_ts, end_ts=end_ts, minutes=n.minutes, service_code=n.service_code,
                service_text=n.service_text, his_status=his_status, his_appointment=his_appointment,
                held_by=None, booked_by=None, updated=tx.now, z_segments=z_segments,
            ))
            return sid
        changes = dict(start_ts=start_ts, end_ts=end_ts, minutes=n.minutes, service_code=n.service_code,
                       service_text=n.service_text, his_status=his_status, his_appointment=his_appointment)
        if publication:
            changes["z_segments"] = z_segments
        if his_status == "free" and slot.booked_by:
            appt = tx.appointment(slot.booked_by)
            if appt is not None and n.his_appointment and appt.his_appointment \
                    and appt.his_appointment != n.his_appointment:
                # the HIS freed another appointment of this slot, an earlier one: its notices come on its
                # connection, its answers to our SRMs on ours, so the S15 of a booking cancelled and then
                # re-booked at the HIS can reach us after the new booking's answer.  That booking stands.
                return sid
            if appt is not None and appt.status == "booked":
                self._booking_freed(tx, appt)
            changes["booked_by"] = None
        tx.update_slot(sid, **changes)
        return sid

    @staticmethod
    def _booking_freed(tx, appt) -> None:
        """The HIS freed the slot of ``appt``, booked by one of our platforms.  If we asked the HIS to cancel
        it (``pending_change`` 'cancel'), this is most likely our SRM^S04 taking effect, its answer still on
        the way: the HIS pushes the SIU on its own connection, so the SIU and the SRR reach us in either
        order.  The appointment is cancelled now with the reason the gateway gave (the platform's
        cancellation, or "rescheduled to <new id>"), so it never reads as booked on a free slot; the
        cancellation stays pending until the answer settles it (:meth:`BookingService._answer_cancel`: an AA
        keeps the reason, a refusal makes it the hospital's).  Otherwise the hospital cancelled it."""
        if appt.pending_change == "cancel":
            tx.update_appointment(appt.id, status="cancelled", outcome=cancel_reason(appt))
        else:
            tx.update_appointment(appt.id, status="cancelled", pending_change=None,
                                  outcome="cancelled by the hospital")

    @staticmethod
    def _move_appointment(tx, old_slot, new_slot_id: str) -> str | None:
        """The HIS moved the booking on ``old_slot`` (SIU^S13).  If the gateway asked for that move (SRM^S03,
        ``pending_change`` 'reschedule'), the HIS's answer settles it with the gateway's reason (the SIU and
        the SRR come in either order); otherwise the hospital rescheduled it: the appointment's id is returned
        (the new slot is booked by it)."""
        if not old_slot.booked_by:
            return None
        appt = tx.appointment(old_slot.booked_by)
        if appt is not None and appt.pending_change != "reschedule":
            tx.update_appointment(appt.id, slot_id=new_slot_id, outcome="rescheduled by the hospital")
            return appt.id
        return None
