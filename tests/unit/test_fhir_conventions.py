"""The FHIR conventions platforms' clients rely on (issue 17), on the in-process outer gate
(tests/unit/outer_gate.py: a real chamber file, a task.Clock, DummyRequests with real client certificates):
what the gateway does not honour is refused, never dropped; versions are checked; searches count and page
exactly.  Each test names the finding it holds."""

import pytest

from gateway.domain.model import HisAnswer
from tests.unit.outer_gate import SID, appointment, entries, outcome


def booked(gate, index):
    """An appointment on SID[index] the HIS has booked (version 2): its id."""
    appointment_id = gate.request("POST", "/Appointment", appointment(SID[index])).json["id"]
    srm = next(m for m in gate.chamber.read().messages(direction="outbound")
               if m.subject == f"appointment:{appointment_id}" and m.type == "SRM^S01")
    gate.chamber.transact_now(lambda tx: gate.booking.on_answer(tx, tx.message(srm.id), HisAnswer("AA", "", "H1")))
    assert gate.chamber.read().appointment(appointment_id).status == "booked"
    return appointment_id


def cancel_put(gate, appointment_id, headers=None, **changes):
    resource = gate.request("GET", f"/Appointment/{appointment_id}").json
    resource.update(status="cancelled", **changes)
    return gate.request("PUT", f"/Appointment/{appointment_id}", resource, headers=headers)


# -- finding 2: a query on POST is refused, not ignored -------------------------------------------------------

def test_a_post_with_search_parameters_is_refused_and_books_nothing(gate):
    """fhirpy's get_or_create sends ``POST /Appointment?identifier=sys|val``: it booked a second slot, the
    query dropped.  Now 400 naming the parameter (conditional create is If-None-Exist), and nothing held."""
    r = gate.request("POST", "/Appointment?identifier=urn:x|1", appointment(SID[1]))
    assert "identifier" in outcome(r, 400, "not-supported")
    assert "If-None-Exist" in r.json["issue"][0]["diagnostics"]
    assert gate.chamber.read().appointments_for("demo") == []


@pytest.mark.parametrize("method, path", [("PUT", "/Appointment/x?status=cancelled"),
                                          ("PATCH", "/Appointment/x?foo=1"),
                                          ("POST", "/Appointment/$hold?slot=1")])
def test_any_query_on_a_write_is_refused(gate, method, path):
    assert outcome(gate.request(method, path, {}), 400, "not-supported")


# -- finding 3: If-Match ----------------------------------------------------------------------------------------

def test_if_match_on_an_older_version_is_412_and_changes_nothing(gate):
    appointment_id = booked(gate, 1)
    r = cancel_put(gate, appointment_id, headers={"If-Match": 'W/"1"'})
    assert "version 2" in outcome(r, 412, "conflict")
    assert gate.chamber.read().appointment(appointment_id).status == "booked"
    assert [m.type for m in gate.chamber.read().messages(direction="outbound")] == ["SRM^S01"]


def test_if_match_on_the_current_version_cancels(gate):
    appointment_id = booked(gate, 1)
    assert cancel_put(gate, appointment_id, headers={"If-Match": 'W/"2"'}).status == 202
    assert gate.chamber.read().appointment(appointment_id).pending_change == "cancel"


def test_if_match_applies_to_patch_and_a_malformed_one_is_400(gate):
    appointment_id = booked(gate, 1)
    patch = [{"op": "replace", "path": "/status", "value": "cancelled"}]
    stale = gate.request("PATCH", f"/Appointment/{appointment_id}", patch,
                         headers={"Content-Type": "application/json-patch+json", "If-Match": '"1"'})
    assert outcome(stale, 412, "conflict")
    bad = gate.request("PATCH", f"/Appointment/{appointment_id}", patch,
                       headers={"Content-Type": "application/json-patch+json", "If-Match": "two"})
    assert outcome(bad, 400, "invalid")
    assert gate.chamber.read().appointment(appointment_id).pending_change is None


# -- finding 4: a PUT changes only the status, and says so --------------------------------------------------------

