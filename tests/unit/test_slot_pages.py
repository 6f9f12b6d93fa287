"""GET /Slot pages kept in memory (issue 21, adapters/outer/pages.py): never a slot state older than the last
commit, nor than the clock says (a free slot that has started, a quota's release)."""

from datetime import datetime, timedelta

from adapters.outer.pages import Rendered, SlotPages
from gateway.domain.ids import slot_id
from gateway.domain.model import SlotNotice
from gateway.domain.slot_book import SlotBook
from tests.unit.outer_gate import NOW, SCHEDULE, SID, TZ, appointment

FREE = "/Slot?status=free&_count=100"


def free_ids(gate, platform="demo", path=FREE):
    answer = gate.request("GET", path, platform=platform)
    assert answer.status == 200, answer.json
    return [e["resource"]["id"] for e in answer.json.get("entry", [])]


def kept_for_ever(gate) -> SlotPages:
    """The gate's pages, kept as long as nothing changes them (no max_age: only the rules are tested)."""
    pages = SlotPages.attached(gate.chamber, gate.clock.seconds, max_age=1e12)
    gate.api.scheduling.slot_pages = pages
    return pages


def his(gate, action, start, minutes=15):
    gate.chamber.transact_now(lambda tx: SlotBook(TZ).apply(tx, [
        SlotNotice(action, SCHEDULE, start, minutes, "card", "x", his_appointment="H1")]))


def test_a_page_is_given_again_until_the_his_changes_a_slot(gate):
    pages = kept_for_ever(gate)
    first = free_ids(gate)
    assert first == SID
    assert free_ids(gate) == first and pages.hits == 1  # the same page, from memory
    his(gate, "book", datetime(2030, 1, 7, 8, 0))  # the counter booked the first slot at the HIS
    assert free_ids(gate) == SID[1:]
    his(gate, "free", datetime(2030, 1, 7, 8, 0))
    assert free_ids(gate) == SID


def test_a_booking_shows_in_the_next_page_of_every_platform(gate):
    kept_for_ever(gate)
    assert free_ids(gate, "demo") == free_ids(gate, "other") == SID
    assert gate.request("POST", "/Appointment", appointment(SID[3])).status in (201, 202)
    assert free_ids(gate, "other") == [s for s in SID if s != SID[3]]
    assert free_ids(gate, "demo") == [s for s in SID if s != SID[3]]
    assert SID[3] in free_ids(gate, "other", "/Slot?_count=100")  # (held: busy-tentative, not free)


def test_no_page_is_kept_or_given_while_a_unit_of_work_waits_for_its_commit():
    now = [100.0]
    pages = SlotPages(lambda: now[0])
    page = pages.put("k", {"resourceType": "Bundle"}, valid_until=200.0, now=100.0)
    assert isinstance(page, Rendered) and pages.get("k", 100.0) is page
    pages.unit()  # a unit of work ran: its COMMIT (maybe in the writer thread) is on its way
    assert pages.get("k", 100.0) is None
    pages.put("k", {"resourceType": "Bundle", "total": 1}, valid_until=200.0, now=100.0)
    assert pages.get("k", 100.0) is None  # read while the commit was on its way: not kept
    pages.committed()
    assert pages.get("k", 100.0) is None
    fresh = pages.put("k", {"resourceType": "Bundle", "total": 2}, valid_until=200.0, now=100.0)
    assert pages.get("k", 150.0) is fresh and pages.get("k", 200.0) is None  # until valid_until
    now[0] = 101.0
    assert pages.get("k", 150.0) is None  # nor past max_age (1 s)


def test_a_free_slot_leaves_the_page_when_it_starts(gate):
    pages = kept_for_ever(gate)
    start = datetime.fromtimestamp(NOW, TZ).replace(tzinfo=None) + timedelta(minutes=62)
    his(gate, "open", start)
    soon = slot_id(SCHEDULE.id, start)
    assert free_ids(gate, "other") == [soon, *SID]
    gate.clock.advance(62 * 60 - 1)
    assert free_ids(gate, "other") == [soon, *SID] and pages.hits == 1
    gate.clock.advance(1)  # it has started: no longer bookable, no longer listed as free
    assert free_ids(gate, "other") == SID


def test_a_slot_the_quota_hid_shows_when_it_is_released(gate):
    """demo may hold 2 slots of a schedule a day, and any slot once it starts within the hour."""
    pages = kept_for_ever(gate)
    today = datetime.fromtimestamp(NOW, TZ).replace(tzinfo=None)
    starts = [today + timedelta(minutes=62 + 15 * i) for i in range(4)]  # released 2, 17, 32, 47 minutes from now
    for start in starts:
        his(gate, "open", start)
    ids = [slot_id(SCHEDULE.id, s) for s in starts]
    for sid in ids[2:]:
        assert gate.request("POST", "/Appointment", appointment(sid)).status in (201, 202)  # (advances 5 s)
    assert free_ids(gate) == SID  # today's quota used: today's other free slots are hidden from demo
    gate.clock.advance(NOW + 120 - 1 - gate.clock.seconds())
    assert free_ids(gate) == SID and pages.hits >= 1
    gate.clock.advance(1)  # ids[0] starts within the hour: released to every platform
    assert free_ids(gate) == [ids[0], *SID]


def test_pages_differ_by_platform_and_by_the_whole_query(gate):
    pages = kept_for_ever(gate)
    assert free_ids(gate, path="/Slot?status=free&_count=2") == SID[:2]
    assert free_ids(gate, path="/Slot?_count=2&status=free") == SID[:2]  # (its own key: the links repeat the order)
    assert free_ids(gate, path="/Slot?status=free&_count=2&_offset=2") == SID[2:4]
    assert pages.hits == 0
    assert free_ids(gate, path="/Slot?_count=2&status=free") == SID[:2] and pages.hits == 1
    assert free_ids(gate, "other", "/Slot?status=free&_count=2") == SID[:2] and pages.hits == 1


def test_the_split_locks_outer_gate_keeps_no_pages(config_dir):
    """The other process's commits reach this one only through the watch (~10 ms): the outer gate of the split
    lock reads every page from the chamber."""
    from twisted.internet.testing import MemoryReactorClock

    from gateway.service import make_service
    from tests.unit.config_files import HEAD, load

    platforms = "platforms:\n  - name: demo\n    certificate_subject: CN=platform-demo\n"
    config = load(config_dir, platforms, HEAD + f"chamber: {{path: {config_dir / 'pages.sqlite3'}}}\n")
    assert make_service(config, MemoryReactorClock(), gate="outer").api.scheduling.slot_pages is None
    assert make_service(config, MemoryReactorClock()).api.scheduling.slot_pages is not None


def test_a_new_query_per_request_cannot_grow_the_pages_beyond_their_bound():
    pages = SlotPages(lambda: 0.0, max_pages=3)
    for offset in range(10):
        pages.put(("demo", offset), {"total": offset}, valid_until=1.0, now=0.0)
        assert 1 <= len(pages) <= 3
    assert pages.get(("demo", 9), 0.0) == {"total": 9}
