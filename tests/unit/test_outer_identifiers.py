"""No identifier in clear in the outer gate's log events or its audit trail (issue 15, finding 5): log events
name a request by its route template (``/fhir/Appointment/{id}``), never its raw path; the audit names a
resource by an id the gateway issued (one the chamber knows), anything else a platform put in a URL by a
keyed hash an auditor can recompute.  Same in-process gate (tests/unit/outer_gate.py) as
tests/unit/test_outer_access.py."""

import json
import re
from types import SimpleNamespace
from urllib.parse import unquote

import pytest
from structlog.testing import capture_logs

from gateway.domain.audit import keyed_name
from tests.unit.outer_gate import SID, Gate, appointment, outcome, raw_request

#: finding 5's paths: an identifier with a letter before it, under a Chinese character, an ID card number
#: with "ID" before it; and a mobile number alone
PROBES = ["x13655550002", "A13655550003", "%E7%A9%BA13655550004", "ID110105194912310049", "13655550005"]
DIGITS = ["13655550002", "13655550003", "13655550004", "110105194912310049", "13655550005"]


def logged_paths(gate, method, path, **kw):
    with capture_logs() as events:
        gate.request(method, path, **kw)
    return [e["path"] for e in events if e["event"] == "outer.request"]


@pytest.mark.parametrize("method, path, template", [
    *[("GET", f"/Appointment/{p}", "/fhir/Appointment/{id}") for p in PROBES],
    ("PUT", "/Appointment/x13655550002", "/fhir/Appointment/{id}"),
    ("GET", "/Slot/13655550002", "/fhir/Slot/{id}"),
    ("GET", "/Schedule/13655550002", "/fhir/Schedule/{id}"),
    ("GET", "/Slot?schedule=13655550002", "/fhir/Slot"),
    ("POST", "/Appointment/$hold", "/fhir/Appointment/$hold"),
    ("POST", "/Appointment/$13655550002", "/fhir/Appointment/{id}"),
    ("GET", "/Appointment/x13655550002/_history/13655550002", "/fhir/Appointment/{id}/_history/{id}"),
    ("GET", "/metadata", "/fhir/metadata"),
    ("GET", "/x13655550002", "/fhir/{?}"),
    ("GET", "/Appointment/a/b/c/d/e/f/g/h", "/fhir/Appointment/{id}/{?}/{?}/{?}/{?}/{?}/…"),
])
def test_requests_are_logged_by_their_route_template(gate, method, path, template):
    assert logged_paths(gate, method, path) == [template]


@pytest.mark.parametrize("path, template", [
    (b"/x13655550002", "/{?}"),
    (b"/13655550002/fhir/Appointment", "/{?}/fhir/Appointment"),
    (b"/fhir/Appointment/%2413655550002", "/fhir/Appointment/{id}"),
    (b"/fhir/Appointment/%24hold", "/fhir/Appointment/$hold"),
])
def test_paths_outside_the_base_and_escaped_ones_are_templates_too(gate, path, template):
    req, [event] = raw_request(gate, path)
    assert event["path"] == template


def test_the_token_and_smart_endpoints_log_their_own_path(tmp_path, certs):
    """Reached before any FHIR routing: their log events name the endpoint, never what followed it."""
    g = Gate(tmp_path / "t.sqlite3", certs)
    try:
        g.api.gatekeeper.oauth = SimpleNamespace(token_url="https://gw.example/oauth/token", clients={"demo": None})
        _, [event] = raw_request(g, b"/oauth/token?x=13655550002")
        assert event["path"] == "/oauth/token"
        _, [event] = raw_request(g, b"/fhir/.well-known/smart-configuration?13655550002")
        assert event["path"] == "/fhir/.well-known/smart-configuration"
    finally:
        g.booking.stop()
        g.chamber.close()


# -- the audit trail ---------------------------------------------------------------------------------------------

def test_what_the_gateway_did_not_issue_is_audited_by_a_keyed_hash(gate):
    """Finding 5: these ids were stored in clear in the audit record's resource_id (kept 180 days, never
    changed).  Now each is HMAC-SHA256 under the chamber's own key: no digit of it is left, and the same id
    asked twice gets the same name, so an auditor can still find it."""
    for probe in [*PROBES, PROBES[0]]:
        req, _ = raw_request(gate, f"/fhir/Appointment/{probe}".encode())
        assert req.responseCode == 404
    outcome(gate.request("PUT", "/Slot/13655550002"), 405, "not-supported")
    key = gate.chamber.read().audit_key()
    names = [r.resource_id for r in gate.audit()]
    assert names == [keyed_name(key, unquote(p)) for p in [*PROBES, PROBES[0], "13655550002"]]
    assert all(re.fullmatch(r"hmac:[0-9a-f]{32}", n) for n in names)
    text = json.dumps([r.__dict__ for r in gate.audit()])
    for digits in DIGITS:
        assert digits not in text
    assert keyed_name(key, "x13655550002") != keyed_name(b"another chamber's key".ljust(32), "x13655550002")


def test_ids_the_chamber_knows_are_audited_as_they_are(gate):
    """An appointment the gateway issued (another platform's too: a probe on it is worth naming) and a
    slot the HIS published keep their ids in the audit."""
    appointment_id = gate.request("POST", "/Appointment", appointment(SID[0])).json["id"]
    outcome(gate.request("GET", f"/Appointment/{appointment_id}", platform="other"), 404, "not-found")
    outcome(gate.request("PUT", f"/Slot/{SID[1]}"), 405, "not-supported")
    assert [(r.action, r.resource_id) for r in gate.audit()] == [
        ("book", appointment_id), ("read", appointment_id), ("read", SID[1])]
