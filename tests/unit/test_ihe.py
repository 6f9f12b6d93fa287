"""IHE ITI Scheduling on the outer gate, in-process (no reactor, no sockets): $find (ITI-115), $hold (ITI-116),
$book (ITI-117) and GET /Appointment?patient=&date= (ITI-118 style).  Same Gate as test_outer_access
(tests/unit/outer_gate.py): a real chamber file, a task.Clock, DummyRequests with real client certificates."""

import json

import pytest

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from hypothesis import HealthCheck, given, settings, strategies as st

from gateway.domain.audit import verify
from gateway.domain.model import HisAnswer, slot_status
from tests.unit.outer_gate import PATIENT, SID, Gate, appointment, entries, outcome, params, ref


def find_params(*extra, start="2030-01-07", end="2030-01-08"):
    return params(("start", {"valueDateTime": start}), ("end", {"valueDateTime": end}), *extra)


def answer_srm(gate, code="AA"):
    srm = [m for m in gate.chamber.read().messages(direction="outbound") if m.type == "SRM^S01"][0]
    gate.chamber.transact_now(lambda tx: gate.booking.on_answer(tx, tx.message(srm.id), HisAnswer(code, "", "H1")))


# -- $find -----------------------------------------------------------------------------------------------------

def test_find_returns_proposed_appointments_for_the_free_slots(gate):
    r = gate.request("POST", "/Appointment/$find", find_params())
    assert r.status == 200, r.json
    found = entries(r)
    assert [a["slot"][0]["reference"] for a in found] == [f"Slot/{s}" for s in SID]
    first = found[0]
    assert first["status"] == "proposed" and first["id"] == f"proposed-{SID[0]}"
    assert first["start"] == "2030-01-07T08:00:00+08:00" and first["end"] == "2030-01-07T08:15:00+08:00"
    kinds = {p["actor"].get("type") or p["actor"]["reference"].split("/")[0] for p in first["participant"]}
    assert kinds == {"Practitioner", "HealthcareService"}  # (R4 allows no Schedule there: issue 17, finding 8)
    assert r.json["total"] == 8


def test_find_narrows_by_time_service_practitioner_location_and_count(gate):
    def ids(*extra, **kw):
        r = gate.request("POST", "/Appointment/$find", find_params(*extra, **kw))
        assert r.status == 200, r.json
        return [a["slot"][0]["reference"][5:] for a in entries(r)]

    assert ids(start="2030-01-07T08:30:00+08:00", end="2030-01-07T09:00:00+08:00") == SID[2:4]
    assert ids(("visit-type", {"valueString": "urn:gatewayd:his:service|card"})) == SID
    assert ids(("service-type", {"valueCoding": {"code": "card"}})) == SID
    assert ids(("visit-type", {"valueString": "other"})) == []
    assert ids(("visit-type", {"valueString": "http://snomed.info/sct|card"})) == []  # not our code system
    assert ids(("practitioner", ref("Practitioner/D001"))) == SID
    assert ids(("practitioner", ref("Schedule/D001"))) == SID
    assert ids(("practitioner", {"valueReference": {"identifier": {"system": "urn:gatewayd:his:practitioner",
                                                                   "value": "D999"}}})) == []
    assert ids(("location-reference", ref("Location/CARD"))) == SID
    assert ids(("location-reference", ref("Location/DERM"))) == []
    assert ids(("specialty", {"valueString": "urn:gatewayd:his:department|CARD"})) == SID
    assert ids(("_count", {"valueInteger": 3})) == SID[:3]
    assert ids(("patient-resource", {"resource": PATIENT})) == SID  # accepted, ignored


def follow(gate, response):
    """Every proposed appointment of a $find answer and of the pages its next links lead to (by GET)."""
    found = []
    while True:
        assert response.status == 200, response.json
        found += [a["slot"][0]["reference"][5:] for a in entries(response)]
        nxt = [link["url"] for link in response.json["link"] if link["relation"] == "next"]
        if not nxt:
            return found
        assert nxt[0].startswith("https://gw.example/fhir/Appointment/$find?")
        response = gate.request("GET", nxt[0][len("https://gw.example/fhir"):])


