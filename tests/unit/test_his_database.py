"""A HIS endpoint of kind database (adapters/inner/database.py), on SQLite through SQLAlchemy: the booking row
written once per control id whatever the resends, the HIS's answer read back from the row within the deadline,
the slot view read into notices (by change marker, or by diffing the window), bad rows refused with their
reason and never applied, and the config's checks.  Database calls run at once here (no threads: the link's
``run``); the real thread pool and real PostgreSQL / MariaDB servers are in tests/e2e/test_his_database_e2e.py.
"""

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from twisted.internet import defer, task

from adapters.inner.database import DatabaseDestination, DatabaseLink, slot_poller
from adapters.maps.his_requests import request_from_srm
from adapters.hl7.er7 import parse
from adapters.maps.srm_booking import Hl7Header, build_srm
from gateway.config.his_database import (BookingColumns, BookingTable, HisDatabaseConfig, SlotColumns,
                                         SlotStatusCodes, SlotView, ActionCodes, AnswerCodes)
from gateway.domain.model import HisAnswer, Patient, PatientIdentifier, SlotForHis
from gateway.relay import DeliveryFailed, HisUnreachable
from tests.deferreds import assertNoResult, failureResultOf, successResultOf
from tests.unit.config_files import load, problems

TZ = ZoneInfo("Asia/Shanghai")
HEADER = Hl7Header("GATEWAYD", "FRONT", "HIS", "HOSPITAL")
SLOT = SlotForHis("PB001", datetime(2026, 12, 8, 9, 0), 15, "PT", "普通号", "D01")
PATIENT = Patient((PatientIdentifier("urn:oid:2.16.156.10011.1.5", "110101199001011234", "NNCHN"),), "张", "三",
                  "13800000000")

# the vendor's layout, with Chinese column names as many HIS have them
SCHEMA = """
CREATE TABLE 预约中间表 (流水号 TEXT NOT NULL UNIQUE, 操作 TEXT, 状态 TEXT, 排班号 TEXT, 就诊时间 TIMESTAMP,
                        预约号 TEXT, 患者证件号 TEXT, 证件类型 TEXT, 患者姓名 TEXT, 电话 TEXT, 说明 TEXT, 平台单号 TEXT);
CREATE TABLE 号源视图 (排班号 TEXT, 开始时间 TIMESTAMP, 时长 INTEGER, 状态 TEXT, 科室代码 TEXT, 科室名称 TEXT,
                      医生代码 TEXT, 医生姓名 TEXT, 号别 TEXT, 更新序号 INTEGER);
"""

BOOKINGS = BookingTable(
    table="预约中间表",
    columns=BookingColumns(key="流水号", action="操作", status="状态", schedule_id="排班号", start="就诊时间",
                           placer="平台单号", his_appointment="预约号", patient_id="患者证件号",
                           patient_id_type="证件类型", patient_name="患者姓名", phone="电话", message="说明"),
    answer_poll=0.5)
SLOTS = SlotView(view="号源视图", columns=SlotColumns(
    schedule_id="排班号", start="开始时间", status="状态", minutes="时长", department_code="科室代码",
    department_name="科室名称", doctor_code="医生代码", doctor_name="医生姓名", service_code="号别"),
    status_codes=SlotStatusCodes(free=["0"], booked=["1"], blocked=["9"]), change_column="更新序号", interval=5)


def now_run(fn, engine, *args):
    """The link's calls, at once on this thread (the unit tests' stand-in for the pool)."""
    return defer.maybeDeferred(fn, engine, *args)


@pytest.fixture
def db(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'his.db'}")
    with engine.begin() as conn:
        for statement in SCHEMA.split(";"):
            if statement.strip():
                conn.exec_driver_sql(statement)
    yield engine
    engine.dispose()


def link_for(engine, **cfg) -> DatabaseLink:
    config = HisDatabaseConfig(url="sqlite://", **{"bookings": BOOKINGS, "slots": SLOTS, **cfg})
    link = DatabaseLink(config, peer="his", reactor=None, engine=engine, run=now_run)
    link.startService()
    return link


def destination(engine, **cfg):
    clock = task.Clock()
    clock.advance(1_765_000_000)
    return DatabaseDestination(link_for(engine, **cfg), charset="utf-8", tz=TZ, clock=clock), clock


