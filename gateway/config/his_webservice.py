"""The keys of a HIS endpoint of ``kind: webservice`` (``inner.his.webservice``): the HIS vendor's web service —
HTTP with JSON or XML, or SOAP from its WSDL — its calls (query schedule, book, cancel, hold, prescription),
each call's request fields and where its answer's result code, text and appointment number are, the result
codes that mean accepted, refused or "try again", TLS and credentials.

How the gateway uses them: adapters/inner/webservice.py and docs/his-adapters.md.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Annotated, Literal, Optional

from gateway.config.fields import Duration, Pattern, Range, ReadableFile, doc
from gateway.config.his_database import SlotColumns, SlotStatusCodes

#: where a value is in a JSON document: keys joined by '.', a list's item by its number (data.rows.0.code)
JsonPath = Annotated[str, Pattern(r"^[^\s.]+(\.[^\s.]+)*$", "a path such as data.regNo (keys joined by '.')")]

#: what a booking request's templates may name (adapters.maps.his_requests.HisRequest's fields)
REQUEST_FIELDS = frozenset({"key", "placer", "schedule_id", "start", "minutes", "his_appointment", "patient_id",
                            "patient_id_type", "patient_name", "phone", "service_code", "reason", "action"})
#: what a schedule query's templates may name
QUERY_FIELDS = frozenset({"window_start", "window_end"})
#: what a prescription's templates may name, and each of its items'
PRESCRIPTION_FIELDS = frozenset({"key", "number", "patient_id", "patient_name", "prescriber_id", "prescriber_name"})
ITEM_FIELDS = frozenset({"item", "drug_code", "drug_name", "dose", "dose_unit", "route", "frequency", "quantity",
                         "quantity_unit", "days", "instructions"})
_DATES = frozenset({"start", "window_start", "window_end"})


def template_issues(key: str, templates: dict[str, str], allowed: frozenset[str]) -> list[tuple[str, str]]:
    """Problems with request templates: an unknown field, a format on a value that is no date-time."""
    issues = []
    for field, template in templates.items():
        try:
            parts = list(string.Formatter().parse(template))
        except ValueError as e:
            issues.append((f"{key}.{field}", f"not a template: {e} (write {{{{ and }}}} for braces)"))
            continue
        for _text, name, spec, conversion in parts:
            if name is None:
                continue
            if name not in allowed:
                issues.append((f"{key}.{field}", f"unknown field {{{name}}}; the fields are: "
                                                 f"{', '.join(sorted(allowed))}"))
            elif conversion or (spec and name not in _DATES):
                issues.append((f"{key}.{field}", f"{{{name}}} takes no format (only {', '.join(sorted(_DATES))} "
                                                 f"take a date format such as {{start:%Y-%m-%d %H:%M}})"))
    return issues


@dataclass(frozen=True)
class WsCall:
    call: str = doc("The call: for json its path after url, e.g. /api/register/confirm (POST, a JSON body); for "
                    "soap its operation's name in the WSDL, e.g. Confirm.")
    request: dict[str, str] = doc(
        "The request's fields (JSON fields, XML elements, or the SOAP operation's parameters), each a template "
        "of the gateway's values: e.g. {orderNo: '{key}', "
        "scheduleId: '{schedule_id}', visitTime: '{start:%Y-%m-%d %H:%M}', patientName: '{patient_name}', "
        "idCard: '{patient_id}', mobile: '{phone}', regNo: '{his_appointment}'}. {key} is the gateway's "
        "idempotency key (the message's control id, the same on every resend): send it where the HIS "
        "recognises a request it has already taken. A field with '.' in its name is nested (head.token).")
    code: JsonPath = doc("Where the HIS's result code is in its answer (for soap: in the operation's result), e.g. "
                         "code or head.resultCode.")
    message: Optional[JsonPath] = doc("Where its text is (msg): the reason of a refusal.", default=None)
    his_appointment: Optional[JsonPath] = doc("Where the HIS's appointment number is (data.regNo).", default=None)

    def __post_validate__(self):
        return template_issues("request", self.request, REQUEST_FIELDS)


@dataclass(frozen=True)
class WsPrescriptionCall:
    call: str = doc("The call that sends a prescription to the pharmacy: its path (json) or operation (soap).")
    items: str = doc("The request's field that holds the list of items (json), or the operation's repeated item "
                     "parameter (soap), e.g. items.")
    item: dict[str, str] = doc(
        "Each item's fields, templates of {item} (the gateway's item id), {drug_code}, {drug_name}, {dose}, "
        "{dose_unit}, {route}, {frequency}, {quantity}, {quantity_unit}, {days}, {instructions}.")
    code: JsonPath = doc("Where the HIS's result code is in its answer.")
    request: dict[str, str] = doc(
        "The prescription's own fields, templates of {key} (the idempotency key: the same on every resend), "
        "{number} (the prescription number), {patient_id}, {patient_name}, {prescriber_id}, {prescriber_name}.",
        default_factory=dict)
    message: Optional[JsonPath] = doc("Where its text is.", default=None)
    item_answers: Optional[JsonPath] = doc("Where the list of the items' answers is (data.items).", default=None)
    item_id: Optional[JsonPath] = doc("In an item's answer, the gateway's item id.", default=None)
    his_order: Optional[JsonPath] = doc("In an item's answer, the HIS's order number for it.", default=None)

    def __post_validate__(self):
        return (template_issues("request", self.request, PRESCRIPTION_FIELDS)
                + template_issues("item", self.item, ITEM_FIELDS))


@dataclass(frozen=True)
class WsResultCodes:
    accepted: list[str] = doc("Result codes of an accepted request (also: this request was taken before).",
                              default_factory=lambda: ["0"])
    refused: list[str] = doc("Result codes of a refused request (the slot taken, closed...): never sent again.",
                             default_factory=list)
    retry: list[str] = doc("Result codes that mean 'try again later' (busy, locked): sent again after the "
                           "backoff. Any other code is also retried, and dead-lettered after max_attempts.",
                           default_factory=list)


@dataclass(frozen=True)
class WsSlots:
    call: str = doc("The schedule query: its path (json), e.g. /api/schedule/query, or operation (soap).")
    rows: JsonPath = doc("Where the list of slots is in the answer, e.g. data or data.list.")
    fields: SlotColumns = doc("Where each of a slot's values is within one item of the list (paths).")
    status_codes: SlotStatusCodes = doc("The HIS's slot status codes; an item with another is refused.")
    request: dict[str, str] = doc("Its JSON fields: templates of {window_start} and {window_end} (the first day "
                                  "and the day after the last), e.g. {beginDate: '{window_start:%Y-%m-%d}'}.",
                                  default_factory=dict)
    code: Optional[JsonPath] = doc("Where the answer's result code is (it must be an accepted one).", default=None)
    interval: Annotated[Duration, Range(1, 86400)] = doc("How often the schedule is queried.", default=Duration(60.0))
    window_days: Annotated[int, Range(1, 90)] = doc("How many days ahead (from today) are asked for.", default=7)

    def __post_validate__(self):
        return template_issues("request", self.request, QUERY_FIELDS)


@dataclass(frozen=True)
class HisWebServiceConfig:
    url: str = doc("json: the web service's base URL, e.g. https://10.1.2.6:8443 (the calls' paths follow it); "
                   "soap: the service's address (the WSDL's own address is not used).")
    book: Optional[WsCall] = doc("The call that books a slot (预约/挂号确认).", default=None)
    cancel: Optional[WsCall] = doc("The call that cancels a booking (取消预约).", default=None)
    protocol: Literal["json", "xml", "soap"] = doc(
        "'json': HTTP POST with JSON bodies and answers; 'xml': HTTP POST with XML bodies and answers (a call's "
        "request fields all under one root element, e.g. Request.orderNo; answer paths from below the answer's "
        "root element); 'soap': SOAP (zeep) from the WSDL the site supplies (wsdl).", default="json")
    wsdl: Optional[ReadableFile] = doc("With protocol: soap, the HIS's WSDL file.", default=None)
    hold: Optional[WsCall] = doc("The call that locks a slot (锁号, with outer.hold_at_his); none: a hold is "
                                 "refused.", default=None)
    slots: Optional[WsSlots] = doc("The schedule query (查询号源); none: slots come some other way.", default=None)
    prescription: Optional[WsPrescriptionCall] = doc(
        "The call that sends a prescription (an endpoint that routes send RDE^O11 to).", default=None)
    result_codes: WsResultCodes = doc("What the HIS's result codes mean.", default_factory=WsResultCodes)
    ca: Optional[ReadableFile] = doc("With https: the CA that signs the web service's certificate (default: the "
                                     "system's).", default=None)
    certificate: Optional[ReadableFile] = doc("The gateway's client certificate, if the HIS asks for one.",
                                              default=None)
    private_key: Optional[ReadableFile] = doc("Its private key.", default=None)
    username: Optional[str] = doc("The user name the HIS asks for: a WS-Security UsernameToken (soap), HTTP basic "
                                  "authentication (json).", default=None)
    password_file: Optional[ReadableFile] = doc("A file holding its password (one line).", default=None)
    headers: dict[str, str] = doc("Headers sent with every call (an API key the vendor issued...).",
                                  default_factory=dict)
    timeout: Annotated[Duration, Range(0.1, 600)] = doc(
        "Longest a call may take (connecting and answering); then it is abandoned and sent again later.",
        default=Duration(10.0))
    threads: Annotated[int, Range(1, 32)] = doc("Calls in progress at once, at most.", default=2)
    department_codes: dict[str, str] = doc("The HIS's department codes the gateway publishes, each with its name; "
                                           "a slot with another is refused. Empty: any.", default_factory=dict)
    doctor_codes: dict[str, str] = doc("The HIS's doctor codes the gateway publishes; empty: any.",
                                       default_factory=dict)
    local_time: Literal["naive", "utc"] = doc(
        "How the web service's date-times without an offset are read: 'naive' = the hospital's local time, "
        "'utc' = UTC.", default="naive")

    def __post_validate__(self):
        issues = []
        if not re.match(r"^https?://[^\s/]+", self.url):
            issues.append(("url", "expected an http:// or https:// URL"))
        if (self.certificate is None) != (self.private_key is None):
            issues.append(("certificate", "give both certificate and private_key, or neither"))
        if self.book is None and self.slots is None and self.prescription is None:
            issues.append(("book", "give the calls this HIS endpoint takes: book and cancel, slots, prescription"))
        if (self.book is None) != (self.cancel is None):
            issues.append(("cancel" if self.cancel is None else "book", "give both book and cancel, or neither"))
        if self.protocol == "soap" and self.wsdl is None:
            issues.append(("wsdl", "protocol: soap needs the HIS's WSDL (wsdl)"))
        if self.protocol == "xml":
            for key in ("book", "cancel", "hold", "slots", "prescription"):
                call = getattr(self, key)
                roots = {f.split(".")[0] for f in (call.request if call is not None else {})}
                if call is not None and len(roots) != 1:
                    issues.append((f"{key}.request", "protocol: xml writes one XML document: give every field "
                                                     "under one root element (Request.orderNo, Request.regNo)"))
        if (self.username is None) != (self.password_file is None):
            issues.append(("username", "give both username and password_file, or neither"))
        return issues
