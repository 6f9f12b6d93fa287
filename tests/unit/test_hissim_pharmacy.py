"""The HIS simulator's pharmacy role (hissim/pharmacy.py, hissim/pharmacy_messages.py), in-process: a
`HisSimulator` with a ``pharmacy`` section on a MemoryReactorClock, orders written into its pharmacy
listener's protocol over a StringTransport, a fake MLLP client standing in for the gateway's inner listener.

What is proved: every message the pharmacy writes (RRE^O12, ORP^O10, RDS^O13, the released RDE^O11) reads
back through the gateway's own mapping (`read_order_answer`, `dispenses_from_rds`, `released_prescription`)
with the expected ids, codes and statuses, in UTF-8 and GB18030; an out-of-stock drug gives UA + AE + ERR and
no dispense; an unknown message type gets AR with ERR 200; a resent order gets the very same answer and is
dispensed once; the journals name ids, never the patient. No sockets, no real time.
"""

from __future__ import annotations

import json
from datetime import date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import fail, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport

from adapters.hl7.er7 import format_message, parse
from adapters.maps.fhir_documents import medication_dispense
from adapters.maps.rde_order import read_order_answer
from adapters.maps.rds_dispense import dispenses_from_rds, released_prescription
from adapters.inner.framing import MLLPFramer, frame
from hissim.config import (
    DepartmentConfig,
    DoctorConfig,
    GatewayAddress,
    HisSimConfig,
    PharmacyConfig,
    ServiceConfig,
)
from hissim.pharmacy_messages import DRUGS, PATIENTS
from hissim.service import HisSimulator

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "pharmacy"
TZ = ZoneInfo("Asia/Shanghai")
T0 = datetime(2030, 1, 7, 9, 15, 0, tzinfo=TZ).timestamp()
#: the patient of the golden orders: must never reach a journal
PATIENT_DATA = ("王", "芳", "MRN-0001", "110101199001011234")
MSH18 = {"utf-8": "UNICODE UTF-8", "gb18030": "GB 18030-2000"}


def golden(name: str) -> bytes:
    """A golden HL7 file as on the wire (one segment per line in the file, CR on the wire)."""
    return (GOLDEN / name).read_bytes().replace(b"\n", b"\r")


def with_msh7(payload: bytes, msh7: bytes) -> bytes:
    """The same message stamped with another MSH-7 (what a resend may do)."""
    fields = payload.split(b"|", 7)
    fields[6] = msh7
    return b"|".join(fields)


def ack(message) -> object:
    """The gateway's AA to one of our messages."""
    return parse(format_message([["MSH", "^~\\&", "GATEWAYD", "FRONT", "HIS-PHARMACY", "HOSPITAL", "20300107091500",
                                  "", "ACK^O13^ACK", "A" + message.control_id, "P", "2.5"],
                                 ["MSA", "AA", message.msh.raw(10)]]).encode())


class FakeGateway:
    """Stands in for the MLLP client towards the gateway: records what is sent, answers AA (or fails)."""

    def __init__(self):
        self.sent: list[bytes] = []
        self.failures = 0  # how many next sends fail as if the gateway were down
        self.closed = False

    def send(self, payload, control_id, timeout):
        self.sent.append(payload)
        if self.failures:
            self.failures -= 1
            return fail(ConnectionRefusedError("gateway down"))
        return succeed(ack(parse(payload)))

    def close(self):
        self.closed = True

    def messages(self):
        return [parse(p) for p in self.sent]


