"""A HIS endpoint of ``kind: database``: the HIS's own database (中间表/视图), reached with SQLAlchemy Core.

- :class:`DatabaseLink`: the engine and a bounded thread pool (``threads``); every database call runs on that
  pool, never on the reactor thread, and is abandoned after ``statement_timeout`` (the driver's own timeouts
  are set from it too: a call the database never answers ends, and so frees its thread).
- :class:`DatabaseDestination`: the relay's destination (`gateway.relay.Destination`), as `adapters.inner.his.
  HisDestination` is for MLLP.  It reads the booking message the domain wrote (`adapters.maps.his_requests`)
  and writes it as one row of the intermediate table, keyed by the message's control id (the gateway's
  idempotency key, the same on every resend): a row with that key already there is not written again, so a
  resend after a crash, a timeout or a database restart never books twice.  Then it reads the row's status
  column every ``answer_poll`` until the HIS's job writes its answer, within the endpoint's ``ack_timeout``:
  accepted -> AA (with the HIS's appointment number), refused -> AR, failed -> AE (dead-lettered with the
  HIS's text).  No answer in time, or a status code the config does not name: DeliveryFailed (resent; the
  resend finds its row and waits again).  The database unreachable before the row was written (connection
  refused, lost, timed out): HisUnreachable (not an attempt).
- :func:`slot_poller`: reads the HIS's slot view every ``interval`` (`adapters.inner.slot_rows`) — the rows
  changed since the last poll (``change_column``), or the whole window, diffed against the previous poll —
  into slot notices; a bad row is refused with its reason and never applied.
"""

from __future__ import annotations

from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import structlog
from twisted.internet import defer

from adapters.hl7.er7 import Hl7Error, parse
from adapters.inner.slot_rows import SlotRows, SlotRowsPoller, SlotSource, first_line, reason, text
from adapters.inner.threaded import CallTimeout, ThreadedLink
from adapters.maps.his_requests import HisRequest, request_from_srm
from adapters.maps.rds_dispense import prescription_from_rde
from gateway.config.his_database import HisDatabaseConfig, SlotView
from gateway.domain.model import HisAnswer
from gateway.domain.prescriptions import ItemAnswer, OrderAnswer
from gateway.relay import DeliveryFailed, HisUnreachable

log = structlog.get_logger("gateway.inner.database")


class NotConnected(Exception):
    """No connection to the database (refused, timed out, lost): the call never reached it, or the connection
    was lost under it."""


def _connect(engine):
    """A connection, NotConnected when there is none to be had."""
    sa = _sa()
    try:
        return engine.connect()
    except (sa.exc.DBAPIError, sa.exc.TimeoutError) as e:
        orig = getattr(e, "orig", None) or e
        raise NotConnected(f"cannot connect: {type(orig).__name__}: {first_line(orig)}") from e


def _sa():
    """SQLAlchemy, imported when a database endpoint is configured (an optional extra: gatewayd[database])."""
    try:
        import sqlalchemy
    except ImportError:  # pragma: no cover - the extra is installed with the tests
        raise RuntimeError("kind: database needs SQLAlchemy: pip install 'gatewayd[database]' (and the driver: "
                           "'gatewayd[postgresql]' or '[mysql]')") from None
    return sqlalchemy


def _table(name: str, columns):
    """A lightweight table clause (no reflection) for ``name`` or ``schema.name`` with ``columns``."""
    sa = _sa()
    schema, _, table = name.rpartition(".")
    return sa.table(table, *[sa.column(c) for c in dict.fromkeys(columns)], schema=schema or None)


def connect_args(dialect: str, cfg: HisDatabaseConfig) -> dict:
    """The driver's own timeouts, by dialect (each driver names them its own way)."""
    connect, statement = max(1, round(cfg.connect_timeout)), cfg.statement_timeout
    if dialect == "postgresql":
        return {"connect_timeout": connect, "options": f"-c statement_timeout={int(statement * 1000)}"}
    if dialect in ("mysql", "mariadb"):
        return {"connect_timeout": connect, "read_timeout": max(1, round(statement)),
                "write_timeout": max(1, round(statement))}
    if dialect == "sqlite":
        return {"timeout": statement, "check_same_thread": False}
    if dialect == "mssql":
        return {"timeout": connect}
    return {}


