"""Bookings and cancellations (gateway -> HIS) as SRM^S01 / SRM^S04 (or S03), and the SQM^S25 query.

Per docs/hl7-profile.md. Every booking and cancellation builds an SRM inside its chamber transaction, so
`build_srm` is on the booking hot path: it writes ER7 directly with ``adapters.hl7.er7.format_message``
(~20 us). hl7apy's object model took ~10 ms for the same message, which alone capped the gateway near 100
bookings/s; that builder stays as `build_srm_hl7apy`, the reference tests/unit/test_srm_booking.py proves
the light writer against. SQM^S25 (one query per poll interval) is still built with hl7apy.
Every value that came from a platform is HL7-escaped before it is placed, so a '^' or '|' in a name can
never shift a field.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Sequence

from hl7apy.core import Message as Hl7apyMessage

from adapters.hl7.er7 import dtm, escape, format_message, hl7_charset_name
from gateway.domain.model import Patient, PatientIdentifier, SlotForHis

#: the namespace of the gateway's placer numbers (ARQ-1, ORC-2): its bookings' and its prescriptions' orders
PLACER_NAMESPACE = "GATEWAYD"


@dataclass(frozen=True)
class Hl7Header:
    """MSH fields of messages the gateway sends to one HIS."""

    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str
    version: str = "2.5"
    charset: str = "utf-8"


def _msh(msg: Hl7apyMessage, header: Hl7Header, type_: str, control_id: str, now: datetime) -> None:
    msg.msh.msh_3 = escape(header.sending_application)
    msg.msh.msh_4 = escape(header.sending_facility)
    msg.msh.msh_5 = escape(header.receiving_application)
    msg.msh.msh_6 = escape(header.receiving_facility)
    msg.msh.msh_7 = dtm(now)
    msg.msh.msh_9 = type_
    msg.msh.msh_10 = escape(control_id)
    msg.msh.msh_11 = "P"
    msg.msh.msh_12 = header.version
    msg.msh.msh_18 = hl7_charset_name(header.charset)


def _encode(msg: Hl7apyMessage, header: Hl7Header) -> bytes:
    return msg.to_er7().encode(header.charset)


# -- SRM: the light writer (the booking hot path) -----------------------------------------------------------


def _field(*components: str) -> str:
    """One field from already-escaped components, trailing empty components dropped (as hl7apy writes)."""
    return "^".join(components).rstrip("^")


def _segment(name: str, fields: dict[int, str], keep: int = 0) -> list[str]:
    """``[name, field1, ...]`` up to the last non-empty field (or at least up to field ``keep``)."""
    last = max([n for n, v in fields.items() if v] + [keep])
    out = [name] + [""] * last
    for n, v in fields.items():
        if n <= last:
            out[n] = v
    return out


#: FHIR administrative gender -> PID-8 (HL7 table 0001)
SEX = {"male": "M", "female": "F", "other": "O", "unknown": "U"}


def default_authority(system: str) -> tuple[str, ...]:
    """CX.4 (an HD) for a FHIR identifier system when the hospital configured none: an OID as HD.2 with HD.3
    ISO, a system longer than HD.1's 20 characters as HD.2 with HD.3 URI, else the system as HD.1."""
    if system.startswith("urn:oid:"):
        return ("", system[len("urn:oid:"):], "ISO")
    if len(system) > 20:
        return ("", system, "URI")
    return (system,)


def pid_identifier(identifier: PatientIdentifier) -> str:
    """One PID-3 repetition (CX): ID, CX.4 the assigning authority (its HD parts joined by '&'; default:
    :func:`default_authority`) and CX.5 the identifier type code (default PT)."""
    parts = identifier.assigning_authority or default_authority(identifier.system)
    authority = "&".join(escape(p) for p in parts)
    return f"{escape(identifier.value)}^^^{authority}^{escape(identifier.type_code or 'PT')}"


def _version(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in version.split("."))
    except ValueError:
        return (2, 5)


def _message_type(trigger: str, version: str) -> str:
    """MSH-9: v2.3 has no message structure component."""
    return f"SRM^{trigger}" if _version(version) < (2, 3, 1) else f"SRM^{trigger}^SRM_S01"


def _phone(phone: str, version: str) -> str:
    """PID-13 (XTN): from v2.6 XTN.1 is withdrawn; the number goes in XTN.12 (use PRN, equipment PH)."""
    if not phone or _version(version) < (2, 6):
        return escape(phone)
    return f"^PRN^PH^^^^^^^^^{escape(phone)}"