def test_find_pages_with_count_and_next_links_that_keep_every_parameter(gate):
    """_count=3 of 8 slots: three pages through next links (GET, as for GET /Slot), each parameter carried
    over — a Coding with its system, references by identifier, a repeated parameter (OR) — and the last page
    has no next link; _count=0 has none at all."""
    assert follow(gate, gate.request("POST", "/Appointment/$find", find_params(("_count", {"valueInteger": 3})))) == SID
    narrowed = find_params(
        ("_count", {"valueInteger": 2}),
        ("visit-type", {"valueCoding": {"system": "urn:gatewayd:his:service", "code": "card"}}),
        ("practitioner", {"valueReference": {"identifier": {"system": "urn:gatewayd:his:practitioner", "value": "D001"}}}),
        ("practitioner", {"valueReference": {"identifier": {"system": "urn:elsewhere", "value": "D001"}}}),
        ("location-reference", {"valueReference": {"identifier": {"value": "CARD"}}}),
        start="2030-01-07T08:30:00+08:00")
    first = gate.request("POST", "/Appointment/$find", narrowed)
    assert [a["slot"][0]["reference"][5:] for a in entries(first)] == SID[2:4]
    assert follow(gate, first) == SID[2:]
    by_get = gate.request("GET", "/Appointment/$find?start=2030-01-07&end=2030-01-07&_count=5"
                                 "&practitioner=Practitioner/D001&practitioner=Practitioner/D999")
    assert follow(gate, by_get) == SID
    none = gate.request("POST", "/Appointment/$find", find_params(("_count", {"valueInteger": 0})))
    assert entries(none) == [] and [link["relation"] for link in none.json["link"]] == ["self"]
    for bad in ({"valueInteger": -1}, {"valueString": "2"}, {"valueInteger": 10**7}):
        r = gate.request("POST", "/Appointment/$find", find_params(("_offset", bad)))
        assert r.status == 400 and r.json["resourceType"] == "OperationOutcome", (bad, r.json)


def test_find_leaves_out_held_slots_and_respects_the_quota(gate):
    held = gate.request("POST", "/Appointment/$hold", params(("appointment-reference", ref(f"Appointment/proposed-{SID[0]}"))),
                        platform="other")
    assert held.status == 200, held.json
    r = gate.request("POST", "/Appointment/$find", find_params(), platform="other")
    assert SID[0] not in [a["slot"][0]["reference"][5:] for a in entries(r)]
    # 'demo' may hold 2 slots of D001 a day (unless released within an hour of the start)
    for sid in SID[1:3]:
        assert gate.request("POST", "/Appointment/$hold",
                            params(("appointment-reference", ref(f"Appointment/proposed-{sid}")))).status == 200
    assert entries(gate.request("POST", "/Appointment/$find", find_params())) == []
    r = gate.request("POST", "/Appointment/$hold", params(("appointment-reference", ref(f"Appointment/proposed-{SID[4]}"))))
    outcome(r, 409, "business-rule")


def test_find_refuses_unknown_unsupported_and_malformed_parameters_with_400(gate):
    cases = [
        params(("start", {"valueDateTime": "2030-01-07"})),  # no end
        find_params(("organization", ref("Organization/1"))),
        find_params(("location-string", {"valueString": "Beijing"})),
        find_params(("colour", {"valueString": "blue"})),
        find_params(start="tomorrow"),
        find_params(start="2030-13-45"),
        find_params(start="2030-01-08", end="2030-01-07"),
        find_params(("practitioner", {"valueString": "D001"})),
        find_params(("practitioner", ref("Patient/1"))),
        find_params(("_count", {"valueInteger": -1})),
        find_params(("visit-type", {"valueString": ""})),
        {"resourceType": "Parameters", "parameter": [{"name": "start"}]},
        {"resourceType": "Appointment"},
        {"resourceType": "Parameters", "parameter": "x"},
        [1, 2],
    ]
    for body in cases:
        r = gate.request("POST", "/Appointment/$find", body)
        assert r.status == 400, (body, r.status, r.json)
        assert r.json["resourceType"] == "OperationOutcome"


def test_operations_need_post_a_known_name_and_the_scope(gate):
    outcome(gate.request("PUT", "/Appointment/$find", find_params()), 405, "not-supported")
    outcome(gate.request("GET", "/Appointment/$hold"), 405, "not-supported")
    outcome(gate.request("POST", "/Appointment/$nope", find_params()), 404, "not-supported")
    assert gate.request("POST", "/Appointment/$find", find_params(), platform="readonly").status == 200
    outcome(gate.request("POST", "/Appointment/$hold", params(("appointment-reference", ref(f"Appointment/proposed-{SID[0]}"))),
                         platform="readonly"), 403, "forbidden")
    outcome(gate.request("POST", "/Appointment/$book", params(("appointment-reference", ref(f"Appointment/proposed-{SID[0]}"))),
                         platform="readonly"), 403, "forbidden")


_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 60, 2 ** 60), st.text(max_size=30),
                 st.sampled_from(["2030-01-07", "2030-01-07T08:00:00+08:00", "9999-12-31", "0001-01-01",
                                  "Practitioner/D001", "urn:x|card", "|", "2030-02-30", "2030-01-07T25:00"]))
_VALUE = st.recursive(_LEAF, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(["reference", "code", "system", "identifier", "value", "resourceType"]),
                    inner, max_size=3)), max_leaves=6)
