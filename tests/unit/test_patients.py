"""Patient identifiers as the hospital configures them (``patients.identifiers``): which systems platforms may
use (another is 422, naming the accepted ones, before anything is stored), how each becomes a PID-3
repetition (CX.4 assigning authority, CX.5 type code), config mistakes with file:line:key, and the default
(no rules: every system, written as it came); the per-patient ordering key."""

import hashlib

from adapters.hl7.er7 import parse
from gateway.domain.patients import IdentifierRefused, IdentifierRule, IdentifierRules, order_key
from gateway.domain.model import Patient, PatientIdentifier
from tests.unit.config_files import load, problems
from tests.unit.outer_gate import PATIENT, SID, appointment, entries, outcome, params, ref

import pytest

ID_CARD = "urn:oid:2.16.156.10011.1.5"
RULES = IdentifierRules([
    IdentifierRule(ID_CARD, "NNCHN", ("", "2.16.156.10011.1.5", "ISO"), "居民身份证", "[0-9]{17}[0-9X]"),
    IdentifierRule("urn:demo:mrn", "MR", ("HIS",), "病历号"),
    IdentifierRule("urn:hospital:phone", "PH"),
])


def patient(*identifiers):
    return Patient(tuple(PatientIdentifier(s, v, t) for s, v, t in identifiers), "欧阳", "娜娜")


def test_the_config_section_is_read_and_becomes_the_rules(config_dir):
    config = load(config_dir, f"""platforms: [{{name: demo, certificate_subject: CN=platform-demo}}]
patients:
  identifiers:
    - {{system: "{ID_CARD}", type: NNCHN, assigning_authority: "&2.16.156.10011.1.5&ISO", name: 居民身份证,
       value_pattern: "[0-9]{{17}}[0-9X]"}}
    - {{system: "urn:demo:mrn", type: MR, assigning_authority: HIS}}
""")
    rules = IdentifierRules.from_config(config.patients)
    assert rules.accepted() == f"{ID_CARD} (居民身份证), urn:demo:mrn"
    his = rules.for_his(patient((ID_CARD, "11010519491231002X", "NI"), ("urn:demo:mrn", "M1", "")))
    assert [(i.assigning_authority, i.type_code) for i in his.identifiers] == [
        (("", "2.16.156.10011.1.5", "ISO"), "NNCHN"), (("HIS",), "MR")]
    assert load(config_dir, "platforms: [{name: demo, certificate_subject: CN=platform-demo}]\n").patients.identifiers == []


def test_config_mistakes_name_the_line_and_key(config_dir):
    found = problems(config_dir, f"""platforms: [{{name: demo, certificate_subject: CN=platform-demo}}]
patients:
  identifiers:
    - {{system: "{ID_CARD}", type: "N I"}}
    - {{system: mrn, type: MR, colour: red}}
    - {{system: "urn:a:b", type: MR, assigning_authority: "a^b"}}
""")
    assert any(f.startswith("8:patients.identifiers[0].type: expected an HL7 identifier type code") for f in found), found
    assert any(f.startswith("9:patients.identifiers[1].system: expected a URI") for f in found), found
    assert any(f.startswith("9:patients.identifiers[1].colour: unknown key") for f in found), found
    assert any(f.startswith("10:patients.identifiers[2].assigning_authority: expected HD text: no spaces") for f in found), found
    found = problems(config_dir, f"""platforms: [{{name: demo, certificate_subject: CN=platform-demo}}]
patients:
  identifiers:
    - {{system: "{ID_CARD}", type: NNCHN, value_pattern: "[0-9"}}
    - {{system: "{ID_CARD}", type: MR}}
""")
    assert any(f.startswith("8:patients.identifiers[0].value_pattern: not a regular expression") for f in found), found
    assert any(f.startswith("9:patients.identifiers[1].system: urn:oid:2.16.156.10011.1.5 is listed already")
               for f in found), found


def test_unknown_systems_and_malformed_values_are_refused_naming_the_accepted_systems():
    RULES.check(patient((ID_CARD, "11010519491231002X", ""), ("urn:demo:mrn", "M1", "")))
    with pytest.raises(IdentifierRefused) as e:
        RULES.check(patient(("urn:demo:mrn", "M1", ""), ("urn:platform:user", "u-77", "")))
    assert e.value.element == "Patient.identifier[1].system"
    assert "urn:platform:user" in str(e.value) and f"{ID_CARD} (居民身份证), urn:demo:mrn (病历号)" in str(e.value)
    with pytest.raises(IdentifierRefused) as e:
        RULES.check(patient((ID_CARD, "1101051949123100", "")))
    assert e.value.element == "Patient.identifier[0].value" and "1101051949123100" not in str(e.value)
    IdentifierRules().check(patient(("anything:at-all", "x", "")))  # no rules: everything accepted


