"""A platform books a hospital appointment through the lock: fhirpy -> HTTPS -> chamber -> MLLP -> HIS."""

import signal
import threading

from fhir.resources.R4B.appointment import Appointment
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.slot import Slot

from tests.e2e.harness import appointment_for, eventually


def free_slot_ids(lock, n=1, platform="demo"):
    return [s["id"] for s in lock.search_slots(platform, status="free")][:n]


def test_search_book_read_cancel_with_fhirpy(lock):
    """fhirpy (unmodified) finds free slots, books one (HIS gets SRM^S01 and accepts), reads it back as
    booked, then cancels it (HIS gets SRM^S04) and the slot is free again."""
    client = lock.fhirpy()
    slots = client.resources("Slot").search(status="free").limit(50).fetch()
    assert len(slots) >= 4
    for s in slots:
        Slot.model_validate(s.serialize())  # every Slot we serve is valid FHIR
    slot = slots[0]

    appointment = client.resource("Appointment", **appointment_for(slot["id"]))
    appointment.save()
    assert appointment["status"] == "booked"
    Appointment.model_validate(appointment.serialize())
    his_id = appointment["identifier"][0]["value"]

    srm = [r for r in lock.received() if r["type"] == "SRM^S01" and r["placer"] == appointment["id"]]
    assert len(srm) == 1 and srm[0]["ack"] == "AA"

    read_back = client.reference("Appointment", appointment["id"]).to_resource()
    assert read_back["status"] == "booked"
    assert read_back["identifier"][0]["value"] == his_id
    assert client.reference("Slot", slot["id"]).to_resource()["status"] == "busy"
    assert slot["id"] not in {s["id"] for s in lock.search_slots(status="free")}

    read_back["status"] = "cancelled"
    read_back.save()
    assert read_back["status"] == "cancelled"
    s04 = [r for r in lock.received() if r["type"] == "SRM^S04" and r["placer"] == appointment["id"]]
    assert len(s04) == 1 and s04[0]["ack"] == "AA"
    assert client.reference("Slot", slot["id"]).to_resource()["status"] == "free"


def test_search_bundle_and_schedules_are_valid_fhir(lock):
    """GET /Slot and GET /Schedule answer searchset Bundles that validate as FHIR R4B."""
    s = lock.session()
    bundle = s.get(f"{lock.base}/Slot", params={"status": "free", "_count": 3}).json()
    Bundle.model_validate(bundle)
    assert len(bundle["entry"]) == 3
    assert any(link["relation"] == "next" for link in bundle["link"])
    schedules = s.get(f"{lock.base}/Schedule").json()
    Bundle.model_validate(schedules)
    displays = {a["display"] for e in schedules["entry"] for a in e["resource"]["actor"]}
    assert "心内科" in displays  # Chinese text crossed HL7 -> chamber -> FHIR intact
    metadata = s.get(f"{lock.base}/metadata").json()
    assert metadata["fhirVersion"] == "4.0.1"


def test_slot_search_by_start_and_schedule(lock):
    """start=ge/lt and schedule= narrow the search as FHIR defines them."""
    day = lock.first_day.isoformat()
    same_day = lock.search_slots(start=[f"ge{day}", f"lt{day}T23:59:59+08:00"], schedule="Schedule/D001")
    assert same_day and all(s["start"].startswith(day) for s in same_day)
    assert all(s["schedule"]["reference"] == "Schedule/D001" for s in same_day)
    assert len(same_day) == 4


def test_two_platforms_race_for_the_same_slot(lock):
    """Two platforms POST the same slot at once: exactly one 201, one 409; the HIS gets one SRM."""
    slot_id = free_slot_ids(lock)[0]
    already = len(lock.received())
    barrier = threading.Barrier(2)
    results = {}

    def book(platform):
        s = lock.session(platform)
        barrier.wait()
        results[platform] = s.post(f"{lock.base}/Appointment", json=appointment_for(slot_id),
                                   headers={"Content-Type": "application/fhir+json"}, timeout=10)

    threads = [threading.Thread(target=book, args=(p,)) for p in ("demo", "other")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in results.values())
    assert codes == [201, 409]
    loser = next(r for r in results.values() if r.status_code == 409)
    assert loser.json()["resourceType"] == "OperationOutcome"
    start = slot_id.rsplit("-", 1)[1]
    srms = [r for r in lock.received()[already:] if r["type"] == "SRM^S01" and r["start"] == start
            and r["schedule"] == slot_id.rsplit("-", 1)[0]]
    assert len(srms) == 1


def test_counter_booking_at_the_hospital_removes_the_slot(lock):
    """The HIS books a slot at its own counter and sends SIU^S12: the slot leaves GET /Slot?status=free."""
    before = len(lock.sent())
    lock.sim.popen.send_signal(signal.SIGUSR1)
    counter = eventually(lambda: [m for m in lock.sent()[before:] if m["reason"] == "counter"],
                         what="the counter booking's SIU^S12")[0]
    assert counter["type"] == "SIU^S12"
    slot_id = f"{counter['schedule']}-{counter['start']}"
    eventually(lambda: slot_id not in {s["id"] for s in lock.search_slots(status="free")},
               what="the counter-booked slot to disappear from the free slots")
    assert lock.session().get(f"{lock.base}/Slot/{slot_id}").json()["status"] == "busy"


def test_a_platform_sees_only_its_own_appointments(lock):
    """Another platform's appointment is not found (404), and not listed."""
    slot_id = free_slot_ids(lock)[0]
    r = lock.session("demo").post(f"{lock.base}/Appointment", json=appointment_for(slot_id),
                                  headers={"Content-Type": "application/fhir+json"})
    assert r.status_code == 201
    appointment_id = r.json()["id"]
    assert r.headers["Location"] == f"{lock.base}/Appointment/{appointment_id}/_history/{r.json()['meta']['versionId']}"
    other = lock.session("other")
    assert other.get(f"{lock.base}/Appointment/{appointment_id}").status_code == 404
    listed = other.get(f"{lock.base}/Appointment").json().get("entry", [])
    assert appointment_id not in {e["resource"]["id"] for e in listed}
    mine = lock.session("demo").get(f"{lock.base}/Appointment").json()["entry"]
    assert appointment_id in {e["resource"]["id"] for e in mine}
