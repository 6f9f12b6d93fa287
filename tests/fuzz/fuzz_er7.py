"""Fuzz harness: the ER7 reader (adapters/hl7/er7.py) and the answers built for what it reads
(adapters/hl7/ack.py).

Input: byte 0 picks the configured default charset (the one used when MSH-18 is empty: utf-8, gb18030,
latin-1 or ascii), the rest is one MLLP frame's payload (so without 0x0B and 0x1C).

Invariants (anything else is a crash):

* `parse` returns a Message or raises Hl7Error with a code of HL7 table 0357; nothing else.
* A message it returns has an MSH first, segment names of three upper-case letters or digits, MSH-9, MSH-10
  and MSH-12; every field, repetition, component and subcomponent of every segment can be read, and every
  value read comes back unchanged through `escape` and `unescape`.
* Each outcome (accepted AA/AE, rejected, not stored) gets the answers `answer_codes` names, and each answer
  is a message `parse` reads back (same default charset): an ACK whose MSA-1 is that code, whose MSA-2 is the
  message's MSH-10 exactly as received, with ERR-3 naming the error for AE/AR/CE/CR; it can be framed.
* Bytes `parse` refused get a NAK from `build_nak_for_unparseable` that `parse` reads back: an ACK, MSA-1 AR
  or CR, ERR-3 naming the error; it can be framed. `salvage_control_id` gives printable ASCII, at most 64
  characters.
"""

from __future__ import annotations

import re
from datetime import datetime

import atheris

with atheris.instrument_imports(include=["adapters.hl7"]):
    from adapters.hl7.ack import (
        OUTCOMES,
        answer_codes,
        build_answers,
        build_nak_for_unparseable,
        read_ack,
        requested_acks,
        salvage_control_id,
    )
    from adapters.hl7.er7 import TABLE_0357, Hl7Error, Message, escape, parse, unescape

from adapters.inner.framing import frame
from tests.fuzz.campaign import HL7_CHARSETS, main

CHARSETS = HL7_CHARSETS
NOW = datetime(2030, 1, 7, 8, 0, 5)
ERROR = Hl7Error(207, "refused by the fuzz harness", segment="SCH", field=5)
SEGMENT_NAME = re.compile(r"[A-Z0-9]{3}")
WHO = {"sending_application": "GATEWAYD", "sending_facility": "FRONT", "now": NOW}


def read_everything(message: Message) -> None:
    """Every value of every segment, read every way a reader may; each survives escape -> unescape."""
    enc, charset = message.encoding, message.charset
    assert message.segments and message.segments[0].name == "MSH"
    for seg in message.segments:
        assert SEGMENT_NAME.fullmatch(seg.name), seg.name
        for f in range(1, seg.field_count + 1):
            seg.raw(f)
            for rep in range(max(seg.repetitions(f), 1)):
                for c in range(1, len(seg.components(f, rep)) + 1):
                    for s in (1, 2):
                        v = seg.get(f, c, rep, s)
                        assert unescape(escape(v, enc), enc, charset) == v, (v, enc)
    for required in (9, 10, 12):
        assert message.msh.raw(required)


def check_answer(answer: bytes, default: str, codes: tuple[str, ...], control_id_raw: str | None,
                 error: Hl7Error | None) -> None:
    frame(answer)  # no 0x0B/0x1C: the answer can be framed
    ack = parse(answer, default_charset=default)
    assert ack.message_code == "ACK", ack.type_name
    got, _, _ = read_ack(ack)
    assert got in codes, (got, codes)
    if control_id_raw is not None:
        assert ack.segment("MSA").raw(2) == control_id_raw, (ack.segment("MSA").raw(2), control_id_raw)
    if error is not None:
        err = ack.segment("ERR")
        assert err is not None and err.get(3) == str(error.code), answer


def check(data: bytes) -> None:
    if not data:
        return
    default = CHARSETS[data[0] % len(CHARSETS)]
    raw = data[1:]
    if b"\x0b" in raw or b"\x1c" in raw:  # the framer never delivers these (they start and end a frame)
        return
    try:
        message = parse(raw, default_charset=default)
    except Hl7Error as e:
        assert e.code in TABLE_0357, e.code
        str(e), repr(e), e.location
        nak = build_nak_for_unparseable(raw, e, control_id="NAK0001", default_charset=default, **WHO)
        check_answer(nak, default, ("AR", "CR"), None, e)
        salvaged = salvage_control_id(raw)
        assert len(salvaged) <= 64 and salvaged.isascii() and salvaged.isprintable(), salvaged
        return
    read_everything(message)
    request = requested_acks(message)
    for outcome, app_code in [(o, "AA") for o in sorted(OUTCOMES)] + [("accepted", "AE")]:
        error = None if (outcome, app_code) == ("accepted", "AA") else ERROR
        codes = answer_codes(request, outcome, app_code)
        answers = build_answers(message, outcome, app_code=app_code, error=error,
                                control_id=iter(f"ACK{n}" for n in range(9)).__next__, **WHO)
        assert len(answers) == len(codes), (answers, codes)
        for code, answer in zip(codes, answers):
            shown_error = error if code in ("AE", "AR", "CE", "CR") else None
            check_answer(answer, default, (code,), message.msh.raw(10), shown_error)


if __name__ == "__main__":
    main(check)
