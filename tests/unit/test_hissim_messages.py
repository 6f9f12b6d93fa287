"""The simulator's SIU writer (``hissim.messages.build_siu``, formatted with adapters.hl7.er7) against the
hl7apy builder it replaced (``build_siu_hl7apy``, kept as the reference): the same bytes for opened,
booked and cancelled slots, with Chinese names and HL7 delimiters in every configured value, in UTF-8 and
GB18030, with and without MSH-18. Where hl7apy escapes the backslashes of a ``\\Xhh\\`` escape a second time,
the fast writer keeps the escape the reader understands. No reactor.
"""

from __future__ import annotations

from datetime import date, datetime

import pytest

from adapters.hl7.er7 import parse
from hissim.inventory import COUNTER, Inventory, Schedule, parse_session
from hissim.messages import Header, Notification, build_siu, build_siu_hl7apy

DAY = date(2030, 1, 7)
NOW = datetime(2030, 1, 7, 7, 0, 5)
DELIMITERS = "|^~\\&"


def slot_of(**changes):
    values = dict(id="D001", family="张", given="伟", department_code="CARD", department_name="心内科",
                  service_code="cardiology-consult", service_text="心内科门诊", slot_minutes=15,
                  sessions=(parse_session("08:00-09:00"),))
    values.update(changes)
    inventory = Inventory.build([Schedule(**values)], DAY, 1)
    return inventory, inventory.slots()[0]


def opened(**changes):
    _, slot = slot_of(**changes)
    return Notification("S24", slot, "Open", "startup")


def booked(placer_id="APT-1", by="APT-1", trigger="S12", **changes):
    inventory, slot = slot_of(**changes)
    booking = inventory.book(slot.schedule.id, slot.start, by=by, placer_id=placer_id)
    return Notification(trigger, inventory.slot(slot.schedule.id, slot.start), "Booked", "gateway", booking)


CASES = {
    "opened, utf-8": (opened(), Header()),
    "opened, gb18030 named": (opened(), Header(codec="gb18030")),
    "opened, gb18030, MSH-18 empty": (opened(), Header(codec="gb18030", msh18_empty=True)),
    "booked by the gateway": (booked(), Header()),
    "booked at the counter (no placer id)": (booked(placer_id=None, by=COUNTER), Header()),
    "cancelled": (booked(trigger="S15"), Header(version="2.3")),
    "blocked": (Notification("S23", slot_of()[1], "Blocked", "startup"), Header(version="2.6")),
    "delimiters in every configured value": (
        booked(placer_id="A|1", id="D|1", family=DELIMITERS, given="伟" + DELIMITERS, department_code="C^D",
               department_name=DELIMITERS, service_code="a&b", service_text="门诊~"),
        Header(application="H^S", facility="医院|1", gateway_application="G~W", gateway_facility="F&R")),
    "escape sequences as text": (opened(family="\\F\\", given="\\E\\"), Header()),
    "no department, no service text, no given name": (
        opened(department_code="", department_name="", service_text="", given=""), Header()),
}


@pytest.mark.parametrize("note, header", list(CASES.values()), ids=list(CASES))
def test_fast_siu_writer_writes_the_very_bytes_hl7apy_writes(note, header):
    """Same bytes as the hl7apy reference: fields, escapes, trailing empty fields and components dropped,
    an explicitly empty AIL-3 kept, no CR after the last segment, the configured charset."""
    assert build_siu(note, header=header, control_id="S1A2B3C000001", now=NOW) == \
        build_siu_hl7apy(note, header=header, control_id="S1A2B3C000001", now=NOW)


def test_a_cr_in_a_configured_name_stays_a_hex_escape():
    """A CR or LF in a configured name is written \\X0D\\ / \\X0A\\ and reads back as CR / LF; hl7apy differs
    only by escaping those escapes' backslashes (\\E\\X0D\\E\\), which a reader shows as literal text."""
    import re

    note = opened(department_name="心内科\r二病区", given="伟\n")
    fast = build_siu(note, header=Header(), control_id="C1", now=NOW)
    reference = build_siu_hl7apy(note, header=Header(), control_id="C1", now=NOW)
    assert re.sub(rb"\\X([0-9A-F]{2})\\", rb"\\E\\X\1\\E\\", fast) == reference
    msg = parse(fast)
    assert msg.segment("AIL").get(3, 9) == "心内科\r二病区"
    assert msg.segment("AIP").components(3) == ["D001", "张", "伟\n"]
