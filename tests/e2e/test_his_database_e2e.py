"""A HIS of the view-and-table kind (中间表/视图) in real PostgreSQL and MariaDB servers (tests/e2e/databases.py):
the simulator's database face (hissim/database.py, its own process) owns the tables, publishes its slots in
its view, answers the rows the gateway writes and books at its counter; the gateway (its own process, kind:
database) reads the view and writes the intermediate table.  A platform finds, books and cancels over FHIR;
kill -9 of the gateway while the HIS has not answered, and a kill -9 and restart of the database server while
bookings wait, lose nothing and write no request twice.
"""

from __future__ import annotations

import signal
from collections import Counter

import pytest
import sqlalchemy as sa

from tests.e2e.databases import SimFace, pharmacy_of_kind, prescribe, server
from tests.e2e.harness import Lock, appointment_for, eventually, read_jsonl

JSON = {"Content-Type": "application/fhir+json"}

#: the gateway's view of the simulator's tables: the config a site writes for this layout (docs/his-adapters.md)
DATABASE = {
    "slots": {
        "view": "V_号源",
        "columns": {"schedule_id": "排班号", "start": "开始时间", "minutes": "时长", "status": "状态",
                    "department_code": "科室代码", "department_name": "科室名称", "doctor_code": "医生代码",
                    "doctor_name": "医生姓名", "service_code": "号别", "his_appointment": "预约号"},
        "status_codes": {"free": ["0"], "booked": ["1"], "blocked": ["9"]},
        "change_column": "更新序号",
        "interval": "300ms",
    },
    "bookings": {
        "table": "预约中间表",
        "columns": {"key": "流水号", "action": "操作", "status": "状态", "schedule_id": "排班号", "start": "就诊时间",
                    "placer": "平台单号", "his_appointment": "预约号", "patient_id": "患者证件号",
                    "patient_id_type": "证件类型", "patient_name": "患者姓名", "phone": "电话", "message": "说明",
                    "created": "写入时间"},
        "action_codes": {"book": "1", "cancel": "2"},
        "answer_codes": {"pending": "0", "accepted": ["1"], "refused": ["2"]},
        "answer_poll": "100ms",
    },
    "department_codes": {"0101": "心内科"},
    "statement_timeout": "3s",
    "connect_timeout": "2s",
}


def SimDb(lock, *args: str) -> SimFace:
    """The simulator's database face as a process (python -m hissim.database)."""
    return SimFace("hissim.database", lock.workdir, "his-sim-db.log", "--url", lock.db.url, "--journal",
                   str(lock.journal), "--start-date", lock.first_day.isoformat(), "--every", "0.1", *args)


class DatabaseLock(Lock):
    """The gateway with its HIS endpoint of kind database, and the simulator's database face."""

    def __init__(self, workdir, db, **his):
        super().__init__(workdir)
        self.db = db
        self.journal = workdir / "his-db-journal.jsonl"
        self.gateway_config["inner"]["his"] = {"name": "his", "kind": "database", "database": {"url": db.url, **DATABASE},
                                               "ack_timeout": "2s", "retry_initial": "200ms", "retry_max": "1s",
                                               **his}
        self.gateway_config["outer"]["answer_within"] = "2s"
        self.write_configs()
        self.engine = sa.create_engine(db.url, poolclass=sa.pool.NullPool)
        created = SimDb(self, "--create", "--create-only", "--days", "2", "--doctors", "2")
        assert created.popen.wait(timeout=60) == 0, created.log_path.read_text()

    def start_sim(self, *args: str) -> None:
        self.sim = SimDb(self, *args)

    def requests(self) -> list[dict]:
        """The intermediate table's rows, as the HIS's database holds them."""
        with self.engine.connect() as conn:
            q = self.engine.dialect.identifier_preparer.quote
            return [dict(r._mapping) for r in conn.exec_driver_sql(f"SELECT * FROM {q('预约中间表')}")]

    def answered(self) -> list[dict]:
        return read_jsonl(self.journal)


@pytest.fixture(scope="module", params=["postgresql", "mariadb"])
def db(request):
    started = server(request.param)
    yield started
    started.close()


@pytest.fixture
def lock(tmp_path, db):
    with DatabaseLock(tmp_path, db) as running:
        yield running
    running.engine.dispose()


def book(lock, slot_id: str, mrn: str = "MRN-0001"):
    return lock.session().post(f"{lock.base}/Appointment", json=appointment_for(slot_id, mrn), headers=JSON)


