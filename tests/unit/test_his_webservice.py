"""A HIS endpoint of kind webservice (adapters/inner/webservice.py) against the simulator's web service
(hissim/webservice.py) on a loopback port: the call made from the stored SRM with the config's templates, the
result codes read (accepted with the HIS's number, refused with its text, retry and unknown codes resent), an
HTML error page and an unreachable service told apart, a resend with the same key answered from the HIS's
record; the schedule's items read into slot rows; the config's checks.  The link's calls run at once on the
test's thread (no pool); the simulator answers from its own thread.
"""

import threading
from datetime import date, datetime
from http.server import ThreadingHTTPServer
from zoneinfo import ZoneInfo

import pytest
import requests
from twisted.internet import defer, task

from adapters.inner.webservice import WebServiceDestination, WebServiceLink, path_value, render, slot_poller
from adapters.maps.srm_booking import Hl7Header, build_srm
from gateway.config.his_database import SlotColumns, SlotStatusCodes
from gateway.config.his_webservice import HisWebServiceConfig, WsCall, WsResultCodes, WsSlots
from gateway.domain.model import Patient, PatientIdentifier, SlotForHis
from gateway.relay import DeliveryFailed, HisUnreachable
from hissim.webservice import Hospital, handler_for
from tests.deferreds import failureResultOf, successResultOf
from tests.unit.config_files import problems
from tests.e2e.harness import free_port

TZ = ZoneInfo("Asia/Shanghai")
HEADER = Hl7Header("GATEWAYD", "FRONT", "HIS", "HOSPITAL")
PATIENT = Patient((PatientIdentifier("urn:oid:2.16.156.10011.1.5", "110101199001011234", "NNCHN"),), "张", "三",
                  "13800000000")
BOOK = WsCall(call="/api/register/confirm", code="code", message="msg", his_appointment="data.regNo",
              request={"orderNo": "{key}", "scheduleId": "{schedule_id}", "visitTime": "{start:%Y-%m-%d %H:%M:%S}",
                       "patientName": "{patient_name}", "idCard": "{patient_id}"})
CANCEL = WsCall(call="/api/register/cancel", code="code", message="msg",
                request={"orderNo": "{key}", "regNo": "{his_appointment}"})
SLOTS = WsSlots(call="/api/schedule/query", rows="data", code="code",
                request={"beginDate": "{window_start:%Y-%m-%d}", "endDate": "{window_end:%Y-%m-%d}"},
                fields=SlotColumns(schedule_id="scheduleId", start="beginTime", minutes="minutes", status="status",
                                   department_code="deptCode", doctor_code="doctorCode", doctor_name="doctorName",
                                   his_appointment="regNo"),
                status_codes=SlotStatusCodes(free=["0"], booked=["1"], blocked=["9"]))


@pytest.fixture
def his():
    """The simulator's web service on a loopback port, from its own thread."""
    hospital = Hospital(date(2026, 12, 8), days=1, doctors=1, journal=None)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(hospital))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield hospital, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def link(url, **cfg):
    config = HisWebServiceConfig(**{"url": url, "book": BOOK, "cancel": CANCEL, "slots": SLOTS, "timeout": 2,
                                    "result_codes": WsResultCodes(accepted=["0"], refused=["1001", "1003", "2001"],
                                                                  retry=["2000"]), **cfg})
    ws = WebServiceLink(config, peer="his", reactor=None, run=lambda fn, *a: defer.maybeDeferred(fn, *a),
                        session=requests.Session())
    ws.startService()
    return ws


def srm(trigger="S01", key="G000000000000000001", start=datetime(2026, 12, 8, 8, 15), **kw) -> bytes:
    slot = SlotForHis("WS1208D01", start, 15, "PT", "普通号", "D01")
    return build_srm(trigger, header=HEADER, control_id=key, appointment_id="a1", slot=slot, patient=PATIENT,
                     now=datetime(2026, 12, 7, 10, 0), **kw)


