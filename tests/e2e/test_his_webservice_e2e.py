"""A HIS that offers a web service, HTTP with JSON or XML, or SOAP (its WSDL, a WS-Security UsernameToken): the
simulator's web-service face (hissim/webservice.py, its own process) and the gateway (its own process, kind:
webservice), each test run for the three protocols.  A platform finds, books and cancels over
FHIR; an HTML error page instead of JSON is retried, never applied, and books once; kill -9 of the gateway
after the HIS booked but before the gateway recorded it books nothing twice (the HIS knows the key).
"""

from __future__ import annotations

import signal
from collections import Counter

import pytest

from tests.e2e.databases import SimFace, pharmacy_of_kind, prescribe
from tests.e2e.harness import REPO, Lock, appointment_for, eventually, free_port, read_jsonl

JSON = {"Content-Type": "application/fhir+json"}

#: the gateway's view of the simulator's web service (docs/his-adapters.md shows the same)
WEBSERVICE = {
    "book": {"call": "/api/register/confirm",
             "request": {"orderNo": "{key}", "scheduleId": "{schedule_id}", "visitTime": "{start:%Y-%m-%d %H:%M:%S}",
                         "patientName": "{patient_name}", "idCard": "{patient_id}", "mobile": "{phone}"},
             "code": "code", "message": "msg", "his_appointment": "data.regNo"},
    "cancel": {"call": "/api/register/cancel", "request": {"orderNo": "{key}", "regNo": "{his_appointment}"},
               "code": "code", "message": "msg"},
    "result_codes": {"accepted": ["0"], "refused": ["1001", "1002", "1003"]},
    "slots": {"call": "/api/schedule/query",
              "request": {"beginDate": "{window_start:%Y-%m-%d}", "endDate": "{window_end:%Y-%m-%d}"},
              "code": "code", "rows": "data",
              "fields": {"schedule_id": "scheduleId", "start": "beginTime", "minutes": "minutes", "status": "status",
                         "department_code": "deptCode", "department_name": "deptName", "doctor_code": "doctorCode",
                         "doctor_name": "doctorName", "service_code": "level", "his_appointment": "regNo"},
              "status_codes": {"free": ["0"], "booked": ["1"], "blocked": ["9"]},
              "interval": "1s", "window_days": 7},
    "timeout": "3s",
}

def _under_root(request: dict) -> dict:
    return {f"Request.{field}": template for field, template in request.items()}


#: the same service as XML over plain HTTP (every request under <Request>, answers read below <Response>)
XML = {
    **WEBSERVICE, "protocol": "xml",
    "book": {**WEBSERVICE["book"], "call": "/xml/api/register/confirm",
             "request": _under_root(WEBSERVICE["book"]["request"])},
    "cancel": {**WEBSERVICE["cancel"], "call": "/xml/api/register/cancel",
               "request": _under_root(WEBSERVICE["cancel"]["request"])},
    "slots": {**WEBSERVICE["slots"], "call": "/xml/api/schedule/query",
              "request": _under_root(WEBSERVICE["slots"]["request"]), "rows": "data.item"},
}

#: the same service over SOAP (the simulator's WSDL, a WS-Security UsernameToken)
SOAP = {
    **WEBSERVICE, "protocol": "soap", "wsdl": str(REPO / "hissim" / "wsdl" / "registration.wsdl"),
    "book": {**WEBSERVICE["book"], "call": "Confirm", "his_appointment": "regNo"},
    "cancel": {**WEBSERVICE["cancel"], "call": "Cancel"},
    "slots": {**WEBSERVICE["slots"], "call": "QuerySchedule", "rows": "slot"},
    "username": "gateway",
}


def SimWs(lock, *args: str) -> SimFace:
    """The simulator's web-service face as a process (python -m hissim.webservice)."""
    return SimFace("hissim.webservice", lock.workdir, "his-sim-ws.log", "--port", str(lock.ws_port), "--journal",
                   str(lock.journal), "--start-date", lock.first_day.isoformat(), *args)


class WebServiceLock(Lock):
    def __init__(self, workdir, protocol: str, *sim_args: str):
        super().__init__(workdir)
        self.ws_port = free_port()
        self.journal = workdir / "his-ws-journal.jsonl"
        if protocol == "soap":
            (workdir / "ws.password").write_text("网关口令\n", encoding="utf-8")
            service = {**SOAP, "url": f"http://127.0.0.1:{self.ws_port}/soap", "password_file": "ws.password"}
            sim_args = ("--soap", "--ws-user", "gateway", "--ws-password", "网关口令", *sim_args)
        else:
            service = {**(XML if protocol == "xml" else WEBSERVICE), "url": f"http://127.0.0.1:{self.ws_port}"}
        self.sim_args = sim_args
        self.gateway_config["inner"]["his"] = {
            "name": "his", "kind": "webservice", "webservice": service,
            "ack_timeout": "3s", "retry_initial": "200ms", "retry_max": "1s"}
        self.gateway_config["outer"]["answer_within"] = "3s"
        self.write_configs()

    def start_sim(self) -> None:
        self.sim = SimWs(self, *self.sim_args)

    def calls(self, path: str) -> list[dict]:
        return [c for c in read_jsonl(self.journal) if c["path"] == path]


def book(lock, slot_id: str, mrn: str = "MRN-0001"):
    return lock.session().post(f"{lock.base}/Appointment", json=appointment_for(slot_id, mrn), headers=JSON)


@pytest.fixture(params=["json", "xml", "soap"])
def protocol(request):
    return request.param


@pytest.fixture
def lock(tmp_path, protocol):
    with WebServiceLock(tmp_path, protocol) as running:
        yield running