def _aip_role(version: str) -> list[str]:
    """AIP-4 (resource role), required before v2.5: the doctor consulted (table 0286 CP)."""
    return ["CP"] if _version(version) < (2, 5) else []


def _birth_date(birth_date: str) -> str:
    """PID-7 from a FHIR date (YYYY[-MM[-DD]]): YYYY[MM[DD]]."""
    return birth_date.replace("-", "")


def build_srm(
    trigger: str,
    *,
    header: Hl7Header,
    control_id: str,
    appointment_id: str,
    slot: SlotForHis,
    patient: Patient,
    now: datetime,
    his_appointment: str | None = None,
    reason: str = "",
    receiving_facility: str | None = None,
    z_segments: Sequence[str] = (),
    appointment_type: str = "",
) -> bytes:
    """SRM^S01 (request new appointment), SRM^S03 (modification) or SRM^S04 (cancellation).
    ``appointment_type``: ARQ-8 (HL7 table 0277), e.g. Tentative for a hold; empty for an ordinary request.

    ``receiving_facility`` replaces the header's MSH-6 (a message routed by facility); ``z_segments`` (ER7
    text, written as given: the HIS's own fields) follow the standard segments.

    MSH, ARQ, PID, RGS, AIS and (when the slot names a practitioner) AIP, written with
    ``adapters.hl7.er7.format_message``: ~20 us against ~10 ms for the same message through hl7apy's object
    model (`build_srm_hl7apy`, kept as the reference). The bytes are those hl7apy writes — trailing empty
    fields and components dropped, no CR after the last segment — except where hl7apy is wrong, proven in
    tests/unit/test_srm_booking.py: several patient identifiers are PID-3 repetitions (hl7apy escapes the
    ``~`` into ``\\R\\``), and a CR/LF in a value stays ``\\X0D\\``/``\\X0A\\`` (hl7apy escapes its backslashes).
    """
    if trigger not in ("S01", "S03", "S04"):
        raise ValueError(f"unsupported SRM trigger {trigger}")
    start, end = slot.start_local, slot.start_local + timedelta(minutes=slot.minutes)
    slot_start, slot_end = dtm(start)[:12], dtm(end)[:12]
    segments = [
        _segment("MSH", {
            1: "^~\\&", 2: escape(header.sending_application), 3: escape(header.sending_facility),
            4: escape(header.receiving_application),
            5: escape(header.receiving_facility if receiving_facility is None else receiving_facility), 6: dtm(now),
            8: _message_type(trigger, header.version), 9: escape(control_id), 10: "P", 11: header.version,
            17: hl7_charset_name(header.charset),
        }),
        _segment("ARQ", {
            1: _field(escape(appointment_id), PLACER_NAMESPACE),
            2: escape(his_appointment) if his_appointment else "",
            5: escape(slot.schedule_id),
            7: _field("", escape(reason)) if reason else "",
            8: escape(appointment_type),
            9: str(slot.minutes), 10: "MIN", 11: f"{slot_start}^{slot_end}",
            15: escape(header.sending_application), 19: escape(header.sending_application),
        }),
        _segment("PID", {
            3: "~".join(pid_identifier(i) for i in patient.identifiers),
            5: _field(escape(patient.family), escape(patient.given)),
            7: escape(_birth_date(patient.birth_date)), 8: SEX.get(patient.gender, ""),
            13: _phone(patient.phone, header.version),
        }, keep=3),
        ["RGS", "1"],
        _segment("AIS", {
            1: "1", 3: _field(escape(slot.service_code), escape(slot.service_text)), 4: slot_start,
            7: str(slot.minutes), 8: "MIN",
        }),
    ]
    if slot.practitioner_id:
        segments.append(["AIP", "1", "", escape(slot.practitioner_id), *_aip_role(header.version)])
    segments += [z.split("|") for z in z_segments]
    # format_message ends every segment with CR; the gateway has always sent the last one without (as
    # hl7apy writes it), and the chamber keeps these bytes: keep them identical.
    return format_message(segments)[:-1].encode(header.charset)


# -- SRM: the hl7apy builder, kept as the reference the light writer is tested against -----------------------


