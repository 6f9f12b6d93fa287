"""The HIS is killed (kill -9) and restarted under a real gateway: its bookings stay booked (issue 15, finding 11).

A HIS simulator that forgot its state on restart re-published every slot as open, and the gateway, reading an
open slot under one of its bookings as the hospital's cancellation, marked 1,340 bookings "cancelled by the
hospital"; its appointment ids started again at H000001. Here the real processes run on loopback: a platform
books two appointments over mutual TLS, the simulator is killed with SIGKILL right after answering and started
again from the same config (its store is the default one, next to the config), and then:

- nothing the restarted simulator sends re-opens a slot (no SIU^S24, S15 or S17 at all): it sends the new
  booking's S12 and, again, any S12 whose ACK the killed run had not yet recorded (same MSH-10);
- the two appointments are still booked, their slots busy, and no appointment is "cancelled by the hospital";
- a new booking gets the next HIS appointment id (H000003), and its SIU^S12, queued behind anything the
  simulator had to say at start, reaches the gateway — so everything before it has been applied;
- the platform's cancel of an earlier booking reaches the restarted HIS, which knows it: SRR AA.
"""

from __future__ import annotations

from tests.e2e.harness import Lock, appointment_for, eventually
from tests.faults.process import kill9

JSON = {"Content-Type": "application/fhir+json"}


def book(lock: Lock, slot_id: str) -> dict:
    r = lock.session().post(f"{lock.base}/Appointment", json=appointment_for(slot_id), headers=JSON, timeout=15)
    assert r.status_code == 201 and r.json()["status"] == "booked", r.text
    return r.json()


def his_id(appointment: dict) -> str:
    return appointment["identifier"][0]["value"]


def test_bookings_stay_booked_when_the_his_is_killed_and_restarted(tmp_path):
    with Lock(tmp_path) as lock:
        free = [s["id"] for s in lock.search_slots(status="free")]
        first, second = book(lock, free[0]), book(lock, free[1])
        assert [his_id(first), his_id(second)] == ["H000001", "H000002"]

        assert kill9(lock.sim) == -9
        lock.sim.stop()
        sent_before = len(lock.sent())
        lock.start_sim()

        third = book(lock, free[2])
        assert his_id(third) == "H000003"
        start = free[2].rsplit("-", 1)[1]

        def third_s12_applied():
            s12 = [m["control_id"] for m in lock.sent()[sent_before:]
                   if m["type"] == "SIU^S12" and m["start"] == start]
            return s12 and lock.chamber_rows(
                "SELECT 1 FROM messages WHERE direction = 'inbound' AND control_id = ? AND state = 'delivered'",
                s12[0])

        eventually(third_s12_applied, timeout=30, what="the restarted HIS's S12 of the new booking, applied")
        journal = lock.sent()
        after = journal[sent_before:]
        assert {m["type"] for m in after} == {"SIU^S12"}, after
        assert [m["start"] for m in after if not m.get("restored")] == [start], after
        # what the killed run had committed without seeing its ACK goes again: only the S12s of the two bookings
        # made before the kill (the killed run may have died before writing one to its journal, so the journal
        # cannot say which it had sent)
        before_kill = {slot.rsplit("-", 1)[1] for slot in free[:2]}
        assert {m["start"] for m in after if m.get("restored")} <= before_kill, after

        s = lock.session()
        for appointment in (first, second):
            again = s.get(f"{lock.base}/Appointment/{appointment['id']}", timeout=5).json()
            assert (again["status"], his_id(again)) == ("booked", his_id(appointment))
        busy = {x["id"]: x["status"] for x in lock.search_slots()}
        assert [busy[slot] for slot in free[:3]] == ["busy"] * 3
        assert lock.chamber_rows("SELECT id FROM appointments WHERE outcome = 'cancelled by the hospital'") == []

        r = s.put(f"{lock.base}/Appointment/{first['id']}", json=dict(first, status="cancelled"), headers=JSON,
                  timeout=15)
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
        (cancel,) = [m for m in lock.received() if m["type"] == "SRM^S04"]
        assert (cancel["placer"], cancel["ack"]) == (first["id"], "AA")
