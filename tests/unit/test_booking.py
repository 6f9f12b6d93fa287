"""The slot book and the booking service: hold -> confirm, refusals, cancellations, expiry, compensation.

Runs on a real chamber (SQLite file) with transactions committed synchronously and a task.Clock.
"""

import functools
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from twisted.internet import task

from adapters.hl7.er7 import parse
from adapters.maps.srm_booking import Hl7Header, build_srm
from gateway.domain.booking import BookingService, HisLinkInfo
from gateway.domain.slot_book import SlotBook
from gateway.chamber.engine import Chamber
from gateway.domain.model import (
    AppointmentUnknown,
    IdempotencyConflict,
    BookingRequest,
    HisAnswer,
    Patient,
    PatientIdentifier,
    ScheduleInfo,
    SlotNotice,
    SlotUnavailable,
    SlotUnknown,
    slot_status,
)
from gateway.domain.backlog import Overloaded
from gateway.domain.ids import slot_id
from tests.deferreds import assertNoResult, failureResultOf, successResultOf

TZ = ZoneInfo("Asia/Shanghai")
START = datetime(2030, 1, 7, 8, 0)
SCHEDULE = ScheduleInfo("D001", "张伟 心内科", "D001", "张伟", "CARD", "心内科")
PATIENT = Patient((PatientIdentifier("urn:demo:mrn", "MRN-1", "MR"),), "王", "芳", "13800000000")
SID = slot_id("D001", START)


def notice(action, start=START, his_appointment=None, placer=None):
    return SlotNotice(action, SCHEDULE, start, 15, "card", "心内科门诊", his_appointment, placer)


@pytest.fixture
def env(chamber_backend):
    """(once on each chamber backend: tests/conftest.py)"""
    clock = task.Clock()
    clock.advance(datetime(2030, 1, 1, tzinfo=TZ).timestamp())
    chamber = Chamber(backend=chamber_backend(), clock=clock.seconds)
    chamber.open()
    header = Hl7Header("GATEWAYD", "FRONT", "HIS", "HOSPITAL", "2.5", "utf-8")
    booking = BookingService(chamber, HisLinkInfo("his", "utf-8", "S04", functools.partial(build_srm, header=header)),
                             tz=TZ, hold_seconds=60, clock=clock)
    book = SlotBook(TZ)
    chamber.transact_now(lambda tx: book.apply(tx, [notice("open")]))
    yield chamber, booking, book, clock
    booking.stop()
    chamber.close()


def outbound(chamber):
    return [m for m in reversed(chamber.read().messages(direction="outbound"))]


def encoded(chamber, booking, message):
    """What the inner gate does before the first send: the HL7 bytes, stored once; returns them parsed."""
    def work(tx):
        body, type_, charset = booking.encode(tx, tx.message(message.id))
        tx.set_encoded(message.id, body, type_, charset)
        return tx.message(message.id)

    row = chamber.transact_now(work)
    return row, parse(row.body)


def answer(chamber, booking, message, code, his_appointment=None, text=""):
    chamber.transact_now(lambda tx: booking.on_answer(tx, tx.message(message.id),
                                                      HisAnswer(code, text, his_appointment)))


def test_open_notice_creates_a_free_slot(env):
    """SIU^S24 for a new time creates the slot and its schedule; the slot is free."""
    chamber, *_ = env
    slot = chamber.read().slot(SID)
    assert slot_status(slot) == "free"
    assert slot.start_ts == START.replace(tzinfo=TZ).timestamp()
    assert slot.end_ts - slot.start_ts == 15 * 60
    assert chamber.read().schedules()[0].practitioner_name == "张伟"


def test_booking_holds_the_slot_and_queues_srm_in_one_commit(env):
    """book() commits the pending appointment, the busy-tentative hold and the SRM^S01 together."""
    chamber, booking, _, _ = env
    appointment_id = successResultOf(booking.book("demo", BookingRequest(SID, PATIENT)))[0]
    assert slot_status(chamber.read().slot(SID)) == "busy-tentative"
    appt = chamber.read().appointment(appointment_id)
    assert (appt.status, appt.pending_change) == ("pending", "book")
    [msg] = outbound(chamber)
    assert (msg.type, msg.state, msg.subject) == ("SRM^S01", "committed", f"appointment:{appointment_id}")
    assert msg.body == b""  # committed as an intent: the inner gate writes the HL7
    msg, srm = encoded(chamber, booking, msg)
    assert msg.type == "SRM^S01" and msg.charset == "utf-8"
    assert srm.control_id == msg.control_id
    assert srm.segment("ARQ").get(1) == appointment_id
    assert srm.segment("ARQ").get(5) == "D001"
    assert srm.segment("ARQ").get(11) == "203001070800"
    assert srm.segment("PID").get(5) == "王"


