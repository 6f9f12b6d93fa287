"""Slot rows a HIS publishes outside HL7 — a database view's rows (adapters/inner/database.py), a web service's
schedule (adapters/inner/webservice.py) — read into slot notices for `gateway.domain.inbound.InboundService`
(:class:`SlotRowsPoller`).

Every ``interval`` the rows are read (by the kind's own ``read(window, marker)``): those changed since the last
read when the source has a change marker, else the whole window (``window_days`` from today), compared with the
previous read (only what changed is applied; a slot that left the rows while still ahead is closed).  The
notices are recorded in the chamber like an SQR^S25 (type ``DB^SLOTS``, the rows read as JSON).  A row that
cannot be applied (a missing value where one is needed, an unknown status, department or doctor code, an
unreadable time) is recorded refused with the reason (type ``DB^SLOT``: ``gatewayd queue`` shows it) and the
others are applied; nothing of a bad row is applied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Callable
from zoneinfo import ZoneInfo

import structlog
from twisted.application import service
from twisted.internet import defer

from gateway.config.his_database import SlotColumns, SlotStatusCodes
from gateway.domain.ids import new_control_id
from gateway.domain.inbound import Received
from gateway.domain.model import ScheduleInfo, SlotNotice

log = structlog.get_logger("gateway.inner.slots")


class BadRow(ValueError):
    """A slot row that cannot be applied; ``str()`` says why."""


@dataclass(frozen=True)
class SlotRows:
    """What one poll read: the rows as dicts (domain key -> value), and the change marker reached."""

    rows: list[dict]
    marker: object = None
    overflow: bool = False


@dataclass(frozen=True)
class SlotSource:
    """Where the rows come from and how they read: ``read(window, marker) -> Deferred[SlotRows]`` (window: the
    first and the day after the last day, as the source's times), ``name`` (the sender the chamber records),
    ``columns`` (each domain key's name at the source, for the reasons given), the status codes, the code sets
    (empty: any code), the source's time zone convention and poll settings."""

    read: Callable
    name: str
    columns: SlotColumns
    status_codes: SlotStatusCodes
    interval: float
    window_days: int
    departments: dict
    doctors: dict
    local_time: str = "naive"
    marked: bool = False  # the source reads changes since a marker (else the window, diffed)


class SlotRowsPoller(service.Service):
    """Reads a HIS's slot rows every ``interval`` into slot notices.  A failed poll (the HIS unreachable, timed
    out, a window larger than its limit) is logged and tried again at the next interval."""

    def __init__(self, peer: str, source: SlotSource, inbound, *, tz: ZoneInfo, clock):
        self.setName(f"slot-rows:{peer}")
        self.peer = peer
        self.source = source
        self.inbound = inbound
        self.departments = source.departments
        self.doctors = source.doctors
        self.local_time = source.local_time
        self.tz = tz
        self.clock = clock
        self.marker = None  # the change marker reached; None: read everything
        self.seen: dict[tuple, tuple] | None = None  # the window as last read (diff mode)
        self._gone: dict[tuple, SlotNotice] = {}  # (diff mode) what closes each slot last read, if it leaves
        self._refused: set[tuple] = set()  # (diff mode) the bad rows of the last read, as they were
        self._call = None
        self.polls = 0
        self.refused = 0

    def startService(self):
        super().startService()
        self._call = self.clock.callLater(0, self._run)

    def stopService(self):
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _run(self):
        self._call = None
        d = self.poll()
        d.addErrback(lambda f: log.warning("his.slot_poll_failed", peer=self.peer, error=reason(f)))
        d.addBoth(lambda _: self._schedule())

    def _schedule(self):
        if self.running:
            self._call = self.clock.callLater(self.source.interval, self._run)

    def _today(self) -> datetime:
        now = datetime.fromtimestamp(self.clock.seconds(), self.tz).replace(tzinfo=None)
        return now.replace(hour=0, minute=0, second=0, microsecond=0)

    @defer.inlineCallbacks
    def poll(self):
        """One read of the view, applied; fires with the number of slot notices applied."""
        today = self._today()
        window = (self._db_time(today), self._db_time(today + timedelta(days=self.source.window_days)))
        read: SlotRows = yield self.source.read(window, self.marker)
        if read.overflow:
            log.error("his.slot_window_too_large", peer=self.peer, source=self.source.name)
            return 0
        notices, refusals, kept = [], [], []
        for row in read.rows:
            try:
                notices.append(self._notice(row))
                kept.append(row)
            except BadRow as e:
                refusals.append((row, str(e)))
        if not self.source.marked:
            notices, kept = self._changed(notices, kept, today)
            # (a bad row read again unchanged is not refused again at every poll: once per content)
            refused, self._refused = self._refused, {_fingerprint(row) for row, _ in refusals}
            refusals = [(row, reason) for row, reason in refusals if _fingerprint(row) not in refused]
        for row, reason in refusals:
            yield self._refuse(row, reason)
        if notices:
            received = Received(peer=self.peer, control_id=new_control_id(), type="DB^SLOTS",
                                body=_json(kept), charset="utf-8", sender=self.source.name)
            yield self.inbound.accept(received, notices)
            log.info("his.slots_applied", peer=self.peer, slots=len(notices), refused=len(refusals))
        if read.marker is not None:
            self.marker = read.marker
        self.polls += 1
        return len(notices)

    def _changed(self, notices, rows, today):
        """Diff mode: the notices for rows new or changed since the last read, and a 'block' for each slot
        that left the view's rows while still ahead."""
        current = {(n.schedule.id, n.start_local): (n, row) for n, row in zip(notices, rows)}
        previous, self.seen = self.seen or {}, {k: _fingerprint(v[1]) for k, v in current.items()}
        out, kept = [], []
        for k, (n, row) in current.items():
            if previous.get(k) != self.seen[k]:
                out.append(n)
                kept.append(row)
        for (schedule_id, start), _ in previous.items():
            if (schedule_id, start) not in current and start >= today:
                gone = self._gone.get((schedule_id, start))
                if gone is not None:
                    out.append(gone)
                    kept.append({"schedule_id": schedule_id, "start": start.isoformat(), "gone": True})
        self._gone = {(n.schedule.id, n.start_local): SlotNotice(
            action="block", schedule=n.schedule, start_local=n.start_local, minutes=n.minutes,
            service_code=n.service_code, service_text=n.service_text) for n, _ in current.values()}
        return out, kept

    def _refuse(self, row: dict, reason: str) -> defer.Deferred:
        self.refused += 1
        log.warning("his.slot_row_refused", peer=self.peer, source=self.source.name, reason=reason)
        received = Received(peer=self.peer, control_id=new_control_id(), type="DB^SLOT", body=_json([row]),
                            charset="utf-8", sender=self.source.name)
        return self.inbound.refuse(received, "AR", reason)

    def _db_time(self, local: datetime) -> datetime:
        if self.local_time == "utc":
            return local.replace(tzinfo=self.tz).astimezone(timezone.utc).replace(tzinfo=None)
        return local

    def _local(self, value, what: str) -> datetime:
        if isinstance(value, str):
            try:
                value = datetime.fromisoformat(value.strip())
            except ValueError:
                raise BadRow(f"{what}: not a date and time: {value[:30]!r}") from None
        elif isinstance(value, date) and not isinstance(value, datetime):
            raise BadRow(f"{what}: a date without a time")
        if not isinstance(value, datetime):
            raise BadRow(f"{what}: not a date and time ({type(value).__name__})")
        if value.tzinfo is None and self.local_time == "utc":
            value = value.replace(tzinfo=timezone.utc)
        if value.tzinfo is not None:
            value = value.astimezone(self.tz).replace(tzinfo=None)
        return value.replace(microsecond=0)

    def _notice(self, row: dict) -> SlotNotice:
        cols = self.source.columns
        for key in ("schedule_id", "start", "status"):
            if row.get(key) in (None, ""):
                raise BadRow(f"{getattr(cols, key)} ({key}) is NULL")
        start = self._local(row["start"], cols.start)
        if cols.minutes is not None:
            try:
                minutes = int(row.get("minutes"))
            except (TypeError, ValueError):
                raise BadRow(f"{cols.minutes} (minutes) is not a number: {row.get('minutes')!r}") from None
        else:
            if row.get("end") is None:
                raise BadRow(f"{cols.end} (end) is NULL")
            minutes = int((self._local(row["end"], cols.end) - start).total_seconds() // 60)
        if not 0 < minutes <= 24 * 60:
            raise BadRow(f"the slot's length {minutes} min is not between 1 minute and a day")
        status = str(row["status"]).strip()
        codes = self.source.status_codes
        action = ("open" if status in codes.free else "book" if status in codes.booked
                  else "block" if status in codes.blocked else None)
        if action is None:
            raise BadRow(f"unknown status code {status!r} in {cols.status} (slots.status_codes)")
        department = text(row.get("department_code"))
        doctor = text(row.get("doctor_code"))
        if self.departments and department not in self.departments:
            raise BadRow(f"unknown department code {department!r} in {cols.department_code} (department_codes)")
        if self.doctors and doctor not in self.doctors:
            raise BadRow(f"unknown doctor code {doctor!r} in {cols.doctor_code} (doctor_codes)")
        schedule_id = text(row["schedule_id"])
        schedule = ScheduleInfo(
            id=schedule_id, display=text(row.get("schedule_name")) or schedule_id,
            practitioner_id=doctor, practitioner_name=text(row.get("doctor_name")) or self.doctors.get(doctor, ""),
            department_code=department,
            department_name=text(row.get("department_name")) or self.departments.get(department, ""))
        return SlotNotice(action=action, schedule=schedule, start_local=start, minutes=minutes,
                          service_code=text(row.get("service_code")), service_text=text(row.get("service_name")),
                          his_appointment=text(row.get("his_appointment")) or None if action == "book" else None)


def text(value) -> str:
    return "" if value is None else str(value).strip()


def _fingerprint(row: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in row.items()))


def _json(rows: list[dict]) -> bytes:
    return json.dumps(rows, ensure_ascii=False, default=str, sort_keys=True).encode("utf-8")




def reason(failure) -> str:
    """A failure as one line for the logs and the chamber: the driver's own error when there is one."""
    error = failure.value
    orig = getattr(error, "orig", None)
    if orig is not None:
        return f"{type(orig).__name__}: {first_line(orig)}"
    return str(error) if str(error) else type(error).__name__


def first_line(error) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
