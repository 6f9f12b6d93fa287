"""A HIS outage never dead-letters work (issue 15, finding 9; docs/guarantees.md, promise 2).

Real processes and sockets: the gateway and the HIS simulator (registration and pharmacy), each HIS port
behind a loopback proxy (tests/faults/proxy.py) that the test takes away entirely, so that nothing listens
there and every connection is refused, as when the HIS is stopped; it comes back on the same port. Retry
settings are short (retry_initial 100 ms, retry_max 500 ms, max_attempts 3, max_age 2 s): the outage lasts
far longer than max_attempts x retry_max and than max_age.
"""

from __future__ import annotations

import time

import requests

from tests.e2e.harness import appointment_for, eventually, free_port, read_jsonl
from tests.e2e.rxpki import golden_bundle, signed_bundle
from tests.e2e.test_prescriptions_e2e import post, prescribing_lock
from tests.faults.proxy import FaultProxy

JSON = {"Content-Type": "application/fhir+json"}
SHORT_RETRIES = {"ack_timeout": "1s", "retry_initial": "100ms", "retry_max": "500ms", "max_attempts": 3,
                 "max_age": "2s"}
OUTAGE = 6.0  # seconds: > max_attempts x retry_max (1.5 s) and > max_age (2 s)


class HisPort:
    """A HIS port behind a proxy at a fixed address that can go away: ``down()`` closes the proxy (connections
    to its port are refused), ``up()`` listens there again."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.proxy = FaultProxy(target_port)
        self.port = self.proxy.port

    def down(self) -> None:
        self.proxy.close()

    def up(self) -> None:
        self.proxy = FaultProxy(self.target_port, listen_port=self.port)

    def close(self) -> None:
        self.proxy.close()


def test_a_his_outage_longer_than_the_retry_budget_dead_letters_nothing(tmp_path):
    """The HIS and its pharmacy refuse every connection for 6 s. Meanwhile a platform books and prescribes:
    both are answered as pending after outer.answer_within (202; the Bundle's entries 202 Accepted), /healthz
    reports both endpoints unreachable, and the queue holds both messages, tried again and again. When the
    HIS listens again the booking ends `booked` and the items `active`; no message was dead-lettered, each
    reached the HIS once, and the gateway logged each outage once (not once per retry)."""
    lock = prescribing_lock(tmp_path)
    his, pharmacy = HisPort(lock.his_port), HisPort(lock.pharmacy_port)
    admin = free_port()
    cfg = lock.gateway_config
    cfg["inner"]["his"].update(port=his.port, **SHORT_RETRIES)
    cfg["inner"]["endpoints"][0].update(port=pharmacy.port, **SHORT_RETRIES)
    cfg["outer"]["answer_within"] = "1s"
    cfg["platforms"][0]["scopes"] += ["Appointment.write", "Appointment.read"]  # the prescriber books too
    cfg["admin"] = {"listen": f"tcp:{admin}:interface=127.0.0.1"}
    lock.write_configs()
    try:
        with lock:
            slot = lock.search_slots(status="free")[0]["id"]
            his.down()
            pharmacy.down()
            down_at = time.monotonic()
            s = lock.session()
            booking = s.post(f"{lock.base}/Appointment", json=appointment_for(slot), headers=JSON, timeout=15)
            assert booking.status_code == 202, booking.text
            assert booking.json()["status"] == "pending"
            prescription = post(lock, signed_bundle(golden_bundle(), lock.pki.key, lock.pki.chain))
            assert prescription.status_code == 200, prescription.text
            entries = prescription.json()["entry"]
            assert {e["response"]["status"] for e in entries} == {"202 Accepted"}

            health = requests.get(f"http://127.0.0.1:{admin}/healthz", timeout=5)
            assert health.status_code == 503
            assert {name: h["reachable"] for name, h in health.json()["his"].items()} == {
                "his": False, "pharmacy": False}
            time.sleep(max(0.0, OUTAGE - (time.monotonic() - down_at)))
            waiting = lock.chamber_rows(
                "SELECT type, state, (SELECT count(*) FROM message_events e WHERE e.message_id = m.id AND e.state"
                " = 'retrying') FROM messages m WHERE direction = 'outbound'")
            assert sorted(w[0] for w in waiting) == ["RDE^O11", "SRM^S01"]
            for _type, state, retries in waiting:  # tried far more often than max_attempts, still waiting
                assert state in ("retrying", "sending") and retries > SHORT_RETRIES["max_attempts"], waiting
            assert s.get(booking.headers["Location"], timeout=5).json()["status"] == "pending"

            his.up()
            pharmacy.up()
            eventually(lambda: s.get(booking.headers["Location"], timeout=5).json()["status"] == "booked",
                       timeout=20, what="the booking to be booked once the HIS is back")
            items = [e["resource"]["id"] for e in entries]
            eventually(lambda: all(s.get(f"{lock.base}/MedicationRequest/{i}", timeout=5).json()["status"]
                                   in ("active", "completed") for i in items),
                       timeout=20, what="the prescription to be accepted once the pharmacy is back")
            eventually(lambda: requests.get(f"http://127.0.0.1:{admin}/healthz", timeout=5).status_code == 200,
                       timeout=10, what="/healthz to recover")

            outbound = lock.chamber_rows("SELECT type, state, attempts FROM messages WHERE direction = 'outbound'")
            assert sorted(outbound) == [("RDE^O11", "delivered", 1), ("SRM^S01", "delivered", 1)], outbound
            received = read_jsonl(lock.workdir / "his-received.jsonl")
            assert [m["type"] for m in received if m["type"] in ("SRM^S01", "RDE^O11")].count("SRM^S01") == 1
            events = [e for e in read_jsonl(lock.gateway.log_path) if e.get("event", "").startswith("relay.his_")]
            assert sorted((e["event"], e["peer"]) for e in events) == [
                ("relay.his_reachable", "his"), ("relay.his_reachable", "pharmacy"),
                ("relay.his_unreachable", "his"), ("relay.his_unreachable", "pharmacy")], events
    finally:
        his.close()
        pharmacy.close()
