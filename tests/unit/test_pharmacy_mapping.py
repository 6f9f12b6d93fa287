"""The pharmacy maps (adapters/maps/fhir_prescription.py, fhir_documents.py, rde_order.py, rds_dispense.py)
against hand-written golden files in tests/golden/pharmacy/.

Golden HL7 files are written from docs/pharmacy-profile.md, one segment per line (LF in the file, CR on the
wire: the tests swap them); the GB18030 ones are GB18030 bytes. What each test proves is in its name and
docstring: the builder reproduces the golden bytes exactly (UTF-8 and GB18030, Chinese drug names, every HL7
delimiter escaped), the golden files parse with our ER7 reader and with hl7apy at STRICT validation, each
missing field of a platform's prescription is reported with its FHIR path, and the HIS's answers, dispenses
and released prescriptions map to the golden FHIR JSON, which fhir.resources R4B accepts. No I/O but reading
the golden files.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from fhir.resources.R4B.medicationdispense import MedicationDispense
from fhir.resources.R4B.medicationrequest import MedicationRequest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message, parse_segment
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.hl7.er7 import Hl7Error, parse
from adapters.maps.fhir_documents import medication_dispense, medication_requests
from adapters.maps.fhir_prescription import InvalidPrescription, prescription_from_fhir
from adapters.maps.pharmacy_codes import PharmacyProfile
from adapters.maps.rde_order import build_order, read_order_answer
from adapters.maps.rds_dispense import dispenses_from_rds, prescription_from_rde, released_prescription
from adapters.maps.srm_booking import Hl7Header
from gateway.domain.prescriptions import Code, Prescriber

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "pharmacy"
TZ = ZoneInfo("Asia/Shanghai")
NOW = datetime(2030, 1, 7, 9, 15, 30)
ATC = "http://www.whocc.no/atc"
#: the hospital's override: its local drug codes, and the ATC code a platform sends for Y0002
PROFILE = PharmacyProfile(drug_systems={"urn:gatewayd:his:drug": "99HIS"}, drug_codes={(ATC, "M01AE01"): "Y0002"})
UTF8 = Hl7Header("GATEWAYD", "FRONT", "HIS-PHARMACY", "HOSPITAL", "2.5", "utf-8")
GB = Hl7Header("GATEWAYD", "前置机", "HIS-PHARMACY", "人民医院", "2.5", "gb18030")


def golden_hl7(name: str) -> bytes:
    return (GOLDEN / name).read_bytes().replace(b"\n", b"\r")


def golden_json(name: str):
    return json.loads((GOLDEN / name).read_text(encoding="utf-8"))


def bundle() -> dict:
    return golden_json("bundle_three_items.json")


def single() -> dict:
    return golden_json("medicationrequest_single.json")


def rx_bundle():
    return prescription_from_fhir(bundle(), TZ, PROFILE, item_ids=["mr-1", "mr-2", "mr-3"])


# -- FHIR -> HL7: the builder against the golden bytes -------------------------------------------------------


def test_bundle_of_three_becomes_the_golden_rde_utf8():
    """One RDE^O11 with three ORC/RXE/TQ1/RXR groups; the ATC-coded item maps through the configured local
    drug code; delimiters in the patient instruction are escaped."""
    out = build_order(rx_bundle(), header=UTF8, control_id="G00000000000000000a1", now=NOW)
    assert out == golden_hl7("rde_o11_bundle.utf8.hl7")


def test_bundle_of_three_becomes_the_golden_rde_gb18030():
    """Same message in GB18030 (MSH-18 ``GB 18030-2000``, Chinese facility names in MSH-4/6)."""
    out = build_order(rx_bundle(), header=GB, control_id="G00000000000000000a1", now=NOW)
    assert out == golden_hl7("rde_o11_bundle.gb18030.hl7")
    assert "阿莫西林胶囊".encode("gb18030") in out


def test_single_medication_request_becomes_the_golden_omp():
    """OMP^O09 where the config says so: ORC TQ1 RXO RXR; the prescription number is MedicationRequest.identifier
    when there is no groupIdentifier; without authoredOn, ORC-9 is now."""
    p = prescription_from_fhir(single(), TZ, PROFILE, item_ids=["mr-9"])
    out = build_order(p, header=UTF8, control_id="G00000000000000000b2", now=NOW, message="OMP")
    assert out == golden_hl7("omp_o09_single.hl7")


def test_the_golden_rde_reads_back_field_by_field_with_the_er7_reader():
    for name, charset in (("rde_o11_bundle.utf8.hl7", "utf-8"), ("rde_o11_bundle.gb18030.hl7", "gb18030")):
        msg = parse(golden_hl7(name))
        assert msg.charset == charset and msg.type_name == "RDE^O11"
        groups = msg.groups("ORC")
        assert [g[0].get(2) for g in groups] == ["mr-1", "mr-2", "mr-3"]
        assert [[s.name for s in g] for g in groups] == [["ORC", "RXE", "TQ1", "RXR"]] * 3
        rxe = groups[0][1]
        assert rxe.get(2, 2) == "阿莫西林胶囊"
        assert rxe.get(7, 2) == "饭后~30分钟服用 & 多饮水 | 勿嚼^碎 \\ 见说明书"
        assert (rxe.get(3), rxe.get(5), rxe.get(10), rxe.get(11, 2)) == ("0.5", "g", "24", "粒")
        assert groups[1][1].get(2) == "Y0002"  # ATC M01AE01 through the override
        assert [g[2].get(3) for g in groups] == ["TID", "BID", "Q8H"]
        assert msg.segment("PID").get(3, 1, 1) == "MRN-0001"
        assert msg.segment("ORC").get(12, 2) == "张三"


@pytest.mark.parametrize("message", ["RDE", "OMP"])
def test_no_control_byte_from_a_value_reaches_the_wire(message):
    """Finding 7: whatever a prescription's text holds (a NUL, any C0 control), the order carries it
    escaped — PID-7 included, which used to be written as given — and no raw control byte."""
    controls = "".join(chr(c) for c in range(0x20))
    p = rx_bundle()
    p = replace(p, patient=replace(p.patient, family=f"王\x00{controls}"), birth_date=f"1990\x00{controls}",
                items=tuple(replace(i, instructions=f"饭后\x00{controls}") for i in p.items))
    wire = build_order(p, header=GB, control_id="G1", now=NOW, message=message)
    assert not any(byte < 0x20 for segment in wire.split(b"\r") for byte in segment)
    pid = parse(wire).segment("PID")
    assert (pid.get(5), pid.get(7)) == (f"王\x00{controls}", f"1990\x00{controls}")


def test_rde_round_trip_gives_back_the_same_prescription():
    """FHIR -> Prescription -> RDE -> Prescription keeps every field the profile carries."""
    p = rx_bundle()
    back = prescription_from_rde(parse(build_order(p, header=GB, control_id="G1", now=NOW)))
    assert back.number == p.number and back.encounter_id == p.encounter_id
    assert back.authored_local == p.authored_local == datetime(2030, 1, 7, 9, 15)
    assert back.patient.identifiers == p.patient.identifiers
    assert (back.birth_date, back.gender) == ("19900101", "F")
    for a, b in zip(back.items, p.items):
        assert (a.placer_id, a.medication, a.dose_value, a.dose_unit, a.route, a.dispense_value, a.dispense_unit,
                a.days_supply, a.refills, a.instructions, a.frequency.code) == \
               (b.placer_id, b.medication, b.dose_value, b.dose_unit, b.route, b.dispense_value, b.dispense_unit,
                b.days_supply, b.refills, b.instructions, b.frequency.code)


# -- hl7apy STRICT --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,charset", [
    ("omp_o09_single.hl7", "utf-8"), ("rre_o12_accepted.hl7", "utf-8"), ("rre_o12_refused.hl7", "utf-8"),
    ("orp_o10_ua.hl7", "utf-8"), ("ack_ar.hl7", "utf-8"), ("rds_o13.hl7", "utf-8"),
])
def test_golden_messages_pass_hl7apy_strict_validation(name, charset):
    msg = parse_message(golden_hl7(name).decode(charset), validation_level=VALIDATION_LEVEL.STRICT,
                        find_groups=True)
    assert msg.validate()


@pytest.mark.parametrize("name,charset", [
    ("rde_o11_bundle.utf8.hl7", "utf-8"), ("rde_o11_bundle.gb18030.hl7", "gb18030"),
    ("rde_o11_release.gb18030.hl7", "gb18030"),
])
def test_golden_rde_segments_pass_hl7apy_strict_validation(name, charset):
    """RDE_O11 segment by segment: hl7apy's group finder puts a TQ1 that follows RXE into the optional TIMING
    group (before RXE) instead of TIMING_ENCODED, then reports TIMING_ENCODED missing — a limit of its greedy
    matcher, not of the message (v2.5 RDE_O11: ORC [TIMING] [ORDER_DETAIL] RXE [NTE] TIMING_ENCODED RXR).
    Every segment's fields, data types and lengths are still checked at STRICT."""
    for text in golden_hl7(name).decode(charset).split("\r"):
        if text and not text.startswith("MSH"):
            seg = parse_segment(text, version="2.5", validation_level=VALIDATION_LEVEL.STRICT)
            assert seg.validate()


