"""Operator tools on the chamber (resubmit, reprocess, purge) and the refusal to start on a damaged file."""

import functools
import time
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from twisted.internet import task

from adapters.inner.receiver import make_reprocessor
from adapters.maps.srm_booking import Hl7Header, build_srm
from gateway.domain.booking import BookingService, HisLinkInfo
from gateway.domain.slot_book import SlotBook
from gateway.chamber.engine import Chamber
from gateway.chamber.errors import ChamberError
from gateway.ops.queue import NotRetryable, purge_dead, retry, retry_all_dead
from gateway.domain.model import BookingRequest, Patient, PatientIdentifier, ScheduleInfo, SlotNotice, slot_status
from gateway.domain.ids import slot_id
from tests.deferreds import successResultOf

TZ = ZoneInfo("Asia/Shanghai")
START = datetime(2030, 1, 7, 8, 0)
SIU = ("MSH|^~\\&|HIS|H|GATEWAYD|FRONT|20300101120000||SIU^S24^SIU_S12|IN-1|P|2.5\r"
       "SCH|||||D001^Dr||||15|MIN|^^15^203001070900^203001070915|||||||||||||Open\r"
       "RGS|1\rAIS|1||c^t|203001070900|||15|MIN\r").encode()


@pytest.fixture
def env(tmp_path):
    clock = task.Clock()
    clock.advance(datetime(2030, 1, 1, tzinfo=TZ).timestamp())
    chamber = Chamber(tmp_path / "c.sqlite3", clock=clock.seconds)
    chamber.open()
    book = SlotBook(TZ)
    header = Hl7Header("GATEWAYD", "FRONT", "HIS", "HOSPITAL")
    booking = BookingService(chamber, HisLinkInfo("his", "utf-8", "S04", functools.partial(build_srm, header=header)),
                             tz=TZ, hold_seconds=60, clock=clock)
    chamber.transact_now(lambda tx: book.apply(tx, [SlotNotice("open", ScheduleInfo("D001", "Dr"), START, 15, "c", "t")]))
    yield chamber, booking, make_reprocessor(book, "utf-8"), clock
    booking.stop()
    chamber.close()


def add_outbound(chamber, state, type_="SRM^S04", subject=None, control_id="G1"):
    return chamber.transact_now(lambda tx: tx.add_message(
        direction="outbound", peer="his", control_id=control_id, type=type_, state=state, body=b"MSH|x",
        charset="utf-8", subject=subject))


def test_retry_resubmits_a_dead_message_with_its_control_id(env):
    chamber, _, reprocess, _ = env
    mid = add_outbound(chamber, "dead")
    assert "resubmitted" in retry(chamber, mid, reprocess, who="operator alice")
    msg = chamber.read().message(mid)
    assert (msg.state, msg.attempts, msg.control_id, msg.body) == ("committed", 0, "G1", b"MSH|x")
    assert chamber.read().message_events(mid)[-1][1:] == ("committed", "resubmitted by operator alice")


def test_retry_refuses_delivered_messages_and_settled_bookings(env):
    chamber, booking, reprocess, _ = env
    with pytest.raises(NotRetryable, match="only dead or refused"):
        retry(chamber, add_outbound(chamber, "delivered"), reprocess)
    request = BookingRequest(slot_id("D001", START), Patient((PatientIdentifier("s", "v"),)))
    appointment_id = successResultOf(booking.book("demo", request))[0]
    srm = chamber.read().messages(direction="outbound", state="committed")[0]
    chamber.transact_now(lambda tx: tx.set_message_state(srm.id, "dead", last_error="no ACK"))
    chamber.transact_now(lambda tx: booking.on_dead(tx, tx.message(srm.id), "no ACK"))
    assert chamber.read().appointment(appointment_id).status == "refused"
    with pytest.raises(NotRetryable, match="already refused"):
        retry(chamber, srm.id, reprocess)
    with pytest.raises(NotRetryable, match="no message"):
        retry(chamber, 999, reprocess)


