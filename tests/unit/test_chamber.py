"""The chamber: schema, durability settings, group commit and its all-or-nothing rules."""

import queue
import sqlite3
import threading
import time

import pytest
from twisted.internet import task

from gateway.chamber.engine import Chamber
from gateway.chamber.errors import ChamberError
from gateway.chamber.upgrades import SCHEMA_VERSION
from gateway.chamber.rows import ScheduleRow
from tests.deferreds import assertNoResult, failureResultOf, successResultOf


class TickReactor(task.Clock):
    """A Clock that can run what is scheduled for 'now' (a reactor turn)."""

    def turn(self):
        self.advance(0)


def schedule(tx, sid="D001"):
    tx.upsert_schedule(ScheduleRow(sid, "Dr Zhang", "D001", "张伟", "CARD", "心内科", tx.now))


def test_new_chamber_is_wal_full_sync_and_versioned(tmp_path):
    """A new chamber file is created with the current schema, in WAL mode, fsync on every commit."""
    ch = Chamber(tmp_path / "c.sqlite3", clock=time.time)
    ch.open()
    conn = ch._conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    from gateway.chamber.upgrades import SCHEMA_VERSION

    assert SCHEMA_VERSION >= 2
    assert conn.execute("SELECT value FROM chamber_meta WHERE key='schema_version'").fetchone()[0] == str(
        SCHEMA_VERSION)
    ch.close()


def test_data_survives_reopen(chamber_backend):
    """What was committed is there after the chamber is closed and opened again."""
    ch = Chamber(backend=chamber_backend(), clock=time.time)
    ch.open()
    ch.transact_now(schedule)
    ch.close()
    ch2 = Chamber(backend=chamber_backend(), clock=time.time)
    ch2.open()
    assert [s.id for s in ch2.read().schedules()] == ["D001"]
    ch2.close()


def test_refuses_other_schema_version(chamber_backend):
    """A chamber written by another schema version is refused with a message naming both versions."""
    ch = Chamber(backend=chamber_backend(), clock=time.time)
    ch.open()
    from gateway.chamber.upgrades import SCHEMA_VERSION

    newer = SCHEMA_VERSION + 1
    ch.transact_now(lambda tx: tx._c.execute("UPDATE chamber_meta SET value = ? WHERE key = 'schema_version'",
                                             (str(newer),)))
    ch.close()
    with pytest.raises(ChamberError, match=f"version {newer}"):
        Chamber(backend=chamber_backend(), clock=time.time).open()


def version_1_chamber(path):
    """A chamber as gatewayd 1 (schema version 1) left it, with one schedule in it."""
    from gateway.chamber.upgrades import SCHEMA_DIR

    conn = sqlite3.connect(path)
    conn.executescript((SCHEMA_DIR / "chamber-v1.sql").read_text(encoding="utf-8"))
    conn.execute("INSERT INTO chamber_meta VALUES ('schema_version', '1')")
    conn.execute("INSERT INTO schedules (id, display, practitioner_id, practitioner_name, department_code, "
                 "department_name, updated) VALUES ('D001', 'Dr Zhang', 'D001', '张伟', 'CARD', '心内科', 0)")
    conn.commit()
    conn.close()


def test_a_version_1_chamber_is_upgraded_in_place_keeping_its_data(tmp_path):
    """Opening a chamber of an older schema upgrades it (new tables), keeps what it held, says so once."""
    from gateway.chamber.upgrades import SCHEMA_VERSION

    path = tmp_path / "c.sqlite3"
    version_1_chamber(path)
    ch = Chamber(path, clock=time.time)
    ch.open()
    assert [s.id for s in ch.read().schedules()] == ["D001"]
    conn = ch._conn
    assert conn.execute("SELECT value FROM chamber_meta WHERE key='schema_version'").fetchone()[0] == str(
        SCHEMA_VERSION)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"prescriptions", "medication_requests", "medication_dispenses", "oauth_tokens"} <= tables
    ch.close()
    ch = Chamber(path, clock=time.time)
    ch.open()  # a second open has nothing to do
    ch.close()


def test_a_version_2_chamber_gains_schedule_facilities_and_slot_z_segments(tmp_path):
    """Version 3 (routing by facility, Z-segments): a version-2 chamber is upgraded in one step; what it held
    is kept, its schedules have no facility ('') and its slots no Z-segments until the HIS publishes them
    again; both are written and read back afterwards."""
    from gateway.chamber.rows import SlotRow
    from gateway.chamber.upgrades import SCHEMA_DIR, SCHEMA_VERSION

    assert SCHEMA_VERSION >= 3
    path = tmp_path / "c.sqlite3"
    version_1_chamber(path)
    conn = sqlite3.connect(path)
    conn.executescript((SCHEMA_DIR / "upgrade-v1-v2.sql").read_text(encoding="utf-8"))
    conn.execute("UPDATE chamber_meta SET value = '2' WHERE key = 'schema_version'")
    conn.execute("INSERT INTO slots (id, schedule_id, start_local, start_ts, end_ts, minutes, service_code, "
                 "service_text, his_status, updated) VALUES ('S1', 'D001', '203001070800', 1, 2, 15, 'c', 'c', "
                 "'free', 0)")
    conn.commit()
    conn.close()
    ch = Chamber(path, clock=time.time)
    ch.open()
    assert [(s.id, s.facility) for s in ch.read().schedules()] == [("D001", "")]
    assert ch.read().slot("S1").z_segments is None
    assert ch._conn.execute("SELECT value FROM chamber_meta WHERE key='schema_version'").fetchone()[0] == str(
        SCHEMA_VERSION)

    def publish(tx):
        tx.upsert_schedule(ScheduleRow("D001", "Dr Zhang", "D001", "张伟", "CARD", "心内科", tx.now, "分院A"))
        tx.insert_slot(SlotRow("S1", "D001", "203001070800", 1.0, 2.0, 15, "c", "c", "busy-unavailable", None,
                               None, None, 0, "ZFE|12.00\rZLV|专家"), or_update=True, publication=True)

    ch.transact_now(publish)
    assert ch.read().schedule("D001").facility == "分院A"
    assert ch.read().slot("S1").z_segments == "ZFE|12.00\rZLV|专家"
    ch.close()


