"""HIS resends through the inner gate (issue 15, finding 10). A message is known by its sender (MSH-3, MSH-4)
and its control id (MSH-10); a resend that differs only in MSH-7's time (a sender that builds the message
again stamps it anew) is the same message: it gets the first answer again and is applied once. Other content
under the same identity is refused (AR 205), as before.

The listener, the inner gate's handler, the inbound service and a real chamber (SQLite in tmp_path) on a
StringTransport; commits run when the test advances the clock.
"""

from __future__ import annotations

from datetime import datetime

import pytest
from twisted.internet import task

from adapters.hl7.ack import read_ack
from adapters.hl7.er7 import parse
from adapters.hl7.identity import same_message, sender
from adapters.inner.receiver import InnerGateHandler
from adapters.inner.framing import COMMIT_ACK, COMMIT_NAK, frame
from adapters.inner.listener import MLLPServerFactory
from gateway.domain.slot_book import SlotBook
from gateway.chamber.engine import Chamber
from gateway.domain.inbound import InboundService
from tests.unit.test_hl7_enhanced_ack import TZ, connect, frames


def siu(control_id: str, msh7: str = "20300101120000", *, status: str = "Open", app: str = "HIS",
        facility: str = "HOSPITAL", schedule: str = "D001", acks: str = "") -> bytes:
    return (
        f"MSH|^~\\&|{app}|{facility}|GATEWAYD|FRONT|{msh7}||SIU^S24^SIU_S12|{control_id}|P|2.5|||{acks}\r"
        f"SCH|||||{schedule}^Dr Li||||15|MIN|^^15^203001070900^203001070915|||||||||||||{status}\r"
        "RGS|1\r"
        "AIS|1||cardio^Cardiology|203001070900|||15|MIN\r"
    ).encode()


class Gate:
    """The inner gate as gateway.service wires it (the inbound service compares resends with
    `adapters.hl7.identity.same_message`), on a real chamber in tmp_path."""

    def __init__(self, tmp_path):
        self.clock = task.Clock()
        self.clock.advance(datetime(2030, 1, 1, tzinfo=TZ).timestamp())
        self.chamber = Chamber(tmp_path / "chamber.sqlite3", reactor=self.clock, clock=self.clock.seconds)
        self.chamber.open()
        inbound = InboundService(self.chamber, SlotBook(TZ), same_message=same_message)
        handler = InnerGateHandler(inbound, peer="his", sending_application="GATEWAYD", sending_facility="FRONT",
                                   tz=TZ, clock=self.clock)
        self.proto, self.tr = connect(MLLPServerFactory(handler, clock=self.clock, idle_timeout=None))

    def send(self, payload: bytes) -> list[tuple[str, str, str]]:
        """One frame in, committed; (MSA-1, MSA-2, text) of each answer."""
        self.tr.clear()
        self.proto.dataReceived(frame(payload))
        self.clock.advance(0)
        return [read_ack(parse(f)) for f in frames(self.tr) if f not in (COMMIT_ACK, COMMIT_NAK)]

    def inbound(self, control_id: str):
        return [m for m in self.chamber.read().messages(direction="inbound") if m.control_id == control_id]

    def story(self, message_id: int) -> list[str]:
        return [state for _, state, _ in self.chamber.read().message_events(message_id)]


@pytest.fixture
def gate(tmp_path):
    g = Gate(tmp_path)
    yield g
    g.chamber.close()


def test_a_resend_with_a_new_msh_7_gets_the_first_answer_again_and_is_applied_once(gate):
    """Before: AR 205 'control id was already used for a different message'. Now: AA twice, one message in
    the chamber, applied once (one 'delivered' line in its story)."""
    first = gate.send(siu("R1", "20300101120000"))
    again = gate.send(siu("R1", "20300101120107"))
    assert [a[:2] for a in first] == [a[:2] for a in again] == [("AA", "R1")]
    [stored] = gate.inbound("R1")
    assert stored.body == siu("R1", "20300101120000")  # the first copy is kept as it came
    assert stored.sender == "HIS|HOSPITAL"
    assert gate.story(stored.id).count("delivered") == 1


def test_a_resend_in_enhanced_mode_gets_ca_again(gate):
    assert [a[0] for a in gate.send(siu("E1", acks="AL|AL"))] == ["CA", "AA"]
    assert [a[0] for a in gate.send(siu("E1", "20300101120500", acks="AL|AL"))] == ["CA", "AA"]
    assert len(gate.inbound("E1")) == 1