def test_reprocess_reads_a_refused_inbound_message_again(env):
    """An SIU refused earlier (say the mapping had a bug) is reprocessed from its raw bytes: it is applied
    and the same message becomes delivered."""
    chamber, _, reprocess, _ = env
    mid = chamber.transact_now(lambda tx: tx.add_message(
        direction="inbound", peer="his", control_id="IN-1", type="SIU^S24", state="refused", body=SIU,
        charset="utf-8", answer_code="AE", answer_text="old bug"))
    assert "delivered (AA" in retry(chamber, mid, reprocess)
    assert slot_status(chamber.read().slot(slot_id("D001", START.replace(hour=9)))) == "free"
    assert chamber.read().message(mid).state == "delivered"


def test_a_refused_prescription_message_is_not_reprocessed_as_a_slot_notification(env):
    """queue retry of a refused RDS^O13 is refused, saying only SIU are reprocessed, and changes nothing —
    instead of reading a dispense as a slot notice."""
    chamber, _, reprocess, _ = env
    mid = chamber.transact_now(lambda tx: tx.add_message(
        direction="inbound", peer="pharmacy", control_id="RDS-1", type="RDS^O13", state="refused",
        body=b"MSH|^~\\&|PH|H|GW|F|20300101||RDS^O13|RDS-1|P|2.5\r", charset="utf-8", answer_code="AE"))
    with pytest.raises(NotRetryable, match=r"RDS\^O13: only refused SIU"):
        retry(chamber, mid, reprocess)
    message = chamber.read().message(mid)
    assert (message.state, message.answer_code) == ("refused", "AE")


def test_a_dead_prescription_order_is_not_resent_once_its_prescription_was_refused(env):
    """The order never reached the pharmacy: the prescription was refused and its items cancelled (the
    platform reads that). Resending it then could have the pharmacy dispense a cancelled prescription."""
    chamber, _, reprocess, _ = env

    def dead_order(tx, status):
        tx.insert_prescription(id=f"p-{status}", direction="to_his", platform="ih1", number=f"RX-{status}",
                               status=status, payload=b"{}")
        return tx.add_message(direction="outbound", peer="pharmacy", control_id=f"G-{status}", type="RDE^O11",
                              state="dead", body=b"MSH|", charset="utf-8", subject=f"prescription:p-{status}")

    refused = chamber.transact_now(lambda tx: dead_order(tx, "refused"))
    with pytest.raises(NotRetryable, match="prescription that is already refused"):
        retry(chamber, refused, reprocess)
    assert chamber.read().message(refused).state == "dead"
    pending = chamber.transact_now(lambda tx: dead_order(tx, "pending"))  # (dead-lettered just now)
    assert "resubmitted" in retry(chamber, pending, reprocess)


def test_retry_all_dead_and_purge(env):
    chamber, _, reprocess, clock = env
    old = add_outbound(chamber, "dead", control_id="G-old")
    clock.advance(40 * 86400)
    new = add_outbound(chamber, "dead", control_id="G-new")
    assert purge_dead(chamber, 30 * 86400) == 1
    assert chamber.read().message(old) is None and chamber.read().message(new) is not None
    assert chamber.read().message_events(old) == []
    lines = retry_all_dead(chamber, reprocess)
    assert len(lines) == 1 and "G-new" in lines[0]


def test_a_damaged_chamber_is_refused_at_start(tmp_path):
    """Bytes overwritten inside the file: gatewayd refuses to start and says how to recover."""
    path = tmp_path / "c.sqlite3"
    chamber = Chamber(path, clock=time.time)
    chamber.open()
    for i in range(300):
        chamber.transact_now(lambda tx, i=i: tx.add_message(
            direction="inbound", peer="his", control_id=f"C{i}", type="SIU^S24", state="delivered",
            body=b"x" * 500, charset="utf-8"))
    chamber._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    chamber.close()
    data = bytearray(path.read_bytes())
    page = 4096
    for offset in range(3 * page, len(data) - page, page):  # scramble every page after the schema
        data[offset + 8: offset + 64] = b"\xff" * 56
    path.write_bytes(bytes(data))
    with pytest.raises(ChamberError, match="restore the last backup"):
        Chamber(path, clock=time.time).open()