def test_second_booking_of_a_held_slot_is_refused(env):
    """While a slot is held, another booking of it is refused (SlotUnavailable) and queues nothing."""
    chamber, booking, _, _ = env
    successResultOf(booking.book("demo", BookingRequest(SID, PATIENT)))[0]
    failureResultOf(booking.book("other", BookingRequest(SID, PATIENT)), SlotUnavailable)
    assert len(outbound(chamber)) == 1


def test_unknown_slot_is_refused(env):
    _, booking, _, _ = env
    failureResultOf(booking.book("demo", BookingRequest("nope-203001070800", PATIENT)), SlotUnknown)


def test_his_accepts_booking(env):
    """AA from the HIS books the appointment; the slot is busy and remembers the HIS appointment."""
    chamber, booking, _, _ = env
    appointment_id = successResultOf(booking.book("demo", BookingRequest(SID, PATIENT)))[0]
    answer(chamber, booking, outbound(chamber)[0], "AA", "H000001")
    appt = chamber.read().appointment(appointment_id)
    assert (appt.status, appt.pending_change, appt.his_appointment) == ("booked", None, "H000001")
    slot = chamber.read().slot(SID)
    assert (slot_status(slot), slot.booked_by, slot.his_appointment) == ("busy", appointment_id, "H000001")


def test_his_refuses_booking_after_counter_booked_the_slot(env):
    """The counter booked the slot (SIU^S12) while our SRM travelled: AR refuses the booking, and the
    slot stays busy because the HIS said so (the hold is released, not the HIS's booking)."""
    chamber, booking, book, _ = env
    appointment_id = successResultOf(booking.book("demo", BookingRequest(SID, PATIENT)))[0]
    chamber.transact_now(lambda tx: book.apply(tx, [notice("book", his_appointment="H9")]))
    answer(chamber, booking, outbound(chamber)[0], "AR", text="slot already booked")
    appt = chamber.read().appointment(appointment_id)
    assert appt.status == "refused" and "slot already booked" in appt.outcome
    assert slot_status(chamber.read().slot(SID)) == "busy"


def test_refusal_frees_a_slot_the_his_still_has_free(env):
    chamber, booking, _, _ = env
    successResultOf(booking.book("demo", BookingRequest(SID, PATIENT)))[0]
    answer(chamber, booking, outbound(chamber)[0], "AE", text="internal")
    assert slot_status(chamber.read().slot(SID)) == "free"


def test_cancel_is_sent_to_the_his_and_frees_the_slot_when_accepted(env):
    """Cancelling a booked appointment queues SRM^S04 carrying the HIS's appointment id; its AA frees it."""
    chamber, booking, _, _ = env
    appointment_id = successResultOf(booking.book("demo", BookingRequest(SID, PATIENT)))[0]
    answer(chamber, booking, outbound(chamber)[0], "AA", "H000001")
    assert successResultOf(booking.cancel("demo", appointment_id)) == "sent"
    cancel = outbound(chamber)[1]
    assert cancel.type == "SRM^cancel"
    cancel, srm = encoded(chamber, booking, cancel)
    assert cancel.type == "SRM^S04"
    assert srm.segment("ARQ").get(2) == "H000001"
    assert chamber.read().appointment(appointment_id).pending_change == "cancel"
    answer(chamber, booking, cancel, "AA")
    assert chamber.read().appointment(appointment_id).status == "cancelled"
    assert slot_status(chamber.read().slot(SID)) == "free"


def test_cancel_refused_by_the_his_keeps_the_booking(env):
    chamber, booking, _, _ = env
    appointment_id = successResultOf(booking.book("demo", BookingRequest(SID, PATIENT)))[0]
    answer(chamber, booking, outbound(chamber)[0], "AA", "H1")
    successResultOf(booking.cancel("demo", appointment_id))
    answer(chamber, booking, outbound(chamber)[1], "AR", text="too late to cancel")
    appt = chamber.read().appointment(appointment_id)
    assert (appt.status, appt.pending_change) == ("booked", None)
    assert "too late" in appt.outcome