class DatabaseLink(ThreadedLink):
    """The HIS's database: an engine with at most ``threads`` connections, and as many threads to use them."""

    def __init__(self, cfg: HisDatabaseConfig, *, peer: str, reactor, engine=None, run=None):
        super().__init__(f"database:{peer}", threads=cfg.threads, timeout=cfg.statement_timeout, reactor=reactor,
                         run=run)
        self.cfg = cfg
        self.peer = peer
        self.engine = engine

    def make_engine(self):
        sa = _sa()
        url = sa.engine.make_url(self.cfg.url)
        if self.cfg.password_file is not None:
            url = url.set(password=self.cfg.password_file.readtext().strip())
        kw = {}
        if url.get_backend_name() != "sqlite":
            kw = {"pool_size": self.cfg.threads, "max_overflow": 0, "pool_timeout": self.cfg.statement_timeout,
                  "pool_recycle": 3600}
        return sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args(url.get_backend_name(), self.cfg),
                                **kw)

    def startService(self):
        if self.engine is None:
            self.engine = self.make_engine()
        super().startService()

    def closed(self) -> None:
        if self.engine is not None:
            self.engine.dispose()

    def call(self, fn, *args) -> defer.Deferred:
        """``fn(engine, *args)`` on the pool; fails with CallTimeout after statement_timeout."""
        return super().call(fn, self.engine, *args)

    def ping(self) -> defer.Deferred:
        """The probe's check (kind database): ``SELECT 1`` (compiled for the site's dialect: Oracle's FROM DUAL)
        on a connection of the pool, on the link's threads; fails with NotConnected, the driver's error or
        CallTimeout."""
        return self.call(_ping)

    def probe(self) -> list[str]:
        """Problems with the tables, columns and codes the config names, found by asking the live database
        (blocking: for ``check-config --probe``), each as 'key: what'."""
        sa = _sa()
        cfg, problems = self.cfg, []
        engine = self.engine or self.make_engine()
        wanted = []
        if cfg.slots is not None:
            wanted.append(("slots.view", cfg.slots.view, _named_columns(cfg.slots.columns) + (
                [cfg.slots.change_column] if cfg.slots.change_column else [])))
        if cfg.bookings is not None:
            wanted.append(("bookings.table", cfg.bookings.table, _named_columns(cfg.bookings.columns)))
        if cfg.prescriptions is not None:
            wanted.append(("prescriptions.table", cfg.prescriptions.table, _named_columns(cfg.prescriptions.columns)))
        try:
            with _connect(engine) as conn:
                for key, name, columns in wanted:
                    try:
                        conn.execute(sa.select(*_table(name, columns).c).where(sa.false())).all()
                    except sa.exc.DBAPIError as e:
                        conn.rollback()
                        problems.append(f"{key}: {name} with the columns {', '.join(columns)}: "
                                        f"{first_line(e.orig)}")
                if cfg.slots is not None and not problems:
                    problems += self._probe_codes(conn)
        except NotConnected as e:
            problems.append(f"url: {e}")
        finally:
            if self.engine is None:
                engine.dispose()
        return problems

    def _probe_codes(self, conn) -> list[str]:
        """The view's status, department and doctor codes that the config does not name."""
        sa = _sa()
        view, problems = self.cfg.slots, []
        codes = view.status_codes
        checks = [("slots.status_codes", view.columns.status, {*codes.free, *codes.booked, *codes.blocked})]
        if self.cfg.department_codes and view.columns.department_code:
            checks.append(("department_codes", view.columns.department_code, set(self.cfg.department_codes)))
        if self.cfg.doctor_codes and view.columns.doctor_code:
            checks.append(("doctor_codes", view.columns.doctor_code, set(self.cfg.doctor_codes)))
        for key, column, known in checks:
            table = _table(view.view, [column])
            found = {text(v) for (v,) in conn.execute(sa.select(table.c[column]).distinct().limit(1000))}
            unknown = sorted(found - known - {""})
            if unknown:
                problems.append(f"{key}: the view {view.view} has codes in {column} this config does not name: "
                                f"{', '.join(unknown[:20])} (their rows would be refused)")
        return problems


