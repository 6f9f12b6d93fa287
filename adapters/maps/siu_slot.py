"""SIU^S12..S26 and SQR^S25 (HIS -> gateway) to :class:`~gateway.domain.model.SlotNotice`.

Field use follows docs/hl7-profile.md.  Each notice also carries the facility that published the schedule
(MSH-4.1) and the message's Z-segments as ER7 text (an SIU's, wherever they stand; an SQR^S25 group's own),
for the gate to keep or drop (``pass_z_segments``).  Raises :class:`adapters.hl7.er7.Hl7Error` (with the segment and
field at fault) when a field the slot book needs is missing or malformed, so the gate can NAK precisely.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from adapters.hl7.er7 import Hl7Error, Message, Segment, parse_dtm
from gateway.domain.model import ScheduleInfo, SlotNotice

#: SIU trigger -> what it does to the slot
TRIGGER_ACTIONS = {
    "S12": "book",
    "S13": "reschedule",
    "S14": "book",
    "S15": "free",
    "S17": "free",
    "S26": "noshow",
    "S23": "block",
    "S24": "open",
}

#: SCH-25 filler status -> action (wins over the trigger when present, and is all SQR^S25 has)
STATUS_ACTIONS = {
    "OPEN": "open",
    "BOOKED": "book",
    "BLOCKED": "block",
    "CANCELLED": "free",
    "DELETED": "free",
    "NOSHOW": "noshow",
}

SUPPORTED_SIU = frozenset(TRIGGER_ACTIONS)


def notices_from_siu(message: Message) -> list[SlotNotice]:
    """The slot notice an SIU carries (one SCH per SIU)."""
    if message.message_code != "SIU":
        raise Hl7Error(200, f"not an SIU message: {message.type_name}", segment="MSH", sequence=1, field=9)
    if message.trigger not in SUPPORTED_SIU:
        raise Hl7Error(201, f"unsupported SIU event {message.trigger}", segment="MSH", sequence=1, field=9)
    groups = message.groups("SCH")
    if not groups:
        raise Hl7Error(101, "SIU without an SCH segment", segment="SCH", sequence=1, field=None)
    z_segments = tuple(seg.er7() for seg in message.segments[1:] if _is_z(seg))
    return [_notice(groups[0], 1, TRIGGER_ACTIONS[message.trigger], message.sending_facility, z_segments)]


def notices_from_sqr(message: Message) -> list[SlotNotice]:
    """One notice per SCH group of an SQR^S25 answer."""
    out = []
    for seq, group in enumerate(message.groups("SCH"), start=1):
        out.append(_notice(group, seq, None, message.sending_facility,
                           tuple(seg.er7() for seg in group if _is_z(seg))))
    return out


def _is_z(segment: Segment) -> bool:
    return segment.name[:1] == "Z"


def _notice(group: list[Segment], seq: int, trigger_action: str | None, facility: str,
            z_segments: tuple[str, ...]) -> SlotNotice:
    sch = group[0]
    by_name: dict[str, Segment] = {}
    for seg in group[1:]:
        by_name.setdefault(seg.name, seg)
    ais, ail, aip = by_name.get("AIS"), by_name.get("AIL"), by_name.get("AIP")

    status = sch.get(25).strip().upper()
    action = STATUS_ACTIONS.get(status) or trigger_action
    if action is None:
        raise Hl7Error(103, f"unknown filler status {sch.get(25)!r}", segment="SCH", sequence=seq, field=25)
    if trigger_action == "reschedule":
        action = "reschedule"

    # The schedule: SCH-5 where the HIS fills it (optional in v2.5), else the doctor (AIP-3), else the
    # location (AIL-3): whatever the HIS books against.
    schedule_id = (sch.get(5, 1) or (aip.get(3, 1) if aip is not None else "")
                   or (ail.get(3, 1) if ail is not None else ""))
    if not schedule_id:
        raise Hl7Error(101, "no schedule: SCH-5, AIP-3 or AIL-3 is required", segment="SCH", sequence=seq,
                       field=5)

    ais_start = ais.get(4) if ais is not None else ""
    if ais_start:
        start = _when(ais, 4, 1, seq, ais_start)
    elif sch.get(11, 4):
        start = _when(sch, 11, 4, seq)
    else:
        raise Hl7Error(101, "slot start (AIS-4 or SCH-11.4) is required", segment="AIS" if ais is not None else "SCH",
                       sequence=seq, field=4 if ais is not None else 11)

    minutes = _minutes(ais, sch, start, seq)
    service_code = ais.get(3, 1) if ais is not None else ""
    service_text = (ais.get(3, 2) if ais is not None else "") or service_code
    practitioner_id = aip.get(3, 1) if aip is not None else ""
    practitioner_name = ((aip.get(3, 2) + aip.get(3, 3)) if aip is not None else "") or practitioner_id
    department_code = ail.get(3, 1) if ail is not None else ""
    schedule = ScheduleInfo(
        id=schedule_id,
        display=sch.get(5, 2) or practitioner_name or schedule_id,
        practitioner_id=practitioner_id,
        practitioner_name=practitioner_name,
        department_code=department_code,
        department_name=(ail.get(3, 9) if ail is not None else "") or department_code,
        facility=facility,
    )
    return SlotNotice(
        action=action,
        schedule=schedule,
        start_local=start,
        minutes=minutes,
        service_code=service_code,
        service_text=service_text,
        his_appointment=sch.get(2, 1) or None,
        placer=sch.get(1, 1) or None,
        z_segments=z_segments,
    )


def _when(seg: Segment, field: int, component: int, seq: int, text: str | None = None) -> datetime:
    """A DTM (component) of the group's segment as HIS local time (``text``: that component, when read
    already); Hl7Error 102 at that field otherwise."""
    try:
        return _local(parse_dtm(seg.get(field, component) if text is None else text))
    except Hl7Error as e:
        raise Hl7Error(102, e.text, segment=seg.name, sequence=seq, field=field) from None


def _local(value: datetime) -> datetime:
    """HIS local time as a naive datetime (an offset, if the HIS sent one, is dropped after conversion)."""
    return value.replace(tzinfo=None) if value.tzinfo is None else value.replace(tzinfo=None)


def _minutes(ais: Segment | None, sch: Segment, start: datetime, seq: int) -> int:
    """The slot's length: AIS-7, else SCH-9, else SCH-11.5 (its end) minus the start.  A length must end the
    slot before the year 10000 (the slot's end is a date-time everywhere: the FHIR Slot, the SRM)."""
    for seg, field, name in ((ais, 7, "AIS"), (sch, 9, "SCH")):
        text = seg.get(field) if seg is not None else ""
        if text:
            try:
                value = int(float(text))
            except (ValueError, OverflowError):  # 'nan', 'inf'
                raise Hl7Error(102, f"duration {text[:30]!r} is not a number of minutes", segment=name,
                               sequence=seq, field=field) from None
            if value <= 0:
                raise Hl7Error(102, "duration must be positive", segment=name, sequence=seq, field=field)
            try:
                start + timedelta(minutes=value)
            except OverflowError:
                raise Hl7Error(102, f"duration {text[:30]!r} ends the slot after the year 9999",
                               segment=name, sequence=seq, field=field) from None
            return value
    if sch.get(11, 5):
        end = _when(sch, 11, 5, seq)
        value = int((end - start).total_seconds() // 60)
        if value > 0:
            return value
    raise Hl7Error(101, "slot duration (AIS-7, SCH-9 or SCH-11.5) is required", segment="AIS", sequence=seq, field=7)
