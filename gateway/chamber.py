"""The chamber: the durable store between the two gates of the lock.

A message enters through one gate, is committed here, and only then leaves by the other gate.  Nothing
is answered (HL7 ACK, HTTP status) before the transaction that recorded it has committed.

Design:

- One SQLite file in WAL mode with ``synchronous=FULL`` (a commit is on disk when COMMIT returns).
- Writes go through :meth:`Chamber.transact`: the work function is queued and all work queued in one
  reactor turn runs in a single transaction (group commit), each function inside its own SAVEPOINT so a
  function that raises undoes only its own writes.  The returned Deferred fires with the function's
  result (or its exception) only after COMMIT has returned.  A failed COMMIT fails every function of the
  batch: nothing is acknowledged that is not on disk.
- Reads (:meth:`Chamber.read`) see committed state only.
- SQL lives in this module only: services compose the :class:`Txn` primitives and make the decisions.

The schema is versioned: ``gateway/schema/chamber-v1.sql`` and one ``upgrade-v<N>-v<N+1>.sql`` per later
version. A new chamber runs them all, an older one the upgrades it lacks — each case in one transaction, so a
crash leaves the file at the old version or the new one, never between. The version this code needs is
``SCHEMA_VERSION`` (1 + the number of upgrade files); a chamber newer than that is refused, not touched.
"""

from __future__ import annotations

import json
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import structlog
from twisted.internet import defer

from gateway.errors import ChamberError, ChamberWriteError  # noqa: F401 (re-exported)

log = structlog.get_logger("gateway.chamber")

SCHEMA_DIR = Path(__file__).with_name("schema")


def _upgrades() -> list[Path]:
    """The upgrade scripts, in order; they must form an unbroken chain v1 -> v2 -> ... ."""
    files = sorted(SCHEMA_DIR.glob("upgrade-v*-v*.sql"), key=lambda p: int(p.stem.split("-v")[1]))
    for n, path in enumerate(files, start=1):
        if path.name != f"upgrade-v{n}-v{n + 1}.sql":
            raise RuntimeError(f"schema upgrades are not a chain: expected upgrade-v{n}-v{n + 1}.sql, "
                               f"found {path.name}")
    return files


SCHEMA_VERSION = 1 + len(_upgrades())


def _statements(script: str) -> Iterable[str]:
    """A schema script's statements, one by one (triggers' bodies included), so they can run inside a
    transaction this module controls (``executescript`` would COMMIT first)."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            if pending.strip():
                yield pending
            pending = ""
    if pending.strip() and not all(l.strip().startswith("--") or not l.strip() for l in pending.splitlines()):
        raise RuntimeError(f"a schema script ends in an incomplete statement: {pending.strip()[:80]}")

T = TypeVar("T")




# ---------------------------------------------------------------------------------------------------------
# rows


@dataclass(frozen=True)
class MessageRow:
    id: int
    direction: str
    peer: str
    sender: str  # inbound: MSH-3 and MSH-4 as sent (with control_id, the message's identity); outbound: ''
    control_id: str
    type: str
    state: str
    body: bytes
    charset: str
    subject: str | None
    order_key: str | None
    attempts: int
    next_attempt: float | None
    answer_code: str | None
    answer_text: str | None
    last_error: str | None
    created: float
    updated: float


@dataclass(frozen=True)
class ScheduleRow:
    id: str
    display: str
    practitioner_id: str
    practitioner_name: str
    department_code: str
    department_name: str
    updated: float
    facility: str = ""  # MSH-4.1 of the message that published it (schema v3)


@dataclass(frozen=True)
class SlotRow:
    id: str
    schedule_id: str
    start_local: str
    start_ts: float
    end_ts: float
    minutes: int
    service_code: str
    service_text: str
    his_status: str
    his_appointment: str | None
    held_by: str | None
    booked_by: str | None
    updated: float
    z_segments: str | None = None  # the HIS's Z-segments of its last publication, CR-separated ER7 (schema v3)

    @property
    def visible_status(self) -> str:
        """The FHIR Slot.status a platform sees."""
        if self.held_by:
            return "busy-tentative"
        return self.his_status


@dataclass(frozen=True)
class AppointmentRow:
    id: str
    platform: str
    slot_id: str
    status: str
    patient: dict
    description: str | None
    his_appointment: str | None
    hold_expires: float | None
    outcome: str | None
    pending_change: str | None
    version: int
    created: float
    updated: float
    replaces: str | None = None  # the booked appointment this one moves (rescheduling: cancel + new)


@dataclass(frozen=True)
class AuditRow:
    """One audit record (see gateway/audit.py for what it means and how it is chained)."""

    seq: int
    at_us: int
    platform: str | None
    subject: str | None
    serial: str | None
    source: str | None
    action: str
    resource_type: str | None
    resource_id: str | None
    outcome: int
    detail: str | None
    hash: str


@dataclass(frozen=True)
class AuditChain:
    """The chain's ends: the anchor (last pruned record, or seq 0 and the genesis hash) and the head."""

    anchor_seq: int
    anchor_hash: str
    head_seq: int
    head_hash: str


@dataclass(frozen=True)
class PrescriptionRow:
    id: str
    direction: str  # to_his | released
    platform: str
    number: str
    status: str
    outcome: str | None
    payload: bytes
    jws: str | None
    signature: str | None
    message_id: int | None
    claimed_by: str | None
    claimed_at: float | None
    version: int
    created: float
    updated: float


@dataclass(frozen=True)
class MedicationRequestRow:
    id: str
    prescription_id: str
    seq: int
    his_order: str | None
    status: str
    resource: str
    updated: float


@dataclass(frozen=True)
class DispenseRow:
    id: str
    medication_request: str
    prescription_id: str
    his_dispense: str
    resource: str
    control_id: str
    created: float


def _row(cls, row: sqlite3.Row | None):
    if row is None:
        return None
    values = dict(row)
    if cls is AppointmentRow:
        values["patient"] = json.loads(values["patient"])
    return cls(**values)


# ---------------------------------------------------------------------------------------------------------
# transaction primitives


#: FHIR resource type -> the table holding resources of that type (by id)
_RESOURCE_TABLES = {"Appointment": "appointments", "Slot": "slots", "Schedule": "schedules",
                    "MedicationRequest": "medication_requests", "MedicationDispense": "medication_dispenses"}


