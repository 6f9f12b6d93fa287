"""Prescriptions to the HIS pharmacy and its answers: `Prescription` -> RDE^O11 / OMP^O09, and ACK / RRE^O12 /
ORP^O10 -> `OrderAnswer`. Pure: no I/O, no clock.

The fields are docs/pharmacy-profile.md (where each comes from in FHIR: `adapters.maps.fhir_prescription`); the
golden files under tests/golden/pharmacy/ are the contract.

`build_order`: RDE^O11 (default) or OMP^O09, written with the light writer (``adapters.hl7.er7.format_message``
+ ``escape``), every segment ending with CR. Each item is one group:

======================  =====================================  ==========================================
HL7 field               RDE^O11 (ORC RXE TQ1 RXR)               from the `Prescription`
======================  =====================================  ==========================================
MSH-9                   ``RDE^O11^RDE_O11`` / ``OMP^O09^OMP_O09``
MSH-10                  ``G`` + 19 random hex digits, given at commit, kept on every resend
MSH-18                  header charset (``UNICODE UTF-8``, ``GB 18030-2000``)
PID-3                   ``value^^^authority^type`` repeated     patient.identifiers (system, value, type)
PID-5                   ``family^given``                        patient.family, given
PID-7 / PID-8           birth date ``YYYYMMDD`` / M F O U       birth_date / gender
PV1-2                   patient class (O, I, E)                 patient_class
PV1-19                  visit number                            encounter_id
ORC-1                   ``NW``
ORC-2                   ``<item id>^GATEWAYD``                  item.placer_id (the gateway's item id)
ORC-4                   ``<prescription number>^GATEWAYD``     number
ORC-9                   order date/time (local DTM)             authored_local (else now)
ORC-12                  ``id^name``                             prescriber
RXE-2 / RXO-1           drug ``code^text^system``               item.medication
RXE-3 / RXO-2           dose value                              item.dose_value
RXE-5 / RXO-4           dose unit ``code^text^UCUM`` or ``^text``  item.dose_unit
RXE-7 / RXO-7           ``^instructions``                       item.instructions
RXE-10 / RXO-11         dispense amount                         item.dispense_value
RXE-11 / RXO-12         dispense units                          item.dispense_unit
RXE-12 / RXO-13         refills                                 item.refills
RXE-15                  prescription number                     (as ORC-4)
TQ1-1, TQ1-3            ``1``, repeat pattern (table 0335)      item.frequency
TQ1-6                   days supply ``<n>^d``                   item.days_supply
TQ1-7                   start (local DTM)                       (as ORC-9)
RXR-1                   route ``code^text^system``              item.route
======================  =====================================  ==========================================

Group order follows the v2.5 message structures: RDE_O11 ``ORC [RXO] RXE {TQ1} {RXR}``; OMP_O09
``ORC {TQ1} RXO {RXR}``. `PharmacyOrderWriter` is the domain's `OrderWriter` port (gateway/domain/ports.py)
for one pharmacy endpoint.

`read_order_answer`: ACK, RRE^O12, ORP^O10 (also v2.3's ORR) -> `OrderAnswer`: accepted when MSA-1 is AA/CA and
no ORC-1 says UA/DE/UM/UX; the reason is ERR-8, else ERR-3.2, else MSA-3, else ORC-16.2. Errors reading it are
`Hl7Error` with segment and field.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from adapters.hl7.er7 import Hl7Error, Message, dtm, escape, format_message, hl7_charset_name
from adapters.maps.srm_booking import PLACER_NAMESPACE, Hl7Header
from gateway.domain.prescriptions import Code, ItemAnswer, OrderAnswer, Prescription

__all__ = ["ANSWER_TYPES", "ORDER_TYPES", "PharmacyOrderWriter", "build_order", "read_order_answer"]

#: pharmacy.message -> the order's message type
ORDER_TYPES = {"RDE": "RDE^O11", "OMP": "OMP^O09"}

#: MSH-9.1 of the messages that answer an order
ANSWER_TYPES = ("ACK", "RRE", "ORP", "ORR")


def _cwe(c: Code) -> str:
    return "^".join((escape(c.code), escape(c.text), escape(c.system))).rstrip("^")


def _segment(name: str, fields: dict[int, str]) -> list[str]:
    last = max([n for n, v in fields.items() if v] + [1])
    out = [name] + [""] * last
    for n, v in fields.items():
        if n <= last:
            out[n] = v
    return out


def build_order(prescription: Prescription, *, header: Hl7Header, control_id: str, now: datetime,
                message: str = "RDE") -> bytes:
    """RDE^O11 (``message='RDE'``) or OMP^O09 (``'OMP'``) for a prescription, encoded in the header's
    charset. ``now`` (naive local) is MSH-7, and ORC-9/TQ1-7 when the prescription has no authoring time."""
    if message not in ("RDE", "OMP"):
        raise ValueError(f"pharmacy order message must be RDE or OMP, not {message!r}")
    p = prescription
    mtype = "RDE^O11^RDE_O11" if message == "RDE" else "OMP^O09^OMP_O09"
    when = dtm(p.authored_local or now)
    pat = p.patient
    segments = [
        _segment("MSH", {
            1: "^~\\&", 2: escape(header.sending_application), 3: escape(header.sending_facility),
            4: escape(header.receiving_application), 5: escape(header.receiving_facility), 6: dtm(now),
            8: mtype, 9: escape(control_id), 10: "P", 11: header.version, 17: hl7_charset_name(header.charset),
        }),
        _segment("PID", {
            1: "1",
            3: "~".join("^".join((escape(i.value), "", "", escape(i.system), escape(i.type_code or "PT")))
                        for i in pat.identifiers),
            5: "^".join((escape(pat.family), escape(pat.given))).rstrip("^"),
            7: escape(p.birth_date), 8: p.gender, 13: escape(pat.phone),
        }),
        _segment("PV1", {1: "1", 2: p.patient_class or "O", 19: escape(p.encounter_id)}),
    ]
    prescriber = "^".join((escape(p.prescriber.id), escape(p.prescriber.name))).rstrip("^")
    for item in p.items:
        orc = _segment("ORC", {
            1: "NW", 2: f"{escape(item.placer_id)}^{PLACER_NAMESPACE}",
            4: f"{escape(p.number)}^{PLACER_NAMESPACE}", 9: when, 12: prescriber,
        })
        tq1 = _segment("TQ1", {
            1: "1", 3: escape(item.frequency.code),
            6: f"{item.days_supply}^d" if item.days_supply else "", 7: when,
        })
        rxr = _segment("RXR", {1: _cwe(item.route)})
        instructions = f"^{escape(item.instructions)}" if item.instructions else ""
        if message == "RDE":
            rx = _segment("RXE", {
                2: _cwe(item.medication), 3: item.dose_value, 5: _cwe(item.dose_unit), 7: instructions,
                10: item.dispense_value, 11: _cwe(item.dispense_unit), 12: str(item.refills),
                15: escape(p.number),
            })
            segments += [orc, rx, tq1, rxr]
        else:
            rx = _segment("RXO", {
                1: _cwe(item.medication), 2: item.dose_value, 4: _cwe(item.dose_unit), 7: instructions,
                11: item.dispense_value, 12: _cwe(item.dispense_unit), 13: str(item.refills),
            })
            segments += [orc, tq1, rx, rxr]
    return format_message(segments).encode(header.charset)


@dataclass(frozen=True)
class PharmacyOrderWriter:
    """The orders of one pharmacy endpoint: its MSH header (and charset), and the order message the hospital
    takes (``pharmacy.message``: RDE or OMP)."""

    header: Hl7Header
    message: str = "RDE"

    @property
    def message_type(self) -> str:
        return ORDER_TYPES[self.message]

    @property
    def charset(self) -> str:
        return self.header.charset

    def write(self, prescription: Prescription, *, control_id: str, now: datetime) -> bytes:
        return build_order(prescription, header=self.header, control_id=control_id, now=now, message=self.message)


_REFUSING_ORDER_CONTROL = frozenset({"UA", "DE", "UM", "UX", "UC", "UD", "UF", "UH", "UN", "UR"})


def read_order_answer(message: Message) -> OrderAnswer:
    """The HIS's answer to an RDE/OMP: ACK, RRE^O12, ORP^O10 (ORR^O02/O10 too). Does not compare MSA-2 with
    what was sent: `OrderAnswer.acknowledges` is for the caller (the relay) to match."""
    if message.message_code not in ANSWER_TYPES:
        raise Hl7Error(200, f"not an answer to a pharmacy order: {message.type_name}", segment="MSH", field=9)
    msa = message.segment("MSA")
    if msa is None:
        raise Hl7Error(101, "answer without an MSA segment", segment="MSA")
    code = msa.get(1).upper()
    if code not in ("AA", "AE", "AR", "CA", "CE", "CR"):
        raise Hl7Error(103, f"MSA-1 {msa.get(1)!r} is not an acknowledgment code", segment="MSA", field=1)
    items = tuple(
        ItemAnswer(placer_id=orc.get(2), filler_id=orc.get(3), order_control=orc.get(1).upper())
        for orc in message.all("ORC")
    )
    refused_items = [i for i in items if i.order_control in _REFUSING_ORDER_CONTROL]
    accepted = code in ("AA", "CA") and not refused_items
    reason = ""
    err = message.segment("ERR")
    if err is not None:
        reason = err.get(8) or err.get(3, 2) or ""
    reason = reason or msa.get(3)
    if not reason:
        for orc in message.all("ORC"):
            if orc.get(1).upper() in _REFUSING_ORDER_CONTROL:
                reason = orc.get(16, 2) or orc.get(16, 1)
                break
    return OrderAnswer(acknowledges=msa.get(2), code=code, accepted=accepted, reason=reason, items=items)