# -- FHIR -> ours: refusals name the FHIR path ----------------------------------------------------------------


def _entry(b: dict, n: int) -> dict:
    return b["entry"][n]["resource"]


@pytest.mark.parametrize("mutate,path", [
    (lambda r: r["dosageInstruction"][0].pop("doseAndRate"),
     "Bundle.entry[4].resource.dosageInstruction[0].doseAndRate[0].doseQuantity"),
    (lambda r: r["dosageInstruction"][0].pop("route"), "Bundle.entry[4].resource.dosageInstruction[0].route"),
    (lambda r: r["dosageInstruction"][0].pop("timing"), "Bundle.entry[4].resource.dosageInstruction[0].timing"),
    (lambda r: r["dispenseRequest"].pop("quantity"), "Bundle.entry[4].resource.dispenseRequest.quantity"),
    (lambda r: r.pop("dosageInstruction"), "Bundle.entry[4].resource.dosageInstruction"),
    (lambda r: r["medicationCodeableConcept"]["coding"][0].update(code="UNKNOWN"),
     "Bundle.entry[4].resource.medicationCodeableConcept.coding"),
])
def test_a_missing_field_is_refused_naming_its_fhir_path(mutate, path):
    b = bundle()
    mutate(_entry(b, 4))
    with pytest.raises(InvalidPrescription) as e:
        prescription_from_fhir(b, TZ, PROFILE)
    assert e.value.status == 422
    assert [i[2] for i in e.value.issues] == [path], e.value.issues