def srm(trigger="S01", control_id="G000000000000000001", **kw) -> bytes:
    return build_srm(trigger, header=HEADER, control_id=control_id, appointment_id="a1", slot=SLOT,
                     patient=PATIENT, now=datetime(2026, 12, 7, 10, 0), **kw)


def rows(engine, table="预约中间表"):
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.exec_driver_sql(f"SELECT * FROM {table}")]


def his_answers(engine, status, appointment=None, text=None):
    """The HIS's job: answers every pending row."""
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE 预约中间表 SET 状态 = :s, 预约号 = coalesce(:a, 预约号), 说明 = :t "
                             "WHERE 状态 = '0'"), {"s": status, "a": appointment, "t": text})


# -- the request read from the stored message -------------------------------------------------------------------

def test_the_booking_message_reads_back_as_the_request_the_table_takes():
    """SRM^S01 -> book (S04 -> cancel with the HIS's number, ARQ-8 Tentative -> hold), keyed by MSH-10."""
    book = request_from_srm(parse(srm()))
    assert (book.action, book.key, book.placer, book.schedule_id, book.start_local, book.minutes) == (
        "book", "G000000000000000001", "a1", "PB001", datetime(2026, 12, 8, 9, 0), 15)
    assert (book.patient_id, book.patient_id_type, book.patient_name, book.phone) == (
        "110101199001011234", "NNCHN", "张三", "13800000000")
    cancel = request_from_srm(parse(srm("S04", his_appointment="H77", reason="改期")))
    assert (cancel.action, cancel.his_appointment, cancel.reason) == ("cancel", "H77", "改期")
    assert request_from_srm(parse(srm(appointment_type="Tentative"))).action == "hold"


# -- bookings: written once, answered from the row ---------------------------------------------------------------

def test_a_booking_is_one_row_and_the_his_answer_is_read_back(db):
    """The row goes in pending with the gateway's key; the HIS's job accepts it; the answer carries its number."""
    dest, clock = destination(db)
    d = dest.deliver(srm(), "G000000000000000001", timeout=10)
    [row] = rows(db)
    assert (row["流水号"], row["操作"], row["状态"], row["排班号"], row["患者姓名"]) == (
        "G000000000000000001", "1", "0", "PB001", "张三")
    assert str(row["就诊时间"]).startswith("2026-12-08 09:00")
    clock.advance(0.5)
    assertNoResult(d)  # still pending at the HIS
    his_answers(db, "1", appointment="H1001", text="预约成功")
    clock.advance(0.5)
    answer = successResultOf(d)
    assert (answer.code, answer.his_appointment, answer.text) == ("AA", "H1001", "预约成功")


def test_a_resend_finds_its_row_and_never_writes_twice(db):
    """After a timeout (or a crash) the relay sends the same message again: the same key, no second row, and
    the answer the HIS wrote meanwhile is the answer."""
    dest, clock = destination(db)
    first = dest.deliver(srm(), "G000000000000000001", timeout=2)
    clock.advance(2.5)
    assert "within the deadline" in str(failureResultOf(first, DeliveryFailed).value)
    his_answers(db, "1", appointment="H1002")
    again = dest.deliver(srm(), "G000000000000000001", timeout=2)
    assert successResultOf(again).his_appointment == "H1002"
    assert len(rows(db)) == 1


def test_refused_failed_and_unknown_answers(db):
    """Refused -> AR with the HIS's text; failed -> AE; a status the config does not name -> DeliveryFailed (a
    resend, and a dead letter once the attempts are used up), never taken as an answer."""
    for n, (status, expected) in enumerate([("2", "AR"), ("7", DeliveryFailed)]):
        dest, clock = destination(db)
        d = dest.deliver(srm(control_id=f"G00000000000000010{n}"), f"G00000000000000010{n}", timeout=5)
        his_answers(db, status, text="号源已满")
        clock.advance(0.5)
        if expected is DeliveryFailed:
            assert "unknown status code '7'" in str(failureResultOf(d, DeliveryFailed).value)
        else:
            assert successResultOf(d) == HisAnswer("AR", "号源已满")
    dest, clock = destination(db, bookings=BookingTable(table=BOOKINGS.table, columns=BOOKINGS.columns,
                                                        answer_codes=AnswerCodes(failed=["8"])))
    for key, status, expected in [("G000000000000000200", "2", ("AR", "refused by the HIS (status 2)")),
                                  ("G000000000000000201", "8", ("AE", "failed at the HIS (status 8)"))]:
        d = dest.deliver(srm(control_id=key), key, timeout=5)
        with db.begin() as conn:
            conn.execute(sa.text("UPDATE 预约中间表 SET 状态 = :s WHERE 流水号 = :k"), {"s": status, "k": key})
        clock.advance(0.5)
        answer = successResultOf(d)
        assert (answer.code, answer.text) == expected