def test_every_chamber_holds_its_own_audit_key_for_good(tmp_path):
    """Version 4: a new chamber, and one upgraded from version 3, holds 32 random bytes of its own (the key
    of the audit's keyed names, gateway/domain/audit.py): not in the repository nor the config, kept across
    reopening, and refused to be changed or deleted (earlier records would no longer be found by it)."""
    from gateway.chamber.upgrades import SCHEMA_DIR, SCHEMA_VERSION

    assert SCHEMA_VERSION >= 4
    upgraded = tmp_path / "v3.sqlite3"
    version_1_chamber(upgraded)
    conn = sqlite3.connect(upgraded)
    for script in ("upgrade-v1-v2.sql", "upgrade-v2-v3.sql"):
        conn.executescript((SCHEMA_DIR / script).read_text(encoding="utf-8"))
    conn.execute("UPDATE chamber_meta SET value = '3' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    keys = []
    for path in (upgraded, tmp_path / "new.sqlite3", tmp_path / "other.sqlite3"):
        ch = Chamber(path, clock=time.time)
        ch.open()
        keys.append(ch.read().audit_key())
        ch.close()
    assert all(len(k) == 32 for k in keys) and len(set(keys)) == 3
    again = Chamber(upgraded, clock=time.time)
    again.open()
    assert again.read().audit_key() == keys[0]
    again.close()
    conn = sqlite3.connect(upgraded)
    for sql in ("UPDATE chamber_keys SET key = zeroblob(32)", "DELETE FROM chamber_keys"):
        with pytest.raises(sqlite3.IntegrityError, match="never changed"):
            conn.execute(sql)
    conn.close()


def test_a_failed_upgrade_leaves_the_chamber_at_its_old_version(tmp_path, monkeypatch):
    """An upgrade is one transaction: if a statement fails, nothing of it stays and the start is refused."""
    import gateway.chamber.upgrades as upgrades_module

    path = tmp_path / "c.sqlite3"
    version_1_chamber(path)
    broken = tmp_path / "schema"
    broken.mkdir()
    (broken / "chamber-v1.sql").write_text((upgrades_module.SCHEMA_DIR / "chamber-v1.sql").read_text())
    (broken / "upgrade-v1-v2.sql").write_text("CREATE TABLE new_one (x);\nCREATE TABLE schedules (x);\n")
    monkeypatch.setattr(upgrades_module, "SCHEMA_DIR", broken)
    monkeypatch.setattr(upgrades_module, "SCHEMA_VERSION", 2)
    with pytest.raises(ChamberError, match="already exists"):
        Chamber(path, clock=time.time).open()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value FROM chamber_meta WHERE key='schema_version'").fetchone()[0] == "1"
    assert not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'new_one'").fetchone()
    conn.close()


def test_a_version_4_chamber_knows_inbound_messages_by_sender_and_control_id(tmp_path):
    """Version 5 (issue 15, finding 10): an inbound message is known by its sender (MSH-3 and MSH-4 as sent)
    and MSH-10, not by MSH-10 alone. A version-4 chamber is upgraded in one step (the messages table is
    rebuilt): each inbound message's sender is read from its MSH, outbound messages (ours) get '', ids,
    stories and the prescriptions that point at messages are kept, and foreign keys are still enforced."""
    from gateway.chamber.upgrades import SCHEMA_DIR, SCHEMA_VERSION

    assert SCHEMA_VERSION >= 5
    path = tmp_path / "c.sqlite3"
    version_1_chamber(path)
    conn = sqlite3.connect(path)
    for script in ("upgrade-v1-v2.sql", "upgrade-v2-v3.sql", "upgrade-v3-v4.sql"):
        conn.executescript((SCHEMA_DIR / script).read_text(encoding="utf-8"))
    conn.execute("UPDATE chamber_meta SET value = '4' WHERE key = 'schema_version'")
    bodies = {7: "MSH|^~\\&|HIS^1.2^ISO|HOSPITAL|GW|FRONT|20300101||SIU^S12|C1|P|2.5\rSCH|1\r".encode(),
              8: "MSH#^~\\&#药房#分院A#GW#FRONT#20300101##RDS^O13#C1#P#2.5\r".encode(),
              9: b"MSH|^~\\&|GATEWAYD|FRONT|HIS|HOSPITAL|20300101||SRM^S01|C1|P|2.5\r"}
    for message_id, (direction, peer) in {7: ("inbound", "his"), 8: ("inbound", "pharmacy"),
                                          9: ("outbound", "his")}.items():
        conn.execute("INSERT INTO messages (id, direction, peer, control_id, type, state, body, charset, created,"
                     " updated) VALUES (?, ?, ?, 'C1', 'x', 'delivered', ?, 'utf-8', 0, 0)",
                     (message_id, direction, peer, bodies[message_id]))
        conn.execute("INSERT INTO message_events VALUES (?, 0, 'delivered', 'kept')", (message_id,))
    conn.execute("INSERT INTO prescriptions (id, direction, number, status, payload, message_id, created, updated)"
                 " VALUES ('RX1', 'to_his', 'N1', 'pending', x'7b7d', 9, 0, 0)")
    conn.commit()
    conn.close()
    ch = Chamber(path, clock=time.time)
    ch.open()
    assert ch._conn.execute("SELECT value FROM chamber_meta WHERE key='schema_version'").fetchone()[0] == str(
        SCHEMA_VERSION)
    assert {m.id: (m.sender, m.body) for m in ch.read().messages()} == {
        7: ("HIS^1.2^ISO|HOSPITAL", bodies[7]), 8: ("药房#分院A", bodies[8]), 9: ("", bodies[9])}
    assert [line for _, _, line in ch.read().message_events(7)] == ["kept"]
    assert ch._conn.execute("SELECT message_id FROM prescriptions").fetchone()[0] == 9
    assert ch._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1

    def another_sender(tx):
        return tx.add_message(direction="inbound", peer="his", sender="HIS^1.2^ISO|BRANCH", control_id="C1",
                              type="SIU^S12", state="delivered", body=b"MSH", charset="utf-8", if_new=True)

    def same_sender(tx):
        return tx.add_message(direction="inbound", peer="his", sender="HIS^1.2^ISO|HOSPITAL", control_id="C1",
                              type="SIU^S12", state="delivered", body=b"MSH", charset="utf-8", if_new=True)

    assert ch.transact_now(another_sender) is not None
    assert ch.transact_now(same_sender) is None
    with pytest.raises(sqlite3.IntegrityError):
        ch._writer.execute("INSERT INTO message_events VALUES (999, 0, 'x', 'y')")
    ch.close()
    new = Chamber(tmp_path / "new.sqlite3", clock=time.time)
    new.open()
    assert new._conn.execute("PRAGMA freelist_count").fetchone()[0] == 0  # a new chamber keeps no rebuilt pages
    new.close()


def test_a_chamber_from_a_newer_gatewayd_is_refused_untouched(tmp_path):
    from gateway.chamber.upgrades import SCHEMA_VERSION

    path = tmp_path / "c.sqlite3"
    version_1_chamber(path)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE chamber_meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    conn.commit()
    conn.close()
    with pytest.raises(ChamberError, match="newer gatewayd"):
        Chamber(path, clock=time.time).open()


def commit_after(conn: sqlite3.Connection, seconds: float) -> threading.Thread:
    """Another process's connection holding the write lock: COMMIT it after ``seconds`` (join the thread)."""
    def commit_later():
        time.sleep(seconds)
        conn.execute("COMMIT")

    committer = threading.Thread(target=commit_later)
    committer.start()
    return committer


def test_two_processes_creating_one_new_chamber_both_open_it(tmp_path):
    """The split lock starts both gates on a chamber that does not exist yet. If the other process creates
    the schema while this one waits for the write lock, this one opens the finished file (this failed in CI
    with "table chamber_meta already exists" before)."""
    from gateway.chamber.upgrades import SCHEMA_DIR, SCHEMA_VERSION

    path = tmp_path / "c.sqlite3"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("PRAGMA journal_mode = WAL")
    script = "\n".join(p.read_text(encoding="utf-8")
                       for p in [SCHEMA_DIR / "chamber-v1.sql", *sorted(SCHEMA_DIR.glob("upgrade-*.sql"))])
    other.executescript("BEGIN IMMEDIATE;\n" + script + "\nINSERT INTO chamber_meta (key, value) VALUES "
                        f"('schema_version', '{SCHEMA_VERSION}');")
    assert other.in_transaction  # holds the write lock, schema not yet visible to others
    committer = commit_after(other, 0.3)
    ch = Chamber(path, clock=time.time)
    ch.open()  # sees no schema, waits for the lock, finds the other's schema
    committer.join()
    ch.transact_now(schedule)
    assert [s.id for s in ch.read().schedules()] == ["D001"]
    ch.close()
    other.close()


def test_a_new_chamber_another_process_holds_before_its_wal_switch_is_opened_too(tmp_path):
    """The other gate has just created the file and holds its write lock before switching it to WAL: SQLite
    answers this process's own switch to WAL with "database is locked" at once (no busy wait), so the open
    tries again until the lock is free (the split lock's netns/split tests failed so, now and then)."""
    path = tmp_path / "c.sqlite3"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("CREATE TABLE other_gate_was_here (x)")
    committer = commit_after(other, 0.3)
    ch = Chamber(path, clock=time.time)
    ch.open()
    committer.join()
    assert ch._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    ch.close()
    other.close()


def test_refuses_a_file_that_is_not_a_database(tmp_path):
    """A corrupt or foreign file is not silently replaced: opening fails with the path in the message."""
    path = tmp_path / "c.sqlite3"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ChamberError, match=str(path)):
        Chamber(path, clock=time.time).open()


