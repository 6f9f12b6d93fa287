"""A booking's Appointment is read without building the fhir.resources model when it has the plain shape
(adapters/maps/fhir_scheduling.py, _plain_appointment).  What proves that this changes nothing: for
the bodies platforms send and for thousands of broken variants of them, booking_from_appointment gives
exactly what the model path (strict=True) gives — the same BookingRequest, or the same OperationOutcome
issues with the same HTTP status."""

import copy

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.maps.fhir_scheduling import (
    InvalidResource,
    _plain_appointment,
    booking_from_appointment,
    patient_from_resource,
)

CONTAINED = {
    "resourceType": "Appointment",
    "status": "proposed",
    "slot": [{"reference": "Slot/D001-203001070800"}],
    "contained": [{"resourceType": "Patient", "id": "p",
                   "identifier": [{"system": "urn:oid:2.16.840.1.113883.2.4.6.3", "value": "MRN-1",
                                   "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                                        "code": "MR"}]}},
                                  {"system": "urn:oid:1.2.156.112606.1.2.1.3.1", "value": "11010519491231002X"}],
                   "name": [{"family": "王", "given": ["芳", "小"]}],
                   "telecom": [{"system": "email", "value": "a@b.c"}, {"system": "phone", "value": "13800000000"}]}],
    "participant": [{"actor": {"reference": "Schedule/D001"}, "status": "accepted"},
                    {"actor": {"reference": "#p"}, "status": "needs-action"}],
    "identifier": [{"system": "urn:platform:demo", "value": "order-1"}, {"value": "no-system"}],
    "description": "复诊",
}
BY_IDENTIFIER = {
    "resourceType": "Appointment",
    "status": "booked",
    "slot": [{"reference": "Slot/D002-203001070815"}],
    "participant": [{"actor": {"type": "Patient", "display": "王芳",
                               "identifier": {"system": "urn:demo:mrn", "value": "MRN-2",
                                              "type": {"coding": [{"code": "MR"}], "text": "mrn"}}},
                     "status": "tentative"}],
}
NAME_AS_TEXT = {
    "resourceType": "Appointment",
    "status": "pending",
    "slot": [{"reference": "Slot/x"}],
    "contained": [{"resourceType": "Patient", "id": "pat-1.a", "identifier": [{"value": "M3"}],
                   "name": [{"text": "Wang Fang"}]}],
    "participant": [{"actor": {"reference": "#pat-1.a"}, "status": "accepted"}],
}
BASES = [CONTAINED, BY_IDENTIFIER, NAME_AS_TEXT]


def outcome(body, strict):
    try:
        return "ok", booking_from_appointment(copy.deepcopy(body), strict=strict)
    except InvalidResource as e:
        return "invalid", e.status, e.issues


@pytest.mark.parametrize("body", BASES)
def test_the_plain_shapes_are_read_without_the_model_and_give_what_the_model_gives(body):
    assert _plain_appointment(body) is not None
    assert outcome(body, strict=False) == outcome(body, strict=True)
    assert outcome(body, strict=False)[0] == "ok"


VALUES = st.sampled_from([
    None, "", " ", "x", " x ", "a b", "a  b", "a\tb", "\u3000", "x\u3000y", "\x0b", "a\x00b", 5, 0, True, 1.5, [],
    {}, ["x"], [""], [{}], {"x": 1}, {"reference": "#p"}, {"value": "V"}, "bad id!", "p", "Slot/1", "Slot/", "#p",
    "#nobody", "Patient/1", "Patient", "proposed", "booked", "cancelled", "bogus", "phone", "needs-action",
    "accepted", "urn:gatewayd:his:appointment", "王芳", "x" * 65, [{"value": "V"}],
])


def paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from paths(v, prefix + (i,))


@st.composite
def broken(draw):
    body = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(list(paths(body))[1:]))
        parent = body
        for step in where[:-1]:
            parent = parent[step]
        last = where[-1]
        action = draw(st.sampled_from(["set", "set", "delete", "add", "repeat"]))
        if action == "set":
            parent[last] = copy.deepcopy(draw(VALUES))
        elif action == "delete":
            del parent[last]
        elif action == "add" and isinstance(parent[last], dict):
            key = draw(st.sampled_from(["extra", "use", "_status", "id", "text", "system"]))
            parent[last][key] = copy.deepcopy(draw(VALUES))
        elif action == "repeat" and isinstance(parent[last], list) and parent[last]:
            parent[last].append(copy.deepcopy(parent[last][0]))
    return body


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(broken())
def test_any_variant_gets_the_same_answer_with_or_without_the_model(body):
    assert outcome(body, strict=False) == outcome(body, strict=True)


@pytest.mark.parametrize("resource", [
    {"resourceType": "Bogus"}, {"resourceType": None}, {"resourceType": 5}, {"resourceType": "patient"},
    {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {"resourceType": "X"}}]},
])
def test_a_contained_resource_of_no_fhir_type_is_400_on_both_paths(resource):
    """Found by the fuzz campaign (tests/fuzz/fuzz_fhir.py): fhir.resources raises KeyError or TypeError, not a
    ValidationError, for a contained resource (at any depth) whose resourceType is not a FHIR type, and
    POST /Appointment answered 500. It is an invalid body: 400 with an OperationOutcome issue."""
    body = copy.deepcopy(NAME_AS_TEXT)
    body["contained"].append(resource)
    for strict in (False, True):
        with pytest.raises(InvalidResource) as info:
            booking_from_appointment(copy.deepcopy(body), strict=strict)
        assert info.value.status == 400
        assert info.value.issues == [("structure", "Appointment.contained: a resource in it has a resourceType "
                                      "that is not a FHIR resource type", "Appointment.contained")]
    with pytest.raises(InvalidResource) as info:
        patient_from_resource({"resourceType": "Patient", "contained": [resource]})
    assert info.value.issues[0][2] == "Patient.contained"


@pytest.mark.parametrize("path", [("slot", 0, "reference"), ("description",), ("identifier", 0, "system"),
                                  ("contained", 0, "name", 0, "family"), ("contained", 0, "identifier", 0, "value"),
                                  ("contained", 0, "identifier", 0, "type", "coding", 0, "code")])
def test_a_lone_surrogate_is_refused_by_both_paths(path):
    """Found by the fuzz campaign (tests/fuzz/fuzz_fhir.py): a lone surrogate ("\\udfff", valid in JSON's
    \\u escapes) passed the plain shape's string checks, so the plain path booked 'Slot/D002\\udfff' (and the
    SRM could then not be encoded: a 500), where the model refuses it. Both paths now give the model's 400,
    naming the element."""
    body = copy.deepcopy(CONTAINED)
    parent = body
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = parent[path[-1]] + "\udfff"
    assert outcome(body, strict=False) == outcome(body, strict=True)
    kind, status, issues = outcome(body, strict=False)
    assert (kind, status) == ("invalid", 400) and "unicode" in issues[0][1]


def test_a_null_given_name_is_skipped_by_both_paths():
    """Found by the property test above: JSON's null in ``given`` (FHIR's way of writing a repetition that has
    only an extension, ``"_given": [{...}, null]``) crashed both readers with a TypeError. The name is the
    given names that have a value."""
    body = copy.deepcopy(CONTAINED)
    body["contained"][0]["name"] = [{"family": "王", "given": [None, "小"]}]
    assert outcome(body, strict=False) == outcome(body, strict=True)
    patient = booking_from_appointment(copy.deepcopy(body), strict=False).patient
    assert (patient.family, patient.given) == ("王", "小")