class Pharmacy:
    """A simulator with a pharmacy, started on a fake reactor, and one connection to its pharmacy listener."""

    def __init__(self, tmp_path: Path, sim_charset="utf-8", **pharmacy):
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.reactor = MemoryReactorClock()
        self.reactor.advance(T0)
        self.gateway = FakeGateway()
        self.tmp_path = tmp_path
        config = HisSimConfig(
            departments=[DepartmentConfig(code="CARD", name="心内科", doctors=[
                DoctorConfig(id="D001", family="张", given="伟",
                             service=ServiceConfig(code="cardiology-consult", text="心内科门诊"),
                             sessions=["08:00-09:00"])])],
            listen="tcp:0:interface=127.0.0.1",
            gateway=GatewayAddress(host="127.0.0.1", port=1),
            publish="none",
            charset=sim_charset,
            start_date=date(2030, 1, 7).isoformat(),
            days=1,
            counter_bookings_per_minute=0.0,
            seed=7,
            received_log=tmp_path / "received.jsonl",
            sent_log=tmp_path / "sent.jsonl",
            pharmacy=PharmacyConfig(**{"listen": "tcp:0:interface=127.0.0.1", "dispense_delay": 2.0, **pharmacy}),
        )
        self.sim = HisSimulator(config, self.reactor, pharmacy_client=self.gateway)
        self.sim.startService()
        protocol = self.sim.pharmacy_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        protocol.makeConnection(self.transport)
        self.protocol = protocol
        self.framer = MLLPFramer()

    def order(self, payload: bytes) -> tuple[bytes, object]:
        """Write one order one byte at a time; the answer's bytes and parsed message."""
        self.transport.clear()
        data = frame(payload)
        for i in range(len(data)):
            self.protocol.dataReceived(data[i:i + 1])
        (answer,) = self.framer.feed(self.transport.value())
        return answer, parse(answer)

    def advance(self, seconds: float) -> None:
        self.reactor.advance(seconds)
        self.reactor.advance(0.01)  # the notifier's pump

    def journal(self, name: str) -> list[dict]:
        path = self.tmp_path / name
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# -- answers --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, charset", [("rde_o11_bundle.utf8.hl7", "utf-8"),
                                           ("rde_o11_bundle.gb18030.hl7", "gb18030")])
def test_an_rde_is_answered_rre_aa_with_a_filler_number_per_item(tmp_path, name, charset):
    """RRE^O12 in the simulator's charset (the pharmacy's default; MSH-18 says so), MSA AA answering the order's
    MSH-10, PID echoing the hospital's record number; the gateway's reader finds it accepted, ORC-1 OK for
    mr-1..3, each with a filler number of its own."""
    ph = Pharmacy(tmp_path, sim_charset=charset)
    raw, answer = ph.order(golden(name))
    raw.decode(charset)
    assert answer.msh.raw(9) == "RRE^O12^RRE_O12" and answer.msh.get(18) == MSH18[charset]
    assert (answer.msh.get(3), answer.msh.get(5)) == ("HIS-PHARMACY", "GATEWAYD")
    assert answer.segment("PID").components(3) == ["MRN-0001", "", "", "urn:gatewayd:his:mrn", "MR"]
    read = read_order_answer(answer)
    assert (read.acknowledges, read.code, read.accepted, read.reason) == ("G00000000000000000a1", "AA", True, "")
    assert [(i.placer_id, i.order_control) for i in read.items] == [("mr-1", "OK"), ("mr-2", "OK"), ("mr-3", "OK")]
    fillers = [i.filler_id for i in read.items]
    assert all(fillers) and len(set(fillers)) == 3
    assert [s.name for s in answer.segments] == ["MSH", "MSA", "PID", "ORC", "ORC", "ORC"]


def test_an_omp_is_answered_orp_aa(tmp_path):
    """OMP^O09 -> ORP^O10^ORP_O10, accepted, ORC-2 echoed (mr-9^GATEWAYD), a filler number in ORC-3."""
    ph = Pharmacy(tmp_path)
    _, answer = ph.order(golden("omp_o09_single.hl7"))
    assert answer.msh.raw(9) == "ORP^O10^ORP_O10"
    assert answer.segment("ORC").raw(2) == "mr-9^GATEWAYD"
    read = read_order_answer(answer)
    assert read.accepted and read.acknowledges == "G00000000000000000b2"
    assert [(i.placer_id, i.order_control, bool(i.filler_id)) for i in read.items] == [("mr-9", "OK", True)]


