"""What the chamber keeps, and copies of it.  Retention (gateway/chamber/retention.py): what is past
chamber.keep_messages / keep_appointments is deleted, and nothing else — not dead letters, not a prescription's
order, not an appointment still waiting for the HIS, not the audit trail.  Backup (Chamber.backup): a whole,
checked copy.

Runs the real booking service on a real chamber file (transactions committed synchronously, task.Clock).
"""

import time
from datetime import timedelta

import pytest

from adapters.outer.oauth import EXPIRED_TOKENS_KEPT
from gateway.chamber.engine import Chamber
from gateway.chamber.retention import BATCH, Retention, RetentionService, prune
from gateway.domain.model import BookingRequest
from gateway.domain.ids import slot_id
from tests.deferreds import successResultOf
from tests.unit.test_booking import PATIENT, SID, START, TZ, answer, encoded, env, notice, outbound  # noqa: F401

DAY = 86400.0
LATER = START + timedelta(minutes=15)
LATER_SID = slot_id("D001", LATER)


def counts(chamber: Chamber) -> dict[str, int]:
    conn = chamber._writer
    return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("messages", "message_events", "appointments", "slots", "platform_requests",
                      "idempotency_keys", "audit_records", "appointment_versions")}


def delivered(chamber, booking, message, his_appointment=None):
    """What the relay does with an AA: the booking service's decision and the message's state, in one unit."""
    encoded(chamber, booking, message)
    answer(chamber, booking, message, "AA", his_appointment=his_appointment)
    chamber.transact_now(lambda tx: tx.set_message_state(message.id, "delivered", answer_code="AA"))


def run(chamber, retention, now):
    return successResultOf(prune(chamber, retention, now))


@pytest.fixture
def booked(env):
    """S1 booked (SRM^S01 delivered), S2 booked then cancelled (S04 delivered), a third slot never booked."""
    chamber, booking, book, clock = env
    chamber.transact_now(lambda tx: book.apply(tx, [notice("open", LATER), notice("open", START + timedelta(1))]))
    a1, _ = successResultOf(booking.book("demo", BookingRequest(SID, PATIENT), idempotency_key="k1", request_hash="h",
                                raw=b'{"resourceType":"Appointment"}'))
    a2, _ = successResultOf(booking.book("demo", BookingRequest(LATER_SID, PATIENT)))
    for m in outbound(chamber):
        delivered(chamber, booking, m, his_appointment=f"H-{m.id}")
    successResultOf(booking.cancel("demo", a2))
    delivered(chamber, booking, outbound(chamber)[-1])
    assert [m.state for m in outbound(chamber)] == ["delivered"] * 3
    return chamber, booking, clock, a1, a2


def test_nothing_is_deleted_before_its_time(booked):
    chamber, _, clock, *_ = booked
    before = counts(chamber)
    deleted = run(chamber, Retention(keep_messages=30 * DAY, keep_appointments=30 * DAY,
                                     keep_expired_tokens=EXPIRED_TOKENS_KEPT), clock.seconds())
    assert deleted == {"credentials": 0, "messages": 0, "notifications": 0, "appointments": 0, "slots": 0}
    assert counts(chamber) == before


def test_ended_messages_and_past_appointments_go_with_what_belongs_to_them(booked):
    """Over 30 days after the slots: the delivered SRMs and their stories, both settled appointments with their
    request and idempotency key, and all three slots go; the audit trail stays whole."""
    chamber, _, clock, a1, a2 = booked
    audit_before = counts(chamber)["audit_records"]
    assert counts(chamber)["appointment_versions"] >= 2  # each booked appointment's pending version
    now = START.replace(tzinfo=TZ).timestamp() + 32 * DAY  # (the third slot is a day after the others)
    deleted = run(chamber, Retention(keep_messages=30 * DAY, keep_appointments=30 * DAY,
                                     keep_expired_tokens=EXPIRED_TOKENS_KEPT), now)
    assert deleted == {"credentials": 0, "messages": 3, "notifications": 0, "appointments": 2, "slots": 3}
    after = counts(chamber)
    assert after["messages"] == after["message_events"] == after["appointments"] == after["slots"] == 0
    assert after["platform_requests"] == after["idempotency_keys"] == 0
    assert after["appointment_versions"] == 0  # their earlier versions went with them
    assert after["audit_records"] == audit_before