def test_a_booking_and_its_cancellation(his):
    hospital, url = his
    dest = WebServiceDestination(link(url), charset="utf-8")
    answer = successResultOf(dest.deliver(srm(), "G000000000000000001", 5))
    assert (answer.code, answer.his_appointment, answer.text) == ("AA", "W000001", "预约成功")
    assert hospital.slots[("WS1208D01", "2026-12-08 08:15:00")]["status"] == "1"
    again = successResultOf(dest.deliver(srm(), "G000000000000000001", 5))  # a resend: the HIS's record answers
    assert again.his_appointment == "W000001" and hospital.numbers == 1
    cancel = successResultOf(dest.deliver(srm("S04", key="G000000000000000002", his_appointment="W000001"),
                                          "G000000000000000002", 5))
    assert cancel.code == "AA" and hospital.slots[("WS1208D01", "2026-12-08 08:15:00")]["status"] == "0"


def test_refusals_and_codes_that_are_retried(his):
    """A code result_codes refuses: AR with the HIS's text.  A code it does not name: DeliveryFailed (resent, dead
    after max_attempts), never an answer.  A hold without a call: AR."""
    hospital, url = his
    dest = WebServiceDestination(link(url), charset="utf-8")
    successResultOf(dest.deliver(srm(), "G000000000000000001", 5))
    refused = successResultOf(dest.deliver(srm(key="G000000000000000003"), "G000000000000000003", 5))
    assert (refused.code, refused.text) == ("AR", "号源已被占用")
    unknown = dest.deliver(srm(key="G000000000000000004", start=datetime(2026, 12, 8, 7, 0)), "G000000000000000004", 5)
    assert "result code '1002' is not one result_codes names: 无此号源" in str(failureResultOf(unknown, DeliveryFailed).value)
    hold = successResultOf(dest.deliver(srm(key="G000000000000000005", appointment_type="Tentative"), "G5", 5))
    assert hold.code == "AR" and "webservice.hold" in hold.text


def test_an_html_error_page_and_an_unreachable_service(his):
    """An HTML page (HTTP 502) instead of JSON: DeliveryFailed with what came, nothing booked; a port nobody
    listens on: HisUnreachable (not an attempt)."""
    hospital, url = his
    hospital.html_errors = 1
    dest = WebServiceDestination(link(url), charset="utf-8")
    failure = failureResultOf(dest.deliver(srm(), "G000000000000000001", 5), DeliveryFailed)
    assert not failure.check(HisUnreachable) and str(failure.value).startswith("HTTP 502 (text/html, ")
    assert hospital.numbers == 0
    assert successResultOf(dest.deliver(srm(), "G000000000000000001", 5)).code == "AA"
    gone = WebServiceDestination(link(f"http://127.0.0.1:{free_port()}"), charset="utf-8")
    assert "cannot connect" in str(failureResultOf(gone.deliver(srm(), "G1", 5), HisUnreachable).value)


def test_the_schedule_is_read_into_slot_rows(his):
    hospital, url = his
    hospital.slots[("WS1208D01", "2026-12-08 08:30:00")]["status"] = "7"  # a code the config does not name
    accepted, refused = [], []

    class Inbound:
        def accept(self, received, notices):
            accepted.append(notices)
            return defer.succeed(None)

        def refuse(self, received, code, text):
            refused.append(text)
            return defer.succeed(None)

    clock = task.Clock()
    clock.advance(datetime(2026, 12, 7, 9, 0, tzinfo=TZ).timestamp())
    poller = slot_poller(link(url), Inbound(), tz=TZ, clock=clock)
    assert successResultOf(poller.poll()) == 3
    assert [(n.action, n.start_local.minute, n.schedule.practitioner_name) for n in accepted[0]] == [
        ("open", 0, "王医生1"), ("open", 15, "王医生1"), ("open", 45, "王医生1")]
    assert refused == ["unknown status code '7' in status (slots.status_codes)"]