def test_platform_cannot_touch_another_platforms_appointment(env):
    _, booking, _, _ = env
    appointment_id = successResultOf(booking.book("demo", BookingRequest(SID, PATIENT)))[0]
    with pytest.raises(AppointmentUnknown):
        booking.appointment("other", appointment_id)
    failureResultOf(booking.cancel("other", appointment_id), AppointmentUnknown)


def test_hold_expires_and_unsent_srm_is_withdrawn(env):
    """A hold the HIS never answered is released at hold_expires; an SRM never sent is withdrawn."""
    chamber, booking, _, clock = env
    appointment_id = successResultOf(booking.book("demo", BookingRequest(SID, PATIENT)))[0]
    clock.advance(61)
    appt = chamber.read().appointment(appointment_id)
    assert appt.status == "cancelled" and "expired" in appt.outcome
    assert slot_status(chamber.read().slot(SID)) == "free"
    assert outbound(chamber)[0].state == "withdrawn"


def test_expiry_of_a_booking_that_may_have_reached_the_his_withdraws_it_and_cancels(env):
    """The SRM was tried (no answer) and waits for a resend when the hold expires: it is withdrawn, and a
    cancel follows, since the first attempt may have reached the HIS."""
    chamber, booking, _, clock = env
    successResultOf(booking.book("demo", BookingRequest(SID, PATIENT)))
    srm = outbound(chamber)[0]
    chamber.transact_now(lambda tx: tx.set_message_state(srm.id, "retrying", attempts=1))
    clock.advance(61)
    msgs = outbound(chamber)
    assert [(m.type, m.state) for m in msgs] == [("SRM^S01", "withdrawn"), ("SRM^cancel", "committed")]


def test_idempotency_key_returns_the_first_booking(env):
    """The same Idempotency-Key with the same request returns the first appointment and books nothing more;
    with a different request it is refused."""
    chamber, booking, _, _ = env
    first = successResultOf(booking.book("demo", BookingRequest(SID, PATIENT), idempotency_key="k1", request_hash="h"))
    again = successResultOf(booking.book("demo", BookingRequest(SID, PATIENT), idempotency_key="k1", request_hash="h"))
    assert first == (first[0], "new") and again == (first[0], "replayed")
    assert len(outbound(chamber)) == 1
    failureResultOf(booking.book("demo", BookingRequest(SID, PATIENT), idempotency_key="k1", request_hash="other"),
                    IdempotencyConflict)
    # keys are per platform
    failureResultOf(booking.book("other", BookingRequest(SID, PATIENT), idempotency_key="k1", request_hash="h"),
                    SlotUnavailable)


def test_if_none_exist_finds_the_platforms_own_identifier(env):
    chamber, booking, _, _ = env
    request = BookingRequest(SID, PATIENT, identifiers=(("urn:platform:order", "42"),))
    first, how = successResultOf(booking.book("demo", request, if_none_exist=("urn:platform:order", "42")))
    assert how == "new"
    again = successResultOf(booking.book("demo", request, if_none_exist=("urn:platform:order", "42")))
    assert again == (first, "existing")
    assert chamber.read().appointment_identifiers(first) == [("urn:platform:order", "42")]


def test_backlog_limit_refuses_new_bookings(env):
    """Past max_backlog undelivered messages, new bookings are refused (Overloaded) and nothing is held."""
    chamber, booking, book, _ = env
    booking.max_backlog = 1
    successResultOf(booking.book("demo", BookingRequest(SID, PATIENT)))
    later = START.replace(hour=9)
    chamber.transact_now(lambda tx: book.apply(tx, [notice("open", start=later)]))
    refused = failureResultOf(booking.book("demo", BookingRequest(slot_id("D001", later), PATIENT)), Overloaded)
    assert refused.value.retry_after > 0
    assert slot_status(chamber.read().slot(slot_id("D001", later))) == "free"


