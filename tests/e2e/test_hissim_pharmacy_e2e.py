"""The HIS simulator's pharmacy as a real process on loopback (``python -m gateway his-sim``), no gateway: the
test sends the golden RDE^O11 to the pharmacy's own MLLP port over a real socket and stands in for the
gateway's inner listener with a plain socket server that ACKs AA. Proves: the order is answered RRE^O12
accepted with a filler number per item; the RDS^O13 reaches "the gateway" after ``dispense_delay`` and maps to
the dispenses of those items; SIGUSR2 makes a released RDE^O11 arrive; both journals record it all.
"""

from __future__ import annotations

import signal
import socket
import socketserver
import threading
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import yaml

from adapters.hl7.er7 import format_message, parse
from adapters.maps.fhir_documents import medication_dispense
from adapters.maps.rde_order import read_order_answer
from adapters.maps.rds_dispense import dispenses_from_rds, released_prescription
from adapters.inner.framing import MLLPFramer, frame
from tests.e2e.harness import (
    REPO,
    Proc,
    eventually,
    free_port,
    mllp_exchange,
    read_jsonl,
)

GOLDEN = REPO / "tests" / "golden" / "pharmacy"
DISPENSE_DELAY = 1.5


class StandInGateway(socketserver.ThreadingTCPServer):
    """Plays the gateway's inner MLLP listener: keeps every message (with its arrival time), ACKs it AA."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Connection)
        self.port = self.server_address[1]
        self.arrivals: list[tuple[float, object]] = []
        self.lock = threading.Lock()

    def messages(self, type_name: str) -> list[tuple[float, object]]:
        with self.lock:
            return [(t, m) for t, m in self.arrivals if m.type_name == type_name]


class _Connection(socketserver.BaseRequestHandler):
    def handle(self):
        framer = MLLPFramer()
        while data := self.request.recv(65536):
            for payload in framer.feed(data):
                message = parse(payload)
                with self.server.lock:
                    self.server.arrivals.append((time.monotonic(), message))
                ack = format_message([["MSH", "^~\\&", "GATEWAYD", "FRONT", "HIS-PHARMACY", "HOSPITAL",
                                       "20300107091500", "", "ACK^O13^ACK", "A" + message.control_id, "P", "2.5"],
                                      ["MSA", "AA", message.msh.raw(10)]])
                self.request.sendall(frame(ack.encode()))


def test_pharmacy_answers_dispenses_and_releases_over_real_sockets(tmp_path: Path):
    gateway = StandInGateway()
    threading.Thread(target=gateway.serve_forever, daemon=True).start()
    pharmacy_port = free_port()
    config = {
        "listen": f"tcp:{free_port()}:interface=127.0.0.1",
        "gateway": {"host": "127.0.0.1", "port": gateway.port},
        "publish": "none",
        "counter_bookings_per_minute": 0,
        "received_log": "his-received.jsonl",
        "sent_log": "his-sent.jsonl",
        "retry_initial": "200ms",
        "departments": [{"code": "CARD", "name": "心内科", "doctors": [
            {"id": "D001", "family": "张", "given": "伟", "sessions": ["08:00-09:00"],
             "service": {"code": "cardiology-consult", "text": "心内科门诊"}}]}],
        "pharmacy": {"listen": f"tcp:{pharmacy_port}:interface=127.0.0.1",
                     "dispense_delay": f"{int(DISPENSE_DELAY * 1000)}ms", "charset": "gb18030"},
    }
    (tmp_path / "his-sim.yaml").write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    sim = Proc("his-sim", ["his-sim", "--config", "his-sim.yaml"], tmp_path)
    try:
        def listening():
            with socket.create_connection(("127.0.0.1", pharmacy_port), timeout=1):
                return True

        eventually(listening, timeout=20, what="the pharmacy's MLLP port")

        # the order, over a real socket: RRE^O12 accepted, one filler number per item
        order = (GOLDEN / "rde_o11_bundle.utf8.hl7").read_bytes().replace(b"\n", b"\r")
        answer = parse(mllp_exchange(pharmacy_port, order))
        answered_at = time.monotonic()
        assert answer.msh.raw(9) == "RRE^O12^RRE_O12" and answer.msh.get(18) == "GB 18030-2000"
        read = read_order_answer(answer)
        assert (read.acknowledges, read.accepted) == ("G00000000000000000a1", True)
        fillers = [item.filler_id for item in read.items]
        assert [item.placer_id for item in read.items] == ["mr-1", "mr-2", "mr-3"] and all(fillers)

        # the dispense reaches "the gateway" after dispense_delay
        ((arrived, rds),) = eventually(lambda: gateway.messages("RDS^O13"), timeout=DISPENSE_DELAY + 10,
                                       what="the RDS^O13")
        assert DISPENSE_DELAY - 0.3 <= arrived - answered_at <= DISPENSE_DELAY + 5
        tz = ZoneInfo("Asia/Shanghai")
        dispenses = [medication_dispense(d, tz) for d in dispenses_from_rds(rds, tz)]
        assert [d["authorizingPrescription"][0]["reference"] for d in dispenses] == [
            "MedicationRequest/mr-1", "MedicationRequest/mr-2", "MedicationRequest/mr-3"]
        assert [d["identifier"][0]["value"] for d in dispenses] == [f"{f}-1" for f in fillers]

        # SIGUSR2: a prescription released to outside pharmacies
        sim.popen.send_signal(signal.SIGUSR2)
        ((_, release),) = eventually(lambda: gateway.messages("RDE^O11"), timeout=10, what="the released RDE^O11")
        prescription = released_prescription(release)
        assert prescription.released and all(item.filler_id for item in prescription.items)

        received = read_jsonl(tmp_path / "his-received.jsonl")
        assert [(r["type"], r["ack"], r["placers"], r["fillers"]) for r in received] == [
            ("RDE^O11", "AA", ["mr-1", "mr-2", "mr-3"], fillers)]
        sent = eventually(lambda: len(read_jsonl(tmp_path / "his-sent.jsonl")) == 2
                          and read_jsonl(tmp_path / "his-sent.jsonl"), what="two sent journal lines")
        assert [(s["type"], s["reason"], s["control_id"]) for s in sent] == [
            ("RDS^O13", "dispense", rds.control_id), ("RDE^O11", "release", release.control_id)]
        assert sent[1]["prescription"] == prescription.number
    finally:
        rc = sim.stop()
        gateway.shutdown()
        gateway.server_close()
    assert rc == 0, sim.log_tail()
