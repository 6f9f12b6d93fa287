"""Reads of committed state, outside transactions (:class:`Reader`): everything a :class:`Txn` may read, and
the queries only operators, the FHIR API and the relay make (searches, lists, counts)."""

from __future__ import annotations

import json
from typing import Any, Iterable

from gateway.chamber import dialects
from gateway.chamber.rows import AppointmentRow, AuditRow, MessageRow, PrescriptionRow, ScheduleRow, SlotRow, load
from gateway.chamber.txn import _VERSION_COLUMNS, Txn


def _among(column: str, values: list) -> str:
    """``column IN (?, ...)`` for ``values`` — for none, a condition nothing meets (SQLite takes ``IN ()``,
    PostgreSQL does not)."""
    return f"{column} IN ({', '.join('?' * len(values))})" if values else "1 = 0"


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
                 limit: int = 100, control_id: str | None = None, type: str | None = None,
                 since: float | None = None, until: float | None = None) -> list[MessageRow]:
        """The newest messages first, optionally of one direction, state, peer, control id and type, committed
        in [since, until)."""
        where, args = [], []
        if since is not None:
            where.append("created >= ?")
            args.append(since)
        if until is not None:
            where.append("created < ?")
            args.append(until)
        for column, value in (("direction", direction), ("state", state), ("peer", peer),
                              ("control_id", control_id), ("type", type)):
            if value:
                where.append(f"{column} = ?")
                args.append(value)
        sql = "SELECT * FROM messages" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        return [load(MessageRow, r) for r in self._c.execute(sql, args)]

    def waiting_for_a_down_his(self, subject: str) -> str | None:
        """The HIS endpoint the probe last found down that an outbound message about ``subject`` still waits
        for (committed, sending or retrying), or None."""
        row = self._c.execute(
            "SELECT m.peer FROM messages m JOIN his_links h ON h.peer = m.peer AND h.up = 0"
            " WHERE m.subject = ? AND m.direction = 'outbound' AND m.state IN ('committed', 'sending', 'retrying')"
            " LIMIT 1", (subject,)).fetchone()
        return row[0] if row is not None else None

    def counts_since(self, since: float) -> dict[tuple[str, str], int]:
        """(direction, peer) -> messages committed at or after ``since`` (``gatewayd status``)."""
        cur = self._c.execute("SELECT direction, peer, count(*) FROM messages WHERE created >= ? GROUP BY 1, 2",
                              (since,))
        return {(r[0], r[1]): r[2] for r in cur}

    def traffic(self, since: float, bucket: float) -> list[tuple[int, str, int, float | None]]:
        """Per ``bucket`` seconds since ``since``: (bucket number from ``since``, direction, messages committed,
        the mean seconds from commit to the HIS's answer of the outbound ones delivered) — the console's charts."""
        cur = self._c.execute(
            f"SELECT {dialects.of(self._c).time_bucket} AS b, direction, count(*),"
            " avg(CASE WHEN direction = 'outbound' AND state = 'delivered' THEN updated - created END)"
            " FROM messages WHERE created >= ? GROUP BY b, direction ORDER BY b", (since, bucket, since))
        return [(r[0], r[1], r[2], r[3]) for r in cur]

    def oldest_waiting(self) -> dict[str, float]:
        """peer -> when its oldest outbound message still waiting for the HIS (committed, sending, retrying) was
        committed."""
        cur = self._c.execute("SELECT peer, min(created) FROM messages WHERE direction = 'outbound'"
                              " AND state IN ('committed', 'sending', 'retrying') GROUP BY peer")
        return {r[0]: r[1] for r in cur}

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

    def search_slots(self, *, limit: int = 100, offset: int = 0, descending: bool = False, **filters) -> list[SlotRow]:
        """The slots :meth:`_slot_filter` keeps, by start (``descending``: latest first), then schedule."""
        where, args = self._slot_filter(**filters)
        order = "DESC" if descending else ""
        sql = f"SELECT * FROM slots{where} ORDER BY start_ts {order}, schedule_id {order}, id LIMIT ? OFFSET ?"
        return [load(SlotRow, r) for r in self._c.execute(sql, [*args, limit, offset])]

    def count_slots(self, **filters) -> int:
        """How many slots :meth:`search_slots` finds with the same ``filters``, in all."""
        where, args = self._slot_filter(**filters)
        return self._c.execute(f"SELECT count(*) FROM slots{where}", args).fetchone()[0]

    def _slot_filter(
        self,
        *,
        start_from: float | None = None,
        start_to: float | None = None,
        start_from_inclusive: bool = True,
        start_to_inclusive: bool = True,
        ids: Iterable[str] | None = None,
        schedule_ids: Iterable[str] | None = None,
        service_codes: Iterable[str] | None = None,
        his_statuses: Iterable[str] | None = None,
        or_held: bool = False,
        free_after: float | None = None,
        hidden: Iterable[tuple[str, str, float | None]] | None = None,
        updated_ranges: Iterable[tuple[float, float]] = (),
    ) -> tuple[str, list[Any]]:
        """``his_statuses``: only slots no booking of the gateway holds whose HIS status is one of these — and,
        with ``or_held``, the held ones too; ``free_after``: free ones only if they start after it.  ``hidden``:
        (schedule id, day YYYYMMDD, cutoff) triples: free slots of that schedule and day starting after
        ``cutoff`` (any time, if None) are left out (a platform's quota is used up).  ``updated_ranges``: [low,
        high) ranges the slot's last change is in, all of them (_lastUpdated)."""
        where: list[str] = []
        args: list[Any] = []
        for low, high in updated_ranges:
            where.append("updated >= ? AND updated < ?")
            args += [max(low, -1e18), min(high, 1e18)]
        if start_from is not None:
            where.append("start_ts >= ?" if start_from_inclusive else "start_ts > ?")
            args.append(start_from)
        if start_to is not None:
            where.append("start_ts <= ?" if start_to_inclusive else "start_ts < ?")
            args.append(start_to)
        for column, values in (("id", ids), ("schedule_id", schedule_ids), ("service_code", service_codes)):
            if values is not None:
                values = list(values)
                where.append(_among(column, values))
                args += values
        if his_statuses is not None:
            his_statuses = list(his_statuses)
            started = "" if free_after is None else " AND NOT (his_status = 'free' AND start_ts <= ?)"
            where.append(f"((held_by IS NULL AND {_among('his_status', his_statuses)}{started})"
                         + (" OR held_by IS NOT NULL)" if or_held else ")"))
            args += his_statuses
            if free_after is not None:
                args.append(free_after)
        hidden = list(hidden or ())
        if hidden:
            where.append(dialects.of(self._c).hidden_slots)
            args.append(json.dumps(hidden))
        return (" WHERE " + " AND ".join(where) if where else ""), args

    #: Reader.search_appointments' sort keys: the appointment's start (its slot's), last change, creation
    APPOINTMENT_SORTS = {"date": "s.start_ts", "_lastUpdated": "a.updated", "created": "a.created"}

    def search_appointments(self, platform: str, *, sort: tuple[str, bool] = ("created", True), limit: int = 100,
                            offset: int = 0, **filters) -> list[AppointmentRow]:
        """``platform``'s appointments that :meth:`_appointment_filter` keeps, ordered by ``sort`` (a key of
        APPOINTMENT_SORTS, descending?) then id: a stable order to page through."""
        where, args = self._appointment_filter(platform, **filters)
        key, descending = sort
        order = "DESC" if descending else ""
        sql = (f"SELECT a.* FROM appointments a JOIN slots s ON s.id = a.slot_id{where}"
               f" ORDER BY {self.APPOINTMENT_SORTS[key]} {order}, a.id {order} LIMIT ? OFFSET ?")
        return [load(AppointmentRow, r) for r in self._c.execute(sql, [*args, limit, offset])]

    def count_appointments(self, platform: str, **filters) -> int:
        where, args = self._appointment_filter(platform, **filters)
        return self._c.execute(f"SELECT count(*) FROM appointments a JOIN slots s ON s.id = a.slot_id{where}",
                               args).fetchone()[0]

    def _appointment_filter(self, platform: str, *, ids: Iterable[str] | None = None, statuses: Iterable[str] | None = None,
                            start_ranges: Iterable[tuple[float, float]] = (),
                            patients: Iterable[tuple[str | None, str]] | None = None,
                            updated_ranges: Iterable[tuple[float, float]] = ()) -> tuple[str, list[Any]]:
        """``statuses``: the chamber's; ``start_ranges``: [low, high) ranges the slot's start is in, all of them;
        ``patients``: (system or None, value) pairs, one of which is among the patient's identifiers;
        ``updated_ranges``: [low, high) ranges the appointment's last change is in, all of them (_lastUpdated)."""
        where, args = ["a.platform = ?"], [platform]
        for low, high in updated_ranges:
            where.append("a.updated >= ? AND a.updated < ?")
            args += [max(low, -1e18), min(high, 1e18)]
        for column, values in (("a.id", ids), ("a.status", statuses)):
            if values is not None:
                values = list(values)
                where.append(_among(column, values))
                args += values
        for low, high in start_ranges:
            where.append("s.start_ts >= ? AND s.start_ts < ?")
            args += [max(low, -1e18), min(high, 1e18)]
        if patients is not None:
            dialect = dialects.of(self._c)
            where.append(dialect.patient_has_identifier)
            args.append(dialect.identifiers_param(patients))
        return " WHERE " + " AND ".join(where), args

    def appointment_history(self, platform: str, since: float, *, limit: int = 100,
                            offset: int = 0) -> tuple[int, list[AppointmentRow]]:
        """(how many in all, one page of) every version of ``platform``'s appointments made at or after
        ``since`` — the current ones and the earlier ones kept — newest change first, then id and version (a
        stable order to page through)."""
        union = (f"SELECT {_VERSION_COLUMNS} FROM appointments WHERE platform = ? AND updated >= ?"
                 f" UNION ALL SELECT {_VERSION_COLUMNS} FROM appointment_versions WHERE platform = ? AND updated >= ?")
        args = [platform, since, platform, since]
        total = self._c.execute(f"SELECT count(*) FROM ({union}) v", args).fetchone()[0]
        cur = self._c.execute(f"SELECT * FROM ({union}) v ORDER BY updated DESC, id DESC, version DESC"
                              f" LIMIT ? OFFSET ?", [*args, limit, offset])
        return total, [load(AppointmentRow, r) for r in cur]

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

    def search_audit(self, *, action: str | None = None, subject: str | None = None, platform: str | None = None,
                     resource_id: str | None = None, limit: int = 200) -> list[AuditRow]:
        """The newest audit records first, optionally of one action (``console.%`` matches a prefix), subject,
        platform and resource id."""
        where, args = [], []
        for column, value in (("action", action), ("subject", subject), ("platform", platform),
                              ("resource_id", resource_id)):
            if value:
                where.append(f"{column} LIKE ?" if column == "action" and value.endswith("%") else f"{column} = ?")
                args.append(value)
        sql = "SELECT * FROM audit_records" + (" WHERE " + " AND ".join(where) if where else "")
        return [load(AuditRow, r) for r in self._c.execute(sql + " ORDER BY seq DESC LIMIT ?", [*args, limit])]

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