@pytest.mark.parametrize("element, value", [
    ("start", "2030-01-07T09:00:00+08:00"),
    ("end", "2030-01-07T09:30:00+08:00"),
    ("comment", "please call first"),
    ("description", "another"),
    ("slot", [{"reference": f"Slot/{SID[3]}"}]),
])
def test_a_put_that_changes_what_cannot_change_is_422_naming_it(gate, element, value):
    appointment_id = booked(gate, 1)
    r = cancel_put(gate, appointment_id, **{element: value})
    assert f"Appointment.{element}" in outcome(r, 422, "business-rule")
    assert r.json["issue"][0]["expression"] == [f"Appointment.{element}"]
    row = gate.chamber.read().appointment(appointment_id)
    assert row.status == "booked" and row.pending_change is None


def test_a_put_that_changes_the_patient_is_422(gate):
    appointment_id = booked(gate, 1)
    resource = gate.request("GET", f"/Appointment/{appointment_id}").json
    resource["contained"][0]["identifier"][0]["value"] = "110105194912310049"
    r = gate.request("PUT", f"/Appointment/{appointment_id}", resource)
    assert "Appointment.contained" in outcome(r, 422, "business-rule")
    # a PUT of the same status that changes something else is no silent 200 either
    resource = gate.request("GET", f"/Appointment/{appointment_id}").json
    resource["comment"] = "x"
    assert outcome(gate.request("PUT", f"/Appointment/{appointment_id}", resource), 422, "business-rule")


def test_a_put_of_the_resource_as_read_with_status_cancelled_cancels(gate):
    """What a client does: read, set status (and the participants' status), put back."""
    appointment_id = booked(gate, 1)
    resource = gate.request("GET", f"/Appointment/{appointment_id}").json
    resource["status"] = "cancelled"
    for p in resource["participant"]:
        p["status"] = "declined"
    del resource["meta"]
    assert gate.request("PUT", f"/Appointment/{appointment_id}", resource).status == 202


# -- finding 5: patches ---------------------------------------------------------------------------------------------

def fhirpath_patch(*operations):
    return {"resourceType": "Parameters", "parameter": [
        {"name": "operation", "part": [{"name": k, **v} for k, v in op]} for op in operations]}


def test_a_fhirpath_patch_of_the_status_cancels(gate):
    appointment_id = booked(gate, 1)
    body = fhirpath_patch([("type", {"valueCode": "replace"}), ("path", {"valueString": "Appointment.status"}),
                           ("value", {"valueCode": "cancelled"})])
    r = gate.request("PATCH", f"/Appointment/{appointment_id}", body)
    assert r.status == 202 and r.json["resourceType"] == "Appointment"


def test_a_fhirpath_patch_of_anything_else_is_422_naming_it(gate):
    appointment_id = booked(gate, 1)
    body = fhirpath_patch([("type", {"valueCode": "replace"}), ("path", {"valueString": "Appointment.status"}),
                           ("value", {"valueCode": "cancelled"})],
                          [("type", {"valueCode": "add"}), ("path", {"valueString": "Appointment"}),
                           ("name", {"valueString": "comment"}), ("value", {"valueString": "x"})])
    r = gate.request("PATCH", f"/Appointment/{appointment_id}", body)
    diagnostics = outcome(r, 422, "business-rule")
    assert "Appointment.comment" in diagnostics and "required" not in diagnostics
    assert gate.chamber.read().appointment(appointment_id).pending_change is None


def test_a_json_patch_with_another_operation_beside_the_status_is_refused(gate):
    appointment_id = booked(gate, 1)
    patch = [{"op": "replace", "path": "/status", "value": "cancelled"},
             {"op": "add", "path": "/comment", "value": "x"}]
    r = gate.request("PATCH", f"/Appointment/{appointment_id}", patch,
                     headers={"Content-Type": "application/json-patch+json"})
    assert "/comment" in outcome(r, 422, "business-rule")
    assert gate.chamber.read().appointment(appointment_id).pending_change is None