def test_a_cancellation_names_the_his_appointment_and_a_hold_without_a_code_is_refused(db):
    dest, clock = destination(db)
    d = dest.deliver(srm("S04", control_id="G000000000000000301", his_appointment="H1001"), "G000000000000000301",
                     timeout=5)
    [row] = rows(db)
    assert (row["操作"], row["预约号"]) == ("2", "H1001")
    his_answers(db, "1")
    clock.advance(0.5)
    assert successResultOf(d).code == "AA"
    hold = successResultOf(dest.deliver(srm(control_id="G000000000000000302", appointment_type="Tentative"),
                                        "G000000000000000302", 5))
    assert hold.code == "AR" and "action_codes.hold" in hold.text
    assert len(rows(db)) == 1
    dest, _ = destination(db, bookings=BookingTable(table=BOOKINGS.table, columns=BOOKINGS.columns,
                                                    action_codes=ActionCodes(hold="3")))
    dest.deliver(srm(control_id="G000000000000000303", appointment_type="Tentative"), "G000000000000000303", 5)
    assert [r["操作"] for r in rows(db)] == ["2", "3"]


def test_an_unreachable_database_is_not_an_attempt_and_a_wrong_column_is(tmp_path, db):
    """No connection: HisUnreachable (the message waits, never dead-lettered for it).  The database answering
    with an error (a column the HIS's table does not have): DeliveryFailed, with the database's reason."""
    gone = sa.create_engine(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}")
    dest, _ = destination(gone)
    failure = failureResultOf(dest.deliver(srm(), "G000000000000000001", 5), HisUnreachable)
    assert "OperationalError" in str(failure.value)
    wrong = BookingTable(table=BOOKINGS.table, columns=BookingColumns(
        key="流水号", action="操作", status="状态", schedule_id="排班号", start="没有这列"))
    dest, _ = destination(db, bookings=wrong)
    failure = failureResultOf(dest.deliver(srm(), "G000000000000000001", 5), DeliveryFailed)
    assert not failure.check(HisUnreachable) and "没有这列" in str(failure.value)
    assert rows(db) == []


def test_closing_fails_the_delivery_in_flight(db):
    """The relay closes its lanes on stop: the message waiting for its answer is failed (resent on restart)."""
    dest, _ = destination(db)
    d = dest.deliver(srm(), "G000000000000000001", 5)
    dest.close()
    failureResultOf(d, HisUnreachable)


# -- slots: the view read into notices ---------------------------------------------------------------------------

class Inbound:
    """Records what the poller hands the inbound service (the domain's side is tested in test_booking)."""

    def __init__(self):
        self.accepted, self.refused = [], []

    def accept(self, received, notices):
        self.accepted.append((received, notices))
        return defer.succeed(None)

    def refuse(self, received, code, text):
        self.refused.append((received, code, text))
        return defer.succeed(None)


def put_slots(engine, *slots):
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO 号源视图 VALUES (:id, :start, :min, :st, :dept, '内科', :doc, '李医生', "
                             "'PT', :seq)"), [dict(zip(("id", "start", "min", "st", "dept", "doc", "seq"), s))
                                              for s in slots])


def poller(engine, **cfg):
    clock = task.Clock()
    clock.advance(datetime(2026, 12, 7, 8, 0, tzinfo=TZ).timestamp())
    inbound = Inbound()
    return slot_poller(link_for(engine, **cfg), inbound, tz=TZ, clock=clock), inbound, clock


