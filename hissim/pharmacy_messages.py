"""What the simulated hospital pharmacy reads and writes, per docs/pharmacy-profile.md. Pure: no I/O, no clock.

The golden files in tests/golden/pharmacy/ are the templates, and everything written here reads back through
the gateway's own readers in ``adapters.maps.rde_order`` and ``adapters.maps.rds_dispense``
(tests/unit/test_hissim_pharmacy.py):

- `read_order`: the gateway's RDE^O11 (first read with the gateway's `prescription_from_rde`, so an order it
  could not have written is refused with the same `Hl7Error`) or OMP^O09 -> `Order`: per ORC group the
  placer number (ORC-2, echoed in everything about the item), the drug, the amount and unit to dispense and
  the route.
- `build_order_answer`: RRE^O12 (to an RDE) / ORP^O10 (to an OMP): MSA AA, PID, per item ORC-1 ``OK`` with
  ORC-2 echoed and our filler number in ORC-3 (``rre_o12_accepted.hl7``); an item with no filler number (out
  of stock) gets ORC-1 ``UA`` and ORC-16 ``OOS^库存不足``, and the answer MSA AE with one ERR 207 per such item
  at its RXE-2 / RXO-1 (``rre_o12_refused.hl7``). `read_order_answer` -> `OrderAnswer`.
- `build_rds`: RDS^O13, one ORC (``RE``, ORC-2 echoed, ORC-3 filler, ORC-4 echoed) / RXD / RXR group per item
  (``rds_o13.hl7``). `dispenses_from_rds` -> one `Dispense` per item, the HIS's dispense id ``<filler>-1``.
- `random_release` + `build_release`: a prescription the HIS releases to outside pharmacies: RDE^O11 with
  our order number in ORC-3 and ``RELEASE^外配处方`` in ORC-16 of every ORC (``rde_o11_release.*.hl7``), for a
  patient of `PATIENTS` (made-up names and record numbers) and one to three drugs of `DRUGS`.
  `released_prescription` -> `Prescription`.

Every value placed in a field is HL7-escaped; the text is encoded with the header's codec.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

from adapters.hl7.er7 import Hl7Error, Message, Segment, dtm, escape, format_message
from adapters.maps.rds_dispense import RELEASE_MARK, prescription_from_rde
from gateway.domain.prescriptions import Code
from hissim.messages import Header, Refusal, err_segment, msh_segment

#: the namespace of the HIS's own numbers (ORC-2/3/4 .2 of what it makes up)
HIS_NAMESPACE = "HIS"
OUT_OF_STOCK = "OOS^库存不足"
PHARMACIST = "P007^李^药师"
DISPENSE_NOTE = "请按时服药"
ORAL = Code("PO", "口服", "HL70162")
MG = Code("mg", "mg", "UCUM")


@dataclass(frozen=True)
class OrderKind:
    """One order message the pharmacy takes: its answer's MSH-9 and where the item's drug is."""

    answer_type: str
    segment: str  # RXE or RXO
    drug: int  # field of the drug code
    amount: int  # field of the amount to dispense
    unit: int  # field of its unit


#: (MSH-9.1, MSH-9.2) -> what the pharmacy answers and where it reads each item
ORDER_KINDS = {
    ("RDE", "O11"): OrderKind("RRE^O12^RRE_O12", "RXE", 2, 10, 11),
    ("OMP", "O09"): OrderKind("ORP^O10^ORP_O10", "RXO", 1, 11, 12),
}


@dataclass(frozen=True)
class OrderItem:
    placer: str  # ORC-2 as written back (escaped components), e.g. 'mr-1^GATEWAYD'
    placer_id: str  # ORC-2.1, e.g. 'mr-1' (the gateway's MedicationRequest id)
    drug: Code
    amount: str
    unit: Code
    route: Code


@dataclass(frozen=True)
class Order:
    """The gateway's order as the pharmacy keeps it: enough to answer it and, later, to dispense it."""

    kind: OrderKind
    control_id: str  # MSH-10 as on the wire (MSA-2 of the answer)
    reply_to: tuple[str, str]  # MSH-3, MSH-4 as on the wire (MSH-5/6 of the answer)
    number: str  # the prescription number: ORC-4.1, else RXE-15
    number_field: str  # ORC-4 as written back
    patient: str  # PID-3 as written back: the hospital's record number (type MR), else the first identifier
    patient_name: str  # PID-5 as written back
    items: tuple[OrderItem, ...]


def _echo(segment: Segment, field: int, repetition: int = 0) -> str:
    """A field read and written back, components escaped again (whatever the sender's encoding characters)."""
    return "^".join(escape(c) for c in segment.components(field, repetition)).rstrip("^")