def test_templates_and_paths():
    assert render({"a": "{key}", "head.time": "{start:%Y%m%d}"}, {"key": "G1", "start": datetime(2026, 1, 2)}) == {
        "a": "G1", "head": {"time": "20260102"}}
    assert path_value({"data": {"list": [{"no": "7"}]}}, "data.list.0.no") == "7"
    with pytest.raises(KeyError):
        path_value({"data": None}, "data.regNo")


WS_HEAD = """
inner:
  his:
    kind: webservice
    webservice:
      url: http://10.1.2.6:8080
      book: {call: /book, code: code, request: {orderNo: '{key}', when: '{start:%Y-%m-%d}'}}
      cancel: {call: /cancel, code: code, request: {orderNo: '{key}', regNo: '{his_appointment}'}}
outer:
  tls: {certificate: certs/server.pem, private_key: certs/server.key, client_ca: certs/ca.pem}
platforms: [{name: p1, certificate_subject: CN=p1}]
"""


def test_webservice_config_errors_name_line_and_key(config_dir):
    found = problems(config_dir, "", head=WS_HEAD.replace("'{key}', when", "'{order}', when")
                     .replace("regNo: '{his_appointment}'", "regNo: '{his_appointment:>8}'")
                     .replace("http://10.1.2.6:8080", "10.1.2.6:8080"))
    assert [f.split(": ", 1)[0] for f in found] == ["6:inner.his.webservice.url",
                                                     "7:inner.his.webservice.book.request.orderNo",
                                                     "8:inner.his.webservice.cancel.request.regNo"]
    assert "unknown field {order}" in found[1] and "{his_appointment} takes no format" in found[2]


# -- SOAP (zeep) against the simulator's SOAP face -----------------------------------------------------------------

SOAP_BOOK = WsCall(call="Confirm", code="code", message="msg", his_appointment="regNo", request=BOOK.request)
SOAP_CANCEL = WsCall(call="Cancel", code="code", message="msg", request=CANCEL.request)


@pytest.fixture
def soap_his(tmp_path):
    from hissim.webservice import WSDL, SoapFace

    hospital = Hospital(date(2026, 12, 8), days=1, doctors=1, journal=None)
    face = SoapFace(hospital, "gateway", "口令", faults=1)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(hospital, face))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (tmp_path / "pw").write_text("口令\n", encoding="utf-8")
    yield hospital, f"http://127.0.0.1:{server.server_address[1]}/soap", WSDL, tmp_path / "pw"
    server.shutdown()
    server.server_close()


def soap_link(url, wsdl, password_file, user="gateway"):
    return link(url, protocol="soap", wsdl=wsdl, book=SOAP_BOOK, cancel=SOAP_CANCEL, username=user,
                password_file=password_file,
                slots=WsSlots(call="QuerySchedule", rows="slot", code="code", request=SLOTS.request,
                              fields=SLOTS.fields, status_codes=SLOTS.status_codes))


def test_soap_a_fault_is_retried_then_the_booking_and_its_cancellation(soap_his):
    """The WSDL read by zeep, the service bound to the configured address, a WS-Security UsernameToken sent: a
    SOAP Fault (数据库繁忙) is retried with its fault string and books nothing; the next call books; the resend
    is answered from the HIS's record; the cancellation frees the slot."""
    hospital, url, wsdl, password = soap_his
    dest = WebServiceDestination(soap_link(url, wsdl, password), charset="utf-8")
    fault = failureResultOf(dest.deliver(srm(), "G000000000000000001", 5), DeliveryFailed)
    assert not fault.check(HisUnreachable) and "SOAP Fault" in str(fault.value) and "数据库繁忙" in str(fault.value)
    assert hospital.numbers == 0
    answer = successResultOf(dest.deliver(srm(), "G000000000000000001", 5))
    assert (answer.code, answer.his_appointment, answer.text) == ("AA", "W000001", "预约成功")
    assert successResultOf(dest.deliver(srm(), "G000000000000000001", 5)).his_appointment == "W000001"
    cancel = successResultOf(dest.deliver(srm("S04", key="G000000000000000002", his_appointment="W000001"),
                                          "G000000000000000002", 5))
    assert cancel.code == "AA" and hospital.slots[("WS1208D01", "2026-12-08 08:15:00")]["status"] == "0"