def test_pid3_carries_the_configured_assigning_authority_and_type(gate):
    """The SRM^S01 the inner gate writes: CX.4 and CX.5 from the rule, whatever type the platform sent; the
    chamber keeps the identifier as the platform gave it (its FHIR system)."""
    gate.booking.patients = RULES
    body = appointment(SID[0])
    body["contained"][0]["identifier"] = [
        {"system": ID_CARD, "value": "11010519491231002X",
         "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "NI"}]}},
        {"system": "urn:demo:mrn", "value": "M&1"}]
    r = gate.request("POST", "/Appointment", body)
    assert r.status == 202, r.json
    srm = [m for m in gate.chamber.read().messages(direction="outbound") if m.type == "SRM^S01"][0]
    body_hl7 = gate.chamber.transact_now(lambda tx: gate.booking.encode(tx, tx.message(srm.id)))[0]
    pid = parse(body_hl7).segment("PID")
    assert pid.raw(3) == r"11010519491231002X^^^&2.16.156.10011.1.5&ISO^NNCHN~M\T\1^^^HIS^MR"
    stored = gate.chamber.read().appointment(r.json["id"]).patient["identifiers"]
    assert [i["system"] for i in stored] == [ID_CARD, "urn:demo:mrn"]


def test_a_patient_of_an_unknown_system_is_422_on_every_way_in_and_nothing_is_stored(gate):
    gate.booking.patients = RULES
    before = len(gate.chamber.read().messages(direction="outbound"))
    diagnostics = outcome(gate.request("POST", "/Appointment", appointment(SID[0])), 422, "code-invalid")
    assert "urn:id-card" in diagnostics and "urn:demo:mrn (病历号)" in diagnostics
    r = gate.request("POST", "/Appointment/$hold", params(("appointment-reference", ref(f"Appointment/proposed-{SID[1]}")),
                                                          ("patient-resource", {"resource": PATIENT})))
    outcome(r, 422, "code-invalid")
    assert r.json["issue"][0]["expression"] == ["Patient.identifier[0].system"]
    held = entries(gate.request("POST", "/Appointment/$hold",
                                params(("appointment-reference", ref(f"Appointment/proposed-{SID[1]}")))))[0]
    outcome(gate.request("POST", "/Appointment/$book", params(("appointment-reference", ref(f"Appointment/{held['id']}")),
                                                              ("patient-resource", {"resource": PATIENT}))),
            422, "code-invalid")
    assert gate.chamber.read().appointment(held["id"]).status == "pending"  # still held, no patient stored
    assert len(gate.chamber.read().messages(direction="outbound")) == before
    accepted = dict(PATIENT, identifier=[{"system": "urn:demo:mrn", "value": "MRN-1"}])
    r = gate.request("POST", "/Appointment/$book", params(("appointment-reference", ref(f"Appointment/{held['id']}")),
                                                          ("patient-resource", {"resource": accepted})))
    assert r.status == 202, r.json


def test_the_ordering_key_names_the_patient_by_a_hash_of_the_first_identifier():
    """order_key: one patient's messages share a key (their first identifier's system and value, hashed: the
    key never shows the identifier), whatever else differs; without an identifier, the name and phone decide.
    It is the key prescriptions were queued with (sha256 of 'system|value', 24 hex digits), so a queue keeps its
    order across the switch to this one function."""
    first = patient((ID_CARD, "11010519491231002X", "NNCHN"), ("urn:demo:mrn", "MRN-1", "MR"))
    again = Patient((PatientIdentifier(ID_CARD, "11010519491231002X"),), "欧阳", "娜", "13800000000")
    key = order_key(first)
    assert key == order_key(again) == hashlib.sha256(f"{ID_CARD}|11010519491231002X".encode()).hexdigest()[:24]
    assert "11010519491231002X" not in key and len(key) == 24
    assert key != order_key(patient(("urn:demo:mrn", "MRN-1", "MR")))
    assert order_key(Patient((), "王", "芳", "13800000000")) == order_key(Patient((), "王", "芳", "13800000000"))
    assert order_key(Patient((), "王", "芳", "13800000000")) != order_key(Patient((), "王", "芳", "13900000000"))
