"""Two hospital sites, two HIS: routing by facility through the real lock (issue 6).

Two HIS simulator processes — 分院A (the HIS, MSH-3 HIS-A) and BRANCH-B (another endpoint, MSH-3 HIS-B), each
publishing its own doctors' slots to the one gateway — and a gateway whose routes send bookings by the facility
that published the slot's schedule. Everything crosses real sockets: FHIR over mutual TLS, HL7 over MLLP.

- A booking for a schedule of 分院A reaches simulator A only, one for BRANCH-B simulator B only, each SRM
  addressed to its facility in MSH-6, and B's carrying the Z-segment configured for B; a cancellation goes
  where its booking went.
- Z-segments that HIS B publishes with a slot (pass_z_segments on B) reach the FHIR Slot as extensions.
"""

from __future__ import annotations

import signal
import socket

import pytest
import yaml

from tests.e2e.harness import Lock, Proc, appointment_for, eventually, free_port, mllp_exchange, read_jsonl


def branch_sim(lock: Lock, port: int) -> dict:
    """Simulator B's config: its own port, MSH-3/4, doctors and journals; it pushes to the same gateway."""
    return dict(lock.sim_config, listen=f"tcp:{port}:interface=127.0.0.1", application="HIS-B",
                facility="BRANCH-B", received_log="his-b-received.jsonl", sent_log="his-b-sent.jsonl",
                departments=[{"code": "DERM", "name": "皮肤科", "doctors": [
                    {"id": "B01", "family": "李", "given": "医生", "service": {"code": "derm", "text": "皮肤科门诊"},
                     "sessions": ["08:00-09:00"], "slot_minutes": 15}]}])


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sites")
    b_port = free_port()
    lock = Lock(workdir, doctors=1, days=1, sim={"application": "HIS-A", "facility": "分院A"},
                his={"receiving_application": "HIS-A"})
    cfg = lock.gateway_config
    cfg["inner"]["endpoints"] = [{
        "name": "his-branch-b", "host": "127.0.0.1", "port": b_port, "receiving_application": "HIS-B",
        "receiving_facility": "B-DEFAULT", "ack_timeout": "3s", "retry_initial": "200ms", "retry_max": "2s",
        "pass_z_segments": True, "z_segments": ["ZCH|WEB^{platform}|互联网"]}]
    cfg["routes"] = [{"facility": "分院A", "to": "his"},
                     {"types": ["SRM"], "facility": "BRANCH-B", "to": "his-branch-b"}]
    lock.write_configs()
    (workdir / "his-sim-b.yaml").write_text(yaml.safe_dump(branch_sim(lock, b_port), allow_unicode=True),
                                            encoding="utf-8")
    sim_b = None
    try:
        lock.start(wait_for_slots=False)
        sim_b = Proc("his-sim-b", ["his-sim", "--config", "his-sim-b.yaml"], workdir)

        def listening():
            with socket.create_connection(("127.0.0.1", b_port), timeout=1):
                return True

        eventually(listening, timeout=20, what="simulator B's MLLP port")
        lock.wait_his_up("his-branch-b")  # the gateway's probe found it down before it started
        eventually(lambda: len(lock.search_slots()) >= 8, timeout=30, what="4 slots from each site")
        yield lock, workdir
    finally:
        if sim_b is not None:
            sim_b.stop()
        lock.stop()


def free_slot(lock: Lock, schedule: str) -> str:
    return next(s["id"] for s in lock.search_slots(status="free")
                if s["schedule"]["reference"] == f"Schedule/{schedule}")


def book(lock: Lock, slot: str) -> dict:
    r = lock.session().post(f"{lock.base}/Appointment", json=appointment_for(slot), timeout=15)
    assert r.status_code == 201, r.text
    return r.json()


