"""A HIS endpoint of ``kind: webservice``: the HIS vendor's web service, HTTP POST with JSON or XML, or SOAP
(zeep) from the WSDL the site supplies.

- :class:`WebServiceLink`: one HTTP session (TLS with the site's CA and client certificate, the vendor's
  headers; basic authentication for json, a WS-Security UsernameToken for soap) whose blocking calls run on a
  bounded thread pool (`adapters.inner.threaded`), each within ``timeout``.  A SOAP operation's result is read
  as the same nested values a JSON answer is, so the answer paths work alike; a SOAP Fault is an answer the
  config cannot read: retried with its fault string.
- :class:`WebServiceDestination`: the relay's destination (`gateway.relay.Destination`).  It reads the booking
  message the domain wrote (`adapters.maps.his_requests`) and makes the call its action names (book, cancel,
  hold) with the request's fields filled from it — ``{key}`` the message's control id, the same on every
  resend, which the HIS uses to recognise a request it has already taken.  The answer's result code
  (``result_codes``): accepted -> AA (with the HIS's appointment number), refused -> AR (the HIS's text),
  retry or any other code -> DeliveryFailed (resent after the backoff, dead-lettered after max_attempts).
  No connection (refused, connect timed out): HisUnreachable (not an attempt).  No answer in time, an HTTP
  error status, an answer that is no JSON (an HTML error page) or has no result code where the config says:
  DeliveryFailed, with the reason; nothing of it is applied.
- :func:`slot_poller`: the schedule query every ``interval`` over the window, its items read into slot rows
  (`adapters.inner.slot_rows`: diffed against the previous answer; a bad item refused with its reason).
"""

from __future__ import annotations

import json
from datetime import datetime
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import structlog
from twisted.internet import defer

from adapters.hl7.er7 import Hl7Error, parse
from adapters.inner.slot_rows import SlotRows, SlotRowsPoller, SlotSource, text
from adapters.inner.threaded import CallTimeout, ThreadedLink
from adapters.maps.his_requests import HisRequest, request_from_srm
from adapters.maps.rds_dispense import prescription_from_rde
from gateway.config.his_webservice import HisWebServiceConfig, WsCall
from gateway.domain.model import HisAnswer
from gateway.domain.prescriptions import ItemAnswer, OrderAnswer
from gateway.relay import DeliveryFailed, HisUnreachable

log = structlog.get_logger("gateway.inner.webservice")


class NotReached(Exception):
    """The web service could not be reached: the request never went out."""


class BadAnswer(Exception):
    """The web service answered, but not with what the config says its answers hold."""


def path_value(document, path: str):
    """The value at ``path`` (keys joined by '.', a list's item by its number); KeyError when there is none."""
    value = document
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise KeyError(path)
    return value


def render(templates: dict[str, str], values: dict) -> dict:
    """A request's JSON body: each field's template filled with ``values``; 'a.b' fields nested."""
    body: dict = {}
    for field, template in templates.items():
        put(body, field, template.format(**values))
    return body


def put(body: dict, field: str, value) -> None:
    """``value`` at ``field`` of ``body``, a field with '.' nested."""
    *parents, last = field.split(".")
    for parent in parents:
        body = body.setdefault(parent, {})
    body[last] = value


def prescription_values(key: str, p) -> dict:
    identifier = p.patient.identifiers[0].value if p.patient.identifiers else ""
    return {"key": key, "number": p.number, "patient_id": identifier, "patient_name": p.patient.family + p.patient.given,
            "prescriber_id": p.prescriber.id, "prescriber_name": p.prescriber.name}


def item_values(item) -> dict:
    return {"item": item.placer_id, "drug_code": item.medication.code, "drug_name": item.medication.text,
            "dose": item.dose_value, "dose_unit": item.dose_unit.text or item.dose_unit.code,
            "route": item.route.code, "frequency": item.frequency.code, "quantity": item.dispense_value,
            "quantity_unit": item.dispense_unit.text or item.dispense_unit.code,
            "days": "" if item.days_supply is None else item.days_supply, "instructions": item.instructions}


def request_values(request: HisRequest) -> dict:
    return {"key": request.key, "placer": request.placer, "schedule_id": request.schedule_id,
            "start": request.start_local, "minutes": request.minutes, "his_appointment": request.his_appointment,
            "patient_id": request.patient_id, "patient_id_type": request.patient_id_type,
            "patient_name": request.patient_name, "phone": request.phone, "service_code": request.service_code,
            "reason": request.reason, "action": request.action}