_PARAMETER = st.fixed_dictionaries(
    {"name": st.sampled_from(["start", "end", "visit-type", "service-type", "specialty", "practitioner",
                              "location-reference", "_count", "patient-resource", "timing", "x", ""])},
    optional={"value": st.tuples(st.sampled_from(["valueString", "valueDateTime", "valueDate", "valueInteger",
                                                  "valueCoding", "valueReference", "resource", "valueBoolean"]),
                                 _VALUE)})


def test_find_by_get_with_the_parameters_in_the_query(gate):
    r = gate.request("GET", "/Appointment/$find?start=2030-01-07T08:30:00%2B08:00&end=2030-01-07"
                            "&practitioner=Practitioner/D001&visit-type=card&_count=2")
    assert r.status == 200, r.json
    assert [a["slot"][0]["reference"][5:] for a in entries(r)] == SID[2:4]
    for bad in ("start=2030-01-07", "start=2030-01-07&end=2030-01-08&_count=x",
                "start=2030-01-07&end=2030-01-08&timing=x", "start=2030-01-07&end=2030-01-08&practitioner=D001",
                "start=2030-01-07&end=2030-01-08&patient-resource=x", "start=2030-01-07&end=2030-01-08&_count=%C2%B2"):
        outcome(gate.request("GET", f"/Appointment/$find?{bad}"), 400, gate.request(
            "GET", f"/Appointment/$find?{bad}").json["issue"][0]["code"])


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(_PARAMETER, max_size=5))
def test_find_fuzz_never_a_500_and_every_error_is_an_operation_outcome(certs, tmp_path_factory, items):
    gate = _fuzz_gate(certs, tmp_path_factory)
    parameter = []
    for item in items:
        p = {"name": item["name"]}
        if "value" in item:
            key, value = item["value"]
            p[key] = value
        parameter.append(p)
    r = gate.request("POST", "/Appointment/$find", {"resourceType": "Parameters", "parameter": parameter})
    assert r.status in (200, 400), (parameter, r.status, r.json)
    if r.status == 400:
        assert r.json["resourceType"] == "OperationOutcome"
    else:
        Bundle.model_validate(r.json)


_HOLD_BOOK_PARAMETER = st.fixed_dictionaries(
    {"name": st.sampled_from(["appointment-reference", "appointment-resource", "patient-resource", "x"])},
    optional={"value": st.one_of(
        st.tuples(st.sampled_from(["valueReference", "resource", "valueString"]), _VALUE),
        st.tuples(st.just("valueReference"), st.fixed_dictionaries({"reference": st.sampled_from(
            ["Appointment/proposed-" + SID[0], "Appointment/proposed-", "Appointment/a1", "Appointment/",
             "Slot/" + SID[0], "/", "Appointment/proposed-" + "x" * 300])})),
        st.tuples(st.just("resource"), st.sampled_from([
            appointment(SID[1]), dict(appointment(SID[1]), status="cancelled"), dict(appointment(SID[1]), id="a1"),
            dict(appointment(SID[1]), slot=[]), dict(appointment(SID[1]), participant=[]),
            {"resourceType": "Patient", "identifier": [{"value": "1"}]}, {"resourceType": "Patient"},
            {"resourceType": "Patient", "birthDate": "yesterday"}])))})


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.sampled_from(["$hold", "$book"]), st.lists(_HOLD_BOOK_PARAMETER, max_size=4))
def test_hold_and_book_fuzz_never_a_500(certs, tmp_path_factory, operation, items):
    gate = _fuzz_gate(certs, tmp_path_factory)
    parameter = []
    for item in items:
        p = {"name": item["name"]}
        if "value" in item:
            key, value = item["value"]
            p[key] = value
        parameter.append(p)
    r = gate.request("POST", f"/Appointment/{operation}", {"resourceType": "Parameters", "parameter": parameter})
    assert r.status < 500, (parameter, r.status, r.json)
    if r.status >= 400:
        assert r.json["resourceType"] == "OperationOutcome"
    else:
        Bundle.model_validate(r.json)
    gate.clock.advance(301)  # let holds expire, so the next example finds the slots free again


_FUZZ = {}


def _fuzz_gate(certs, tmp_path_factory):
    if "gate" not in _FUZZ:
        _FUZZ["gate"] = Gate(tmp_path_factory.mktemp("fuzz") / "c.sqlite3", certs)
    return _FUZZ["gate"]


# -- $hold -----------------------------------------------------------------------------------------------------