def test_bookings_reach_the_his_of_the_facility_that_published_the_schedule(sites):
    lock, workdir = sites
    a = book(lock, free_slot(lock, "D001"))
    b = book(lock, free_slot(lock, "B01"))
    assert a["status"] == b["status"] == "booked"

    def srms(journal):
        return [(m["type"], m["placer"], m["facility"], m["z_segments"]) for m in read_jsonl(workdir / journal)
                if m["type"].startswith("SRM")]

    assert srms("his-received.jsonl") == [("SRM^S01", a["id"], "分院A", [])]
    assert srms("his-b-received.jsonl") == [("SRM^S01", b["id"], "BRANCH-B", ["ZCH"])]

    r = lock.session().put(f"{lock.base}/Appointment/{b['id']}", json=dict(b, status="cancelled"), timeout=15)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    eventually(lambda: ("SRM^S04", b["id"], "BRANCH-B", ["ZCH"]) in srms("his-b-received.jsonl"), timeout=10,
               what="the cancellation at simulator B")
    assert [m for m in srms("his-received.jsonl") if m[1] == b["id"]] == []


def test_z_segments_his_b_publishes_with_a_slot_reach_the_fhir_slot(sites):
    """HIS B (pass_z_segments: true) opens a slot with a fee Z-segment: the FHIR Slot carries it verbatim."""
    lock, _ = sites
    siu = "\r".join([
        "MSH|^~\\&|HIS-B|BRANCH-B|GATEWAYD|FRONT|20300101120000||SIU^S24^SIU_S12|ZB-1|P|2.5|||||CHN|UNICODE UTF-8",
        f"SCH|||||B02^Dr Wu||||15|MIN|^^15^{lock.first_day:%Y%m%d}1000^{lock.first_day:%Y%m%d}1015"
        "||||||||||||||Open",
        "RGS|1",
        "AIS|1||derm^皮肤科门诊|" + f"{lock.first_day:%Y%m%d}1000|||15|MIN",
        "ZFE|1|12.00^CNY|专家号\\T\\特需",
    ]) + "\r"
    assert b"MSA|AA|ZB-1" in mllp_exchange(lock.mllp_port, siu.encode())
    slot = lock.session().get(f"{lock.base}/Slot/B02-{lock.first_day:%Y%m%d}1000", timeout=5).json()
    assert slot["extension"] == [{"url": "urn:gatewayd:hl7v2:z-segment",
                                  "valueString": "ZFE|1|12.00^CNY|专家号\\T\\特需"}]
    published_by_a = lock.session().get(f"{lock.base}/Slot/{free_slot(lock, 'D001')}", timeout=5).json()
    assert "extension" not in published_by_a


def test_sighup_with_changed_routes_takes_effect_without_a_restart(sites):
    """The routes change under a running gateway (SIGHUP, same endpoints): without the BRANCH-B route a
    booking for B's schedule goes to the HIS (which does not know the slot), and with the route back the next
    one reaches simulator B again — no restart, the process is the same."""
    lock, workdir = sites
    pid = lock.gateway.popen.pid
    routes = lock.gateway_config["routes"]

    def reload_with(new_routes) -> list:
        lock.gateway_config["routes"] = new_routes
        lock.write_configs()
        before = len(reloads())
        lock.gateway.popen.send_signal(signal.SIGHUP)
        return eventually(lambda: reloads()[before:], timeout=10, what="the reload")[0]["applied"]

    def reloads():
        return [e for e in read_jsonl(lock.gateway.log_path) if e.get("event") == "gateway.reloaded"]

    def placers(journal):
        return [m["placer"] for m in read_jsonl(workdir / journal) if m["type"] == "SRM^S01"]

    try:
        applied = reload_with([{"facility": "分院A", "to": "his"}])
        assert "routes (1)" in applied and not [a for a in applied if "restart" in a], applied
        r = lock.session().post(f"{lock.base}/Appointment", json=appointment_for(free_slot(lock, "B01")),
                                timeout=15)
        assert r.status_code in (201, 202, 409), r.text
        misrouted = r.json().get("id") or r.headers.get("Content-Location", "").rsplit("/", 1)[-1]
        assert misrouted in placers("his-received.jsonl") and misrouted not in placers("his-b-received.jsonl")
    finally:
        applied = reload_with(routes)
    assert "routes (2)" in applied
    b = book(lock, free_slot(lock, "B01"))
    assert b["id"] in placers("his-b-received.jsonl") and b["id"] not in placers("his-received.jsonl")
    assert lock.gateway.popen.pid == pid and lock.gateway.alive()
