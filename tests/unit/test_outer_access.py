"""The outer gate in-process (no reactor, no sockets): what a platform is granted is enforced on every
request — scopes, revoked certificates, rate limits, quotas, request cost limits — and every access to
patient data and every refusal is audited.  FhirApi runs on a real chamber file with a task.Clock;
requests are twisted.web DummyRequests carrying real client certificates from the dev CA."""

import json
from types import SimpleNamespace

import pytest
from OpenSSL import crypto
from twisted.internet import defer

from adapters.outer.access import PlatformGrant
from adapters.outer.intake import JsonLimits
from gateway.domain.audit import verify
from gateway.ops.devca import init_dev_ca
from gateway.domain.model import HisAnswer, slot_status
from tests.unit.outer_gate import SID, Connection, Gate, appointment, outcome



# -- scopes and identity -------------------------------------------------------------------------------------

def test_a_platform_without_the_scope_gets_403_forbidden_and_it_is_audited(gate):
    """'readonly' has Slot.read and Schedule.read only: it may search slots, not book nor read appointments."""
    assert gate.request("GET", "/Slot").status == 200
    assert gate.request("GET", "/Schedule", platform="readonly").status == 200
    assert "Appointment.write" in outcome(gate.request("POST", "/Appointment", appointment(SID[0]),
                                                       platform="readonly"), 403, "forbidden")
    outcome(gate.request("GET", "/Appointment", platform="readonly"), 403, "forbidden")
    outcome(gate.request("GET", "/Appointment/a123", platform="readonly"), 403, "forbidden")
    assert slot_status(gate.chamber.read().slot(SID[0])) == "free"  # nothing was held
    records = gate.audit()
    assert [(r.platform, r.action, r.outcome, r.detail) for r in records] == [
        ("readonly", "book", 403, "forbidden"), ("readonly", "search", 403, "forbidden"),
        ("readonly", "read", 403, "forbidden")]
    assert records[0].subject == "CN=platform-readonly,O=gatewayd dev" and records[0].source == "192.0.2.7"


def test_a_revoked_certificate_is_refused_on_every_request(gate):
    """The certificate is CA-signed and its subject registered, but its serial is on the revoked list."""
    serial = format(gate.certs["revoked"].get_serial_number(), "X")
    assert serial in outcome(gate.request("GET", "/metadata", platform="revoked"), 403, "security")
    [record] = gate.audit()
    assert (record.platform, record.serial, record.outcome) == ("revoked", serial, 403)


def test_a_connection_certificate_is_read_once_and_still_checked_on_every_request(gate):
    """The client certificate of a keep-alive connection is read and parsed at its first request only (the
    listeners refuse renegotiation, so it cannot change); revocation is still decided on every request."""
    connection = Connection(gate.certs["demo"])
    for _ in range(3):
        assert gate.request("GET", "/Slot", transport=connection).status == 200
    assert connection.reads == 1
    serial = gate.certs["demo"].get_serial_number()
    gate.api.gatekeeper.platforms._grants["demo"] = PlatformGrant(revoked_serials=frozenset({serial}))  # as a reload does
    outcome(gate.request("GET", "/Slot", transport=connection), 403, "security")
    other = Connection(gate.certs["other"])
    assert gate.request("GET", "/Slot", platform="other", transport=other).status == 200
    assert other.reads == 1
    assert [(r.platform, r.serial, r.outcome) for r in gate.audit()] == [("demo", format(serial, "X"), 403)]


def test_the_listeners_tls_refuses_renegotiation(tmp_path):
    from OpenSSL import SSL

    from adapters.outer.tls import tls_options
    from adapters.tls import TlsSwitch

    init_dev_ca(tmp_path, platforms=("demo",))
    tls = SimpleNamespace(certificate=tmp_path / "server.pem", private_key=tmp_path / "server.key",
                          client_ca=tmp_path / "ca.pem", client_certificates="required")
    context = TlsSwitch(tls_options(tls)).getContext()
    assert context.set_options(0) & SSL.OP_NO_RENEGOTIATION


def test_an_unregistered_certificate_is_403_and_audited_with_its_subject(gate, tmp_path):
    init_dev_ca(tmp_path / "ca2", platforms=("stranger",))
    gate.certs["stranger"] = crypto.load_certificate(crypto.FILETYPE_PEM,
                                                     (tmp_path / "ca2" / "platform-stranger.pem").read_bytes())
    outcome(gate.request("GET", "/Slot", platform="stranger"), 403, "security")
    [record] = gate.audit()
    assert (record.platform, record.subject, record.action) == (None, "CN=platform-stranger,O=gatewayd dev",
                                                                "search")


