"""The outer gate in-process for unit tests (no reactor, no sockets): ``Gate`` runs FhirApi on a real chamber
file with a task.Clock, and ``Gate.request`` hands it a twisted.web DummyRequest carrying a real client
certificate from the dev CA (the ``certs`` and ``gate`` fixtures are in tests/conftest.py).  Also what a
platform sends (``appointment``, ``params``, ``ref``; ``raw_request`` for any path) and reads (``outcome``,
``entries``)."""

import functools
import io
import json
from datetime import datetime, timedelta
from types import SimpleNamespace
from urllib.parse import unquote_to_bytes
from zoneinfo import ZoneInfo

from fhir.resources.R4B.bundle import Bundle
from structlog.testing import capture_logs
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.web.test.requesthelper import DummyRequest

from adapters.outer.access import PlatformDirectory, PlatformGrant
from adapters.outer.intake import JsonLimits
from adapters.outer.pages import SlotPages
from adapters.outer.site import FhirApi
from adapters.maps.srm_booking import Hl7Header, build_srm
from gateway.domain.audit import AuditTrail
from gateway.domain.booking import BookingService, HisLinkInfo
from gateway.domain.slot_book import SlotBook
from gateway.chamber.engine import Chamber
from gateway.config.outer import normalise_subject
from gateway.domain.quota import QuotaRule, Quotas
from adapters.outer.ratelimit import RateLimiter
from gateway.domain.model import ScheduleInfo, SlotNotice
from gateway.domain.ids import slot_id

TZ = ZoneInfo("Asia/Shanghai")
NOW = datetime(2030, 1, 1, tzinfo=TZ).timestamp()
DAY = datetime(2030, 1, 7, 8, 0)
SCHEDULE = ScheduleInfo("D001", "Dr", "D001", "张伟", "CARD", "心内科")
PLATFORMS = ("demo", "other", "readonly", "limited", "revoked")


class Gate:
    def __init__(self, path, certs, *, global_limit=None, slot_pages=True, backend=None):
        """A gate on the SQLite chamber at ``path``, or on ``backend`` (tests/conftest.py: chamber_backend)."""
        self.certs = certs
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.chamber = Chamber(path if backend is None else None, backend=backend, clock=self.clock.seconds)
        self.chamber.open()
        header = Hl7Header("GATEWAYD", "FRONT", "HIS", "HOSPITAL", "2.5", "utf-8")
        self.quotas = Quotas({"demo": [QuotaRule("*", None, 2, 3600)]}, TZ)
        self.booking = BookingService(
            self.chamber, HisLinkInfo("his", "utf-8", "S04", functools.partial(build_srm, header=header)),
            tz=TZ, hold_seconds=300, clock=self.clock, quotas=self.quotas)
        grants = {p: PlatformGrant() for p in PLATFORMS}
        grants["readonly"] = PlatformGrant(scopes=frozenset({"Slot.read", "Schedule.read"}))
        grants["revoked"] = PlatformGrant(revoked_serials=frozenset({certs["revoked"].get_serial_number()}))
        directory = PlatformDirectory([(p, normalise_subject(f"CN=platform-{p}")) for p in PLATFORMS], grants)
        limits = {p: None for p in PLATFORMS}
        limits["limited"] = (1.0, 2)
        self.api = FhirApi(
            booking=self.booking, reader=self.chamber.read, platforms=directory, tz=TZ, base_path="/fhir",
            public_base_url="https://gw.example/fhir", answer_within=5, page_size=100, hospital_name="H",
            software_version="test", audit=AuditTrail(self.chamber), quotas=self.quotas,
            rate_limiter=RateLimiter(limits, global_limit, self.clock), json_limits=JsonLimits(32, 65536),
            clock=self.clock,
            # GET /Slot pages kept as `gatewayd run` keeps them (one process): every test here reads through them
            slot_pages=SlotPages.attached(self.chamber, self.clock.seconds) if slot_pages else None)
        self.chamber.transact_now(lambda tx: SlotBook(TZ).apply(tx, [
            SlotNotice("open", SCHEDULE, DAY + timedelta(minutes=15 * i), 15, "card", "x") for i in range(8)]))

    def request(self, method, path, body=None, platform="demo", headers=None, raw=None, settle=True,
                transport=None):
        bare, _, _query = path.partition("?")
        req = DummyRequest([p.encode() for p in ("fhir" + bare).split("/") if p])
        req.client = IPv4Address("TCP", "192.0.2.7", 40000)
        req.method = method.encode()
        req.uri = ("/fhir" + path).encode()
        req.path = ("/fhir" + bare).encode()
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
        req.content = io.BytesIO(data)
        ctype = (headers or {}).pop("Content-Type", "application/fhir+json")
        req.requestHeaders.setRawHeaders(b"content-type", [ctype.encode()])
        for k, v in (headers or {}).items():
            req.requestHeaders.setRawHeaders(k.encode(), [v.encode()])
        cert = self.certs.get(platform) if platform else None
        req.channel = SimpleNamespace(transport=transport or Connection(cert))
        self.api.render(req)
        if settle and not req.finished:
            self.clock.advance(5)  # past answer_within: the booking is answered 202
        assert req.finished, "no answer"
        text = b"".join(req.written).decode()
        return SimpleNamespace(status=req.responseCode, reason=req.responseMessage,
                               json=json.loads(text) if text else None,
                               headers={k.decode().lower(): v[0].decode()
                                        for k, v in req.responseHeaders.getAllRawHeaders()})

    def audit(self):
        return list(self.chamber.read().audit_records())


