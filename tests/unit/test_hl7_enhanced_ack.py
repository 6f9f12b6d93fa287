"""Acknowledgement modes (HL7 v2.5 section 2.9): which answers a message gets, what they say, and that the
inner gate gives them only after the chamber committed.

The policy (`answer_codes`) is tested as a table; the answers themselves by parsing them back; the inner
gate end to end on a StringTransport with a real chamber (SQLite in tmp_path) whose commits run when the
test advances the clock, so "nothing before COMMIT" is observable.
"""

from __future__ import annotations

import itertools
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
import structlog
from structlog.testing import capture_logs
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from adapters.hl7.ack import (
    AckRequest,
    answer_codes,
    build_answers,
    build_nak_for_unparseable,
    read_ack,
    requested_acks,
)
from adapters.hl7.er7 import Hl7Error, parse
from adapters.inner.receiver import InnerGateHandler
from adapters.inner.framing import COMMIT_ACK, COMMIT_NAK, MLLPFramer, frame
from adapters.inner.listener import Answer, MLLPServerFactory
from gateway.domain.slot_book import SlotBook
from gateway.chamber.engine import Chamber
from gateway.chamber.errors import ChamberWriteError
from gateway.domain.inbound import InboundService

TZ = ZoneInfo("Asia/Shanghai")
NOW = datetime(2030, 1, 1, 12, 0)


def siu(control_id: str, msh15: str = "", msh16: str = "", *, trigger: str = "S24", schedule: str = "D001",
        version: str = "2.5", kind: str = "SIU") -> bytes:
    return (
        f"MSH|^~\\&|HIS|HOSPITAL|GATEWAYD|FRONT|20300101120000||{kind}^{trigger}^SIU_S12|{control_id}|P|{version}"
        f"|||{msh15}|{msh16}||UNICODE UTF-8\r"
        f"SCH|||||{schedule}^Dr Li||||15|MIN|^^15^203001070900^203001070915|||||||||||||Open\r"
        "RGS|1\r"
        "AIS|1||cardio^Cardiology|203001070900|||15|MIN\r"
    ).encode()


def kw():
    ids = (f"A{i}" for i in itertools.count(1))
    return {"sending_application": "GATEWAYD", "sending_facility": "FRONT", "control_id": lambda: next(ids),
            "now": NOW}


# ============================================================================================ policy

ENHANCED = [
    # MSH-15, MSH-16, outcome, app code -> answers
    ("AL", "NE", "accepted", "AA", ["CA"]),
    ("AL", "NE", "accepted", "AE", ["CA"]),
    ("AL", "NE", "rejected", "AA", ["CR"]),
    ("AL", "NE", "not_stored", "AA", ["CE"]),
    ("AL", "AL", "accepted", "AA", ["CA", "AA"]),
    ("AL", "AL", "accepted", "AE", ["CA", "AE"]),
    ("AL", "AL", "rejected", "AA", ["CR"]),
    ("AL", "ER", "accepted", "AA", ["CA"]),
    ("AL", "ER", "accepted", "AE", ["CA", "AE"]),
    ("AL", "SU", "accepted", "AA", ["CA", "AA"]),
    ("AL", "SU", "accepted", "AE", ["CA"]),
    ("NE", "NE", "accepted", "AA", []),
    ("NE", "NE", "not_stored", "AA", []),
    ("NE", "AL", "accepted", "AA", ["AA"]),
    ("NE", "AL", "not_stored", "AA", []),
    ("ER", "NE", "accepted", "AA", []),
    ("ER", "NE", "rejected", "AA", ["CR"]),
    ("ER", "NE", "not_stored", "AA", ["CE"]),
    ("ER", "AL", "accepted", "AE", ["AE"]),
    ("SU", "NE", "accepted", "AA", ["CA"]),
    ("SU", "NE", "rejected", "AA", []),
    ("SU", "NE", "not_stored", "AA", []),
]


@pytest.mark.parametrize("msh15,msh16,outcome,app_code,expected", ENHANCED)
def test_enhanced_mode_table(msh15, msh16, outcome, app_code, expected):
    """Enhanced mode: CA/CR/CE per MSH-15 (AL always, NE never, ER only when not CA, SU only when CA), then
    for an accepted message AA/AE per MSH-16 with the same conditions; nothing after CR or CE."""
    assert answer_codes(AckRequest(True, msh15, msh16), outcome, app_code) == expected