def test_find_book_cancel_through_the_his_database(lock):
    """The view's slots are FHIR Slots; a booking is one row the HIS accepts (its number on the Appointment);
    a cancellation is one row naming that number; the slot is free again; the counter's booking shows."""
    free = lock.search_slots(status="free")
    assert len(free) == lock.slot_count
    r = book(lock, free[0]["id"])
    assert r.status_code == 201, r.text
    appointment = r.json()
    assert appointment["status"] == "booked"
    his_number = appointment["identifier"][0]["value"]
    [row] = lock.requests()
    assert (row["操作"], row["状态"], row["预约号"], row["平台单号"], row["患者姓名"]) == (
        "1", "1", his_number, appointment["id"], "王芳")
    eventually(lambda: lock.session().get(f"{lock.base}/Slot/{free[0]['id']}").json()["status"] == "busy",
               what="the view's booked slot")

    appointment["status"] = "cancelled"
    r = lock.session().put(f"{lock.base}/Appointment/{appointment['id']}", json=appointment, headers=JSON)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    cancel = [x for x in lock.requests() if x["操作"] == "2"]
    assert len(cancel) == 1 and cancel[0]["预约号"] == his_number and cancel[0]["状态"] == "1"
    eventually(lambda: lock.session().get(f"{lock.base}/Slot/{free[0]['id']}").json()["status"] == "free",
               what="the slot freed in the view")

    taken = {s["id"] for s in lock.search_slots(status="free")}
    lock.sim.popen.send_signal(signal.SIGUSR1)  # the counter books one
    eventually(lambda: len(lock.search_slots(status="free")) == len(taken) - 1, what="the counter's booking")


def test_a_slot_taken_at_the_counter_is_refused_with_the_his_reason(lock):
    """The HIS refuses (状态 2, 说明): the platform gets 409 and the hold is released; one row."""
    slot_id = lock.search_slots(status="free")[0]["id"]
    lock.sim.stop()
    with lock.engine.begin() as conn:
        q = lock.engine.dialect.identifier_preparer.quote
        conn.exec_driver_sql(f"UPDATE {q('排班号源')} SET {q('状态')} = '1' WHERE {q('状态')} = '0'")
    lock.start_sim()
    r = book(lock, slot_id)
    assert r.status_code == 409, r.text
    assert "号源已被占用" in r.text or "refused" in r.text
    assert len(lock.requests()) == 1


def test_kill_9_of_the_gateway_while_the_his_has_not_answered(lock):
    """The HIS's job stopped: the booking's row is written and waits; the gateway is killed (-9) and started
    again; the HIS's job comes back: the booking completes, and the table holds one row for it."""
    slot_id = lock.search_slots(status="free")[0]["id"]
    lock.sim.stop()
    r = book(lock, slot_id)
    assert r.status_code == 202, r.text
    appointment_id = r.json()["id"]
    eventually(lambda: len(lock.requests()) == 1, what="the row in the intermediate table")
    lock.gateway.stop(signal.SIGKILL)
    lock.start_gateway()
    lock.start_sim()
    eventually(lambda: lock.session().get(f"{lock.base}/Appointment/{appointment_id}").json()["status"] == "booked",
               timeout=20, what="the booking to complete after the restart")
    rows = lock.requests()
    assert [(x["平台单号"], x["状态"]) for x in rows] == [(appointment_id, "1")]
    assert Counter(a["key"] for a in lock.answered()) == {rows[0]["流水号"]: 1}


def test_a_database_restart_loses_nothing_and_writes_nothing_twice(lock, db):
    """The database server is killed (-9) while bookings arrive, and started again: every booking the
    platform made is written once and answered; none is lost, none doubled."""
    slots = [s["id"] for s in lock.search_slots(status="free")][:4]
    assert book(lock, slots[0]).status_code == 201
    db.kill()
    pending = [book(lock, slot, mrn=f"MRN-{n}") for n, slot in enumerate(slots[1:])]
    assert [r.status_code for r in pending] == [202, 202, 202]
    db.start()
    for r in pending:
        eventually(lambda: lock.session().get(f"{lock.base}/Appointment/{r.json()['id']}").json()["status"]
                   == "booked", timeout=30, what="a booking made while the database was down")
    rows = lock.requests()
    assert len(rows) == 4 and len({x["流水号"] for x in rows}) == 4 and {x["状态"] for x in rows} == {"1"}
    assert sorted(Counter(x["平台单号"] for x in rows).values()) == [1, 1, 1, 1]
    keys = Counter(a["key"] for a in lock.answered())
    assert set(keys.values()) == {1} and len(keys) == 4


