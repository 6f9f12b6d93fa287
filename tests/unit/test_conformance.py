"""The conformance check the end-to-end suite runs over every FHIR answer (tests/conformance: HL7's FHIR R4 JSON
schema, not the gateway's own models) can fail: it refuses what R4 does not allow, in a resource and inside a
Bundle's entries, and passes what the gateway serves."""

from tests.conformance import problems
from tests.unit.outer_gate import SID, appointment


def test_invalid_resources_are_named_with_where_they_fail():
    assert "status" in problems({"resourceType": "Appointment", "status": "bogus", "participant": [
        {"status": "accepted", "actor": {"reference": "Schedule/x"}}]})[0]
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": {
        "resourceType": "Slot", "status": "nope", "schedule": {"reference": "Schedule/x"},
        "start": "2030-01-01T08:00:00+08:00", "end": "2030-01-01T08:15:00+08:00"}}]}
    assert problems(bundle) and "entry/0/resource/Slot/status" in problems(bundle)[0]
    assert problems({"resourceType": "NoSuchThing"})


def test_what_the_gateway_answers_passes(gate):
    appointment_id = gate.request("POST", "/Appointment", appointment(SID[1])).json["id"]
    for path in ["/metadata", "/Slot", f"/Slot/{SID[1]}", "/Schedule", "/Appointment", f"/Appointment/{appointment_id}",
                 f"/Appointment/{appointment_id}/_history", "/Slot?_summary=count", "/$versions", "/Slot/nope",
                 "/Practitioner/D001", "/PractitionerRole", "/HealthcareService/CARD", "/Location",
                 "/Slot?_include=Slot:schedule"]:
        assert problems(gate.request("GET", path).json) == [], path


def test_a_refusal_never_echoes_text_a_fhir_string_may_not_hold(gate):
    """Found by the check in the end-to-end suite: a parameter named with a form feed or NEL was echoed into
    diagnostics and expression, which FHIR strings may not hold."""
    r = gate.request("GET", "/Schedule?%0C%C2%85x=1&=2")
    assert r.status == 400 and problems(r.json) == [], r.json
    assert "\\u000c" in r.json["issue"][0]["diagnostics"]


def test_a_slot_without_service_text_or_code_is_served_without_empty_strings():
    """Found by the check in the end-to-end suite (a HIS of kind webservice publishing slots with no service
    name): the Slot, the Appointment on it and a $find proposal carried ``"display": ""`` and ``"text": ""``,
    which R4 forbids (a string has at least one character). Empty parts are left out, and with neither code nor
    text there is no serviceType."""
    from zoneinfo import ZoneInfo

    from adapters.maps.fhir_scheduling import SERVICE_SYSTEM, slot_resource
    from gateway.chamber.rows import SlotRow

    tz = ZoneInfo("Asia/Shanghai")
    for code, text, expected in (("card", "", [{"coding": [{"system": SERVICE_SYSTEM, "code": "card"}]}]),
                                 ("", "", None), ("", "心内科", [{"text": "心内科"}])):
        row = SlotRow("S1", "D001", "203001070800", 1.9e9, 1.9e9 + 900, 15, code, text, "free", None, None, None, 0)
        resource = slot_resource(row, tz)
        assert problems(resource) == [], (code, text, problems(resource))
        assert resource.get("serviceType") == expected, (code, text)