def _code(segment: Segment | None, field: int) -> Code:
    if segment is None:
        return Code("")
    return Code(segment.get(field, 1), segment.get(field, 2), segment.get(field, 3))


def _cwe(code: Code) -> str:
    return "^".join((escape(code.code), escape(code.text), escape(code.system))).rstrip("^")


def _segment(name: str, fields: dict[int, str]) -> list[str]:
    """A segment for `format_message`: ``fields`` (already escaped) at their numbers, the others empty."""
    out = [name] + [""] * max(fields)
    for n, value in fields.items():
        out[n] = value
    return out


def read_order(message: Message) -> Order:
    """An RDE^O11 / OMP^O09 -> `Order`; `Hl7Error` (with its location) when it cannot be filled."""
    kind = ORDER_KINDS[(message.message_code, message.trigger)]
    if message.message_code == "RDE":
        prescription_from_rde(message)
    pid = message.segment("PID")
    if pid is None:
        raise Hl7Error(101, "PID segment is required", segment="PID")
    groups = message.groups("ORC")
    if not groups:
        raise Hl7Error(101, "an order needs an ORC segment", segment="ORC")
    items = []
    for seq, group in enumerate(groups, start=1):
        orc = group[0]
        rx = next((s for s in group if s.name == kind.segment), None)
        if rx is None or not rx.get(kind.drug):
            raise Hl7Error(101, f"{kind.segment}-{kind.drug} (the drug) is required", segment=kind.segment,
                           sequence=seq, field=kind.drug)
        if not orc.get(2):
            raise Hl7Error(101, "ORC-2 (placer order number) is required", segment="ORC", sequence=seq, field=2)
        rxr = next((s for s in group if s.name == "RXR"), None)
        items.append(OrderItem(_echo(orc, 2), orc.get(2), _code(rx, kind.drug), rx.get(kind.amount),
                               _code(rx, kind.unit), _code(rxr, 1)))
    first_orc, rxe = groups[0][0], message.segment("RXE")
    number = first_orc.get(4) or (rxe.get(15) if rxe is not None else "")
    mr = [r for r in range(pid.repetitions(3)) if pid.get(3, 5, r) == "MR"]
    msh = message.msh
    return Order(
        kind=kind,
        control_id=msh.raw(10),
        reply_to=(msh.raw(3), msh.raw(4)),
        number=number,
        number_field=_echo(first_orc, 4) or escape(number),
        patient=_echo(pid, 3, mr[0] if mr else 0),
        patient_name=_echo(pid, 5),
        items=tuple(items),
    )


def build_order_answer(order: Order, fillers: Sequence[str | None], *, header: Header, control_id: str,
                       now: datetime) -> bytes:
    """RRE^O12 / ORP^O10 to ``order``: ``fillers[i]`` is item i's filler number, None when out of stock."""
    refused = [n for n, filler in enumerate(fillers) if filler is None]
    segments = [
        msh_segment(header, type_name=order.kind.answer_type, control_id=control_id, now=now,
                    to_application=order.reply_to[0], to_facility=order.reply_to[1]),
        ["MSA", "AE" if refused else "AA", order.control_id],
    ]
    for n in refused:
        drug = order.items[n].drug.code
        segments.append(err_segment(Refusal(207, f"药品 {drug} 库存不足", order.kind.segment, order.kind.drug,
                                            sequence=n + 1)))
    segments.append(["PID", "1", "", order.patient, "", order.patient_name])
    for item, filler in zip(order.items, fillers):
        if filler is None:
            segments.append(_segment("ORC", {1: "UA", 2: item.placer, 16: OUT_OF_STOCK}))
        else:
            segments.append(["ORC", "OK", item.placer, f"{escape(filler)}^{HIS_NAMESPACE}"])
    return header.encode(format_message(segments))


def build_rds(order: Order, fillers: Sequence[str], *, header: Header, control_id: str, now: datetime) -> bytes:
    """RDS^O13 to the gateway: every item of ``order`` dispensed now, ``fillers[i]`` its filler number."""
    segments = [
        msh_segment(header, type_name="RDS^O13^RDS_O13", control_id=control_id, now=now,
                    to_application=escape(header.gateway_application), to_facility=escape(header.gateway_facility)),
        ["PID", "1", "", order.patient, "", order.patient_name],
    ]
    for item, filler in zip(order.items, fillers):
        segments += [
            ["ORC", "RE", item.placer, f"{escape(filler)}^{HIS_NAMESPACE}", order.number_field],
            ["RXD", "1", _cwe(item.drug), dtm(now), escape(item.amount), _cwe(item.unit), "", escape(order.number),
             "", DISPENSE_NOTE, PHARMACIST],
        ]
        if item.route.code or item.route.text:
            segments.append(["RXR", _cwe(item.route)])
    return header.encode(format_message(segments))