PRESCRIPTIONS = {
    "table": "处方中间表",
    "columns": {"key": "流水号", "item": "明细号", "status": "状态", "number": "处方号", "drug_code": "药品代码",
                "drug_name": "药品名称", "quantity": "数量", "quantity_unit": "单位", "dose": "剂量",
                "dose_unit": "剂量单位", "route": "途径", "frequency": "频次", "days": "天数",
                "instructions": "用法说明", "patient_id": "患者证件号", "patient_name": "患者姓名",
                "prescriber_id": "医生代码", "prescriber_name": "医生姓名", "his_order": "医嘱号", "message": "说明",
                "created": "写入时间"},
    "answer_poll": "100ms",
}


def test_a_prescription_through_the_his_database(tmp_path, db):
    """A signed prescription of three items, routed to a pharmacy endpoint of kind database: three rows under one
    key in the HIS's prescription table, taken by the HIS's pharmacy job; the items turn active."""
    lock = pharmacy_of_kind(tmp_path, "database",
                            {"url": db.url, "prescriptions": PRESCRIPTIONS, "statement_timeout": "3s"})
    lock.db, lock.journal = db, tmp_path / "his-db-journal.jsonl"
    created = SimDb(lock, "--create", "--create-only", "--days", "1", "--doctors", "1")
    assert created.popen.wait(timeout=60) == 0
    job = SimDb(lock)
    engine = sa.create_engine(db.url, poolclass=sa.pool.NullPool)
    try:
        with lock:
            entries = prescribe(lock)
            q = engine.dialect.identifier_preparer.quote
            with engine.connect() as conn:
                rows = [dict(x._mapping) for x in conn.exec_driver_sql(f"SELECT * FROM {q('处方中间表')}")]
            assert sorted(x["明细号"] for x in rows) == sorted(e["resource"]["id"] for e in entries)
            assert len({x["流水号"] for x in rows}) == 1 and {x["状态"] for x in rows} == {"1"}
            assert "Y0002" in {x["药品代码"] for x in rows}  # (the hospital's own code for the ATC-coded item)
    finally:
        job.stop()
        engine.dispose()


#: the HIS's stored procedures (hissim/database.py) instead of the intermediate table, per dialect
PROCEDURES = {
    "postgresql": {"book": 'CALL "预约挂号"(:key, :schedule_id, :start, :patient_name, NULL, NULL, NULL)',
                   "cancel": 'CALL "取消预约"(:key, :his_appointment, NULL, NULL, NULL)'},
    "mariadb": {"book": "CALL `预约挂号`(:key, :schedule_id, :start, :patient_name, @status, @reg_no, @msg)",
                "cancel": "CALL `取消预约`(:key, :his_appointment, @status, @reg_no, @msg)",
                "answer": "SELECT @status, @reg_no, @msg"},
}


@pytest.fixture
def procedure_lock(tmp_path, db):
    lock = DatabaseLock(tmp_path, db)
    database = lock.gateway_config["inner"]["his"]["database"]
    database.pop("bookings")
    database["procedures"] = PROCEDURES[db.name]
    lock.write_configs()
    with lock:
        yield lock
    lock.engine.dispose()


def test_book_and_cancel_through_the_his_stored_procedures(procedure_lock):
    """The booking and its cancellation are calls of the HIS's procedures (PostgreSQL: INOUT parameters as the
    call's row; MariaDB: OUT parameters read with a SELECT on the same connection): the HIS's number comes back,
    the slot turns busy then free, and each procedure wrote one row for its key."""
    lock = procedure_lock
    slot_id = lock.search_slots(status="free")[0]["id"]
    r = book(lock, slot_id)
    assert r.status_code == 201, r.text
    appointment = r.json()
    assert appointment["identifier"][0]["value"].startswith("P")
    eventually(lambda: lock.session().get(f"{lock.base}/Slot/{slot_id}").json()["status"] == "busy",
               what="the slot booked in the view")
    appointment["status"] = "cancelled"
    r = lock.session().put(f"{lock.base}/Appointment/{appointment['id']}", json=appointment, headers=JSON)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    eventually(lambda: lock.session().get(f"{lock.base}/Slot/{slot_id}").json()["status"] == "free",
               what="the slot freed in the view")
    assert sorted((x["操作"], x["状态"]) for x in lock.requests()) == [("1", "1"), ("2", "1")]
