"""Slot quotas: what a platform may book and see, decided from the chamber inside the booking transaction.

Real chamber (SQLite file), task.Clock for time.  The rules are in gateway/domain/quota.py and docs/security.md.
"""

import functools
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from twisted.internet import task

from adapters.maps.srm_booking import Hl7Header, build_srm
from gateway.domain.booking import BookingService, HisLinkInfo
from gateway.domain.slot_book import SlotBook
from gateway.chamber.engine import Chamber
from gateway.domain.quota import QuotaExhausted, QuotaRule, Quotas
from gateway.domain.model import (BookingRequest, HisAnswer, Patient, PatientIdentifier, ScheduleInfo, SlotNotice,
                                  SlotUnavailable, slot_status)
from gateway.domain.ids import slot_id
from tests.deferreds import failureResultOf, successResultOf

TZ = ZoneInfo("Asia/Shanghai")
DAY = datetime(2030, 1, 7, 8, 0)
NOW = datetime(2030, 1, 1, tzinfo=TZ).timestamp()
PATIENT = Patient((PatientIdentifier("urn:demo:mrn", "MRN-1", "MR"),), "王", "芳", "13800000000")
D001 = ScheduleInfo("D001", "张伟 心内科", "D001", "张伟", "CARD", "心内科")
D002 = ScheduleInfo("D002", "李娜 心内科", "D002", "李娜", "CARD", "心内科")
DAY_HOURS = 24 * 3600


def slots_of(schedule, day, n, minutes=5):
    return [SlotNotice("open", schedule, day + timedelta(minutes=minutes * i), minutes, "card", "心内科门诊")
            for i in range(n)]


def rule(schedule="*", share=None, per_day=None, release_before=DAY_HOURS):
    return QuotaRule(schedule, None if share is None else round(share * 1_000_000), per_day, release_before)


class Env:
    def __init__(self, backend, rules, *, batched=False):
        """``backend()``: the chamber's backend (tests/conftest.py: chamber_backend), again at each open."""
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.backend = backend
        self.rules = rules
        self.batched = batched
        self.open()

    def open(self):
        self.chamber = Chamber(backend=self.backend(), clock=self.clock.seconds,
                               reactor=self.clock if self.batched else None)
        self.chamber.open()
        header = Hl7Header("GATEWAYD", "FRONT", "HIS", "HOSPITAL", "2.5", "utf-8")
        self.quotas = Quotas(self.rules, TZ)
        self.booking = BookingService(
            self.chamber, HisLinkInfo("his", "utf-8", "S04", functools.partial(build_srm, header=header)),
            tz=TZ, hold_seconds=3600, clock=self.clock, quotas=self.quotas)

    def close(self):
        self.booking.stop()
        self.chamber.close()

    def publish(self, notices):
        self.chamber.transact_now(lambda tx: SlotBook(TZ).apply(tx, notices))

    def try_book(self, platform, sid):
        """The booking service's Deferred for ``sid`` (after the reactor turn's commit when batched)."""
        d = self.booking.book(platform, BookingRequest(sid, PATIENT))
        if self.batched:
            self.clock.advance(0)
        return d

    def book(self, platform, sid):
        """The id of the appointment held for ``sid``."""
        return successResultOf(self.try_book(platform, sid))[0]


@pytest.fixture
def make(chamber_backend):
    """Envs on chambers of one backend (each test runs on both)."""
    envs = []

    def factory(rules, **kw):
        name = f"c{len(envs)}"
        env = Env(lambda: chamber_backend(name), rules, **kw)
        envs.append(env)
        return env

    yield factory
    for env in envs:
        env.close()


def test_five_percent_of_a_hundred_slots_is_five_and_the_sixth_is_refused(make):
    """share 5% of a 100-slot schedule day: five bookings are held, the sixth is refused by the quota."""
    env = make({"demo": [rule(share=0.05)]})
    env.publish(slots_of(D001, DAY, 100))
    ids = [slot_id("D001", DAY + timedelta(minutes=5 * i)) for i in range(6)]
    for sid in ids[:5]:
        env.book("demo", sid)
    assert "holds 5 of the 5 slot" in str(failureResultOf(env.try_book("demo", ids[5]), QuotaExhausted).value)
    assert slot_status(env.chamber.read().slot(ids[5])) == "free"  # nothing held for the refusal