def test_the_view_is_read_by_change_marker(db):
    """The first poll reads every row of the window, the next only the rows changed since; each row is a notice
    (free -> open, booked -> book with the HIS's number, blocked -> block)."""
    put_slots(db, ("PB1", "2026-12-08 09:00:00", 15, "0", "0101", "D01", 1),
              ("PB1", "2026-12-08 09:15:00", 15, "1", "0101", "D01", 2),
              ("PB1", "2026-12-06 09:00:00", 15, "0", "0101", "D01", 3))  # (the day before yesterday: not read)
    p, inbound, _ = poller(db)
    assert successResultOf(p.poll()) == 2
    [(received, notices)] = inbound.accepted
    assert received.type == "DB^SLOTS" and received.sender == "db:号源视图"
    assert [(n.action, n.start_local.hour, n.start_local.minute) for n in notices] == [("open", 9, 0),
                                                                                        ("book", 9, 15)]
    assert (notices[0].schedule.department_code, notices[0].schedule.practitioner_name) == ("0101", "李医生")
    assert successResultOf(p.poll()) == 0 and len(inbound.accepted) == 1
    with db.begin() as conn:
        conn.exec_driver_sql("UPDATE 号源视图 SET 状态 = '9', 更新序号 = 4 WHERE 开始时间 = '2026-12-08 09:00:00'")
    assert successResultOf(p.poll()) == 1
    assert [n.action for n in inbound.accepted[-1][1]] == ["block"]


def test_bad_rows_are_refused_with_the_reason_and_the_others_applied(db):
    """A NULL start, an unknown status, an unknown department: each recorded refused with why; nothing of them
    applied, and the good row applied."""
    put_slots(db, ("PB1", None, 15, "0", "0101", "D01", 1),
              ("PB1", "2026-12-08 09:15:00", 15, "5", "0101", "D01", 2),
              ("PB1", "2026-12-08 09:30:00", 15, "0", "9999", "D01", 3),
              ("PB1", "2026-12-08 09:45:00", 15, "0", "0101", "D01", 4))
    p, inbound, _ = poller(db, department_codes={"0101": "内科"})
    assert successResultOf(p.poll()) == 1
    reasons = [text for _, _, text in inbound.refused]
    assert reasons == ["开始时间 (start) is NULL", "unknown status code '5' in 状态 (slots.status_codes)",
                       "unknown department code '9999' in 科室代码 (department_codes)"]
    assert all(code == "AR" and r.type == "DB^SLOT" for r, code, _ in inbound.refused)
    assert [n.start_local.minute for n in inbound.accepted[0][1]] == [45]


def test_without_a_change_column_the_window_is_diffed(db):
    """Only rows that changed since the last read are applied; a slot that left the view is closed; a window
    with more rows than max_rows is refused whole (never applied in part)."""
    view = SlotView(view=SLOTS.view, columns=SLOTS.columns, status_codes=SLOTS.status_codes, max_rows=2)
    put_slots(db, ("PB1", "2026-12-08 09:00:00", 15, "0", "0101", "D01", None),
              ("PB1", "2026-12-08 09:15:00", 15, "0", "0101", "D01", None))
    p, inbound, _ = poller(db, slots=view)
    assert successResultOf(p.poll()) == 2
    assert successResultOf(p.poll()) == 0
    with db.begin() as conn:
        conn.exec_driver_sql("UPDATE 号源视图 SET 状态 = '1' WHERE 开始时间 = '2026-12-08 09:00:00'")
        conn.exec_driver_sql("DELETE FROM 号源视图 WHERE 开始时间 = '2026-12-08 09:15:00'")
    assert successResultOf(p.poll()) == 2
    assert sorted((n.action, n.start_local.minute) for n in inbound.accepted[-1][1]) == [("block", 15), ("book", 0)]
    put_slots(db, ("PB1", "2026-12-08 10:00:00", 15, "5", "0101", "D01", None))  # a bad row: refused once
    successResultOf(p.poll())
    successResultOf(p.poll())
    assert [text for _, _, text in inbound.refused] == ["unknown status code '5' in 状态 (slots.status_codes)"]
    put_slots(db, *[("PB2", f"2026-12-09 1{i}:00:00", 15, "0", "0101", "D01", None) for i in range(3)])
    assert successResultOf(p.poll()) == 0 and len(inbound.accepted) == 2


def test_a_change_marker_batch_never_splits_one_change(db):
    """max_rows reached inside rows sharing one marker value: those rows wait for the next poll, whole."""
    put_slots(db, ("PB1", "2026-12-08 09:00:00", 15, "0", "0101", "D01", 1),
              ("PB1", "2026-12-08 09:15:00", 15, "0", "0101", "D01", 2),
              ("PB1", "2026-12-08 09:30:00", 15, "0", "0101", "D01", 2))
    view = SlotView(view=SLOTS.view, columns=SLOTS.columns, status_codes=SLOTS.status_codes,
                    change_column="更新序号", max_rows=2)
    p, inbound, _ = poller(db, slots=view)
    assert successResultOf(p.poll()) == 1
    assert successResultOf(p.poll()) == 2
    assert successResultOf(p.poll()) == 0