def test_another_platforms_appointment_is_404_and_the_probe_is_audited(gate):
    booked = gate.request("POST", "/Appointment", appointment(SID[0]))
    assert booked.status == 202
    appointment_id = booked.json["id"]
    outcome(gate.request("GET", f"/Appointment/{appointment_id}", platform="other"), 404, "not-found")
    outcome(gate.request("PUT", f"/Appointment/{appointment_id}", {"resourceType": "Appointment",
                                                                   "status": "cancelled"}, platform="other"),
            404, "not-found")
    assert gate.request("GET", f"/Appointment/{appointment_id}").status == 200
    actions = [(r.platform, r.action, r.outcome, r.resource_id) for r in gate.audit()]
    assert actions == [("demo", "book", 202, appointment_id), ("other", "read", 404, appointment_id),
                       ("other", "cancel", 404, appointment_id), ("demo", "read", 200, appointment_id)]
    assert verify(gate.chamber.read()).ok


# -- audit of patient data -----------------------------------------------------------------------------------

def test_book_read_search_cancel_are_each_audited_once_with_ids_only(gate):
    booked = gate.request("POST", "/Appointment", appointment(SID[1]))
    appointment_id = booked.json["id"]
    srm = gate.chamber.read().messages(direction="outbound")[0]
    gate.chamber.transact_now(lambda tx: gate.booking.on_answer(tx, tx.message(srm.id), HisAnswer("AA", "", "H1")))
    assert gate.request("GET", f"/Appointment/{appointment_id}").json["status"] == "booked"
    assert gate.request("GET", "/Appointment").status == 200
    cancelled = gate.request("PATCH", f"/Appointment/{appointment_id}",
                             [{"op": "replace", "path": "/status", "value": "cancelled"}],
                             headers={"Content-Type": "application/json-patch+json"})
    assert cancelled.status == 202
    records = gate.audit()
    assert [(r.action, r.outcome) for r in records] == [
        ("book", 202), ("book.settled", 201), ("read", 200), ("search", 200), ("cancel", 202)]
    assert records[3].detail == f"1 result(s): {appointment_id}"
    assert {r.resource_id for r in records if r.action != "search"} == {appointment_id}
    text = json.dumps([r.__dict__ for r in records], ensure_ascii=False)
    assert "欧阳娜娜" not in text and "11010519491231002X" not in text and "13912345678" not in text


def test_under_strict_audit_patient_data_is_not_released_when_its_access_cannot_be_recorded(gate, monkeypatch):
    """audit.strict: if the audit record cannot be committed, a read of an appointment is answered 503
    (nothing shown); a refusal is still answered with its own status."""
    appointment_id = gate.request("POST", "/Appointment", appointment(SID[2])).json["id"]
    gate.api.strict_audit = True
    monkeypatch.setattr(gate.api.audit, "record", lambda entry: defer.fail(OSError("disk full")))
    r = gate.request("GET", f"/Appointment/{appointment_id}")
    outcome(r, 503, "transient")
    assert "欧阳" not in json.dumps(r.json, ensure_ascii=False)
    outcome(gate.request("GET", "/Appointment/nope"), 404, "not-found")


def test_by_default_reads_keep_working_and_the_unrecorded_access_goes_to_the_log(gate, monkeypatch):
    """Not strict (the default): the read is answered and the record's fields (ids only) are logged as
    audit.not_recorded, so a full disk does not stop platforms reading their bookings."""
    appointment_id = gate.request("POST", "/Appointment", appointment(SID[2])).json["id"]
    logged = []
    monkeypatch.setattr("adapters.outer.site.log.error", lambda event, **kw: logged.append((event, kw)))
    monkeypatch.setattr(gate.api.audit, "record", lambda entry: defer.fail(OSError("disk full")))
    assert gate.request("GET", f"/Appointment/{appointment_id}").status == 200
    [(event, fields)] = logged
    assert event == "audit.not_recorded"
    assert (fields["audit_action"], fields["platform"], fields["resource_id"], fields["outcome"]) == \
        ("read", "demo", appointment_id, 200)


def test_an_id_in_the_url_that_is_not_an_id_stays_out_of_the_audit(gate):
    """A platform putting a name or a phone number where an id goes does not get it into the audit: what
    the chamber does not hold is recorded by its keyed name (tests/unit/test_outer_identifiers.py)."""
    outcome(gate.request("GET", "/Appointment/%E6%AC%A7%E9%98%B3"), 404, "not-found")
    outcome(gate.request("GET", "/Appointment/13912345678"), 404, "not-found")
    assert [r.resource_id[:5] for r in gate.audit()] == ["hmac:", "hmac:"]
    assert "13912345678" not in json.dumps([r.__dict__ for r in gate.audit()])


# -- rate limits -----------------------------------------------------------------------------------------------

def test_over_its_rate_limit_a_platform_gets_429_with_retry_after(gate):
    """'limited': 1 request/s, burst 2.  The third request at once is refused; a second later it passes.
    A burst of refusals is audited as the first one plus one record counting the rest."""
    assert [gate.request("GET", "/Slot", platform="limited").status for _ in range(2)] == [200, 200]
    refused = gate.request("GET", "/Slot", platform="limited")
    assert "rate limit" in outcome(refused, 429, "throttled")
    assert refused.headers["retry-after"] == "1"
    for _ in range(5):
        outcome(gate.request("GET", "/Slot", platform="limited"), 429, "throttled")
    assert gate.request("GET", "/Slot").status == 200  # another platform is not affected
    gate.clock.advance(1)
    assert gate.request("GET", "/Slot", platform="limited").status == 200
    records = gate.audit()
    assert [(r.outcome, r.detail) for r in records] == [
        (429, "throttled"), (429, "throttled: 5 more request(s) refused within the second after the previous "
                                  "record")]


