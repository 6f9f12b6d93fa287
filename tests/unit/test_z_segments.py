"""The HIS's Z-segments (issue 6): kept verbatim with the message, and passed on to platforms as extensions
on the FHIR Slot when the endpoint says ``pass_z_segments`` — only those of the slot's publication (S23/S24,
SQR^S25 Open/Blocked), never those of a message about a patient's appointment."""

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from twisted.internet import task

from adapters.hl7.er7 import parse
from adapters.hl7.identity import sender
from adapters.maps.fhir_scheduling import Z_SEGMENT_EXTENSION, slot_resource
from adapters.maps.siu_slot import notices_from_siu, notices_from_sqr
from fhir.resources.R4B.slot import Slot
from gateway.domain.slot_book import SlotBook
from gateway.chamber.engine import Chamber
from gateway.domain.inbound import InboundService, Received
from gateway.domain.ids import slot_id
from tests.deferreds import successResultOf

TZ = ZoneInfo("Asia/Shanghai")
SID = slot_id("D001", datetime(2030, 1, 7, 9, 0))
FEE = "ZFE|1|12.00^CNY|\\T\\专家号\\X0A\\|\\E\\"  # escapes as the HIS wrote them: kept, never decoded


def siu(control_id: str, trigger: str = "S24", status: str = "Open", z: tuple[str, ...] = (FEE, "ZLV|专家"),
        charset: str = "UNICODE UTF-8", facility: str = "分院A") -> str:
    return "\r".join([
        f"MSH|^~\\&|HIS|{facility}^1.2.3^ISO|GATEWAYD|FRONT|20300101120000||SIU^{trigger}^SIU_S12|{control_id}|P|2.5"
        f"|||||CHN|{charset}",
        *z[:1],  # a Z-segment before SCH belongs to the message all the same
        f"SCH||H1|||D001^Dr Li||||15|MIN|^^15^203001070900^203001070915||||||||||||||{status}",
        "RGS|1",
        "AIS|1||cardio^Cardiology|203001070900|||15|MIN",
        *z[1:],
    ]) + "\r"


def test_the_siu_mapping_reads_the_facility_and_every_z_segment_verbatim():
    [n] = notices_from_siu(parse(siu("M1").encode()))
    assert n.schedule.facility == "分院A"  # MSH-4.1: the namespace id, not the OID
    assert n.z_segments == (FEE, "ZLV|专家")


def test_gb18030_z_segments_are_text_not_bytes():
    [n] = notices_from_siu(parse(siu("M1", charset="GB 18030-2000").encode("gb18030")))
    assert n.z_segments == (FEE, "ZLV|专家") and n.schedule.facility == "分院A"


def test_each_sqr_group_keeps_its_own_z_segments():
    sqr = "\r".join([
        "MSH|^~\\&|HIS|BRANCH-B|GATEWAYD|FRONT|20300101120000||SQR^S25^SQR_S25|Q1|P|2.5",
        "MSA|AA|Q1",
        "SCH|||||D001^Dr Li||||15|MIN|^^15^203001070900^203001070915||||||||||||||Open",
        "AIS|1||cardio^Cardiology|203001070900|||15|MIN",
        "ZFE|1|12.00",
        "SCH|||||D001^Dr Li||||15|MIN|^^15^203001070915^203001070930||||||||||||||Open",
        "AIS|1||cardio^Cardiology|203001070915|||15|MIN",
        "DSC",
    ]) + "\r"
    first, second = notices_from_sqr(parse(sqr.encode()))
    assert (first.z_segments, second.z_segments) == (("ZFE|1|12.00",), ())
    assert first.schedule.facility == second.schedule.facility == "BRANCH-B"


class Inner:
    """The inbound service on a real chamber, committing on ``clock.advance(0)``."""

    def __init__(self, chamber_backend, z_segment_peers):
        self.clock = task.Clock()
        self.clock.advance(datetime(2030, 1, 1, tzinfo=TZ).timestamp())
        self.chamber = Chamber(backend=chamber_backend(), reactor=self.clock, clock=self.clock.seconds)
        self.chamber.open()
        self.inbound = InboundService(self.chamber, SlotBook(TZ), z_segment_peers)

    def accept(self, text: str, peer: str = "his") -> None:
        message = parse(text.encode())
        d = self.inbound.accept(Received(peer, message.control_id, message.type_name, message.raw, message.charset,
                                         sender(message)),
                                notices_from_siu(message))
        self.clock.advance(0)
        assert successResultOf(d).code == "AA"

    def slot(self):
        return self.chamber.read().slot(SID)


@pytest.fixture
def inner(chamber_backend):
    i = Inner(chamber_backend, {"his"})
    yield i
    i.chamber.close()


def test_a_publication_s_z_segments_reach_the_slot_and_the_fhir_slot(inner):
    """S24 with two Z-segments: the slot keeps them; the FHIR Slot carries one extension each, in order,
    valueString the segment's ER7 as the HIS wrote it; the Slot is valid R4(B)."""
    inner.accept(siu("M1"))
    slot = inner.slot()
    assert slot.z_segments == f"{FEE}\rZLV|专家"
    resource = slot_resource(slot, TZ)
    assert resource["extension"] == [{"url": Z_SEGMENT_EXTENSION, "valueString": FEE},
                                     {"url": Z_SEGMENT_EXTENSION, "valueString": "ZLV|专家"}]
    Slot.model_validate(resource)
    message = inner.chamber.read().messages(direction="inbound")[0]
    assert FEE.encode() in message.body  # and the raw copy keeps them, byte for byte


def test_messages_about_a_patients_appointment_never_write_z_segments(inner):
    """S12 (booked) with a Z-segment of its own (it may name the patient) leaves the publication's
    Z-segments as they were; a later publication without Z-segments clears them."""
    inner.accept(siu("M1"))
    inner.accept(siu("M2", trigger="S12", status="Booked", z=("ZPT|王芳|13800000000",)))
    assert inner.slot().his_status == "busy"
    assert inner.slot().z_segments == f"{FEE}\rZLV|专家"
    inner.accept(siu("M3", trigger="S15", status="Cancelled", z=("ZPT|王芳|13800000000",)))
    assert inner.slot().his_status == "free" and "ZPT" not in inner.slot().z_segments
    inner.accept(siu("M4", trigger="S23", status="Blocked", z=()))
    assert inner.slot().z_segments is None
    assert "extension" not in slot_resource(inner.slot(), TZ)


def test_an_endpoint_without_pass_z_segments_keeps_them_only_in_the_raw_copy(chamber_backend):
    i = Inner(chamber_backend, {"pharmacy"})
    try:
        i.accept(siu("M1"), peer="his")
        assert i.slot().z_segments is None
        assert "extension" not in slot_resource(i.slot(), TZ)
        assert FEE.encode() in i.chamber.read().messages(direction="inbound")[0].body
    finally:
        i.chamber.close()
