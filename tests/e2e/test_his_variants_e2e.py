"""The two ways the slot book reaches the gateway (push and poll), and a Chinese HIS that sends GB18030
with MSH-18 empty."""

import signal

import pytest

from adapters.hl7.er7 import parse
from tests.e2e.harness import Lock, appointment_for, eventually
from tests.e2e.harness import mllp_exchange

JSON = {"Content-Type": "application/fhir+json"}


@pytest.fixture(scope="module")
def polled(tmp_path_factory):
    lock = Lock(tmp_path_factory.mktemp("poll"), sim={"publish": "none"},
                his={"slot_source": "poll", "poll_interval": "1s", "poll_days": 7})
    with lock:
        yield lock


def test_poll_mode_builds_the_slot_book_from_sqr(polled):
    """With slot_source: poll the gateway sends SQM^S25 and the HIS's SQR^S25 fills the slot book."""
    assert any(m["type"] == "SQM^S25" for m in polled.received())
    assert not any(m.get("type") == "SIU^S24" for m in polled.sent())
    assert len(polled.search_slots(status="free")) == polled.slot_count


def test_poll_mode_booking_and_counter_changes(polled):
    """A booking works without SIU (the HIS's AA marks the slot busy), and a counter booking shows up at
    the next poll."""
    slot_id = polled.search_slots(status="free")[0]["id"]
    r = polled.session().post(f"{polled.base}/Appointment", json=appointment_for(slot_id), headers=JSON)
    assert r.status_code == 201
    assert polled.session().get(f"{polled.base}/Slot/{slot_id}").json()["status"] == "busy"
    free_before = len(polled.search_slots(status="free"))
    polled.sim.popen.send_signal(signal.SIGUSR1)
    eventually(lambda: len(polled.search_slots(status="free")) == free_before - 1, timeout=10,
               what="the counter booking to be seen by the next SQM^S25 poll")


@pytest.fixture(scope="module")
def chinese_his(tmp_path_factory):
    lock = Lock(tmp_path_factory.mktemp("gb18030"), sim={"charset": "gb18030", "msh18_empty": True},
                his={"charset": "gb18030"})
    with lock:
        yield lock


def test_gb18030_his_with_empty_msh18(chinese_his):
    """SIU in GB18030 with MSH-18 empty is read with the configured charset: Chinese names arrive intact,
    and a booking with a Chinese patient name is sent to the HIS in GB18030 and accepted."""
    s = chinese_his.session()
    schedule = s.get(f"{chinese_his.base}/Schedule/D001").json()
    assert {a["display"] for a in schedule["actor"]} == {"张医生1", "心内科"}
    slot = chinese_his.search_slots(status="free")[0]
    assert slot["serviceType"][0]["text"] == "心内科门诊"
    r = s.post(f"{chinese_his.base}/Appointment", json=appointment_for(slot["id"]), headers=JSON)
    assert r.status_code == 201, r.text
    assert r.json()["contained"][0]["name"][0]["family"] == "王"


def test_gb18030_bytes_to_a_utf8_gateway_are_refused_not_garbled(lock_utf8):
    """A GB18030 message with MSH-18 empty sent to a gateway expecting UTF-8 is NAKed (ERR at MSH-18),
    never stored as garbled text."""
    siu = ("MSH|^~\\&|HIS|医院|GATEWAYD|FRONT|20301010120000||SIU^S24^SIU_S12|GBK-1|P|2.5\r"
           "SCH|||||D001^张医生||||15|MIN|^^15^203010100900^203010100915|||||||||||||Open\r"
           "RGS|1\rAIS|1||x^心内科|203010100900|||15|MIN\r").encode("gb18030")
    ack = parse(mllp_exchange(lock_utf8.mllp_port, siu))
    assert ack.segment("MSA").get(1) == "AR"
    assert ack.segment("ERR").get(3) == "102"
    assert [ack.segment("ERR").get(2, c) for c in (1, 3)] == ["MSH", "18"]
    assert lock_utf8.session().get(f"{lock_utf8.base}/Slot/D001-203010100900").status_code == 404


@pytest.fixture(scope="module")
def lock_utf8(tmp_path_factory):
    with Lock(tmp_path_factory.mktemp("utf8"), doctors=1, days=1) as running:
        yield running


@pytest.fixture(scope="module")
def slow_poll(tmp_path_factory):
    lock = Lock(tmp_path_factory.mktemp("slowpoll"), sim={"publish": "none"},
                his={"slot_source": "poll", "poll_interval": "1h"}, doctors=1, days=1)
    with lock:
        yield lock


def test_his_refuses_a_slot_its_counter_booked_meanwhile(slow_poll):
    """The counter books a slot the gateway still shows free (next poll is an hour away): the platform's
    booking gets 409 with the HIS's reason, and the HIS booked it only once (at the counter)."""
    slow_poll.sim.popen.send_signal(signal.SIGUSR1)
    counter = eventually(lambda: [m for m in slow_poll.sent() if m["reason"] == "counter"],
                         what="the counter booking")[0]
    slot_id = f"{counter['schedule']}-{counter['start']}"
    assert slot_id in {s["id"] for s in slow_poll.search_slots(status="free")}  # the gateway can't know yet
    r = slow_poll.session().post(f"{slow_poll.base}/Appointment", json=appointment_for(slot_id), headers=JSON)
    assert r.status_code == 409
    issue = r.json()["issue"][0]
    assert issue["code"] == "conflict" and "refused by the HIS (AR)" in issue["diagnostics"]
    srm = [m for m in slow_poll.received() if m["type"] == "SRM^S01"]
    assert [m["ack"] for m in srm] == ["AR"]