def test_the_poller_polls_on_its_interval_and_survives_a_failure(tmp_path):
    """A poll that fails (no database) is logged and the next comes at the interval."""
    gone = sa.create_engine(f"sqlite:///{tmp_path / 'no' / 'such.db'}")
    p, inbound, clock = poller(gone)
    p.startService()
    clock.advance(0)
    clock.advance(SLOTS.interval)
    assert p.polls == 0 and len(clock.getDelayedCalls()) == 1
    p.stopService()
    assert clock.getDelayedCalls() == []


# -- the config ------------------------------------------------------------------------------------------------

DB_HEAD = """
inner:
  his:
    name: hisdb
    kind: database
    database:
      url: postgresql+psycopg://gw@10.1.2.5/his
      bookings:
        table: 预约中间表
        columns: {key: 流水号, action: 操作, status: 状态, schedule_id: 排班号, start: 就诊时间}
      slots:
        view: 号源视图
        columns: {schedule_id: 排班号, start: 开始时间, status: 状态, minutes: 时长, department_code: 科室代码}
        status_codes: {free: ['0']}
outer:
  his_name: hisdb
  tls: {certificate: certs/server.pem, private_key: certs/server.key, client_ca: certs/ca.pem}
platforms: [{name: p1, certificate_subject: CN=p1}]
"""


def test_a_database_endpoint_loads(config_dir):
    config = load(config_dir, "", head=DB_HEAD)
    his = config.inner.his
    assert (his.kind, his.host, his.database.bookings.table, his.database.slots.status_codes.free) == (
        "database", None, "预约中间表", ["0"])


def test_database_config_errors_name_line_and_key(config_dir):
    found = problems(config_dir, "", head=DB_HEAD.replace("postgresql+psycopg://gw@", "postgresql://gw:secret@")
                     .replace("minutes: 时长", "minutes: 时长, end: 结束时间"))
    assert found == ["7:inner.his.database.url: the URL carries a password: put it in password_file instead",
                     "13:inner.his.database.slots.columns.minutes: give the slot's length as either minutes or end "
                     "(one of the two)"]
    found = problems(config_dir, "", head=DB_HEAD.replace("    kind: database\n", ""))
    assert found[:2] == ["4:inner.his.host: missing required key 'host' (kind: mllp)",
                         "4:inner.his.port: missing required key 'port' (kind: mllp)"]
    found = problems(config_dir, "inner: {his: {host: h, port: 1, kind: database}}\n", head="")
    assert found[0].endswith("inner.his.database: kind: database needs database (how to reach the HIS: "
                             "docs/his-adapters.md)")


def test_check_config_probe_asks_the_live_database(config_dir, tmp_path, db, capsys):
    """`check-config --probe`: a column the table does not have, and codes in the view the config does not name,
    are reported with their key path; the database unreachable too; a config that matches is ok."""
    from gateway.cli import check_config

    put_slots(db, ("PB1", "2026-12-08 09:00:00", 15, "5", "0101", "D01", 1),
              ("PB1", "2026-12-08 09:15:00", 15, "0", "0202", "D01", 2))
    head = DB_HEAD.replace("postgresql+psycopg://gw@10.1.2.5/his", f"sqlite:///{tmp_path / 'his.db'}")
    path = config_dir / "probe.yaml"
    path.write_text(head.replace("start: 就诊时间}", "start: 就诊日期}").replace(
        "    database:\n", "    database:\n      department_codes: {'0101': 内科}\n"), encoding="utf-8")
    assert check_config(path) == 0  # (without --probe the database is not asked)
    assert check_config(path, probe=True) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "inner.his.database.bookings.table: 预约中间表 with the columns" in err[0]
    assert "就诊日期" in err[0]
    path.write_text(head.replace("    database:\n", "    database:\n      department_codes: {'0101': 内科}\n"),
                    encoding="utf-8")
    assert check_config(path, probe=True) == 1
    err = capsys.readouterr().err.splitlines()
    assert [e.split(": ", 1)[1] for e in err] == [
        "inner.his.database.slots.status_codes: the view 号源视图 has codes in 状态 this config does not name: 5 "
        "(their rows would be refused)",
        "inner.his.database.department_codes: the view 号源视图 has codes in 科室代码 this config does not name: "
        "0202 (their rows would be refused)"]
    with db.begin() as conn:
        conn.exec_driver_sql("DELETE FROM 号源视图")
    assert check_config(path, probe=True) == 0
    path.write_text(head.replace(str(tmp_path / "his.db"), str(tmp_path / "no" / "such.db")), encoding="utf-8")
    assert check_config(path, probe=True) == 1
    assert "inner.his.database.url: cannot connect" in capsys.readouterr().err


