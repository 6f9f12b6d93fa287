"""The simulated HIS's own database: what a real HIS keeps across a restart (config ``store``).

One SQLite file (the standard library's ``sqlite3``) in WAL mode. It holds the inventory (schedules, slots,
every booking and who made it, blocks), the next HIS appointment number, the answers given (so a resend after
a restart gets the same bytes), the messages to the gateway not acknowledged yet (the outbox, per role) and
the orders the pharmacy accepted but has not dispensed. The simulator answers only after the transaction that
recorded the change has committed: a booking it answered AA survives its kill -9.

``synchronous=NORMAL``: a committed transaction is in the WAL file, which is enough for a kill -9 (the
operating system has it), not for a power cut, which only the gateway's chamber must survive (it runs
``synchronous=FULL``). FULL cost ~3 ms per commit on the loaded test machine against ~0.1 ms, enough to make
the simulator, not the gateway, the bottleneck of the benchmarks.

Transactions: `Store.transaction` (nested uses join the outer one). Work that must only happen once the
change is on disk (the in-memory queue of the notifier, the answers remembered, a dispense scheduled) is
registered with `Store.after_commit`; what must be undone in memory if the transaction fails, with
`Store.after_rollback`. `Store.changing(inventory)` wraps a transaction that also writes the inventory's
changes and settles or discards them.

The schema is versioned (``PRAGMA user_version``): ``hissim/schema/his-sim-v1.sql`` and one
``upgrade-v<N>-v<N+1>.sql`` per later version, each case applied in one transaction. A store written by a newer
simulator is refused, not touched. The file is opened with an exclusive lock, so two simulators cannot share
one store (each would hand out the other's appointment ids); the second is refused with `StoreError`.
SQL lives in this module only.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from hissim.inventory import Booking, Changes, Inventory, Schedule, Slot, SlotStatus, parse_session

log = structlog.get_logger("hissim.store")

SCHEMA_DIR = Path(__file__).with_name("schema")
UPGRADES = sorted(SCHEMA_DIR.glob("upgrade-v*-v*.sql"), key=lambda p: int(p.stem.split("-v")[1]))
SCHEMA_VERSION = 1 + len(UPGRADES)


class StoreError(Exception):
    """The store cannot be used: ``str()`` names the file and what to do."""


@dataclass(frozen=True)
class Queued:
    """A message in the outbox: built once, sent (and resent) as it is until the gateway takes it."""

    seq: int
    control_id: str
    type_name: str
    facts: dict[str, Any]  # what the sent journal says of it


@dataclass(frozen=True)
class PendingDispense:
    """An order the pharmacy accepted: dispensed at ``due`` (reactor seconds)."""

    seq: int
    due: float
    charset: str
    message: bytes
    fillers: list[str]


class Store:
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._conn: sqlite3.Connection | None = None
        self._depth = 0
        self._on_commit: list[Callable[[], None]] = []
        self._on_rollback: list[Callable[[], None]] = []

    # -- life cycle ---------------------------------------------------------------------------------------

    def open(self) -> None:
        """Open (creating, or upgrading, the schema); StoreError when that cannot be done."""
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                # the pharmacy's orders name patients: the file is its owner's alone (SQLite's WAL follows suit)
                os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._conn = conn
            conn.execute("PRAGMA busy_timeout = 0")
            conn.execute("PRAGMA locking_mode = EXCLUSIVE")  # held from the first write until close
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("BEGIN IMMEDIATE")  # takes the exclusive lock now: it is held until close
            conn.execute("COMMIT")
            self._ensure_schema()
        except StoreError:
            self.close()
            raise
        except (sqlite3.Error, OSError) as exc:
            self.close()
            busy = isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)
            raise StoreError(
                f"cannot open the HIS simulator's store {self.path}: "
                + ("another simulator is using it (give each simulator a store of its own: config 'store')"
                   if busy else f"{exc}. Move the file aside to start with a new store.")
            ) from exc
        log.info("his-sim.store-opened", path=self.path, schema_version=SCHEMA_VERSION)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _ensure_schema(self) -> None:
        """Create the schema of a new store, or upgrade an older one, in one transaction."""
        conn = self._conn
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise StoreError(f"the HIS simulator's store {self.path} has schema version {version}, newer than "
                             f"this simulator's ({SCHEMA_VERSION}): run that version, or start with a new store")
        scripts = ([SCHEMA_DIR / "his-sim-v1.sql"] if version == 0 else []) + UPGRADES[max(version, 1) - 1:]
        try:
            conn.executescript("BEGIN EXCLUSIVE;\n"
                               + "\n".join(script.read_text(encoding="utf-8") for script in scripts)
                               + f"\nPRAGMA user_version = {SCHEMA_VERSION};\nCOMMIT;")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if version:
            log.warning("his-sim.store-upgraded", path=self.path, from_version=version, to_version=SCHEMA_VERSION)

    # -- transactions -------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One transaction (a nested use joins the outer one); the hooks run after COMMIT or ROLLBACK."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            self._depth = 0
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            hooks, self._on_rollback, self._on_commit = self._on_rollback, [], []
            for hook in hooks:
                hook()
            raise
        self._depth = 0
        hooks, self._on_commit, self._on_rollback = self._on_commit, [], []
        for hook in hooks:
            hook()

    def after_commit(self, hook: Callable[[], None]) -> None:
        assert self._depth, "after_commit outside a transaction"
        self._on_commit.append(hook)

    def after_rollback(self, hook: Callable[[], None]) -> None:
        assert self._depth, "after_rollback outside a transaction"
        self._on_rollback.append(hook)

    @contextlib.contextmanager
    def changing(self, inventory: Inventory) -> Iterator[None]:
        """A transaction that also writes what changed in ``inventory``: settled after COMMIT, discarded
        (the inventory back as it was) after a ROLLBACK."""
        with self.transaction():
            self.after_rollback(inventory.discard_changes)
            yield
            self._save(inventory.changes())
            self.after_commit(inventory.settle)

    # -- the inventory --------------------------------------------------------------------------------------

    def save_schedules(self, schedules: Iterable[Schedule]) -> None:
        """The schedules as the config describes them now (a renamed doctor is renamed)."""
        with self.transaction():
            self._conn.executemany(
                "INSERT INTO schedules (id, family, given, department_code, department_name, service_code, "
                "service_text, slot_minutes, sessions) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO "
                "UPDATE SET family = excluded.family, given = excluded.given, "
                "department_code = excluded.department_code, department_name = excluded.department_name, "
                "service_code = excluded.service_code, service_text = excluded.service_text, "
                "slot_minutes = excluded.slot_minutes, sessions = excluded.sessions",
                [(s.id, s.family, s.given, s.department_code, s.department_name, s.service_code, s.service_text,
                  s.slot_minutes, ",".join(f"{a:%H:%M}-{b:%H:%M}" for a, b in s.sessions)) for s in schedules])

    def load_inventory(self) -> Inventory:
        """The inventory as last committed: every slot, the live booking on each, the next appointment number."""
        conn = self._conn
        schedules = {
            row[0]: Schedule(id=row[0], family=row[1], given=row[2], department_code=row[3],
                             department_name=row[4], service_code=row[5], service_text=row[6],
                             slot_minutes=row[7], sessions=tuple(parse_session(s) for s in row[8].split(",") if s))
            for row in conn.execute("SELECT id, family, given, department_code, department_name, service_code, "
                                    "service_text, slot_minutes, sessions FROM schedules")
        }
        slots = []
        for row in conn.execute(
                "SELECT s.schedule_id, s.start, s.minutes, s.status, b.appointment_id, b.booked_by, b.placer_id, "
                "b.tentative FROM slots s LEFT JOIN bookings b ON b.schedule_id = s.schedule_id "
                "AND b.start = s.start AND NOT b.cancelled"):
            start = datetime.fromisoformat(row[1])
            booking = None
            if row[4] is not None:
                booking = Booking(appointment_id=row[4], schedule_id=row[0], start=start, by=row[5],
                                  placer_id=row[6], tentative=bool(row[7]))
            slots.append(Slot(schedules[row[0]], start, row[2], SlotStatus(row[3]), booking))
        (number,) = conn.execute("SELECT value FROM counters WHERE name = 'next_appointment'").fetchone()
        return Inventory(slots, next_appointment_number=number)

    def _save(self, changes: Changes) -> None:
        conn = self._conn
        conn.executemany("UPDATE bookings SET cancelled = 1 WHERE appointment_id = ?",
                         [(b.appointment_id,) for b in changes.ended])
        for slot in changes.slots:
            conn.execute("INSERT INTO slots (schedule_id, start, minutes, status) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT (schedule_id, start) DO UPDATE SET status = excluded.status",
                         (slot.schedule.id, slot.start.isoformat(), slot.minutes, slot.status.value))
            b = slot.booking
            if b is not None:
                conn.execute(
                    "INSERT INTO bookings (appointment_id, schedule_id, start, booked_by, placer_id, tentative) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (appointment_id) DO UPDATE SET "
                    "schedule_id = excluded.schedule_id, start = excluded.start, tentative = excluded.tentative",
                    (b.appointment_id, b.schedule_id, b.start.isoformat(), b.by, b.placer_id, int(b.tentative)))
        conn.execute("UPDATE counters SET value = ? WHERE name = 'next_appointment'",
                     (changes.next_appointment_number,))

    # -- answers ------------------------------------------------------------------------------------------

    def answers(self, role: str, limit: int) -> list[tuple[str, str, str, bytes | None]]:
        """The last ``limit`` answers of ``role``, oldest first: (control id, fingerprint, code, answer)."""
        rows = self._conn.execute("SELECT control_id, fingerprint, code, answer FROM answers WHERE role = ? "
                                  "ORDER BY seq DESC LIMIT ?", (role, limit)).fetchall()
        return [(r[0], r[1], r[2], r[3]) for r in reversed(rows)]

    def remember_answer(self, role: str, control_id: str, fingerprint: str, code: str, answer: bytes | None,
                        forget: str | None) -> None:
        """Keep an answer (in the current transaction), forgetting the answer to ``forget``."""
        conn = self._conn
        if forget is not None:
            conn.execute("DELETE FROM answers WHERE role = ? AND control_id = ?", (role, forget))
        conn.execute("INSERT OR REPLACE INTO answers (role, control_id, fingerprint, code, answer) "
                     "VALUES (?, ?, ?, ?, ?)", (role, control_id, fingerprint, code, answer))

    # -- the outbox -----------------------------------------------------------------------------------------

    def queued(self, role: str) -> list[Queued]:
        """The outbox of ``role``, in order."""
        return [Queued(r[0], r[1], r[2], json.loads(r[3])) for r in self._conn.execute(
            "SELECT seq, control_id, type, facts FROM outbox WHERE role = ? ORDER BY seq", (role,))]

    def queue(self, role: str, control_id: str, type_name: str, facts: dict[str, Any], payload: bytes) -> Queued:
        """Put a message in the outbox (in the current transaction)."""
        cursor = self._conn.execute("INSERT INTO outbox (role, control_id, type, facts, payload) "
                                    "VALUES (?, ?, ?, ?, ?)",
                                    (role, control_id, type_name, json.dumps(facts, ensure_ascii=False), payload))
        return Queued(cursor.lastrowid, control_id, type_name, facts)

    def payload(self, seq: int) -> bytes:
        return self._conn.execute("SELECT payload FROM outbox WHERE seq = ?", (seq,)).fetchone()[0]

    def delivered(self, seq: int) -> None:
        """The gateway took this message: it leaves the outbox."""
        with self.transaction():
            self._conn.execute("DELETE FROM outbox WHERE seq = ?", (seq,))

    # -- the pharmacy's accepted orders -----------------------------------------------------------------------

    def add_dispense(self, due: float, charset: str, message: bytes, fillers: list[str]) -> int:
        """An accepted order to dispense at ``due`` (in the current transaction); its seq."""
        return self._conn.execute("INSERT INTO dispenses (due, charset, message, fillers) VALUES (?, ?, ?, ?)",
                                  (due, charset, message, json.dumps(fillers))).lastrowid

    def dispensed(self, seq: int) -> None:
        self._conn.execute("DELETE FROM dispenses WHERE seq = ?", (seq,))

    def pending_dispenses(self) -> list[PendingDispense]:
        return [PendingDispense(r[0], r[1], r[2], r[3], json.loads(r[4])) for r in self._conn.execute(
            "SELECT seq, due, charset, message, fillers FROM dispenses ORDER BY due, seq")]

