"""A booking message the domain wrote (SRM^S01 / S04 / S03, adapters/maps/srm_booking.py) read back into the
plain request a HIS that does not speak HL7 v2 takes (:class:`HisRequest`): a row of a database's
intermediate table (adapters/inner/database.py).

The domain writes every message to the HIS as HL7 once, at its first send, and the chamber keeps those bytes;
so a HIS endpoint of another kind reads the same stored message, and every resend is the same request with
the same key (the message's control id).  Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from adapters.hl7.er7 import Hl7Error, Message, parse_dtm

RequestAction = Literal["book", "hold", "cancel", "move"]


@dataclass(frozen=True)
class HisRequest:
    """What the gateway asks of the HIS about one appointment."""

    action: RequestAction
    key: str  # the message's control id: the same on every resend
    placer: str  # the gateway's appointment id
    schedule_id: str
    start_local: datetime  # naive, hospital local time
    minutes: int
    his_appointment: str = ""  # the HIS's appointment number (cancel, move)
    patient_id: str = ""
    patient_id_type: str = ""
    patient_name: str = ""  # family name then given name, as Chinese names are written
    phone: str = ""
    service_code: str = ""
    reason: str = ""


def request_from_srm(message: Message) -> HisRequest:
    """An SRM^S01 (a booking, or a hold when ARQ-8 is Tentative), S04 (cancellation) or S03 (a move) as a
    request; Hl7Error naming segment and field when it is not one."""
    if message.message_code != "SRM" or message.trigger not in ("S01", "S03", "S04"):
        raise Hl7Error(200, f"a HIS of this kind takes no {message.type_name} messages", segment="MSH", field=9)
    arq = message.segment("ARQ")
    if arq is None:
        raise Hl7Error(100, "ARQ segment missing", segment="ARQ")
    placer, schedule_id = arq.get(1), arq.get(5)
    if not placer:
        raise Hl7Error(101, "placer appointment id (ARQ-1) is required", segment="ARQ", field=1)
    if not schedule_id:
        raise Hl7Error(101, "schedule id (ARQ-5) is required", segment="ARQ", field=5)
    try:
        start = parse_dtm(arq.get(11))
        minutes = int(arq.get(9) or "0")
    except ValueError as e:
        raise Hl7Error(102, f"requested start or duration unreadable: {e}", segment="ARQ", field=11) from None
    if message.trigger == "S04":
        action: RequestAction = "cancel"
    elif message.trigger == "S03":
        action = "move"
    else:
        action = "hold" if arq.get(8).lower() == "tentative" else "book"
    pid = message.segment("PID")
    ais = message.segment("AIS")
    name = ""
    if pid is not None:
        name = pid.get(5, 1) + pid.get(5, 2)
    return HisRequest(
        action=action, key=message.control_id, placer=placer, schedule_id=schedule_id, start_local=start,
        minutes=minutes, his_appointment=arq.get(2), patient_id=pid.get(3) if pid is not None else "",
        patient_id_type=pid.get(3, 5) if pid is not None else "", patient_name=name,
        phone=pid.get(13) if pid is not None else "", service_code=ais.get(3) if ais is not None else "",
        reason=arq.get(7, 2))