def test_a_422_carries_its_reason_phrase(gate):
    r = gate.request("POST", "/Appointment", dict(appointment(SID[1]), status="cancelled"))
    assert r.status == 422 and r.reason == b"Unprocessable Content"


# -- finding 1 and 7: searches count and page exactly -------------------------------------------------------------

def follow(gate, response):
    """The ids of every entry of a searchset and of the pages its next links lead to, and every page's total."""
    ids, totals = [], []
    while True:
        assert response.status == 200, response.json
        ids += [e["id"] for e in entries(response)]
        totals.append(response.json.get("total"))
        nxt = [link["url"] for link in response.json["link"] if link["relation"] == "next"]
        if not nxt:
            return ids, totals
        response = gate.request("GET", nxt[0][len("https://gw.example/fhir"):], platform="other")


def book_as_other(gate, indexes):
    return [gate.request("POST", "/Appointment", appointment(SID[i]), platform="other").json["id"] for i in indexes]


def test_appointment_search_pages_with_total_and_next_links(gate):
    """Finding 1: _count=2 with 4 on record answered total 2 and no next link."""
    made = book_as_other(gate, [0, 1, 2, 3])
    ids, totals = follow(gate, gate.request("GET", "/Appointment?_count=2", platform="other"))
    assert sorted(ids) == sorted(made) and len(ids) == 4
    assert totals == [4, 4]


def test_appointment_search_honours_offset_and_count_zero(gate):
    book_as_other(gate, [0, 1, 2, 3])
    r = gate.request("GET", "/Appointment?_count=2&_offset=3", platform="other")
    assert r.json["total"] == 4 and len(entries(r)) == 1
    r = gate.request("GET", "/Appointment?_count=0", platform="other")  # fhirpy's .count()
    assert r.json["total"] == 4 and entries(r) == []
    r = gate.request("GET", "/Appointment?_summary=count", platform="other")
    assert r.json["total"] == 4 and entries(r) == []


def test_appointment_search_filters_before_paging(gate):
    made = book_as_other(gate, [0, 1, 2, 3])
    gate.request("PUT", f"/Appointment/{made[1]}", dict(gate.request(
        "GET", f"/Appointment/{made[1]}", platform="other").json, status="cancelled"), platform="other")
    r = gate.request("GET", "/Appointment?status=pending&_count=1", platform="other")
    ids, totals = follow(gate, r)
    assert sorted(ids) == sorted([made[0], made[2], made[3]]) and totals == [3, 3, 3]
    assert follow(gate, gate.request("GET", f"/Appointment?_id={made[2]},{made[3]}", platform="other"))[0] \
        in ([made[2], made[3]], [made[3], made[2]])


def test_appointment_search_sorts_by_date(gate):
    made = book_as_other(gate, [2, 0, 3, 1])
    by_start = [made[1], made[3], made[0], made[2]]
    assert follow(gate, gate.request("GET", "/Appointment?_sort=date", platform="other"))[0] == by_start
    assert follow(gate, gate.request("GET", "/Appointment?_sort=-date", platform="other"))[0] == by_start[::-1]
    assert outcome(gate.request("GET", "/Appointment?_sort=status", platform="other"), 400, "not-supported")


def test_a_patient_reference_is_refused_not_matched_against_nothing(gate):
    """Finding 9: patient=Patient/123 silently found nothing (the gateway keeps no Patient resources)."""
    r = gate.request("GET", "/Appointment?patient=Patient/123", platform="other")
    assert "patient:identifier" in outcome(r, 400, "not-supported")


def test_slot_search_pages_carry_the_total(gate):
    ids, totals = follow(gate, gate.request("GET", "/Slot?_count=3", platform="other"))
    assert ids == SID and totals == [8, 8, 8]
    r = gate.request("GET", "/Slot?_summary=count", platform="other")
    assert r.json["total"] == 8 and entries(r) == []


