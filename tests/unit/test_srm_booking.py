"""The SRM writer on the booking hot path (``adapters.maps.srm_booking.build_srm``) against the hl7apy
builder it replaced (``build_srm_hl7apy``, kept as the reference): the same ER7, byte for byte, for
bookings and cancellations with Chinese names, HL7 delimiters and backslashes in every value a platform
controls, in UTF-8 and GB18030 — and correct where hl7apy is not (several patient identifiers; CR/LF in a
value). No reactor, no I/O.
"""

from __future__ import annotations

from datetime import datetime

import pytest

from adapters.hl7.er7 import parse
from adapters.maps.srm_booking import Hl7Header, build_srm, build_srm_hl7apy
from gateway.domain.model import Patient, PatientIdentifier, SlotForHis

NOW = datetime(2030, 1, 1, 9, 30, 5)
HEADER = Hl7Header("GATEWAYD", "FRONT", "HIS", "HOSPITAL", "2.5", "utf-8")
SLOT = SlotForHis("D001", datetime(2030, 1, 7, 8, 0), 15, "cardiology-consult", "心内科门诊", "D001")
MRN = PatientIdentifier("urn:oid:2.16.840.1.113883.2.4.6.3", "MRN-0001", "MR")
WANG = Patient((MRN,), "王", "芳", "13800000000")


def booking(trigger="S01", *, header=HEADER, slot=SLOT, patient=WANG, control_id="G0123456789abcdef012",
            appointment_id="a0123456789abcdef0123", his_appointment=None, reason=""):
    return dict(trigger=trigger, header=header, control_id=control_id, appointment_id=appointment_id, slot=slot,
                patient=patient, now=NOW, his_appointment=his_appointment, reason=reason)


def build(builder, case):
    case = dict(case)
    return builder(case.pop("trigger"), **case)