def test_dead_lettered_booking_is_refused_and_compensated(env):
    """The relay gave up on the SRM^S01 after attempts: the booking is refused with the reason, the slot
    released, and a cancel queued in case the HIS did receive it."""
    chamber, booking, _, _ = env
    appointment_id = successResultOf(booking.book("demo", BookingRequest(SID, PATIENT)))[0]
    srm = outbound(chamber)[0]
    chamber.transact_now(lambda tx: tx.set_message_state(srm.id, "dead", attempts=5, last_error="no ACK"))
    chamber.transact_now(lambda tx: booking.on_dead(tx, tx.message(srm.id), "no ACK after 5 attempts"))
    appt = chamber.read().appointment(appointment_id)
    assert appt.status == "refused" and "no ACK after 5 attempts" in appt.outcome
    assert slot_status(chamber.read().slot(SID)) == "free"
    assert [m.type for m in outbound(chamber)] == ["SRM^S01", "SRM^cancel"]


def test_acceptance_after_expiry_is_compensated_with_a_cancel(env):
    """If the HIS accepts a booking whose hold was already released, a cancel is queued to undo it."""
    chamber, booking, _, clock = env
    appointment_id = successResultOf(booking.book("demo", BookingRequest(SID, PATIENT)))[0]
    srm = outbound(chamber)[0]
    chamber.transact_now(lambda tx: tx.set_message_state(srm.id, "sending", attempts=1))
    clock.advance(61)
    answer(chamber, booking, srm, "AA", "H7")
    msgs = outbound(chamber)
    assert [m.type for m in msgs] == ["SRM^S01", "SRM^cancel"]
    assert encoded(chamber, booking, msgs[1])[1].segment("ARQ").get(2) == "H7"
    assert chamber.read().appointment(appointment_id).status == "cancelled"


def test_hospital_cancellation_cancels_our_booking(env):
    """SIU^S15 for a slot one of our platforms booked: the appointment becomes cancelled."""
    chamber, booking, book, _ = env
    appointment_id = successResultOf(booking.book("demo", BookingRequest(SID, PATIENT)))[0]
    answer(chamber, booking, outbound(chamber)[0], "AA", "H1")
    chamber.transact_now(lambda tx: book.apply(tx, [notice("free", his_appointment="H1")]))
    appt = chamber.read().appointment(appointment_id)
    assert appt.status == "cancelled" and appt.outcome == "cancelled by the hospital"


def test_reschedule_moves_the_his_appointment(env):
    """SIU^S13 frees the slot that carried the HIS appointment and makes the new one busy."""
    chamber, booking, book, _ = env
    later = START.replace(hour=9)
    chamber.transact_now(lambda tx: book.apply(tx, [notice("open", start=later)]))
    chamber.transact_now(lambda tx: book.apply(tx, [notice("book", his_appointment="H5")]))
    chamber.transact_now(lambda tx: book.apply(tx, [notice("reschedule", start=later, his_appointment="H5")]))
    assert slot_status(chamber.read().slot(SID)) == "free"
    assert chamber.read().slot(slot_id("D001", later)).his_appointment == "H5"


def test_waiting_for_the_his_settles_on_answer_or_times_out(env):
    """wait_settled fires True after the answer is committed, False after the timeout."""
    chamber, booking, _, clock = env
    appointment_id = successResultOf(booking.book("demo", BookingRequest(SID, PATIENT)))[0]
    waited = booking.wait_settled(appointment_id, 5)
    assertNoResult(waited)
    answer(chamber, booking, outbound(chamber)[0], "AA", "H1")
    assert successResultOf(waited) is True
    later = START.replace(hour=10)
    chamber.transact_now(lambda tx: SlotBook(TZ).apply(tx, [notice("open", start=later)]))
    other = successResultOf(booking.book("demo", BookingRequest(slot_id("D001", later), PATIENT)))[0]
    waited = booking.wait_settled(other, 5)
    clock.advance(5)
    assert successResultOf(waited) is False


