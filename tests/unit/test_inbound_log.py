"""The inner gate's one line per message (issue 21: its logger is bound once per logging configuration)."""

import io
import json

import structlog

from gateway.domain import inbound
from gateway.domain.inbound import InboundService, Received, Verdict
from gateway.ops import logs


def _lines(stream):
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_the_per_message_line_follows_every_reconfiguration(monkeypatch):
    monkeypatch.setattr(logs, "_route_twisted_logs", lambda: None)
    received = Received(peer="his", control_id="L1", type="SIU^S12", body=b"MSH|", charset="utf-8",
                        sender="HIS|H")
    first, second, third = io.StringIO(), io.StringIO(), io.StringIO()
    try:
        logs.configure("info", "json", stream=first)
        InboundService._logged(Verdict("AA"), received)
        logs.configure("warning", "json", stream=second)
        InboundService._logged(Verdict("AA"), received)
        logs.configure("info", "json", stream=third)
        InboundService._logged(Verdict("AE", "bad"), received)
        with structlog.testing.capture_logs() as captured:
            InboundService._logged(Verdict("AR"), received)
    finally:
        structlog.reset_defaults()
    assert [(e["event"], e["control_id"], e["ack"]) for e in _lines(first)] == [("inner.message", "L1", "AA")]
    assert second.getvalue() == ""
    assert [(e["event"], e["ack"]) for e in _lines(third)] == [("inner.message", "AE")]
    assert [(e["event"], e["ack"]) for e in captured] == [("inner.message", "AR")]
    assert inbound._info_log() is not None  # (structlog's defaults log info)


def test_nothing_is_written_at_warning(monkeypatch):
    monkeypatch.setattr(logs, "_route_twisted_logs", lambda: None)
    stream = io.StringIO()
    try:
        logs.configure("warning", "json", stream=stream)
        assert inbound._info_log() is None
    finally:
        structlog.reset_defaults()