class Connection:
    """A TLS connection's transport as the outer gate sees it: the handshake's peer certificate."""

    def __init__(self, cert):
        self.cert, self.reads = cert, 0

    def getPeerCertificate(self):
        self.reads += 1
        return self.cert


def outcome(response, status, code):
    assert response.status == status, response.json
    assert response.json["resourceType"] == "OperationOutcome"
    assert response.json["issue"][0]["code"] == code
    return response.json["issue"][0]["diagnostics"]


def appointment(sid, name="欧阳娜娜"):
    return {"resourceType": "Appointment", "status": "proposed", "slot": [{"reference": f"Slot/{sid}"}],
            "contained": [{"resourceType": "Patient", "id": "p",
                           "identifier": [{"system": "urn:id-card", "value": "11010519491231002X"}],
                           "name": [{"text": name}], "telecom": [{"system": "phone", "value": "13912345678"}]}],
            "participant": [{"actor": {"reference": "#p"}, "status": "needs-action"}]}


SID = [slot_id("D001", DAY + timedelta(minutes=15 * i)) for i in range(8)]


def raw_request(gate, path: bytes, method=b"GET", platform="demo", body=b"", content_type=b"application/fhir+json"):
    """A request for any path (outside the FHIR base too) as twisted.web hands it over, segments unquoted;
    returns it and its outer.request log events."""
    req = DummyRequest([unquote_to_bytes(p) for p in path.split(b"?")[0].split(b"/") if p])
    req.client = IPv4Address("TCP", "192.0.2.7", 40000)
    req.method, req.uri, req.path = method, path, path.split(b"?")[0]
    req.content = io.BytesIO(body)
    req.requestHeaders.setRawHeaders(b"content-type", [content_type])
    req.channel = SimpleNamespace(transport=Connection(gate.certs.get(platform)))
    with capture_logs() as events:
        gate.api.render(req)
    assert req.finished
    return req, [e for e in events if e["event"] == "outer.request"]


PATIENT = {"resourceType": "Patient", "identifier": [{"system": "urn:id-card", "value": "11010519491231002X"}],
           "name": [{"text": "欧阳娜娜"}], "telecom": [{"system": "phone", "value": "13912345678"}]}


def params(*items):
    return {"resourceType": "Parameters", "parameter": [dict(name=n, **v) for n, v in items]}


def ref(reference):
    return {"valueReference": {"reference": reference}}


def entries(response):
    Bundle.model_validate(response.json)
    return [e["resource"] for e in response.json.get("entry", [])]
