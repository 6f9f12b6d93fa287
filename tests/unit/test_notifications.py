"""Notifications (issue 23): committed with the change that causes them, per subscription, numbered, and only
for the platform whose appointment changed.  A real chamber file, transactions committed synchronously."""

import pytest

from gateway.domain.model import BookingRequest, HisAnswer
from gateway.domain.notifications import Notifications, appointment_change
from gateway.domain.ids import slot_id
from tests.deferreds import successResultOf
from tests.unit.test_booking import PATIENT, SID, START, env, notice, outbound  # noqa: F401


@pytest.fixture
def notified(env):
    """test_booking's chamber and services, with the domain's notifications hooked in, and a second open slot."""
    chamber, booking, book, _ = env
    chamber.on_unit(Notifications().after_unit)
    chamber.transact_now(lambda tx: book.apply(tx, [notice("open", start=START.replace(hour=9))]))
    return chamber, booking, book


def subscribe(chamber, sub_id, platform):
    chamber.transact_now(lambda tx: tx.add_subscription(id=sub_id, platform=platform, topic="appointment-status",
                                                        payload="id-only"))


def booked(chamber, booking, platform="demo", his="H1"):
    appointment_id = successResultOf(booking.book(platform, BookingRequest(SID, PATIENT)))[0]
    chamber.transact_now(lambda tx: booking.on_answer(tx, tx.message(outbound(chamber)[0].id),
                                                      HisAnswer("AA", "", his)))
    return appointment_id


def events(chamber, sub_id):
    return [(n.event, n.focus, n.what, n.state) for n in chamber.read().notifications_of(sub_id)]


def test_the_his_booking_and_the_hospitals_cancellation_are_notified_in_order(notified):
    chamber, booking, book = notified
    subscribe(chamber, "s1", "demo")
    appointment_id = booked(chamber, booking)
    chamber.transact_now(lambda tx: book.apply(tx, [notice("free", his_appointment="H1")]))
    assert events(chamber, "s1") == [(1, f"Appointment/{appointment_id}", "booked", "pending"),
                                     (2, f"Appointment/{appointment_id}", "cancelled", "pending")]
    assert chamber.read().subscription("s1").events == 2


def test_another_platforms_subscription_hears_nothing_of_it(notified):
    chamber, booking, book = notified
    subscribe(chamber, "mine", "demo")
    subscribe(chamber, "theirs", "other")
    booked(chamber, booking)
    chamber.transact_now(lambda tx: book.apply(tx, [notice("free", his_appointment="H1")]))
    assert len(events(chamber, "mine")) == 2 and events(chamber, "theirs") == []


def test_a_move_by_the_hospital_is_notified(notified):
    chamber, booking, book = notified
    subscribe(chamber, "s1", "demo")
    appointment_id = booked(chamber, booking, his="H5")
    later = START.replace(hour=9)
    chamber.transact_now(lambda tx: book.apply(tx, [notice("reschedule", start=later, his_appointment="H5")]))
    assert chamber.read().appointment(appointment_id).slot_id == slot_id("D001", later)
    assert [e[2] for e in events(chamber, "s1")] == ["booked", "moved"]


def test_a_no_show_is_notified_though_the_status_stays(notified):
    chamber, booking, book = notified
    subscribe(chamber, "s1", "demo")
    appointment_id = booked(chamber, booking, his="H5")
    chamber.transact_now(lambda tx: book.apply(tx, [notice("noshow", his_appointment="H5")]))
    assert chamber.read().appointment(appointment_id).status == "booked"
    assert [e[2] for e in events(chamber, "s1")] == ["booked", "noshow"]


def test_a_notification_is_rolled_back_with_its_change(notified):
    """A unit that fails after changing an appointment leaves neither the change nor its notification."""
    chamber, booking, _ = notified
    subscribe(chamber, "s1", "demo")
    appointment_id = booked(chamber, booking)

    def failing(tx):
        tx.update_appointment(appointment_id, status="cancelled")
        raise RuntimeError("decided otherwise")

    with pytest.raises(RuntimeError):
        chamber.transact_now(failing)
    assert chamber.read().appointment(appointment_id).status == "booked"
    assert [e[2] for e in events(chamber, "s1")] == ["booked"]


def test_an_ended_subscription_gets_no_more(notified):
    chamber, booking, book = notified
    subscribe(chamber, "s1", "demo")
    booked(chamber, booking)
    chamber.transact_now(lambda tx: tx.end_subscription("s1"))
    chamber.transact_now(lambda tx: book.apply(tx, [notice("free", his_appointment="H1")]))
    assert [e[2] for e in events(chamber, "s1")] == ["booked"]


def test_only_status_and_slot_changes_are_events():
    class Row:
        def __init__(self, status, slot_id):
            self.status, self.slot_id = status, slot_id

    assert appointment_change(("pending", "a"), Row("pending", "a")) is None
    assert appointment_change(("pending", "a"), Row("booked", "a")) == "booked"
    assert appointment_change(("booked", "a"), Row("booked", "b")) == "moved"
    assert appointment_change(("booked", "a"), Row("cancelled", "a")) == "cancelled"