def test_the_worked_config_in_the_docs_loads(config_dir):
    """docs/his-adapters.md's config for a view-and-table HIS with Chinese column names is a valid config (its
    password file given), naming the columns the simulator's layout has."""
    from pathlib import Path

    from hissim.database import tables

    text = (Path(__file__).resolve().parents[2] / "docs" / "his-adapters.md").read_text(encoding="utf-8")
    block = text.split("The gateway's config for it:\n\n```yaml\n", 1)[1].split("```", 1)[0]
    (config_dir / "his-db.password").write_text("secret\n")
    config = load(config_dir, block.replace("/etc/gatewayd/his-db.password", "his-db.password"),
                  head="outer:\n  tls: {certificate: certs/server.pem, private_key: certs/server.key, "
                       "client_ca: certs/ca.pem}\nplatforms: [{name: p1, certificate_subject: CN=p1}]\n")
    database = config.inner.his.database
    slots, requests, _prescriptions = tables(sa.MetaData())
    assert set(vars(database.bookings.columns).values()) - {None} <= set(requests.columns.keys())
    assert set(vars(database.slots.columns).values()) - {None} <= set(slots.columns.keys())


RX_SCHEMA = ("CREATE TABLE 处方中间表 (流水号 TEXT NOT NULL, 明细号 TEXT NOT NULL, 状态 TEXT, 处方号 TEXT, 药品代码 TEXT, "
             "数量 TEXT, 医嘱号 TEXT, 说明 TEXT, UNIQUE (流水号, 明细号))")


def test_a_prescription_is_one_row_per_item_and_its_answer_an_order_answer(db):
    """The golden RDE^O11 (three items) -> three rows under the message's key, written once whatever the resends;
    every item accepted -> AA with each item's HIS order number; one refused -> AR for the prescription."""
    from pathlib import Path

    from gateway.config.his_database import PrescriptionColumns, PrescriptionTable

    golden = (Path(__file__).resolve().parents[1] / "golden" / "pharmacy" / "rde_o11_bundle.utf8.hl7")
    rde = golden.read_bytes().replace(b"\n", b"\r")
    key = parse(rde).control_id
    with db.begin() as conn:
        conn.exec_driver_sql(RX_SCHEMA)
    rx = PrescriptionTable(table="处方中间表", columns=PrescriptionColumns(
        key="流水号", item="明细号", status="状态", number="处方号", drug_code="药品代码", quantity="数量",
        his_order="医嘱号", message="说明"))
    dest, clock = destination(db, prescriptions=rx)
    d = dest.deliver(rde, key, timeout=5)
    items = rows(db, "处方中间表")
    assert len(items) == 3 and {r["流水号"] for r in items} == {key} and {r["状态"] for r in items} == {"0"}
    assert "Y0002" in {r["药品代码"] for r in items}
    with db.begin() as conn:
        conn.exec_driver_sql("UPDATE 处方中间表 SET 状态 = '1', 医嘱号 = 'R' || 明细号 WHERE 明细号 <> ''")
        conn.exec_driver_sql(f"UPDATE 处方中间表 SET 状态 = '0' WHERE 明细号 = '{items[2]['明细号']}'")
    clock.advance(0.5)
    assertNoResult(d)  # (one item still pending)
    with db.begin() as conn:
        conn.exec_driver_sql("UPDATE 处方中间表 SET 状态 = '1', 医嘱号 = 'R' || 明细号")
    clock.advance(0.5)
    answer = successResultOf(d)
    assert answer.code == "AA" and answer.order.accepted
    assert [(i.placer_id, i.filler_id) for i in answer.order.items] == [(r["明细号"], "R" + r["明细号"]) for r in items]
    again = successResultOf(dest.deliver(rde, key, timeout=5))
    assert again.code == "AA" and len(rows(db, "处方中间表")) == 3
    with db.begin() as conn:
        conn.exec_driver_sql(f"UPDATE 处方中间表 SET 状态 = '2', 说明 = '本院无此药品' WHERE 明细号 = '{items[1]['明细号']}'")
    refused = successResultOf(dest.deliver(rde, key, timeout=5))
    assert (refused.code, refused.text, refused.order.accepted) == ("AR", "本院无此药品", False)