@pytest.mark.parametrize("outcome,app_code,expected", [
    ("accepted", "AA", ["AA"]), ("accepted", "AE", ["AE"]), ("rejected", "AA", ["AR"]),
    ("not_stored", "AA", ["AE"]),
])
def test_original_mode_table(outcome, app_code, expected):
    """Original mode: exactly one application acknowledgement, AE for 'send it again', AR for 'do not'."""
    assert answer_codes(AckRequest(), outcome, app_code) == expected


def test_requested_acks_reads_and_normalises_msh15_msh16():
    """Both empty: original mode. Otherwise enhanced; an empty one means NE, an unknown one AL, case and
    spaces do not matter."""
    assert requested_acks(parse(siu("C1"))) == AckRequest(False, "", "")
    assert requested_acks(parse(siu("C1", "AL", "NE"))) == AckRequest(True, "AL", "NE")
    assert requested_acks(parse(siu("C1", "AL", ""))) == AckRequest(True, "AL", "NE")
    assert requested_acks(parse(siu("C1", "", "al"))) == AckRequest(True, "NE", "AL")
    assert requested_acks(parse(siu("C1", "XX", " er "))) == AckRequest(True, "AL", "ER")


def test_policy_refuses_nonsense():
    with pytest.raises(ValueError):
        answer_codes(AckRequest(), "maybe")
    with pytest.raises(ValueError):
        answer_codes(AckRequest(), "accepted", "CA")


# =========================================================================================== answers


def test_commit_accept_carries_no_error_and_asks_for_no_answer():
    """CA then AE: the CA has MSA-1 CA, MSA-2 = the message's MSH-10, no MSA-3 and no ERR; the AE carries
    the error in MSA-3 and ERR (ERR-2 location, ERR-3 code^text^HL70357, ERR-4 E, ERR-8 text). Both are
    ACK^S24^ACK, echo MSH-18, and set MSH-15 = MSH-16 = NE."""
    msg = parse(siu("C1", "AL", "AL"))
    err = Hl7Error(101, "SCH-5 (schedule id) is empty", segment="SCH", field=5)
    ca, ae = (parse(a) for a in build_answers(msg, "accepted", app_code="AE", error=err, **kw()))
    assert read_ack(ca) == ("CA", "C1", "") and ca.segment("ERR") is None
    assert read_ack(ae) == ("AE", "C1", "SCH-5 (schedule id) is empty")
    e = ae.segment("ERR")
    assert (e.raw(2), e.raw(3), e.get(4), e.get(8)) == (
        "SCH^1^5", "101^Required field missing^HL70357", "E", "SCH-5 (schedule id) is empty")
    for a in (ca, ae):
        assert a.msh.raw(9) == "ACK^S24^ACK"
        assert (a.accept_ack_type, a.application_ack_type) == ("NE", "NE")
        assert a.msh.get(18) == "UNICODE UTF-8"
    assert (ca.control_id, ae.control_id) == ("A1", "A2")


def test_original_mode_answers_keep_msh15_msh16_empty():
    """Original mode answers look exactly as before: no MSH-15/16, MSH-18 echoed in its place."""
    [aa] = build_answers(parse(siu("C1")), "accepted", **kw())
    ack = parse(aa)
    assert read_ack(ack) == ("AA", "C1", "")
    assert (ack.accept_ack_type, ack.application_ack_type, ack.msh.get(18)) == ("", "", "UNICODE UTF-8")


def test_commit_reject_and_commit_error_carry_err():
    """CR (rejected) and CE (not stored) carry MSA-3 and ERR like AR/AE do."""
    msg = parse(siu("C1", "AL", "NE"))
    [cr] = build_answers(msg, "rejected", error=Hl7Error(200, "no ADT here", segment="MSH", field=9), **kw())
    [ce] = build_answers(msg, "not_stored", error=Hl7Error(207, "disk full; send it again"), **kw())
    cr, ce = parse(cr), parse(ce)
    assert read_ack(cr) == ("CR", "C1", "no ADT here") and cr.segment("ERR").raw(2) == "MSH^1^9"
    assert cr.segment("ERR").get(3) == "200"
    assert read_ack(ce) == ("CE", "C1", "disk full; send it again") and ce.segment("ERR").get(3) == "207"