class WebServiceLink(ThreadedLink):
    """The HIS's web service: one HTTP session, its calls on a thread pool of ``threads``."""

    def __init__(self, cfg: HisWebServiceConfig, *, peer: str, reactor, run=None, session=None):
        super().__init__(f"webservice:{peer}", threads=cfg.threads, timeout=cfg.timeout + 1, reactor=reactor, run=run)
        self.cfg = cfg
        self.peer = peer
        self.session = session
        self.soap = None

    def startService(self):
        if self.session is None:
            self.session = self.make_session()
        if self.cfg.protocol == "soap" and self.soap is None:
            self.soap = self.make_soap()
        super().startService()

    def make_session(self):
        import requests

        session = requests.Session()
        session.headers.update({"Content-Type": "application/json; charset=utf-8", "Accept": "application/json",
                                **self.cfg.headers})
        if self.cfg.ca is not None:
            session.verify = str(self.cfg.ca)
        if self.cfg.certificate is not None:
            session.cert = (str(self.cfg.certificate), str(self.cfg.private_key))
        if self.cfg.username is not None and self.cfg.protocol != "soap":
            session.auth = (self.cfg.username, self.cfg.password_file.read_text().strip())
        return session

    def make_soap(self):
        """The zeep service bound to ``url`` (the WSDL read once, at start)."""
        import zeep
        from zeep.transports import Transport
        from zeep.wsse.username import UsernameToken

        self.session.hooks["response"].append(_xml_only)
        transport = Transport(session=self.session, timeout=self.cfg.timeout, operation_timeout=self.cfg.timeout)
        wsse = (UsernameToken(self.cfg.username, self.cfg.password_file.read_text().strip())
                if self.cfg.username is not None else None)
        client = zeep.Client(str(self.cfg.wsdl), transport=transport, wsse=wsse)
        binding = next(iter(client.wsdl.bindings))
        self._client = client  # (the service proxy keeps no reference to its client)
        return client.create_service(binding, self.cfg.url)

    def closed(self) -> None:
        if self.session is not None:
            self.session.close()

    def ping(self) -> defer.Deferred:
        """The probe's check (kind webservice): an HTTP HEAD of ``url`` with the link's session (its TLS, client
        certificate, headers), on the link's threads. Any HTTP answer is up (a HEAD may well be 404 or 405: the
        server and its TLS answered), except 502, 503 and 504: a proxy or load balancer in front saying the
        service behind it is not there; no answer is down (NotReached, CallTimeout)."""
        return self.call(_head, self.session, self.cfg.url, self.cfg.timeout)

    def post(self, call: str, body: dict) -> defer.Deferred:
        """The call's answer as nested values (a Deferred); fails with NotReached, CallTimeout or BadAnswer."""
        if self.cfg.protocol == "soap":
            return self.call(_soap, self.soap, call, body, self.cfg.timeout)
        return self.call(_post, self.session, self.cfg.url.rstrip("/") + call, body, self.cfg.timeout,
                         self.cfg.protocol == "xml")


def _xml_only(response, *args, **kwargs):
    """(soap) An answer that is no XML — an HTML error page from a proxy in front of a HIS that is down — is
    told as what it is, before zeep reads it as a fault it cannot name."""
    kind = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if response.request.method == "POST" and "xml" not in kind:
        raise BadAnswer(f"HTTP {response.status_code}: not a SOAP answer ({kind or 'no content type'}, "
                        f"{len(response.content)} bytes)")
    return response


def _soap(service, operation: str, body: dict, timeout: float):
    """On the pool's thread: the SOAP operation's result as plain nested values."""
    import requests
    from lxml import etree
    from zeep import exceptions, helpers

    try:
        result = getattr(service, operation)(**body)
    except exceptions.Fault as e:
        raise BadAnswer(f"SOAP Fault {e.code or ''}: {e.message}".replace("  ", " ")) from None
    except exceptions.TransportError as e:
        raise BadAnswer(f"HTTP {e.status_code} (not a SOAP answer, {len(e.content or b'')} bytes)") from None
    except (exceptions.XMLSyntaxError, etree.XMLSyntaxError):
        raise BadAnswer("the answer is not XML") from None
    except (exceptions.Error, AttributeError, TypeError) as e:  # (an operation or parameter the WSDL lacks)
        raise BadAnswer(f"{type(e).__name__}: {e}") from None
    except requests.exceptions.RequestException as e:
        raise _transport_error(e, timeout) from None
    return json.loads(json.dumps(helpers.serialize_object(result, dict), default=str))


