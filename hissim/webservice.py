"""The HIS simulator's web-service face (``python -m hissim.webservice --port N``): a HIS vendor's registration
service over HTTP with JSON, as many Chinese HIS expose it.

Calls (POST, JSON body; every answer ``{"code": ..., "msg": ..., "data": ...}``, code "0" = success):

- ``/api/schedule/query`` ``{beginDate, endDate}`` -> data: the slots of those days (scheduleId, beginTime
  'YYYY-MM-DD HH:MM:SS', minutes, status 0 free / 1 booked / 9 closed, deptCode, deptName, doctorCode,
  doctorName, level, regNo);
- ``/api/register/confirm`` ``{orderNo, scheduleId, visitTime, patientName, idCard, mobile}`` -> data.regNo,
  or code "1001" 号源已被占用 / "1002" 无此号源.  ``orderNo`` is the caller's key: the same orderNo again gets
  the first answer again, and books nothing more;
- ``/api/register/cancel`` ``{orderNo, regNo}`` -> code "0", or "1003" 无此预约;
- ``/api/prescription/submit`` ``{orderNo, rxNo, patientName, idCard, doctorCode, items: [{itemNo, drugCode,
  drugName, quantity, unit}]}`` -> data.items: [{itemNo, hisOrderNo}], or code "2001" 本院无此药品 when a drug
  code starts with X (the whole prescription refused).  The same orderNo again: the first answer.

``--soap``: the same calls as SOAP 1.1 (document/literal) at ``/soap``, its WSDL at ``/soap?wsdl``
(hissim/wsdl/registration.wsdl): operations QuerySchedule, Confirm, Cancel, their fields those above (a
Confirm's regNo and a QuerySchedule's slot elements directly in the response).  ``--ws-user NAME
--ws-password PW``: each call must carry a WS-Security UsernameToken with them (else a SOAP Fault).
``--faults N``: the first N Confirm calls are answered with a SOAP Fault (数据库繁忙), booking nothing.

XML over plain HTTP: the same calls at ``/xml`` + their path (``/xml/api/register/confirm``), the body
``<Request>`` with the fields as child elements (a prescription's items as repeated ``<item>``), the answer
``<Response>`` with code, msg and data (a list as repeated ``<item>`` elements).

``--html-errors N``: the first N confirm calls are answered with an HTML error page (HTTP 502), as a proxy in
front of a HIS does when the HIS is down; they book nothing.  ``--journal``: one JSON line per call (path,
orderNo, code).  SIGUSR1: the counter books a random free slot.  SIGTERM / SIGINT stop it.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import threading
import xml.etree.ElementTree as ET
from datetime import date, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from xml.sax.saxutils import escape

WSDL = Path(__file__).with_name("wsdl") / "registration.wsdl"
SOAP_NS = "http://schemas.xmlsoap.org/soap/envelope/"
TNS = "urn:hissim:registration"
WSSE_NS = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
#: SOAP operation -> the JSON call it is
OPERATIONS = {"QuerySchedule": "/api/schedule/query", "Confirm": "/api/register/confirm",
              "Cancel": "/api/register/cancel", "SubmitPrescription": "/api/prescription/submit"}


class Hospital:
    def __init__(self, start: date, days: int, doctors: int, journal: Path | None, html_errors: int = 0):
        self.lock = threading.Lock()
        self.slots: dict[tuple[str, str], dict] = {}
        for d in range(days):
            day = start + timedelta(days=d)
            for doctor in range(1, doctors + 1):
                for n in range(4):
                    begin = datetime.combine(day, datetime.min.time()) + timedelta(hours=8, minutes=15 * n)
                    slot = {"scheduleId": f"WS{day:%m%d}D{doctor:02d}", "beginTime": f"{begin:%Y-%m-%d %H:%M:%S}",
                            "minutes": 15, "status": "0", "deptCode": "0101", "deptName": "心内科",
                            "doctorCode": f"D{doctor:02d}", "doctorName": f"王医生{doctor}", "level": "普通号",
                            "regNo": None}
                    self.slots[(slot["scheduleId"], slot["beginTime"])] = slot
        self.orders: dict[str, dict] = {}  # orderNo -> the answer given
        self.numbers = 0
        self.journal = journal
        self.html_errors = html_errors
        self.rng = random.Random(7)

    def _number(self, prefix: str) -> str:
        self.numbers += 1
        return f"{prefix}{self.numbers:06d}"

    def call(self, path: str, body: dict) -> tuple[int, str, bytes]:
        with self.lock:
            if path == "/api/register/confirm" and self.html_errors > 0:
                self.html_errors -= 1
                self._journal(path, body, "html")
                return 502, "text/html", "<html><body><h1>502 Bad Gateway</h1>HIS 服务暂不可用</body></html>".encode()
            handler = {"/api/schedule/query": self._query, "/api/register/confirm": self._confirm,
                       "/api/register/cancel": self._cancel, "/api/prescription/submit": self._prescription}.get(path)
            if handler is None:
                return 404, "text/plain", b"not found"
            answer = handler(body)
            self._journal(path, body, answer["code"])
            return 200, "application/json", json.dumps(answer, ensure_ascii=False).encode("utf-8")

    def _journal(self, path: str, body: dict, code: str) -> None:
        if self.journal is not None:
            with self.journal.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"path": path, "orderNo": body.get("orderNo"), "code": code},
                                   ensure_ascii=False) + "\n")

    def _query(self, body: dict) -> dict:
        begin, end = body.get("beginDate", ""), body.get("endDate", "9999")
        return {"code": "0", "msg": "成功",
                "data": [dict(s) for s in self.slots.values() if begin <= s["beginTime"][:10] < end]}

    def _confirm(self, body: dict) -> dict:
        order = body.get("orderNo")
        if not order:
            return {"code": "9001", "msg": "缺少 orderNo"}
        if order in self.orders:
            return self.orders[order]
        slot = self.slots.get((body.get("scheduleId"), body.get("visitTime")))
        if slot is None:
            answer = {"code": "1002", "msg": "无此号源"}
        elif slot["status"] != "0":
            answer = {"code": "1001", "msg": "号源已被占用" if slot["status"] == "1" else "停诊"}
        else:
            slot["status"], slot["regNo"] = "1", self._number("W")
            answer = {"code": "0", "msg": "预约成功", "data": {"regNo": slot["regNo"]}}
        self.orders[order] = answer
        return answer

    def _cancel(self, body: dict) -> dict:
        order = body.get("orderNo")
        if order in self.orders:
            return self.orders[order]
        slot = next((s for s in self.slots.values() if s["regNo"] and s["regNo"] == body.get("regNo")), None)
        if slot is None:
            answer = {"code": "1003", "msg": "无此预约"}
        else:
            slot["status"], slot["regNo"] = "0", None
            answer = {"code": "0", "msg": "已取消"}
        self.orders[order] = answer
        return answer

    def _prescription(self, body: dict) -> dict:
        order = body.get("orderNo")
        if not order or not isinstance(body.get("items"), list) or not body["items"]:
            return {"code": "9001", "msg": "缺少 orderNo 或 items"}
        if order in self.orders:
            return self.orders[order]
        if any(str(i.get("drugCode", "")).startswith("X") for i in body["items"]):
            answer = {"code": "2001", "msg": "本院无此药品"}
        else:
            answer = {"code": "0", "msg": "已接收", "data": {"items": [
                {"itemNo": i.get("itemNo"), "hisOrderNo": self._number("R")} for i in body["items"]]}}
        self.orders[order] = answer
        return answer

    def counter_booking(self) -> str | None:
        with self.lock:
            free = [s for s in self.slots.values() if s["status"] == "0"]
            if not free:
                return None
            slot = self.rng.choice(free)
            slot["status"], slot["regNo"] = "1", self._number("C")
            return slot["regNo"]


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _fault(code: str, text: str) -> tuple[int, str, bytes]:
    body = (f'<soap:Envelope xmlns:soap="{SOAP_NS}"><soap:Body><soap:Fault><faultcode>soap:{code}</faultcode>'
            f"<faultstring>{escape(text)}</faultstring></soap:Fault></soap:Body></soap:Envelope>")
    return 500, "text/xml", body.encode("utf-8")


def _element(name: str, fields: dict) -> str:
    return "".join(f"<tns:{k}>{escape(str(v))}</tns:{k}>" for k, v in fields.items() if v is not None)


def _fields(request) -> dict:
    """A request element's fields: its children's text; a repeated structure (a prescription's items) as a list
    of its fields, under its name + 's'."""
    fields: dict = {}
    for child in request:
        if len(child):
            fields.setdefault(_local(child.tag) + "s", []).append({_local(c.tag): c.text or "" for c in child})
        else:
            fields[_local(child.tag)] = child.text or ""
    return fields


def _xml_value(name: str, value) -> str:
    if isinstance(value, list):
        return f"<{name}>" + "".join(_xml_value("item", v) for v in value) + f"</{name}>"
    if isinstance(value, dict):
        return f"<{name}>" + "".join(_xml_value(k, v) for k, v in value.items()) + f"</{name}>"
    return "" if value is None else f"<{name}>{escape(str(value))}</{name}>"


def xml_call(hospital: Hospital, path: str, data: bytes) -> tuple[int, str, bytes]:
    """The XML face: ``<Request>`` in, ``<Response>`` out (or what the call answered, an HTML page)."""
    try:
        request = ET.fromstring(data)
    except ET.ParseError:
        return 400, "application/xml", b"<Response><code>9000</code><msg>bad XML</msg></Response>"
    status, kind, payload = hospital.call(path, _fields(request))
    if kind != "application/json":
        return status, kind, payload
    answer = json.loads(payload)
    body = '<?xml version="1.0" encoding="utf-8"?>' + _xml_value("Response", answer)
    return status, "application/xml", body.encode("utf-8")


class SoapFace:
    """The SOAP 1.1 face of the same hospital."""

    def __init__(self, hospital: Hospital, user: str | None = None, password: str | None = None, faults: int = 0):
        self.hospital, self.user, self.password, self.faults = hospital, user, password, faults

    def wsdl(self, address: str) -> bytes:
        return WSDL.read_text(encoding="utf-8").replace("http://127.0.0.1:8080/soap", address).encode("utf-8")

    def call(self, data: bytes) -> tuple[int, str, bytes]:
        try:
            envelope = ET.fromstring(data)
        except ET.ParseError:
            return _fault("Client", "not XML")
        body = envelope.find(f"{{{SOAP_NS}}}Body")
        if body is None or not len(body):
            return _fault("Client", "no SOAP Body")
        if self.user is not None:
            user = envelope.find(f".//{{{WSSE_NS}}}Username")
            password = envelope.find(f".//{{{WSSE_NS}}}Password")
            if user is None or password is None or (user.text, password.text) != (self.user, self.password):
                return _fault("Client", "authentication failed (WS-Security UsernameToken)")
        request = body[0]
        operation = _local(request.tag)
        if operation not in OPERATIONS:
            return _fault("Client", f"unknown operation {operation}")
        fields = _fields(request)
        if operation == "Confirm" and self.faults > 0:
            self.faults -= 1
            self.hospital._journal("/soap/Confirm", fields, "fault")
            return _fault("Server", "数据库繁忙")
        status, _kind, payload = self.hospital.call(OPERATIONS[operation], fields)
        if status != 200:
            return status, _kind, payload
        answer = json.loads(payload)
        out = {"code": answer["code"], "msg": answer.get("msg")}
        items = ""
        if operation == "Confirm":
            out["regNo"] = (answer.get("data") or {}).get("regNo")
        if operation == "QuerySchedule":
            items = "".join(f"<tns:slot>{_element('slot', slot)}</tns:slot>" for slot in answer.get("data") or [])
        if operation == "SubmitPrescription":
            items = "".join(f"<tns:item>{_element('item', item)}</tns:item>"
                            for item in (answer.get("data") or {}).get("items", []))
        xml = (f'<?xml version="1.0" encoding="utf-8"?><soap:Envelope xmlns:soap="{SOAP_NS}" xmlns:tns="{TNS}">'
               f"<soap:Body><tns:{operation}Response>{_element(operation, out)}{items}</tns:{operation}Response>"
               f"</soap:Body></soap:Envelope>")
        return 200, "text/xml", xml.encode("utf-8")


def handler_for(hospital: Hospital, soap: SoapFace | None = None):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if soap is None or self.path != "/soap?wsdl":
                self._send(404, "text/plain", b"not found")
                return
            host = self.headers.get("Host", "127.0.0.1")
            self._send(200, "text/xml", soap.wsdl(f"http://{host}/soap"))

        def _send(self, status: int, kind: str, data: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", f"{kind}; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            if soap is not None and self.path == "/soap":
                self._send(*soap.call(self.rfile.read(length)))
                return
            if self.path.startswith("/xml/"):
                self._send(*xml_call(hospital, self.path[len("/xml"):], self.rfile.read(length)))
                return
            try:
                body = json.loads(self.rfile.read(length).decode("utf-8") or "{}")
            except ValueError:
                body = None
            if not isinstance(body, dict):
                status, kind, data = 400, "application/json", b'{"code": "9000", "msg": "bad JSON"}'
            else:
                status, kind, data = hospital.call(self.path, body)
            self._send(status, kind, data)

        def log_message(self, *args):  # (quiet: the journal says what was called)
            pass

    return Handler


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m hissim.webservice", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--start-date", type=date.fromisoformat, default=date.today() + timedelta(days=1))
    parser.add_argument("--days", type=int, default=2)
    parser.add_argument("--doctors", type=int, default=2)
    parser.add_argument("--html-errors", type=int, default=0)
    parser.add_argument("--journal", type=Path, default=None)
    parser.add_argument("--soap", action="store_true", help="also answer SOAP at /soap (WSDL at /soap?wsdl)")
    parser.add_argument("--ws-user", default=None)
    parser.add_argument("--ws-password", default=None)
    parser.add_argument("--faults", type=int, default=0)
    args = parser.parse_args(argv)
    hospital = Hospital(args.start_date, args.days, args.doctors, args.journal, args.html_errors)
    soap = SoapFace(hospital, args.ws_user, args.ws_password, args.faults) if args.soap else None
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler_for(hospital, soap))
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    signal.signal(signal.SIGUSR1, lambda *_: print(f"his-sim-ws: counter booked {hospital.counter_booking()}",
                                                   flush=True))
    print(f"his-sim-ws: listening on {args.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