def test_null_keeps_everything(booked):
    chamber, *_ = booked
    before = counts(chamber)
    far = START.replace(tzinfo=TZ).timestamp() + 3650 * DAY
    assert run(chamber, Retention(keep_messages=None, keep_appointments=None,
                                  keep_expired_tokens=EXPIRED_TOKENS_KEPT), far) == {"credentials": 0}
    assert counts(chamber) == before


def test_dead_letters_waiting_messages_and_their_appointments_stay(env):
    """A dead letter waits for an operator; a booking the HIS has not answered is not settled: its message,
    appointment and slot all stay however old they are."""
    chamber, booking, book, clock = env
    chamber.transact_now(lambda tx: book.apply(tx, [notice("open", LATER)]))
    successResultOf(booking.book("demo", BookingRequest(SID, PATIENT)))
    dead = outbound(chamber)[0]
    chamber.transact_now(lambda tx: tx.set_message_state(dead.id, "dead", detail="max attempts"))
    successResultOf(booking.book("demo", BookingRequest(LATER_SID, PATIENT)))  # committed, never answered
    far = START.replace(tzinfo=TZ).timestamp() + 3650 * DAY
    deleted = run(chamber, Retention(keep_messages=DAY, keep_appointments=DAY,
                                     keep_expired_tokens=EXPIRED_TOKENS_KEPT), far)
    assert deleted["messages"] == 0 and deleted["appointments"] == 0
    states = sorted(m.state for m in outbound(chamber))
    assert "dead" in states and "committed" in states
    assert chamber.read().slot(LATER_SID) is not None


def test_a_prescriptions_order_stays_with_the_prescription(booked):
    chamber, *_ = booked
    order = outbound(chamber)[0]
    chamber.transact_now(lambda tx: tx.insert_prescription(id="p1", direction="to_his", platform="demo",
                                                           number="RX-1", status="active", payload=b"{}",
                                                           message_id=order.id))
    far = START.replace(tzinfo=TZ).timestamp() + 3650 * DAY
    assert run(chamber, Retention(keep_messages=DAY, keep_appointments=None,
                                  keep_expired_tokens=EXPIRED_TOKENS_KEPT), far)["messages"] == 2
    assert [m.id for m in outbound(chamber)] == [order.id]


def test_expired_tokens_and_assertions_go(env):
    """An assertion goes once it expired (a replay is refused for its exp by then); a token an hour after it
    expired — until then a request with it is told "expired", not "unknown"."""
    chamber, _, _, clock = env
    now = clock.seconds()

    def issue(tx):
        tx.add_access_token("a" * 64, "demo", "system/Slot.read", now - 3601)
        tx.add_access_token("c" * 64, "demo", "system/Slot.read", now - 1)
        tx.add_access_token("b" * 64, "demo", "system/Slot.read", now + 300)
        tx.remember_assertion("demo", "jti-old", now - 1)
        tx.remember_assertion("demo", "jti-new", now + 300)

    chamber.transact_now(issue)
    assert run(chamber, Retention(None, None, keep_expired_tokens=EXPIRED_TOKENS_KEPT), now) == {"credentials": 2}
    reader = chamber.read()
    assert reader.access_token("a" * 64) is None
    assert reader.access_token("c" * 64) is not None and reader.access_token("b" * 64) is not None
    assert chamber.transact_now(lambda tx: tx.remember_assertion("demo", "jti-new", now + 300)) is False


def test_large_backlogs_are_deleted_in_batches(env, monkeypatch):
    """More ended messages than one batch: several transactions, until one finds fewer than a batch."""
    import gateway.chamber.retention as retention_module

    chamber, _, _, clock = env
    monkeypatch.setattr(retention_module, "BATCH", 4)

    def many(tx):
        for i in range(10):
            mid = tx.add_message(direction="inbound", peer="his", control_id=f"C{i}", type="SIU^S12",
                                 state="delivered", body=b"MSH|", charset="utf-8")
            assert mid
    chamber.transact_now(many)
    transactions = []
    real = chamber.transact
    monkeypatch.setattr(chamber, "transact", lambda work: transactions.append(work) or real(work))
    deleted = run(chamber, Retention(keep_messages=1.0, keep_appointments=None,
                                     keep_expired_tokens=EXPIRED_TOKENS_KEPT), clock.seconds() + 10)
    assert deleted["messages"] == 10 and len(transactions) == 1 + 3 + 1  # credentials, 4 + 4 + 2, notifications
    assert BATCH == 500  # the module's own value is unchanged outside this test