def test_group_commit_fires_after_commit_and_isolates_failures(chamber_backend):
    """Work queued in one reactor turn commits together; the Deferreds fire only after COMMIT, and a
    unit that raises is rolled back alone while the others commit."""
    reactor = TickReactor()
    ch = Chamber(backend=chamber_backend(), reactor=reactor, clock=reactor.seconds)
    ch.open()
    outside = Chamber(backend=chamber_backend(), clock=reactor.seconds)  # connections of their own
    outside.open()
    seen_by_other_connection = []

    def observe_from_outside(_):
        seen_by_other_connection.append([(s.id,) for s in outside.read().schedules()])

    d1 = ch.transact(lambda tx: schedule(tx, "A"))
    d1.addCallback(observe_from_outside)

    def failing(tx):
        schedule(tx, "B")
        raise ValueError("refused")

    d2 = ch.transact(failing)
    d3 = ch.transact(lambda tx: schedule(tx, "C"))
    assertNoResult(d1)  # nothing is answered before the turn's commit
    assertNoResult(d3)
    reactor.turn()
    successResultOf(d1)
    successResultOf(d3)
    assert seen_by_other_connection == [[("A",), ("C",)]]
    failureResultOf(d2, ValueError)
    assert [s.id for s in ch.read().schedules()] == ["A", "C"]
    ch.close()
    outside.close()


def test_observers_run_after_commits_that_recorded_something(chamber_backend):
    """Observers (the relay's wake-up) run after a commit with at least one successful unit."""
    reactor = TickReactor()
    ch = Chamber(backend=chamber_backend(), reactor=reactor, clock=reactor.seconds)
    ch.open()
    calls = []
    ch.observe(lambda: calls.append(1))
    ch.transact(schedule)
    reactor.turn()
    d = ch.transact(lambda tx: 1 / 0)
    reactor.turn()
    failureResultOf(d, ZeroDivisionError)
    assert calls == [1]
    ch.close()


def test_a_storage_error_inside_a_unit_is_a_write_failure(chamber_backend):
    """A disk full raised by a statement (not by the unit's own decision) fails that unit with
    ChamberWriteError, so gates answer 'not stored, try again' (AE / 503) rather than an internal error;
    the other units of the batch still commit."""
    from gateway.chamber.errors import ChamberWriteError

    reactor = TickReactor()
    ch = Chamber(backend=chamber_backend(), reactor=reactor, clock=reactor.seconds)
    ch.open()

    def disk_full(tx):
        schedule(tx, "X")
        raise ch.backend.Error("database or disk is full")

    failed = ch.transact(disk_full)
    ch.transact(lambda tx: schedule(tx, "Y"))
    reactor.turn()
    assert "disk is full" in str(failureResultOf(failed, ChamberWriteError).value)
    assert [s.id for s in ch.read().schedules()] == ["Y"]
    ch.close()