def test_the_global_limit_applies_to_all_platforms_together(tmp_path, certs):
    g = Gate(tmp_path / "g.sqlite3", certs, global_limit=(1.0, 3))
    try:
        statuses = [g.request("GET", "/metadata", platform=p).status for p in ("demo", "other", "demo", "other")]
        assert statuses == [200, 200, 200, 429]
    finally:
        g.booking.stop()
        g.chamber.close()


# -- quotas ------------------------------------------------------------------------------------------------------

def test_quota_hides_slots_and_refuses_the_booking_past_it_with_409_business_rule(gate):
    """demo may hold 2 slots of a schedule per day: after two bookings that day's other free slots leave
    its searches, reading one is 404, and booking one anyway is 409 business-rule; 'other' sees them all."""
    for sid in SID[:2]:
        assert gate.request("POST", "/Appointment", appointment(sid)).status == 202
    free = [e["resource"]["id"] for e in gate.request("GET", "/Slot?status=free").json.get("entry", [])]
    assert free == []
    assert len(gate.request("GET", "/Slot?status=free", platform="other").json["entry"]) == 6
    outcome(gate.request("GET", f"/Slot/{SID[5]}"), 404, "not-found")
    assert gate.request("GET", f"/Slot/{SID[0]}").json["status"] == "busy-tentative"  # its own hold
    diagnostics = outcome(gate.request("POST", "/Appointment", appointment(SID[5])), 409, "business-rule")
    assert "holds 2 of the 2 slot(s)" in diagnostics
    assert gate.audit()[-1].detail == "business-rule"


# -- what a request may cost ---------------------------------------------------------------------------------------

def nested(depth):
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("raw, code", [
    (nested(33).encode(), "too-costly"),
    (nested(100_000).encode(), "too-costly"),
    (('{"resourceType": "Appointment", "description": "' + "x" * 65537 + '"}').encode(), "too-long"),
    (('{"' + "k" * 65537 + '": 1}').encode(), "too-long"),
    (b'{"resourceType": "Appointment", "minutesDuration": 9007199254740993}', "invalid"),
    (b'{"resourceType": "Appointment", "minutesDuration": -9007199254740993}', "invalid"),
    (b'{"resourceType": "Appointment", "minutesDuration": 1e400}', "invalid"),
    (b'{"resourceType": "Appointment", "minutesDuration": ' + b"9" * 5000 + b"}", "too-long"),
    (b'{"resourceType": "Appointment", "minutesDuration": NaN}', "structure"),
    (b'{"resourceType": "Appointment", "minutesDuration": Infinity}', "structure"),
    (b"\xff\xfe", "structure"),
])
def test_costly_json_bodies_are_refused_with_400(gate, raw, code):
    outcome(gate.request("POST", "/Appointment", raw=raw), 400, code)


def test_limits_leave_ordinary_bodies_alone(gate):
    """32 levels, 2^53, a 64 KiB string and ordinary decimals pass the limits (and go on to be validated)."""
    limits = JsonLimits(32, 65536)
    assert limits.parse(nested(2).encode()) == [[]]
    deep = limits.parse(nested(32).encode())
    for _ in range(31):
        deep = deep[0]
    assert deep == []
    assert limits.parse(b'{"a": 9007199254740992, "b": -9007199254740992, "c": 1.5e3}') == \
        {"a": 2 ** 53, "b": -(2 ** 53), "c": 1500.0}
    assert len(limits.parse(json.dumps({"s": "x" * 65536}).encode())["s"]) == 65536
    r = gate.request("POST", "/Appointment", raw=nested(32).encode())
    assert r.status == 400 and r.json["issue"][0]["code"] == "invalid"  # not an Appointment, but not too deep
    assert gate.request("POST", "/Appointment", appointment(SID[3])).status == 202


def test_xml_is_refused_with_415(gate):
    diagnostics = outcome(gate.request("POST", "/Appointment", raw=b"<Appointment/>",
                                       headers={"Content-Type": "application/fhir+xml"}), 415, "not-supported")
    assert "XML is not accepted" in diagnostics


@pytest.mark.parametrize("query", ["_offset=1000001", "_offset=" + "9" * 5000, "_count=" + "9" * 5000,
                                   "start=ge9999-12-31", "start=le0001-01-01T00:00:00%2B14:00",
                                   "&".join(f"status=free{i}" for i in range(101))])
def test_queries_that_would_cost_too_much_or_overflow_are_400(gate, query):
    r = gate.request("GET", f"/Slot?{query}")
    assert r.status == 400 and r.json["resourceType"] == "OperationOutcome", r.json
