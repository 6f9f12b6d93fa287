"""Notifications (issue 23): committed with the change that causes them, per subscription, numbered, and only
for the platform whose appointment changed.  A real chamber file, transactions committed synchronously."""

import pytest

from gateway.domain.model import BookingRequest, HisAnswer
from gateway.domain.notifications import Notifications, appointment_change
from gateway.domain.ids import slot_id
from tests.deferreds import successResultOf
from tests.unit.test_booking import PATIENT, SID, START, TZ, env, notice, outbound  # noqa: F401


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


# -- the free-slot topic ------------------------------------------------------------------------------------------
def slot_subscribe(chamber, sub_id, platform):
    chamber.transact_now(lambda tx: tx.add_subscription(id=sub_id, platform=platform, topic="free-slot",
                                                        payload="id-only"))


def test_free_slot_changes_are_notified_released_blocked_taken_at_the_counter_and_freed(notified):
    chamber, booking, book = notified
    slot_subscribe(chamber, "f1", "demo")
    nine = START.replace(hour=9)
    ten = START.replace(hour=10)
    chamber.transact_now(lambda tx: book.apply(tx, [notice("open", start=ten)]))  # released by the HIS
    chamber.transact_now(lambda tx: book.apply(tx, [notice("block", start=nine)]))  # blocked
    chamber.transact_now(lambda tx: book.apply(tx, [notice("book", start=ten, his_appointment="C1")]))  # counter
    chamber.transact_now(lambda tx: book.apply(tx, [notice("free", start=ten, his_appointment="C1")]))  # cancelled
    assert [(e[1], e[2]) for e in events(chamber, "f1")] == [
        (f"Slot/{slot_id('D001', ten)}", "free"), (f"Slot/{slot_id('D001', nine)}", "blocked"),
        (f"Slot/{slot_id('D001', ten)}", "taken"), (f"Slot/{slot_id('D001', ten)}", "free")]


def test_a_slot_published_again_unchanged_is_not_notified(notified):
    chamber, booking, book = notified
    slot_subscribe(chamber, "f1", "demo")
    chamber.transact_now(lambda tx: book.apply(tx, [notice("open"), notice("open", start=START.replace(hour=9))]))
    assert events(chamber, "f1") == []


def test_a_booking_by_another_platform_is_taken_for_every_subscriber(notified):
    chamber, booking, book = notified
    slot_subscribe(chamber, "mine", "demo")
    slot_subscribe(chamber, "theirs", "other")
    booked(chamber, booking, platform="other")
    assert [e[1:3] for e in events(chamber, "mine")] == [(f"Slot/{SID}", "taken")]
    assert [e[1:3] for e in events(chamber, "theirs")] == [(f"Slot/{SID}", "taken")]


def test_a_slot_outside_the_platforms_quota_is_not_notified(env):
    """As GET /Slot hides a free slot the platform's quota does not let it book, the topic does not offer it."""
    from gateway.domain.quota import QuotaRule, Quotas
    chamber, booking, book, _ = env
    quotas = Quotas({"demo": [QuotaRule("*", None, 0, None)], "other": [QuotaRule("*", None, 5, None)]}, TZ)
    chamber.on_unit(Notifications(lambda: quotas).after_unit)
    slot_subscribe(chamber, "limited", "demo")
    slot_subscribe(chamber, "free", "other")
    nine = START.replace(hour=9)
    chamber.transact_now(lambda tx: book.apply(tx, [notice("open", start=nine)]))
    chamber.transact_now(lambda tx: book.apply(tx, [notice("block", start=nine)]))
    assert events(chamber, "limited") == []
    assert [e[2] for e in events(chamber, "free")] == ["free", "blocked"]


def test_without_a_slot_subscription_a_slots_change_reads_nothing_before(notified):
    """The SIU path stays one statement per notice while nobody subscribes to a slot topic: the slot's row is
    not read before its change (and with a subscriber, it is)."""
    chamber, booking, book = notified
    subscribe(chamber, "s1", "demo")  # a subscription to another topic
    statements = []

    def counted(tx):
        tx._c.set_trace_callback(statements.append)
        try:
            book.apply(tx, [notice("block")])
        finally:
            tx._c.set_trace_callback(None)

    chamber.transact_now(counted)
    assert not any(s.startswith("SELECT * FROM slots") for s in statements), statements
    slot_subscribe(chamber, "f1", "demo")
    statements.clear()
    chamber.transact_now(counted)
    assert any(s.startswith("SELECT * FROM slots") for s in statements), statements


def test_a_slot_released_by_the_passage_of_time_is_offered_when_its_release_comes(env):
    """demo may hold 1 slot a day, and any slot is open to all 1 h before it starts: once demo holds its slot,
    the day's other free slot is hidden from it — until 1 h before it starts, when the release is notified
    (nothing is committed then: the outer gate's ReleaseNotices looks every 10 s).  A platform that never had it
    hidden is not told again."""
    from gateway.domain.quota import QuotaRule, Quotas
    from gateway.ops.services import ReleaseNotices

    chamber, booking, book, clock = env
    quotas = Quotas({"demo": [QuotaRule("*", None, 1, 3600)], "other": [QuotaRule("*", None, 5, 3600)]}, TZ)
    booking.quotas = quotas
    chamber.on_unit(Notifications(lambda: quotas).after_unit)
    nine = START.replace(hour=9)
    chamber.transact_now(lambda tx: book.apply(tx, [notice("open", start=nine)]))
    slot_subscribe(chamber, "f1", "demo")
    slot_subscribe(chamber, "f2", "other")
    booked(chamber, booking)  # demo's one slot of the day: 08:00
    before = [e[1:3] for e in events(chamber, "f1")]
    assert (f"Slot/{slot_id('D001', nine)}", "free") not in before
    watch = ReleaseNotices(chamber, lambda: quotas, clock)
    watch.startService()
    try:
        release = nine.replace(tzinfo=TZ).timestamp() - 3600
        clock.advance(release - clock.seconds() - 5)
        assert [e[1:3] for e in events(chamber, "f1")] == before  # not yet
        clock.advance(10)
        assert [e[1:3] for e in events(chamber, "f1")] == before + [(f"Slot/{slot_id('D001', nine)}", "free")]
        clock.advance(30)
        assert len(events(chamber, "f1")) == len(before) + 1  # once
        assert (f"Slot/{slot_id('D001', nine)}", "free") not in [e[1:3] for e in events(chamber, "f2")]
    finally:
        watch.stopService()


def test_an_appointment_the_hospital_moved_is_cancelled_by_its_new_slots_cancellation(notified):
    """SIU^S13 moves a booking to another slot: that slot is the booking's now (booked_by), so the HIS's later
    S15 of it cancels the appointment (notified), and its no-show is noted — not a free slot under a booked
    appointment."""
    chamber, booking, book = notified
    subscribe(chamber, "s1", "demo")
    appointment_id = booked(chamber, booking, his="H5")
    later = START.replace(hour=9)
    chamber.transact_now(lambda tx: book.apply(tx, [notice("reschedule", start=later, his_appointment="H5")]))
    assert chamber.read().slot(slot_id("D001", later)).booked_by == appointment_id
    assert chamber.read().slot(SID).booked_by is None
    chamber.transact_now(lambda tx: book.apply(tx, [notice("noshow", start=later, his_appointment="H5")]))
    chamber.transact_now(lambda tx: book.apply(tx, [notice("free", start=later, his_appointment="H5")]))
    assert chamber.read().appointment(appointment_id).status == "cancelled"
    assert [e[2] for e in events(chamber, "s1")] == ["booked", "moved", "noshow", "cancelled"]