def looks_until(clock, done, n: int = 200) -> None:
    """Advance ``clock`` by the watch's interval until ``done()``, ``n`` times at most, with a moment of real time
    between (PostgreSQL's notifications come over a socket)."""
    for _ in range(n):
        clock.advance(0.01)
        if done():
            return
        time.sleep(0.005)


def test_watch_notices_commits_of_another_process(chamber_backend):
    """Two chambers on one file (or database) stand for the two gates' processes: a commit through one wakes
    the observers of the other within the watch interval; its own commits are not reported twice; one rolled
    back wakes nobody.  (SQLite: data_version; PostgreSQL: LISTEN/NOTIFY, which arrives over a socket — given
    a moment of real time to.)"""
    clock = task.Clock()
    outer = Chamber(backend=chamber_backend(), clock=clock.seconds)
    inner = Chamber(backend=chamber_backend(), clock=clock.seconds)
    outer.open()
    inner.open()
    woken = []
    inner.observe(lambda: woken.append("inner"))
    loop = inner.watch(clock, interval=0.01)

    def looks():
        looks_until(clock, lambda: False, 20)

    looks()
    assert woken == []
    outer.transact_now(schedule)
    assert woken == []  # not yet: the other process learns of it on its next look
    clock.advance(0.01)
    if outer.backend.kind == "postgresql":
        looks_until(clock, lambda: woken)
    assert woken == ["inner"]
    looks()
    assert woken == ["inner"]  # nothing new committed
    def written_then_refused(tx):
        schedule(tx, "D003")
        raise ValueError("refused")

    with pytest.raises(ValueError):
        outer.transact_now(written_then_refused)
    looks()
    assert woken == ["inner"]  # rolled back: nothing to see
    inner.transact_now(lambda tx: schedule(tx, "D002"))
    assert woken == ["inner", "inner"]  # its own commit: the direct notification only
    looks()
    assert woken == ["inner", "inner"]
    loop.stop()
    outer.close()
    inner.close()


# -- the COMMIT in a writer thread (pipelined group commit) -------------------------------------------------


class ThreadReactor(TickReactor):
    """A Clock that also takes calls from other threads, as a real reactor does: they wait in a queue until
    the test runs them (``pump``) on its own thread — the test's thread is the reactor thread."""

    def __init__(self):
        super().__init__()
        self.from_threads = queue.Queue()

    def callFromThread(self, f, *args, **kw):
        self.from_threads.put((f, args, kw))

    def pump(self):
        """Run the next call from another thread (waiting for it), then what is due now."""
        f, args, kw = self.from_threads.get(timeout=30)
        f(*args, **kw)
        self.turn()


class SlowCommit:
    """Stands in for the chamber's COMMIT: records where and when it ran, and holds it until ``release()``
    (or makes it fail)."""

    def __init__(self, monkeypatch, events, fail=None):
        import gateway.chamber.threads as threads_module

        self.real = threads_module.commit
        self.events = events
        self.started = threading.Event()
        self.gate = threading.Event()
        self.fail = fail
        self.threads = []
        monkeypatch.setattr(threads_module, "commit", self)

    def __call__(self, conn):
        self.threads.append(threading.current_thread())
        self.events.append("commit started")
        self.started.set()
        assert self.gate.wait(30)
        if self.fail is not None:
            self.events.append("commit failed")
            raise self.fail
        self.real(conn)
        self.events.append("commit returned")

    def release(self):
        self.gate.set()


def threaded_chamber(path, pipeline=True):
    reactor = ThreadReactor()
    ch = Chamber(path, reactor=reactor, clock=reactor.seconds, commit_in_thread=True, pipeline=pipeline)
    ch.open()
    return ch, reactor


def outside_view(path):
    other = sqlite3.connect(path)
    try:
        return [r[0] for r in other.execute("SELECT id FROM schedules ORDER BY id")]
    finally:
        other.close()


def test_units_are_answered_only_after_the_commit_returned_in_the_writer_thread(tmp_path, monkeypatch):
    """With the COMMIT in the writer thread, a unit's Deferred fires (and the observers run) on the reactor
    thread only after that COMMIT has returned, even when the COMMIT is slow; meanwhile reads do not see the
    batch and do not wait for it, and new work waits for the next batch, which starts after the COMMIT."""
    events = []
    slow = SlowCommit(monkeypatch, events)
    path = tmp_path / "c.sqlite3"
    ch, reactor = threaded_chamber(path)
    ch.observe(lambda: events.append("observed"))
    d1 = ch.transact(lambda tx: schedule(tx, "A"))
    d1.addCallback(lambda _: events.append("answered A"))
    reactor.turn()  # the batch runs; its COMMIT goes to the writer thread
    assert slow.started.wait(30)
    assertNoResult(d1)
    assert ch.read().schedules() == []  # the uncommitted batch is not visible, and the read did not wait
    assert outside_view(path) == []
    d2 = ch.transact(lambda tx: schedule(tx, "B"))
    d2.addCallback(lambda _: events.append("answered B"))
    reactor.turn()
    assertNoResult(d2)
    assert events == ["commit started"]  # B waits for the next batch
    slow.release()
    reactor.pump()  # A's COMMIT returned: A answered, observers told, then B's batch begins
    successResultOf(d1)
    assert [s.id for s in ch.read().schedules()] == ["A"]
    reactor.pump()
    successResultOf(d2)
    assert events == ["commit started", "commit returned", "answered A", "observed",
                      "commit started", "commit returned", "answered B", "observed"]
    assert all(t is not threading.current_thread() for t in slow.threads)  # COMMIT ran off this thread
    assert [s.id for s in ch.read().schedules()] == ["A", "B"] == outside_view(path)
    ch.close()


