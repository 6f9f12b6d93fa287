"""Strict intake on the outer gate: text a platform sends that the gateway could not store, compare or pass on
faithfully — a lone UTF-16 surrogate, NUL and the other control characters FHIR strings may not hold, a key
named twice in one JSON object — is refused with 400 and an OperationOutcome naming the problem (and the
element, as ``expression``), never a 500; and wherever else text enters (query, path, headers, the token
form) no input gives a 500.  Same in-process gate as tests/unit/test_outer_access.py (tests/unit/outer_gate.py:
a real chamber file, a task.Clock, DummyRequests with the dev CA's client certificates)."""

import json
from urllib.parse import urlencode

import pytest

from adapters.outer.oauth import ASSERTION_TYPE, TokenService
from tests.unit.client_assertions import AUD, claims, sign
from tests.unit.outer_gate import SID, appointment, outcome, raw_request


def posted(gate, body: dict):
    """POST /Appointment with ``body`` written as JSON escapes (json.dumps writes a lone surrogate as
    ``\\ud800`` and NUL as ``\\u0000``, exactly as a platform's JSON library would)."""
    return gate.request("POST", "/Appointment", raw=json.dumps(body).encode("ascii"))


def with_family(text):
    body = appointment(SID[0])
    body["contained"][0]["name"] = [{"family": text}]
    return body


def with_identifier(text):
    body = appointment(SID[0])
    body["contained"][0]["identifier"][0]["value"] = text
    return body


def with_slot(text):
    body = appointment(SID[0])
    body["slot"][0]["reference"] = text
    return body


@pytest.mark.parametrize("body, expression", [
    (with_family("\ud800"), "Appointment.contained[0].name[0].family"),
    (with_identifier("MRN\udfff"), "Appointment.contained[0].identifier[0].value"),
    (with_slot("Slot/\ud800"), "Appointment.slot[0].reference"),
    ({**appointment(SID[0]), "description": "\udc00\ud800"}, "Appointment.description"),
])
def test_a_lone_surrogate_is_refused_with_400_naming_the_element(gate, body, expression):
    """Finding 4: these were a 500 (UnicodeEncodeError when the request was hashed or stored)."""
    r = posted(gate, body)
    diagnostics = outcome(r, 400, "invalid")
    assert "surrogate" in diagnostics
    assert r.json["issue"][0]["expression"] == [expression]
    assert gate.chamber.read().messages(direction="outbound") == []  # nothing was queued for the HIS


def test_a_lone_surrogate_in_a_key_is_refused(gate):
    r = gate.request("POST", "/Appointment", raw=b'{"resourceType": "Appointment", "\\ud83d": 1}')
    assert "surrogate" in outcome(r, 400, "invalid")


def test_a_surrogate_pair_is_an_ordinary_character(gate):
    """Escaped as a pair, U+1F600 is one character and the booking goes through."""
    r = posted(gate, with_family("欧阳\U0001F600"))
    assert r.status == 202, r.json


@pytest.mark.parametrize("char", ["\x00", "\x01", "\x1b", "\x1f"])
def test_nul_and_other_control_characters_are_refused(gate, char):
    """Finding 7 at the door: FHIR strings may not hold characters below U+0020 other than TAB, LF and CR;
    a NUL used to reach the HIS as a raw 0x00 in PID-5."""
    r = posted(gate, with_family(f"欧{char}阳"))
    diagnostics = outcome(r, 400, "invalid")
    assert f"U+{ord(char):04X}" in diagnostics
    assert r.json["issue"][0]["expression"] == ["Appointment.contained[0].name[0].family"]
    assert gate.chamber.read().messages(direction="outbound") == []


def test_tab_lf_and_cr_are_text_fhir_allows(gate):
    assert posted(gate, with_family("欧\t阳\r\n")).status == 202


@pytest.mark.parametrize("raw, key, expression", [
    (b'{"resourceType": "Appointment", "status": "proposed", "status": "booked"}', "status", "Appointment"),
    (('{"resourceType": "Appointment", "status": "proposed", "slot": [{"reference": "Slot/%s"}], '
      '"slot": [{"reference": "Slot/%s"}]}' % (SID[0], SID[1])).encode(), "slot", "Appointment"),
    (b'{"resourceType": "Appointment", "contained": [{"resourceType": "Patient", "id": "p", "id": "q"}]}', "id",
     "Appointment.contained[0]"),
    (b'[{"op": "replace", "path": "/status", "value": "cancelled", "value": "booked"}]', "value", "[0]"),
])
def test_a_key_named_twice_is_refused_at_any_depth(gate, raw, key, expression):
    """Finding 6: the last one used to win silently, leaving a stored request that reads two ways."""
    r = gate.request("POST", "/Appointment", raw=raw)
    diagnostics = outcome(r, 400, "invalid")
    assert f"{key!r} more than once" in diagnostics
    assert r.json["issue"][0]["expression"] == [expression]


# -- wherever else text enters: never a 500 ------------------------------------------------------------------

@pytest.mark.parametrize("method, path, headers", [
    ("GET", "/Appointment/%ED%A0%80", {}),  # a surrogate's UTF-8 bytes: not UTF-8 at all
    ("GET", "/Appointment/%00", {}),
    ("GET", "/Slot/%ED%A0%80%00", {}),
    ("GET", "/Appointment?_id=%ED%A0%80&status=%00", {}),
    ("GET", "/Appointment?patient=%ED%A0%80%7C%00", {}),
    ("GET", "/Slot?schedule=%00&service-type=%ED%A0%80", {}),
    ("GET", "/Appointment/$find?start=%00", {}),
    ("POST", "/Appointment", {"If-None-Exist": "identifier=%ED%A0%80|%00"}),
    ("POST", "/Appointment", {"Idempotency-Key": "键\x00"}),
])
def test_no_text_anywhere_in_a_request_gives_a_500(gate, method, path, headers):
    r = gate.request(method, path, appointment(SID[0]) if method == "POST" else None, headers=headers)
    assert r.status < 500, r.json
    if r.status >= 400:
        assert r.json["resourceType"] == "OperationOutcome"


def test_no_text_in_a_token_request_gives_a_500(gate, clients):
    """/oauth/token: lone surrogates inside the client assertion's JSON (issuer, jti, kid, alg, a signed
    one too) and junk percent-escapes in the form are answered as OAuth2 says (400/401), never 500."""
    gate.api.gatekeeper.oauth = TokenService(gate.chamber, clients, AUD, clock=gate.clock)
    now = gate.clock.seconds()
    assertions = [sign(claims("\ud800", now=now)), sign(claims(now=now, jti="\udfff")),
                  sign(claims(now=now, sub="\ud800")), sign(claims(now=now), kid="\ud800"),
                  sign(claims(now=now), header={"alg": "\ud800"})]
    forms = [urlencode({"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
                        "client_assertion": a}).encode() for a in assertions]
    for form in [*forms, b"grant_type=%ED%A0%80&client_assertion=%00", b"%ED%A0%80=%00", b"\xed\xa0\x80=1"]:
        req, _ = raw_request(gate, b"/oauth/token", b"POST", body=form,
                             content_type=b"application/x-www-form-urlencoded")
        answer = json.loads(b"".join(req.written))
        assert req.responseCode in (400, 401) and answer["error"], answer
