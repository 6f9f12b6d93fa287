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
import sqlite3
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


def _row(cls, row: sqlite3.Row | None):
    if row is None:
        return None
    values = dict(row)
    if cls is AppointmentRow:
        values["patient"] = json.loads(values["patient"])
    return cls(**values)


# ---------------------------------------------------------------------------------------------------------
# transaction primitives


class Txn:
    """What a unit of work may do inside a chamber transaction.  Each method is one statement or two."""

    def __init__(self, conn: sqlite3.Connection, now: float):
        self._c = conn
        self.now = now

    # -- messages ------------------------------------------------------------------------------------------
    def message(self, message_id: int) -> MessageRow | None:
        return _row(MessageRow, self._c.execute("SELECT * FROM messages WHERE id = ?", (message_id,)).fetchone())

    def message_by_control_id(self, direction: str, peer: str, control_id: str) -> MessageRow | None:
        cur = self._c.execute(
            "SELECT * FROM messages WHERE direction = ? AND peer = ? AND control_id = ?",
            (direction, peer, control_id),
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
        subject: str | None = None,
        order_key: str | None = None,
        next_attempt: float | None = None,
        answer_code: str | None = None,
        answer_text: str | None = None,
        detail: str | None = None,
    ) -> int:
        cur = self._c.execute(
            "INSERT INTO messages (direction, peer, control_id, type, state, body, charset, subject, order_key,"
            " next_attempt, answer_code, answer_text, created, updated)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (direction, peer, control_id, type, state, body, charset, subject, order_key, next_attempt,
             answer_code, answer_text, self.now, self.now),
        )
        message_id = cur.lastrowid
        self._event(message_id, state, detail)
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

    def set_encoded(self, message_id: int, body: bytes, type: str, charset: str) -> None:
        """Store the HL7 bytes of an outbound message committed without them (once: they never change)."""
        cur = self._c.execute(
            "UPDATE messages SET body = ?, type = ?, charset = ?, updated = ? WHERE id = ? AND body = x''",
            (body, type, charset, self.now, message_id),
        )
        if cur.rowcount != 1:
            raise ValueError(f"message {message_id} was already encoded")
        self.note(message_id, f"encoded as {type} ({len(body)} bytes, {charset})")

    def note(self, message_id: int, detail: str) -> None:
        """Add a line to a message's story without changing its state."""
        row = self._c.execute("SELECT state FROM messages WHERE id = ?", (message_id,)).fetchone()
        self._event(message_id, row[0], detail)

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
        self._c.execute(
            "INSERT INTO schedules (id, display, practitioner_id, practitioner_name, department_code,"
            " department_name, updated) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET display = excluded.display,"
            " practitioner_id = excluded.practitioner_id, practitioner_name = excluded.practitioner_name,"
            " department_code = excluded.department_code, department_name = excluded.department_name,"
            " updated = excluded.updated",
            (row.id, row.display, row.practitioner_id, row.practitioner_name, row.department_code,
             row.department_name, self.now),
        )

    def schedule(self, schedule_id: str) -> ScheduleRow | None:
        cur = self._c.execute("SELECT * FROM schedules WHERE id = ?", (schedule_id,))
        return _row(ScheduleRow, cur.fetchone())

    def slot(self, slot_id: str) -> SlotRow | None:
        return _row(SlotRow, self._c.execute("SELECT * FROM slots WHERE id = ?", (slot_id,)).fetchone())

    def slot_by_his_appointment(self, his_appointment: str) -> SlotRow | None:
        cur = self._c.execute("SELECT * FROM slots WHERE his_appointment = ?", (his_appointment,))
        return _row(SlotRow, cur.fetchone())

    def insert_slot(self, row: SlotRow) -> None:
        self._c.execute(
            "INSERT INTO slots (id, schedule_id, start_local, start_ts, end_ts, minutes, service_code,"
            " service_text, his_status, his_appointment, held_by, booked_by, updated)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (row.id, row.schedule_id, row.start_local, row.start_ts, row.end_ts, row.minutes,
             row.service_code, row.service_text, row.his_status, row.his_appointment, row.held_by,
             row.booked_by, self.now),
        )

    def update_slot(self, slot_id: str, **changes: Any) -> None:
        allowed = {"start_ts", "end_ts", "minutes", "service_code", "service_text", "his_status",
                   "his_appointment", "held_by", "booked_by"}
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

    # -- operators -------------------------------------------------------------------------------------------
    def purge_dead(self, older_than: float) -> int:
        """Delete dead-lettered messages (and their stories) last changed before ``older_than``."""
        ids = [r[0] for r in self._c.execute(
            "SELECT id FROM messages WHERE state = 'dead' AND updated < ?", (older_than,))]
        for i in ids:
            self._c.execute("DELETE FROM message_events WHERE message_id = ?", (i,))
            self._c.execute("DELETE FROM messages WHERE id = ?", (i,))
        return len(ids)