def _named_columns(columns) -> list[str]:
    return [v for v in vars(columns).values() if v]


# -- bookings and cancellations ------------------------------------------------------------------------------


def _ping(engine) -> None:
    """On the pool's thread: one round trip to the database."""
    sa = _sa()
    with _connect(engine) as conn:
        conn.execute(sa.select(sa.literal(1))).all()


class DatabaseDestination:
    """The relay's way to a HIS of kind database: a message's rows in an intermediate table (one for a booking or a
    cancellation, one per item for a prescription), its answer read back from their status."""

    def __init__(self, link: DatabaseLink, *, charset: str, tz: ZoneInfo, clock):
        self.link = link
        self.cfg = link.cfg.bookings
        self.charset = charset
        self.tz = tz
        self.local_time = link.cfg.local_time
        self.clock = clock
        self._waiting: defer.Deferred | None = None
        self._timer = None

    def deliver(self, body: bytes, control_id: str, timeout: float) -> defer.Deferred:
        try:
            message = parse(body, self.charset)
            if message.message_code in ("RDE", "OMP"):
                return self._prescription(message, timeout)
            request = request_from_srm(message)
        except Hl7Error as e:  # (the domain's own message: a type routed here that this kind cannot take)
            return defer.succeed(HisAnswer("AE", f"not a request a database HIS takes: {e}"))
        if self.link.cfg.procedures is not None:
            return self._procedure(request)
        if self.cfg is None:
            return defer.succeed(HisAnswer("AE", "this HIS endpoint has no booking table (database.bookings)"))
        action = getattr(self.cfg.action_codes, request.action, None)
        if action is None:
            return defer.succeed(HisAnswer("AR", f"this HIS takes no {request.action} requests "
                                                 f"(database.bookings.action_codes.{request.action})"))
        table = _Rows(self.cfg.table, self.cfg.columns, self.cfg.answer_codes, self.cfg.answer_poll)
        return self._write_and_wait(table, [self._row(request, action)], request.key, request.action, timeout)

    def _procedure(self, request: HisRequest) -> defer.Deferred:
        """A booking or cancellation through the HIS's stored procedure: its answer row read at once (a pending
        status: sent again later, with the same key)."""
        procedures = self.link.cfg.procedures
        statement = getattr(procedures, request.action, None)
        if statement is None:
            return defer.succeed(HisAnswer("AR", f"this HIS takes no {request.action} requests "
                                                 f"(database.procedures.{request.action})"))
        values = {"key": request.key, "placer": request.placer, "schedule_id": request.schedule_id,
                  "start": self._db_start(request), "minutes": request.minutes,
                  "his_appointment": request.his_appointment or None, "patient_id": request.patient_id,
                  "patient_id_type": request.patient_id_type, "patient_name": request.patient_name,
                  "phone": request.phone, "service_code": request.service_code, "reason": request.reason}
        d = self.link.call(_call_procedure, statement, procedures.answer, values)
        d.addErrback(self._write_failed)
        d.addCallback(lambda row: self._procedure_answer(request, row))
        return d

    def _procedure_answer(self, request: HisRequest, row) -> HisAnswer:
        procedures = self.link.cfg.procedures
        if row is None:
            raise DeliveryFailed("the procedure gave no answer row")
        named = dict(zip(procedures.returns, row))
        answer = _Rows("the procedure's answer", None, procedures.answer_codes, 0).answer(
            request.key, [(named.get("status"), named.get("his_appointment"), named.get("message"), None)])
        log.info("his_db.procedure_called", peer=self.link.peer, control_id=request.key, action=request.action,
                 answered=answer is not None)
        if answer is None:
            raise DeliveryFailed("the procedure answered pending: asked again later")
        return answer

    def _db_start(self, request: HisRequest) -> datetime:
        if self.local_time == "utc":
            return request.start_local.replace(tzinfo=self.tz).astimezone(timezone.utc).replace(tzinfo=None)
        return request.start_local

    def _prescription(self, message, timeout: float) -> defer.Deferred:
        rx = self.link.cfg.prescriptions
        if rx is None:
            return defer.succeed(HisAnswer("AE", "this HIS endpoint has no prescription table "
                                                 "(database.prescriptions)"))
        prescription = prescription_from_rde(message)
        table = _Rows(rx.table, rx.columns, rx.answer_codes, rx.answer_poll, items=True)
        rows = [self._item_row(rx.columns, message.control_id, prescription, item) for item in prescription.items]
        return self._write_and_wait(table, rows, message.control_id, "prescription", timeout)

    def _write_and_wait(self, table: "_Rows", rows: list[dict], key: str, action: str, timeout: float):
        deadline = self.clock.seconds() + timeout
        d = self.link.call(_write_rows, table.clause(), table.columns.key, rows, key)
        d.addErrback(self._write_failed)
        d.addCallback(lambda written: self._await_answer(table, key, action, written, deadline))
        return d

    def _now(self) -> datetime:
        now = datetime.fromtimestamp(self.clock.seconds(), self.tz if self.local_time == "naive" else timezone.utc)
        return now.replace(tzinfo=None, microsecond=0)

    def _row(self, request: HisRequest, action: str) -> dict:
        c = self.cfg.columns
        values = {c.key: request.key, c.action: action, c.status: self.cfg.answer_codes.pending,
                  c.schedule_id: request.schedule_id, c.start: self._db_start(request)}
        optional = {c.placer: request.placer, c.patient_id: request.patient_id,
                    c.patient_id_type: request.patient_id_type, c.patient_name: request.patient_name,
                    c.phone: request.phone, c.service_code: request.service_code, c.reason: request.reason,
                    c.his_appointment: request.his_appointment or None, c.created: self._now()}
        values.update({k: v for k, v in optional.items() if k})
        return values

    def _item_row(self, c, key: str, p, item) -> dict:
        values = {c.key: key, c.item: item.placer_id, c.status: self.link.cfg.prescriptions.answer_codes.pending,
                  c.number: p.number, c.drug_code: item.medication.code, c.quantity: item.dispense_value}
        identifier = p.patient.identifiers[0].value if p.patient.identifiers else ""
        optional = {c.drug_name: item.medication.text, c.dose: item.dose_value,
                    c.dose_unit: item.dose_unit.text or item.dose_unit.code, c.route: item.route.code,
                    c.frequency: item.frequency.code, c.quantity_unit: item.dispense_unit.text or item.dispense_unit.code,
                    c.days: item.days_supply, c.instructions: item.instructions, c.patient_id: identifier,
                    c.patient_name: p.patient.family + p.patient.given, c.prescriber_id: p.prescriber.id,
                    c.prescriber_name: p.prescriber.name, c.created: self._now()}
        values.update({k: v for k, v in optional.items() if k})
        return values

    @staticmethod
    def _write_failed(failure):
        reason = _reason(failure)
        if failure.check(CallTimeout, NotConnected) or getattr(failure.value, "connection_invalidated", False):
            raise HisUnreachable(reason)
        raise DeliveryFailed(reason)  # the database took the call and failed it (a wrong column, a value too long)

    def _await_answer(self, table: "_Rows", key: str, action: str, written: bool, deadline: float):
        log.info("his_db.request_written" if written else "his_db.request_found", peer=self.link.peer,
                 control_id=key, action=action)
        waiting = self._waiting = defer.Deferred(canceller=lambda d: self._cancel_timer())
        self._poll_answer(table, key, deadline, waiting)
        return waiting

    def _poll_answer(self, table: "_Rows", key: str, deadline: float, waiting: defer.Deferred) -> None:
        self._timer = None
        if waiting.called:
            return
        d = self.link.call(_read_answers, table.clause(), table.columns, key)

        def read(rows):
            if waiting.called:
                return
            answer = table.answer(key, rows)
            if answer is not None:
                self._finish(waiting, answer)
            elif self.clock.seconds() + table.poll > deadline:
                self._finish(waiting, DeliveryFailed(
                    f"no answer from the HIS in {table.name} within the deadline (status still pending)"))
            else:
                self._timer = self.clock.callLater(table.poll, self._poll_answer, table, key, deadline, waiting)

        def failed(failure):
            if not waiting.called:
                self._finish(waiting, DeliveryFailed(_reason(failure)))

        d.addCallbacks(read, failed)
        d.addErrback(lambda f: self._finish(waiting, DeliveryFailed(_reason(f))) if not waiting.called else None)

    def _finish(self, waiting: defer.Deferred, result) -> None:
        self._cancel_timer()
        if self._waiting is waiting:
            self._waiting = None
        if isinstance(result, Exception):
            waiting.errback(result)
        else:
            waiting.callback(result)

    def _cancel_timer(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def close(self) -> defer.Deferred:
        """Fails the delivery in flight (the relay resends it after a restart: it finds its rows)."""
        if self._waiting is not None and not self._waiting.called:
            self._finish(self._waiting, HisUnreachable("the database link was closed"))
        return defer.succeed(None)


class _Rows:
    """One intermediate table: its rows for a message and what their status columns say."""

    def __init__(self, name: str, columns, codes, poll: float, items: bool = False):
        self.name, self.columns, self.codes, self.poll, self.items = name, columns, codes, poll, items

    def clause(self):
        return _table(self.name, _named_columns(self.columns))

    def answer(self, key: str, rows: list[tuple]) -> HisAnswer | None:
        """The HIS's answer in the rows (status, HIS number, text, item), None while one is pending;
        DeliveryFailed for rows gone or a status unknown."""
        if not rows:
            raise DeliveryFailed(f"the rows with key {key} are gone from {self.name}")
        codes, read = self.codes, []
        for status, number, text_, item in rows:
            status = "" if status is None else str(status).strip()
            if status == codes.pending:
                return None
            if status not in (*codes.accepted, *codes.refused, *codes.failed):
                raise DeliveryFailed(f"unknown status code {status!r} in {self.name} (answer_codes)")
            read.append((status, text(number) or None, text(text_), text(item)))
        refused = [r for r in read if r[0] in codes.refused]
        failed = [r for r in read if r[0] in codes.failed]
        if failed:
            return HisAnswer("AE", failed[0][2] or f"failed at the HIS (status {failed[0][0]})")
        order = None
        if self.items:
            order = OrderAnswer(acknowledges=key, code="AR" if refused else "AA", accepted=not refused,
                                reason=refused[0][2] if refused else "",
                                items=tuple(ItemAnswer(item, number or "", "UA" if status in codes.refused else "OK")
                                            for status, number, _t, item in read))
        if refused:
            return HisAnswer("AR", refused[0][2] or f"refused by the HIS (status {refused[0][0]})", order=order)
        return HisAnswer("AA", read[0][2], his_appointment=None if self.items else read[0][1], order=order)


def _reason(failure) -> str:
    if failure.check(DeliveryFailed, NotConnected):
        return str(failure.value)
    return reason(failure)


def _write_rows(engine, table, key_column: str, rows: list[dict], key: str) -> bool:
    """On the pool's thread: a message's rows in one transaction, unless rows with its key are there; True when
    written now."""
    sa = _sa()
    with _connect(engine) as conn, conn.begin():
        if conn.execute(sa.select(table.c[key_column]).where(table.c[key_column] == key).limit(1)).first():
            return False
        try:
            with conn.begin_nested():
                for row in rows:
                    conn.execute(sa.insert(table).values({table.c[k]: v for k, v in row.items()}))
        except sa.exc.IntegrityError:  # written by a resend at the same moment (the unique index on the key)
            if conn.execute(sa.select(table.c[key_column]).where(table.c[key_column] == key).limit(1)).first() is None:
                raise
            return False
    return True


def _call_procedure(engine, statement: str, answer: str | None, values: dict):
    """On the pool's thread: the procedure's call, then its answer row (its own, or ``answer``'s on the same
    connection), in one transaction."""
    sa = _sa()
    with _connect(engine) as conn, conn.begin():
        result = conn.execute(sa.text(statement), values)
        row = result.first() if result.returns_rows else None
        if answer is not None:
            row = conn.execute(sa.text(answer)).first()
    return None if row is None else tuple(row)


def _read_answers(engine, table, c, key: str) -> list[tuple]:
    """On the pool's thread: (status, HIS number, text, item) of each of the message's rows."""
    sa = _sa()
    number = getattr(c, "his_appointment", None) or getattr(c, "his_order", None)
    item = getattr(c, "item", None)
    cols = [table.c[c.status], table.c[number] if number else sa.null(),
            table.c[c.message] if c.message else sa.null(), table.c[item] if item else sa.null()]
    with _connect(engine) as conn:
        return [tuple(r) for r in conn.execute(sa.select(*cols).where(table.c[c.key] == key))]


# -- slots ---------------------------------------------------------------------------------------------------


def slot_poller(link: DatabaseLink, inbound, *, tz: ZoneInfo, clock) -> SlotRowsPoller:
    """The reader of the HIS's slot view (``database.slots``): by change marker, or the window diffed."""
    view = link.cfg.slots
    source = SlotSource(read=lambda window, marker: link.call(_read_slots, view, window, marker),
                        name=f"db:{view.view}", columns=view.columns, status_codes=view.status_codes,
                        interval=view.interval, window_days=view.window_days, departments=link.cfg.department_codes,
                        doctors=link.cfg.doctor_codes, local_time=link.cfg.local_time,
                        marked=view.change_column is not None)
    return SlotRowsPoller(link.peer, source, inbound, tz=tz, clock=clock)


def _read_slots(engine, view: SlotView, window: tuple[datetime, datetime], marker) -> SlotRows:
    """On the pool's thread: the view's rows (by the config's domain keys), changed since ``marker`` or in the
    window."""
    sa = _sa()
    names = {k: v for k, v in vars(view.columns).items() if v}
    change = view.change_column
    table = _table(view.view, list(names.values()) + ([change] if change else []))
    query = sa.select(*[table.c[v].label(k) for k, v in names.items()],
                      *([table.c[change].label("__change")] if change else []))
    start = table.c[view.columns.start]
    query = query.where(sa.or_(start >= window[0], start.is_(None)))  # (a NULL start is refused, not unseen)
    if change:
        if marker is not None:
            query = query.where(table.c[change] > marker)
        query = query.order_by(table.c[change]).limit(view.max_rows)
    else:
        query = query.where(start < window[1]).limit(view.max_rows + 1)
    with _connect(engine) as conn:
        rows = [dict(r._mapping) for r in conn.execute(query)]
    if not change:
        return SlotRows(rows[:view.max_rows], overflow=len(rows) > view.max_rows)
    new_marker = marker
    if rows:
        last = rows[-1]["__change"]
        if len(rows) == view.max_rows and rows[0]["__change"] != last:
            rows = [r for r in rows if r["__change"] != last]  # the rest of that change comes next poll, whole
        new_marker = rows[-1]["__change"]
    for r in rows:
        r.pop("__change")
    return SlotRows(rows, new_marker)