def test_every_problem_is_reported_at_once():
    b = bundle()
    for n in (3, 4, 5):
        _entry(b, n).pop("requester")
    _entry(b, 5)["dispenseRequest"].pop("quantity")
    with pytest.raises(InvalidPrescription) as e:
        prescription_from_fhir(b, TZ, PROFILE)
    paths = [i[2] for i in e.value.issues]
    assert "Bundle.entry[3].resource.requester" in paths
    assert "Bundle.entry[5].resource.dispenseRequest.quantity" in paths


def test_single_request_without_prescriber_names_medicationrequest_requester():
    body = single()
    body.pop("requester")
    with pytest.raises(InvalidPrescription) as e:
        prescription_from_fhir(body, TZ, PROFILE)
    assert [i[2] for i in e.value.issues] == ["MedicationRequest.requester"]
    assert "prescriber" in str(e.value)


def test_items_of_one_prescription_must_share_group_identifier():
    b = bundle()
    _entry(b, 5)["groupIdentifier"]["value"] = "RX-OTHER"
    with pytest.raises(InvalidPrescription) as e:
        prescription_from_fhir(b, TZ, PROFILE)
    assert "groupIdentifier" in str(e.value)


def test_not_fhir_is_400_with_the_path():
    b = single()
    b["dispenseRequest"]["quantity"]["value"] = "lots"
    with pytest.raises(InvalidPrescription) as e:
        prescription_from_fhir(b, TZ, PROFILE)
    assert e.value.status == 400
    assert any("dispenseRequest" in (i[2] or "") for i in e.value.issues)
    with pytest.raises(InvalidPrescription):
        prescription_from_fhir({"resourceType": "Appointment"}, TZ, PROFILE)