def test_a_failed_commit_in_the_writer_thread_fails_every_unit_of_its_batch(tmp_path, monkeypatch):
    """A COMMIT that fails (I/O error) fails every unit of its batch with ChamberWriteError, nothing of the
    batch is visible, no observer runs, and the chamber takes the next batch normally."""
    from gateway.chamber.errors import ChamberWriteError

    events = []
    slow = SlowCommit(monkeypatch, events, fail=sqlite3.OperationalError("disk I/O error"))
    slow.release()
    ch, reactor = threaded_chamber(tmp_path / "c.sqlite3")
    ch.observe(lambda: events.append("observed"))
    failed = [ch.transact(lambda tx, sid=sid: schedule(tx, sid)) for sid in ("A", "B")]
    reactor.turn()
    reactor.pump()
    assert all("disk I/O" in str(failureResultOf(d, ChamberWriteError).value) for d in failed)
    assert ch.read().schedules() == [] and "observed" not in events
    slow.fail = None
    d = ch.transact(lambda tx: schedule(tx, "C"))
    reactor.turn()
    reactor.pump()
    successResultOf(d)
    assert [s.id for s in ch.read().schedules()] == ["C"]
    ch.close()


def test_the_wal_is_copied_back_by_the_checkpoint_thread_not_by_a_commit(tmp_path, monkeypatch):
    """The pages committed to the WAL reach the database file through the checkpoint thread (PASSIVE, beside
    the reactor thread): once, CHECKPOINT_INTERVAL after the first commit since the last checkpoint, for all
    the commits of that while — long before the WAL is big enough for SQLite's own checkpoint inside a
    COMMIT, which stays only as a backstop at a larger WAL."""
    import gateway.chamber.threads as threads_module

    monkeypatch.setattr(threads_module, "CHECKPOINT_INTERVAL", 1.0)
    path = tmp_path / "c.sqlite3"
    ch, reactor = threaded_chamber(path, pipeline=False)
    assert ch._writer.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == threads_module.INLINE_CHECKPOINT_PAGES
    ch.transact_now(lambda tx: None)
    deadline = time.monotonic() + 20
    while ch._checkpointer.runs == 0 and time.monotonic() < deadline:  # (the schema's pages)
        time.sleep(0.01)
    start = path.stat().st_size
    started = time.monotonic()
    for i in range(20):
        ch.transact(lambda tx, i=i: tx.add_message(direction="inbound", peer="his", control_id=f"c{i}",
                                                    type="SIU^S12", state="delivered", body=b"x" * 6000,
                                                    charset="utf-8"))
        reactor.turn()
    quick = time.monotonic() - started < 0.8  # (a slow machine may have reached the checkpoint already)
    if quick:
        assert ch._checkpointer.runs == 1 and path.stat().st_size == start  # every page still only in the WAL
    while ch._checkpointer.runs == 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert path.stat().st_size > start + 20 * 6000  # the messages' pages are in the database file now
    time.sleep(1.5)
    assert ch._checkpointer.runs == 2 or not quick  # one for the twenty commits, none while nothing is committed
    thread = ch._checkpointer._thread
    ch.close()
    assert not thread.is_alive()


def test_close_waits_for_the_commit_in_flight_and_commits_what_is_queued(tmp_path, monkeypatch):
    """close() with a COMMIT in flight waits for it (its units are answered after it returned), commits
    the work queued behind it, and only then closes: nothing accepted is lost."""
    events = []
    slow = SlowCommit(monkeypatch, events)
    path = tmp_path / "c.sqlite3"
    ch, reactor = threaded_chamber(path)
    d1 = ch.transact(lambda tx: schedule(tx, "A"))
    d1.addCallback(lambda _: events.append("answered A"))
    reactor.turn()
    assert slow.started.wait(30)
    d2 = ch.transact(lambda tx: schedule(tx, "B"))
    d2.addCallback(lambda _: events.append("answered B"))
    releaser = threading.Timer(0.1, slow.release)  # the disk finishes while close() waits
    releaser.start()
    ch.close()
    releaser.join()
    assert events == ["commit started", "commit returned", "answered A",
                      "commit started", "commit returned", "answered B"]
    assert outside_view(path) == ["A", "B"]
    assert reactor.from_threads.qsize() == 1  # the writer thread's late hand-back ...
    reactor.pump()  # ... finds the batch finished already and does nothing
    failureResultOf(ch.transact(lambda tx: None), ChamberError)  # closed


def test_transact_now_waits_for_the_commit_in_flight(tmp_path, monkeypatch):
    """A synchronous transaction (start-up, tools) never runs while a batch's COMMIT is in flight: it waits
    for it and finishes that batch first (so its units are answered in commit order)."""
    events = []
    slow = SlowCommit(monkeypatch, events)
    ch, reactor = threaded_chamber(tmp_path / "c.sqlite3")
    ch.transact(lambda tx: schedule(tx, "A")).addCallback(lambda _: events.append("answered A"))
    reactor.turn()
    assert slow.started.wait(30)
    threading.Timer(0.1, slow.release).start()
    ch.transact_now(lambda tx: (events.append("now"), schedule(tx, "B")))
    assert events[:4] == ["commit started", "commit returned", "answered A", "now"]
    assert [s.id for s in ch.read().schedules()] == ["A", "B"]
    reactor.pump()  # the late hand-back of A's batch: nothing more happens
    assert events.count("answered A") == 1
    ch.close()


def test_the_read_connection_cannot_write(tmp_path):
    """Reads use their own connection, which refuses writes (so nothing can slip past a transaction)."""
    ch, _ = threaded_chamber(tmp_path / "c.sqlite3")
    with pytest.raises(sqlite3.DatabaseError, match="not authorized"):
        ch.read().upsert_schedule(ScheduleRow("X", "x", "", "", "", "", 0))
    with pytest.raises(sqlite3.DatabaseError, match="not authorized"):
        ch.read().prune_audit(0, "x")
    assert ch.read().search_slots(hidden=[("D001", "20300107", None)]) == []  # reads with json_each work
    assert ch.writable() == (True, "ok")
    ch.close()