DELIMITERS = "|^~\\&"
GB = Hl7Header("GATEWAYD", "前置机", "HIS", "人民医院", "2.5", "gb18030")
CASES = {
    "chinese name, utf-8": booking(),
    "chinese name, gb18030, chinese facilities": booking(header=GB),
    "compound family name": booking(patient=Patient((MRN,), "欧阳", "娜娜", "13800138000")),
    "delimiters in the family name": booking(patient=Patient((MRN,), "张|王^李~赵&钱\\孙", "三", "")),
    "delimiters in the identifier": booking(patient=Patient(
        (PatientIdentifier("urn:demo:mrn", "MR|0002^A~B&C", "MR"),), "王", "芳", "010-6528 8888")),
    "escape sequences as text": booking(patient=Patient((MRN,), "\\F\\\\X0D\\", "\\E\\", "")),
    "every delimiter everywhere": booking(
        header=Hl7Header("G|W", "F^R", "H~S", "H&O", "2.5", "utf-8"),
        slot=SlotForHis("D|1", datetime(2030, 1, 7, 8, 0), 15, "c^d", "门诊" + DELIMITERS, "P~1"),
        patient=Patient((PatientIdentifier(DELIMITERS, DELIMITERS, DELIMITERS),), DELIMITERS, DELIMITERS,
                        DELIMITERS),
        control_id="G^1", appointment_id="a|1", his_appointment="H&1", reason=DELIMITERS),
    "no given name": booking(patient=Patient((MRN,), "王", "", "")),
    "no family name": booking(patient=Patient((MRN,), "", "芳", "")),
    "no name, phone only": booking(patient=Patient((MRN,), "", "", "13800000000")),
    "no identifier at all": booking(patient=Patient((), "王", "芳", "")),
    "identifier without type (PT)": booking(patient=Patient((PatientIdentifier("urn:x", "42"),), "王", "芳")),
    "no practitioner (no AIP)": booking(slot=SlotForHis("D001", datetime(2030, 1, 7, 8, 0), 15, "card", "", "")),
    "long slot crossing midnight": booking(slot=SlotForHis("D001", datetime(2030, 1, 7, 23, 30), 60, "x", "y", "D1")),
    "cancel S04 with the HIS appointment": booking("S04", his_appointment="H000123"),
    "cancel S03 with a reason": booking("S03", his_appointment="H000123", reason="患者要求^改期"),
    "version 2.3, gb18030": booking(header=Hl7Header("GATEWAYD", "FRONT", "HIS", "HOSPITAL", "2.3", "gb18030")),
    "version 2.5.1, long name with spaces": booking(
        header=Hl7Header("GATEWAYD", "FRONT", "HIS", "HOSPITAL", "2.5.1", "utf-8"),
        patient=Patient((MRN,), "  Ōyang  " * 20, "é", "")),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_light_writer_writes_the_very_bytes_hl7apy_writes(case):
    """For each booking the light writer's bytes equal the hl7apy reference's: same fields, same escapes,
    trailing empty fields and components dropped, no CR after the last segment, same charset."""
    assert build(build_srm, case) == build(build_srm_hl7apy, case)


def hl7apy_quirks(er7: str) -> str:
    """What hl7apy makes of a correct message: PID-3's repetition separator escaped to \\R\\, and the
    backslashes of every \\Xhh\\ escape escaped again (\\E\\Xhh\\E\\)."""
    import re

    segments = er7.split("\r")
    for i, seg in enumerate(segments):
        fields = seg.split("|")
        if fields[0] == "PID" and len(fields) > 3:
            fields[3] = fields[3].replace("~", "\\R\\")
        segments[i] = "|".join(fields)
    return re.sub(r"\\X([0-9A-F]{2})\\", r"\\E\\X\1\\E\\", "\r".join(segments))


def test_where_hl7apy_is_wrong_the_light_writer_is_right():
    """Two patient identifiers are two PID-3 repetitions, and CR, LF, VT and FS in values stay \\X0D\\ ..
    \\X1C\\, so the HIS reads back exactly what the platform sent. hl7apy differs in exactly those two
    places (it escapes the '~' and re-escapes the \\X..\\ backslashes); nothing else differs."""
    patient = Patient((MRN, PatientIdentifier("urn:id:card", "110101199003071234", "NNCHN")),
                      "王\r", "芳\n", "138\x0b\x1c")
    case = booking(patient=patient, reason="a\rb")
    light = build(build_srm, case)
    assert hl7apy_quirks(light.decode("utf-8")) == build(build_srm_hl7apy, case).decode("utf-8")

    pid = parse(light).segment("PID")
    assert pid.repetitions(3) == 2
    assert pid.components(3, 0) == ["MRN-0001", "", "", "&2.16.840.1.113883.2.4.6.3&ISO", "MR"]
    assert pid.components(3, 1) == ["110101199003071234", "", "", "urn:id:card", "NNCHN"]
    assert pid.components(5) == ["王\r", "芳\n"] and pid.get(13) == "138\x0b\x1c"
    assert b"\x0b" not in light and b"\x1c" not in light  # nothing in a value can break the MLLP framing


@pytest.mark.parametrize("charset", ["utf-8", "gb18030"])
def test_no_control_byte_from_a_value_reaches_the_wire(charset):
    """Finding 7: a NUL in a platform's text used to be written as a raw 0x00 in PID-5 (VT and FS were
    already escaped). Every C0 control character in a value is written \\Xhh\\ and read back as sent."""
    controls = "".join(chr(c) for c in range(0x20))
    patient = Patient((PatientIdentifier("urn:oid:2.16.840.1.113883.2.4.6.3", f"MRN\x00{controls}"),),
                      f"王\x00{controls}", "芳\x01", f"138\x00{controls}")
    wire = build(build_srm, booking(patient=patient, reason=f"a\x00{controls}",
                                    header=HEADER if charset == "utf-8" else GB))
    assert not any(byte < 0x20 for segment in wire.split(b"\r") for byte in segment)
    pid = parse(wire, charset).segment("PID")
    assert pid.get(3) == f"MRN\x00{controls}" and pid.components(5) == [f"王\x00{controls}", "芳\x01"]
    assert pid.get(13) == f"138\x00{controls}"


@pytest.mark.parametrize("charset", ["utf-8", "gb18030"])
def test_the_light_writer_reads_back_field_by_field(charset):
    """What the HIS reads (with our ER7 reader) is what the platform sent: MSH-9/10/18, ARQ-1/2/5/7/9/10/11,
    PID-3/5/13, RGS-1, AIS-3/4/7/8, AIP-3 — Chinese text in the message charset, delimiters unescaped."""
    header = Hl7Header("GATEWAYD", "前置机", "HIS", "人民医院", "2.5", charset)
    patient = Patient((PatientIdentifier("urn:demo:mrn", "MR|0002^A~B&C", "MR"),), "张|王^李", "三\\四",
                      "010-6528 8888")
    body = build(build_srm, booking("S03", header=header, patient=patient, his_appointment="H000123",
                                    reason="患者要求^改期"))
    assert "张".encode(charset) in body
    msg = parse(body, default_charset="ascii")
    assert (msg.charset, msg.type_name, msg.structure, msg.control_id) == (charset, "SRM^S03", "SRM_S01",
                                                                          "G0123456789abcdef012")
    assert msg.msh.get(4) == "前置机" and msg.msh.get(6) == "人民医院" and msg.msh.get(7) == "20300101093005"
    arq = msg.segment("ARQ")
    assert arq.components(1) == ["a0123456789abcdef0123", "GATEWAYD"] and arq.get(2) == "H000123"
    assert arq.get(5) == "D001" and arq.components(7) == ["", "患者要求^改期"]
    assert (arq.get(9), arq.get(10), arq.components(11)) == ("15", "MIN", ["203001070800", "203001070815"])
    pid = msg.segment("PID")
    assert pid.components(3) == ["MR|0002^A~B&C", "", "", "urn:demo:mrn", "MR"]
    assert pid.components(5) == ["张|王^李", "三\\四"] and pid.get(13) == "010-6528 8888"
    assert msg.segment("RGS").get(1) == "1"
    ais = msg.segment("AIS")
    assert ais.components(3) == ["cardiology-consult", "心内科门诊"]
    assert (ais.get(4), ais.get(7), ais.get(8)) == ("203001070800", "15", "MIN")
    assert msg.segment("AIP").get(3) == "D001"
    assert [s.name for s in msg.segments] == ["MSH", "ARQ", "PID", "RGS", "AIS", "AIP"]


def test_an_unknown_trigger_is_refused_by_both():
    """Only S01, S03 and S04 are SRM triggers this gateway sends."""
    for builder in (build_srm, build_srm_hl7apy):
        with pytest.raises(ValueError, match="unsupported SRM trigger S02"):
            build(builder, booking("S02"))


# -- strict validation for the configured version; PID-7 and PID-8 (issue 17, finding 11) -------------------------

@pytest.mark.parametrize("version, trigger", [
    (v, t) for v in ["2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7"] for t in ["S01", "S03", "S04"]
    if not (v == "2.3" and t != "S01")])
def test_the_srm_passes_hl7apys_strict_validation_for_the_configured_version(version, trigger):
    """It failed v2.5's (ARQ-15 and ARQ-19 are required; an OID system does not fit CX.4's HD.1 of 20
    characters), 2.3's (MSH-9 has two components) and 2.6's (PID-13's XTN.1 is withdrawn).  (hl7apy finds no
    structure for v2.3's SRM^S03/S04, which name none in MSH-9: only S01 is checked there.)"""
    from adapters.hl7.validation import strict_problem

    header = Hl7Header("GATEWAYD", "FRONT", "HIS", "HOSPITAL", version, "utf-8")
    patient = Patient((MRN,), "王", "芳", "13800000000", birth_date="1990-01-02", gender="female")
    case = booking(trigger, header=header, patient=patient, his_appointment=None if trigger == "S01" else "H1",
                   reason="患者要求" if trigger == "S03" else "")
    raw = build(build_srm, case)
    assert strict_problem(parse(raw)) is None, raw


def test_pid_7_and_8_carry_the_birth_date_and_sex_the_platform_sent():
    for gender, code in (("female", "F"), ("male", "M"), ("other", "O"), ("unknown", "U")):
        patient = Patient((MRN,), "王", "芳", "", birth_date="1990-01-02", gender=gender)
        for builder in (build_srm, build_srm_hl7apy):
            pid = parse(build(builder, booking(patient=patient))).segment("PID")
            assert (pid.raw(7), pid.raw(8)) == ("19900102", code)
    pid = parse(build(build_srm, booking(patient=Patient((MRN,), "王", "芳", "", birth_date="1990")))).segment("PID")
    assert (pid.raw(7), pid.raw(8)) == ("1990", "")


def test_an_oid_system_is_written_as_hd_universal_id():
    pid = parse(build(build_srm, booking())).segment("PID")
    assert pid.raw(3) == "MRN-0001^^^&2.16.840.1.113883.2.4.6.3&ISO^MR"
