"""Fuzz harness: what the HIS pharmacy sends the gateway, read into domain values — RDS^O13 dispensing
(`dispenses_from_rds`), an RDE^O11 the HIS releases (`prescription_from_rde`, `released_prescription`:
adapters/maps/rds_dispense.py) and the answers to the gateway's orders (`read_order_answer`:
adapters/maps/rde_order.py).

Input: byte 0 picks the default charset (utf-8, gb18030, latin-1 or ascii), the rest is one message. What
`parse` refuses is the er7 harness's business; what it reads goes through every map above.

Invariants (anything else is a crash): each map returns its values or raises Hl7Error with a code of HL7
table 0357 and the segment at fault (the inner gate answers AE/AR with ERR from it); nothing else.
* a Dispense: a non-empty HIS dispense id, a quantity that is a finite decimal number, a time handed over
  that is a naive date-time (hospital local time), text everywhere text is kept;
* a Prescription: at least one item, each with its placer id as text; ``to_json`` is JSON (what the chamber
  keeps) and ``from_json`` of it gives the same prescription back; a released one is marked released;
* an OrderAnswer: an acknowledgment code of MSA-1's six, ``accepted`` only for AA/CA, every item's order
  control upper case.
"""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

import atheris

with atheris.instrument_imports(include=["adapters.maps.rds_dispense", "adapters.maps.rde_order"]):
    from adapters.hl7.er7 import TABLE_0357, Hl7Error
    from adapters.maps.rde_order import read_order_answer
    from adapters.maps.rds_dispense import dispenses_from_rds, prescription_from_rde, released_prescription

from gateway.domain.prescriptions import Prescription
from tests.fuzz.campaign import hl7_input, main

TZ = ZoneInfo("Asia/Shanghai")


def refused(e: Hl7Error) -> None:
    assert e.code in TABLE_0357 and e.segment, repr(e)


def check_dispense(d) -> None:
    assert isinstance(d.his_dispense, str) and d.his_dispense, d
    assert Decimal(d.quantity_value).is_finite(), d.quantity_value
    assert isinstance(d.handed_over_local, datetime) and d.handed_over_local.tzinfo is None, d.handed_over_local
    for text in (d.placer_id, d.prescription_number, d.dispenser_id, d.dispenser_name, d.note,
                 d.medication.code, d.patient.value):
        assert isinstance(text, str), d


def check_prescription(p: Prescription, released: bool) -> None:
    assert p.items and all(isinstance(i.placer_id, str) for i in p.items), p
    kept = json.loads(json.dumps(p.to_json(), ensure_ascii=False))
    assert Prescription.from_json(kept) == p, (kept, p)
    if released:
        assert p.released, p


def check(data: bytes) -> None:
    message = hl7_input(data)
    if message is None:
        return
    try:
        for d in dispenses_from_rds(message, TZ):
            check_dispense(d)
    except Hl7Error as e:
        refused(e)
    for read, released in ((prescription_from_rde, False), (released_prescription, True)):
        try:
            check_prescription(read(message), released)
        except Hl7Error as e:
            refused(e)
    try:
        answer = read_order_answer(message)
    except Hl7Error as e:
        refused(e)
    else:
        assert answer.code in ("AA", "AE", "AR", "CA", "CE", "CR"), answer
        assert not answer.accepted or answer.code in ("AA", "CA"), answer
        assert all(i.order_control == i.order_control.upper() for i in answer.items), answer


if __name__ == "__main__":
    main(check)