def test_a_batch_of_one_failing_unit_leaves_nothing_behind(chamber_backend):
    """A batch of one unit runs without a SAVEPOINT: a unit that raises after writing is rolled back."""
    reactor = TickReactor()
    ch = Chamber(backend=chamber_backend(), reactor=reactor, clock=reactor.seconds)
    ch.open()

    def failing(tx):
        schedule(tx, "A")
        raise ValueError("refused")

    d = ch.transact(failing)
    reactor.turn()
    failureResultOf(d, ValueError)
    assert ch.read().schedules() == []
    ch.transact(lambda tx: schedule(tx, "B"))
    reactor.turn()
    assert [s.id for s in ch.read().schedules()] == ["B"]
    ch.close()


# -- what a transaction reports, and the schedules it need not write again ----------------------------------


def _slot_and_appointment(tx, appointment_id="a1", pending="book"):
    from gateway.chamber.rows import AppointmentRow, SlotRow

    schedule(tx)
    tx.insert_slot(SlotRow("S1", "D001", "203001070800", 1.0, 2.0, 15, "card", "card", "free", None, None, None, 0))
    tx.insert_appointment(AppointmentRow(appointment_id, "p", "S1", "pending", {}, None, None, None, None, pending,
                                         1, 0, 0))


def test_settled_appointments_are_reported_after_commit_and_not_when_rolled_back(chamber_backend):
    """observe_settled hears, after the commit, of every appointment whose pending change a committed unit
    cleared — not of one cleared by a unit that was rolled back."""
    from gateway.chamber.rows import AppointmentRow

    reactor = TickReactor()
    ch = Chamber(backend=chamber_backend(), reactor=reactor, clock=reactor.seconds)
    ch.open()
    ch.transact_now(_slot_and_appointment)
    ch.transact_now(lambda tx: tx.insert_appointment(
        AppointmentRow("a2", "p", "S1", "pending", {}, None, None, None, None, "cancel", 1, 0, 0)))
    heard = []
    ch.observe_settled(lambda ids: heard.append(list(ids)))

    def clear_then_fail(tx):
        tx.update_appointment("a2", pending_change=None)
        raise ValueError("changed its mind")

    ch.transact(lambda tx: tx.update_appointment("a1", pending_change=None, status="booked"))
    failing = ch.transact(clear_then_fail)
    ch.transact(lambda tx: tx.update_appointment("a2", outcome="still waiting"))
    assert heard == []
    reactor.turn()
    failureResultOf(failing, ValueError)
    assert heard == [["a1"]]
    ch.close()


def test_a_schedule_repeated_unchanged_is_not_written_again_but_a_change_by_another_process_is_undone(tmp_path):
    """upsert_schedule skips the write when the committed row already has these fields (the HIS repeats
    them in every SIU); a unit rolled back is not taken as written; and after another process (connection)
    has committed, nothing is assumed: the HIS's fields are written again."""
    path = tmp_path / "c.sqlite3"
    clock = task.Clock()
    ch = Chamber(path, clock=clock.seconds)
    ch.open()
    ch.transact_now(schedule)
    clock.advance(10)
    ch.transact_now(schedule)  # unchanged: not written (updated stays)
    assert ch.read().schedules()[0].updated == 0

    def renamed(tx):
        tx.upsert_schedule(ScheduleRow("D001", "Dr Li", "D001", "李", "CARD", "心内科", tx.now))

    def renamed_then_failed(tx):
        renamed(tx)
        raise ValueError("no")

    with pytest.raises(ValueError):
        ch.transact_now(renamed_then_failed)
    ch.transact_now(renamed)
    assert ch.read().schedules()[0].display == "Dr Li"
    other = sqlite3.connect(path)
    other.execute("UPDATE schedules SET display = 'changed elsewhere'")
    other.commit()
    other.close()
    ch.transact_now(renamed)
    assert ch.read().schedules()[0].display == "Dr Li"
    ch.close()


@pytest.mark.parametrize("pipeline", [True, False])
def test_the_write_lock_of_another_process_is_waited_for_in_the_writer_thread(tmp_path, pipeline):
    """While another process (the split lock's other gate) holds the write lock, the reactor thread does not
    wait for it: the batch waits in the writer thread, nothing of it runs, reads go on; once the lock is
    free the units run and commit (in the writer thread, or — not pipelined — on the reactor thread), and
    are answered after their COMMIT."""
    path = tmp_path / "c.sqlite3"
    ch, reactor = threaded_chamber(path, pipeline=pipeline)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    ran = []
    d = ch.transact(lambda tx: (ran.append(1), schedule(tx, "A")))
    reactor.turn()  # returns at once: the lock is the other's
    assert ran == []
    assertNoResult(d)
    assert ch.read().schedules() == []
    other.execute("COMMIT")
    reactor.pump()  # the writer thread got the lock: the unit runs, then its COMMIT
    assert ran == [1]
    if pipeline:
        assertNoResult(d)  # the COMMIT went to the writer thread
        reactor.pump()  # ... and returned
    successResultOf(d)
    assert [s.id for s in ch.read().schedules()] == ["A"]
    other.close()
    ch.close()


def test_without_pipelining_the_commit_runs_in_the_turn_and_reads_use_the_read_connection(tmp_path, monkeypatch):
    """The default (PIPELINE_COMMITS off): a batch commits on the reactor thread in its own turn, its units
    are answered right after, and reads go through the separate read-only connection."""
    events = []
    slow = SlowCommit(monkeypatch, events)
    slow.release()
    ch, reactor = threaded_chamber(tmp_path / "c.sqlite3", pipeline=None)
    d = ch.transact(lambda tx: schedule(tx, "A"))
    d.addCallback(lambda _: events.append("answered"))
    reactor.turn()
    assert events == ["commit started", "commit returned", "answered"]
    assert slow.threads == [threading.current_thread()]
    assert ch._conn is not ch._writer and [s.id for s in ch.read().schedules()] == ["A"]
    ch.close()


# -- the backends (gateway/chamber/backends.py, postgresql.py) ------------------------------------------------------


