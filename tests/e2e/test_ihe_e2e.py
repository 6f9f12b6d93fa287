"""IHE ITI Scheduling through the real lock: fhirpy calls $find -> $hold -> $book over mutual TLS, the HIS
simulator gets SRM^S01 only at $book; a hold expires by itself and frees the slot for another platform; a
slot held by another platform is refused with an OperationOutcome; bad parameters are 400, never 500."""

import time
from datetime import date

import pytest
from fhir.resources.R4B.appointment import Appointment
from fhir.resources.R4B.bundle import Bundle
from fhirpy.base.exceptions import OperationOutcome

from tests.e2e.harness import Lock, eventually

HOLD_SECONDS = 3
PATIENT = {"resourceType": "Patient",
           "identifier": [{"system": "urn:oid:2.16.840.1.113883.2.4.6.3", "value": "MRN-0042",
                           "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                                "code": "MR"}]}}],
           "name": [{"family": "王", "given": ["芳"]}]}


@pytest.fixture(scope="module")
def lock(tmp_path_factory):
    running = Lock(tmp_path_factory.mktemp("ihe"))
    running.gateway_config["outer"]["hold_expires"] = f"{HOLD_SECONDS}s"
    running.write_configs()
    with running:
        yield running


def params(*items):
    return {"resourceType": "Parameters", "parameter": [dict(name=n, **v) for n, v in items]}


def find(lock, platform="demo", *extra):
    day = lock.first_day.isoformat()
    body = params(("start", {"valueDateTime": day}), ("end", {"valueDateTime": day}), *extra)
    bundle = lock.fhirpy(platform).execute("Appointment/$find", method="post", data=body)
    Bundle.model_validate(bundle)
    return [e["resource"] for e in bundle.get("entry", [])]


def ref(appointment_id):
    return {"valueReference": {"reference": f"Appointment/{appointment_id}"}}


def srms_for(lock, appointment_id):
    return [r for r in lock.received() if r["type"] == "SRM^S01" and r["placer"] == appointment_id]


def test_find_hold_book_with_fhirpy_through_the_his(lock):
    client = lock.fhirpy()
    proposed = find(lock, "demo", ("practitioner", {"valueReference": {"reference": "Practitioner/D001"}}))
    assert len(proposed) == 4 and all(a["status"] == "proposed" for a in proposed)
    for a in proposed:
        Appointment.model_validate(a)
    choice = proposed[0]
    slot_id = choice["slot"][0]["reference"].split("/", 1)[1]

    held = client.execute("Appointment/$hold", method="post", data=params(("appointment-reference", ref(choice["id"]))))
    appointment = held["entry"][0]["resource"]
    assert appointment["status"] == "pending"
    assert lock.session().get(f"{lock.base}/Slot/{slot_id}").json()["status"] == "busy-tentative"
    assert srms_for(lock, appointment["id"]) == []  # the HIS is not told of a hold
    assert slot_id not in {s["id"] for s in lock.search_slots("other", status="free")}

    booked = client.execute("Appointment/$book", method="post",
                            data=params(("appointment-reference", ref(appointment["id"])),
                                        ("patient-resource", {"resource": PATIENT})))
    result = booked["entry"][0]["resource"]
    assert result["id"] == appointment["id"] and result["status"] == "booked"
    Appointment.model_validate(result)
    srms = srms_for(lock, appointment["id"])
    assert len(srms) == 1 and srms[0]["ack"] == "AA"
    assert client.reference("Appointment", appointment["id"]).to_resource()["status"] == "booked"
    assert lock.session().get(f"{lock.base}/Slot/{slot_id}").json()["status"] == "busy"

    # ITI-118 style: the platform finds it again by the patient's identifier and the day
    mine = lock.session().get(f"{lock.base}/Appointment",
                              params={"patient": "urn:oid:2.16.840.1.113883.2.4.6.3|MRN-0042",
                                      "date": lock.first_day.isoformat()}).json()
    assert [e["resource"]["id"] for e in mine["entry"]] == [appointment["id"]]
    theirs = lock.session("other").get(f"{lock.base}/Appointment", params={"patient": "MRN-0042"}).json()
    assert theirs.get("entry", []) == []

    # cancelled through $book, per the profile: SRM^S04 reaches the HIS and the slot is free again
    cancel = {"resourceType": "Appointment", "id": appointment["id"], "status": "cancelled",
              "participant": [{"actor": {"reference": f"Schedule/{slot_id.rsplit('-', 1)[0]}"}, "status": "declined"}]}
    cancelled = client.execute("Appointment/$book", method="post", data=params(("appointment-resource",
                                                                                {"resource": cancel})))
    assert cancelled["entry"][0]["resource"]["status"] == "cancelled"
    assert [r["ack"] for r in lock.received() if r["type"] == "SRM^S04" and r["placer"] == appointment["id"]] == ["AA"]
    assert lock.session().get(f"{lock.base}/Slot/{slot_id}").json()["status"] == "free"


def test_find_pages_through_next_links_over_https(lock):
    """$find with _count=3 over the first day's free slots: the next links (GETs) lead through every page, and
    together they are exactly the unpaged answer, in order."""
    everything = [a["id"] for a in find(lock, "demo")]
    assert len(everything) > 3
    session = lock.session()
    day = lock.first_day.isoformat()
    r = session.post(f"{lock.base}/Appointment/$find", json=params(
        ("start", {"valueDateTime": day}), ("end", {"valueDateTime": day}), ("_count", {"valueInteger": 3})),
        headers={"Content-Type": "application/fhir+json"}, timeout=5)
    paged, pages = [], 0
    while True:
        assert r.status_code == 200, r.text
        bundle = r.json()
        Bundle.model_validate(bundle)
        paged += [e["resource"]["id"] for e in bundle.get("entry", [])]
        pages += 1
        nxt = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
        if not nxt:
            break
        r = session.get(nxt[0], timeout=5)
    assert paged == everything and pages == -(-len(everything) // 3)


def test_a_slot_held_by_another_platform_is_refused_then_freed_when_the_hold_expires(lock):
    choice = find(lock, "demo", ("practitioner", {"valueReference": {"reference": "Practitioner/D002"}}))[0]
    slot_id = choice["slot"][0]["reference"].split("/", 1)[1]
    demo, other = lock.fhirpy("demo"), lock.fhirpy("other")
    held = demo.execute("Appointment/$hold", method="post", data=params(("appointment-reference", ref(choice["id"]))))
    held_id = held["entry"][0]["resource"]["id"]

    for operation in ("$hold", "$book"):
        with pytest.raises(OperationOutcome) as refused:
            other.execute(f"Appointment/{operation}", method="post",
                          data=params(("appointment-reference", ref(choice["id"])),
                                      *([("patient-resource", {"resource": PATIENT})] if operation == "$book" else [])))
        assert "busy-tentative" in str(refused.value)
    r = lock.session("other").post(f"{lock.base}/Appointment/$book", json=params(
        ("appointment-reference", ref(choice["id"])), ("patient-resource", {"resource": PATIENT})),
        headers={"Content-Type": "application/fhir+json"})
    assert r.status_code == 409 and r.json()["resourceType"] == "OperationOutcome"
    assert r.json()["issue"][0]["code"] == "conflict"

    # the hold expires by itself: the slot is free for the other platform, and the HIS never heard of it
    eventually(lambda: lock.session("other").get(f"{lock.base}/Slot/{slot_id}").json()["status"] == "free",
               timeout=HOLD_SECONDS + 5, what="the expired hold to free the slot")
    assert demo.reference("Appointment", held_id).to_resource()["status"] == "cancelled"
    assert choice["id"] in {a["id"] for a in find(lock, "other")}
    booked = other.execute("Appointment/$book", method="post",
                           data=params(("appointment-reference", ref(choice["id"])),
                                       ("patient-resource", {"resource": PATIENT})))
    assert booked["entry"][0]["resource"]["status"] == "booked"
    assert srms_for(lock, held_id) == []
    assert not [r for r in lock.received() if r["type"] == "SRM^S04" and r["placer"] == held_id]


def test_unknown_or_malformed_parameters_are_400_operation_outcomes(lock):
    s = lock.session()
    bodies = [
        params(("start", {"valueDateTime": "2030-01-07"})),
        params(("start", {"valueDateTime": "2030-01-07"}), ("end", {"valueDateTime": "2030-01-08"}),
               ("organization", {"valueReference": {"reference": "Organization/1"}})),
        params(("start", {"valueDateTime": "not a date"}), ("end", {"valueDateTime": "2030-01-08"})),
        params(("whatever", {"valueString": "x"})),
        {"resourceType": "Parameters", "parameter": [{"name": 7}]},
        {"resourceType": "Bundle"},
    ]
    for body in bodies:
        for operation in ("$find", "$hold", "$book"):
            r = s.post(f"{lock.base}/Appointment/{operation}", json=body,
                       headers={"Content-Type": "application/fhir+json"}, timeout=5)
            assert r.status_code == 400, (operation, body, r.status_code, r.text)
            assert r.json()["resourceType"] == "OperationOutcome"
    time.sleep(0.1)
    assert "outer.internal_error" not in lock.gateway.log_path.read_text(encoding="utf-8")


def book_then_move(lock, doctor):
    """Book the doctor's first slot of the second day with $book, then move it to the second with $book
    (rescheduling); returns the two proposed appointments, the booked one and the moved one."""
    client = lock.fhirpy()
    day = date.fromordinal(lock.first_day.toordinal() + 1).isoformat()
    body = params(("start", {"valueDateTime": day}), ("end", {"valueDateTime": day}),
                  ("practitioner", {"valueReference": {"reference": f"Practitioner/{doctor}"}}))
    first, second = [e["resource"] for e in client.execute("Appointment/$find", method="post", data=body)["entry"]][:2]
    booked = client.execute("Appointment/$book", method="post",
                            data=params(("appointment-reference", ref(first["id"])),
                                        ("patient-resource", {"resource": PATIENT})))["entry"][0]["resource"]
    assert booked["status"] == "booked"
    move = {"resourceType": "Appointment", "id": booked["id"], "status": "booked",
            "slot": [{"reference": second["slot"][0]["reference"]}],
            "participant": [{"actor": {"reference": f"Schedule/{doctor}"}, "status": "accepted"}]}
    moved = client.execute("Appointment/$book", method="post",
                           data=params(("appointment-resource", {"resource": move})))["entry"][0]["resource"]
    return first, second, booked, moved


def test_rescheduling_through_book_moves_the_booking_at_the_his_and_frees_the_old_slot(lock):
    """$book of a booked appointment with another slot: SRM^S01 for the new slot, then SRM^S04 for the old
    one (cancel + new); the old slot is free again."""
    client = lock.fhirpy()
    first, second, booked, moved = book_then_move(lock, "D001")
    old_slot = first["slot"][0]["reference"].split("/", 1)[1]
    new_slot = second["slot"][0]["reference"].split("/", 1)[1]
    assert moved["status"] == "booked" and moved["id"] != booked["id"]
    assert moved["slot"][0]["reference"] == f"Slot/{new_slot}"
    assert len(srms_for(lock, moved["id"])) == 1
    eventually(lambda: [r["ack"] for r in lock.received()
                        if r["type"] == "SRM^S04" and r["placer"] == booked["id"]] == ["AA"],
               what="the old booking's cancellation at the HIS")
    eventually(lambda: lock.session().get(f"{lock.base}/Slot/{old_slot}").json()["status"] == "free",
               what="the old slot to be free again")
    old = client.reference("Appointment", booked["id"]).to_resource()
    assert old["status"] == "cancelled" and old["cancelationReason"]["text"] == f"rescheduled to {moved['id']}"
    assert lock.session().get(f"{lock.base}/Slot/{new_slot}").json()["status"] == "busy"


@pytest.fixture(scope="module")
def told(tmp_path_factory):
    """A second lock with the optional HIS behaviours on: the gateway tells the HIS of holds
    (outer.hold_at_his), and the HIS moves bookings with SRM^S03 (inner.his.reschedule_message)."""
    running = Lock(tmp_path_factory.mktemp("ihe-told"), his={"reschedule_message": "SRM^S03"})
    running.gateway_config["outer"].update(hold_expires=f"{HOLD_SECONDS}s", hold_at_his=True)
    running.write_configs()
    with running:
        yield running


def test_holds_told_to_the_his_are_confirmed_by_book_or_released_there_at_expiry(told):
    """outer.hold_at_his: $hold sends the HIS a tentative SRM^S01 (ARQ-8 Tentative) and answers once it took
    it; $book's ordinary SRM^S01 confirms it; a hold left to expire is cancelled at the HIS with SRM^S04, so
    the HIS then books that slot for another platform."""
    first, second = find(told, "demo", ("practitioner", {"valueReference": {"reference": "Practitioner/D001"}}))[:2]
    demo, other = told.fhirpy("demo"), told.fhirpy("other")

    held = demo.execute("Appointment/$hold", method="post", data=params(("appointment-reference", ref(first["id"]))))
    held_id = held["entry"][0]["resource"]["id"]
    assert held["entry"][0]["resource"]["status"] == "pending"
    assert [(r["ack"], r.get("tentative")) for r in srms_for(told, held_id)] == [("AA", True)]
    booked = demo.execute("Appointment/$book", method="post", data=params(("appointment-reference", ref(held_id)),
                                                                          ("patient-resource", {"resource": PATIENT})))
    assert booked["entry"][0]["resource"]["status"] == "booked"
    assert [(r["ack"], r.get("tentative")) for r in srms_for(told, held_id)] == [("AA", True), ("AA", None)]

    left = demo.execute("Appointment/$hold", method="post", data=params(("appointment-reference", ref(second["id"]))))
    left_id = left["entry"][0]["resource"]["id"]
    eventually(lambda: [r["ack"] for r in told.received() if r["type"] == "SRM^S04" and r["placer"] == left_id] == ["AA"],
               timeout=HOLD_SECONDS + 10, what="the expired hold's release at the HIS")
    assert demo.reference("Appointment", left_id).to_resource()["status"] == "cancelled"
    eventually(lambda: told.session("other").get(f"{told.base}/Slot/{second['slot'][0]['reference'][5:]}")
               .json()["status"] == "free", what="the released slot to be free")
    taken = other.execute("Appointment/$book", method="post", data=params(("appointment-reference", ref(second["id"])),
                                                                          ("patient-resource", {"resource": PATIENT})))
    assert taken["entry"][0]["resource"]["status"] == "booked"


def test_rescheduling_at_a_his_that_moves_bookings_with_s03(told):
    """inner.his.reschedule_message SRM^S03: $book with another slot sends one SRM^S03 (ARQ-1 the old
    appointment) and no cancel; the HIS moves its booking (SIU^S13); the old appointment is cancelled
    ("rescheduled to <new>"), the old slot free, the new one busy."""
    client = told.fhirpy()
    first, second, booked, moved = book_then_move(told, "D002")
    new_slot = second["slot"][0]["reference"].split("/", 1)[1]
    assert moved["status"] == "booked" and moved["slot"][0]["reference"] == f"Slot/{new_slot}"
    assert [(r["ack"], r["start"]) for r in told.received() if r["type"] == "SRM^S03"] == [
        ("AA", new_slot.rsplit("-", 1)[1])]
    assert [r["placer"] for r in told.received() if r["type"] == "SRM^S03"] == [booked["id"]]
    assert not [r for r in told.received() if r["type"] == "SRM^S04" and r["placer"] in (booked["id"], moved["id"])]
    old = client.reference("Appointment", booked["id"]).to_resource()
    assert old["status"] == "cancelled" and old["cancelationReason"]["text"] == f"rescheduled to {moved['id']}"
    eventually(lambda: told.session().get(f"{told.base}/Slot/{first['slot'][0]['reference'][5:]}").json()["status"]
               == "free", what="the old slot to be free")
    assert told.session().get(f"{told.base}/Slot/{new_slot}").json()["status"] == "busy"
    eventually(lambda: any(r["type"] == "SIU^S13" for r in told.sent()), what="the HIS's SIU^S13")