def test_a_row_that_changes_twice_between_polls_is_applied_as_it_is(db):
    """Booked and then closed between two reads: one notice, the row's state at the read (closed); no half."""
    put_slots(db, ("PB1", "2026-12-08 09:00:00", 15, "0", "0101", "D01", 1))
    p, inbound, _ = poller(db)
    successResultOf(p.poll())
    with db.begin() as conn:
        conn.exec_driver_sql("UPDATE 号源视图 SET 状态 = '1', 更新序号 = 2")
        conn.exec_driver_sql("UPDATE 号源视图 SET 状态 = '9', 更新序号 = 3")
    assert successResultOf(p.poll()) == 1
    assert [n.action for n in inbound.accepted[-1][1]] == ["block"]


def test_a_call_that_outlives_its_timeout_is_abandoned_without_blocking_the_event_loop():
    """The link's calls run on its own threads: a database call that hangs fails with CallTimeout when the
    reactor's clock passes the timeout (the event loop was never blocked: the test's thread drives the clock),
    and the pool is stopped once the hanging call ends."""
    import threading

    from adapters.inner.threaded import CallTimeout, ThreadedLink

    class Reactor(task.Clock):
        """A clock that keeps what the pool's threads hand back (callFromThread), never running it."""

        def __init__(self):
            super().__init__()
            self.from_threads = []

        def callFromThread(self, f, *args, **kw):
            self.from_threads.append((f, args, kw))

    reactor = Reactor()
    link = ThreadedLink("database:his", threads=1, timeout=2.0, reactor=reactor)
    link.startService()
    release, started = threading.Event(), threading.Event()
    d = link.call(lambda: (started.set(), release.wait(10)))
    assert started.wait(5)
    reactor.advance(1.9)
    assertNoResult(d)
    reactor.advance(0.2)
    assert "no answer within 2s" in str(failureResultOf(d, CallTimeout).value)
    release.set()
    link._pool.stop()  # (waits for the call that hung to end)


def test_procedure_statements_are_checked(config_dir):
    """A stored procedure's statement naming a parameter the gateway does not have is a config error at its
    line; '::' casts are not parameters; bookings and procedures together are refused."""
    head = DB_HEAD.replace("      bookings:\n        table: 预约中间表\n        columns: {key: 流水号, action: 操作, status: "
                           "状态, schedule_id: 排班号, start: 就诊时间}\n",
                           "      procedures:\n        book: 'CALL 预约挂号(:key, :start::timestamp, :visit, @s)'\n"
                           "        cancel: 'CALL 取消预约(:key, :his_appointment, @s)'\n")
    assert "procedures" in head
    found = problems(config_dir, "", head=head)
    assert [f.split(": ", 1)[0] for f in found] == ["9:inner.his.database.procedures.book"]
    assert "unknown parameter :visit" in found[0]
    config = load(config_dir, "", head=head.replace(", :visit", ""))
    assert config.inner.his.database.procedures.returns == ["status", "his_appointment", "message"]


def test_a_heartbeat_on_a_database_endpoint_is_refused(config_dir):
    """The probe's heartbeat is an HL7 message on an MLLP connection: on an endpoint of kind database it would
    be accepted and never sent. It is refused, naming the key."""
    found = problems(config_dir, "", head=DB_HEAD.replace("    kind: database\n",
                                                          "    kind: database\n    heartbeat: NMQ^N01\n"))
    assert any(p.endswith("inner.his.heartbeat: the heartbeat is an HL7 message the probe sends over MLLP: "
                          "kind: database has none") for p in found), found


def test_the_probe_pings_the_database_and_finds_it_down_when_it_cannot_connect(db, tmp_path):
    from adapters.inner.probe import CallCheck, LinkDown

    assert successResultOf(CallCheck(link_for(db).ping, "database").check()) is None
    gone = sa.create_engine(f"sqlite:///{tmp_path / 'no-such-dir' / 'his.db'}")
    down = failureResultOf(CallCheck(link_for(gone).ping, "database").check(), LinkDown)
    assert str(down.value).startswith("database: NotConnected: cannot connect: OperationalError")