class Txn:
    """What a unit of work may do inside a chamber transaction.  Each method is one statement or two."""

    def __init__(self, conn: sqlite3.Connection, now: float, *,
                 known_schedules: Callable[[], dict[str, tuple]] | None = None):
        self._c = conn
        self.now = now
        self.settled: list[str] = []  # appointments whose pending change this transaction cleared
        self.queue_changed = False  # an outbound message queued, or a message's state changed
        self._known_schedules = known_schedules  # -> schedules known as committed: id -> fields (None: no cache)
        self._known: dict[str, tuple] | None = None
        self.written_schedules: dict[str, tuple] = {}  # schedules this transaction wrote: id -> fields

    # -- messages ------------------------------------------------------------------------------------------
    def message(self, message_id: int) -> MessageRow | None:
        return _row(MessageRow, self._c.execute("SELECT * FROM messages WHERE id = ?", (message_id,)).fetchone())

    def message_by_control_id(self, direction: str, peer: str, control_id: str,
                              sender: str = "") -> MessageRow | None:
        """The message ``sender`` numbered ``control_id`` ('': the gateway's own), to or from ``peer``."""
        cur = self._c.execute(
            "SELECT * FROM messages WHERE direction = ? AND peer = ? AND sender = ? AND control_id = ?",
            (direction, peer, sender, control_id),
        )
        return _row(MessageRow, cur.fetchone())

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
            "UPDATE messages SET body = ?, type = ?, charset = ?, updated = ? WHERE id = ? AND body = x''",
            (body, type, charset, self.now, message_id),
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
        return _row(MessageRow, cur.fetchone())

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
        return [_row(MessageRow, r) for r in cur]

    def messages_for_subject(self, subject: str) -> list[MessageRow]:
        cur = self._c.execute("SELECT * FROM messages WHERE subject = ? ORDER BY id", (subject,))
        return [_row(MessageRow, r) for r in cur]

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
        return _row(ScheduleRow, cur.fetchone())

    def slot(self, slot_id: str) -> SlotRow | None:
        return _row(SlotRow, self._c.execute("SELECT * FROM slots WHERE id = ?", (slot_id,)).fetchone())

    def slot_by_his_appointment(self, his_appointment: str) -> SlotRow | None:
        cur = self._c.execute("SELECT * FROM slots WHERE his_appointment = ?", (his_appointment,))
        return _row(SlotRow, cur.fetchone())

    def insert_slot(self, row: SlotRow, *, or_update: bool = False, publication: bool = False) -> None:
        """Insert a slot.  ``or_update``: if it exists, update what the HIS says about it instead (times,
        service, HIS status and appointment; not our hold or booking) — one statement, no lookup before.
        ``publication``: the HIS published the slot (open/blocked), so its Z-segments are updated too."""
        self._c.execute(
            "INSERT INTO slots (id, schedule_id, start_local, start_ts, end_ts, minutes, service_code,"
            " service_text, his_status, his_appointment, held_by, booked_by, z_segments, updated)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            + (" ON CONFLICT (id) DO UPDATE SET start_ts = excluded.start_ts, end_ts = excluded.end_ts,"
               " minutes = excluded.minutes, service_code = excluded.service_code,"
               " service_text = excluded.service_text, his_status = excluded.his_status,"
               " his_appointment = excluded.his_appointment, updated = excluded.updated"
               + (", z_segments = excluded.z_segments" if publication else "") if or_update else ""),
            (row.id, row.schedule_id, row.start_local, row.start_ts, row.end_ts, row.minutes,
             row.service_code, row.service_text, row.his_status, row.his_appointment, row.held_by,
             row.booked_by, row.z_segments, self.now),
        )

    def update_slot(self, slot_id: str, **changes: Any) -> None:
        allowed = {"start_ts", "end_ts", "minutes", "service_code", "service_text", "his_status",
                   "his_appointment", "held_by", "booked_by", "z_segments"}
        unknown = set(changes) - allowed
        if unknown:
            raise ValueError(f"not slot columns: {sorted(unknown)}")
        cols = ", ".join(f"{k} = ?" for k in changes)
        self._c.execute(
            f"UPDATE slots SET {cols}, updated = ? WHERE id = ?", (*changes.values(), self.now, slot_id)
        )

    # -- appointments --------------------------------------------------------------------------------------
    def appointment(self, appointment_id: str) -> AppointmentRow | None:
        cur = self._c.execute("SELECT * FROM appointments WHERE id = ?", (appointment_id,))
        return _row(AppointmentRow, cur.fetchone())

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
        allowed = {"status", "slot_id", "his_appointment", "hold_expires", "outcome", "pending_change", "patient"}
        unknown = set(changes) - allowed
        if unknown:
            raise ValueError(f"not appointment columns: {sorted(unknown)}")
        if "patient" in changes:  # a hold gets its patient when it is booked ($book)
            changes["patient"] = json.dumps(changes["patient"], ensure_ascii=False)
        cols = ", ".join(f"{k} = ?" for k in changes)
        self._c.execute(
            f"UPDATE appointments SET {cols}, version = version + 1, updated = ? WHERE id = ?",
            (*changes.values(), self.now, appointment_id),
        )
        if "pending_change" in changes:  # after COMMIT: Chamber.observe_settled
            if changes["pending_change"] is None:
                self.settled.append(appointment_id)
            elif appointment_id in self.settled:  # waiting for the HIS again after all
                self.settled = [i for i in self.settled if i != appointment_id]

    def expired_holds(self, now: float) -> list[AppointmentRow]:
        cur = self._c.execute(
            "SELECT * FROM appointments WHERE status = 'pending' AND hold_expires IS NOT NULL"
            " AND hold_expires <= ? ORDER BY hold_expires",
            (now,),
        )
        return [_row(AppointmentRow, r) for r in cur]


    def outbound_backlog(self, peer: str) -> int:
        cur = self._c.execute(
            "SELECT count(*) FROM messages WHERE direction = 'outbound' AND peer = ?"
            " AND state IN ('committed', 'sending', 'retrying')",
            (peer,),
        )
        return cur.fetchone()[0]

    def keep_request(self, appointment_id: str, body: bytes) -> None:
        self._c.execute("INSERT OR IGNORE INTO platform_requests (appointment_id, received, body) VALUES (?, ?, ?)",
                        (appointment_id, self.now, body))

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
        self._c.execute("INSERT OR IGNORE INTO appointment_identifiers (platform, system, value, appointment_id)"
                        " VALUES (?, ?, ?, ?)", (platform, system, value, appointment_id))

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
                            message_id: int | None = None) -> None:
        self._c.execute(
            "INSERT INTO prescriptions (id, direction, platform, number, status, payload, jws, signature,"
            " message_id, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (id, direction, platform, number, status, payload, jws, signature, message_id, self.now, self.now),
        )

    def prescription(self, prescription_id: str) -> PrescriptionRow | None:
        cur = self._c.execute("SELECT * FROM prescriptions WHERE id = ?", (prescription_id,))
        return _row(PrescriptionRow, cur.fetchone())

    def prescription_by_number(self, direction: str, platform: str, number: str) -> PrescriptionRow | None:
        cur = self._c.execute("SELECT * FROM prescriptions WHERE direction = ? AND platform = ? AND number = ?",
                              (direction, platform, number))
        return _row(PrescriptionRow, cur.fetchone())

    def prescription_for_message(self, message_id: int) -> PrescriptionRow | None:
        cur = self._c.execute("SELECT * FROM prescriptions WHERE message_id = ?", (message_id,))
        return _row(PrescriptionRow, cur.fetchone())

    def update_prescription(self, prescription_id: str, **changes: Any) -> None:
        allowed = {"status", "outcome", "message_id"}
        if set(changes) - allowed:
            raise ValueError(f"not prescription columns: {sorted(set(changes) - allowed)}")
        cols = ", ".join(f"{k} = ?" for k in changes)
        self._c.execute(f"UPDATE prescriptions SET {cols}, version = version + 1, updated = ? WHERE id = ?",
                        (*changes.values(), self.now, prescription_id))

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
        return _row(MedicationRequestRow, cur.fetchone())

    def medication_requests_of(self, prescription_id: str) -> list[MedicationRequestRow]:
        cur = self._c.execute("SELECT * FROM medication_requests WHERE prescription_id = ? ORDER BY seq",
                              (prescription_id,))
        return [_row(MedicationRequestRow, r) for r in cur.fetchall()]

    def update_medication_request(self, request_id: str, **changes: Any) -> None:
        allowed = {"status", "resource", "his_order"}
        if set(changes) - allowed:
            raise ValueError(f"not medication request columns: {sorted(set(changes) - allowed)}")
        cols = ", ".join(f"{k} = ?" for k in changes)
        self._c.execute(f"UPDATE medication_requests SET {cols}, updated = ? WHERE id = ?",
                        (*changes.values(), self.now, request_id))

    def add_dispense(self, *, id: str, medication_request: str, prescription_id: str, his_dispense: str,
                     resource: str, control_id: str) -> bool:
        """False when the HIS's dispense id is known already (a resent RDS adds nothing)."""
        cur = self._c.execute(
            "INSERT OR IGNORE INTO medication_dispenses (id, medication_request, prescription_id, his_dispense,"
            " resource, control_id, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (id, medication_request, prescription_id, his_dispense, resource, control_id, self.now))
        return cur.rowcount == 1

    def dispenses_for(self, request_id: str) -> list[DispenseRow]:
        cur = self._c.execute("SELECT * FROM medication_dispenses WHERE medication_request = ? ORDER BY created, id",
                              (request_id,))
        return [_row(DispenseRow, r) for r in cur.fetchall()]

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
        return _row(AuditRow, self._c.execute("SELECT * FROM audit_records WHERE seq = ?", (seq,)).fetchone())

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

    # -- retention (gateway/retention.py): what the chamber no longer needs to keep ----------------------------
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
        self._c.executemany("DELETE FROM appointments WHERE id = ?", rows)
        return len(rows)

    def prune_slots(self, ended_before: float, limit: int) -> int:
        """Delete up to ``limit`` slots that ended before ``ended_before`` and no appointment refers to."""
        return self._c.execute(
            "DELETE FROM slots WHERE id IN (SELECT id FROM slots WHERE end_ts < ?"
            " AND id NOT IN (SELECT slot_id FROM appointments) LIMIT ?)", (ended_before, limit)).rowcount

    def prune_expired_credentials(self, tokens_kept: float = 0.0) -> int:
        """Delete client assertions past the time a replay could matter, and access tokens ``tokens_kept``
        seconds after their expiry (until then a request with one is told it expired, not that it is
        unknown)."""
        assertions = self._c.execute("DELETE FROM oauth_assertions WHERE expires < ?", (self.now,)).rowcount
        tokens = self._c.execute("DELETE FROM oauth_tokens WHERE expires < ?", (self.now - tokens_kept,)).rowcount
        return assertions + tokens

    # -- OAuth2 client credentials (gateway/oauth.py; tables oauth_assertions, oauth_tokens) ---------------------
    def remember_assertion(self, platform: str, jti: str, keep_until: float) -> bool:
        """Record that ``platform`` used the client assertion ``jti``; False when it was used already."""
        return self._c.execute(
            "INSERT OR IGNORE INTO oauth_assertions (platform, jti, expires) VALUES (?, ?, ?)",
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


class Reader(Txn):
    """Read-only queries over committed state (used outside transactions)."""

    def settled_among(self, appointment_ids: list[str]) -> set[str]:
        """Which of these appointments await nothing from the HIS (or no longer exist)."""
        if not appointment_ids:
            return set()
        waiting: set[str] = set()
        for i in range(0, len(appointment_ids), 500):  # stay under SQLite's bound-parameter limit
            chunk = appointment_ids[i:i + 500]
            cur = self._c.execute(
                f"SELECT id FROM appointments WHERE pending_change IS NOT NULL AND id IN ({', '.join('?' * len(chunk))})",
                chunk,
            )
            waiting.update(r[0] for r in cur)
        return set(appointment_ids) - waiting

    def message_events(self, message_id: int) -> list[tuple[float, str, str | None]]:
        cur = self._c.execute(
            "SELECT at, state, detail FROM message_events WHERE message_id = ? ORDER BY rowid", (message_id,)
        )
        return [tuple(r) for r in cur]

    def messages(self, *, direction: str | None = None, state: str | None = None, peer: str | None = None,
                 limit: int = 100) -> list[MessageRow]:
        """The newest messages first, optionally of one direction, state and peer."""
        where, args = [], []
        for column, value in (("direction", direction), ("state", state), ("peer", peer)):
            if value:
                where.append(f"{column} = ?")
                args.append(value)
        sql = "SELECT * FROM messages" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        return [_row(MessageRow, r) for r in self._c.execute(sql, args)]

    def state_counts(self) -> dict[tuple[str, str, str], int]:
        """(direction, peer, state) -> number of messages."""
        cur = self._c.execute("SELECT direction, peer, state, count(*) FROM messages GROUP BY 1, 2, 3")
        return {(r[0], r[1], r[2]): r[3] for r in cur}

    def schedules(self, schedule_id: str | None = None) -> list[ScheduleRow]:
        if schedule_id is None:
            cur = self._c.execute("SELECT * FROM schedules ORDER BY id")
        else:
            cur = self._c.execute("SELECT * FROM schedules WHERE id = ?", (schedule_id,))
        return [_row(ScheduleRow, r) for r in cur]

    def search_slots(
        self,
        *,
        start_from: float | None = None,
        start_to: float | None = None,
        start_from_inclusive: bool = True,
        start_to_inclusive: bool = True,
        schedule_ids: Iterable[str] | None = None,
        service_codes: Iterable[str] | None = None,
        statuses: Iterable[str] | None = None,
        hidden: Iterable[tuple[str, str, float | None]] | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[SlotRow]:
        """``hidden``: (schedule id, day YYYYMMDD, cutoff) triples: free slots of that schedule and day
        starting after ``cutoff`` (any time, if None) are left out (a platform's quota is used up)."""
        where: list[str] = []
        args: list[Any] = []
        if start_from is not None:
            where.append("start_ts >= ?" if start_from_inclusive else "start_ts > ?")
            args.append(start_from)
        if start_to is not None:
            where.append("start_ts <= ?" if start_to_inclusive else "start_ts < ?")
            args.append(start_to)
        for column, values in (("schedule_id", schedule_ids), ("service_code", service_codes)):
            if values is not None:
                values = list(values)
                where.append(f"{column} IN ({', '.join('?' * len(values))})")
                args += values
        if statuses is not None:
            statuses = list(statuses)
            where.append(f"(CASE WHEN held_by IS NOT NULL THEN 'busy-tentative' ELSE his_status END)"
                         f" IN ({', '.join('?' * len(statuses))})")
            args += statuses
        hidden = list(hidden or ())
        if hidden:
            where.append(
                "NOT (held_by IS NULL AND his_status = 'free' AND EXISTS (SELECT 1 FROM json_each(?) h"
                " WHERE json_extract(h.value, '$[0]') = slots.schedule_id"
                " AND json_extract(h.value, '$[1]') = substr(slots.start_local, 1, 8)"
                " AND (json_extract(h.value, '$[2]') IS NULL OR slots.start_ts > json_extract(h.value, '$[2]'))))"
            )
            args.append(json.dumps(hidden))
        sql = "SELECT * FROM slots"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY start_ts, schedule_id LIMIT ? OFFSET ?"
        args += [limit, offset]
        return [_row(SlotRow, r) for r in self._c.execute(sql, args)]

    def appointments_for(self, platform: str, limit: int = 100) -> list[AppointmentRow]:
        cur = self._c.execute(
            "SELECT * FROM appointments WHERE platform = ? ORDER BY created DESC LIMIT ?", (platform, limit)
        )
        return [_row(AppointmentRow, r) for r in cur]

    def slot_counts_by_day(self, from_local: str) -> dict[tuple[str, str], int]:
        """(schedule id, day YYYYMMDD) -> number of slots, for days from ``from_local`` (YYYYMMDD) on."""
        cur = self._c.execute(
            "SELECT schedule_id, substr(start_local, 1, 8), count(*) FROM slots WHERE start_local >= ?"
            " GROUP BY 1, 2", (from_local + "0000",))
        return {(r[0], r[1]): r[2] for r in cur}

    def active_appointments_by_day(self, platform: str, from_local: str) -> dict[tuple[str, str], int]:
        """(schedule id, day) -> the platform's pending and booked appointments there, from ``from_local``."""
        cur = self._c.execute(
            "SELECT s.schedule_id, substr(s.start_local, 1, 8), count(*) FROM appointments a"
            " JOIN slots s ON s.id = a.slot_id WHERE a.platform = ? AND a.status IN ('pending', 'booked')"
            " AND s.start_local >= ? GROUP BY 1, 2", (platform, from_local + "0000"))
        return {(r[0], r[1]): r[2] for r in cur}

    def audit_records(self, after_seq: int = 0, since_us: int | None = None) -> Iterable[AuditRow]:
        """Records after ``after_seq`` (and written at or after ``since_us``) in chain order, streamed."""
        sql, args = "SELECT * FROM audit_records WHERE seq > ?", [after_seq]
        if since_us is not None:
            sql += " AND at_us >= ?"
            args.append(since_us)
        cur = self._c.execute(sql + " ORDER BY seq", args)
        for r in cur:
            yield _row(AuditRow, r)

    def next_hold_expiry(self) -> float | None:
        cur = self._c.execute(
            "SELECT min(hold_expires) FROM appointments WHERE status = 'pending' AND hold_expires IS NOT NULL"
        )
        return cur.fetchone()[0]

    def released_prescriptions(self, platform: str, after: float, limit: int,
                               after_id: str | None = None) -> list[PrescriptionRow]:
        """Released prescriptions a pharmacy may fill: unclaimed, or claimed by this pharmacy; changed after
        ``after`` (or, with ``after_id``, at ``after`` with a greater id: a page's cursor); oldest change
        first."""
        cur = self._c.execute(
            "SELECT * FROM prescriptions WHERE direction = 'released' AND (updated > ? OR (updated = ? AND id > ?))"
            " AND (status = 'active' OR (status = 'claimed' AND claimed_by = ?)) ORDER BY updated, id LIMIT ?",
            (after, after, after_id if after_id is not None else "\uffff", platform, limit))
        return [_row(PrescriptionRow, r) for r in cur.fetchall()]

    def counts(self) -> dict[str, int]:
        out = {}
        for table in ("messages", "schedules", "slots", "appointments", "audit_records"):
            out[table] = self._c.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        return out


# ---------------------------------------------------------------------------------------------------------
# the chamber

#: what statements on the read connection may do (sqlite3 authorizer actions): read, look at pragmas, and
#: BEGIN/ROLLBACK (the health probe takes the write lock and gives it back); never write
_READ_ACTIONS = frozenset({sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_PRAGMA,
                           sqlite3.SQLITE_TRANSACTION, sqlite3.SQLITE_RECURSIVE})
#: schedules remembered as committed (their fields), so an SIU that repeats them writes nothing; bounded
_KNOWN_SCHEDULES_MAX = 10_000


def _read_only(action, arg1, _arg2, _db, _trigger):
    if action in _READ_ACTIONS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_UPDATE and arg1 == "sqlite_master":  # json_each (an eponymous virtual table)
        return sqlite3.SQLITE_OK                                     # is set up on first use: not a write
    return sqlite3.SQLITE_DENY


def _commit(conn: sqlite3.Connection) -> None:
    """The COMMIT of a batch: the WAL write and its fsync.  (A function of its own so tests can slow it down
    or make it fail.)"""
    conn.execute("COMMIT")


#: how long a writer waits for the write lock another process holds (the split lock's other gate)
LOCK_WAIT = 5.0
#: COMMIT in the writer thread (pipelined group commit) by default?  Measured on the 2-core benchmark machine
#: (docs/benchmarks.md), it costs more than it gives: each hand-over to the thread and back is ~80 µs of
#: CPU (thread switches on that VM), and with two batches in flight the load splits into smaller batches
#: (more commits, each writing its pages to the WAL again) — -10% MLLP ingest, higher booking p99 at
#: 200/s; only bookings at saturation with ordering by patient gained (+10-20%).  So off by default; the
#: writer thread still waits for the other gate's write lock (split lock) off the reactor thread.
PIPELINE_COMMITS = False


def _busy(error: sqlite3.Error) -> bool:
    return getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY or "locked" in str(error)


def _begin_waiting(conn: sqlite3.Connection, timeout: float = LOCK_WAIT) -> None:
    """BEGIN IMMEDIATE on a connection that does not wait for locks itself (busy_timeout 0): retry every
    half millisecond while another process holds the write lock, up to ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as e:
            if not _busy(e) or time.monotonic() > deadline:
                raise
        time.sleep(0.0005)


def _wal_mode(conn: sqlite3.Connection, timeout: float = LOCK_WAIT) -> str:
    """``PRAGMA journal_mode = WAL`` (the resulting mode).  On a new file another process may be turning it
    into WAL or creating the schema at the same moment (the split lock's two gates start together); SQLite
    then answers "database is locked" at once, without waiting as busy_timeout says: try again, briefly."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.OperationalError as e:
            if not _busy(e) or time.monotonic() > deadline:
                raise
        time.sleep(0.01)


class _Batch:
    """The units of one transaction and what became of them (and, while it is in flight, of its COMMIT)."""

    __slots__ = ("units", "results", "failures", "settled", "schedules", "queue_changed", "needs_commit", "error",
                 "done", "waiting_for_lock")

    def __init__(self, units: list):
        self.units = units  # [(work, Deferred or None)]
        self.results: list = []
        self.failures: list = []
        self.settled: list[str] = []  # appointments whose pending change the batch cleared
        self.schedules: dict = {}  # schedules the batch wrote: id -> fields
        self.queue_changed = False  # it queued an outbound message or changed a message's state
        self.needs_commit = False  # BEGIN ran and at least one unit's writes are kept
        self.error: Exception | None = None  # the COMMIT failed
        self.done: threading.Event | None = None  # in flight: set when COMMIT (or its ROLLBACK) has returned
        self.waiting_for_lock = False  # in flight: the writer thread waits for BEGIN (another process's lock)


class _Committer:
    """The writer thread: runs each batch's COMMIT off the reactor thread, one batch at a time, and hands the
    batch back to the reactor thread (``callFromThread``) once COMMIT has returned.  It also waits for the
    write lock when another process holds it (BEGIN), so the reactor thread never sleeps on a lock."""

    def __init__(self, conn: sqlite3.Connection, reactor, on_done: Callable[[_Batch], None]):
        self._conn = conn
        self._reactor = reactor
        self._on_done = on_done
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="chamber-commit", daemon=True)
        self._thread.start()

    def submit(self, batch: _Batch) -> None:
        self._jobs.put(batch)

    def _run(self) -> None:
        while True:
            batch = self._jobs.get()
            if batch is None:
                return
            if batch.waiting_for_lock:
                try:
                    _begin_waiting(self._conn)
                except Exception as e:  # noqa: BLE001 - the batch cannot begin: it fails
                    batch.error = e
            else:
                try:
                    _commit(self._conn)
                except Exception as e:  # noqa: BLE001 - whatever it was, the batch is not on disk
                    batch.error = e
                    try:
                        self._conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
            batch.done.set()
            self._reactor.callFromThread(self._on_done, batch)

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join()


#: Copy the WAL back into the database file (a PASSIVE checkpoint) in the checkpoint thread, at most once per
#: this many seconds while anything is committed: the first commit after a checkpoint starts the wait, the
#: commits during it are copied together.  SQLite's default does it inside the COMMIT that takes the WAL past
#: 1,000 pages — on the reactor thread, with two more fsyncs: on the benchmark machine one commit in ~60 then
#: took 3-8 ms instead of ~0.4 ms (docs/benchmarks.md).  The thread's checkpoint runs beside the reactor and
#: never blocks it (PASSIVE takes no lock a writer or reader waits for).
CHECKPOINT_INTERVAL = 0.1
#: The writer connection's own (inline) checkpoint stays at SQLite's default size: when the WAL reaches it,
#: the thread has copied most of its pages already, so the inline one has little left to copy — and only after
#: a checkpoint on the writer's own thread does the next transaction start the WAL file over from its
#: beginning.  (Measured: a checkpoint every 16 commits with the inline one at 4,000 pages cost ~20% of the
#: MLLP ingest rate — the same hot pages copied and the file fsynced over and over, and a WAL that kept
#: growing, so that every fsync also wrote the file's new size.)
INLINE_CHECKPOINT_PAGES = 1000


class _Checkpointer:
    """The checkpoint thread: its own connection, a PASSIVE checkpoint CHECKPOINT_INTERVAL after the first
    commit the reactor thread reports since the last one.  sqlite3 releases the GIL while SQLite copies pages
    and fsyncs, so this runs on the other core.  A failed checkpoint (disk full) loses nothing — the pages stay
    in the WAL — and is logged; the next commit starts another."""

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn
        self._pending = False  # a checkpoint is due (set on the reactor thread, cleared by this one)
        self._wake = threading.Event()
        self._stopping = False
        self.runs = 0
        self._thread = threading.Thread(target=self._run, name="chamber-checkpoint", daemon=True)
        self._thread.start()

    def committed(self) -> None:
        """A commit returned (called on the reactor thread): one flag test, unless a checkpoint is to be due."""
        if not self._pending:
            self._pending = True
            self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            self._wake.wait(CHECKPOINT_INTERVAL)  # (the commits of this while are copied together; stop() wakes it)
            self._wake.clear()
            if self._stopping:
                return
            self._pending = False  # a commit from now on asks for the next checkpoint
            try:
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                self.runs += 1
            except sqlite3.Error as e:
                log.warning("chamber.checkpoint.failed", error=str(e))

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join()
        try:
            self._conn.close()
        except sqlite3.Error:
            pass


class Chamber:
    """The durable store.  Open with :meth:`open`; write with :meth:`transact`; read with :meth:`read`.

    With a reactor that runs threads (the real one) the chamber has a writer thread and two connections:

    - Reads (:meth:`read`) use a read-only connection of their own, which sees committed state only (WAL: a
      commit becomes visible once its fsync is done) and never waits for a writer.
    - The units of a batch run on the reactor thread inside BEGIN ... (so they see and decide on the
      current state).  If the other gate's process holds the write lock (split lock), the writer thread
      waits for it (BEGIN), not the reactor thread, which goes on reading and answering meanwhile.
    - Pipelined group commit (``pipeline``, default ``PIPELINE_COMMITS``): the reactor hands each batch's
      COMMIT — the WAL write and its fsync — to the writer thread and goes on reading, parsing and
      answering; what arrives meanwhile is queued and becomes the next batch, which starts when that COMMIT
      has returned.  Off by default (see PIPELINE_COMMITS for why); without it COMMIT runs on the reactor
      thread as before.

    Either way the units' Deferreds fire, and the observers run, on the reactor thread after COMMIT has
    returned; a failed COMMIT fails every unit of its batch; :meth:`close` waits for a COMMIT in flight.
    Without such a reactor (tests with a Clock, the CLI) or for ``:memory:``, one connection does everything,
    synchronously.  ``commit_in_thread`` forces either way (None: decide as above)."""

    def __init__(self, path: str | Path, *, reactor=None, clock: Callable[[], float] = time.time,
                 commit_in_thread: bool | None = None, pipeline: bool | None = None):
        self.path = str(path)
        self._reactor = reactor
        self._clock = clock
        self._commit_in_thread = commit_in_thread
        self.pipeline = pipeline  # COMMIT in the writer thread?  None: PIPELINE_COMMITS (read at each commit)
        self._writer: sqlite3.Connection | None = None  # transactions (and the units' reads)
        self._reader: sqlite3.Connection | None = None  # reads of committed state (the writer, if not threaded)
        self._committer: _Committer | None = None
        self._checkpointer: _Checkpointer | None = None
        self._inflight: _Batch | None = None  # the batch whose COMMIT runs in the writer thread
        self._closing = False
        self._queue: list[tuple[Callable[[Txn], Any], defer.Deferred]] = []
        self._flush_call = None
        self._observers: list[tuple[Callable[[], None], bool]] = []  # (callback, also after own commits)
        self._settled_observers: list[Callable[[list[str]], None]] = []
        self._known_schedules: dict[str, tuple] = {}  # committed schedules' fields (see Txn.upsert_schedule)
        self._seen_version: int | None = None  # data_version when the last batch began (other writers?)
        self._watch_version: int | None = None  # data_version as the watch last saw it
        self._watching = False

    @property
    def _conn(self) -> sqlite3.Connection | None:
        """The connection outside code may look at (pragmas; the admin health probe's BEGIN IMMEDIATE +
        ROLLBACK): the read connection, never the writer's, which may be inside a batch or in its COMMIT."""
        return self._reader

    # -- lifecycle -----------------------------------------------------------------------------------------
    def open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = self._connect()
            mode = _wal_mode(conn)
            conn.execute("PRAGMA foreign_keys = ON")
            self._writer = self._reader = conn
            self._check_integrity()
            self._ensure_schema()
            if self._threaded(mode):
                reader = self._connect()
                reader.set_authorizer(_read_only)
                self._reader = reader
                conn.execute("PRAGMA busy_timeout = 0")  # lock waits happen in the writer thread, not here
                self._committer = _Committer(conn, self._reactor, self._committed)
                self._checkpointer = _Checkpointer(self._connect())
                conn.execute(f"PRAGMA wal_autocheckpoint = {INLINE_CHECKPOINT_PAGES}")
        except sqlite3.DatabaseError as e:
            self._close_quietly()
            raise ChamberError(f"cannot open the chamber {self.path}: {e}. If the file is damaged, stop "
                               f"gatewayd, move it aside and restore the last backup.") from e
        except ChamberError:
            self._close_quietly()
            raise
        self._known_schedules.clear()
        self._seen_version = None
        log.info("chamber.opened", path=self.path, journal_mode=mode, schema_version=SCHEMA_VERSION,
                 commit_thread=self._committer is not None)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA synchronous = FULL")
        # temporary tables, indexes and statement journals in memory, not in a temporary file: a batch of
        # several units (one SAVEPOINT each) otherwise created, wrote and deleted such a file per batch
        conn.execute("PRAGMA temp_store = MEMORY")
        return conn

    def _threaded(self, journal_mode: str) -> bool:
        """COMMIT in a writer thread?  Only on a WAL file (readers beside the writer), with a reactor that can
        take calls from threads."""
        if self._commit_in_thread is False or self.path == ":memory:" or journal_mode.lower() != "wal":
            return False
        if self._commit_in_thread:
            return True
        from twisted.internet.interfaces import IReactorThreads

        return self._reactor is not None and IReactorThreads.providedBy(self._reactor)

    def _check_integrity(self) -> None:
        """Refuse to start on a damaged chamber: better no gateway than one that loses messages."""
        problems = [r[0] for r in self._writer.execute("PRAGMA integrity_check(5)")]
        if problems != ["ok"]:
            raise ChamberError(
                f"the chamber {self.path} is damaged (SQLite integrity_check: {'; '.join(problems)}). Stop "
                f"gatewayd, move the file aside and restore the last backup; the damaged file is kept as it is."
            )

    def _close_quietly(self) -> None:
        if self._committer is not None:
            self._committer.stop()
            self._committer = None
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        for conn in {id(c): c for c in (self._reader, self._writer) if c is not None}.values():
            try:
                conn.close()
            except sqlite3.Error:
                pass
        self._writer = self._reader = None

    def _schema_version(self) -> int | None:
        """The chamber's schema version; None for a file without a schema yet (a new chamber)."""
        conn = self._writer
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'chamber_meta'").fetchone():
            return None
        row = conn.execute("SELECT value FROM chamber_meta WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row else 0

    def _refuse_version(self, version: int | None) -> None:
        if version is not None and not 1 <= version <= SCHEMA_VERSION:
            raise ChamberError(
                f"the chamber {self.path} has schema version {version}; this gatewayd needs {SCHEMA_VERSION}"
                + (" (it was written by a newer gatewayd: run that one, or restore a backup made for this "
                   "version)" if version > SCHEMA_VERSION else "")
            )

    def _ensure_schema(self) -> None:
        """Create a new chamber's schema, or upgrade an older one, in one transaction. The version is read
        again under the write lock: the split lock starts two processes on one file, and the other one may
        have created or upgraded the schema while this one waited (CI once failed on exactly that)."""
        conn = self._writer
        version = self._schema_version()
        if version == SCHEMA_VERSION:
            return
        self._refuse_version(version)
        conn.execute("PRAGMA foreign_keys = OFF")  # an upgrade may rebuild a table others point at
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = self._schema_version()
            if version != SCHEMA_VERSION:
                self._refuse_version(version)
                scripts = ([SCHEMA_DIR / "chamber-v1.sql"] if version is None else []) + _upgrades()[(version or 1) - 1:]
                for script in scripts:
                    for statement in _statements(script.read_text(encoding="utf-8")):
                        conn.execute(statement)
                if version is None:
                    conn.executemany("INSERT INTO chamber_meta (key, value) VALUES (?, ?)",
                                     [("schema_version", str(SCHEMA_VERSION)), ("created", str(self._clock()))])
                else:
                    conn.execute("UPDATE chamber_meta SET value = ? WHERE key = 'schema_version'",
                                 (str(SCHEMA_VERSION),))
                    conn.execute("INSERT OR REPLACE INTO chamber_meta (key, value) VALUES ('upgraded', ?)",
                                 (str(self._clock()),))
                broken = conn.execute("PRAGMA foreign_key_check").fetchone()
                if broken is not None:
                    raise ChamberError(f"the schema upgrade of {self.path} would break a reference from table "
                                       f"{broken[0]} to {broken[2]}; nothing was changed")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        finally:
            conn.execute("PRAGMA foreign_keys = ON")
        if version is None and conn.execute("PRAGMA freelist_count").fetchone()[0]:
            self._compact_new()
        if version not in (None, SCHEMA_VERSION):
            log.warning("chamber.upgraded", path=self.path, from_version=version, to_version=SCHEMA_VERSION)

    def _compact_new(self) -> None:
        """A new chamber starts without the free pages of tables an upgrade script rebuilt (VACUUM). Only
        tidiness: if the other gate of a split lock holds the write lock past the busy timeout, it is left."""
        try:
            self._writer.execute("VACUUM")
        except sqlite3.OperationalError as e:
            log.info("chamber.vacuum_skipped", path=self.path, reason=str(e))

    def backup(self, dest: str | Path) -> dict[str, int]:
        """Write a consistent copy of the chamber to ``dest`` — safe while gatewayd runs (SQLite's online
        backup in one step: a read transaction, which in WAL mode holds up no writer) — and return its row
        counts.  The copy is written beside ``dest`` first, readable by its owner only (it holds patient
        data), checked with ``integrity_check``, flushed to disk and then renamed into place, so ``dest`` is
        either the old file or a whole new copy, never half of one."""
        import os

        if self._reader is None:
            raise ChamberError("the chamber is closed")
        dest = Path(dest)
        partial = dest.with_name(dest.name + ".partial")
        partial.unlink(missing_ok=True)
        os.close(os.open(partial, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600))
        try:
            copy = sqlite3.connect(partial)
            try:
                self._reader.backup(copy)
                problems = [r[0] for r in copy.execute("PRAGMA integrity_check(5)")]
                if problems != ["ok"]:
                    raise ChamberError(f"the copy did not check out ({'; '.join(problems)}); nothing was replaced")
                counts = Reader(copy, self._clock()).counts()
            finally:
                copy.close()
            fd = os.open(partial, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(partial, dest)
            fd = os.open(dest.parent, os.O_RDONLY)
            try:
                os.fsync(fd)  # the rename itself on disk
            finally:
                os.close(fd)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return counts

    def close(self) -> None:
        """Wait for a COMMIT in flight (its units are answered), commit what is still queued, then close."""
        if self._writer is None:
            return
        self._closing = True  # from here on, batches commit on this thread
        try:
            if self._flush_call is not None and self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
            self._settle_inflight()
            for _ in range(100):  # what the answered units' callbacks queue is committed too (bounded)
                if not self._queue:
                    break
                self._flush()
            leftover, self._queue = self._queue, []
            for _, d in leftover:
                d.errback(ChamberError("the chamber is closed"))
            self._close_quietly()
        finally:
            self._closing = False
        log.info("chamber.closed", path=self.path)

    # -- writing -------------------------------------------------------------------------------------------
    def transact(self, work: Callable[[Txn], T]) -> defer.Deferred:
        """Queue ``work`` for the next transaction; fires with its result after that COMMIT has returned."""
        if self._writer is None:
            return defer.fail(ChamberError("the chamber is closed"))
        d: defer.Deferred = defer.Deferred()
        self._queue.append((work, d))
        if self._reactor is None:
            self._flush()
        elif self._flush_call is None and self._inflight is None:  # (a COMMIT in flight flushes when it returns)
            self._flush_call = self._reactor.callLater(0, self._flush)
        return d

    def transact_now(self, work: Callable[[Txn], T]) -> T:
        """Run ``work`` in its own committed transaction, synchronously (CLI tools, start-up)."""
        if self._writer is None:
            raise ChamberError("the chamber is closed")
        self._settle_inflight()
        batch = self._run_batch([(work, None)], wait_for_lock=True)
        if batch.needs_commit:
            self._commit_here(batch)
        self._finish(batch)
        if batch.failures[0] is not None:
            raise batch.failures[0]
        return batch.results[0]

    def _flush(self) -> None:
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
        if self._inflight is not None or not self._queue or self._writer is None:
            return
        units, self._queue = self._queue, []
        threaded = self._committer is not None and not self._closing
        batch = self._run_batch(units, wait_for_lock=not threaded)
        if batch.waiting_for_lock:  # another process holds the write lock: the writer thread waits for it
            self._send_to_writer(batch)
            return
        self._commit_batch(batch)

    def _commit_batch(self, batch: _Batch) -> None:
        if batch.needs_commit:
            if self._committer is not None and not self._closing and self._pipelining():
                self._send_to_writer(batch)  # -> _committed, on this thread, after COMMIT returned
                return
            self._commit_here(batch)
        self._finish(batch)

    def _pipelining(self) -> bool:
        """COMMIT in the writer thread (see PIPELINE_COMMITS)?"""
        return PIPELINE_COMMITS if self.pipeline is None else self.pipeline

    def _send_to_writer(self, batch: _Batch) -> None:
        batch.done = threading.Event()
        self._inflight = batch
        self._committer.submit(batch)

    def _committed(self, batch: _Batch) -> None:
        """The writer thread's COMMIT of ``batch`` has returned — or its BEGIN, after waiting for another
        process's lock (called on the reactor thread)."""
        if batch is not self._inflight:
            return  # close() or transact_now() waited for it and finished it already
        self._inflight = None
        if batch.waiting_for_lock:
            self._begun(batch)
            return
        self._finish(batch)
        if self._queue:
            self._flush()  # what arrived during the COMMIT: the next batch

    def _begun(self, batch: _Batch) -> None:
        """The writer thread has the write lock for ``batch`` (BEGIN done), or gave up: run its units."""
        batch.waiting_for_lock = False
        if batch.error is not None:
            error, batch.error = batch.error, None
            self._abort_batch(batch, error, rolled_back=True)
            self._finish(batch)
            if self._queue and self._inflight is None:
                self._flush()
            return
        batch.done = None
        batch = self._run_batch(batch.units, begun=True)
        self._commit_batch(batch)
        if self._inflight is None and self._queue:
            self._flush()

    def _settle_inflight(self) -> None:
        """Wait (blocking) for a COMMIT in flight and finish its batch here: the writer connection is free
        afterwards, and what that batch did is known before anything else runs."""
        batch = self._inflight
        if batch is None:
            return
        batch.done.wait()
        self._inflight = None
        if batch.waiting_for_lock:  # the writer thread waited for the lock: the units run here, now
            batch.waiting_for_lock = False
            if batch.error is not None:
                error, batch.error = batch.error, None
                self._abort_batch(batch, error, rolled_back=True)
            else:
                batch = self._run_batch(batch.units, begun=True)
                if batch.needs_commit:
                    self._commit_here(batch)
        self._finish(batch)
        if self._queue and self._reactor is not None and self._flush_call is None and not self._closing:
            self._flush_call = self._reactor.callLater(0, self._flush)

    def _run_batch(self, units: list, *, wait_for_lock: bool = True, begun: bool = False) -> _Batch:
        """BEGIN and every unit, each in its own SAVEPOINT (none for a batch of one: a failing single unit
        rolls the transaction back); COMMIT is the caller's.  On a storage error the whole batch fails.
        ``begun``: BEGIN is done already.  Not ``wait_for_lock``: if another process holds the write lock,
        return at once a batch marked ``waiting_for_lock`` (nothing run)."""
        batch = _Batch(units)
        conn = self._writer
        if not begun:
            try:
                if self._committer is None:
                    conn.execute("BEGIN IMMEDIATE")  # (the connection waits for a lock itself)
                elif wait_for_lock:
                    _begin_waiting(conn)
                else:
                    conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                if not wait_for_lock and _busy(e):
                    batch.waiting_for_lock = True
                    return batch
                self._abort_batch(batch, e, rolled_back=True)
                return batch
        txn = Txn(conn, self._clock(), known_schedules=self._schedules_known)
        single = len(units) == 1
        results, failures = batch.results, batch.failures
        queue_changed = False
        for work, _ in units:
            settled_before = txn.settled.copy() if txn.settled else []
            schedules_before = txn.written_schedules.copy() if txn.written_schedules else {}
            txn.queue_changed = False
            try:
                if not single:
                    conn.execute("SAVEPOINT unit")
                try:
                    result = work(txn)
                except Exception as e:  # undo this unit only: its decision (or a bug), or the store failed
                    if single:
                        if conn.in_transaction:  # (SQLite may have rolled back already: disk full)
                            conn.execute("ROLLBACK")
                    else:
                        conn.execute("ROLLBACK TO unit")
                        conn.execute("RELEASE unit")
                    txn.settled = settled_before
                    txn.written_schedules = schedules_before
                    if isinstance(e, sqlite3.Error):  # disk full, I/O error: not the unit's own decision
                        log.error("chamber.write.failed", error=str(e))
                        e = ChamberWriteError(f"the chamber could not record this: {e}")
                    results.append(None)
                    failures.append(e)
                else:
                    if not single:
                        conn.execute("RELEASE unit")
                    results.append(result)
                    failures.append(None)
                    queue_changed = queue_changed or txn.queue_changed
            except sqlite3.Error as e:  # even the savepoint could not be handled: give up the whole batch
                self._abort_batch(batch, e)
                return batch
        if any(f is None for f in failures):
            batch.needs_commit = True
            batch.settled = txn.settled
            batch.schedules = txn.written_schedules
            batch.queue_changed = queue_changed
        elif not single:  # every unit failed: nothing to commit
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
        return batch

    def _schedules_known(self) -> dict[str, tuple]:
        """The schedules known as committed (inside a transaction: the write lock is held).  Forgotten if
        another connection (the other gate, a CLI tool) has committed since: it may have changed them."""
        version = self._writer.execute("PRAGMA data_version").fetchone()[0]
        if version != self._seen_version:
            self._known_schedules.clear()
            self._seen_version = version
        return self._known_schedules

    def _commit_here(self, batch: _Batch) -> None:
        try:
            _commit(self._writer)
        except sqlite3.Error as e:
            batch.error = e
            try:
                self._writer.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def _finish(self, batch: _Batch) -> None:
        """COMMIT has returned: answer the units (in order), then tell the observers."""
        if batch.error is not None:
            self._abort_batch(batch, batch.error, rolled_back=True)
        elif batch.needs_commit:
            if len(self._known_schedules) + len(batch.schedules) > _KNOWN_SCHEDULES_MAX:
                self._known_schedules.clear()
            self._known_schedules.update(batch.schedules)
        for (_, d), result, failure in zip(batch.units, batch.results, batch.failures):
            if d is None:
                continue
            if failure is not None:
                d.errback(failure)
            else:
                d.callback(result)
        if batch.needs_commit and batch.error is None:
            if self._checkpointer is not None:
                self._checkpointer.committed()
            self._notify(other_process=self._other_commits(), queue_changed=batch.queue_changed)
            if batch.settled:
                for observer in list(self._settled_observers):
                    try:
                        observer(batch.settled)
                    except Exception:
                        log.exception("chamber.observer.failed")

    def _notify(self, *, own: bool = True, other_process: bool = False, queue_changed: bool = True) -> None:
        for observer, after_own in list(self._observers):
            if other_process or (own and (after_own is True or (after_own == "queue" and queue_changed))):
                try:
                    observer()
                except Exception:
                    log.exception("chamber.observer.failed")

    def _abort_batch(self, batch: _Batch, error: Exception, rolled_back: bool = False) -> None:
        if not rolled_back:
            try:
                self._writer.execute("ROLLBACK")
            except sqlite3.Error:
                pass
        log.error("chamber.write.failed", error=str(error), batch=len(batch.units))
        err = ChamberWriteError(f"the chamber could not commit: {error}")
        batch.results[:] = [None] * len(batch.units)
        batch.failures[:] = [err] * len(batch.units)
        batch.needs_commit = False
        batch.settled, batch.schedules = [], {}

    # -- reading and notification -----------------------------------------------------------------------------
    def read(self) -> Reader:
        """Committed state (never a batch whose COMMIT has not returned)."""
        if self._reader is None:
            raise ChamberError("the chamber is closed")
        return Reader(self._reader, self._clock())

    def writable(self) -> tuple[bool, str]:
        """Can this process write now?  A batch in flight holds the write lock already: yes.  Otherwise take
        the write lock and give it back at once (BEGIN IMMEDIATE, ROLLBACK), writing nothing."""
        if self._writer is None:
            return False, "closed"
        if self._inflight is not None:
            return True, "ok"
        try:
            if self._committer is not None:
                _begin_waiting(self._writer)
            else:
                self._writer.execute("BEGIN IMMEDIATE")
            self._writer.execute("ROLLBACK")
            return True, "ok"
        except sqlite3.Error as e:
            return False, str(e)

    def watch(self, clock, interval: float = 0.01):
        """Notice commits made by *another process* (the other gate) and call the observers then.

        SQLite's ``PRAGMA data_version`` (of the writer connection, whose own commits do not change it)
        changes when another connection commits; reading it costs a look at the WAL index in shared memory
        (a file-system wake-up, no socket between the gates).  It is looked at every ``interval`` seconds
        and, between those, as soon as possible after the other process writes to the WAL file (inotify, on
        Linux with a real reactor: see :meth:`_watch_wal`), and after each of this process's own commits.
        Returns the LoopingCall (stop it with ``.stop()``; that stops the inotify watch too)."""
        from twisted.internet import task

        self._watching = True
        self._watch_version = self._data_version()
        loop = task.LoopingCall(self._look)
        loop.clock = clock
        stop_wal_watch = self._watch_wal(clock)

        def stopped(result):
            self._watching = False
            stop_wal_watch()
            return result

        loop.start(interval, now=False).addBoth(stopped)
        return loop

    def _look(self) -> None:
        """One look for another process's commits (skipped while a COMMIT of ours is in flight: the writer
        connection is busy, and the look is made when that COMMIT has returned)."""
        if self._writer is None or self._inflight is not None:
            return
        if self._other_commits():
            self._notify(own=False, other_process=True)

    def _other_commits(self) -> bool:
        """Has another process committed since the watch last looked?  (False when nothing watches.)"""
        if not self._watching or self._writer is None:
            return False
        version = self._data_version()
        if version == self._watch_version:
            return False
        self._watch_version = version
        return True

    def _data_version(self) -> int:
        return self._writer.execute("PRAGMA data_version").fetchone()[0]

    def _watch_wal(self, clock) -> Callable[[], None]:
        """Look for the other process's commits soon after it writes to the WAL file (inotify on the
        chamber's directory); returns a function that stops watching.  A commit's frames are written
        before its fsync and only visible after it, so a write is followed by looks 1, 3, 7 and 15 ms after
        it until data_version changes.  Without inotify (not Linux, a fake reactor), nothing: the
        interval's looks remain."""
        from twisted.internet.interfaces import IReactorFDSet

        if self.path == ":memory:" or not IReactorFDSet.providedBy(clock):
            return lambda: None
        try:
            from twisted.internet import inotify
            from twisted.python.filepath import FilePath

            notifier = inotify.INotify(reactor=clock)
            notifier.startReading()
        except Exception:  # noqa: BLE001 - no inotify here: the interval's looks remain
            return lambda: None
        wal_name = Path(self.path).name + "-wal"
        pending = {"call": None}

        def look_again(n: int) -> None:
            pending["call"] = None
            if self._writer is None or not self._watching:
                return
            if self._inflight is None and self._other_commits():
                self._notify(own=False, other_process=True)
                return
            if n < 4:  # looks 1, 3, 7 and 15 ms after the write (then only the interval's)
                pending["call"] = clock.callLater(0.001 * 2 ** n, look_again, n + 1)

        wal_names = (wal_name, wal_name.encode("utf-8", "surrogateescape"))  # (inotify's paths are bytes)

        def written(_watch, path, _mask) -> None:
            # (this process's own writes wake it too: it cannot tell them apart; a burst of writes is one
            # series of looks)
            if path.basename() in wal_names and pending["call"] is None:
                pending["call"] = clock.callLater(0.001, look_again, 1)

        try:
            notifier.watch(FilePath(str(Path(self.path).resolve().parent)), mask=inotify.IN_MODIFY,
                           callbacks=[written])
        except Exception:  # noqa: BLE001
            notifier.loseConnection()
            return lambda: None

        def stop() -> None:
            if pending["call"] is not None and pending["call"].active():
                pending["call"].cancel()
            notifier.loseConnection()

        return stop

    def observe(self, callback: Callable[[], None], *, own_commits: bool = True,
                queue_only: bool = False) -> Callable[[], None]:
        """Call ``callback`` after every commit that recorded something — this process's, and (while
        :meth:`watch` runs) another process's; with ``own_commits=False`` only another process's; with
        ``queue_only=True``, of this process's only those that queued an outbound message or changed a
        message's state (the relay's wake-up).  Returns a function that stops it."""
        entry = (callback, ("queue" if queue_only else True) if own_commits else False)
        self._observers.append(entry)
        return lambda: self._observers.remove(entry)

    def observe_settled(self, callback: Callable[[list[str]], None]) -> Callable[[], None]:
        """Call ``callback(ids)`` after each commit of this process that cleared the pending change of these
        appointments (``update_appointment(..., pending_change=None)``); returns a function that stops it."""
        self._settled_observers.append(callback)
        return lambda: self._settled_observers.remove(callback)