def test_err_1_is_filled_for_versions_before_2_5():
    """A v2.3/v2.4 receiver knows only ERR-1 (ELD): it gets segment^sequence^field^code&text&HL70357 there,
    and ERR-2..8 as in v2.5; a v2.5 answer leaves ERR-1 empty."""
    err = Hl7Error(101, "SCH-5 missing", segment="SCH", field=5)
    [old] = build_answers(parse(siu("C1", version="2.3")), "accepted", app_code="AE", error=err, **kw())
    [new] = build_answers(parse(siu("C1")), "accepted", app_code="AE", error=err, **kw())
    old, new = parse(old).segment("ERR"), parse(new).segment("ERR")
    assert old.raw(1) == "SCH^1^5^101&Required field missing&HL70357" and old.raw(2) == "SCH^1^5"
    assert new.raw(1) == "" and new.raw(2) == "SCH^1^5"


def test_nak_for_unparseable_enhanced_message_is_cr():
    """A message that does not parse but whose MSH-15/16 can be read as enhanced gets CR (not AR), even when
    MSH-15 says NE: fields of a broken message are not trusted to mean 'stay silent'."""
    raw = b"MSH|^~\\&|HIS|H|GW|G|20300101||SIU^S12|C9|P||||NE|NE\rPID|1\r"  # MSH-12 empty: 101
    with pytest.raises(Hl7Error) as info:
        parse(raw)
    nak = parse(build_nak_for_unparseable(raw, info.value, sending_application="GW", sending_facility="F",
                                          control_id="N1", now=NOW))
    assert read_ack(nak)[:2] == ("CR", "C9")
    assert (nak.accept_ack_type, nak.application_ack_type) == ("NE", "NE")
    assert nak.segment("ERR").raw(2) == "MSH^1^12"


# ============================================================================ the listener, several answers


class ListHandler:
    def __init__(self, answer):
        self.answer = answer

    def handle(self, message, peer):
        return self.answer(message)


def connect(factory):
    addr = IPv4Address("TCP", "10.0.0.9", 4000)
    proto = factory.buildProtocol(addr)
    tr = StringTransport(peerAddress=addr)
    proto.makeConnection(tr)
    return proto, tr


def frames(tr) -> list[bytes]:
    return MLLPFramer().feed(tr.value())


def listener(handler, **options):
    ids = (f"N{i}" for i in itertools.count(1))
    return MLLPServerFactory(handler, clock=task.Clock(), ack_control_id=lambda: next(ids), **options)


@pytest.mark.parametrize("shape", [list, tuple, lambda p: Answer(tuple(p))])
def test_handler_may_return_several_answers(shape):
    """A handler's list/tuple/Answer of payloads is written as that many frames, in order."""
    factory = listener(ListHandler(lambda m: shape(build_answers(m, "accepted", **kw()))))
    proto, tr = connect(factory)
    proto.dataReceived(frame(siu("C1", "AL", "AL")))
    assert [read_ack(parse(f))[0] for f in frames(tr)] == ["CA", "AA"]


def test_handler_may_return_no_answer():
    """An empty list means nothing is written, and the next frame is handled as usual."""
    answers = iter([[], [b"MSH|^~\\&|GW|F|HIS|H|20300101||ACK|N|P|2.5\rMSA|AA|C2\r"]])
    factory = listener(ListHandler(lambda m: next(answers)))
    proto, tr = connect(factory)
    proto.dataReceived(frame(siu("C1", "NE", "NE")))
    assert tr.value() == b""
    proto.dataReceived(frame(siu("C2")))
    assert [read_ack(parse(f))[1] for f in frames(tr)] == ["C2"]