def test_hold_holds_the_slot_without_telling_the_his_and_expires_by_itself(gate):
    r = gate.request("POST", "/Appointment/$hold", params(("appointment-reference", ref(f"Appointment/proposed-{SID[0]}"))))
    assert r.status == 200, r.json
    held = entries(r)[0]
    assert held["status"] == "pending" and held["id"].startswith("a")
    assert held["extension"][0]["url"] == "urn:gatewayd:appointment:hold-expires"
    assert r.headers["location"].endswith(f"/Appointment/{held['id']}")
    assert slot_status(gate.chamber.read().slot(SID[0])) == "busy-tentative"
    assert gate.chamber.read().messages(direction="outbound") == []  # the HIS is not told
    # another platform cannot hold nor book it
    other = gate.request("POST", "/Appointment/$hold", params(("appointment-reference", ref(f"Appointment/proposed-{SID[0]}"))),
                         platform="other")
    outcome(other, 409, "conflict")
    other = gate.request("POST", "/Appointment/$book", params(("appointment-reference", ref(f"Appointment/proposed-{SID[0]}")),
                                                              ("patient-resource", {"resource": PATIENT})), platform="other")
    outcome(other, 409, "conflict")
    outcome(gate.request("POST", "/Appointment", appointment(SID[0]), platform="other"), 409, "conflict")
    # nor book the holder's appointment by its id
    outcome(gate.request("POST", "/Appointment/$book", params(("appointment-reference", ref(f"Appointment/{held['id']}"))),
                         platform="other"), 404, "not-found")
    gate.clock.advance(301)  # past hold_seconds: released by itself
    assert slot_status(gate.chamber.read().slot(SID[0])) == "free"
    appt = gate.chamber.read().appointment(held["id"])
    assert appt.status == "cancelled" and "expired" in appt.outcome
    assert gate.chamber.read().messages(direction="outbound") == []  # no compensating cancel, nothing at all
    # and the other platform may now hold it
    assert gate.request("POST", "/Appointment/$hold", params(("appointment-reference", ref(f"Appointment/proposed-{SID[0]}"))),
                        platform="other").status == 200
    # booking the expired hold is refused
    outcome(gate.request("POST", "/Appointment/$book", params(("appointment-reference", ref(f"Appointment/{held['id']}")),
                                                              ("patient-resource", {"resource": PATIENT}))), 409, "conflict")
    assert verify(gate.chamber.read()).ok


def test_hold_by_resource_and_its_refusals(gate):
    r = gate.request("POST", "/Appointment/$hold", params(("appointment-resource", {"resource": appointment(SID[1])})))
    assert r.status == 200, r.json
    held = entries(r)[0]
    assert held["contained"][0]["resourceType"] == "Patient"  # the patient given with the hold is kept
    outcome(gate.request("POST", "/Appointment/$hold", params(("appointment-reference", ref("Appointment/proposed-nope")))),
            422, "not-found")
    assert gate.request("POST", "/Appointment/$hold", params()).status == 400
    assert gate.request("POST", "/Appointment/$hold", params(("appointment-reference", ref("Slot/x")))).status == 400
    assert gate.request("POST", "/Appointment/$hold", params(("foo", {"valueString": "x"}))).status == 400
    booked = dict(appointment(SID[2]), status="booked")
    assert gate.request("POST", "/Appointment/$hold", params(("appointment-resource", {"resource": booked}))).status == 400


# -- $book -----------------------------------------------------------------------------------------------------

def test_find_hold_book_queues_the_srm_and_books_when_the_his_accepts(gate):
    found = entries(gate.request("POST", "/Appointment/$find", find_params(("_count", {"valueInteger": 1}))))[0]
    held = entries(gate.request("POST", "/Appointment/$hold",
                                params(("appointment-reference", ref(f"Appointment/{found['id']}")))))[0]
    # without a patient it cannot be booked
    outcome(gate.request("POST", "/Appointment/$book", params(("appointment-reference", ref(f"Appointment/{held['id']}")))),
            422, "required")
    r = gate.request("POST", "/Appointment/$book", params(("appointment-reference", ref(f"Appointment/{held['id']}")),
                                                          ("patient-resource", {"resource": PATIENT})))
    assert r.status == 202, r.json  # the HIS has not answered within answer_within
    assert entries(r)[0]["id"] == held["id"] and entries(r)[0]["status"] == "pending"
    srms = gate.chamber.read().messages(direction="outbound")
    assert [m.type for m in srms] == ["SRM^S01"]
    answer_srm(gate)
    read = gate.request("GET", f"/Appointment/{held['id']}").json
    assert read["status"] == "booked"
    assert read["contained"][0]["identifier"][0]["value"] == "11010519491231002X"
    # booking it again changes nothing
    again = gate.request("POST", "/Appointment/$book", params(("appointment-reference", ref(f"Appointment/{held['id']}"))))
    assert again.status == 200 and entries(again)[0]["status"] == "booked"
    assert len(gate.chamber.read().messages(direction="outbound")) == 1
    records = [(r.action, r.outcome) for r in gate.audit()]
    assert records[:2] == [("hold", 200), ("book", 422)]
    assert ("book", 202) in records and ("book.settled", 201) in records
    text = json.dumps([r.__dict__ for r in gate.audit()], ensure_ascii=False)
    assert "11010519491231002X" not in text and "13912345678" not in text


