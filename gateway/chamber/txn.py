"""What a unit of work may do inside a chamber transaction (:class:`Txn`): the statements over every table,
one or two per method, in sections by table family (messages, schedules and slots, appointments,
idempotency, quotas, prescriptions, audit, operators, retention, OAuth2).  The callers make the decisions;
this module holds their SQL."""

from __future__ import annotations

import json
import sqlite3
from typing import Any, Callable, Iterable

from gateway.chamber.rows import (AppointmentRow, AuditChain, AuditRow, DispenseRow, HisLinkRow,
                                  MedicationRequestRow, MessageRow, NotificationRow, PrescriptionRow, ScheduleRow,
                                  SlotRow, SubscriptionRow, load)

#: the subscription topics about slots: while one has an active subscription, a slot's row is read before the
#: unit's first change to it (Txn.slots_before, for gateway/domain/notifications.py)
SLOT_TOPICS = frozenset({"free-slot"})

#: FHIR resource type -> the table holding resources of that type (by id)
_RESOURCE_TABLES = {"Appointment": "appointments", "Slot": "slots", "Schedule": "schedules",
                    "MedicationRequest": "medication_requests", "MedicationDispense": "medication_dispenses"}


def _assignments(changes: dict[str, Any], table: str, allowed: set[str]) -> str:
    """``column = ?, ...`` for an UPDATE of ``changes``, which may name only the ``allowed`` columns of the
    ``table`` (ValueError otherwise)."""
    unknown = set(changes) - allowed
    if unknown:
        raise ValueError(f"not {table} columns: {sorted(unknown)}")
    return ", ".join(f"{k} = ?" for k in changes)


#: the columns of an appointment's row (appointments and appointment_versions alike)
_VERSION_COLUMNS = ("id, version, platform, slot_id, status, patient, description, his_appointment, hold_expires,"
                    " outcome, pending_change, created, updated, replaces")


