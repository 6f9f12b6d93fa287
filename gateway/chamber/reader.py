"""Reads of committed state, outside transactions (:class:`Reader`): everything a :class:`Txn` may read, and
the queries only operators, the FHIR API and the relay make (searches, lists, counts)."""

from __future__ import annotations

import json
from typing import Any, Iterable

from gateway.chamber.rows import AppointmentRow, AuditRow, MessageRow, PrescriptionRow, ScheduleRow, SlotRow, load
from gateway.chamber.txn import Txn


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
        return [load(MessageRow, r) for r in self._c.execute(sql, args)]

    def state_counts(self) -> dict[tuple[str, str, str], int]:
        """(direction, peer, state) -> number of messages."""
        cur = self._c.execute("SELECT direction, peer, state, count(*) FROM messages GROUP BY 1, 2, 3")
        return {(r[0], r[1], r[2]): r[3] for r in cur}

    def notification_counts(self) -> dict[tuple[str, str], int]:
        """(platform, state) -> number of notifications (pending, delivered, dead)."""
        cur = self._c.execute("SELECT platform, state, count(*) FROM notifications GROUP BY 1, 2")
        return {(r[0], r[1]): r[2] for r in cur}

    def schedules(self, schedule_id: str | None = None) -> list[ScheduleRow]:
        if schedule_id is None:
            cur = self._c.execute("SELECT * FROM schedules ORDER BY id")
        else:
            cur = self._c.execute("SELECT * FROM schedules WHERE id = ?", (schedule_id,))
        return [load(ScheduleRow, r) for r in cur]

    def search_slots(
        self,
        *,
        start_from: float | None = None,
        start_to: float | None = None,
        start_from_inclusive: bool = True,
        start_to_inclusive: bool = True,
        schedule_ids: Iterable[str] | None = None,
        service_codes: Iterable[str] | None = None,
        his_statuses: Iterable[str] | None = None,
        or_held: bool = False,
        hidden: Iterable[tuple[str, str, float | None]] | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[SlotRow]:
        """``his_statuses``: only slots no booking of the gateway holds whose HIS status is one of these — and,
        with ``or_held``, the held ones too.  ``hidden``: (schedule id, day YYYYMMDD, cutoff) triples: free
        slots of that schedule and day starting after ``cutoff`` (any time, if None) are left out (a
        platform's quota is used up)."""
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
        if his_statuses is not None:
            his_statuses = list(his_statuses)
            where.append(f"((held_by IS NULL AND his_status IN ({', '.join('?' * len(his_statuses))}))"
                         + (" OR held_by IS NOT NULL)" if or_held else ")"))
            args += his_statuses
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
        return [load(SlotRow, r) for r in self._c.execute(sql, args)]

    def appointments_for(self, platform: str, limit: int = 100) -> list[AppointmentRow]:
        cur = self._c.execute(
            "SELECT * FROM appointments WHERE platform = ? ORDER BY created DESC LIMIT ?", (platform, limit)
        )
        return [load(AppointmentRow, r) for r in cur]

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
            yield load(AuditRow, r)

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
        return [load(PrescriptionRow, r) for r in cur.fetchall()]

    def counts(self) -> dict[str, int]:
        out = {}
        for table in ("messages", "schedules", "slots", "appointments", "audit_records"):
            out[table] = self._c.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        return out

