"""Fuzz harness: the SRM^S01/S03/S04 writer (adapters/maps/srm_booking.py), the build side of what the
gateway tells the HIS, with fuzzed domain values.

Input: byte 0 picks the trigger, the HIS's charset and HL7 version; the rest is UTF-8 text (undecodable
bytes become U+FFFD) cut at 0x1F into the values a message carries, in `FIELDS` order: the header (from the
config), the ids, the slot (from the HIS's SIU), the patient and the booking (from a platform). Identifiers
are cut at 0x1E, an identifier's parts at 0x1D, its assigning authority's parts at 0x1B; Z-segments (config)
at 0x1E, and only those the config would take (``Z..|`` without CR, LF, 0x0B, 0x1C) are used. Unparseable
minutes or start give the defaults (15, 2030-01-07 08:00).

Invariants (anything else is a crash): `build_srm` returns bytes, or raises UnicodeEncodeError exactly when a
value cannot be written in the HIS's charset. The bytes can be framed (no 0x0B/0x1C) and `parse` reads them
back (with the HIS's charset as default) as that SRM with the same segments, and every value the message
carries reads back equal to what was given: a '|', '^', '~', '\\', '&', CR or LF in a name can never shift
a field.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta

import atheris

with atheris.instrument_imports(include=["adapters.maps.srm_booking", "adapters.hl7.er7"]):
    from adapters.hl7.er7 import charset_codec, dtm, parse
    from adapters.maps.srm_booking import PLACER_NAMESPACE, Hl7Header, build_srm, default_authority

from adapters.inner.framing import frame
from gateway.domain.model import Patient, PatientIdentifier, SlotForHis
from tests.fuzz.campaign import main

TRIGGERS = ("S01", "S03", "S04")
CHARSETS = ("utf-8", "gb18030", "latin-1", "ascii", "gbk")
VERSIONS = ("2.3", "2.3.1", "2.4", "2.5", "2.5.1")
FIELDS = ("sending_application", "sending_facility", "receiving_application", "receiving_facility", "control_id",
          "appointment_id", "his_appointment", "reason", "routed_facility", "appointment_type", "schedule_id",
          "start", "minutes", "service_code", "service_text", "practitioner_id", "family", "given", "phone",
          "identifiers", "z_segments")
NOW = datetime(2030, 1, 1, 9, 30, 5)
Z_SEGMENT = re.compile(r"^Z[A-Z0-9]{2}\|[^\r\n\x0b\x1c]*$")  # HisConfig.z_segments


def values(text: str) -> dict[str, str]:
    parts = text.split("\x1f")
    return {name: parts[i] if i < len(parts) else "" for i, name in enumerate(FIELDS)}


def identifier(text: str) -> PatientIdentifier:
    system, value, type_code, authority = (text.split("\x1d") + ["", "", "", ""])[:4]
    return PatientIdentifier(system, value, type_code, tuple(authority.split("\x1b")) if authority else ())


def start_of(text: str) -> datetime:
    try:
        return datetime.strptime(text, "%Y%m%d%H%M")
    except ValueError:
        return datetime(2030, 1, 7, 8, 0)


def minutes_of(text: str, start: datetime) -> int:
    try:
        minutes = int(text)
        start + timedelta(minutes=minutes)  # the slot book keeps only slots that end (siu_slot)
    except (ValueError, OverflowError):
        return 15
    return minutes if minutes > 0 else 15


def check(data: bytes) -> None:
    if not data:
        return
    trigger = TRIGGERS[data[0] % 3]
    charset = CHARSETS[data[0] // 3 % len(CHARSETS)]
    version = VERSIONS[data[0] // 15 % len(VERSIONS)]
    v = values(data[1:].decode("utf-8", "replace"))
    header = Hl7Header(v["sending_application"], v["sending_facility"], v["receiving_application"],
                       v["receiving_facility"], version, charset)
    start = start_of(v["start"])
    slot = SlotForHis(v["schedule_id"], start, minutes_of(v["minutes"], start), v["service_code"],
                      v["service_text"], v["practitioner_id"])
    identifiers = tuple(identifier(t) for t in v["identifiers"].split("\x1e")) if v["identifiers"] else ()
    patient = Patient(identifiers, v["family"], v["given"], v["phone"])
    z_segments = [z for z in v["z_segments"].split("\x1e") if Z_SEGMENT.match(z)]
    control_id = v["control_id"] or "G1"  # the gateway's control ids are never empty
    his_appointment = v["his_appointment"] or None
    routed = v["routed_facility"] or None
    unwritten = {"start", "minutes", "identifiers", "z_segments"} | ({"receiving_facility"} if routed else set())
    texts = [*(v[k] for k in FIELDS if k not in unwritten), *z_segments,
             *(p for i in identifiers for p in (i.system, i.value, i.type_code, *i.assigning_authority))]
    try:
        body = build_srm(trigger, header=header, control_id=control_id, appointment_id=v["appointment_id"],
                         slot=slot, patient=patient, now=NOW, his_appointment=his_appointment, reason=v["reason"],
                         receiving_facility=routed, z_segments=z_segments, appointment_type=v["appointment_type"])
    except UnicodeEncodeError:
        assert not all(_writable(t, charset) for t in texts), "UnicodeEncodeError, but every value is writable"
        return
    assert all(_writable(t, charset) for t in texts), "a value the charset cannot carry was written"
    frame(body)
    m = parse(body, default_charset=charset)
    # (v2.3's MSH-9 has no structure component)
    assert m.type_name == f"SRM^{trigger}" and m.structure == ("" if version == "2.3" else "SRM_S01"), m.type_name
    assert m.charset == charset_codec(m.msh.get(18), charset)
    names = ["MSH", "ARQ", "PID", "RGS", "AIS"] + (["AIP"] if slot.practitioner_id else [])
    assert [s.name for s in m.segments] == names + [z[:3] for z in z_segments], [s.name for s in m.segments]
    msh, arq, pid, ais = m.msh, m.segment("ARQ"), m.segment("PID"), m.segment("AIS")
    expect = {
        (msh, 3): header.sending_application, (msh, 4): header.sending_facility,
        (msh, 5): header.receiving_application, (msh, 6): routed if routed is not None else header.receiving_facility,
        (msh, 7): dtm(NOW), (msh, 10): control_id, (msh, 12): version,
        (arq, 2): his_appointment or "", (arq, 5): slot.schedule_id, (arq, 8): v["appointment_type"],
        (arq, 9): str(slot.minutes), (pid, 13): patient.phone, (ais, 4): dtm(start)[:12], (ais, 7): str(slot.minutes),
    }
    for (seg, field), want in expect.items():
        assert seg.get(field) == want, (seg.name, field, seg.get(field), want)
    assert (arq.get(1, 1), arq.get(1, 2), arq.get(7, 2)) == (v["appointment_id"], PLACER_NAMESPACE, v["reason"])
    assert (pid.get(5, 1), pid.get(5, 2)) == (patient.family, patient.given), pid.raw(5)
    assert (ais.get(3, 1), ais.get(3, 2)) == (slot.service_code, slot.service_text), ais.raw(3)
    if slot.practitioner_id:
        assert m.segment("AIP").get(3) == slot.practitioner_id
    assert pid.repetitions(3) == len(identifiers), pid.raw(3)
    for i, ident in enumerate(identifiers):
        authority = ident.assigning_authority or default_authority(ident.system)
        assert pid.get(3, 1, i) == ident.value and pid.get(3, 5, i) == (ident.type_code or "PT"), pid.raw(3)
        assert [pid.get(3, 4, i, s + 1) for s in range(len(authority))] == list(authority), pid.raw(3)
    for seg, z in zip(m.segments[len(names):], z_segments):
        assert seg.er7() == z, (seg.er7(), z)


def _writable(text: str, charset: str) -> bool:
    try:
        text.encode(charset)
    except UnicodeEncodeError:
        return False
    return True


if __name__ == "__main__":
    main(check)