# -- prescriptions the HIS releases to outside pharmacies ------------------------------------------------


@dataclass(frozen=True)
class Drug:
    code: str
    name: str
    dose: str
    dose_unit: Code
    frequency: str  # HL7 table 0335
    days: int
    amount: str
    unit: str  # text only, e.g. 粒
    instructions: str = ""


@dataclass(frozen=True)
class Patient:
    """A made-up patient: record number (PID-3, type MR), name, birth date, sex."""

    mrn: str
    family: str
    given: str
    birth_date: str
    gender: str


DRUGS = (
    Drug("Y0001", "阿莫西林胶囊", "0.5", Code("g", "g", "UCUM"), "TID", 4, "24", "粒", "饭后服用"),
    Drug("Y0002", "布洛芬缓释胶囊", "300", MG, "BID", 5, "20", "粒"),
    Drug("Y0105", "硝苯地平控释片", "30", MG, "QD", 28, "28", "片", "每日早晨服用"),
    Drug("Y0201", "盐酸二甲双胍片", "500", MG, "BID", 30, "60", "片", "餐中服用"),
    Drug("Y0310", "氯雷他定片", "10", MG, "QD", 7, "7", "片"),
)
PATIENTS = (
    Patient("MRN-9001", "陈", "静", "19750312", "F"),
    Patient("MRN-9002", "刘", "洋", "19880726", "M"),
    Patient("MRN-9003", "黄", "秀英", "19520109", "F"),
    Patient("MRN-9004", "赵", "磊", "20010418", "M"),
    Patient("MRN-9005", "周", "敏", "19930905", "F"),
)
DOCTORS = (("D0100", "刘医生"), ("D0101", "孙医生"))


@dataclass(frozen=True)
class Release:
    number: str  # the prescription number (ORC-4.1, RXE-15)
    patient: Patient
    doctor: tuple[str, str]  # ORC-12: id, name
    items: tuple[tuple[str, str, Drug], ...]  # (placer ORC-2.1, filler ORC-3.1, drug)


def random_release(rng: random.Random, number: str, fillers: Iterator[str]) -> Release:
    """A prescription of one to three different drugs for a random patient, numbered ``number``."""
    drugs = rng.sample(DRUGS, rng.randint(1, 3))
    return Release(
        number=number,
        patient=rng.choice(PATIENTS),
        doctor=rng.choice(DOCTORS),
        items=tuple((f"{number}-{n}", next(fillers), drug) for n, drug in enumerate(drugs, start=1)),
    )


def build_release(release: Release, *, header: Header, control_id: str, now: datetime) -> bytes:
    """RDE^O11 releasing ``release`` to outside pharmacies, ordered ``now`` (ORC-9, TQ1-7)."""
    p, when, number = release.patient, dtm(now), escape(release.number)
    segments = [
        msh_segment(header, type_name="RDE^O11^RDE_O11", control_id=control_id, now=now,
                    to_application=escape(header.gateway_application), to_facility=escape(header.gateway_facility)),
        _segment("PID", {1: "1", 3: f"{escape(p.mrn)}^^^urn:gatewayd:his:mrn^MR",
                         5: f"{escape(p.family)}^{escape(p.given)}", 7: p.birth_date, 8: p.gender}),
        _segment("PV1", {1: "1", 2: "O", 19: f"V{number}"}),
    ]
    for placer, filler, drug in release.items:
        segments += [
            _segment("ORC", {1: "NW", 2: f"{escape(placer)}^{HIS_NAMESPACE}", 3: f"{escape(filler)}^{HIS_NAMESPACE}",
                             4: f"{number}^{HIS_NAMESPACE}", 9: when,
                             12: f"{escape(release.doctor[0])}^{escape(release.doctor[1])}",
                             16: f"{RELEASE_MARK}^外配处方"}),
            _segment("RXE", {2: _cwe(Code(drug.code, drug.name, "99HIS")), 3: drug.dose, 5: _cwe(drug.dose_unit),
                             7: f"^{escape(drug.instructions)}" if drug.instructions else "", 10: drug.amount,
                             11: _cwe(Code("", drug.unit)), 12: "0", 15: number}),
            _segment("TQ1", {1: "1", 3: drug.frequency, 6: f"{drug.days}^d", 7: when}),
            ["RXR", _cwe(ORAL)],
        ]
    return header.encode(format_message(segments))