def test_an_out_of_stock_drug_is_ua_the_order_ae_with_an_err_naming_it_and_nothing_is_dispensed(tmp_path):
    """Y0002 out of stock: its ORC-1 UA with no filler number (ORC-16 OOS), the others OK; MSA AE; an ERR 207
    at RXE^2^2 naming the drug, which the gateway reads as the reason; no RDS follows."""
    ph = Pharmacy(tmp_path, out_of_stock=["Y0002"])
    _, answer = ph.order(golden("rde_o11_bundle.utf8.hl7"))
    read = read_order_answer(answer)
    assert (read.code, read.accepted) == ("AE", False)
    assert [(i.placer_id, i.order_control, bool(i.filler_id)) for i in read.items] == [
        ("mr-1", "OK", True), ("mr-2", "UA", False), ("mr-3", "OK", True)]
    err = answer.segment("ERR")
    assert (err.raw(2), err.get(3), err.get(4)) == ("RXE^2^2", "207", "E")
    assert "Y0002" in read.reason and read.reason == err.get(8)
    assert answer.all("ORC")[1].components(16) == ["OOS", "库存不足"]
    ph.advance(10)
    assert ph.gateway.sent == []


def test_every_out_of_stock_item_gets_an_err_of_its_own(tmp_path):
    """Two items out of stock: two ERRs, each at its own RXE."""
    ph = Pharmacy(tmp_path, out_of_stock=["Y0001", "Y0003"])
    _, answer = ph.order(golden("rde_o11_bundle.utf8.hl7"))
    assert [e.raw(2) for e in answer.all("ERR")] == ["RXE^1^2", "RXE^3^2"]
    assert [o.get(1) for o in answer.all("ORC")] == ["UA", "OK", "UA"]


@pytest.mark.parametrize("msh9, code", [("ADT^A01^ADT_A01", "200"), ("RDE^O25^RDE_O25", "201")])
def test_an_unknown_message_type_is_ar_with_an_err(tmp_path, msh9, code):
    """Anything but RDE^O11 / OMP^O09: ACK AR answering its MSH-10, ERR 200 (message type) or 201 (event) at
    MSH-9; read by the gateway as refused."""
    ph = Pharmacy(tmp_path)
    payload = format_message([["MSH", "^~\\&", "GATEWAYD", "FRONT", "HIS-PHARMACY", "HOSPITAL", "20300107091530",
                               "", msh9, "X1", "P", "2.5"], ["PID", "1", "", "MRN-0001"]]).encode()
    _, answer = ph.order(payload)
    assert answer.message_code == "ACK"
    err = answer.segment("ERR")
    assert (answer.segment("MSA").get(1), answer.segment("MSA").get(2)) == ("AR", "X1")
    assert (err.get(3), err.raw(2)) == (code, "MSH^1^9")
    assert not read_order_answer(answer).accepted


def test_an_order_the_gateway_could_not_read_is_ar_with_its_error(tmp_path):
    """An RDE without its RXR (route) is refused as the gateway's own reader refuses it: AR, ERR 101 at RXR."""
    ph = Pharmacy(tmp_path)
    rde = b"\r".join(s for s in golden("rde_o11_bundle.utf8.hl7").split(b"\r") if not s.startswith(b"RXR"))
    _, answer = ph.order(rde)
    err = answer.segment("ERR")
    assert answer.msh.raw(9) == "RRE^O12^RRE_O12" and answer.segment("MSA").get(1) == "AR"
    assert (err.get(3), err.raw(2)) == ("101", "RXR^1")
    ph.advance(10)
    assert ph.gateway.sent == []


# -- resends ---------------------------------------------------------------------------------------------