def test_book_a_proposed_appointment_directly_and_cancel_it_through_book(gate):
    r = gate.request("POST", "/Appointment/$book", params(("appointment-resource", {"resource": appointment(SID[3])})))
    assert r.status == 202, r.json
    appointment_id = entries(r)[0]["id"]
    answer_srm(gate)
    assert gate.request("GET", f"/Appointment/{appointment_id}").json["status"] == "booked"
    cancel = {"resourceType": "Appointment", "id": appointment_id, "status": "cancelled",
              "participant": [{"actor": {"reference": "Schedule/D001"}, "status": "declined"}]}
    r = gate.request("POST", "/Appointment/$book", params(("appointment-resource", {"resource": cancel})))
    assert r.status == 202, r.json  # SRM^S04 queued, the HIS has not answered yet
    assert [m.type for m in gate.chamber.read().messages(direction="outbound")][0] == "SRM^cancel"
    # a proposed appointment without a patient cannot be booked
    outcome(gate.request("POST", "/Appointment/$book", params(("appointment-reference", ref(f"Appointment/proposed-{SID[4]}")))),
            422, "required")


# -- ITI-118 style search and the CapabilityStatement ----------------------------------------------------------

def test_appointment_search_by_patient_identifier_and_date_sees_only_its_own(gate):
    mine = gate.request("POST", "/Appointment", appointment(SID[5]))
    other_patient = appointment(SID[6])
    other_patient["contained"][0]["identifier"][0]["value"] = "MRN-2"
    gate.request("POST", "/Appointment", other_patient)
    theirs = gate.request("POST", "/Appointment", appointment(SID[7]), platform="other")

    def found(query, platform="demo"):
        r = gate.request("GET", f"/Appointment?{query}", platform=platform)
        assert r.status == 200, r.json
        return {a["id"] for a in entries(r)}

    assert found("patient=urn:id-card|11010519491231002X") == {mine.json["id"]}
    assert found("patient:identifier=11010519491231002X") == {mine.json["id"]}
    assert found("patient=urn:other|11010519491231002X") == set()
    assert found("patient=urn:id-card|11010519491231002X", "other") == {theirs.json["id"]}
    second = found("patient=MRN-2")
    assert len(second) == 1
    assert found("date=2030-01-07") == {mine.json["id"]} | second
    assert found("date=2030-01-08") == set()
    assert found("date=ge2030-01-07T09:20:00%2B08:00") == second  # SID[5] starts 09:15, SID[6] 09:30
    assert found("date=ge2030-01-07&date=lt2030-01-07T09:20:00%2B08:00&patient=MRN-2,11010519491231002X") == \
        {mine.json["id"]}
    assert gate.request("GET", "/Appointment?date=yesterday").status == 400
    assert gate.request("GET", "/Appointment?patient=").status == 400


def test_capability_statement_declares_the_ihe_operations(gate):
    cs = gate.request("GET", "/metadata").json
    CapabilityStatement.model_validate(cs)
    appt = next(r for r in cs["rest"][0]["resource"] if r["type"] == "Appointment")
    assert {(o["name"], o["definition"]) for o in appt["operation"]} == {
        ("find", "https://profiles.ihe.net/ITI/Scheduling/OperationDefinition/appointment-find"),
        ("hold", "https://profiles.ihe.net/ITI/Scheduling/OperationDefinition/appointment-hold"),
        ("book", "https://profiles.ihe.net/ITI/Scheduling/OperationDefinition/appointment-book")}
    assert {"patient", "date"} <= {p["name"] for p in appt["searchParam"]}


# -- rescheduling through $book (cancel + new) -----------------------------------------------------------------

def answer(gate, appointment_id, kind, code="AA"):
    message = next(m for m in gate.chamber.read().messages(direction="outbound")
                   if m.subject == f"appointment:{appointment_id}" and m.type == kind and m.state == "committed")
    gate.chamber.transact_now(lambda tx: gate.booking.on_answer(tx, tx.message(message.id),
                                                                HisAnswer(code, "", f"H-{appointment_id}")))


def test_book_with_another_slot_moves_a_booked_appointment_cancel_then_new(gate):
    old = gate.request("POST", "/Appointment", appointment(SID[1])).json["id"]
    answer(gate, old, "SRM^S01")
    moved = dict(appointment(SID[2]), id=old, status="booked")
    r = gate.request("POST", "/Appointment/$book", params(("appointment-resource", {"resource": moved})))
    assert r.status == 202, r.json
    new = entries(r)[0]["id"]
    assert new != old and entries(r)[0]["slot"][0]["reference"] == f"Slot/{SID[2]}"
    assert gate.chamber.read().appointment(old).pending_change == "reschedule"
    # moving it again while it moves is refused
    outcome(gate.request("POST", "/Appointment/$book", params(("appointment-resource", {"resource": dict(
        moved, slot=[{"reference": f"Slot/{SID[3]}"}])}))), 409, "conflict")
    answer(gate, new, "SRM^S01")  # the HIS books the new slot: the old one is cancelled at the HIS
    assert gate.chamber.read().appointment(new).status == "booked"
    assert gate.chamber.read().appointment(old).pending_change == "cancel"
    answer(gate, old, "SRM^cancel")
    old_row = gate.chamber.read().appointment(old)
    assert old_row.status == "cancelled" and old_row.outcome == f"rescheduled to {new}"
    assert slot_status(gate.chamber.read().slot(SID[1])) == "free"
    assert slot_status(gate.chamber.read().slot(SID[2])) == "busy"
    assert verify(gate.chamber.read()).ok