def test_soap_wrong_credentials_and_an_html_page(soap_his, tmp_path):
    hospital, url, wsdl, password = soap_his
    dest = WebServiceDestination(soap_link(url, wsdl, password, user="someone"), charset="utf-8")
    failure = failureResultOf(dest.deliver(srm(), "G000000000000000001", 5), DeliveryFailed)
    assert "authentication failed" in str(failure.value)
    hospital.html_errors = 1
    dest = WebServiceDestination(soap_link(url, wsdl, password), charset="utf-8")
    failureResultOf(dest.deliver(srm(), "G000000000000000001", 5), DeliveryFailed)  # (the Fault)
    html = failureResultOf(dest.deliver(srm(), "G000000000000000001", 5), DeliveryFailed)
    assert str(html.value).startswith("HTTP 502: not a SOAP answer (text/html, ") and hospital.numbers == 0


def test_soap_schedule_is_read_into_slot_rows(soap_his):
    hospital, url, wsdl, password = soap_his
    accepted = []

    class Inbound:
        def accept(self, received, notices):
            accepted.append(notices)
            return defer.succeed(None)

    clock = task.Clock()
    clock.advance(datetime(2026, 12, 7, 9, 0, tzinfo=TZ).timestamp())
    poller = slot_poller(soap_link(url, wsdl, password), Inbound(), tz=TZ, clock=clock)
    assert successResultOf(poller.poll()) == 4
    assert {n.schedule.id for n in accepted[0]} == {"WS1208D01"}


def rx_call(protocol: str):
    from gateway.config.his_webservice import WsPrescriptionCall

    soap = protocol == "soap"
    return WsPrescriptionCall(
        call="SubmitPrescription" if soap else "/api/prescription/submit", items="item" if soap else "items",
        item={"itemNo": "{item}", "drugCode": "{drug_code}", "drugName": "{drug_name}", "quantity": "{quantity}",
              "unit": "{quantity_unit}"},
        request={"orderNo": "{key}", "rxNo": "{number}", "patientName": "{patient_name}", "idCard": "{patient_id}",
                 "doctorCode": "{prescriber_id}"},
        code="code", message="msg", item_answers="item" if soap else "data.items", item_id="itemNo",
        his_order="hisOrderNo")


@pytest.mark.parametrize("protocol", ["json", "soap"])
def test_a_prescription_through_the_web_service(protocol, his, soap_his):
    """The golden RDE^O11 (three items) as one call with its items; each item's HIS order number in the answer;
    the resend answered from the HIS's record (no second order); a drug the HIS does not know refuses it."""
    from pathlib import Path

    from adapters.hl7.er7 import parse

    rde = (Path(__file__).resolve().parents[1] / "golden" / "pharmacy" / "rde_o11_bundle.utf8.hl7").read_bytes()
    rde = rde.replace(b"\n", b"\r")
    message = parse(rde)
    if protocol == "soap":
        hospital, url, wsdl, password = soap_his
        ws = soap_link(url, wsdl, password)
        ws.cfg = ws.cfg.__class__(**{**vars(ws.cfg), "prescription": rx_call("soap")})
    else:
        hospital, url = his
        ws = link(url, prescription=rx_call("json"))
    dest = WebServiceDestination(ws, charset="utf-8")
    answer = successResultOf(dest.deliver(rde, message.control_id, 5))
    placers = [orc.get(2) for orc in message.all("ORC")]
    assert answer.code == "AA" and answer.order.accepted
    assert [i.placer_id for i in answer.order.items] == placers
    assert [i.filler_id for i in answer.order.items] == ["R000001", "R000002", "R000003"]
    again = successResultOf(dest.deliver(rde, message.control_id, 5))
    assert [i.filler_id for i in again.order.items] == ["R000001", "R000002", "R000003"] and hospital.numbers == 3
    unknown = rde.replace(b"|Y0002^", b"|X0002^")
    assert unknown != rde
    refused = successResultOf(dest.deliver(unknown.replace(message.control_id.encode(), b"G9999999999999999999"),
                                           "G9999999999999999999", 5))
    assert (refused.code, refused.text, refused.order.accepted) == ("AR", "本院无此药品", False)