def test_the_service_prunes_at_start_and_then_every_period(booked):
    chamber, _, clock, *_ = booked
    clock.advance(START.replace(tzinfo=TZ).timestamp() + 31 * DAY - clock.seconds())
    svc = RetentionService(chamber, Retention(keep_messages=30 * DAY, keep_appointments=None,
                                              keep_expired_tokens=EXPIRED_TOKENS_KEPT), clock, every=3600)
    svc.startService()
    try:
        assert svc.last == {"credentials": 0, "messages": 3, "notifications": 0}
        chamber.transact_now(lambda tx: tx.add_message(direction="inbound", peer="his", control_id="LATE",
                                                       type="SIU^S12", state="delivered", body=b"MSH|",
                                                       charset="utf-8"))
        clock.advance(30 * DAY - 60)
        assert svc.last == {"credentials": 0, "messages": 0, "notifications": 0}  # the hourly run found it not old enough yet...
        clock.advance(3600)
        assert svc.last == {"credentials": 0, "messages": 1, "notifications": 0}  # ...until it was 30 days old
    finally:
        svc.stopService()


def test_a_backup_is_a_whole_checked_copy_readable_by_its_owner_only(booked, tmp_path):
    """Chamber.backup: the copy opens as a chamber with the same rows; it is mode 0600 (patient data); an
    existing file is replaced only by a complete copy, and no partial file is left behind."""
    import os
    import stat

    chamber, *_ = booked
    dest = tmp_path / "backups" / "chamber-copy.sqlite3"
    dest.parent.mkdir()
    dest.write_bytes(b"yesterday's copy")
    if chamber.backend.kind == "postgresql":  # PostgreSQL's own tools back it up: refused, the old copy untouched
        from gateway.chamber.errors import ChamberError

        with pytest.raises(ChamberError, match="pg_dump"):
            chamber.backup(dest)
        assert dest.read_bytes() == b"yesterday's copy"
        return
    counts = chamber.backup(dest)
    assert counts == chamber.read().counts() and counts["messages"] == 3 and counts["appointments"] == 2
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o600
    assert [p.name for p in dest.parent.iterdir()] == ["chamber-copy.sqlite3"]
    copy = Chamber(dest, clock=time.time)
    copy.open()  # integrity check and schema version, as at a restore
    try:
        assert copy.read().counts() == counts
        assert {m.control_id for m in copy.read().messages(direction="outbound")} == \
               {m.control_id for m in chamber.read().messages(direction="outbound")}
    finally:
        copy.close()


def test_delivered_notifications_go_pending_and_dead_ones_stay(env):
    """A platform's notifications (issue 23): delivered ones go keep_messages after delivery; one still pending
    (the platform's endpoint is down) or dead (an operator's to see) stays."""
    chamber, _, _, clock = env

    def work(tx):
        tx.add_subscription(id="s1", platform="demo", topic="appointment-status", payload="id-only")
        for _ in range(3):
            tx.add_notification("s1", platform="demo", focus="Appointment/a1", what="cancelled")
        tx.set_notification_state("s1", 1, "delivered", attempts=1, next_attempt=tx.now)
        tx.set_notification_state("s1", 2, "dead", attempts=9, next_attempt=tx.now, last_error="answered 500")

    chamber.transact_now(work)
    keep = Retention(keep_messages=30 * DAY, keep_appointments=None, keep_expired_tokens=EXPIRED_TOKENS_KEPT)
    assert run(chamber, keep, clock.seconds() + 29 * DAY)["notifications"] == 0
    assert run(chamber, keep, clock.seconds() + 31 * DAY)["notifications"] == 1
    assert [(n.event, n.state) for n in chamber.read().notifications_of("s1")] == [(2, "dead"), (3, "pending")]