def test_a_refused_reschedule_leaves_the_old_booking_as_it_was(gate):
    old = gate.request("POST", "/Appointment", appointment(SID[4])).json["id"]
    answer(gate, old, "SRM^S01")
    moved = dict(appointment(SID[5]), id=old, status="booked")
    new = entries(gate.request("POST", "/Appointment/$book", params(("appointment-resource", {"resource": moved}))))[0]["id"]
    answer(gate, new, "SRM^S01", code="AR")
    row = gate.chamber.read().appointment(old)
    assert row.status == "booked" and row.pending_change is None and "not rescheduled" in row.outcome
    assert slot_status(gate.chamber.read().slot(SID[5])) == "free"
    assert not [m for m in gate.chamber.read().messages(direction="outbound") if m.type == "SRM^cancel"]
    # a held (not booked) appointment cannot be moved; an unknown slot is 422
    held = entries(gate.request("POST", "/Appointment/$hold", params(("appointment-reference",
                                                                       ref(f"Appointment/proposed-{SID[6]}")))))[0]
    outcome(gate.request("POST", "/Appointment/$book", params(("appointment-resource", {"resource": dict(
        appointment(SID[7]), id=held["id"], status="pending")}))), 422, "business-rule")
    outcome(gate.request("POST", "/Appointment/$book", params(("appointment-resource", {"resource": dict(
        appointment("D001-209901010800"), id=old, status="booked")}))), 422, "not-found")


def _his_frees(gate, index, his_appointment):
    """The HIS's SIU^S15 for slot SID[index] (pushed on its own connection, in any order with its answers)."""
    from datetime import timedelta

    from gateway.domain.slot_book import SlotBook
    from gateway.domain.model import SlotNotice
    from tests.unit.outer_gate import DAY, SCHEDULE, TZ
    notice = SlotNotice("free", SCHEDULE, DAY + timedelta(minutes=15 * index), 15, "card", "x", his_appointment)
    gate.chamber.transact_now(lambda tx: SlotBook(TZ).apply(tx, [notice]))


@pytest.mark.parametrize("siu_first", [True, False], ids=["siu-then-ack", "ack-then-siu"])
def test_the_his_confirming_a_rescheduled_cancel_by_siu_keeps_the_gateways_reason(gate, siu_first):
    """The old booking's cancellation is the gateway's (rescheduled): the HIS's SIU^S15 for the old slot and its
    SRR^S04 may reach the gateway in either order; either way the old appointment ends cancelled with the
    reason the gateway gave, once (one cancel.settled), and the old slot is free."""
    old = gate.request("POST", "/Appointment", appointment(SID[1])).json["id"]
    answer(gate, old, "SRM^S01")
    moved = dict(appointment(SID[2]), id=old, status="booked")
    new = entries(gate.request("POST", "/Appointment/$book", params(("appointment-resource", {"resource": moved}))))[0]["id"]
    answer(gate, new, "SRM^S01")
    if siu_first:
        _his_frees(gate, 1, f"H-{old}")
        row = gate.chamber.read().appointment(old)
        assert (row.status, row.outcome) == ("cancelled", f"rescheduled to {new}")
        answer(gate, old, "SRM^cancel")
    else:
        answer(gate, old, "SRM^cancel")
        _his_frees(gate, 1, f"H-{old}")
    row = gate.chamber.read().appointment(old)
    assert (row.status, row.pending_change, row.outcome) == ("cancelled", None, f"rescheduled to {new}")
    assert slot_status(gate.chamber.read().slot(SID[1])) == "free"
    settled = [a for a in gate.audit() if a.action == "cancel.settled" and a.resource_id == old]
    assert [a.outcome for a in settled] == [200]
    assert verify(gate.chamber.read()).ok


def _encode(gate, appointment_id, kind):
    """What the inner gate does before the first send: the HL7 bytes of the appointment's ``kind`` intent."""
    from adapters.hl7.er7 import parse

    message = next(m for m in gate.chamber.read().messages(direction="outbound")
                   if m.subject == f"appointment:{appointment_id}" and m.type == kind and m.state == "committed")

    def work(tx):
        body, type_, charset = gate.booking.encode(tx, tx.message(message.id))
        tx.set_encoded(message.id, body, type_, charset, state="committed")
        return parse(body)

    return gate.chamber.transact_now(work)


