"""HL7 v2 acknowledgements, original and enhanced mode: decide which answers a message gets, build them (hot
path, plain string formatting) and read them.

`build_ack` answers a parsed message: MSH with sender and receiver swapped, ``MSH-9 = ACK^<trigger>^ACK``,
``MSA|<code>|<their MSH-10>|<text>`` and, for a refusal, an ERR segment:

* ERR-2 error location ``segment^sequence^field`` (ERL), ERR-3 ``<code>^<table 0357 text>^HL70357``,
  ERR-4 severity ``E``, ERR-8 the readable text. For a message of version 2.1-2.4 ERR-1 (ELD, the only
  ERR field those versions know) carries ``segment^sequence^field^code&text&HL70357`` as well.

Which answers (HL7 v2.5 section 2.9; the policy is `answer_codes`, pure and table-driven):

* **Original mode** (MSH-15 and MSH-16 both empty): one application acknowledgement, AA / AE / AR.
* **Enhanced mode** (MSH-15 or MSH-16 not empty): an accept (commit) acknowledgement CA / CE / CR as
  MSH-15 asks (AL always, NE never, ER only when not CA, SU only when CA), then - only for a message that
  was accepted (CA) - an application acknowledgement AA / AE / AR as MSH-16 asks (same four conditions).
  An empty MSH-15 or MSH-16 next to a non-empty one means NE (that kind of answer is not asked for; an
  answer the sender does not expect is the classic cause of ACKs paired with the wrong message); a value
  outside table 0155 means AL (answer rather than stay silent). The answers themselves carry
  ``MSH-15 = MSH-16 = NE``: an answer is never answered.
* ``outcome`` says what happened to the message: ``accepted`` (committed; its application result is
  ``app_code``), ``rejected`` (refused before acceptance and not to be sent again: unparseable, message
  type/event/version we do not take, control id reused) or ``not_stored`` (could not be committed; send it
  again).

=============  ===============  =====================================================
outcome        original mode    enhanced mode (before the MSH-15/16 conditions)
=============  ===============  =====================================================
accepted       ``app_code``     CA, then ``app_code`` (AA/AE/AR)
rejected       AR               CR
not_stored     AE               CE
=============  ===============  =====================================================

The answer uses the received message's delimiters (MSH-1/MSH-2) and character set, and echoes MSH-18 as
received, so a GB18030 HIS gets a GB18030 ACK it can read. Values copied from the received MSH (MSH-3..6,
MSH-10 into MSA-2) are copied raw, i.e. byte-for-byte as the peer escaped them, which keeps MSA-2 exactly
equal to what the peer will compare. ``extra_segments`` must be escaped with ``message.encoding`` (the
default `Encoding` for every message seen in practice).

`build_nak_for_unparseable` answers bytes that `parse` refused. It salvages what it can from a latin-1 read
of the first segment (MSH-3/4, MSH-9.2, MSH-10, MSH-12, MSH-18), answers with the default delimiters, and
never raises: a NAK is always better than a dropped connection.

`build_answers` puts the two together: the encoded answers a message gets for an outcome.

`read_ack` is the sender's side: ``(MSA-1, MSA-2, text)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from adapters.hl7.er7 import (
    TABLE_0357,
    Encoding,
    Hl7Error,
    Message,
    _encoding_for,
    charset_codec,
    dtm,
    escape,
    format_message,
    unescape,
)

__all__ = [
    "ACK_CODES",
    "ACK_CONDITIONS",
    "OUTCOMES",
    "AckRequest",
    "answer_codes",
    "build_ack",
    "build_answers",
    "build_nak_for_unparseable",
    "read_ack",
    "requested_acks",
    "salvage_control_id",
]

#: MSA-1 values of original (AA/AE/AR) and enhanced (CA/CE/CR) mode.
ACK_CODES = frozenset({"AA", "AE", "AR", "CA", "CE", "CR"})

#: HL7 table 0155, the conditions of MSH-15 / MSH-16.
ACK_CONDITIONS = frozenset({"AL", "NE", "ER", "SU"})

#: What can happen to a message, as `answer_codes` reads it.
OUTCOMES = frozenset({"accepted", "rejected", "not_stored"})

_ERROR_CODES = frozenset({"AE", "AR", "CE", "CR"})

#: MSA-1 of a NAK for data that did not parse, by outcome: (original mode, enhanced mode).
_NAK_CODES = {"rejected": ("AR", "CR"), "not_stored": ("AE", "CE")}

_DEFAULT = Encoding()


# ------------------------------------------------------------------------------------ which answers


@dataclass(frozen=True)
class AckRequest:
    """What a message's sender asked for: ``enhanced`` is False in original mode (MSH-15 and MSH-16 empty);
    in enhanced mode ``accept`` and ``application`` are table 0155 conditions (AL/NE/ER/SU), already
    normalised (empty -> NE, unknown -> AL)."""

    enhanced: bool = False
    accept: str = ""
    application: str = ""


ORIGINAL_MODE = AckRequest()


def _condition(value: str) -> str:
    value = value.strip().upper()
    if not value:
        return "NE"
    return value if value in ACK_CONDITIONS else "AL"


@functools.lru_cache(maxsize=64)  # (senders use a handful of MSH-15/MSH-16 pairs; the answer is immutable)
def _request_from(msh15: str, msh16: str) -> AckRequest:
    if not msh15.strip() and not msh16.strip():
        return ORIGINAL_MODE
    return AckRequest(True, _condition(msh15), _condition(msh16))


def requested_acks(message: Message) -> AckRequest:
    """The acknowledgement mode and conditions ``message`` asks for (MSH-15, MSH-16)."""
    return _request_from(message.accept_ack_type, message.application_ack_type)


def _wanted(condition: str, ok: bool) -> bool:
    return condition == "AL" or (condition == "ER" and not ok) or (condition == "SU" and ok)


def answer_codes(request: AckRequest, outcome: str, app_code: str = "AA") -> list[str]:
    """MSA-1 of each answer to send, in order (possibly none). See the module docstring's table.
    ``app_code`` (AA/AE/AR) is the application result of an ``accepted`` message."""
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown outcome {outcome!r}")
    if app_code not in ("AA", "AE", "AR"):
        raise ValueError(f"application acknowledgement code must be AA, AE or AR, not {app_code!r}")
    if not request.enhanced:
        return [{"accepted": app_code, "rejected": "AR", "not_stored": "AE"}[outcome]]
    accept = {"accepted": "CA", "rejected": "CR", "not_stored": "CE"}[outcome]
    codes = [accept] if _wanted(request.accept, accept == "CA") else []
    if accept == "CA" and _wanted(request.application, app_code == "AA"):
        codes.append(app_code)
    return codes


def build_answers(
    message: Message,
    outcome: str,
    *,
    app_code: str = "AA",
    error: Hl7Error | None = None,
    sending_application: str,
    sending_facility: str,
    control_id: Callable[[], str],
    now: datetime,
) -> list[bytes]:
    """The encoded answers ``message`` gets for ``outcome`` (see `answer_codes`), each built with
    `build_ack`. ``error`` goes into MSA-3 and ERR of the answers that report a problem (AE/AR/CE/CR), never
    into CA/AA. ``control_id`` is called once per answer for its MSH-10. In enhanced mode every answer
    carries MSH-15 = MSH-16 = NE."""
    request = requested_acks(message)
    out = []
    for code in answer_codes(request, outcome, app_code):
        err = error if code in _ERROR_CODES else None
        out.append(build_ack(
            message, code, sending_application=sending_application, sending_facility=sending_facility,
            control_id=control_id(), now=now, error=err, enhanced=request.enhanced,
        ))
    return out


# ------------------------------------------------------------------------------------------ building


def _version_before_2_5(version: str) -> bool:
    parts = version.strip().split(".")
    try:
        return parts[0] == "2" and len(parts) > 1 and int(parts[1]) < 5
    except ValueError:
        return False


def _err_segment(error: Hl7Error, enc: Encoding, version: str = "2.5") -> list[str]:
    """ERR for ``error`` written with ``enc``: ERR-2 location, ERR-3 code, ERR-4 severity, ERR-8 text; and
    for versions before 2.5 ERR-1 (ELD) too."""
    c = enc.component
    s = enc.subcomponent
    if error.segment:
        location = f"{escape(error.segment, enc)}{c}{error.sequence}"
        if error.field is not None:
            location += f"{c}{error.field}"
    else:
        location = ""
    meaning = TABLE_0357.get(error.code, "Application internal error")
    code = f"{error.code}{c}{escape(meaning, enc)}{c}HL70357"
    eld = ""
    if _version_before_2_5(version):
        parts = location.split(c) if location else []
        parts += [""] * (3 - len(parts))
        eld = c.join(parts + [f"{error.code}{s}{escape(meaning, enc)}{s}HL70357"])
    return ["ERR", eld, location, code, "E", "", "", "", escape(error.text, enc)]


def _encode(text: str, charset: str) -> bytes:
    """Encode an answer; characters the peer's charset cannot carry become '?' rather than failing the ACK
    (only our own texts can contain such characters: copied fields came from the peer in that charset)."""
    try:
        return text.encode(charset)
    except UnicodeEncodeError:
        return text.encode(charset, errors="replace")


def build_ack(
    message: Message,
    code: str,
    *,
    sending_application: str,
    sending_facility: str,
    control_id: str,
    now: datetime,
    text: str = "",
    error: Hl7Error | None = None,
    extra_segments: list[list[str]] = (),
    enhanced: bool = False,
) -> bytes:
    """One complete answer to ``message``, encoded in ``message.charset``, every segment ended by CR.

    ``code`` is MSA-1 (AA/AE/AR, or CA/CE/CR); ``sending_application``/``sending_facility`` are our plain
    names (escaped here); ``control_id`` is the ACK's own MSH-10; ``now`` its MSH-7. MSA-3 carries ``text``,
    or ``error.text`` when ``text`` is empty (older receivers read only MSA-3); ERR is added when ``error`` is
    given. ``extra_segments`` (already escaped, with ``message.encoding``) follow MSA/ERR. ``enhanced`` sets
    MSH-15 and MSH-16 to NE (an answer in enhanced mode asks for no answer itself).
    """
    enc = message.encoding
    msh = message.msh
    trigger = message.trigger
    msg_type = f"ACK{enc.component}{escape(trigger, enc)}{enc.component}ACK" if trigger else "ACK"
    fields = [
        "MSH",
        enc.msh2,
        escape(sending_application, enc),
        escape(sending_facility, enc),
        msh.raw(3),
        msh.raw(4),
        dtm(now),
        "",
        msg_type,
        escape(control_id, enc),
        "P",
        escape(message.version, enc),
    ]
    msh18 = msh.raw(18)
    if enhanced:
        fields.extend(("", "", "NE", "NE"))
        if msh18:
            fields.extend(("", msh18))
    elif msh18:
        fields.extend(("", "", "", "", "", msh18))
    if not text and error is not None:
        text = error.text
    segments = [fields, ["MSA", code, msh.raw(10), escape(text, enc)] if text else ["MSA", code, msh.raw(10)]]
    if error is not None:
        segments.append(_err_segment(error, enc, message.version))
    if extra_segments:
        segments.extend(extra_segments)
    return _encode(format_message(segments, enc), message.charset)


def _salvage_head(raw: bytes) -> tuple[Encoding | None, list[str]]:
    """(the peer's encoding if MSH-1/MSH-2 are usable, fields of the first segment) from a latin-1 read,
    HL7-numbered as for MSH (index 10 is MSH-10); (None, []) when the data does not start like an MSH."""
    raw = bytes(raw)
    if raw[:3] != b"MSH" or len(raw) < 4:
        return None, []
    sep = b"\r" if b"\r" in raw else b"\n"
    end = raw.find(sep)
    head = (raw if end < 0 else raw[:end]).decode("latin-1")
    fs = head[3]
    if fs.isalnum() or fs in "\r\n":
        return None, []
    fields = head.split(fs)
    fields.insert(1, fs)
    try:
        enc = _encoding_for(fs, fields[2])
    except Hl7Error:
        enc = None
    return enc, fields


def _clean(value: str, codec: str, enc: Encoding | None) -> str:
    """A salvaged latin-1 value re-read in ``codec``, unescaped with the peer's delimiters when known,
    stripped of control characters, capped in length, and escaped for the default delimiters."""
    value = value.encode("latin-1").decode(codec, errors="replace")
    if enc is not None:
        value = unescape(value, enc, codec)
    value = "".join(ch for ch in value if ch.isprintable())[:199]
    return escape(value, _DEFAULT)


def build_nak_for_unparseable(
    raw: bytes,
    error: Hl7Error,
    *,
    sending_application: str,
    sending_facility: str,
    control_id: str,
    now: datetime,
    default_charset: str = "utf-8",
    outcome: str = "rejected",
) -> bytes:
    """An ``AR`` answer for data that `parse` refused, with ERR describing ``error``. Never raises. When the
    salvaged MSH-15/MSH-16 say the sender uses enhanced mode the answer is ``CR`` (commit reject) instead,
    with MSH-15 = MSH-16 = NE; it is sent whatever those fields ask, because fields of a message that did not
    parse cannot be trusted to mean "stay silent". ``outcome="not_stored"`` makes it ``AE`` / ``CE``
    instead: data refused not for what it is but because it never arrived whole (send it again).

    MSA-2 is the salvaged MSH-10 (or empty), MSH-5/6 the salvaged MSH-3/4 (component 1), MSH-9 carries the
    salvaged trigger event, MSH-12 the salvaged version (``2.5`` when unreadable: an empty MSH-12 would make
    the NAK itself unparseable by strict receivers, ours included) and MSH-18 echoes a value we understand.
    The answer uses the default delimiters and is encoded in the salvaged charset, else ``default_charset``
    (an addition to the published signature: the listener passes its configured default), else UTF-8.
    """
    try:
        return _build_nak(raw, error, sending_application, sending_facility, control_id, now, default_charset,
                          outcome)
    except Exception:  # noqa: BLE001 - last resort: a minimal NAK, nothing salvaged
        try:
            err = error if isinstance(error, Hl7Error) else Hl7Error(207, "message rejected")
            segments = [
                ["MSH", _DEFAULT.msh2, escape(str(sending_application)), escape(str(sending_facility)), "", "",
                 dtm(now) if isinstance(now, datetime) else "", "", "ACK", escape(str(control_id)), "P", "2.5"],
                ["MSA", _NAK_CODES.get(outcome, _NAK_CODES["rejected"])[False], "", escape(err.text)],
                _err_segment(err, _DEFAULT),
            ]
            return format_message(segments).encode("utf-8", errors="replace")
        except Exception:  # noqa: BLE001
            return b"MSH|^~\\&|GATEWAYD||||||ACK|NAK|P|2.5\rMSA|AR|\rERR|||207^Application internal error^HL70357|E\r"


def _build_nak(raw, error, sending_application, sending_facility, control_id, now, default_charset,
               outcome) -> bytes:
    enc, head = _salvage_head(raw)
    component = enc.component if enc is not None else "^"

    def field(n: int) -> str:
        return head[n] if n < len(head) else ""

    def first(n: int) -> str:
        return field(n).split(component, 1)[0]

    msh18 = first(18).strip()
    codec = None
    if msh18:
        try:
            codec = charset_codec(msh18, default_charset)
        except Hl7Error:
            msh18 = ""  # not a value we understand: do not echo it
    codec = codec or default_charset
    try:
        "".encode(codec)
    except LookupError:
        codec, msh18 = "utf-8", ""

    msh9 = field(9).split(component)
    trigger = _clean(msh9[1], codec, enc) if len(msh9) > 1 else ""
    enhanced = _request_from(first(15), first(16)).enhanced
    version = _clean(first(12), codec, enc) or "2.5"
    fields = [
        "MSH",
        _DEFAULT.msh2,
        escape(sending_application),
        escape(sending_facility),
        _clean(first(3), codec, enc),
        _clean(first(4), codec, enc),
        dtm(now),
        "",
        f"ACK^{trigger}^ACK" if trigger else "ACK",
        escape(control_id),
        "P",
        version,
    ]
    if enhanced:
        fields.extend(("", "", "NE", "NE"))
        if msh18:
            fields.extend(("", escape(msh18)))
    elif msh18:
        fields.extend(("", "", "", "", "", escape(msh18)))
    segments = [
        fields,
        ["MSA", _NAK_CODES[outcome][enhanced], _clean(field(10), codec, enc), escape(error.text)],
        _err_segment(error, _DEFAULT, version),
    ]
    return _encode(format_message(segments), codec)


def salvage_control_id(raw: bytes) -> str:
    """MSH-10 as far as it can be read from data that may not parse (for log events and NAKs); ``''`` when
    unreadable. Never raises. Only ASCII-printable ids are returned, capped at 64 characters."""
    try:
        _enc, head = _salvage_head(raw)
        value = head[10] if len(head) > 10 else ""
        return value[:64] if value.isascii() and value.isprintable() else ""
    except Exception:  # noqa: BLE001
        return ""


def read_ack(message: Message) -> tuple[str, str, str]:
    """``(MSA-1 code, MSA-2 control id, text)`` of an answer; text is MSA-3, else the first non-empty ERR-8,
    else ``''``. Raises `Hl7Error` 101 (segment MSA) when there is no MSA segment."""
    msa = message.segment("MSA")
    if msa is None:
        raise Hl7Error(101, f"{message.type_name or 'answer'} has no MSA segment", segment="MSA")
    text = msa.get(3)
    if not text:
        for err in message.all("ERR"):
            text = err.get(8)
            if text:
                break
    return msa.get(1), msa.get(2), text