def build_srm_hl7apy(
    trigger: str,
    *,
    header: Hl7Header,
    control_id: str,
    appointment_id: str,
    slot: SlotForHis,
    patient: Patient,
    now: datetime,
    his_appointment: str | None = None,
    reason: str = "",
    appointment_type: str = "",
) -> bytes:
    """`build_srm` through hl7apy's object model (~10 ms): the reference for tests, not for the hot path."""
    if trigger not in ("S01", "S03", "S04"):
        raise ValueError(f"unsupported SRM trigger {trigger}")
    msg = Hl7apyMessage("SRM_S01", version=header.version)
    _msh(msg, header, _message_type(trigger, header.version), control_id, now)
    start, end = slot.start_local, slot.start_local + timedelta(minutes=slot.minutes)
    msg.arq.arq_1 = f"{escape(appointment_id)}^{PLACER_NAMESPACE}"
    if his_appointment:
        msg.arq.arq_2 = escape(his_appointment)
    msg.arq.arq_5 = escape(slot.schedule_id)
    if reason:
        msg.arq.arq_7 = "^" + escape(reason)
    if appointment_type:
        msg.arq.arq_8 = escape(appointment_type)
    msg.arq.arq_9 = str(slot.minutes)
    msg.arq.arq_10 = "MIN"
    msg.arq.arq_11 = f"{dtm(start)[:12]}^{dtm(end)[:12]}"
    msg.arq.arq_15 = escape(header.sending_application)
    msg.arq.arq_19 = escape(header.sending_application)

    pat = msg.add_group("SRM_S01_PATIENT")
    pat.pid.pid_3 = "~".join(pid_identifier(i) for i in patient.identifiers)
    if patient.family or patient.given:
        pat.pid.pid_5 = f"{escape(patient.family)}^{escape(patient.given)}"
    if patient.birth_date:
        pat.pid.pid_7 = escape(_birth_date(patient.birth_date))
    if patient.gender in SEX:
        pat.pid.pid_8 = SEX[patient.gender]
    if patient.phone:
        pat.pid.pid_13 = _phone(patient.phone, header.version)

    res = msg.add_group("SRM_S01_RESOURCES")
    res.rgs.rgs_1 = "1"
    svc = res.add_group("SRM_S01_SERVICE")
    svc.ais.ais_1 = "1"
    svc.ais.ais_3 = f"{escape(slot.service_code)}^{escape(slot.service_text)}"
    svc.ais.ais_4 = dtm(start)[:12]
    svc.ais.ais_7 = str(slot.minutes)
    svc.ais.ais_8 = "MIN"
    if slot.practitioner_id:
        per = res.add_group("SRM_S01_PERSONNEL_RESOURCE")
        per.aip.aip_1 = "1"
        per.aip.aip_3 = escape(slot.practitioner_id)
        for role in _aip_role(header.version):
            per.aip.aip_4 = role
    return _encode(msg, header)


def build_sqm_s25(
    *, header: Hl7Header, control_id: str, query_id: str, start: datetime, end: datetime, now: datetime
) -> bytes:
    """SQM^S25: ask the HIS for its slots between ``start`` and ``end`` (local time)."""
    msg = Hl7apyMessage("SQM_S25", version=header.version)
    _msh(msg, header, "SQM^S25^SQM_S25", control_id, now)
    msg.qrd.qrd_1 = dtm(now)
    msg.qrd.qrd_2 = "R"
    msg.qrd.qrd_3 = "I"
    msg.qrd.qrd_4 = escape(query_id)
    msg.qrd.qrd_7 = "999^RD"
    msg.qrd.qrd_8 = "ALL"
    msg.qrd.qrd_9 = "SCH"
    msg.qrd.qrd_10 = "ALL"
    msg.qrf.qrf_1 = "ALL"
    msg.qrf.qrf_2 = dtm(start)[:12]
    msg.qrf.qrf_3 = dtm(end)[:12]
    return _encode(msg, header)


def build_heartbeat(message_type: str, *, header: Hl7Header, control_id: str, now: datetime) -> bytes:
    """The inner gate's application heartbeat (``inner.his.heartbeat``, e.g. NMQ^N01): an MSH with nothing
    after it, which any HIS that reads HL7 can answer (AA, or AR for a type it does not take)."""
    return format_message([_segment("MSH", {
        1: "^~\\&", 2: escape(header.sending_application), 3: escape(header.sending_facility),
        4: escape(header.receiving_application), 5: escape(header.receiving_facility), 6: dtm(now),
        8: message_type, 9: escape(control_id), 10: "P", 11: header.version,
        17: hl7_charset_name(header.charset),
    })]).encode(header.charset)