def test_find_book_cancel_through_the_web_service(lock):
    free = lock.search_slots(status="free")
    assert len(free) == lock.slot_count
    r = book(lock, free[0]["id"])
    assert r.status_code == 201, r.text
    appointment = r.json()
    his_number = appointment["identifier"][0]["value"]
    assert his_number.startswith("W")
    [confirm] = lock.calls("/api/register/confirm")
    assert confirm["code"] == "0"
    eventually(lambda: lock.session().get(f"{lock.base}/Slot/{free[0]['id']}").json()["status"] == "busy",
               what="the schedule's booked slot")
    appointment["status"] = "cancelled"
    r = lock.session().put(f"{lock.base}/Appointment/{appointment['id']}", json=appointment, headers=JSON)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    assert [c["code"] for c in lock.calls("/api/register/cancel")] == ["0"]
    eventually(lambda: lock.session().get(f"{lock.base}/Slot/{free[0]['id']}").json()["status"] == "free",
               what="the slot free again in the schedule")
    taken = len(lock.search_slots(status="free"))
    lock.sim.popen.send_signal(signal.SIGUSR1)
    eventually(lambda: len(lock.search_slots(status="free")) == taken - 1, what="the counter's booking")


def test_a_refusal_carries_the_his_text(lock):
    slot_id = lock.search_slots(status="free")[0]["id"]
    assert book(lock, slot_id).status_code == 201
    r = book(lock, slot_id, mrn="MRN-0002")  # (the slot is no longer free here: refused by the gateway itself)
    assert r.status_code in (409, 422)
    assert [c["code"] for c in lock.calls("/api/register/confirm")] == ["0"]


@pytest.fixture
def html_lock(tmp_path, protocol):
    with WebServiceLock(tmp_path, protocol, "--html-errors", "2") as running:
        yield running


def test_an_html_error_page_is_retried_and_books_once(html_lock):
    """The first two answers are HTML error pages (HTTP 502): not applied, the call is made again with the same
    key, and the third books; the HIS booked once."""
    lock = html_lock
    slot_id = lock.search_slots(status="free")[0]["id"]
    r = book(lock, slot_id)
    assert r.status_code in (201, 202), r.text
    eventually(lambda: lock.session().get(f"{lock.base}/Appointment/{r.json()['id']}").json()["status"] == "booked",
               timeout=20, what="the booking after the error pages")
    calls = lock.calls("/api/register/confirm")
    assert [c["code"] for c in calls] == ["html", "html", "0"]
    assert len({c["orderNo"] for c in calls}) == 1
    log = (lock.workdir / "gateway.log").read_text(encoding="utf-8")
    assert "HTTP 502" in log


def test_kill_9_of_the_gateway_books_nothing_twice(lock):
    """The gateway is killed (-9) right after its booking call was made; after the restart the call is made
    again with the same key: the HIS answers it from its record, and booked one slot."""
    slot_id = lock.search_slots(status="free")[0]["id"]
    lock.sim.popen.send_signal(signal.SIGSTOP)  # the HIS takes the call and answers only once the gateway is gone
    try:
        r = book(lock, slot_id)
        assert r.status_code == 202
        appointment_id = r.json()["id"]
        lock.gateway.stop(signal.SIGKILL)
    finally:
        lock.sim.popen.send_signal(signal.SIGCONT)
    lock.start_gateway()
    eventually(lambda: lock.session().get(f"{lock.base}/Appointment/{appointment_id}").json()["status"] == "booked",
               timeout=20, what="the booking after the restart")
    calls = lock.calls("/api/register/confirm")
    assert len({c["orderNo"] for c in calls}) == 1 and len(calls) >= 2
    assert Counter(c["code"] for c in calls) == {"0": len(calls)}
    booked = [s for s in lock.search_slots() if s["status"] == "busy"]
    assert len(booked) == 1


def test_a_prescription_through_the_web_service(tmp_path, protocol):
    """A signed prescription of three items, routed to a pharmacy endpoint of kind webservice: one call with its
    three items, the HIS's order number for each; the items turn active."""
    ws_port = free_port()
    soap, xml = protocol == "soap", protocol == "xml"
    request = {"orderNo": "{key}", "rxNo": "{number}", "patientName": "{patient_name}", "idCard": "{patient_id}",
               "doctorCode": "{prescriber_id}"}
    call = {"call": {"soap": "SubmitPrescription", "xml": "/xml/api/prescription/submit"}.get(
                protocol, "/api/prescription/submit"),
            "items": {"soap": "item", "xml": "Request.item"}.get(protocol, "items"),
            "item": {"itemNo": "{item}", "drugCode": "{drug_code}", "drugName": "{drug_name}",
                     "quantity": "{quantity}", "unit": "{quantity_unit}"},
            "request": _under_root(request) if xml else request,
            "code": "code", "message": "msg",
            "item_answers": {"soap": "item", "xml": "data.items.item"}.get(protocol, "data.items"),
            "item_id": "itemNo", "his_order": "hisOrderNo"}
    service = {"url": f"http://127.0.0.1:{ws_port}" + ("/soap" if soap else ""), "prescription": call,
               "result_codes": {"accepted": ["0"], "refused": ["2001"]}, "timeout": "3s"}
    if soap:
        service.update(protocol="soap", wsdl=SOAP["wsdl"])
    if xml:
        service.update(protocol="xml")
    lock = pharmacy_of_kind(tmp_path, "webservice", service)
    lock.ws_port, lock.journal = ws_port, tmp_path / "his-ws-journal.jsonl"
    pharmacy = SimWs(lock, *(["--soap"] if soap else []))
    try:
        with lock:
            prescribe(lock)
            calls = [c for c in read_jsonl(lock.journal) if c["path"] == "/api/prescription/submit"]
            assert [c["code"] for c in calls] == ["0"]
    finally:
        pharmacy.stop()