def test_statements_are_translated_once_for_postgresql():
    """Txn's ``?`` become psycopg's ``%s`` (a literal ``%`` doubled); an INSERT into messages returns the id
    PostgreSQL gives it (SQLite's lastrowid); the translation is cached per statement text."""
    from gateway.chamber.postgresql import translate

    assert translate("SELECT * FROM audit_records WHERE action LIKE ? AND detail = '5%'") == (
        "SELECT * FROM audit_records WHERE action LIKE %s AND detail = '5%%'", False)
    sql, returning = translate("INSERT INTO messages (peer) VALUES (?) ON CONFLICT (peer) DO NOTHING")
    assert returning and sql.endswith("DO NOTHING RETURNING id")
    assert translate("INSERT INTO message_events (message_id) VALUES (?)")[1] is False
    assert translate.cache_info().hits >= 0 and translate("SELECT ?") is translate("SELECT ?")


def _columns(chamber) -> dict[str, list[str]]:
    conn = chamber._conn
    if chamber.backend.kind == "sqlite":
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: sorted(r[1] for r in conn.execute(f"PRAGMA table_info({t})")) for t in tables}
    rows = conn.execute("SELECT table_name, column_name FROM information_schema.columns"
                        " WHERE table_schema = current_schema()").fetchall()
    out: dict[str, list[str]] = {}
    for table, column in rows:
        if column != "rowid":  # (SQLite's implicit one, made explicit where an order depends on it)
            out.setdefault(table, []).append(column)
    return {t: sorted(c) for t, c in out.items()}


def test_both_backends_build_the_same_tables_at_the_same_version(tmp_path, chamber_postgres):
    """One set of schema files: a new chamber on PostgreSQL has exactly the tables and columns of one on SQLite,
    at the same schema version, and the audit trail's rules hold there too (a record cannot be changed)."""
    from gateway.chamber.backends import SqliteBackend
    from gateway.chamber.postgresql import PostgresBackend

    with __import__("psycopg").connect(chamber_postgres.dsn("chamber"), autocommit=True) as admin:
        admin.execute("CREATE SCHEMA same_tables")
    lite = Chamber(backend=SqliteBackend(tmp_path / "c.sqlite3"), clock=time.time)
    pg = Chamber(backend=PostgresBackend(chamber_postgres.dsn("chamber", options="-csearch_path=same_tables")),
                 clock=time.time)
    lite.open()
    pg.open()
    try:
        assert _columns(pg) == _columns(lite)
        for ch in (lite, pg):
            assert ch.read()._c.execute("SELECT value FROM chamber_meta WHERE key = 'schema_version'").fetchone()[0] \
                == str(SCHEMA_VERSION)
            assert len(ch.read().audit_key()) == 32
        from gateway.chamber.rows import AuditRow

        row = AuditRow(1, 1, None, None, None, None, "read", None, None, 200, None, "h")
        pg.transact_now(lambda tx: tx.append_audit(row))
        from gateway.chamber.errors import ChamberWriteError

        with pytest.raises(ChamberWriteError, match="audit records cannot be changed"):
            pg.transact_now(lambda tx: tx._c.execute("UPDATE audit_records SET detail = 'x'"))
        with pytest.raises(ChamberWriteError, match="only by gatewayd audit prune"):
            pg.transact_now(lambda tx: tx._c.execute("DELETE FROM audit_records"))
    finally:
        lite.close()
        pg.close()


def test_reads_cannot_write_on_either_backend(chamber_backend):
    """The read connection refuses writes on PostgreSQL too (a read-only session); the write lock can be taken."""
    ch = Chamber(backend=chamber_backend(), clock=time.time, commit_in_thread=True, reactor=ThreadReactor())
    ch.open()
    try:
        with pytest.raises(ch.backend.Error, match="not authorized|read-only"):
            ch.read().upsert_schedule(ScheduleRow("X", "x", "", "", "", "", 0))
        assert ch.writable() == (True, "ok")
    finally:
        ch.close()


def test_a_postgresql_database_that_sorts_text_otherwise_is_refused(chamber_postgres):
    """A database whose collation would order ids, control ids and page cursors unlike SQLite (here ICU's) is
    refused at open, saying how to create one that does."""
    import psycopg

    from gateway.chamber.postgresql import PostgresBackend

    with psycopg.connect(chamber_postgres.dsn("postgres"), autocommit=True) as admin:
        admin.execute("CREATE DATABASE icu TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
                      " LOCALE 'C.UTF-8'")
    with pytest.raises(ChamberError, match="LC_COLLATE 'C'"):
        Chamber(backend=PostgresBackend(chamber_postgres.dsn("icu")), clock=time.time).open()


def test_a_chamber_on_postgresql_connects_again_when_its_connections_are_dropped(chamber_postgres):
    """PostgreSQL restarted or failed over drops the chamber's connections: the next read runs on a new one
    (a read may be run again), the next transaction BEGINs on a new one (nothing had been done on the old one);
    nothing committed before is lost, and the write after is committed."""
    import psycopg

    from gateway.chamber.postgresql import PostgresBackend

    with psycopg.connect(chamber_postgres.dsn("chamber"), autocommit=True) as admin:
        admin.execute("CREATE SCHEMA dropped")
        dsn = chamber_postgres.dsn("chamber", options="-csearch_path=dropped")
        clock = task.Clock()
        ch, other = (Chamber(backend=PostgresBackend(dsn), clock=time.time) for _ in range(2))
        ch.open()
        other.open()
        woken = []
        ch.observe(lambda: woken.append(1), own_commits=False)
        loop = ch.watch(clock, interval=0.01)
        try:
            ch.transact_now(schedule)
            pids = [ch._writer.raw.info.backend_pid, ch._reader.raw.info.backend_pid, ch._watch._conn.raw.info.backend_pid]
            admin.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) pid", (pids,))
            assert [s.id for s in ch.read().schedules()] == ["D001"]
            ch.transact_now(lambda tx: schedule(tx, "D002"))
            assert [s.id for s in ch.read().schedules()] == ["D001", "D002"]
            assert ch._writer.raw.info.backend_pid not in pids and ch._reader.raw.info.backend_pid not in pids
            looks_until(clock, lambda: woken)
            assert woken  # the watch's own connection was dropped too: made again, and what was missed is looked at
            woken.clear()
            other.transact_now(lambda tx: schedule(tx, "D003"))
            looks_until(clock, lambda: woken)
            assert woken  # and it hears the other process's commits again
        finally:
            loop.stop()
            ch.close()
            other.close()


