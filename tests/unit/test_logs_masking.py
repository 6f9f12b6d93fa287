"""The log masking processor: patient data never reaches a log line, ids and codes still do."""

import io
import json

import pytest
import structlog

from gateway.ops import logs
from gateway.ops.logs import mask_patient_data, mask_value


def masked(**event):
    return mask_patient_data(None, "info", {"event": "x", **event})


@pytest.mark.parametrize("text", [
    "11010519491231002X", "11010519491231002x", "440301199001011234", "身份证 110105194912310021 不对",
    "13912345678", "+86 13912345678", "+8613912345678", "139-1234-5678", "139 1234 5678", "010-12345678",
    "0755-1234567",
])
def test_id_card_and_phone_numbers_are_masked_inside_any_text(text):
    out = masked(error=f"could not read {text}: bad")["error"]
    assert "***" in out
    assert not any(ch.isdigit() for ch in out.replace("***", "").split("read")[1])


@pytest.mark.parametrize("text, kept", [
    ("/fhir/Appointment/x13655550002", "/fhir/Appointment/x"),
    ("/fhir/Appointment/A13655550003", "/fhir/Appointment/A"),
    ("/fhir/Appointment/空13655550004", "/fhir/Appointment/空"),
    ("/fhir/Appointment/ID110105194912310049", "/fhir/Appointment/ID"),
    ("MRN13912345678X", "MRNX"),
    ("id_card=ID11010519491231002Xend", "id_card=IDend"),
    ("tel:+86-139-1234-5678;ext", "tel:;ext"),
])
def test_numbers_inside_tokens_are_masked_too(text, kept):
    """Finding 5: masking used to catch only numbers standing alone; letters glued to an ID card or phone
    number no longer hide it."""
    masked_text = mask_value(text)
    assert "***" in masked_text and masked_text.replace("***", "") == kept


def test_the_gateways_own_ids_are_not_masked_whatever_digits_they_hold():
    """Ids the gateway makes — appointment and prescription ids (a letter and 20 hex digits), control ids
    ('G' and 19 hex), the MLLP listener's ACK ids (20 hex), token ids (16 hex), hashes (64 hex), keyed
    hashes in the audit ('hmac:' and 32 hex) — and times in milliseconds or HL7 form are kept."""
    own = ["a13912345678abcdef012", "m110105194912310021ab", "G13912345678abcdef01", "13912345678abcdef012",
           "a13912345678bcde", "110105194912310021" + "a" * 46, "hmac:13912345678abcdef0123456789abcde",
           "20261124080000", "1732412345678", "D001-202611240800"]
    for value in own:
        assert mask_value(f"id {value} at x") == f"id {value} at x"


@pytest.mark.parametrize("key", ["patient", "name", "family", "given", "phone", "id_card", "mrn", "telecom",
                                 "patient_name", "PatientId", "phone_number", "home_address", "birth_date",
                                 "identifier", "body"])
def test_keys_naming_patient_data_are_masked_whatever_their_value(key):
    assert masked(**{key: "欧阳娜娜"})[key] == "***"


def test_ids_codes_and_times_are_kept():
    """Control ids (hex runs), slot ids, HL7 and ISO times, counts and ports are not patient data."""
    event = dict(control_id="G13912345678abcdef01", slot="D001-202611240800", at="2026-11-23T07:10:39.123Z",
                 dtm="20261124080000", ms=1732412345678, port=2575, appointment="a1c2e3", peer="his",
                 error_type="ValueError", platform="demo")
    assert masked(**event) == {"event": "x", **event}


def test_whole_messages_and_resources_in_a_value_are_replaced():
    assert masked(text="MSH|^~\\&|HIS\rPID|1||MRN1||欧阳^娜娜")["text"] == "***"
    assert masked(error='{"resourceType": "Patient", "name": [{"text": "欧阳娜娜"}]}')["error"] == "***"


def test_nested_values_are_masked():
    out = masked(context={"phone": "x", "items": ["13912345678", {"given": "娜娜"}], "ok": "D001"})
    assert out["context"] == {"phone": "***", "items": ["***", {"given": "***"}], "ok": "D001"}


def test_the_configured_logger_masks_what_it_writes(monkeypatch):
    """Through structlog as gatewayd configures it: the JSON line has no trace of the patient."""
    monkeypatch.setattr(logs, "_route_twisted_logs", lambda: None)  # leave Twisted's global logging alone
    stream = io.StringIO()
    try:
        logs.configure("info", "json", stream=stream)
        structlog.get_logger("t").info("outer.request", error="patient 11010519491231002X phone 13912345678",
                                       patient={"name": "欧阳娜娜"}, control_id="G0123456789abcdef012")
    finally:
        structlog.reset_defaults()
    line = json.loads(stream.getvalue())
    assert "11010519491231002X" not in stream.getvalue() and "13912345678" not in stream.getvalue()
    assert "欧阳娜娜" not in stream.getvalue()
    assert line["control_id"] == "G0123456789abcdef012"


def test_numbers_shaped_like_a_phone_number_are_masked_too():
    assert mask_value(13912345678) == "***"
    assert mask_value(1732412345678) == 1732412345678  # a time in milliseconds is kept


def _configured_line(monkeypatch, processors_of, **event):
    """One info line through structlog configured by ``logs.configure`` and then given ``processors_of()``."""
    monkeypatch.setattr(logs, "_route_twisted_logs", lambda: None)
    stream = io.StringIO()
    try:
        logs.configure("info", "json", stream=stream)
        processors = processors_of()
        if processors is not None:
            structlog.configure(processors=processors)
        structlog.contextvars.bind_contextvars(request_id="r1")
        try:
            raise ValueError("boom")
        except ValueError:
            structlog.get_logger("t").exception("inner.message", **event)
    finally:
        structlog.contextvars.clear_contextvars()
        structlog.reset_defaults()
    return stream.getvalue()


def test_the_one_json_processor_writes_what_structlogs_chain_of_processors_wrote(monkeypatch):
    """Issue 21: the JSON format's processors run as one (``logs.json_line``); the line is the one the chain of
    structlog's own processors wrote: the same keys in the same order, masked, with the traceback."""
    chain = lambda: [  # noqa: E731 (what logs.configure used to install)
        structlog.contextvars.merge_contextvars, structlog.processors.add_log_level, logs.mask_patient_data,
        structlog.processors.TimeStamper(fmt="iso", utc=True), structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer(ensure_ascii=False)]
    event = dict(peer="his", control_id="L12-345", type="SIU^S12", ack="AA", duplicate=False, n=3,
                 error="patient 11010519491231002X", patient="欧阳娜娜", where=object())
    ours, theirs = (json.loads(_configured_line(monkeypatch, p, **event)) for p in (lambda: None, chain))
    assert list(ours) == list(theirs)
    assert ours["timestamp"].endswith("Z") and theirs["timestamp"].endswith("Z")
    ours.pop("timestamp"), theirs.pop("timestamp")
    assert ours == theirs
    assert ours["patient"] == "***" and "11010519491231002X" not in ours["error"]
    assert ours["request_id"] == "r1" and ours["level"] == "error" and "ValueError: boom" in ours["exception"]
    assert ours["where"].startswith("<object object at")