def test_the_his_freeing_the_slot_before_it_answers_our_cancel_is_our_cancel(env):
    """The HIS may push SIU^S15 for the slot before its answer to our SRM^S04 arrives (two connections):
    while our cancellation is pending the freed slot is not taken for the hospital's cancellation: the
    appointment is cancelled at once with the platform's reason, and the AA then settles it."""
    chamber, booking, book, _ = env
    appointment_id = successResultOf(booking.book("demo", BookingRequest(SID, PATIENT)))[0]
    answer(chamber, booking, outbound(chamber)[0], "AA", "H1")
    assert successResultOf(booking.cancel("demo", appointment_id)) == "sent"
    chamber.transact_now(lambda tx: book.apply(tx, [notice("free", his_appointment="H1")]))
    appt = chamber.read().appointment(appointment_id)
    assert (appt.status, appt.pending_change, appt.outcome) == ("cancelled", "cancel", "cancelled by the platform")
    answer(chamber, booking, outbound(chamber)[1], "AA")
    appt = chamber.read().appointment(appointment_id)
    assert (appt.status, appt.outcome) == ("cancelled", "cancelled by the platform")
    assert slot_status(chamber.read().slot(SID)) == "free"


def test_a_refused_cancel_of_a_slot_the_his_freed_meanwhile_is_the_hospitals_cancellation(env):
    chamber, booking, book, _ = env
    appointment_id = successResultOf(booking.book("demo", BookingRequest(SID, PATIENT)))[0]
    answer(chamber, booking, outbound(chamber)[0], "AA", "H1")
    successResultOf(booking.cancel("demo", appointment_id))
    chamber.transact_now(lambda tx: book.apply(tx, [notice("free", his_appointment="H1")]))
    answer(chamber, booking, outbound(chamber)[1], "AR", text="unknown appointment")
    appt = chamber.read().appointment(appointment_id)
    assert (appt.status, appt.pending_change, appt.outcome) == ("cancelled", None, "cancelled by the hospital")


def test_waiters_are_settled_by_this_process_commits_without_reading_the_chamber(env, monkeypatch):
    """After a commit of this process, the waiters of the appointments it settled fire — found from what
    the transaction did, not by querying every waiting appointment."""
    from gateway.chamber.reader import Reader

    chamber, booking, _, clock = env
    appointment_id = successResultOf(booking.book("demo", BookingRequest(SID, PATIENT)))[0]
    waited = booking.wait_settled(appointment_id, timeout=5)
    monkeypatch.setattr(Reader, "settled_among", lambda *a: pytest.fail("queried the waiters"))
    answer(chamber, booking, outbound(chamber)[0], "AA", "H1")
    assert successResultOf(waited) is True


def test_a_late_cancel_of_an_earlier_booking_of_the_slot_leaves_the_booking_on_it_now(env):
    """The HIS's SIU for a booking reach us on its own connection, its answers to our SRMs on ours: a patient
    books a slot (H1) and cancels it, another books it (H2), and only then do the HIS's S12 and S15 for H1
    arrive (found by bench/rush.py). They are about H1, not about the booking on the slot now: H2 stays
    booked at the gateway as it is at the HIS, and the slot stays H2's."""
    chamber, booking, book, _ = env
    first = successResultOf(booking.book("demo", BookingRequest(SID, PATIENT)))[0]
    answer(chamber, booking, outbound(chamber)[0], "AA", "H1")
    assert successResultOf(booking.cancel("demo", first)) == "sent"
    answer(chamber, booking, outbound(chamber)[1], "AA")
    second = successResultOf(booking.book("demo", BookingRequest(SID, PATIENT)))[0]
    answer(chamber, booking, outbound(chamber)[2], "AA", "H2")
    chamber.transact_now(lambda tx: book.apply(tx, [notice("book", his_appointment="H1")]))
    chamber.transact_now(lambda tx: book.apply(tx, [notice("free", his_appointment="H1")]))
    appt = chamber.read().appointment(second)
    assert (appt.status, appt.his_appointment) == ("booked", "H2")
    slot = chamber.read().slot(SID)
    assert (slot_status(slot), slot.his_appointment, slot.booked_by) == ("busy", "H2", second)
    assert chamber.read().appointment(first).outcome == "cancelled by the platform"
    # the HIS's own notices for H2 then change nothing; its S15 for H2 is the hospital's cancellation of it
    chamber.transact_now(lambda tx: book.apply(tx, [notice("book", his_appointment="H2")]))
    assert chamber.read().appointment(second).status == "booked"
    chamber.transact_now(lambda tx: book.apply(tx, [notice("free", his_appointment="H2")]))
    appt = chamber.read().appointment(second)
    assert (appt.status, appt.outcome) == ("cancelled", "cancelled by the hospital")
    assert slot_status(chamber.read().slot(SID)) == "free"
