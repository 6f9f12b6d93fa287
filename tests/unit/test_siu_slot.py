"""What the SIU -> slot notice map (adapters/maps/siu_slot.py) refuses, and where it says the fault is: the
inner gate answers with that Hl7Error (ERR-2 names the segment and field), so a HIS interface engineer can
find the field. Cases found by the fuzz campaign (tests/fuzz/fuzz_siu.py)."""

from __future__ import annotations

import pytest

from adapters.hl7.er7 import Hl7Error, parse
from adapters.maps.siu_slot import notices_from_siu, notices_from_sqr


def siu(sch11: str = "^^15^203001070900^203001070915", ais4: str = "203001070900", ais7: str = "15",
        sch9: str = "15") -> bytes:
    return "\r".join([
        "MSH|^~\\&|HIS|HOSPITAL|GATEWAYD|FRONT|20300101120000||SIU^S24^SIU_S12|M1|P|2.5",
        f"SCH|||||D001^Dr Li||||{sch9}|MIN|{sch11}||||||||||||||Open",
        "RGS|1",
        f"AIS|1||cardio^Cardiology|{ais4}|||{ais7}|MIN",
    ]).encode() + b"\r"


def refusal(raw: bytes, read=notices_from_siu) -> Hl7Error:
    with pytest.raises(Hl7Error) as info:
        read(parse(raw))
    return info.value


@pytest.mark.parametrize("raw, location", [
    (siu(ais4="203"), "AIS-4"),
    (siu(ais4="20301301"), "AIS-4"),
    (siu(ais4="", sch11="^^15^2030010709XX"), "SCH-11"),
    (siu(ais7="", sch9="", sch11="^^^203001070900^2030-01-07"), "SCH-11"),
])
def test_a_date_time_that_is_not_one_is_refused_at_its_field(raw, location):
    """A start or end that is not an HL7 DTM (or an impossible date) is 102 at the field that holds it, not
    an error without a location."""
    err = refusal(raw)
    assert (err.code, err.location) == (102, location)


def test_a_date_time_in_an_sqr_group_is_refused_at_its_group():
    sqr = siu(ais4="2030").replace(b"SIU^S24^SIU_S12", b"SQR^S25^SQR_S25")
    err = refusal(sqr, notices_from_sqr)
    assert (err.code, err.segment, err.field) == (102, "AIS", 4)


@pytest.mark.parametrize("minutes", ["inf", "-inf", "1e400", "nan", "99999999999999", "5256000000"])
def test_a_duration_that_is_not_a_number_of_minutes_or_never_ends_is_refused(minutes):
    """AIS-7 'inf' raised OverflowError out of the map (the HIS got no answer); a duration whose end is past
    the year 9999 was taken, and every FHIR Slot search then failed on the slot's end."""
    err = refusal(siu(ais7=minutes))
    assert (err.code, err.location) == (102, "AIS-7")


def test_a_long_but_possible_duration_is_taken():
    [notice] = notices_from_siu(parse(siu(ais7="1440")))
    assert notice.minutes == 1440