def test_a_resend_of_a_refused_message_gets_the_same_refusal(gate):
    """The first answer again, also when it was AE (a message the slot book cannot read is stored as
    refused): the same code, and ERR at the same place."""
    first = gate.send(siu("B1", schedule=""))
    again = gate.send(siu("B1", "20300101130000", schedule=""))
    assert first[0][0] == again[0][0] == "AE" and first[0][2] == again[0][2]
    assert len(gate.inbound("B1")) == 1


def test_other_content_under_the_same_sender_and_control_id_is_still_refused_with_205(gate):
    gate.send(siu("C1"))
    for resend in (siu("C1", status="Blocked"), siu("C1", "20300101120900", status="Blocked")):
        [(code, control_id, text)] = gate.send(resend)
        assert (code, control_id) == ("AR", "C1") and "already used for a different message" in text
    [stored] = gate.inbound("C1")
    assert stored.body == siu("C1")


def test_a_changed_msh_7_time_zone_is_other_content(gate):
    """MSH-7's time zone is the default time zone of every time in the message (v2.5 chapter 2A, data types
    TM and TS): a resend may restamp the time, not move the message to another zone."""
    gate.send(siu("Z1", "20300101120000+0800"))
    assert gate.send(siu("Z1", "20300101120100+0800"))[0][:2] == ("AA", "Z1")
    assert gate.send(siu("Z1", "20300101040100+0000"))[0][:2] == ("AR", "Z1")


def test_the_same_control_id_from_another_sender_is_another_message(gate):
    """MSH-10 is unique per sender only: another facility (MSH-4) or application (MSH-3) numbering its
    messages the same way is not resending ours. Before: AR 205, the message lost."""
    assert gate.send(siu("S1", facility="HOSPITAL"))[0][:2] == ("AA", "S1")
    assert gate.send(siu("S1", facility="BRANCH", schedule="D002"))[0][:2] == ("AA", "S1")
    assert gate.send(siu("S1", app="LIS", schedule="D003"))[0][:2] == ("AA", "S1")
    assert sorted(m.sender for m in gate.inbound("S1")) == ["HIS|BRANCH", "HIS|HOSPITAL", "LIS|HOSPITAL"]
    assert gate.chamber.read().slot("D002-203001070900") is not None


# ============================================================================ the identity, as pure functions


def test_sender_is_msh_3_and_msh_4_as_sent():
    message = parse(b"MSH#^~\\&#HIS^1.2.3^ISO#\\T\\HOSP#GW#FRONT#20300101##SIU^S12#X1#P#2.5\r")
    assert sender(message) == "HIS^1.2.3^ISO#\\T\\HOSP"


@pytest.mark.parametrize("first,resent,same", [
    (siu("X"), siu("X"), True),
    (siu("X", "20300101120000"), siu("X", "203001011201"), True),  # another precision is another stamp
    (siu("X", "20300101120000^S"), siu("X", "20300101120100"), True),  # the old precision component
    (siu("X", "20300101120000+0800"), siu("X", "20300101130000+0800"), True),
    (siu("X", "20300101120000+0800"), siu("X", "20300101120000"), False),
    (siu("X"), siu("X", status="Blocked"), False),
    (siu("X"), siu("X") + b"NTE|1\r", False),
    (siu("X"), siu("X", acks="AL|NE"), False),  # MSH-15/16: how to answer is content
    (siu("X"), siu("X").replace(b"|P|", b"|T|"), False),  # MSH-11: production or test
])
def test_same_message_ignores_only_msh_7_s_time(first, resent, same):
    assert same_message(first, "utf-8", resent, "utf-8") is same


def test_same_message_compares_text_across_charsets():
    """The same text in the same charset is the same message; what the bytes mean is compared, not how a
    GB18030 name happens to split into fields."""
    text = "MSH|^~\\&|HIS|億院|GW|FRONT|{}||SIU^S12|G1|P|2.5||||||GB 18030-2000\rPID|1||1||张^三\r"
    a = text.format("20300101120000").encode("gb18030")
    b = text.format("20300101120500").encode("gb18030")
    assert same_message(a, "gb18030", b, "gb18030")
    assert not same_message(a, "gb18030", text.replace("张", "李").format("20300101120500").encode("gb18030"),
                            "gb18030")