def test_the_worked_config_in_the_docs_loads(config_dir):
    """docs/his-adapters.md's web-service config is a valid config (its CA file given)."""
    from pathlib import Path

    from tests.unit.config_files import load

    text = (Path(__file__).resolve().parents[2] / "docs" / "his-adapters.md").read_text(encoding="utf-8")
    block = text.split("A worked config for a vendor's JSON service", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    config = load(config_dir, block.replace("/etc/gatewayd/his-ca.pem", "certs/ca.pem"),
                  head="outer:\n  tls: {certificate: certs/server.pem, private_key: certs/server.key, "
                       "client_ca: certs/ca.pem}\nplatforms: [{name: p1, certificate_subject: CN=p1}]\n")
    ws = config.inner.his.webservice
    assert (ws.book.his_appointment, ws.slots.fields.start, ws.result_codes.retry) == ("data.regNo", "beginTime",
                                                                                       ["9999"])


def test_xml_bodies_and_answers():
    """XML over plain HTTP: the request's fields under one root element (a list: the element repeated); the
    answer read from below its root (a name repeated: a list); no XML: ValueError."""
    from adapters.inner.webservice import from_xml, to_xml

    body = render({"Request.orderNo": "{key}", "Request.name": "{patient_name}"}, {"key": "G1", "patient_name": "张三"})
    body["Request"]["item"] = [{"no": "1"}, {"no": "2"}]
    assert to_xml(body).decode("utf-8").endswith(
        "<Request><orderNo>G1</orderNo><name>张三</name><item><no>1</no></item><item><no>2</no></item></Request>")
    answer = from_xml("<Response><code>0</code><data><item><a>1</a></item><item><a>2</a></item></data></Response>"
                      .encode())
    assert answer == {"code": "0", "data": {"item": [{"a": "1"}, {"a": "2"}]}}
    assert path_value(answer, "data.item.1.a") == "2"
    with pytest.raises(ValueError):
        from_xml(b"<html><body>502</body>")


def test_xml_requests_need_one_root(config_dir):
    head = WS_HEAD.replace("      url: http://10.1.2.6:8080\n", "      url: http://10.1.2.6:8080\n      protocol: xml\n")
    head = head.replace("request: {orderNo: '{key}', regNo: '{his_appointment}'}",
                        "request: {R.orderNo: '{key}', R.regNo: '{his_appointment}'}")
    found = problems(config_dir, "", head=head)
    assert [f.split(": ", 1)[0] for f in found] == ["8:inner.his.webservice.book.request"]
    assert "one root element" in found[0]


def test_the_probe_finds_the_web_service_up_on_any_answer_and_down_without_one_or_behind_a_dead_proxy(his):
    from http.server import BaseHTTPRequestHandler

    from adapters.inner.probe import CallCheck, LinkDown

    _hospital, url = his
    assert successResultOf(CallCheck(link(url).ping, "web service").check()) is None  # (the simulator: 501 to HEAD)
    closed = f"http://127.0.0.1:{free_port()}"
    down = failureResultOf(CallCheck(link(closed).ping, "web service").check(), LinkDown)
    assert str(down.value) == "web service: NotReached: cannot connect: ConnectionError"

    class Proxy(BaseHTTPRequestHandler):  # a reverse proxy whose web service behind it is gone
        def do_HEAD(self):
            self.send_response(502)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        proxied = f"http://127.0.0.1:{server.server_address[1]}"
        down = failureResultOf(CallCheck(link(proxied).ping, "web service").check(), LinkDown)
        assert str(down.value).startswith("web service: BadAnswer: HTTP 502")
    finally:
        server.shutdown()
        server.server_close()