def test_text_with_nul_is_kept_and_found_on_both_backends(chamber_backend):
    """SQLite keeps a NUL inside text, PostgreSQL's text cannot: the chamber on PostgreSQL writes it escaped and
    reads it back as it came, so a key with one (an Idempotency-Key header, a query parameter) is found again and
    never a storage error; a patient whose identifiers hold one is kept, and a search for others is not disturbed."""
    from gateway.chamber.rows import AppointmentRow

    ch = Chamber(backend=chamber_backend(), clock=time.time)
    ch.open()
    try:
        ch.transact_now(_slot_and_appointment)
        odd = "键\x00\x01\x01x\x01"
        ch.transact_now(lambda tx: tx.remember_request("p", odd, "h\x00", "a1"))
        assert ch.read().idempotent_request("p", odd) == ("h\x00", "a1")
        assert ch.read().idempotent_request("p", "键\x01\x01\x01x\x01") is None  # no two texts become one
        ch.transact_now(lambda tx: tx.insert_appointment(AppointmentRow(
            "a2", "p", "S1", "booked", {"identifiers": [{"system": "urn:x", "value": "N\x00"}]}, None, None, None,
            None, None, 1, 0, 0)))
        ch.transact_now(lambda tx: tx.insert_appointment(AppointmentRow(
            "a3", "p", "S1", "booked", {"identifiers": [{"system": "urn:x", "value": "M1"}]}, None, None, None,
            None, None, 1, 0, 0)))
        assert ch.read().appointment("a2").patient["identifiers"][0]["value"] == "N\x00"
        assert [a.id for a in ch.read().search_appointments("p", patients=[("urn:x", "M1")])] == ["a3"]
        assert [a.id for a in ch.read().search_appointments("p", patients=[(None, "M1"), ("urn:x", "\x00")])] == ["a3"]
        assert ch.read().search_appointments("p", statuses=[]) == []  # (no status at all: nothing, not an error)
    finally:
        ch.close()


def test_a_gates_claim_in_postgresql_is_held_once_named_and_kept_or_lost(chamber_postgres):
    """DatabaseClaim: a second process claiming the same gate of the same chamber is refused, naming the first;
    another gate or another chamber (schema) is not; when PostgreSQL drops the holder's connection the claim is
    free — taken again by the holder's next keep(), or, if another took it meanwhile, keep() says the holder
    must stop."""
    import psycopg

    from gateway.chamber.errors import ChamberClaimed
    from gateway.chamber.postgresql import PostgresBackend

    with psycopg.connect(chamber_postgres.dsn("chamber"), autocommit=True) as admin:
        admin.execute("CREATE SCHEMA claims_a")
        admin.execute("CREATE SCHEMA claims_b")
        a, b = (PostgresBackend(chamber_postgres.dsn("chamber", options=f"-csearch_path=claims_{s}")) for s in "ab")
        first = a.claim(["outer", "inner"], "gatewayd both pid 1 on host-1")
        first.take()
        second = a.claim(["inner"], "gatewayd inner pid 2 on host-2")
        with pytest.raises(ChamberClaimed, match="inner gate .* already run by gatewayd both pid 1 on host-1"):
            second.take()
        b.claim(["inner"], "gatewayd inner pid 3 on host-2").take()  # another chamber
        assert first.keep() is None
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE"
                      " 'gatewayd both pid 1%'")
        assert first.keep() is None  # taken again on a new connection
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE"
                      " 'gatewayd both pid 1%'")
        second.take()  # meanwhile another process took the inner gate
        lost = first.keep()
        assert lost is not None and "pid 2 on host-2" in lost
        second.release()


def test_a_postgresql_chamber_that_cannot_be_opened_says_where_without_the_password(chamber_postgres):
    """A server that is not there, or a schema the chamber cannot be created in: ChamberError naming the database
    (host, port, name), never the password."""
    import psycopg

    from gateway.chamber.postgresql import PostgresBackend

    with pytest.raises(ChamberError, match=r"postgresql://127\.0\.0\.1:1/chamber") as e:
        Chamber(backend=PostgresBackend("host=127.0.0.1 port=1 dbname=chamber user=gw", password="s3cret",
                                        connect_timeout=1), clock=time.time).open()
    assert "s3cret" not in str(e.value)
    with psycopg.connect(chamber_postgres.dsn("chamber"), autocommit=True) as admin:
        admin.execute("CREATE ROLE visitor LOGIN")
        admin.execute("CREATE SCHEMA not_yours")
    with pytest.raises(ChamberError, match="cannot open the chamber postgresql:.*not_yours: "):
        Chamber(backend=PostgresBackend(chamber_postgres.dsn("chamber", options="-csearch_path=not_yours")
                                        .replace("user=gw", "user=visitor")), clock=time.time).open()


def test_the_operators_counts_read_alike_on_both_backends(chamber_backend):
    """The console's traffic buckets (the one integer division each dialect writes its own way), the status's
    counts and the oldest waiting message: the same figures from either backend."""
    clock = task.Clock()
    clock.advance(1000)
    ch = Chamber(backend=chamber_backend(), clock=clock.seconds)
    ch.open()
    try:
        for at, direction, control_id in ((1000.0, "inbound", "a"), (1059.9, "inbound", "b"), (1060.0, "outbound", "c"),
                                          (1185.5, "outbound", "d")):
            clock.advance(at - clock.seconds())
            ch.transact_now(lambda tx: tx.add_message(direction=direction, peer="his", control_id=control_id,
                                                      type="SIU^S12", state="committed", body=b"x", charset="utf-8"))
        traffic = ch.read().traffic(1000.0, 60.0)
        assert [(b, d, n) for b, d, n, _ in traffic] == [(0, "inbound", 2), (1, "outbound", 1), (3, "outbound", 1)]
        assert ch.read().counts_since(1060.0) == {("outbound", "his"): 2}
        assert ch.read().oldest_waiting() == {"his": 1060.0}
        assert ch.read().state_counts() == {("inbound", "his", "committed"): 2, ("outbound", "his", "committed"): 2}
        assert [e[1] for e in ch.read().message_events(ch.read().messages(control_id="d")[0].id)] == ["committed"]
    finally:
        ch.close()