class Reader(Txn):
    """Read-only queries over committed state (used outside transactions)."""

    def next_outbound(self, peer: str) -> MessageRow | None:
        """The head of the delivery queue for ``peer``: strict FIFO, the oldest not yet finished."""
        cur = self._c.execute(
            "SELECT * FROM messages WHERE direction = 'outbound' AND peer = ?"
            " AND state IN ('committed', 'sending', 'retrying') ORDER BY id LIMIT 1",
            (peer,),
        )
        return _row(MessageRow, cur.fetchone())

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

    def unfinished_outbound(self, peer: str, limit: int = 10000) -> list[MessageRow]:
        """Every message to ``peer`` not yet finished, oldest first (for ordering by patient)."""
        cur = self._c.execute(
            "SELECT * FROM messages WHERE direction = 'outbound' AND peer = ?"
            " AND state IN ('committed', 'sending', 'retrying') ORDER BY id LIMIT ?",
            (peer, limit),
        )
        return [_row(MessageRow, r) for r in cur]

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

    def counts(self) -> dict[str, int]:
        out = {}
        for table in ("messages", "schedules", "slots", "appointments", "audit_records"):
            out[table] = self._c.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        return out


# ---------------------------------------------------------------------------------------------------------
# the chamber


class Chamber:
    """The durable store.  Open with :meth:`open`; write with :meth:`transact`; read with :meth:`read`."""

    def __init__(self, path: str | Path, *, reactor=None, clock: Callable[[], float] = time.time):
        self.path = str(path)
        self._reactor = reactor
        self._clock = clock
        self._conn: sqlite3.Connection | None = None
        self._queue: list[tuple[Callable[[Txn], Any], defer.Deferred]] = []
        self._flush_call = None
        self._observers: list[Callable[[], None]] = []

    # -- lifecycle -----------------------------------------------------------------------------------------
    def open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout = 5000")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            self._conn = conn
            self._check_integrity()
            self._ensure_schema()
        except sqlite3.DatabaseError as e:
            self._close_quietly()
            raise ChamberError(f"cannot open the chamber {self.path}: {e}. If the file is damaged, stop "
                               f"gatewayd, move it aside and restore the last backup.") from e
        except ChamberError:
            self._close_quietly()
            raise
        log.info("chamber.opened", path=self.path, journal_mode=mode, schema_version=SCHEMA_VERSION)

    def _check_integrity(self) -> None:
        """Refuse to start on a damaged chamber: better no gateway than one that loses messages."""
        problems = [r[0] for r in self._conn.execute("PRAGMA integrity_check(5)")]
        if problems != ["ok"]:
            raise ChamberError(
                f"the chamber {self.path} is damaged (SQLite integrity_check: {'; '.join(problems)}). Stop "
                f"gatewayd, move the file aside and restore the last backup; the damaged file is kept as it is."
            )

    def _close_quietly(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
            self._conn = None

    def _schema_version(self) -> int | None:
        """The chamber's schema version; None for a file without a schema yet (a new chamber)."""
        conn = self._conn
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
        conn = self._conn
        version = self._schema_version()
        if version == SCHEMA_VERSION:
            return
        self._refuse_version(version)
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
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if version not in (None, SCHEMA_VERSION):
            log.warning("chamber.upgraded", path=self.path, from_version=version, to_version=SCHEMA_VERSION)

    def close(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
            self._flush_call = None
        if self._queue:
            self._flush()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
            log.info("chamber.closed", path=self.path)

    # -- writing -------------------------------------------------------------------------------------------
    def transact(self, work: Callable[[Txn], T]) -> defer.Deferred:
        """Queue ``work`` for this reactor turn's transaction; fires with its result after COMMIT."""
        if self._conn is None:
            return defer.fail(ChamberError("the chamber is closed"))
        d: defer.Deferred = defer.Deferred()
        self._queue.append((work, d))
        if self._reactor is None:
            self._flush()
        elif self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self._flush)
        return d

    def transact_now(self, work: Callable[[Txn], T]) -> T:
        """Run ``work`` in its own committed transaction, synchronously (CLI tools, start-up)."""
        results: list = []
        failures: list = []
        self._run_batch([(work, None)], results, failures)
        if failures[0] is not None:
            raise failures[0]
        self._notify()
        return results[0]

    def _flush(self) -> None:
        self._flush_call = None
        batch, self._queue = self._queue, []
        if not batch:
            return
        results: list = []
        failures: list = []
        self._run_batch(batch, results, failures)
        for (_, d), result, failure in zip(batch, results, failures):
            if failure is not None:
                d.errback(failure)
            else:
                d.callback(result)
        if any(f is None for f in failures):
            self._notify()

    def _notify(self) -> None:
        for observer in list(self._observers):
            try:
                observer()
            except Exception:
                log.exception("chamber.observer.failed")

    def _run_batch(self, batch, results: list, failures: list) -> None:
        conn = self._conn
        now = self._clock()
        txn = Txn(conn, now)
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            self._abort_batch(batch, results, failures, e)
            return
        for work, _ in batch:
            try:
                conn.execute("SAVEPOINT unit")
                try:
                    result = work(txn)
                except sqlite3.Error as e:  # the store failed (disk full, I/O error), not the unit's decision
                    log.error("chamber.write.failed", error=str(e))
                    conn.execute("ROLLBACK TO unit")
                    conn.execute("RELEASE unit")
                    results.append(None)
                    failures.append(ChamberWriteError(f"the chamber could not record this: {e}"))
                except Exception as e:  # the unit's own decision (or a bug): undo only this unit
                    conn.execute("ROLLBACK TO unit")
                    conn.execute("RELEASE unit")
                    results.append(None)
                    failures.append(e)
                else:
                    conn.execute("RELEASE unit")
                    results.append(result)
                    failures.append(None)
            except sqlite3.Error as e:  # even the savepoint could not be handled: give up the whole batch
                self._abort_batch(batch, results, failures, e)
                return
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            self._abort_batch(batch, results, failures, e)

    def _abort_batch(self, batch, results: list, failures: list, error: Exception) -> None:
        try:
            self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        log.error("chamber.write.failed", error=str(error), batch=len(batch))
        err = ChamberWriteError(f"the chamber could not commit: {error}")
        results[:] = [None] * len(batch)
        failures[:] = [err] * len(batch)

    # -- reading and notification -----------------------------------------------------------------------------
    def read(self) -> Reader:
        if self._conn is None:
            raise ChamberError("the chamber is closed")
        return Reader(self._conn, self._clock())

    def watch(self, clock, interval: float = 0.01):
        """Notice commits made by *another process* (the other gate) and call the observers then.

        SQLite's ``PRAGMA data_version`` changes when another connection commits; reading it costs a look at
        the WAL index in shared memory (a file-system wake-up, no socket between the gates).  Returns the
        LoopingCall (stop it with ``.stop()``)."""
        from twisted.internet import task

        last = [self._data_version()]

        def check():
            if self._conn is None:
                return
            version = self._data_version()
            if version != last[0]:
                last[0] = version
                self._notify()

        loop = task.LoopingCall(check)
        loop.clock = clock
        loop.start(interval, now=False)
        return loop

    def _data_version(self) -> int:
        return self._conn.execute("PRAGMA data_version").fetchone()[0]

    def observe(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` after every commit that recorded something; returns a function that stops it."""
        self._observers.append(callback)
        return lambda: self._observers.remove(callback)