def test_a_batch_bundle_is_not_a_prescription():
    b = bundle()
    b["type"] = "batch"
    with pytest.raises(InvalidPrescription) as e:
        prescription_from_fhir(b, TZ, PROFILE)
    assert e.value.issues[0][2] == "Bundle.type"


def test_without_the_override_a_foreign_drug_code_is_refused():
    with pytest.raises(InvalidPrescription) as e:
        prescription_from_fhir(bundle(), TZ, PharmacyProfile())
    assert [i[2] for i in e.value.issues] == ["Bundle.entry[4].resource.medicationCodeableConcept.coding"]


def test_frequency_from_timing_repeat_and_days_supply():
    items = rx_bundle().items
    assert [(i.frequency.code, i.days_supply) for i in items] == [("TID", 4), ("BID", 5), ("Q8H", None)]
    body = single()
    body["dosageInstruction"][0]["timing"] = {"repeat": {"frequency": 5, "period": 1, "periodUnit": "d"}}
    with pytest.raises(InvalidPrescription):  # five a day has no table 0335 code here: refused, not guessed
        prescription_from_fhir(body, TZ, PROFILE)


# -- HL7 -> ours / FHIR ---------------------------------------------------------------------------------------


def test_rre_accepted():
    a = read_order_answer(parse(golden_hl7("rre_o12_accepted.hl7")))
    assert (a.accepted, a.code, a.acknowledges) == (True, "AA", "G00000000000000000a1")
    assert [(i.placer_id, i.filler_id) for i in a.items] == [("mr-1", "F1001"), ("mr-2", "F1002"), ("mr-3", "F1003")]


def test_rre_refused_says_why():
    a = read_order_answer(parse(golden_hl7("rre_o12_refused.hl7")))
    assert (a.accepted, a.code, a.reason) == (False, "AE", "药品 Y0002 库存不足")
    assert [i.order_control for i in a.items] == ["OK", "UA", "OK"]


def test_orp_with_an_item_unable_to_accept_is_a_refusal_even_with_aa():
    a = read_order_answer(parse(golden_hl7("orp_o10_ua.hl7")))
    assert (a.accepted, a.code, a.reason) == (False, "AA", "处方号重复")


def test_plain_ack_ar():
    a = read_order_answer(parse(golden_hl7("ack_ar.hl7")))
    assert (a.accepted, a.code, a.reason, a.items) == (False, "AR", "不支持的消息结构", ())


def test_an_unrelated_message_is_not_an_answer():
    with pytest.raises(Hl7Error) as e:
        read_order_answer(parse(golden_hl7("rds_o13.hl7")))
    assert e.value.code == 200


def test_rds_becomes_the_golden_medication_dispenses():
    out = [medication_dispense(d, TZ, PROFILE) for d in dispenses_from_rds(parse(golden_hl7("rds_o13.hl7")), TZ)]
    assert out == golden_json("rds_o13.medicationdispense.json")
    for res in out:
        MedicationDispense.model_validate(res)


def test_rds_without_rxd_is_101_at_rxd():
    raw = golden_hl7("rds_o13.hl7").replace(b"RXD|1|Y0002", b"NTE|1|Y0002")
    with pytest.raises(Hl7Error) as e:
        dispenses_from_rds(parse(raw), TZ)
    assert (e.value.code, e.value.location) == (101, "RXD[2]")