@pytest.mark.parametrize("bad", [[b"ok", "text"], [b"\x0bbad"], Answer((b"x\x1c",))])
def test_unusable_answer_lists_give_ae(bad):
    """A list with something that is not bytes, or a payload that cannot be framed, is a bad answer: AE 207
    (never a half-written answer)."""
    factory = listener(ListHandler(lambda m: bad))
    proto, tr = connect(factory)
    with capture_logs():
        proto.dataReceived(frame(siu("C1")))
    [f] = frames(tr)
    assert read_ack(parse(f))[:2] == ("AE", "C1")


@pytest.mark.parametrize("msh15,expected", [("AL", ["CE"]), ("ER", ["CE"]), ("NE", []), ("SU", [])])
def test_failing_handler_in_enhanced_mode_gives_ce_as_msh15_asks(msh15, expected):
    """When the handler fails, an enhanced-mode sender gets CE 207 if MSH-15 asks for errors, else nothing;
    never CA."""
    factory = listener(ListHandler(lambda m: defer.fail(RuntimeError("boom"))))
    proto, tr = connect(factory)
    with capture_logs():
        proto.dataReceived(frame(siu("C1", msh15, "AL")))
    assert [read_ack(parse(f))[0] for f in frames(tr)] == expected


# ================================================================================ the inner gate, for real


class Gate:
    """The inner gate's listener + handler + inbound service + a real chamber in tmp_path. Chamber commits
    run when ``commit()`` advances the clock (group commit per reactor turn)."""

    def __init__(self, tmp_path, inbound=None, validation="tolerant", **options):
        self.clock = task.Clock()
        self.clock.advance(datetime(2030, 1, 1, tzinfo=TZ).timestamp())
        self.chamber = Chamber(tmp_path / "chamber.sqlite3", reactor=self.clock, clock=self.clock.seconds)
        self.chamber.open()
        self.inbound = inbound or InboundService(self.chamber, SlotBook(TZ))
        handler = InnerGateHandler(self.inbound, peer="his", sending_application="GATEWAYD",
                                   sending_facility="FRONT", tz=TZ, clock=self.clock, validation=validation)
        self.factory = MLLPServerFactory(handler, clock=self.clock, idle_timeout=None, **options)
        self.proto, self.tr = connect(self.factory)

    def send(self, payload: bytes) -> list:
        """Deliver one frame, check nothing is answered before COMMIT, commit, return the parsed answers."""
        self.tr.clear()
        self.proto.dataReceived(frame(payload))
        assert self.tr.value() == b"", "an answer was written before the chamber committed"
        self.clock.advance(0)
        return [parse(f) for f in frames(self.tr) if f not in (COMMIT_ACK, COMMIT_NAK)]

    def close(self):
        self.chamber.close()


@pytest.fixture
def gate(tmp_path):
    g = Gate(tmp_path)
    yield g
    g.close()


def codes(answers) -> list[str]:
    return [read_ack(a)[0] for a in answers]


def test_typical_enhanced_sender_gets_exactly_one_ca_after_commit(gate):
    """MSH-15=AL, MSH-16=NE (what ../shared/tools/mllp_load.py sends): exactly one CA, written only after
    the chamber committed, and no application ACK; the slot is in the chamber."""
    answers = gate.send(siu("E1", "AL", "NE"))
    assert codes(answers) == ["CA"] and read_ack(answers[0])[1] == "E1"
    assert gate.chamber.read().slot("D001-203001070900") is not None


def test_enhanced_sender_asking_for_both_gets_ca_then_aa(gate):
    answers = gate.send(siu("E2", "AL", "AL", schedule="D002"))
    assert codes(answers) == ["CA", "AA"]
    assert [read_ack(a)[1] for a in answers] == ["E2", "E2"]
    assert answers[0].control_id != answers[1].control_id


def test_original_mode_still_gets_one_aa(gate):
    assert codes(gate.send(siu("O1", schedule="D003"))) == ["AA"]


def test_bad_siu_in_enhanced_mode_is_committed_then_refused(gate):
    """An SIU without a schedule is stored (refused, for an operator to reprocess), so the commit ACK is CA;
    the application ACK is AE with ERR at SCH-5 - only when MSH-16 asks (AL/ER), not with NE/SU."""
    bad = siu("B1", "AL", "ER", schedule="")
    answers = gate.send(bad)
    assert codes(answers) == ["CA", "AE"]
    assert answers[1].segment("ERR").raw(2) == "SCH^1^5" and answers[1].segment("ERR").get(3) == "101"
    assert codes(gate.send(siu("B2", "AL", "NE", schedule=""))) == ["CA"]
    assert codes(gate.send(siu("B3", "AL", "SU", schedule=""))) == ["CA"]
    assert codes(gate.send(siu("B4", schedule=""))) == ["AE"]


