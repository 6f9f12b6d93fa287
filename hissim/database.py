"""The HIS simulator's database face (``python -m hissim.database --url URL``): a HIS of the view-and-table kind
(中间表/视图) in a real database (PostgreSQL, MariaDB/MySQL, SQLite), as many Chinese HIS vendors lay it out.

- It owns its tables: ``排班号源`` (its slots: one row per slot, a change number 更新序号 raised on every change)
  and the view ``V_号源`` over it that the gateway reads; ``预约中间表``, the intermediate table the gateway
  writes its requests into (流水号, the gateway's key, unique) and the HIS's job answers in (状态 0 pending,
  1 accepted, 2 refused; 预约号 its appointment number; 说明 why).  ``--create`` (re)creates them and
  publishes ``--days`` days of slots from ``--start-date`` for ``--doctors`` doctors (08:00-09:00, 15 min).
- Its job answers pending rows every ``--every`` seconds (after ``--answer-delay``): a booking (操作 1) of a
  free slot books it (预约号 H + a number), of a taken or closed one is refused; a cancellation (操作 2) frees
  the slot its 预约号 names; a hold (操作 3) is refused.  Each answered row is journalled (``--journal``, one
  JSON line: key, action, placer, status, his appointment).
- Its stored procedures (PostgreSQL, MariaDB/MySQL): ``预约挂号(key, schedule, start, name, status, no, msg)``
  books at once and ``取消预约(key, his no, status, no, msg)`` cancels at once, the last three parameters INOUT
  (PostgreSQL: the CALL's result row) or OUT (MySQL: user variables); each writes its row to the intermediate
  table too, and a key it has seen gets its first answer again.
- Its counter books too: SIGUSR1 books one random free slot (as a walk-in patient would).
SIGTERM / SIGINT stop it.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import time
from datetime import date, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

SLOTS, VIEW, REQUESTS, PRESCRIPTIONS = "排班号源", "V_号源", "预约中间表", "处方中间表"
DEPARTMENT = ("0101", "心内科")


def tables(metadata: sa.MetaData):
    slots = sa.Table(
        SLOTS, metadata,
        sa.Column("排班号", sa.String(32), primary_key=True), sa.Column("开始时间", sa.DateTime, primary_key=True),
        sa.Column("时长", sa.Integer, nullable=False), sa.Column("状态", sa.String(4), nullable=False),
        sa.Column("科室代码", sa.String(16)), sa.Column("科室名称", sa.String(64)), sa.Column("医生代码", sa.String(16)),
        sa.Column("医生姓名", sa.String(64)), sa.Column("号别", sa.String(32)), sa.Column("预约号", sa.String(32)),
        sa.Column("更新序号", sa.BigInteger, nullable=False))
    requests = sa.Table(
        REQUESTS, metadata,
        sa.Column("流水号", sa.String(32), primary_key=True), sa.Column("操作", sa.String(4), nullable=False),
        sa.Column("状态", sa.String(4), nullable=False), sa.Column("排班号", sa.String(32)),
        sa.Column("就诊时间", sa.DateTime), sa.Column("预约号", sa.String(32)), sa.Column("平台单号", sa.String(64)),
        sa.Column("患者证件号", sa.String(64)), sa.Column("证件类型", sa.String(16)),
        sa.Column("患者姓名", sa.String(64)), sa.Column("电话", sa.String(32)), sa.Column("说明", sa.String(200)),
        sa.Column("写入时间", sa.DateTime))
    prescriptions = sa.Table(
        PRESCRIPTIONS, metadata,
        sa.Column("流水号", sa.String(32), primary_key=True), sa.Column("明细号", sa.String(64), primary_key=True),
        sa.Column("状态", sa.String(4), nullable=False), sa.Column("处方号", sa.String(64), nullable=False),
        sa.Column("药品代码", sa.String(32), nullable=False), sa.Column("药品名称", sa.String(128)),
        sa.Column("数量", sa.String(16), nullable=False), sa.Column("单位", sa.String(16)),
        sa.Column("剂量", sa.String(16)), sa.Column("剂量单位", sa.String(16)), sa.Column("途径", sa.String(16)),
        sa.Column("频次", sa.String(16)), sa.Column("天数", sa.Integer), sa.Column("用法说明", sa.String(200)),
        sa.Column("患者证件号", sa.String(64)), sa.Column("患者姓名", sa.String(64)), sa.Column("医生代码", sa.String(32)),
        sa.Column("医生姓名", sa.String(64)), sa.Column("医嘱号", sa.String(32)), sa.Column("说明", sa.String(200)),
        sa.Column("写入时间", sa.DateTime))
    return slots, requests, prescriptions


_PG_BOOK = """
CREATE OR REPLACE PROCEDURE "预约挂号"(p_key text, p_schedule text, p_start timestamp, p_name text,
                                     INOUT p_status text, INOUT p_no text, INOUT p_msg text)
