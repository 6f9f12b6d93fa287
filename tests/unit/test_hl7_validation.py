"""Per-peer strict validation (hl7apy, VALIDATION_LEVEL.STRICT) in the inner gate: what hl7apy refuses is
answered with a precise ERR and stored as refused; tolerant peers are not affected."""

from __future__ import annotations

import pytest
import structlog

from adapters.hl7.ack import read_ack
from adapters.hl7.er7 import parse
from adapters.hl7.validation import strict_problem
from adapters.inner.receiver import InnerGateHandler
from tests.unit.test_hl7_enhanced_ack import TZ, Gate

# an SIU^S12 that hl7apy's strict validation accepts (SCH-6, SCH-16, SCH-20 and SCH-25 are required)
VALID = ("MSH|^~\\&|HIS|HOSPITAL|GATEWAYD|FRONT|20300101120000||SIU^S12^SIU_S12|{id}|P|{version}|||{msh15}|{msh16}\r"
         "SCH|||||D001^Dr Li|S12^booked|||15|MIN|^^15^{start}^{start}|||||DOC^Li||||DOC^Li|||||Booked\r"
         "RGS|1\rAIS|1||cardio^Cardiology|{start}|||15|MIN\rAIP|1||D001^Li^Na\r")


def siu(control_id, *, start="203001070900", version="2.5", msh15="", msh16="", drop=None) -> bytes:
    text = VALID.format(id=control_id, start=start, version=version, msh15=msh15, msh16=msh16)
    if drop:
        text = text.replace(drop, "")
    return text.encode()


@pytest.fixture
def strict_gate(tmp_path):
    g = Gate(tmp_path, validation="strict")
    yield g
    g.close()


def test_valid_message_passes_strict_validation(strict_gate):
    assert strict_problem(parse(siu("V0"))) is None
    [ack] = strict_gate.send(siu("V1"))
    assert read_ack(ack)[:2] == ("AA", "V1")


def test_missing_required_field_is_ae_101_at_that_field(strict_gate):
    """SCH-6 (event reason) is required in v2.5 SIU: strict peers get AE with ERR 101 at SCH-6 and hl7apy's
    words in ERR-8; enhanced mode gets CA (stored as refused) then AE."""
    bad = siu("V2", drop="S12^booked")
    [ae] = strict_gate.send(bad)
    assert read_ack(ae)[:2] == ("AE", "V2")
    err = ae.segment("ERR")
    assert (err.raw(2), err.get(3)) == ("SCH^1^6", "101") and "hl7apy" in err.get(8)
    answers = strict_gate.send(siu("V3", msh15="AL", msh16="AL", drop="S12^booked"))
    assert [read_ack(a)[0] for a in answers] == ["CA", "AE"]


def test_missing_segment_and_unsupported_version(strict_gate):
    """A missing required segment is 100 naming it; a version hl7apy does not know is AR 203 at MSH-12."""
    [ae] = strict_gate.send(siu("V4", drop="RGS|1\r"))
    assert read_ack(ae)[0] == "AE" and ae.segment("ERR").get(3) == "100"
    assert ae.segment("ERR").get(2) == "RGS"
    [ar] = strict_gate.send(siu("V5", version="9.9"))
    assert read_ack(ar)[0] == "AR"
    assert (ar.segment("ERR").raw(2), ar.segment("ERR").get(3)) == ("MSH^1^12", "203")


def test_bad_value_format_is_102(strict_gate):
    [ae] = strict_gate.send(siu("V6", start="2030-01-07"))
    assert read_ack(ae)[0] == "AE" and ae.segment("ERR").get(3) == "102"


def test_tolerant_gate_takes_what_strict_refuses(tmp_path):
    g = Gate(tmp_path)
    try:
        [ack] = g.send(siu("V7", drop="S12^booked"))
        assert read_ack(ack)[0] == "AA"
    finally:
        g.close()


def test_validation_mode_is_checked():
    with pytest.raises(ValueError, match="strict"):
        InnerGateHandler(None, peer="his", sending_application="A", sending_facility="F", tz=TZ, clock=None,
                         validation="paranoid")


@pytest.fixture(autouse=True)
def _reset_structlog():
    yield
    structlog.reset_defaults()