def _transport_error(e, timeout: float) -> Exception:
    """What a failed HTTP exchange means: never reached (no connection), no answer in time, or another error."""
    import requests

    if isinstance(e, requests.exceptions.ConnectTimeout):
        return NotReached(f"connect timed out: {type(e).__name__}")
    if isinstance(e, requests.exceptions.Timeout):
        return CallTimeout(f"no answer within {timeout:g}s")
    if isinstance(e, requests.exceptions.ConnectionError):
        return NotReached(f"cannot connect: {type(e).__name__}")
    return BadAnswer(type(e).__name__)


def to_xml(body: dict) -> bytes:
    """An XML document from nested values: the one top-level key is the root element; a list is its element
    repeated."""
    import xml.etree.ElementTree as ET

    def fill(element, value):
        if isinstance(value, dict):
            for name, child in value.items():
                for item in child if isinstance(child, list) else [child]:
                    fill(ET.SubElement(element, name), item)
        elif value is not None:
            element.text = str(value)

    [(root_name, content)] = body.items()
    root = ET.Element(root_name)
    fill(root, content)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def from_xml(data: bytes):
    """Nested values from an XML document, from below its root element: an element's children by name (a name
    repeated: a list), a leaf its text; namespaces dropped.  ValueError when it is no XML."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise ValueError(str(e)) from None

    def read(element):
        if not len(element):
            return element.text or ""
        out: dict = {}
        for child in element:
            name = child.tag.rsplit("}", 1)[-1]
            value = read(child)
            if name in out:
                out[name] = out[name] if isinstance(out[name], list) else [out[name]]
                out[name].append(value)
            else:
                out[name] = value
        return out

    return read(root)


def _head(session, url: str, timeout: float) -> int:
    """On the pool's thread: HEAD ``url``; its status, or NotReached / BadAnswer (502, 503, 504)."""
    import requests

    try:
        response = session.head(url, timeout=timeout, allow_redirects=False)
    except requests.exceptions.RequestException as e:
        raise _transport_error(e, timeout) from None
    if response.status_code in (502, 503, 504):
        raise BadAnswer(f"HTTP {response.status_code}: the service behind {urlsplit(url).netloc} is not there")
    return response.status_code


def _post(session, url: str, body: dict, timeout: float, xml: bool = False):
    """On the pool's thread: POST the body (JSON, or XML), the answer's nested values."""
    import requests

    data = to_xml(body) if xml else json.dumps(body, ensure_ascii=False).encode("utf-8")
    headers = {"Content-Type": "application/xml; charset=utf-8", "Accept": "application/xml"} if xml else None
    try:
        response = session.post(url, data=data, timeout=timeout, headers=headers)
    except requests.exceptions.RequestException as e:
        raise _transport_error(e, timeout) from None
    kind = response.headers.get("Content-Type", "").split(";")[0].strip() or "no content type"
    if response.status_code >= 400:
        raise BadAnswer(f"HTTP {response.status_code} ({kind}, {len(response.content)} bytes)")
    try:
        if xml:
            return from_xml(response.content)
        return json.loads(response.content.decode(response.encoding or "utf-8"))
    except (ValueError, UnicodeDecodeError, LookupError):
        raise BadAnswer(f"the answer is not {'XML' if xml else 'JSON'} ({kind}, {len(response.content)} bytes)") from None