LANGUAGE plpgsql AS $$
DECLARE seq bigint;
BEGIN
  SELECT "状态", "预约号", "说明" INTO p_status, p_no, p_msg FROM "预约中间表" WHERE "流水号" = p_key;
  IF FOUND THEN RETURN; END IF;
  IF NOT EXISTS (SELECT 1 FROM "排班号源" WHERE "排班号" = p_schedule AND "开始时间" = p_start AND "状态" = '0') THEN
    p_status := '2'; p_no := NULL; p_msg := '号源已被占用';
  ELSE
    SELECT COALESCE(MAX("更新序号"), 0) + 1 INTO seq FROM "排班号源";
    p_status := '1'; p_no := 'P' || lpad(seq::text, 6, '0'); p_msg := '预约成功';
    UPDATE "排班号源" SET "状态" = '1', "预约号" = p_no, "更新序号" = seq
     WHERE "排班号" = p_schedule AND "开始时间" = p_start;
  END IF;
  INSERT INTO "预约中间表" ("流水号", "操作", "状态", "排班号", "就诊时间", "预约号", "患者姓名", "说明", "写入时间")
  VALUES (p_key, '1', p_status, p_schedule, p_start, p_no, p_name, p_msg, now());
END $$"""
_PG_CANCEL = """
CREATE OR REPLACE PROCEDURE "取消预约"(p_key text, p_cancel text, INOUT p_status text, INOUT p_no text,
                                     INOUT p_msg text)
LANGUAGE plpgsql AS $$
DECLARE seq bigint;
BEGIN
  SELECT "状态", "预约号", "说明" INTO p_status, p_no, p_msg FROM "预约中间表" WHERE "流水号" = p_key;
  IF FOUND THEN RETURN; END IF;
  SELECT COALESCE(MAX("更新序号"), 0) + 1 INTO seq FROM "排班号源";
  UPDATE "排班号源" SET "状态" = '0', "预约号" = NULL, "更新序号" = seq WHERE "预约号" = p_cancel AND "状态" = '1';
  IF FOUND THEN p_status := '1'; p_msg := '已取消'; ELSE p_status := '2'; p_msg := '无此预约'; END IF;
  p_no := p_cancel;
  INSERT INTO "预约中间表" ("流水号", "操作", "状态", "预约号", "说明", "写入时间")
  VALUES (p_key, '2', p_status, p_cancel, p_msg, now());
END $$"""
_MY_BOOK = """
CREATE PROCEDURE `预约挂号`(IN p_key VARCHAR(32), IN p_schedule VARCHAR(32), IN p_start DATETIME, IN p_name VARCHAR(64),
                          OUT p_status VARCHAR(4), OUT p_no VARCHAR(32), OUT p_msg VARCHAR(200))
BEGIN
  DECLARE seq BIGINT;
  SET p_status = NULL;
  SELECT `状态`, `预约号`, `说明` INTO p_status, p_no, p_msg FROM `预约中间表` WHERE `流水号` = p_key;
  IF p_status IS NULL THEN
    IF NOT EXISTS (SELECT 1 FROM `排班号源` WHERE `排班号` = p_schedule AND `开始时间` = p_start AND `状态` = '0') THEN
      SET p_status = '2', p_no = NULL, p_msg = '号源已被占用';
    ELSE
      SELECT COALESCE(MAX(`更新序号`), 0) + 1 INTO seq FROM `排班号源`;
      SET p_status = '1', p_no = CONCAT('P', LPAD(seq, 6, '0')), p_msg = '预约成功';
      UPDATE `排班号源` SET `状态` = '1', `预约号` = p_no, `更新序号` = seq
       WHERE `排班号` = p_schedule AND `开始时间` = p_start;
    END IF;
    INSERT INTO `预约中间表` (`流水号`, `操作`, `状态`, `排班号`, `就诊时间`, `预约号`, `患者姓名`, `说明`, `写入时间`)
    VALUES (p_key, '1', p_status, p_schedule, p_start, p_no, p_name, p_msg, NOW());
  END IF;
END"""
_MY_CANCEL = """
CREATE PROCEDURE `取消预约`(IN p_key VARCHAR(32), IN p_cancel VARCHAR(32), OUT p_status VARCHAR(4),
                          OUT p_no VARCHAR(32), OUT p_msg VARCHAR(200))