class Txn:
    """What a unit of work may do inside a chamber transaction.  Each method is one statement or two."""

    def __init__(self, conn: sqlite3.Connection, now: float, *,
                 known_schedules: Callable[[], dict[str, tuple]] | None = None,
                 known_topics: Callable[[Callable[[], set[str]]], set[str]] | None = None,
                 forget_topics: Callable[[], None] | None = None):
        self._c = conn
        self.now = now
        self.settled: list[str] = []  # appointments whose pending change this transaction cleared
        self.queue_changed = False  # an outbound message queued, or a message's state changed
        self._known_schedules = known_schedules  # -> schedules known as committed: id -> fields (None: no cache)
        self._known: dict[str, tuple] | None = None
        self.written_schedules: dict[str, tuple] = {}  # schedules this transaction wrote: id -> fields
        # appointments this unit changed: id -> (status, slot_id) before its first change, when the chamber
        # has unit hooks (Chamber.on_unit: the domain's notifications), else None (nothing tracked)
        self.appointments_before: dict[str, tuple[str, str]] | None = None
        self.appointment_events: list[tuple[str, str]] = []  # (appointment id, what) the domain noted itself
        # slots this unit changed: id -> its row before the unit's first change (None: new), when the chamber has
        # unit hooks and a subscription to a slot topic is active; else nothing is read before a slot's change
        self.slots_before: dict[str, SlotRow | None] | None = None
        self.prescription_events: list[tuple[str, str, str]] = []  # (platform, focus, what) the domain noted
        self._known_topics = known_topics  # (load) -> the topics with an active subscription, cached (engine)
        self._forget_topics = forget_topics
        self._topics: set[str] | None = None
        self._changed_subscriptions = False

    # -- messages ------------------------------------------------------------------------------------------
    def message(self, message_id: int) -> MessageRow | None:
        return load(MessageRow, self._c.execute("SELECT * FROM messages WHERE id = ?", (message_id,)).fetchone())

    def message_by_control_id(self, direction: str, peer: str, control_id: str,
                              sender: str = "") -> MessageRow | None:
        """The message ``sender`` numbered ``control_id`` ('': the gateway's own), to or from ``peer``."""
        cur = self._c.execute(
            "SELECT * FROM messages WHERE direction = ? AND peer = ? AND sender = ? AND control_id = ?",
            (direction, peer, sender, control_id),
        )
        return load(MessageRow, cur.fetchone())

    def add_message(
        self,
        *,
        direction: str,
        peer: str,
        control_id: str,
        type: str,
        state: str,
        body: bytes,
        charset: str,
        sender: str = "",
        subject: str | None = None,
        order_key: str | None = None,
        next_attempt: float | None = None,
        answer_code: str | None = None,
        answer_text: str | None = None,
        detail: str | None = None,
        if_new: bool = False,
        story: Iterable[tuple[str, str | None]] | None = None,
    ) -> int | None:
        """Insert a message and its first story line (``state``, ``detail``) — or, with ``story``, those
        (state, detail) lines instead (one statement for all).  ``sender``: who numbered it (inbound: MSH-3
        and MSH-4 as sent; '' for the gateway's own).  ``if_new``: if a message with this identity (direction,
        peer, sender, control id) is there already, insert nothing and return None (the unique index finds
        it: no lookup before)."""
        cur = self._c.execute(
            "INSERT INTO messages (direction, peer, sender, control_id, type, state, body, charset, subject,"
            " order_key, next_attempt, answer_code, answer_text, created, updated)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            + (" ON CONFLICT (direction, peer, sender, control_id) DO NOTHING" if if_new else ""),
            (direction, peer, sender, control_id, type, state, body, charset, subject, order_key, next_attempt,
             answer_code, answer_text, self.now, self.now),
        )
        if if_new and cur.rowcount == 0:
            return None
        message_id = cur.lastrowid
        if direction == "outbound":
            self.queue_changed = True
        if story is None:
            self._event(message_id, state, detail)
        else:
            self._c.executemany(
                "INSERT INTO message_events (message_id, at, state, detail) VALUES (?, ?, ?, ?)",
                [(message_id, self.now, line_state, line) for line_state, line in story],
            )
        return message_id

    def set_message_state(
        self,
        message_id: int,
        state: str,
        *,
        detail: str | None = None,
        attempts: int | None = None,
        next_attempt: float | None = None,
        answer_code: str | None = None,
        answer_text: str | None = None,
        last_error: str | None = None,
    ) -> None:
        sets = ["state = ?", "updated = ?", "next_attempt = ?"]
        args: list[Any] = [state, self.now, next_attempt]
        if attempts is not None:
            sets.append("attempts = ?")
            args.append(attempts)
        if answer_code is not None:
            sets += ["answer_code = ?", "answer_text = ?"]
            args += [answer_code, answer_text]
        if last_error is not None:
            sets.append("last_error = ?")
            args.append(last_error)
        args.append(message_id)
        self._c.execute(f"UPDATE messages SET {', '.join(sets)} WHERE id = ?", args)
        self._event(message_id, state, detail)
        self.queue_changed = True

    def set_encoded(self, message_id: int, body: bytes, type: str, charset: str, *,
                    state: str | None = None) -> None:
        """Store the HL7 bytes of an outbound message committed without them (once: they never change).
        ``state``: the message's state, if the caller knows it (for its story line)."""
        cur = self._c.execute(
            "UPDATE messages SET body = ?, type = ?, charset = ?, updated = ? WHERE id = ? AND body = ?",
            (body, type, charset, self.now, message_id, b""),
        )
        if cur.rowcount != 1:
            raise ValueError(f"message {message_id} was already encoded")
        self.queue_changed = True
        self.note(message_id, f"encoded as {type} ({len(body)} bytes, {charset})", state=state)

    def note(self, message_id: int, detail: str, *, state: str | None = None) -> None:
        """Add a line to a message's story without changing its state (``state``: that state, if known)."""
        if state is None:
            state = self._c.execute("SELECT state FROM messages WHERE id = ?", (message_id,)).fetchone()[0]
        self._event(message_id, state, detail)

    def next_outbound(self, peer: str) -> MessageRow | None:
        """The head of the delivery queue for ``peer``: strict FIFO, the oldest not yet finished (also inside
        a transaction: the relay takes the next message in the one that records an answer)."""
        cur = self._c.execute(
            "SELECT * FROM messages WHERE direction = 'outbound' AND peer = ?"
            " AND state IN ('committed', 'sending', 'retrying') ORDER BY id LIMIT 1",
            (peer,),
        )
        return load(MessageRow, cur.fetchone())

    def unfinished_outbound(self, peer: str, limit: int = 10000, *, brief: bool = False) -> list:
        """Every message to ``peer`` not yet finished, oldest first (for ordering by patient).  ``brief``:
        (id, order_key, state, next_attempt) tuples only, not the rows (nor their bodies)."""
        cur = self._c.execute(
            f"SELECT {'id, order_key, state, next_attempt' if brief else '*'} FROM messages"
            " WHERE direction = 'outbound' AND peer = ?"
            " AND state IN ('committed', 'sending', 'retrying') ORDER BY id LIMIT ?",
            (peer, limit),
        )
        if brief:
            return [tuple(r) for r in cur]
        return [load(MessageRow, r) for r in cur]

    def messages_for_subject(self, subject: str) -> list[MessageRow]:
        cur = self._c.execute("SELECT * FROM messages WHERE subject = ? ORDER BY id", (subject,))
        return [load(MessageRow, r) for r in cur]

    def _event(self, message_id: int, state: str, detail: str | None) -> None:
        self._c.execute(
            "INSERT INTO message_events (message_id, at, state, detail) VALUES (?, ?, ?, ?)",
            (message_id, self.now, state, detail),
        )

    # -- schedules and slots -------------------------------------------------------------------------------
    def upsert_schedule(self, row: ScheduleRow) -> None:
        """Insert or update a schedule; nothing is written when the chamber is known to hold these fields
        already (the HIS repeats its schedule in every SIU; ``updated`` is when they last changed)."""
        fields = (row.display, row.practitioner_id, row.practitioner_name, row.department_code, row.department_name,
                  row.facility)
        if self._known_schedules is not None:
            if self._known is None:
                self._known = self._known_schedules()  # (once per transaction)
            seen = self.written_schedules.get(row.id)
            if (seen if seen is not None else self._known.get(row.id)) == fields:
                return
        self._c.execute(
            "INSERT INTO schedules (id, display, practitioner_id, practitioner_name, department_code,"
            " department_name, facility, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET display = excluded.display,"
            " practitioner_id = excluded.practitioner_id, practitioner_name = excluded.practitioner_name,"
            " department_code = excluded.department_code, department_name = excluded.department_name,"
            " facility = excluded.facility, updated = excluded.updated",
            (row.id, row.display, row.practitioner_id, row.practitioner_name, row.department_code,
             row.department_name, row.facility, self.now),
        )
        self.written_schedules[row.id] = fields

    def schedule(self, schedule_id: str) -> ScheduleRow | None:
        cur = self._c.execute("SELECT * FROM schedules WHERE id = ?", (schedule_id,))
        return load(ScheduleRow, cur.fetchone())

    def slot(self, slot_id: str) -> SlotRow | None:
        return load(SlotRow, self._c.execute("SELECT * FROM slots WHERE id = ?", (slot_id,)).fetchone())

    def slot_by_his_appointment(self, his_appointment: str) -> SlotRow | None:
        cur = self._c.execute("SELECT * FROM slots WHERE his_appointment = ?", (his_appointment,))
        return load(SlotRow, cur.fetchone())

    def _note_slot(self, slot_id: str) -> None:
        """Keep the slot's row as it was before this unit's first change to it (``slots_before``), only while
        someone subscribes to a slot topic: otherwise no statement is added to a slot's change."""
        if self.slots_before is None or slot_id in self.slots_before \
                or not self.subscribed_topics() & SLOT_TOPICS:
            return
        self.slots_before[slot_id] = self.slot(slot_id)

    def insert_slot(self, row: SlotRow, *, or_update: bool = False, publication: bool = False) -> None:
        """Insert a slot.  ``or_update``: if it exists, update what the HIS says about it instead (times,
        service, HIS status and appointment; not our hold or booking) — one statement, no lookup before —
        except on a slot booked by one of ours with another HIS appointment than ``row``'s: that booking's
        HIS appointment stays.  ``publication``: the HIS published the slot (open/blocked), so its
        Z-segments are updated too."""
        self._note_slot(row.id)
        self._c.execute(
            "INSERT INTO slots (id, schedule_id, start_local, start_ts, end_ts, minutes, service_code,"
            " service_text, his_status, his_appointment, held_by, booked_by, z_segments, updated)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            + (" ON CONFLICT (id) DO UPDATE SET start_ts = excluded.start_ts, end_ts = excluded.end_ts,"
               " minutes = excluded.minutes, service_code = excluded.service_code,"
               " service_text = excluded.service_text, his_status = excluded.his_status,"
               " his_appointment = excluded.his_appointment, updated = excluded.updated"
               + (", z_segments = excluded.z_segments" if publication else "")
               + " WHERE slots.booked_by IS NULL OR slots.his_appointment IS NULL"
               " OR excluded.his_appointment IS NULL OR slots.his_appointment = excluded.his_appointment"
               if or_update else ""),
            (row.id, row.schedule_id, row.start_local, row.start_ts, row.end_ts, row.minutes,
             row.service_code, row.service_text, row.his_status, row.his_appointment, row.held_by,
             row.booked_by, row.z_segments, self.now),
        )

    def free_slots_starting(self, after: float, until: float) -> list[SlotRow]:
        """Free slots (no booking of ours holds them) starting in (after, until], by start."""
        return [load(SlotRow, r) for r in self._c.execute(
            "SELECT * FROM slots WHERE start_ts > ? AND start_ts <= ? AND his_status = 'free' AND held_by IS NULL"
            " ORDER BY start_ts, id", (after, until))]

    def update_slot(self, slot_id: str, **changes: Any) -> None:
        cols = _assignments(changes, "slot", {"start_ts", "end_ts", "minutes", "service_code", "service_text",
                                              "his_status", "his_appointment", "held_by", "booked_by", "z_segments"})
        self._note_slot(slot_id)
        self._c.execute(
            f"UPDATE slots SET {cols}, updated = ? WHERE id = ?", (*changes.values(), self.now, slot_id)
        )

    # -- appointments --------------------------------------------------------------------------------------
    def appointment(self, appointment_id: str) -> AppointmentRow | None:
        cur = self._c.execute("SELECT * FROM appointments WHERE id = ?", (appointment_id,))
        return load(AppointmentRow, cur.fetchone())

    def insert_appointment(self, row: AppointmentRow) -> None:
        self._c.execute(
            "INSERT INTO appointments (id, platform, slot_id, status, patient, description, his_appointment,"
            " hold_expires, outcome, pending_change, version, created, updated, replaces)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (row.id, row.platform, row.slot_id, row.status, json.dumps(row.patient, ensure_ascii=False),
             row.description, row.his_appointment, row.hold_expires, row.outcome, row.pending_change,
             row.version, self.now, self.now, row.replaces),
        )

    def update_appointment(self, appointment_id: str, **changes: Any) -> None:
        cols = _assignments(changes, "appointment", {"status", "slot_id", "his_appointment", "hold_expires",
                                                     "outcome", "pending_change", "patient"})
        if "patient" in changes:  # a hold gets its patient when it is booked ($book)
            changes["patient"] = json.dumps(changes["patient"], ensure_ascii=False)
        if self.appointments_before is not None and appointment_id not in self.appointments_before:
            row = self._c.execute("SELECT status, slot_id FROM appointments WHERE id = ?",
                                  (appointment_id,)).fetchone()
            if row is not None:
                self.appointments_before[appointment_id] = (row[0], row[1])
        self._c.execute(  # the version this change replaces, kept for vread and the instance history
            f"INSERT INTO appointment_versions ({_VERSION_COLUMNS}) SELECT {_VERSION_COLUMNS}"
            " FROM appointments WHERE id = ? ON CONFLICT DO NOTHING", (appointment_id,))
        self._c.execute(
            f"UPDATE appointments SET {cols}, version = version + 1, updated = ? WHERE id = ?",
            (*changes.values(), self.now, appointment_id),
        )
        if "pending_change" in changes:  # after COMMIT: Chamber.observe_settled
            if changes["pending_change"] is None:
                self.settled.append(appointment_id)
            elif appointment_id in self.settled:  # waiting for the HIS again after all
                self.settled = [i for i in self.settled if i != appointment_id]

    def appointment_version(self, appointment_id: str, version: int) -> AppointmentRow | None:
        """The appointment as it was at ``version`` (the current one too), or None if that version is not kept."""
        row = self.appointment(appointment_id)
        if row is None or row.version == version:
            return row
        cur = self._c.execute(f"SELECT {_VERSION_COLUMNS} FROM appointment_versions WHERE id = ? AND version = ?",
                              (appointment_id, version))
        return load(AppointmentRow, cur.fetchone())

    def appointment_versions(self, appointment_id: str) -> list[AppointmentRow]:
        """Every kept version of the appointment, the current one first, then older ones newest first."""
        row = self.appointment(appointment_id)
        if row is None:
            return []
        cur = self._c.execute(f"SELECT {_VERSION_COLUMNS} FROM appointment_versions WHERE id = ? AND version < ?"
                              " ORDER BY version DESC", (appointment_id, row.version))
        return [row, *(load(AppointmentRow, r) for r in cur.fetchall())]

    def expired_holds(self, now: float) -> list[AppointmentRow]:
        cur = self._c.execute(
            "SELECT * FROM appointments WHERE status = 'pending' AND hold_expires IS NOT NULL"
            " AND hold_expires <= ? ORDER BY hold_expires",
            (now,),
        )
        return [load(AppointmentRow, r) for r in cur]


    def set_his_link(self, peer: str, up: bool, since: float, detail: str | None) -> None:
        """What the probe found of the HIS endpoint ``peer`` (written when it changes)."""
        self._c.execute("INSERT INTO his_links (peer, up, since, detail) VALUES (?, ?, ?, ?) ON CONFLICT (peer)"
                        " DO UPDATE SET up = excluded.up, since = excluded.since, detail = excluded.detail",
                        (peer, int(up), since, detail))

    def his_links(self) -> dict[str, HisLinkRow]:
        """Every HIS endpoint the probe has found up or down, by name."""
        return {row.peer: row for row in (load(HisLinkRow, r) for r in
                                          self._c.execute("SELECT * FROM his_links ORDER BY peer"))}

    def outbound_backlog(self, peer: str) -> int:
        cur = self._c.execute(
            "SELECT count(*) FROM messages WHERE direction = 'outbound' AND peer = ?"
            " AND state IN ('committed', 'sending', 'retrying')",
            (peer,),
        )
        return cur.fetchone()[0]

    def keep_request(self, appointment_id: str, body: bytes) -> None:
        self._c.execute("INSERT INTO platform_requests (appointment_id, received, body) VALUES (?, ?, ?)"
                        " ON CONFLICT DO NOTHING", (appointment_id, self.now, body))

    def platform_request(self, appointment_id: str) -> bytes | None:
        row = self._c.execute("SELECT body FROM platform_requests WHERE appointment_id = ?",
                              (appointment_id,)).fetchone()
        return bytes(row[0]) if row else None

    # -- idempotency -----------------------------------------------------------------------------------------
    def idempotent_request(self, platform: str, key: str) -> tuple[str, str] | None:
        """(request hash, appointment id) of an earlier request with this Idempotency-Key."""
        row = self._c.execute("SELECT request_hash, appointment_id FROM idempotency_keys"
                              " WHERE platform = ? AND key = ?", (platform, key)).fetchone()
        return (row[0], row[1]) if row else None

    def remember_request(self, platform: str, key: str, request_hash: str, appointment_id: str) -> None:
        self._c.execute("INSERT INTO idempotency_keys (platform, key, request_hash, appointment_id, created)"
                        " VALUES (?, ?, ?, ?, ?)", (platform, key, request_hash, appointment_id, self.now))

    def appointment_by_identifier(self, platform: str, system: str, value: str) -> str | None:
        row = self._c.execute("SELECT appointment_id FROM appointment_identifiers"
                              " WHERE platform = ? AND system = ? AND value = ?", (platform, system, value)).fetchone()
        return row[0] if row else None

    def add_appointment_identifier(self, platform: str, system: str, value: str, appointment_id: str) -> None:
        self._c.execute("INSERT INTO appointment_identifiers (platform, system, value, appointment_id)"
                        " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING", (platform, system, value, appointment_id))

    def appointment_identifiers(self, appointment_id: str) -> list[tuple[str, str]]:
        cur = self._c.execute("SELECT system, value FROM appointment_identifiers WHERE appointment_id = ?"
                              " ORDER BY rowid", (appointment_id,))
        return [(r[0], r[1]) for r in cur]

    # -- quotas ----------------------------------------------------------------------------------------------
    def slots_on_day(self, schedule_id: str, day: str) -> int:
        """How many slots the schedule has on ``day`` (YYYYMMDD, hospital time), whatever their status."""
        return self._c.execute(
            "SELECT count(*) FROM slots WHERE schedule_id = ? AND start_local BETWEEN ? AND ?",
            (schedule_id, day + "0000", day + "9999"),
        ).fetchone()[0]

    def active_appointments_on_day(self, platform: str, schedule_id: str, day: str) -> int:
        """The platform's pending and booked appointments on the schedule's slots of ``day``."""
        return self._c.execute(
            "SELECT count(*) FROM appointments a JOIN slots s ON s.id = a.slot_id"
            " WHERE a.platform = ? AND a.status IN ('pending', 'booked')"
            " AND s.schedule_id = ? AND s.start_local BETWEEN ? AND ?",
            (platform, schedule_id, day + "0000", day + "9999"),
        ).fetchone()[0]

    # -- prescriptions ---------------------------------------------------------------------------------------
    def insert_prescription(self, *, id: str, direction: str, platform: str, number: str, status: str,
                            payload: bytes, jws: str | None = None, signature: str | None = None,
                            message_id: int | None = None, record: str | None = None) -> None:
        self._c.execute(
            "INSERT INTO prescriptions (id, direction, platform, number, status, payload, jws, signature,"
            " message_id, record, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (id, direction, platform, number, status, payload, jws, signature, message_id, record, self.now,
             self.now),
        )

    def prescription(self, prescription_id: str) -> PrescriptionRow | None:
        cur = self._c.execute("SELECT * FROM prescriptions WHERE id = ?", (prescription_id,))
        return load(PrescriptionRow, cur.fetchone())

    def prescription_by_number(self, direction: str, platform: str, number: str) -> PrescriptionRow | None:
        cur = self._c.execute("SELECT * FROM prescriptions WHERE direction = ? AND platform = ? AND number = ?",
                              (direction, platform, number))
        return load(PrescriptionRow, cur.fetchone())

    def prescription_for_message(self, message_id: int) -> PrescriptionRow | None:
        cur = self._c.execute("SELECT * FROM prescriptions WHERE message_id = ?", (message_id,))
        return load(PrescriptionRow, cur.fetchone())

    def update_prescription(self, prescription_id: str, **changes: Any) -> None:
        cols = _assignments(changes, "prescription", {"status", "outcome", "message_id"})
        self._c.execute(f"UPDATE prescriptions SET {cols}, version = version + 1, updated = ? WHERE id = ?",
                        (*changes.values(), self.now, prescription_id))

    def keep_prescription_record(self, prescription_id: str, record: str) -> None:
        """The domain's record of a prescription committed before schema v6, read once from its request (not a
        change a reader sees: its version stays)."""
        self._c.execute("UPDATE prescriptions SET record = ? WHERE id = ? AND record IS NULL", (record, prescription_id))

    def claim_prescription(self, prescription_id: str, platform: str) -> bool:
        """One statement, so of two pharmacies claiming at once exactly one wins (SQLite has one writer)."""
        cur = self._c.execute(
            "UPDATE prescriptions SET status = 'claimed', claimed_by = ?, claimed_at = ?, version = version + 1,"
            " updated = ? WHERE id = ? AND direction = 'released' AND status = 'active'",
            (platform, self.now, self.now, prescription_id))
        return cur.rowcount == 1

    def insert_medication_request(self, *, id: str, prescription_id: str, seq: int, status: str,
                                  resource: str, his_order: str | None = None) -> None:
        self._c.execute(
            "INSERT INTO medication_requests (id, prescription_id, seq, his_order, status, resource, updated)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)", (id, prescription_id, seq, his_order, status, resource, self.now))

    def medication_request(self, request_id: str) -> MedicationRequestRow | None:
        cur = self._c.execute("SELECT * FROM medication_requests WHERE id = ?", (request_id,))
        return load(MedicationRequestRow, cur.fetchone())

    def medication_requests_of(self, prescription_id: str) -> list[MedicationRequestRow]:
        cur = self._c.execute("SELECT * FROM medication_requests WHERE prescription_id = ? ORDER BY seq",
                              (prescription_id,))
        return [load(MedicationRequestRow, r) for r in cur.fetchall()]

    def update_medication_request(self, request_id: str, **changes: Any) -> None:
        cols = _assignments(changes, "medication request", {"status", "resource", "his_order"})
        self._c.execute(f"UPDATE medication_requests SET {cols}, updated = ? WHERE id = ?",
                        (*changes.values(), self.now, request_id))

    def add_dispense(self, *, id: str, medication_request: str, prescription_id: str, his_dispense: str,
                     resource: str, control_id: str) -> bool:
        """False when the HIS's dispense id is known already (a resent RDS adds nothing)."""
        cur = self._c.execute(
            "INSERT INTO medication_dispenses (id, medication_request, prescription_id, his_dispense,"
            " resource, control_id, created) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (id, medication_request, prescription_id, his_dispense, resource, control_id, self.now))
        return cur.rowcount == 1

    def dispenses_for(self, request_id: str) -> list[DispenseRow]:
        cur = self._c.execute("SELECT * FROM medication_dispenses WHERE medication_request = ? ORDER BY created, id",
                              (request_id,))
        return [load(DispenseRow, r) for r in cur.fetchall()]

    # -- audit ---------------------------------------------------------------------------------------------
    def audit_chain(self) -> AuditChain:
        row = self._c.execute(
            "SELECT anchor_seq, anchor_hash, head_seq, head_hash FROM audit_chain WHERE id = 1").fetchone()
        return AuditChain(*row)

    def append_audit(self, row: AuditRow) -> None:
        """Append a record and move the head to it (the caller computed its hash from the head's)."""
        self._c.execute(
            "INSERT INTO audit_records (seq, at_us, platform, subject, serial, source, action, resource_type,"
            " resource_id, outcome, detail, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (row.seq, row.at_us, row.platform, row.subject, row.serial, row.source, row.action,
             row.resource_type, row.resource_id, row.outcome, row.detail, row.hash),
        )
        self._c.execute("UPDATE audit_chain SET head_seq = ?, head_hash = ? WHERE id = 1", (row.seq, row.hash))

    def audit_record(self, seq: int) -> AuditRow | None:
        return load(AuditRow, self._c.execute("SELECT * FROM audit_records WHERE seq = ?", (seq,)).fetchone())

    def first_audit_seq_from(self, at_us: int) -> int | None:
        """The first record (in chain order) written at or after ``at_us``."""
        row = self._c.execute("SELECT min(seq) FROM audit_records WHERE at_us >= ?", (at_us,)).fetchone()
        return row[0]

    def prune_audit(self, through_seq: int, anchor_hash: str) -> int:
        """Move the anchor to record ``through_seq`` (whose hash is ``anchor_hash``) and delete it and every
        record before it; returns how many were deleted."""
        self._c.execute("UPDATE audit_chain SET anchor_seq = ?, anchor_hash = ? WHERE id = 1",
                        (through_seq, anchor_hash))
        return self._c.execute("DELETE FROM audit_records WHERE seq <= ?", (through_seq,)).rowcount

    def audit_key(self) -> bytes:
        """The key of the audit's keyed names (schema v4: generated in the chamber, never changed)."""
        return self._c.execute("SELECT key FROM chamber_keys WHERE name = 'audit-ids'").fetchone()[0]

    def holds(self, resource_type: str, resource_id: str) -> bool:
        """Whether the chamber holds a resource of this type with this id: one the gateway issued (an
        appointment, a prescription's requests and dispenses) or a slot or schedule the HIS published."""
        table = _RESOURCE_TABLES.get(resource_type)
        return table is not None and self._c.execute(
            f"SELECT 1 FROM {table} WHERE id = ?", (resource_id,)).fetchone() is not None

    # -- operators -------------------------------------------------------------------------------------------
    def purge_dead(self, older_than: float) -> int:
        """Delete dead-lettered messages (and their stories) last changed before ``older_than``."""
        return self._delete_messages([r[0] for r in self._c.execute(
            "SELECT id FROM messages WHERE state = 'dead' AND updated < ?", (older_than,))])

    def _delete_messages(self, ids: list[int]) -> int:
        rows = [(i,) for i in ids]
        self._c.executemany("DELETE FROM message_events WHERE message_id = ?", rows)
        self._c.executemany("DELETE FROM messages WHERE id = ?", rows)
        return len(ids)

    # -- retention (gateway/chamber/retention.py): what the chamber no longer needs to keep ----------------------------
    def prune_messages(self, ended_before: float, limit: int) -> int:
        """Delete up to ``limit`` messages that ended (delivered, refused, withdrawn) before ``ended_before``,
        with their stories, oldest first.  Dead letters wait for an operator; a prescription's order stays
        with its prescription."""
        return self._delete_messages([r[0] for r in self._c.execute(
            "SELECT id FROM messages WHERE state IN ('delivered', 'refused', 'withdrawn') AND updated < ?"
            " AND id NOT IN (SELECT message_id FROM prescriptions WHERE message_id IS NOT NULL)"
            " ORDER BY id LIMIT ?", (ended_before, limit))])

    def prune_appointments(self, slot_ended_before: float, limit: int) -> int:
        """Delete up to ``limit`` settled appointments (booked, cancelled, refused; nothing awaited from the
        HIS) whose slot ended before ``slot_ended_before``, with the platform's request as sent, their
        idempotency keys and identifiers."""
        rows = [(r[0],) for r in self._c.execute(
            "SELECT a.id FROM appointments a JOIN slots s ON s.id = a.slot_id WHERE s.end_ts < ?"
            " AND a.status IN ('booked', 'cancelled', 'refused') AND a.pending_change IS NULL LIMIT ?",
            (slot_ended_before, limit))]
        for table in ("platform_requests", "idempotency_keys", "appointment_identifiers"):
            self._c.executemany(f"DELETE FROM {table} WHERE appointment_id = ?", rows)
        self._c.executemany("DELETE FROM appointment_versions WHERE id = ?", rows)
        self._c.executemany("DELETE FROM appointments WHERE id = ?", rows)
        return len(rows)

    def prune_slots(self, ended_before: float, limit: int) -> int:
        """Delete up to ``limit`` slots that ended before ``ended_before`` and no appointment refers to."""
        return self._c.execute(
            "DELETE FROM slots WHERE id IN (SELECT id FROM slots WHERE end_ts < ?"
            " AND id NOT IN (SELECT slot_id FROM appointments) LIMIT ?)", (ended_before, limit)).rowcount

    # -- OAuth2 client credentials (adapters/outer/oauth.py; tables oauth_assertions, oauth_tokens) ---------------------
    def remember_assertion(self, platform: str, jti: str, keep_until: float) -> bool:
        """Record that ``platform`` used the client assertion ``jti``; False when it was used already."""
        return self._c.execute(
            "INSERT INTO oauth_assertions (platform, jti, expires) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
            (platform, jti, keep_until)).rowcount == 1

    def add_access_token(self, token_sha256: str, platform: str, scopes: str, expires: float) -> None:
        """Store an issued access token by its SHA-256 (hex) only, never the token itself."""
        self._c.execute("INSERT INTO oauth_tokens (token_sha256, platform, scopes, expires) VALUES (?, ?, ?, ?)",
                        (token_sha256, platform, scopes, expires))

    def access_token(self, token_sha256: str) -> tuple[str, str, float] | None:
        """(platform, space-separated scopes, expires) of the token with this SHA-256, or None."""
        row = self._c.execute("SELECT platform, scopes, expires FROM oauth_tokens WHERE token_sha256 = ?",
                              (token_sha256,)).fetchone()
        return (row[0], row[1], row[2]) if row else None

    def prune_oauth(self, now: float, keep_expired_tokens: float = 0.0) -> tuple[int, int]:
        """Forget assertions whose jti can no longer be replayed (expired before ``now``) and tokens expired
        more than ``keep_expired_tokens`` seconds ago; returns how many of each were deleted."""
        assertions = self._c.execute("DELETE FROM oauth_assertions WHERE expires < ?", (now,)).rowcount
        tokens = self._c.execute("DELETE FROM oauth_tokens WHERE expires < ?", (now - keep_expired_tokens,)).rowcount
        return assertions, tokens


    # -- subscriptions and notifications (gateway/domain/notifications.py) -----------------------------------
    def subscribed_topics(self) -> set[str]:
        """The topics with an active subscription (the chamber caches them between transactions while no other
        connection commits and no subscription changes)."""
        if self._topics is None:
            def load() -> set[str]:
                return {r[0] for r in self._c.execute("SELECT DISTINCT topic FROM subscriptions WHERE status = 'active'")}
            # (not cached while this transaction's own subscription changes are uncommitted)
            self._topics = self._known_topics(load) if self._known_topics is not None \
                and not self._changed_subscriptions else load()
        return self._topics

    def _subscriptions_changed(self) -> None:
        self._topics, self._changed_subscriptions = None, True
        if self._forget_topics is not None:
            self._forget_topics()

    def subscriptions_to(self, topic: str) -> list[SubscriptionRow]:
        """Every platform's active subscriptions to ``topic``."""
        return [load(SubscriptionRow, r) for r in self._c.execute(
            "SELECT * FROM subscriptions WHERE topic = ? AND status = 'active' ORDER BY created, id", (topic,))]

    def add_subscription(self, *, id: str, platform: str, topic: str, payload: str,
                         heartbeat: float | None = None, handshake: bool = False) -> None:
        """A new active subscription; with ``handshake``, its handshake (event 0) pending, due now."""
        self._subscriptions_changed()
        self._c.execute("INSERT INTO subscriptions (id, platform, topic, payload, status, events, heartbeat, created,"
                        " updated) VALUES (?, ?, ?, ?, 'active', 0, ?, ?, ?)",
                        (id, platform, topic, payload, heartbeat, self.now, self.now))
        if handshake:
            self._c.execute("INSERT INTO notifications (subscription_id, event, platform, focus, what, state, attempts,"
                            " next_attempt, created, updated) VALUES (?, 0, ?, '', 'handshake', 'pending', 0, ?, ?, ?)",
                            (id, platform, self.now, self.now, self.now))

    def subscription(self, subscription_id: str) -> SubscriptionRow | None:
        return load(SubscriptionRow, self._c.execute("SELECT * FROM subscriptions WHERE id = ?",
                                                     (subscription_id,)).fetchone())

    def subscriptions_of(self, platform: str, topic: str | None = None, *,
                         active_only: bool = True) -> list[SubscriptionRow]:
        sql, args = "SELECT * FROM subscriptions WHERE platform = ?", [platform]
        if topic is not None:
            sql, args = sql + " AND topic = ?", args + [topic]
        if active_only:
            sql += " AND status = 'active'"
        return [load(SubscriptionRow, r) for r in self._c.execute(sql + " ORDER BY created, id", args)]

    def heartbeat_subscriptions(self) -> list[SubscriptionRow]:
        """Active subscriptions that asked for heartbeats."""
        return [load(SubscriptionRow, r) for r in self._c.execute(
            "SELECT * FROM subscriptions WHERE status = 'active' AND heartbeat IS NOT NULL")]

    def subscriptions_open(self) -> list[SubscriptionRow]:
        """Subscriptions that are active or still have pending notifications."""
        return [load(SubscriptionRow, r) for r in self._c.execute(
            "SELECT * FROM subscriptions WHERE status = 'active' OR id IN (SELECT subscription_id FROM notifications"
            " WHERE state = 'pending') ORDER BY created, id")]

    def dead_letter_pending(self, subscription_id: str, reason: str) -> int:
        """Mark the subscription's pending notifications dead, with ``reason``; how many."""
        return self._c.execute("UPDATE notifications SET state = 'dead', last_error = ?, updated = ?"
                               " WHERE subscription_id = ? AND state = 'pending'",
                               (reason, self.now, subscription_id)).rowcount

    def notifications_in(self, state: str | None = None, platform: str | None = None,
                         limit: int = 50) -> list[NotificationRow]:
        """Notifications (of every subscription), the latest change first."""
        sql, args = "SELECT * FROM notifications WHERE 1 = 1", []
        for column, value in (("state", state), ("platform", platform)):
            if value is not None:
                sql, args = sql + f" AND {column} = ?", args + [value]
        return [load(NotificationRow, r) for r in self._c.execute(
            sql + " ORDER BY updated DESC, subscription_id, event LIMIT ?", [*args, limit])]

    def purge_dead_notifications(self, before: float) -> int:
        """Delete dead notifications last changed before ``before``."""
        return self._c.execute("DELETE FROM notifications WHERE state = 'dead' AND updated < ?", (before,)).rowcount

    def end_subscription(self, subscription_id: str) -> None:
        self._subscriptions_changed()
        self._c.execute("UPDATE subscriptions SET status = 'off', updated = ? WHERE id = ?",
                        (self.now, subscription_id))

    def add_notification(self, subscription_id: str, *, platform: str, focus: str, what: str) -> int:
        """The subscription's next notification (pending, due now); returns its event number."""
        event = self._c.execute("UPDATE subscriptions SET events = events + 1, updated = ? WHERE id = ?"
                                " RETURNING events", (self.now, subscription_id)).fetchone()[0]
        self._c.execute("INSERT INTO notifications (subscription_id, event, platform, focus, what, state, attempts,"
                        " next_attempt, created, updated) VALUES (?, ?, ?, ?, ?, 'pending', 0, ?, ?, ?)",
                        (subscription_id, event, platform, focus, what, self.now, self.now, self.now))
        return event

    def notification(self, subscription_id: str, event: int) -> NotificationRow | None:
        return load(NotificationRow, self._c.execute(
            "SELECT * FROM notifications WHERE subscription_id = ? AND event = ?", (subscription_id, event)).fetchone())

    def notifications_of(self, subscription_id: str, first: int = 1, last: int | None = None,
                         limit: int = 100) -> list[NotificationRow]:
        """The subscription's notifications with event numbers first..last, in order."""
        return [load(NotificationRow, r) for r in self._c.execute(
            "SELECT * FROM notifications WHERE subscription_id = ? AND event >= ? AND event <= ?"
            " ORDER BY event LIMIT ?", (subscription_id, first, last if last is not None else 1 << 62, limit))]

    def notification_heads(self, limit: int = 1000) -> list[NotificationRow]:
        """Each subscription's first pending notification (its order is kept: the next waits for it), the
        soonest due first."""
        return [load(NotificationRow, r) for r in self._c.execute(
            "SELECT n.* FROM notifications n JOIN (SELECT subscription_id, MIN(event) AS event FROM notifications"
            " WHERE state = 'pending' GROUP BY subscription_id) f USING (subscription_id, event)"
            " ORDER BY n.next_attempt LIMIT ?", (limit,))]

    def prune_notifications(self, delivered_before: float, limit: int) -> int:
        """Delete notifications delivered before ``delivered_before`` (never a pending or dead one)."""
        return self._c.execute(
            "DELETE FROM notifications WHERE (subscription_id, event) IN (SELECT subscription_id, event"
            " FROM notifications WHERE state = 'delivered' AND updated < ? LIMIT ?)", (delivered_before, limit)).rowcount

    def set_notification_state(self, subscription_id: str, event: int, state: str, *, attempts: int,
                               next_attempt: float, last_error: str | None = None) -> None:
        self._c.execute("UPDATE notifications SET state = ?, attempts = ?, next_attempt = ?, last_error = ?,"
                        " updated = ? WHERE subscription_id = ? AND event = ?",
                        (state, attempts, next_attempt, last_error, self.now, subscription_id, event))