def test_unsupported_type_is_cr_in_enhanced_mode(gate):
    """A message type the gate does not take is a commit reject (CR, ERR 200 at MSH-9): no application ACK
    follows, whatever MSH-16 says."""
    answers = gate.send(siu("T1", "AL", "AL", kind="ADT", trigger="A01"))
    assert codes(answers) == ["CR"]
    assert answers[0].segment("ERR").get(3) == "200" and answers[0].segment("ERR").raw(2) == "MSH^1^9"
    assert codes(gate.send(siu("T2", "ER", "AL", kind="ADT", trigger="A01"))) == ["CR"]
    assert codes(gate.send(siu("T3", "SU", "AL", kind="ADT", trigger="A01"))) == []
    assert codes(gate.send(siu("T4", kind="ADT", trigger="A01"))) == ["AR"]


def test_resend_is_answered_again_as_first_time_and_reuse_is_refused(gate):
    """A resend (same control id, same bytes) gets the same codes again without being applied twice; the
    same control id with other content is a commit reject (CR, ERR 205 at MSH-10), AR in original mode."""
    first = gate.send(siu("R1", "AL", "AL", schedule="D004"))
    again = gate.send(siu("R1", "AL", "AL", schedule="D004"))
    assert codes(first) == codes(again) == ["CA", "AA"]
    reused = gate.send(siu("R1", "AL", "AL", schedule="D005"))
    assert codes(reused) == ["CR"]
    assert reused[0].segment("ERR").get(3) == "205" and reused[0].segment("ERR").raw(2) == "MSH^1^10"
    assert codes(gate.send(siu("R1", schedule="D006"))) == ["AR"]
    bad = siu("R2", "AL", "AL", schedule="")
    assert codes(gate.send(bad)) == codes(gate.send(bad)) == ["CA", "AE"]


def test_acks_sent_to_the_listener_are_not_answered(gate):
    """An ACK (for example a HIS acknowledging our application ACK) is never acknowledged: nothing is
    written, nothing stored, and the connection goes on."""
    ack = b"MSH|^~\\&|HIS|HOSPITAL|GATEWAYD|FRONT|20300101||ACK^S24^ACK|K1|P|2.5\rMSA|CA|A7\r"
    with capture_logs() as logs:
        assert gate.send(ack) == []
    assert next(e for e in logs if e["event"] == "inner.ack_ignored")["control_id"] == "K1"
    assert codes(gate.send(siu("K2", schedule="D007"))) == ["AA"]


class BrokenInbound:
    """An inbound service whose chamber cannot commit: its commit fails at the next reactor turn."""

    def __init__(self):
        self.clock = None

    def accept(self, received, notices):
        def fail():
            raise ChamberWriteError("disk I/O error")
        return task.deferLater(self.clock, 0, fail)

    refuse = accept


@pytest.mark.parametrize("msh15,msh16,expected", [("", "", ["AE"]), ("AL", "NE", ["CE"]), ("AL", "AL", ["CE"]),
                                                  ("NE", "AL", [])])
def test_not_stored_is_never_ca_or_aa(tmp_path, msh15, msh16, expected):
    """When the chamber cannot commit: AE (original) or CE (enhanced, when MSH-15 asks), ERR 207 'send it
    again'; never CA or AA, and no application ACK."""
    broken = BrokenInbound()
    g = Gate(tmp_path, inbound=broken)
    broken.clock = g.clock
    try:
        with capture_logs():
            answers = g.send(siu("N1", msh15, msh16))
        assert codes(answers) == expected
        for a in answers:
            assert a.segment("ERR").get(3) == "207" and "send it again" in read_ack(a)[2]
    finally:
        g.close()


@pytest.fixture(autouse=True)
def _reset_structlog():
    yield
    structlog.reset_defaults()
