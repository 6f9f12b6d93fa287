"""The chamber keeps its promise across restarts: nothing acknowledged is lost, nothing delivered is sent
again, and a booking the HIS had not yet answered completes after the restart with its original MSH-10."""

import signal

import pytest

from tests.e2e.harness import Lock, appointment_for, eventually

JSON = {"Content-Type": "application/fhir+json"}


@pytest.fixture
def lock(tmp_path):
    with Lock(tmp_path) as running:
        yield running


def test_restart_keeps_slots_and_appointments_and_sends_nothing_again(lock):
    s = lock.session()
    slot_id = lock.search_slots(status="free")[0]["id"]
    booked = s.post(f"{lock.base}/Appointment", json=appointment_for(slot_id), headers=JSON)
    assert booked.status_code == 201
    slots_before = {x["id"]: x["status"] for x in lock.search_slots()}
    received_before = lock.received()

    assert lock.gateway.stop() == 0  # SIGTERM: a clean stop
    lock.start_gateway()

    assert {x["id"]: x["status"] for x in lock.search_slots()} == slots_before
    again = lock.session().get(f"{lock.base}/Appointment/{booked.json()['id']}")
    assert again.status_code == 200 and again.json()["status"] == "booked"
    lock.sim.popen.send_signal(signal.SIGUSR1)  # something new crosses, proving the gate is live again ...
    eventually(lambda: any(m["reason"] == "counter" for m in lock.sent()), what="a counter booking")
    eventually(lambda: len([x for x in lock.search_slots(status="free")]) == len(
        [k for k, v in slots_before.items() if v == "free"]) - 1, what="the counter booking to arrive")
    assert lock.received() == received_before  # ... and nothing was sent to the HIS again


@pytest.fixture
def silent_his_lock(tmp_path):
    lock = Lock(tmp_path)
    lock.gateway_config["outer"]["answer_within"] = "1s"
    lock.gateway_config["inner"]["his"]["ack_timeout"] = "1s"
    lock.write_configs()
    with lock:
        yield lock


def test_pending_booking_survives_restart(silent_his_lock):
    """The HIS goes silent (SIGSTOP): POST answers 202 pending; the gateway is restarted while the SRM is
    unanswered; the HIS comes back; the booking completes, every copy the HIS saw has one MSH-10, and the
    HIS booked once."""
    lock = silent_his_lock
    slot_id = lock.search_slots(status="free")[0]["id"]
    lock.sim.popen.send_signal(signal.SIGSTOP)
    try:
        r = lock.session().post(f"{lock.base}/Appointment", json=appointment_for(slot_id), headers=JSON)
        assert r.status_code == 202
        assert r.json()["status"] == "pending"
        location = r.headers["Location"]
        assert lock.session().get(f"{lock.base}/Slot/{slot_id}").json()["status"] == "busy-tentative"
        assert lock.gateway.stop() == 0
    finally:
        lock.sim.popen.send_signal(signal.SIGCONT)
    lock.start_gateway()
    eventually(lambda: lock.session().get(location).json()["status"] == "booked", timeout=20,
               what="the pending booking to be confirmed after the restart")
    placer = location.rsplit("/", 1)[1]
    copies = [m for m in lock.received() if m["type"] == "SRM^S01" and m["placer"] == placer]
    assert len({m["control_id"] for m in copies}) == 1
    assert len([m for m in copies if not m.get("duplicate")]) == 1
