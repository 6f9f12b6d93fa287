"""Structured logs (structlog): JSON lines when not on a terminal, readable text on one.

Log events carry ids, states and codes — never message bodies or patient data.  As a second line of
defence, :func:`mask_patient_data` replaces the value of any key that names patient data.
"""

from __future__ import annotations

import logging
import sys

import structlog

#: keys whose values are never written to a log
SENSITIVE_KEYS = frozenset({
    "patient", "name", "family", "given", "phone", "telecom", "identifier", "identifiers", "id_card",
    "birth_date", "address", "body", "payload", "message_body",
})


def mask_patient_data(_logger, _method, event_dict):
    for key in list(event_dict):
        if key.lower() in SENSITIVE_KEYS:
            event_dict[key] = "***"
    return event_dict


def configure(level: str = "info", fmt: str = "auto", stream=None) -> None:
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if getattr(stream, "isatty", lambda: False)() else "json"
    renderer = (structlog.dev.ConsoleRenderer(colors=False) if fmt == "console"
                else structlog.processors.JSONRenderer(ensure_ascii=False))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            mask_patient_data,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    _route_twisted_logs()


def _route_twisted_logs() -> None:
    """Send Twisted's own log events (unhandled errors, listener start/stop) through structlog."""
    from twisted.logger import LogLevel, formatEvent, globalLogBeginner

    tlog = structlog.get_logger("twisted")

    def observer(event):
        level = event.get("log_level")
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            tlog.error("twisted.error", text=text, error=failure.getErrorMessage(), error_type=failure.type.__name__)
        elif level in (LogLevel.error, LogLevel.critical):
            tlog.error("twisted.error", text=text)
        elif level == LogLevel.warn:
            tlog.warning("twisted.warning", text=text)

    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False, discardBuffer=True)