def delivered(gate, appointment_id, code="AA"):
    """The relay's record of the HIS's answer to the appointment's encoded SRM^S01: state and answer, then
    BookingService.on_answer, in one transaction."""
    message = next(m for m in gate.chamber.read().messages(direction="outbound")
                   if m.subject == f"appointment:{appointment_id}" and m.type == "SRM^S01" and m.state == "committed")

    def record(tx):
        tx.set_message_state(message.id, "delivered" if code == "AA" else "refused", attempts=1, answer_code=code)
        gate.booking.on_answer(tx, tx.message(message.id), HisAnswer(code, "", f"H-{appointment_id}"))

    gate.chamber.transact_now(record)


def hold_at_his(gate, sid):
    gate.booking.hold_at_his = True
    r = gate.request("POST", "/Appointment/$hold", params(("appointment-reference", ref(f"Appointment/proposed-{sid}"))))
    assert r.status == 202, r.json  # the HIS has not answered (answer_within passed)
    held = entries(r)[0]
    srm = _encode(gate, held["id"], "SRM^hold")
    assert srm.type_name.startswith("SRM^S01") and srm.segment("ARQ").get(8) == "Tentative"
    return held["id"]


def test_a_hold_told_to_the_his_is_confirmed_by_book(gate):
    """outer.hold_at_his: $hold queues SRM^S01 with ARQ-8 Tentative and answers 202 until the HIS answers, then
    200; $book before that is 409; after it, the ordinary SRM^S01 (no ARQ-8) confirms it; no cancel is sent."""
    held = hold_at_his(gate, SID[0])
    outcome(gate.request("POST", "/Appointment/$book", params(("appointment-reference", ref(f"Appointment/{held}")),
                                                              ("patient-resource", {"resource": PATIENT}))),
            409, "conflict")
    delivered(gate, held)  # the HIS holds it tentatively
    again = gate.request("POST", "/Appointment/$hold", params(("appointment-reference", ref(f"Appointment/{held}"))))
    assert again.status == 200 and entries(again)[0]["extension"][0]["url"] == "urn:gatewayd:appointment:hold-expires"
    assert gate.chamber.read().appointment(held).his_appointment == f"H-{held}"
    r = gate.request("POST", "/Appointment/$book", params(("appointment-reference", ref(f"Appointment/{held}")),
                                                          ("patient-resource", {"resource": PATIENT})))
    assert r.status == 202, r.json
    assert _encode(gate, held, "SRM^S01").segment("ARQ").get(8) == ""
    answer(gate, held, "SRM^S01")
    assert gate.chamber.read().appointment(held).status == "booked"
    assert not [m for m in gate.chamber.read().messages(direction="outbound") if m.type == "SRM^cancel"]


def test_a_refused_confirmation_of_a_hold_told_to_the_his_releases_the_hold_there(gate):
    """The HIS took the tentative SRM^S01, then refuses the ordinary one: the appointment is refused and the
    tentative booking is cancelled at the HIS (naming its appointment id)."""
    held = hold_at_his(gate, SID[0])
    delivered(gate, held)
    r = gate.request("POST", "/Appointment/$book", params(("appointment-reference", ref(f"Appointment/{held}")),
                                                          ("patient-resource", {"resource": PATIENT})))
    assert r.status == 202, r.json
    _encode(gate, held, "SRM^S01")
    delivered(gate, held, "AR")
    assert gate.chamber.read().appointment(held).status == "refused"
    assert _encode(gate, held, "SRM^cancel").segment("ARQ").get(2) == f"H-{held}"


def test_a_hold_told_to_the_his_is_released_there_when_it_expires_or_is_refused(gate):
    """The expiry of a hold the HIS took queues the cancel naming the HIS's appointment (audited as released
    at the HIS); a hold the HIS refuses is released at once and is no longer held (409)."""
    held = hold_at_his(gate, SID[0])
    delivered(gate, held)
    gate.clock.advance(301)
    assert gate.chamber.read().appointment(held).status == "cancelled"
    cancel = _encode(gate, held, "SRM^cancel")
    assert cancel.type_name.startswith("SRM^S04") and cancel.segment("ARQ").get(2) == f"H-{held}"
    assert slot_status(gate.chamber.read().slot(SID[0])) == "free"
    assert any("released at the HIS" in (a.detail or "") for a in gate.audit() if a.resource_id == held)

    refused = hold_at_his(gate, SID[1])
    delivered(gate, refused, "AR")
    row = gate.chamber.read().appointment(refused)
    assert row.status == "refused" and "refused the hold" in row.outcome
    assert slot_status(gate.chamber.read().slot(SID[1])) == "free"
    outcome(gate.request("POST", "/Appointment/$hold", params(("appointment-reference", ref(f"Appointment/{refused}")))),
            409, "conflict")
    assert [m.type for m in gate.chamber.read().messages(direction="outbound") if m.type.startswith("SRM^S04")] == ["SRM^S04"]


