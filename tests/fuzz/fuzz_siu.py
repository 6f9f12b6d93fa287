"""Fuzz harness: the SIU / SQR^S25 -> slot notice map (adapters/maps/siu_slot.py), the parse side of
what the HIS publishes.

Input: byte 0 picks the default charset (utf-8, gb18030, latin-1 or ascii), the rest is one message. What
`parse` refuses is the er7 harness's business; what it reads goes through `notices_from_siu` (an SIU) and
`notices_from_sqr` (any message: its SCH groups).

Invariants (anything else is a crash): each map returns notices or raises Hl7Error with a code of HL7 table
0357 and a location (segment, and field where one is at fault); nothing else. Every notice is one the slot
book can keep: an action it knows, a schedule id, a start that is a wall-clock date-time, a positive whole
number of minutes and an end (start + minutes) that is a date-time too, the facility as text, Z-segments as
ER7 text of segments named Z...
"""

from __future__ import annotations

from datetime import datetime, timedelta

import atheris

with atheris.instrument_imports(include=["adapters.maps.siu_slot", "adapters.hl7.er7"]):
    from adapters.hl7.er7 import TABLE_0357, Hl7Error
    from adapters.maps.siu_slot import STATUS_ACTIONS, TRIGGER_ACTIONS, notices_from_siu, notices_from_sqr

from tests.fuzz.campaign import hl7_input, main

ACTIONS = frozenset(TRIGGER_ACTIONS.values()) | frozenset(STATUS_ACTIONS.values())


def check_notice(n) -> None:
    assert n.action in ACTIONS, n.action
    assert isinstance(n.schedule.id, str) and n.schedule.id, n.schedule
    assert isinstance(n.start_local, datetime) and n.start_local.tzinfo is None, n.start_local
    assert type(n.minutes) is int and n.minutes > 0, n.minutes
    n.start_local + timedelta(minutes=n.minutes)  # the end is a date-time as well
    assert isinstance(n.schedule.facility, str) and isinstance(n.service_code, str)
    for z in n.z_segments:
        assert isinstance(z, str) and z[:1] == "Z", z


def check(data: bytes) -> None:
    message = hl7_input(data)
    if message is None:
        return
    maps = [notices_from_sqr] + ([notices_from_siu] if message.message_code == "SIU" else [])
    for read in maps:
        try:
            notices = read(message)
        except Hl7Error as e:
            assert e.code in TABLE_0357 and e.segment, repr(e)
            continue
        for n in notices:
            check_notice(n)


if __name__ == "__main__":
    main(check)