def test_twenty_bookings_in_one_transaction_are_counted_exactly(make):
    """20 bookings arriving in one reactor turn share one transaction; each unit sees the ones before it,
    so exactly five are held and fifteen refused."""
    env = make({"demo": [rule(share=0.05)]}, batched=True)
    env.publish(slots_of(D001, DAY, 100))
    ds = [env.booking.book("demo", BookingRequest(slot_id("D001", DAY + timedelta(minutes=5 * i)), PATIENT))
          for i in range(20)]
    env.clock.advance(0)
    for d in ds[:5]:  # held: the units run in the order they came
        assert isinstance(successResultOf(d), tuple)
    for d in ds[5:]:
        failureResultOf(d, QuotaExhausted)


def test_cancelled_and_refused_bookings_give_their_quota_back(make):
    """Only pending and booked appointments count: a cancellation or the HIS's refusal frees the quota."""
    env = make({"demo": [rule(per_day=1)]})
    env.publish(slots_of(D001, DAY, 10))
    first, second = slot_id("D001", DAY), slot_id("D001", DAY + timedelta(minutes=5))
    appointment = env.book("demo", first)
    failureResultOf(env.try_book("demo", second), QuotaExhausted)
    env.booking.cancel("demo", appointment)  # still pending: cancelled at once
    again = env.book("demo", second)
    srm = [m for m in env.chamber.read().messages(direction="outbound") if m.state == "committed"][0]
    env.chamber.transact_now(lambda tx: env.booking.on_answer(tx, tx.message(srm.id), HisAnswer("AR", "no")))
    assert env.chamber.read().appointment(again).status == "refused"
    env.book("demo", first)


def test_quota_is_per_platform_schedule_and_day(make):
    """Another platform, another schedule, another day: each has its own count; '*' covers schedules
    without an entry of their own, and a schedule entry wins over '*'."""
    env = make({"demo": [rule(per_day=1), rule("D002", per_day=2)], "other": [rule(per_day=1)]})
    next_day = DAY + timedelta(days=1)
    env.publish(slots_of(D001, DAY, 4) + slots_of(D001, next_day, 4) + slots_of(D002, DAY, 4))
    env.book("demo", slot_id("D001", DAY))
    env.book("other", slot_id("D001", DAY + timedelta(minutes=5)))
    env.book("demo", slot_id("D001", next_day))
    env.book("demo", slot_id("D002", DAY))
    env.book("demo", slot_id("D002", DAY + timedelta(minutes=5)))
    failureResultOf(env.try_book("demo", slot_id("D002", DAY + timedelta(minutes=10))), QuotaExhausted)
    failureResultOf(env.try_book("demo", slot_id("D001", DAY + timedelta(minutes=10))), QuotaExhausted)


def test_a_platform_without_a_quota_for_the_schedule_is_not_limited(make):
    """A quota for D002 only: D001 is not limited (and a platform with no quotas at all is not limited)."""
    env = make({"demo": [rule("D002", per_day=0)]})
    env.publish(slots_of(D001, DAY, 5) + slots_of(D002, DAY, 1))
    for i in range(5):
        env.book("demo", slot_id("D001", DAY + timedelta(minutes=5 * i)))
    failureResultOf(env.try_book("demo", slot_id("D002", DAY)), QuotaExhausted)
    env.book("nobody-limits-me", slot_id("D002", DAY))


def test_released_slots_are_open_to_every_platform_beyond_its_quota(make):
    """Within release_before of its start a slot is bookable whatever the quota (per_day 0 included)."""
    env = make({"demo": [rule(per_day=0, release_before=2 * 3600)]})
    soon = datetime.fromtimestamp(NOW, TZ).replace(tzinfo=None) + timedelta(hours=1)
    env.publish(slots_of(D001, DAY, 2) + slots_of(D001, soon, 2))
    failureResultOf(env.try_book("demo", slot_id("D001", DAY)), QuotaExhausted)
    env.book("demo", slot_id("D001", soon))
    env.book("demo", slot_id("D001", soon + timedelta(minutes=5)))