def test_released_rde_becomes_the_golden_medication_request():
    """The outside-pharmacy direction: GB18030 RDE^O11 from the HIS, marked RELEASE in ORC-16."""
    p = released_prescription(parse(golden_hl7("rde_o11_release.gb18030.hl7")))
    assert p.released and p.number == "HISRX-77"
    out = medication_requests(p, TZ, ["rel-1"], PROFILE)
    assert out == golden_json("rde_o11_release.medicationrequest.json")
    for res in out:
        MedicationRequest.model_validate(res)


def test_an_rde_not_marked_for_release_is_refused_for_release():
    raw = golden_hl7("rde_o11_release.gb18030.hl7").replace(b"RELEASE^", b"^")
    msg = parse(raw)
    assert prescription_from_rde(msg).released is False
    with pytest.raises(Hl7Error) as e:
        released_prescription(msg)
    assert (e.value.code, e.value.location) == (103, "ORC-16")


@pytest.mark.parametrize("segment,location", [(b"RXR|PO^", "RXR"), (b"TQ1|1||QD", "TQ1-3")])
def test_released_rde_missing_route_or_frequency_is_101(segment, location):
    raw = golden_hl7("rde_o11_release.gb18030.hl7").replace(segment, b"NTE|" + segment[4:] if segment == b"RXR|PO^"
                                                            else b"TQ1|1||")
    with pytest.raises(Hl7Error) as e:
        prescription_from_rde(parse(raw))
    assert e.value.code == 101 and e.value.location == location


@pytest.mark.parametrize("old,new,location", [
    (b"|||||20300108075500|||D01", b"|||||2030-01-08|||D01", "ORC-9"),  # (found by tests/fuzz/fuzz_pharmacy.py)
    (b"|||||20300108075500|||D01", b"|||||20300108\x00\x00|||D01", "ORC-9"),
    (b"28^d|20300108075500", b"28^d|tomorrow", "TQ1-7"),
])
def test_an_unreadable_order_time_is_102_naming_its_field(old, new, location):
    raw = golden_hl7("rde_o11_release.gb18030.hl7")
    if location == "TQ1-7":  # TQ1-7 is read only without ORC-9
        raw = raw.replace(b"|||||20300108075500|||D01", b"||||||||D01")
    assert old in raw
    with pytest.raises(Hl7Error) as e:
        prescription_from_rde(parse(raw.replace(old, new)))
    assert (e.value.code, e.value.location) == (102, location)


def test_our_medication_requests_are_valid_r4b_for_the_platform_bundle_too():
    """The prescription we sent can be shown back to platforms as MedicationRequests (GET /fhir/...)."""
    out = medication_requests(rx_bundle(), TZ, ["mr-1", "mr-2", "mr-3"], PROFILE)
    for res in out:
        MedicationRequest.model_validate(res)
    assert [r["dosageInstruction"][0]["timing"]["repeat"] for r in out] == [
        {"frequency": 3, "period": 1, "periodUnit": "d"}, {"frequency": 2, "period": 1, "periodUnit": "d"},
        {"frequency": 1, "period": 8, "periodUnit": "h"}]
    assert out[0]["dosageInstruction"][0]["doseAndRate"][0]["doseQuantity"]["value"] == 0.5


def test_the_mapping_does_not_touch_its_input():
    b = bundle()
    before = copy.deepcopy(b)
    prescription_from_fhir(b, TZ, PROFILE)
    assert b == before