def _move_with_s03(gate):
    """Book SID[1] (accepted as H-<id>), then $book it to SID[2] at a HIS that moves bookings with SRM^S03."""
    from dataclasses import replace

    gate.booking.his = replace(gate.booking.his, move_trigger="S03")  # the HIS endpoint (inner.his) moves
    gate.booking.links[gate.booking.his.peer] = gate.booking.his
    old = gate.request("POST", "/Appointment", appointment(SID[1])).json["id"]
    answer(gate, old, "SRM^S01")
    moved = dict(appointment(SID[2]), id=old, status="booked")
    new = entries(gate.request("POST", "/Appointment/$book", params(("appointment-resource", {"resource": moved}))))[0]["id"]
    srm = _encode(gate, new, "SRM^S01")
    arq = srm.segment("ARQ")
    assert srm.type_name.startswith("SRM^S03") and (arq.get(1), arq.get(2), arq.get(11)) == (old, f"H-{old}", "203001070830")
    return old, new


@pytest.mark.parametrize("siu_first", [True, False], ids=["siu-then-srr", "srr-then-siu"])
def test_a_his_that_moves_bookings_with_s03_gets_one_message_and_no_cancel(gate, siu_first):
    """inner.his.reschedule_message SRM^S03: the move is one SRM^S03 naming the old booking (ARQ-1 its placer
    id, ARQ-2 the HIS's id) with the new slot; its AA books the new appointment and cancels the old one
    ("rescheduled to <new>", its slot free) with no cancel sent; the HIS's SIU^S13, before or after the SRR,
    does not make it the hospital's rescheduling."""
    from tests.unit.outer_gate import DAY, SCHEDULE, TZ

    from datetime import timedelta

    from gateway.domain.slot_book import SlotBook
    from gateway.domain.model import SlotNotice

    old, new = _move_with_s03(gate)
    s13 = SlotNotice("reschedule", SCHEDULE, DAY + timedelta(minutes=30), 15, "card", "x", f"H-{old}")
    if siu_first:
        gate.chamber.transact_now(lambda tx: SlotBook(TZ).apply(tx, [s13]))
        row = gate.chamber.read().appointment(old)
        assert (row.status, row.pending_change, row.slot_id) == ("booked", "reschedule", SID[1])
    answer(gate, new, "SRM^S03")
    if not siu_first:
        gate.chamber.transact_now(lambda tx: SlotBook(TZ).apply(tx, [s13]))
    old_row, new_row = gate.chamber.read().appointment(old), gate.chamber.read().appointment(new)
    assert (old_row.status, old_row.pending_change, old_row.outcome) == ("cancelled", None, f"rescheduled to {new}")
    assert new_row.status == "booked"
    assert slot_status(gate.chamber.read().slot(SID[1])) == "free"
    assert slot_status(gate.chamber.read().slot(SID[2])) == "busy"
    assert not [m for m in gate.chamber.read().messages(direction="outbound") if m.type in ("SRM^cancel", "SRM^S04")]
    assert verify(gate.chamber.read()).ok


def test_a_refused_s03_move_leaves_the_old_booking_and_a_move_is_never_undone_by_a_cancel(gate):
    """AR to the SRM^S03: the old booking stays as it was.  A move whose hold expires after an attempt is
    withdrawn without any cancel (a cancel would cancel the patient's booking at the HIS)."""
    old, new = _move_with_s03(gate)
    answer(gate, new, "SRM^S03", code="AR")
    row = gate.chamber.read().appointment(old)
    assert (row.status, row.pending_change) == ("booked", None) and "not rescheduled" in row.outcome

    moved = dict(appointment(SID[3]), id=old, status="booked")
    again = entries(gate.request("POST", "/Appointment/$book", params(("appointment-resource", {"resource": moved}))))[0]["id"]
    srm = next(m for m in gate.chamber.read().messages(direction="outbound") if m.subject == f"appointment:{again}")
    gate.chamber.transact_now(lambda tx: (tx.set_encoded(srm.id, *gate.booking.encode(tx, tx.message(srm.id)),
                                                         state="committed"),
                                          tx.set_message_state(srm.id, "retrying", attempts=1)))
    gate.clock.advance(301)
    assert gate.chamber.read().appointment(again).status == "cancelled"
    assert [m.state for m in gate.chamber.read().messages(direction="outbound")
            if m.subject == f"appointment:{again}"] == ["withdrawn"]
    assert gate.chamber.read().appointment(old).status == "booked"


def test_a_his_cannot_both_cancel_and_move_with_s03(tmp_path):
    from gateway.config.model import load_config
    from gateway.config.errors import ConfigError

    path = tmp_path / "g.yaml"
    path.write_text("inner:\n  his:\n    host: 127.0.0.1\n    port: 2576\n    cancel_message: SRM^S03\n"
                    "    reschedule_message: SRM^S03\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert [(i.line, i.key) for i in e.value.issues] == [(6, "inner.his.reschedule_message")]