def test_never_released_when_release_before_is_empty(make):
    env = make({"demo": [rule(per_day=0, release_before=None)]})
    soon = datetime.fromtimestamp(NOW, TZ).replace(tzinfo=None) + timedelta(minutes=30)
    env.publish(slots_of(D001, soon, 1))
    failureResultOf(env.try_book("demo", slot_id("D001", soon)), QuotaExhausted)


def test_a_taken_slot_is_a_conflict_before_it_is_a_quota_question(make):
    """A slot held by someone else is refused as unavailable (409 conflict), not as over quota."""
    env = make({"demo": [rule(per_day=0)], "other": []})
    env.publish(slots_of(D001, DAY, 1))
    env.book("other", slot_id("D001", DAY))
    failureResultOf(env.try_book("demo", slot_id("D001", DAY)), SlotUnavailable)


def test_the_count_survives_a_restart(make):
    """The count is read from the chamber: after the chamber is closed and opened again (a restart) the
    platform still holds its five and the sixth is still refused."""
    env = make({"demo": [rule(share=0.05)]})
    env.publish(slots_of(D001, DAY, 100))
    for i in range(5):
        env.book("demo", slot_id("D001", DAY + timedelta(minutes=5 * i)))
    env.close()
    env.open()
    failureResultOf(env.try_book("demo", slot_id("D001", DAY + timedelta(minutes=50))), QuotaExhausted)


@pytest.mark.parametrize("share, slots, allowance", [(0.05, 100, 5), (0.29, 100, 29), (0.05, 99, 4),
                                                     (0.333333, 3, 0), (1.0, 7, 7), (0.0, 100, 0)])
def test_a_share_is_floor_of_share_times_slots_exactly(share, slots, allowance):
    """floor(share x slots), computed in millionths so 29% of 100 is 29 (not 28.999...)."""
    assert rule(share=share).allowance(slots) == allowance


def test_search_hides_the_free_slots_a_platform_may_no_longer_book(make):
    """Once the quota for a schedule/day is used up, that day's free slots outside the release window
    leave the platform's searches (paging stays exact: the filter is in SQL); other platforms, busy slots
    and released slots are unaffected."""
    env = make({"demo": [rule(per_day=2, release_before=3600)], "other": []})
    soon = datetime.fromtimestamp(NOW, TZ).replace(tzinfo=None) + timedelta(minutes=30)
    env.publish(slots_of(D001, DAY, 10) + slots_of(D002, DAY, 3) + slots_of(D001, soon, 2))
    reader = env.chamber.read()
    assert env.quotas.hidden(reader, "demo", reader.now) == []
    mine = [env.book("demo", slot_id("D001", DAY + timedelta(minutes=5 * i))) for i in range(2)]
    reader = env.chamber.read()
    hidden = env.quotas.hidden(reader, "demo", reader.now)
    assert hidden == [("D001", "20300107", NOW + 3600)]
    free = [s.id for s in reader.search_slots(his_statuses=["free"], hidden=hidden, limit=100)]
    assert free == ([slot_id("D001", soon + timedelta(minutes=5 * i)) for i in range(2)]
                    + [slot_id("D002", DAY + timedelta(minutes=5 * i)) for i in range(3)])
    everything = reader.search_slots(hidden=hidden, limit=100)
    assert {s.held_by for s in everything if s.held_by} == set(mine)  # its own held slots are still shown
    page = reader.search_slots(his_statuses=["free"], hidden=hidden, limit=2, offset=2)
    assert [s.id for s in page] == free[2:4]
    assert len(reader.search_slots(his_statuses=["free"], limit=100)) == 8 + 3 + 2  # what 'other' sees
    assert env.quotas.hidden(reader, "other", reader.now) == []
    slot = reader.slot(slot_id("D001", DAY + timedelta(minutes=45)))
    assert not env.quotas.may_book(reader, "demo", slot, reader.now)
    assert env.quotas.may_book(reader, "other", slot, reader.now)