# -- property: whatever text a platform sends crosses unchanged ----------------------------------------------

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=150, deadline=None)
@given(drug=TEXT, instructions=TEXT, number=TEXT.filter(bool), name=TEXT, charset=st.sampled_from(["utf-8", "gb18030"]))
def test_any_text_survives_the_rde_both_ways(drug, instructions, number, name, charset):
    """Delimiters, escape characters, CR/LF, MLLP block bytes and any non-ASCII text in values a platform
    controls come back unchanged through build_order -> er7.parse -> prescription_from_rde, in UTF-8 and
    GB18030: escaping is complete and never shifts a field."""
    base = rx_bundle()
    item = replace(base.items[0], medication=Code("Y0001", drug, "99HIS"), instructions=instructions)
    p = replace(base, number=number, items=(item,), prescriber=Prescriber("D0042", name))
    header = Hl7Header("GATEWAYD", "FRONT", "HIS-PHARMACY", "HOSPITAL", "2.5", charset)
    back = prescription_from_rde(parse(build_order(p, header=header, control_id="G1", now=NOW)))
    assert back.number == number
    assert back.items[0].medication.text == drug
    assert back.items[0].instructions == instructions
    assert back.prescriber.name == name


def test_contained_patient_practitioner_and_medication_are_resolved():
    """A lone MedicationRequest may carry its Patient, Practitioner and Medication as contained resources."""
    body = single()
    body["contained"] = [
        {"resourceType": "Patient", "id": "p", "identifier": [{"system": "urn:gatewayd:his:mrn", "value": "MRN-7"}],
         "name": [{"family": "赵", "given": ["六"]}], "gender": "male", "birthDate": "1970-07-07"},
        {"resourceType": "Practitioner", "id": "dr",
         "identifier": [{"system": "urn:gatewayd:his:practitioner", "value": "D0099"}], "name": [{"text": "钱医生"}]},
        {"resourceType": "Medication", "id": "m",
         "code": {"coding": [{"system": "urn:gatewayd:his:drug", "code": "Y0009", "display": "维生素C片"}]}},
    ]
    body["subject"] = {"reference": "#p"}
    body["requester"] = {"reference": "#dr"}
    body.pop("medicationCodeableConcept")
    body["medicationReference"] = {"reference": "#m"}
    p = prescription_from_fhir(body, TZ, PROFILE)
    assert (p.patient.identifiers[0].value, p.patient.family, p.gender, p.birth_date) == ("MRN-7", "赵", "M", "19700707")
    assert (p.prescriber.id, p.prescriber.name) == ("D0099", "钱医生")
    assert p.items[0].medication == Code("Y0009", "维生素C片", "99HIS")
    body["medicationReference"] = {"reference": "#nowhere"}
    with pytest.raises(InvalidPrescription) as e:
        prescription_from_fhir(body, TZ, PROFILE)
    assert [i[2] for i in e.value.issues] == ["MedicationRequest.medicationReference"]


@pytest.mark.parametrize("where", ["contained", "bundle entry"])
def test_a_resource_of_no_fhir_type_inside_a_prescription_is_400(where):
    """The fuzz campaign's finding in the Appointment map (tests/fuzz/fuzz_fhir.py) holds here too:
    fhir.resources raises KeyError, not a ValidationError, for a nested resource whose resourceType is not a
    FHIR type, and POST /MedicationRequest (or a prescription Bundle) answered 500. Now 400."""
    if where == "contained":
        body = single()
        body["contained"] = [{"resourceType": "Bogus"}]
    else:
        body = bundle()
        body["entry"].append({"resource": {"resourceType": "Bogus"}, "request": {"method": "POST", "url": "X"}})
    with pytest.raises(InvalidPrescription) as e:
        prescription_from_fhir(body, TZ, PROFILE)
    assert e.value.status == 400
    assert e.value.issues == [("structure", f"{body['resourceType']}: a resource in it has a resourceType that is "
                               f"not a FHIR resource type", body["resourceType"])]


def test_a_null_given_name_is_skipped():
    """A null among the patient's or prescriber's given names (a repetition with only an extension) is not a
    name and no crash: the given names that have a value are kept."""
    b = bundle()
    _entry(b, 0)["name"] = [{"family": "王", "given": [None, "芳"]}]
    _entry(b, 1)["name"] = [{"family": "张", "given": ["三", None]}]
    p = prescription_from_fhir(b, TZ, PROFILE, item_ids=["mr-1", "mr-2", "mr-3"])
    assert (p.patient.family, p.patient.given) == ("王", "芳")
    assert rx_bundle().prescriber == p.prescriber
