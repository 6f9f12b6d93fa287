#!/usr/bin/env python3
"""Per-message costs in one process (timeit, best of 5): the builders the light writers replaced, and the
parsers each MLLP contender uses.

    python bench/costs.py

- ``build_srm`` (light writer) vs ``build_srm_hl7apy`` (the reference): one SRM^S01 with a Chinese name;
- ``build_siu`` (simulator fast path) vs ``build_siu_hl7apy``: one SIU^S12 for a booked slot;
- reading the shared driver's SIU^S12: ``adapters.hl7.er7.parse`` (gatewayd), ``hl7.parse`` (python-hl7,
  txHL7), ``hl7apy.parser.parse_message`` (hl7apy).
Results: bench/results/costs.json.
"""

from __future__ import annotations

import sys
import timeit
from datetime import date, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import rig  # noqa: E402


def best_us(fn, number: int) -> float:
    return round(min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6, 2)


def run() -> dict:
    import hl7
    from hl7apy.parser import parse_message

    from adapters.hl7 import er7
    from adapters.maps.srm_booking import Hl7Header, build_srm, build_srm_hl7apy
    from gateway.domain.model import Patient, PatientIdentifier, SlotForHis
    from hissim.inventory import Inventory, Schedule, parse_session
    from hissim.messages import Header, Notification, build_siu, build_siu_hl7apy

    header = Hl7Header("GATEWAYD", "FRONT", "HIS", "HOSPITAL", "2.5", "utf-8")
    slot = SlotForHis("D001", datetime(2030, 1, 7, 8, 0), 15, "cardiology-consult", "心内科门诊", "D001")
    patient = Patient((PatientIdentifier("urn:demo:mrn", "MRN-0001", "MR"),), "王", "芳", "13800000000")
    srm = dict(header=header, control_id="G0123456789abcdef012", appointment_id="a0123456789abcdef0123",
               slot=slot, patient=patient, now=datetime(2030, 1, 1, 9, 30))
    inventory = Inventory.build([Schedule("D001", "张", "伟", "CARD", "心内科", "cardiology-consult", "心内科门诊", 15,
                                          (parse_session("08:00-09:00"),))], date(2030, 1, 7), 1)
    first = inventory.slots()[0]
    booking = inventory.book("D001", first.start, by="A-1", placer_id="A-1")
    note = Notification("S12", inventory.slot("D001", first.start), "Booked", "gateway", booking)
    siu = dict(header=Header(), control_id="S1A2B3C000001", now=datetime(2030, 1, 7, 7, 0))
    driver_msg = rig.driver_module().make_msg(0, 0)
    text = driver_msg.decode("utf-8")
    return {
        "machine": rig.machine(),
        "costs_us": {
            "build_srm (light writer)": best_us(lambda: build_srm("S01", **srm), 2000),
            "build_srm_hl7apy (reference, before)": best_us(lambda: build_srm_hl7apy("S01", **srm), 20),
            "build_siu (simulator fast path)": best_us(lambda: build_siu(note, **siu), 2000),
            "build_siu_hl7apy (simulator, before)": best_us(lambda: build_siu_hl7apy(note, **siu), 20),
            "er7.parse of the driver's SIU^S12 (gatewayd)": best_us(lambda: er7.parse(driver_msg), 5000),
            "hl7.parse of the same (python-hl7, txHL7)": best_us(lambda: hl7.parse(text), 500),
            "hl7apy parse_message of the same (hl7apy)": best_us(lambda: parse_message(text, find_groups=False), 20),
        },
    }


def main() -> None:
    result = run()
    rig.save_result("costs", result)
    for k, v in result["costs_us"].items():
        print(f"{v:>10,.1f} us  {k}")


if __name__ == "__main__":
    main()