def test_total_none_estimate_and_accurate_are_answered_and_others_refused(gate):
    for value in ("none", "estimate", "accurate"):
        assert gate.request("GET", f"/Slot?_total={value}", platform="other").json["total"] == 8
    assert outcome(gate.request("GET", "/Slot?_total=some", platform="other"), 400, "invalid")
    r = gate.request("GET", "/Slot?_count=0&_totalMethod=count", platform="other")  # fhirpy's .count()
    assert r.json["total"] == 8 and entries(r) == []
    assert outcome(gate.request("GET", "/Slot?_summary=text", platform="other"), 400, "not-supported")


def test_elements_subsets_the_entries_and_says_so(gate):
    r = gate.request("GET", "/Slot?_elements=status,start&_count=1", platform="other")
    [slot] = [e["resource"] for e in r.json["entry"]]  # (a subset need not hold the required elements)
    assert set(slot) == {"resourceType", "id", "meta", "status", "start"}
    assert {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"} \
        in slot["meta"]["tag"]
    assert outcome(gate.request("GET", "/Slot?_elements=st%20atus", platform="other"), 400, "invalid")


def test_slot_search_by_id_and_sorted_by_start(gate):
    r = gate.request("GET", f"/Slot?_id={SID[2]},{SID[5]}", platform="other")
    assert [s["id"] for s in entries(r)] == [SID[2], SID[5]] and r.json["total"] == 2
    r = gate.request("GET", "/Slot?_sort=-start", platform="other")
    assert [s["id"] for s in entries(r)] == SID[::-1]


# -- finding 13: a started slot is not listed as free ---------------------------------------------------------------

def test_slot_search_for_free_slots_leaves_out_those_already_started(gate):
    start = gate.chamber.read().slot(SID[2]).start_ts
    gate.clock.advance(start - gate.clock.seconds())  # SID[2] starts now
    r = gate.request("GET", "/Slot?status=free", platform="other")
    assert [s["id"] for s in entries(r)] == SID[3:] and r.json["total"] == 5


# -- finding 6: Location, Prefer, formats, HEAD, If-None-Match; _history ---------------------------------------

def test_location_names_the_version_and_vread_serves_it(gate):
    appointment_id = booked(gate, 1)
    r = gate.request("POST", "/Appointment", appointment(SID[2]), platform="other")
    assert r.status == 202 and r.headers["location"] == f"https://gw.example/fhir/Appointment/{r.json['id']}"
    read = gate.request("GET", f"/Appointment/{appointment_id}/_history/2")
    assert read.status == 200 and read.json["meta"]["versionId"] == "2" and read.headers["etag"] == 'W/"2"'
    assert read.json["status"] == "booked"
    history = gate.request("GET", f"/Appointment/{appointment_id}/_history")
    assert history.json["type"] == "history" and history.json["total"] == 2
    assert history.json["entry"][0]["fullUrl"] == f"https://gw.example/fhir/Appointment/{appointment_id}"


def test_every_version_of_an_appointment_is_kept_and_read(gate):
    """vread of an earlier version gives that version as it was (the booking pending at the HIS, then booked,
    then cancelled); the instance history lists them all, newest first; a version never made is 404."""
    appointment_id = booked(gate, 1)
    cancel = gate.request("PATCH", f"/Appointment/{appointment_id}",
                          [{"op": "replace", "path": "/status", "value": "cancelled"}],
                          headers={"Content-Type": "application/json-patch+json"})
    assert cancel.status == 202, cancel.json  # the HIS is asked; its AA settles it
    srm = next(m for m in gate.chamber.read().messages(direction="outbound")
               if m.subject == f"appointment:{appointment_id}" and m.type != "SRM^S01")
    gate.chamber.transact_now(lambda tx: gate.booking.on_answer(tx, tx.message(srm.id), HisAnswer("AA", "", None)))
    current = gate.request("GET", f"/Appointment/{appointment_id}").json
    last = int(current["meta"]["versionId"])
    assert last >= 3
    statuses = {}
    for v in range(1, last + 1):
        r = gate.request("GET", f"/Appointment/{appointment_id}/_history/{v}")
        assert r.status == 200 and r.json["meta"]["versionId"] == str(v) and r.headers["etag"] == f'W/"{v}"'
        statuses[v] = r.json["status"]
    assert statuses[1] == "pending" and statuses[2] == "booked" and statuses[last] == "cancelled"
    history = gate.request("GET", f"/Appointment/{appointment_id}/_history").json
    assert history["total"] == last
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == [str(v) for v in range(last, 0, -1)]
    assert [e["request"]["method"] for e in history["entry"]][-1] == "POST"
    assert "no version 99" in outcome(gate.request("GET", f"/Appointment/{appointment_id}/_history/99"), 404,
                                      "not-found")


def test_a_location_of_a_settled_appointment_carries_its_version(gate):
    """(A 202's Location is the resource to poll: it will change.)  A conditional create's match is settled."""
    body = dict(appointment(SID[1]), identifier=[{"system": "urn:platform", "value": "42"}])
    appointment_id = gate.request("POST", "/Appointment", body).json["id"]
    r = gate.request("POST", "/Appointment", body, headers={"If-None-Exist": "identifier=urn:platform|42"})
    assert r.status == 200
    assert r.headers["location"] == f"https://gw.example/fhir/Appointment/{appointment_id}/_history/1"


def test_prefer_return_minimal_and_operation_outcome(gate):
    appointment_id = booked(gate, 1)
    minimal = gate.request("PATCH", f"/Appointment/{appointment_id}", {"status": "cancelled"},
                           headers={"Prefer": "return=minimal"})
    assert minimal.status == 202 and minimal.json is None and minimal.headers["etag"] == 'W/"3"'
    other = booked(gate, 3)
    oo = gate.request("PATCH", f"/Appointment/{other}", {"status": "cancelled"},
                      headers={"Prefer": "return=OperationOutcome"})
    assert oo.status == 202 and oo.json["resourceType"] == "OperationOutcome"
    assert oo.json["issue"][0]["severity"] == "information"
    assert outcome(gate.request("GET", "/Slot", headers={"Prefer": "return=everything"}), 400, "not-supported")


@pytest.mark.parametrize("path, headers", [
    ("/Slot?_format=xml", {}),
    ("/Slot?_format=application/fhir%2Bxml", {}),
    ("/Slot", {"Accept": "application/fhir+xml"}),
    ("/Slot", {"Accept": "text/html"}),
    ("/Slot", {"Accept": "application/fhir+json; fhirVersion=3.0"}),
    ("/metadata", {"Accept": "application/fhir+json; fhirVersion=5.0"}),
])
def test_what_cannot_be_served_is_406(gate, path, headers):
    assert outcome(gate.request("GET", path, headers=headers), 406, "not-supported")


@pytest.mark.parametrize("path, headers", [
    ("/Slot?_format=json", {}),
    ("/Slot?_format=application/fhir%2Bjson", {}),
    ("/Slot?_format=application/fhir+json", {}),
    ("/Slot", {"Accept": "application/fhir+xml;q=0.9, application/fhir+json"}),
    ("/Slot", {"Accept": "application/fhir+xml;q=1.0, application/json+fhir;q=0.9"}),  # (HAPI, DSTU2's name)
    ("/Slot", {"Accept": "*/*"}),
    ("/Slot", {"Accept": "application/json"}),
    ("/Slot", {"Accept": "application/fhir+json; fhirVersion=4.0"}),
])
def test_json_in_any_of_its_names_is_served(gate, path, headers):
    assert gate.request("GET", path, headers=headers).status == 200


def test_head_answers_like_get_without_a_body(gate):
    get = gate.request("GET", f"/Slot/{SID[1]}")
    head = gate.request("HEAD", f"/Slot/{SID[1]}")
    assert head.status == 200 and head.json is None
    assert head.headers["content-length"] == get.headers["content-length"] != "0"


def test_if_none_match_on_the_current_version_is_304(gate):
    appointment_id = booked(gate, 1)
    assert gate.request("GET", f"/Appointment/{appointment_id}", headers={"If-None-Match": 'W/"2"'}).status == 304
    assert gate.request("GET", f"/Appointment/{appointment_id}", headers={"If-None-Match": 'W/"1"'}).status == 200
    assert outcome(gate.request("POST", "/Appointment", appointment(SID[2]), headers={"If-None-Match": "*"}),
                   400, "not-supported")


# -- finding 10: R4 4.0.1 by default, R4B on request -----------------------------------------------------------------

def test_r4_is_served_by_default_and_r4b_on_request(gate):
    default = gate.request("GET", "/metadata")
    assert default.json["fhirVersion"] == "4.0.1"
    r4b = gate.request("GET", "/metadata", headers={"Accept": "application/fhir+json; fhirVersion=4.3"})
    assert r4b.json["fhirVersion"] == "4.3.0" and "fhirVersion=4.3" in r4b.headers["content-type"]
    versions = gate.request("GET", "/$versions")
    assert versions.json == {"resourceType": "Parameters", "parameter": [
        {"name": "version", "valueCode": "4.0"}, {"name": "version", "valueCode": "4.3"},
        {"name": "default", "valueCode": "4.0"}]}


def test_a_body_in_a_version_not_served_is_415(gate):
    r = gate.request("POST", "/Appointment", appointment(SID[1]),
                     headers={"Content-Type": "application/fhir+json; fhirVersion=5.0"})
    assert outcome(r, 415, "not-supported")


# -- finding 9: the CapabilityStatement says what the router serves ------------------------------------------------

SAMPLE = {"token": "x", "date": "ge2030-01-01", "reference": "Schedule/D001", "patient": "urn:id-card|1",
          "status": "free", "_lastUpdated": "gt2030-01-01T00:00:00Z"}
ROUTE_MISSING = ("not-supported",)


def interaction_request(gate, rtype, code, appointment_id):
    rid = {"Slot": SID[1], "Schedule": "D001", "Appointment": appointment_id, "Practitioner": "D001",
           "PractitionerRole": "D001.CARD", "HealthcareService": "CARD", "Location": "CARD"}[rtype]
    return {"read": ("GET", f"/{rtype}/{rid}", None), "search-type": ("GET", f"/{rtype}", None),
            "create": ("POST", f"/{rtype}", appointment(SID[5])),
            "update": ("PUT", f"/{rtype}/{rid}", None), "patch": ("PATCH", f"/{rtype}/{rid}", {"status": "booked"}),
            "vread": ("GET", f"/{rtype}/{rid}/_history/2", None),
            "history-instance": ("GET", f"/{rtype}/{rid}/_history", None),
            "history-type": ("GET", f"/{rtype}/_history?_since=2030-01-01", None)}[code]


def test_every_declared_interaction_and_search_parameter_is_served(gate):
    appointment_id = booked(gate, 1)
    cs = gate.request("GET", "/metadata").json
    resources = cs["rest"][0]["resource"]
    for resource in resources:
        rtype = resource["type"]
        for interaction in resource["interaction"]:
            method, path, body = interaction_request(gate, rtype, interaction["code"], appointment_id)
            if method == "PUT":
                body = dict(gate.request("GET", path).json, status="booked")
            r = gate.request(method, path, body)
            assert r.status not in (404, 405) or r.json["issue"][0]["code"] not in ROUTE_MISSING, (rtype, interaction)
            assert r.status < 400 or r.status == 409, (rtype, interaction, r.json)
        for param in resource["searchParam"]:
            value = SAMPLE.get(param["name"]) or SAMPLE[param["type"]]
            name = param["name"]
            r = gate.request("GET", f"/{rtype}?{name}={value}")
            assert r.status == 200, (rtype, name, r.json)
        for kind, values in (("_include", resource.get("searchInclude", [])),
                             ("_revinclude", resource.get("searchRevInclude", []))):
            for value in values:
                r = gate.request("GET", f"/{rtype}?{kind}={value}")
                assert r.status == 200 and any(e["search"]["mode"] == "include" for e in r.json["entry"]), value
        assert all(p["name"] not in ("_count", "_offset", "_sort") for p in resource["searchParam"])


def test_what_the_router_serves_is_declared_and_nothing_else(gate):
    from adapters.outer.scheduling import RESOURCE_TYPES

    cs = gate.request("GET", "/metadata").json
    declared = {r["type"]: r for r in cs["rest"][0]["resource"]}
    assert set(declared) == set(RESOURCE_TYPES)  # (this gate serves no prescriptions)
    for rtype, resource in declared.items():
        codes = {i["code"] for i in resource["interaction"]}
        for code in {"read", "search-type", "create", "update", "patch", "vread", "history-instance",
                     "history-type"} - codes:
            method, path, body = interaction_request(gate, rtype, code, "x")
            r = gate.request(method, path, body if body is not None else {})
            assert r.status in (400, 404, 405), (rtype, code)  # not served
        r = gate.request("GET", f"/{rtype}?undeclared=1")
        assert outcome(r, 400, "not-supported")
    appt = declared["Appointment"]
    assert appt["conditionalCreate"] is True and appt["versioning"] == "versioned" and appt["readHistory"] is True
    assert next(p for p in appt["searchParam"] if p["name"] == "patient")["type"] == "reference"


def test_smart_is_declared_only_when_a_platform_can_get_a_token(gate):
    from types import SimpleNamespace

    security = gate.request("GET", "/metadata").json["rest"][0]["security"]
    assert "extension" not in security and len(security["service"]) == 1
    gate.api.gatekeeper.oauth = SimpleNamespace(token_url="https://gw.example/oauth/token", clients={})
    assert "extension" not in gate.request("GET", "/metadata").json["rest"][0]["security"]
    gate.api.gatekeeper.oauth.clients = {"demo": None}
    security = gate.request("GET", "/metadata").json["rest"][0]["security"]
    assert security["extension"][0]["extension"][0]["valueUri"] == "https://gw.example/oauth/token"


def test_metadata_is_public_but_presented_credentials_are_still_checked(gate):
    """With client_certificates: optional, /metadata was 401 for a client without credentials, while SMART
    discovery was public."""
    assert gate.request("GET", "/metadata", platform=None).status == 200
    assert gate.request("GET", "/$versions", platform=None).status == 200
    assert gate.request("GET", "/Slot", platform=None).status == 401
    assert outcome(gate.request("GET", "/metadata", platform="revoked"), 403, "security")


# -- finding 11: the patient's birth date and sex reach the HIS, and may be required ---------------------------------

def test_birth_date_and_gender_are_carried_to_pid_7_and_8(gate):
    from adapters.hl7.er7 import parse

    body = appointment(SID[1])
    body["contained"][0].update(birthDate="1990-01-02", gender="female")
    appointment_id = gate.request("POST", "/Appointment", body).json["id"]
    srm = next(m for m in gate.chamber.read().messages(direction="outbound") if m.type == "SRM^S01")
    pid = parse(gate.chamber.transact_now(lambda tx: gate.booking.encode(tx, tx.message(srm.id)))[0]).segment("PID")
    assert (pid.raw(7), pid.raw(8)) == ("19900102", "F")
    contained = gate.request("GET", f"/Appointment/{appointment_id}").json["contained"][0]
    assert (contained["birthDate"], contained["gender"]) == ("1990-01-02", "female")


def test_a_hospital_may_require_them_and_a_booking_without_is_422_naming_them(gate):
    from gateway.domain.patients import IdentifierRules

    gate.booking.patients = IdentifierRules(required=("birth_date", "gender"))
    r = gate.request("POST", "/Appointment", appointment(SID[1]))
    assert "birth date" in outcome(r, 422, "required")
    assert r.json["issue"][0]["expression"] == ["Patient.birthDate"]
    body = appointment(SID[1])
    body["contained"][0]["birthDate"] = "1990-01-02"
    r = gate.request("POST", "/Appointment", body)
    assert outcome(r, 422, "required") and r.json["issue"][0]["expression"] == ["Patient.gender"]
    assert gate.chamber.read().appointments_for("demo") == []
    body["contained"][0]["gender"] = "male"
    assert gate.request("POST", "/Appointment", body).status == 202


# -- finding 8: the doctors and departments the HIS publishes, and references to them ------------------------------

def test_the_directory_is_served_from_the_schedules(gate):
    assert gate.request("GET", "/Practitioner/D001").json["name"] == [{"text": "张伟"}]
    role = gate.request("GET", "/PractitionerRole/D001.CARD").json
    assert role["practitioner"]["reference"] == "Practitioner/D001"
    assert role["healthcareService"][0]["reference"] == "HealthcareService/CARD"
    assert gate.request("GET", "/HealthcareService/CARD").json["name"] == "心内科"
    assert gate.request("GET", "/Location/CARD").json["name"] == "心内科"
    assert outcome(gate.request("GET", "/Practitioner/nobody"), 404, "not-found")
    roles = entries(gate.request("GET", "/PractitionerRole?specialty=urn:gatewayd:his:department|CARD"))
    assert [r["id"] for r in roles] == ["D001.CARD"]
    assert entries(gate.request("GET", "/PractitionerRole?specialty=DERM")) == []
    for path in ("/Practitioner", "/PractitionerRole", "/HealthcareService", "/Location"):
        assert gate.request("PUT", path + "/x", {}).status == 405


def test_pick_a_department_then_a_doctor_then_a_time(gate):
    assert [s["id"] for s in entries(gate.request("GET", "/Schedule?actor=HealthcareService/CARD"))] == ["D001"]
    assert entries(gate.request("GET", "/Schedule?actor=Practitioner/nobody")) == []
    r = gate.request("GET", "/Slot?schedule.actor=Practitioner/D001&_count=2&_include=Slot:schedule")
    modes = [(e["resource"]["resourceType"], e["search"]["mode"]) for e in r.json["entry"]]
    assert modes == [("Slot", "match"), ("Slot", "match"), ("Schedule", "include")]
    assert r.json["total"] == 8
    assert gate.request("GET", "/Slot?schedule.actor=Location/ELSEWHERE").json["total"] == 0
    assert outcome(gate.request("GET", "/Slot?_include=Slot:*"), 400, "not-supported")


def test_participants_and_schedule_actors_refer_to_resources_r4_allows_there(gate):
    """participant.actor was Schedule/D001, which R4 does not allow there."""
    appointment_id = gate.request("POST", "/Appointment", appointment(SID[1])).json["id"]
    actors = [p["actor"] for p in gate.request("GET", f"/Appointment/{appointment_id}").json["participant"]]
    assert [a["reference"] for a in actors] == ["#patient", "Practitioner/D001", "HealthcareService/CARD"]
    for actor in actors[1:]:
        assert gate.request("GET", "/" + actor["reference"]).status == 200
    schedule = gate.request("GET", "/Schedule/D001").json
    assert [a["reference"] for a in schedule["actor"]] == ["Practitioner/D001", "HealthcareService/CARD"]


def test_directory_searches_include_and_revinclude_the_roles(gate):
    r = gate.request("GET", "/Practitioner?_revinclude=PractitionerRole:practitioner")
    assert [(e["resource"]["resourceType"], e["search"]["mode"]) for e in r.json["entry"]] == [
        ("Practitioner", "match"), ("PractitionerRole", "include")]
    r = gate.request("GET", "/PractitionerRole?_include=PractitionerRole:practitioner&_include=PractitionerRole:service")
    assert {e["resource"]["resourceType"] for e in r.json["entry"]} == {"PractitionerRole", "Practitioner",
                                                                        "HealthcareService"}
    assert outcome(gate.request("GET", "/Practitioner?_revinclude=Schedule:actor"), 400, "not-supported")


def test_pretty_is_honoured_not_dropped(gate):
    pretty = gate.request("GET", f"/Slot/{SID[1]}?_pretty=true")
    plain = gate.request("GET", f"/Slot/{SID[1]}")
    assert pretty.json == plain.json and int(pretty.headers["content-length"]) > int(plain.headers["content-length"])
    assert outcome(gate.request("GET", "/Slot?_pretty=yes"), 400, "invalid")
