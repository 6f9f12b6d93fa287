"""Structured logs (structlog): JSON lines when not on a terminal, readable text on one.

Log events carry ids, states and codes — never message bodies or patient data.  As a second line of
defence, :func:`mask_patient_data` (in every logger's processor chain) rewrites each event before it is
rendered:

- the value of any key that names patient data (``patient``, ``name``, ``phone``, ``id_card``, ...; also
  any key containing ``patient``, ``phone``, ``name``, ``birth``, ``address``, ``idcard``/``id_card`` or
  ``identifier``) becomes ``***``;
- in every other text value (nested dicts and lists too), anything that looks like a Chinese resident ID
  card number (17 digits and a digit or X), a mainland mobile number (optionally +86, with or without
  separators) or a landline number with its area code (``010-12345678``) becomes ``***`` — also with
  letters glued to it (``x13655550002``, ``ID110105194912310049``), unless it is part of an id of a shape
  the gateway makes itself (appointment and control ids, hashes);
- a text value that carries a whole HL7 message (a ``PID|`` segment) or a FHIR resource
  (``"resourceType"``) is replaced whole.

Names in free text cannot be recognised by their shape; they are kept out by never logging free text from
outside (bodies, HL7 fields, FHIR diagnostics built from input) — see docs/security.md.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import re
import sys

import structlog

#: keys whose values are never written to a log
SENSITIVE_KEYS = frozenset({
    "patient", "name", "family", "given", "phone", "telecom", "identifier", "identifiers", "id_card",
    "birth_date", "address", "body", "payload", "message_body", "mrn", "idcard", "id_number", "mobile",
    "birthdate", "dob", "contained", "participant", "display_name", "gender", "sex", "email",
})
#: a key containing one of these names patient data too (patient_name, phone_number, home_address, ...)
SENSITIVE_KEY_PARTS = ("patient", "phone", "name", "birth", "address", "idcard", "id_card", "identifier",
                       "mobile", "telecom")
#: keys gatewayd uses for ids and codes that merely contain such a part
NOT_SENSITIVE_KEYS = frozenset({"logger_name", "error_type", "hostname", "filename"})

#: the shapes of ids the gateway makes, kept whatever digits their random part holds: appointment and
#: prescription ids (a letter and 20 hex digits), control ids ('G' and 19), the MLLP listener's ACK ids
#: (20 hex), token ids (16), keyed hashes in the audit (32), SHA-256 digests (64)
_OWN_ID = re.compile(r"[a-z][0-9a-f]{20}|G[0-9a-f]{19}|[0-9a-f]{16}|[0-9a-f]{20}|[0-9a-f]{32}|[0-9a-f]{64}")
#: numbers that look like patient data, bounded by anything but a digit (letters glued to a number,
#: ``x13655550002`` or ``ID1101...``, do not hide it): an ID card number (17 digits and a digit or X, birth
#: date or not), a mainland mobile (optionally +86, with or without separators), a landline with its area code
_PATTERNS = re.compile(r"(?<!\d)(?:" + "|".join([
    r"\d{17}[\dXx]",
    r"(?:\+?86[- ]?)?1[3-9]\d(?:[- ]?\d{4}){2}",
    r"0\d{2,3}-\d{7,8}",
]) + r")(?!\d)")
_WHOLE_MESSAGE = re.compile(r"(?:^|[\r\n|])PID\||\"resourceType\"")
MASK = "***"
#: the configured level (logging.INFO, ...): a hot path can skip building a line nobody writes
#: (``enabled(logging.INFO)``); 0 until configure() runs (everything passes, as structlog's default)
LEVEL = 0


def enabled(level: int) -> bool:
    """Would a line at ``level`` be written?  (Cheaper than a filtered structlog call.)"""
    return level >= LEVEL
#: shorter texts cannot hold an ID card or phone number (18, 11 and 11 characters at least): only a PID
#: segment needs looking for in them
_SHORTEST_NUMBER = 11


@functools.lru_cache(maxsize=4096)  # keys are few (the events' own); each is decided once
def _sensitive_key(key) -> bool:
    k = str(key).lower()
    if k in NOT_SENSITIVE_KEYS:
        return False
    return k in SENSITIVE_KEYS or any(part in k for part in SENSITIVE_KEY_PARTS)


def _masked(match: re.Match) -> str:
    """``***`` for a number found in a text, unless it is part of an id of the gateway's own shape (the
    letters and digits around it, taken together)."""
    text, (start, end) = match.string, match.span()
    while start > 0 and text[start - 1].isascii() and text[start - 1].isalnum():
        start -= 1
    while end < len(text) and text[end].isascii() and text[end].isalnum():
        end += 1
    return match.group() if _OWN_ID.fullmatch(text, start, end) else MASK


def mask_value(value, depth: int = 0):
    """``value`` with anything that looks like patient data replaced by ``***``."""
    if isinstance(value, str):
        if len(value) < _SHORTEST_NUMBER:  # (ids, codes, states: most values)
            return MASK if "PID|" in value and _WHOLE_MESSAGE.search(value) else value
        if _WHOLE_MESSAGE.search(value):
            return MASK
        return _PATTERNS.sub(_masked, value)
    if isinstance(value, bytes):
        return mask_value(value.decode("utf-8", "replace"), depth)
    if isinstance(value, int) and not isinstance(value, bool):
        if -10 ** 10 < value < 10 ** 10:  # counts, ids, ports: too short for a phone number
            return value
        return MASK if _PATTERNS.fullmatch(str(value)) else value
    if depth > 8:
        return MASK if isinstance(value, (dict, list, tuple, set)) else value
    if isinstance(value, dict):
        return {k: (MASK if _sensitive_key(k) else mask_value(v, depth + 1)) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [mask_value(v, depth + 1) for v in value]
    return value


def mask_patient_data(_logger, _method, event_dict):
    for key, value in event_dict.items():  # (values are replaced, no key is added or removed)
        if key != "event" and _sensitive_key(key):
            event_dict[key] = MASK
        elif value is not None and value.__class__ is not bool:
            event_dict[key] = mask_value(value)
    return event_dict


def _json_fallback(value):
    """What json cannot write itself: structlog's rule (an object's ``__structlog__()``, else its repr)."""
    to_log = getattr(value, "__structlog__", None)
    return to_log() if to_log is not None else repr(value)


_json_encode = json.JSONEncoder(ensure_ascii=False, default=_json_fallback).encode  # (made once, not per line)
_merge_contextvars = structlog.contextvars.merge_contextvars
_add_log_level = structlog.processors.add_log_level
_format_exc_info = structlog.processors.format_exc_info
_now = datetime.datetime.now
_UTC = datetime.timezone.utc


def json_line(logger, method, event_dict) -> str:
    """The JSON format's whole chain in one processor: the bound context variables, the level, the masking
    (:func:`mask_patient_data`), the time (UTC, ISO 8601, after masking: our own clock's time), an exception's
    traceback, then one JSON object.  The same line as structlog's ``merge_contextvars``, ``add_log_level``,
    ``TimeStamper(fmt="iso", utc=True)``, ``format_exc_info`` and ``JSONRenderer(ensure_ascii=False)`` in a
    row, written once per event in one call (the inner gate writes one line per message at ``info``)."""
    event_dict = _add_log_level(logger, method, _merge_contextvars(logger, method, event_dict))
    mask_patient_data(logger, method, event_dict)
    event_dict["timestamp"] = _now(tz=_UTC).isoformat().replace("+00:00", "Z")
    if "exc_info" in event_dict:
        event_dict = _format_exc_info(logger, method, event_dict)
    return _json_encode(event_dict)


def configure(level: str = "info", fmt: str = "auto", stream=None) -> None:
    global LEVEL
    LEVEL = getattr(logging, level.upper())
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if getattr(stream, "isatty", lambda: False)() else "json"
    output = structlog.PrintLogger(stream)  # one for every logger (the factory is called at every log call)
    if fmt == "console":
        processors = [
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            mask_patient_data,
            structlog.processors.TimeStamper(fmt="iso", utc=True),  # (after masking: our own clock's time)
            structlog.processors.format_exc_info,
            structlog.dev.ConsoleRenderer(colors=False),
        ]
    else:
        processors = [json_line]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=lambda *_args: output,
        # Not cached: a reload (or a test) that configures again must reach every logger.
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