class WebServiceDestination:
    """The relay's way to a HIS of kind webservice: one call per message, its result code read."""

    def __init__(self, link: WebServiceLink, *, charset: str):
        self.link = link
        self.cfg = link.cfg
        self.charset = charset

    def deliver(self, body: bytes, control_id: str, timeout: float) -> defer.Deferred:
        try:
            message = parse(body, self.charset)
            if message.message_code in ("RDE", "OMP"):
                return self._prescription(message)
            request = request_from_srm(message)
        except Hl7Error as e:
            return defer.succeed(HisAnswer("AE", f"not a request this web service takes: {e}"))
        call: WsCall | None = getattr(self.cfg, request.action, None) if request.action != "move" else None
        if call is None:
            return defer.succeed(HisAnswer("AR", f"this HIS takes no {request.action} requests "
                                                 f"(webservice.{request.action})"))
        try:
            payload = render(call.request, request_values(request))
        except (KeyError, ValueError) as e:
            return defer.succeed(HisAnswer("AE", f"the request could not be written: {e}"))
        d = self.link.post(call.call, payload)
        d.addCallbacks(lambda answer: self._answer(call, answer), self._failed)
        return d

    def _prescription(self, message) -> defer.Deferred:
        call = self.cfg.prescription
        if call is None:
            return defer.succeed(HisAnswer("AE", "this HIS endpoint has no prescription call "
                                                 "(webservice.prescription)"))
        p = prescription_from_rde(message)
        try:
            payload = render(call.request, prescription_values(message.control_id, p))
            put(payload, call.items, [render(call.item, item_values(item)) for item in p.items])
        except (KeyError, ValueError) as e:
            return defer.succeed(HisAnswer("AE", f"the request could not be written: {e}"))
        d = self.link.post(call.call, payload)
        d.addCallbacks(lambda answer: self._order_answer(call, message.control_id, answer), self._failed)
        return d

    def _order_answer(self, call, key: str, answer) -> HisAnswer:
        result = self._answer(call, answer)
        items = []
        if call.item_answers is not None:
            try:
                listed = path_value(answer, call.item_answers)
            except KeyError:
                listed = []
            for entry in listed if isinstance(listed, list) else [listed] if isinstance(listed, dict) else []:
                items.append(ItemAnswer(_optional(entry, call.item_id), _optional(entry, call.his_order),
                                        "OK" if result.accepted else "UA"))
        order = OrderAnswer(acknowledges=key, code=result.code, accepted=result.accepted,
                            reason="" if result.accepted else result.text, items=tuple(items))
        return HisAnswer(result.code, result.text, order=order)

    def _answer(self, call: WsCall, answer) -> HisAnswer:
        codes = self.cfg.result_codes
        try:
            code = text(path_value(answer, call.code))
        except KeyError:
            raise DeliveryFailed(f"the answer has no result code at {call.code}") from None
        message = _optional(answer, call.message)
        if code in codes.accepted:
            return HisAnswer("AA", message, his_appointment=_optional(answer, getattr(call, "his_appointment", None))
                             or None)
        if code in codes.refused:
            return HisAnswer("AR", message or f"refused by the HIS (code {code})")
        what = "asks to try again" if code in codes.retry else "is not one result_codes names"
        raise DeliveryFailed(f"result code {code!r} {what}: {message}".rstrip(": "))

    @staticmethod
    def _failed(failure):
        if failure.check(NotReached):
            raise HisUnreachable(str(failure.value))
        failure.trap(CallTimeout, BadAnswer, defer.CancelledError)
        raise DeliveryFailed(str(failure.value) or failure.type.__name__)

    def close(self) -> defer.Deferred:
        return defer.succeed(None)  # (a call in progress ends within the timeout; the relay waits for it)


def _optional(document, path: str | None) -> str:
    if path is None:
        return ""
    try:
        return text(path_value(document, path))
    except KeyError:
        return ""


def slot_poller(link: WebServiceLink, inbound, *, tz: ZoneInfo, clock) -> SlotRowsPoller:
    """The schedule query (``webservice.slots``) every interval, its answer diffed against the previous one."""
    slots, cfg = link.cfg.slots, link.cfg

    def read(window: tuple[datetime, datetime], _marker) -> defer.Deferred:
        body = render(slots.request, {"window_start": window[0], "window_end": window[1]})
        return link.post(slots.call, body).addCallback(rows_of)

    def rows_of(answer) -> SlotRows:
        if slots.code is not None:
            code = _optional(answer, slots.code)
            if code not in cfg.result_codes.accepted:
                raise BadAnswer(f"the schedule query was answered with result code {code!r}")
        try:
            items = path_value(answer, slots.rows)
        except KeyError:
            raise BadAnswer(f"the answer has no list of slots at {slots.rows}") from None
        if isinstance(items, dict):  # (one item of an XML list, or an object for one slot)
            items = [items]
        if items == "":  # (an XML list with no item)
            items = []
        if not isinstance(items, list):
            raise BadAnswer(f"{slots.rows} in the answer is not a list")
        fields = {k: v for k, v in vars(slots.fields).items() if v}
        return SlotRows([{k: _value(item, p) for k, p in fields.items()} for item in items])

    source = SlotSource(read=read, name=f"ws:{slots.call}", columns=slots.fields, status_codes=slots.status_codes,
                        interval=slots.interval, window_days=slots.window_days, departments=cfg.department_codes,
                        doctors=cfg.doctor_codes, local_time=cfg.local_time)
    return SlotRowsPoller(link.peer, source, inbound, tz=tz, clock=clock)


def _value(item, path: str):
    try:
        return path_value(item, path)
    except KeyError:
        return None  # (the row is refused when the value is one it needs)