BEGIN
  DECLARE seq BIGINT;
  SET p_status = NULL;
  SELECT `状态`, `预约号`, `说明` INTO p_status, p_no, p_msg FROM `预约中间表` WHERE `流水号` = p_key;
  IF p_status IS NULL THEN
    SELECT COALESCE(MAX(`更新序号`), 0) + 1 INTO seq FROM `排班号源`;
    UPDATE `排班号源` SET `状态` = '0', `预约号` = NULL, `更新序号` = seq WHERE `预约号` = p_cancel AND `状态` = '1';
    IF ROW_COUNT() > 0 THEN SET p_status = '1', p_msg = '已取消'; ELSE SET p_status = '2', p_msg = '无此预约'; END IF;
    SET p_no = p_cancel;
    INSERT INTO `预约中间表` (`流水号`, `操作`, `状态`, `预约号`, `说明`, `写入时间`)
    VALUES (p_key, '2', p_status, p_cancel, p_msg, NOW());
  END IF;
END"""
#: the stored procedures, by dialect (none for SQLite)
PROCEDURES = {
    "postgresql": (_PG_BOOK, _PG_CANCEL),
    "mysql": ("DROP PROCEDURE IF EXISTS `预约挂号`", "DROP PROCEDURE IF EXISTS `取消预约`", _MY_BOOK, _MY_CANCEL),
    "mariadb": ("DROP PROCEDURE IF EXISTS `预约挂号`", "DROP PROCEDURE IF EXISTS `取消预约`", _MY_BOOK, _MY_CANCEL),
}


class DatabaseHis:
    def __init__(self, engine, journal: Path | None = None, answer_delay: float = 0.0, seed: int = 7):
        self.engine = engine
        self.slots, self.requests, self.prescriptions = tables(sa.MetaData())
        self.journal = journal
        self.answer_delay = answer_delay
        self.rng = random.Random(seed)
        self._seen: dict[str, float] = {}  # pending key -> when first seen (answer_delay)
        self._orders = 0  # the pharmacy's order numbers given

    def create(self, start: date, days: int, doctors: int) -> int:
        """(Re)create the tables and the view and publish the slots; returns how many."""
        q = self.engine.dialect.identifier_preparer.quote
        with self.engine.begin() as conn:
            conn.exec_driver_sql(f"DROP VIEW IF EXISTS {q(VIEW)}")
            self.slots.metadata.drop_all(conn)
            self.slots.metadata.create_all(conn)
            columns = ", ".join(q(c.name) for c in self.slots.columns)
            conn.exec_driver_sql(f"CREATE VIEW {q(VIEW)} AS SELECT {columns} FROM {q(SLOTS)}")
            rows, seq = [], 0
            for d in range(days):
                for doctor in range(1, doctors + 1):
                    for n in range(4):
                        seq += 1
                        rows.append({"排班号": f"PB{start + timedelta(days=d):%m%d}D{doctor:02d}",
                                     "开始时间": datetime.combine(start + timedelta(days=d), datetime.min.time())
                                     + timedelta(hours=8, minutes=15 * n), "时长": 15, "状态": "0",
                                     "科室代码": DEPARTMENT[0], "科室名称": DEPARTMENT[1], "医生代码": f"D{doctor:02d}",
                                     "医生姓名": f"张医生{doctor}", "号别": "普通号", "预约号": None, "更新序号": seq})
            conn.execute(sa.insert(self.slots), rows)
            for statement in PROCEDURES.get(self.engine.dialect.name, ()):
                conn.exec_driver_sql(statement)
        return len(rows)

    def _next_seq(self, conn) -> int:
        return conn.execute(sa.select(sa.func.coalesce(sa.func.max(self.slots.c["更新序号"]), 0))).scalar() + 1

    def answer_pending(self) -> int:
        """Answers the pending requests (those older than answer_delay); returns how many."""
        s, r = self.slots.c, self.requests.c
        answered = []
        with self.engine.begin() as conn:
            pending = conn.execute(sa.select(self.requests).where(r["状态"] == "0")
                                   .order_by(r["写入时间"], r["流水号"])).mappings().all()
            now = time.monotonic()
            for row in pending:
                first = self._seen.setdefault(row["流水号"], now)
                if now - first < self.answer_delay:
                    continue
                status, number, text = self._decide(conn, row, s)
                conn.execute(sa.update(self.requests).where(r["流水号"] == row["流水号"])
                             .values({r["状态"]: status, r["预约号"]: number, r["说明"]: text}))
                answered.append({"key": row["流水号"], "action": row["操作"], "placer": row["平台单号"],
                                 "status": status, "his_appointment": number})
        answered += self._dispense_orders()
        for entry in answered:
            self._seen.pop(entry["key"], None)
        if answered and self.journal is not None:
            with self.journal.open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in answered)
        return len(answered)

    def _dispense_orders(self) -> list[dict]:
        """The pharmacy's job: each pending prescription item is taken (医嘱号 R + a number); an item without a
        drug code it knows (药品代码 starting with X) is refused, and so the whole prescription."""
        p = self.prescriptions.c
        answered = []
        with self.engine.begin() as conn:
            pending = conn.execute(sa.select(self.prescriptions).where(p["状态"] == "0")
                                   .order_by(p["流水号"], p["明细号"])).mappings().all()
            for row in pending:
                refused = row["药品代码"].startswith("X")
                self._orders += 1
                number = None if refused else f"R{self._orders:06d}"
                conn.execute(sa.update(self.prescriptions)
                             .where(p["流水号"] == row["流水号"], p["明细号"] == row["明细号"])
                             .values({p["状态"]: "2" if refused else "1", p["医嘱号"]: number,
                                      p["说明"]: "本院无此药品" if refused else "已接收"}))
                answered.append({"key": row["流水号"], "action": "prescription", "placer": row["明细号"],
                                 "status": "2" if refused else "1", "his_appointment": number})
        return answered

    def _decide(self, conn, row, s) -> tuple[str, str | None, str]:
        if row["操作"] == "1":
            slot = conn.execute(sa.select(self.slots).where(s["排班号"] == row["排班号"],
                                                           s["开始时间"] == row["就诊时间"])).mappings().first()
            if slot is None:
                return "2", None, "无此号源"
            if slot["状态"] != "0":
                return "2", None, "号源已被占用" if slot["状态"] == "1" else "停诊"
            number = f"H{self._next_seq(conn):06d}"
            conn.execute(sa.update(self.slots).where(s["排班号"] == slot["排班号"], s["开始时间"] == slot["开始时间"])
                         .values({s["状态"]: "1", s["预约号"]: number, s["更新序号"]: self._next_seq(conn)}))
            return "1", number, "预约成功"
        if row["操作"] == "2":
            done = conn.execute(sa.update(self.slots).where(s["预约号"] == row["预约号"], s["状态"] == "1")
                                .values({s["状态"]: "0", s["预约号"]: None, s["更新序号"]: self._next_seq(conn)}))
            return ("1", row["预约号"], "已取消") if done.rowcount else ("2", None, "无此预约")
        return "2", None, "本院不支持锁号"

    def counter_booking(self) -> str | None:
        """The counter books a random free slot; returns its appointment number."""
        s = self.slots.c
        with self.engine.begin() as conn:
            free = conn.execute(sa.select(s["排班号"], s["开始时间"]).where(s["状态"] == "0")).all()
            if not free:
                return None
            schedule, start = self.rng.choice(free)
            number = f"C{self._next_seq(conn):06d}"
            conn.execute(sa.update(self.slots).where(s["排班号"] == schedule, s["开始时间"] == start)
                         .values({s["状态"]: "1", s["预约号"]: number, s["更新序号"]: self._next_seq(conn)}))
        return number


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m hissim.database", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="SQLAlchemy URL of the HIS's database")
    parser.add_argument("--create", action="store_true", help="(re)create the tables and publish the slots")
    parser.add_argument("--create-only", action="store_true", help="with --create: then exit")
    parser.add_argument("--start-date", type=date.fromisoformat, default=date.today() + timedelta(days=1))
    parser.add_argument("--days", type=int, default=2)
    parser.add_argument("--doctors", type=int, default=2)
    parser.add_argument("--every", type=float, default=0.2, help="how often the HIS's job runs (seconds)")
    parser.add_argument("--answer-delay", type=float, default=0.0, help="how long a request waits for its answer")
    parser.add_argument("--journal", type=Path, default=None, help="JSON lines of the answered requests")
    args = parser.parse_args(argv)
    engine = sa.create_engine(args.url, pool_pre_ping=True)
    his = DatabaseHis(engine, args.journal, args.answer_delay)
    if args.create:
        print(f"his-sim-db: {his.create(args.start_date, args.days, args.doctors)} slots published", flush=True)
        if args.create_only:
            return 0
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
    counter = []
    signal.signal(signal.SIGUSR1, lambda *_: counter.append(1))
    print("his-sim-db: answering", flush=True)
    while not stopping:
        try:
            while counter:
                counter.pop()
                print(f"his-sim-db: counter booked {his.counter_booking()}", flush=True)
            his.answer_pending()
        except sa.exc.DBAPIError as e:  # the database restarting: try again at the next turn
            print(f"his-sim-db: database error: {str(e.orig).strip().splitlines()[0]}", flush=True)
        time.sleep(args.every)
    engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