def test_a_resent_order_gets_the_very_same_answer_and_is_dispensed_once(tmp_path):
    """The same order again (same MSH-10, same content, MSH-7 stamped anew): the same answer bytes (same filler
    numbers), journalled as a duplicate, and one RDS only; the same MSH-10 with other content: AR 205."""
    ph = Pharmacy(tmp_path)
    first, _ = ph.order(golden("rde_o11_bundle.utf8.hl7"))
    again, _ = ph.order(with_msh7(golden("rde_o11_bundle.utf8.hl7"), b"20300107091600"))
    assert again == first
    ph.advance(2)
    _, reused = ph.order(golden("rde_o11_bundle.utf8.hl7").replace(b"|24|", b"|48|"))
    assert (reused.segment("MSA").get(1), reused.segment("ERR").get(3)) == ("AR", "205")
    ph.advance(10)
    assert [m.type_name for m in ph.gateway.messages()] == ["RDS^O13"]
    lines = ph.journal("received.jsonl")
    assert [(l["ack"], l.get("duplicate", False)) for l in lines] == [("AA", False), ("AA", True), ("AR", False)]
    assert lines[0]["fillers"] == lines[1]["fillers"]


# -- dispensing ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("charset", ["utf-8", "gb18030"])
def test_an_accepted_order_is_dispensed_after_the_delay_and_reads_back_as_medication_dispenses(tmp_path, charset):
    """Nothing before dispense_delay; then one RDS^O13 to the gateway in the pharmacy's charset, which the
    gateway maps to one MedicationDispense per item: authorizingPrescription MedicationRequest/mr-n (ORC-2),
    identifier <filler>-1 with the filler numbers of the answer, the drug and quantity of the order, handed
    over at the dispense time; the sent journal names the order, placers and fillers. (The simulator's own
    charset stays UTF-8: ``pharmacy.charset`` sets the pharmacy's.)"""
    ph = Pharmacy(tmp_path, sim_charset="utf-8", charset=charset)
    _, answer = ph.order(golden("rde_o11_bundle.utf8.hl7"))
    fillers = [i.filler_id for i in read_order_answer(answer).items]
    ph.advance(1.9)
    assert ph.gateway.sent == []
    ph.advance(0.1)
    (raw,) = ph.gateway.sent
    raw.decode(charset)
    rds = parse(raw)
    assert rds.type_name == "RDS^O13" and rds.msh.get(18) == MSH18[charset]
    dispenses = [medication_dispense(d, TZ) for d in dispenses_from_rds(rds, TZ)]
    assert [d["authorizingPrescription"][0]["reference"] for d in dispenses] == [
        "MedicationRequest/mr-1", "MedicationRequest/mr-2", "MedicationRequest/mr-3"]
    assert [d["identifier"][0]["value"] for d in dispenses] == [f"{f}-1" for f in fillers]
    assert [d["medicationCodeableConcept"]["coding"][0]["code"] for d in dispenses] == ["Y0001", "Y0002", "Y0003"]
    assert dispenses[0]["quantity"] == {"value": 24, "unit": "粒"}
    assert dispenses[0]["whenHandedOver"] == "2030-01-07T09:15:02+08:00"
    assert dispenses[0]["subject"]["identifier"]["value"] == "MRN-0001"
    (line,) = ph.journal("sent.jsonl")
    assert (line["type"], line["reason"], line["order"], line["placers"], line["fillers"]) == (
        "RDS^O13", "dispense", "G00000000000000000a1", ["mr-1", "mr-2", "mr-3"], fillers)
    assert line["control_id"] == rds.control_id


def test_a_dispense_the_gateway_does_not_take_is_resent_with_the_same_control_id(tmp_path):
    """The gateway down at first: the RDS goes again, the very same bytes, after the notifier's backoff."""
    ph = Pharmacy(tmp_path)
    ph.gateway.failures = 1
    ph.order(golden("rde_o11_bundle.utf8.hl7"))
    ph.advance(2)
    ph.advance(1)
    assert len(ph.gateway.sent) == 2 and ph.gateway.sent[0] == ph.gateway.sent[1]
    assert len(ph.journal("sent.jsonl")) == 1


# -- releases --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("charset", ["utf-8", "gb18030"])
def test_a_release_reads_back_as_a_released_prescription(tmp_path, charset):
    """release_now (SIGUSR2) sends an RDE^O11 the gateway accepts for release: every ORC-16 RELEASE, an order
    number in each ORC-3, a fresh prescription number each time, a patient of the fixed list, one to three
    drugs of the fixed list; the sent journal names prescription, placers and fillers."""
    ph = Pharmacy(tmp_path, sim_charset="utf-8", charset=charset)
    for _ in range(6):
        ph.sim.release_now()
    ph.advance(0)
    messages = ph.gateway.messages()
    assert [m.type_name for m in messages] == ["RDE^O11"] * 6
    numbers = set()
    for raw, message in zip(ph.gateway.sent, messages):
        raw.decode(charset)
        assert message.msh.get(18) == MSH18[charset]
        p = released_prescription(message)
        assert p.released and 1 <= len(p.items) <= 3
        assert all(item.filler_id for item in p.items)
        assert {item.medication.code for item in p.items} <= {d.code for d in DRUGS}
        assert p.patient.identifiers[0].value in {x.mrn for x in PATIENTS}
        assert p.prescriber.id and p.patient.family
        numbers.add(p.number)
    assert len(numbers) == 6
    lines = ph.journal("sent.jsonl")
    assert [(l["type"], l["reason"]) for l in lines] == [("RDE^O11", "release")] * 6
    assert {l["prescription"] for l in lines} == numbers


def test_releases_come_every_release_every_and_never_when_it_is_zero(tmp_path):
    """release_every 60s: one release a minute; the default 0: none."""
    ph = Pharmacy(tmp_path / "every", release_every=60.0)
    ph.advance(59)
    assert ph.gateway.sent == []
    ph.advance(1)
    for _ in range(2):
        ph.advance(60)
    assert [m.type_name for m in ph.gateway.messages()] == ["RDE^O11"] * 3
    quiet = Pharmacy(tmp_path / "never")
    quiet.advance(3600)
    assert quiet.gateway.sent == []


# -- wiring and journals ---------------------------------------------------------------------------------


def test_the_pharmacy_listens_on_its_own_endpoint_and_stops_cleanly(tmp_path):
    """Two listeners (the main one and the pharmacy's); stopping closes the pharmacy's client and cancels a
    pending dispense."""
    ph = Pharmacy(tmp_path)
    assert len(ph.reactor.tcpServers) == 2
    ph.order(golden("rde_o11_bundle.utf8.hl7"))
    ph.sim.stopService()
    assert ph.gateway.closed
    ph.advance(10)
    assert ph.gateway.sent == []


def test_the_journals_name_ids_never_the_patient(tmp_path):
    """Received and sent lines carry control ids, types, acks, prescription numbers, placer and filler ids;
    no patient name or identifier."""
    ph = Pharmacy(tmp_path, out_of_stock=["Y0002"])
    ph.order(golden("rde_o11_bundle.utf8.hl7"))
    ph.order(golden("omp_o09_single.hl7"))
    ph.advance(3)
    ph.sim.release_now()
    ph.advance(0)
    received = ph.journal("received.jsonl")
    assert [(l["type"], l["ack"], l["prescription"]) for l in received] == [
        ("RDE^O11", "AE", "RX20300107-0001"), ("OMP^O09", "AA", "RX20300107-0002")]
    assert received[0]["fillers"][1] is None and "Y0002" in received[0]["reason"]
    text = (tmp_path / "received.jsonl").read_text(encoding="utf-8") + (tmp_path / "sent.jsonl").read_text(
        encoding="utf-8")
    assert not [x for x in PATIENT_DATA + tuple(p.mrn for p in PATIENTS) + tuple(p.family + p.given for p in PATIENTS)
                if x in text]

