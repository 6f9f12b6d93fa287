"""The audit trail: hash chain, tamper detection, pruning with an anchor, AuditEvent export, and records
written in the same transaction as the booking they describe.  Real chamber files; tampering is done the
way an intruder would, with sqlite3 on the file."""

import functools
import json
import sqlite3
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from twisted.internet import task

from adapters.maps.srm_booking import Hl7Header, build_srm
from gateway.domain import audit
from gateway.domain.audit import AuditEntry, AuditTrail, GENESIS, chain_hash, prunable, prune, verify
from gateway.domain.booking import BookingService, HisLinkInfo
from gateway.domain.slot_book import SlotBook
from gateway.chamber.engine import Chamber
from gateway.domain.quota import QuotaExhausted, QuotaRule, Quotas
from gateway.domain.model import BookingRequest, HisAnswer, Patient, PatientIdentifier, ScheduleInfo, SlotNotice
from gateway.domain.ids import slot_id
from tests.deferreds import failureResultOf, successResultOf

TZ = ZoneInfo("Asia/Shanghai")
T0 = datetime(2030, 1, 1, tzinfo=TZ).timestamp()


@pytest.fixture
def env(chamber_backend):
    """(once on each chamber backend: tests/conftest.py)"""
    clock = task.Clock()
    clock.advance(T0)
    chamber = Chamber(backend=chamber_backend(), clock=clock.seconds)
    chamber.open()
    yield chamber, clock, chamber
    chamber.close()


def write(chamber, n, **kw):
    trail = AuditTrail(chamber)
    for i in range(n):
        trail.record(AuditEntry(action="read", outcome=200, platform="demo", subject="CN=platform-demo",
                                serial="1F", source="127.0.0.1", resource_type="Appointment",
                                resource_id=f"a{i}", **kw))


def tamper(where, *statements):
    """What an intruder with the file (or the database's owner) does: drop the guard triggers (disable them), then
    change rows.  ``where``: the chamber file's path, or a chamber (either backend)."""
    if isinstance(where, Chamber) and where.backend.kind == "postgresql":
        def intrude(tx):
            tx._c.execute("ALTER TABLE audit_records DISABLE TRIGGER USER")
            for sql in statements:
                tx._c.execute(sql)
            tx._c.execute("ALTER TABLE audit_records ENABLE TRIGGER USER")

        where.transact_now(intrude)
        return
    conn = sqlite3.connect(where.path if isinstance(where, Chamber) else where)
    conn.execute("DROP TRIGGER audit_records_are_not_changed")
    conn.execute("DROP TRIGGER audit_records_are_pruned_only_behind_the_anchor")
    for sql in statements:
        conn.execute(sql)
    conn.commit()
    conn.close()


def test_records_are_numbered_and_chained_from_the_genesis_hash(env):
    """seq 1, 2, 3 ...; each hash = sha256(previous hash + canonical content); the head follows."""
    chamber, clock, _ = env
    write(chamber, 3)
    rows = list(chamber.read().audit_records())
    assert [r.seq for r in rows] == [1, 2, 3]
    assert rows[0].hash == chain_hash(GENESIS, rows[0])
    assert rows[2].hash == chain_hash(rows[1].hash, rows[2])
    assert rows[0].at_us == round(T0 * 1_000_000)
    chain = chamber.read().audit_chain()
    assert (chain.head_seq, chain.head_hash) == (3, rows[2].hash)
    verdict = verify(chamber.read())
    assert verdict.ok and verdict.checked == 3


def test_the_chamber_refuses_to_change_or_delete_records(env):
    """Guard triggers: UPDATE and DELETE of a live record fail inside the database itself (SQLite's or
    PostgreSQL's), whoever asks."""
    chamber, _, _ = env
    write(chamber, 2)
    from gateway.chamber.errors import ChamberWriteError

    with pytest.raises(ChamberWriteError, match="cannot be changed"):
        chamber.transact_now(lambda tx: tx._c.execute("UPDATE audit_records SET outcome = 200 WHERE seq = 1"))
    with pytest.raises(ChamberWriteError, match="audit prune"):
        chamber.transact_now(lambda tx: tx._c.execute("DELETE FROM audit_records WHERE seq = 2"))
    assert [r.outcome for r in chamber.read().audit_records()] == [200, 200]


def test_an_edited_record_is_named(env):
    """Someone changes record 3's outcome (triggers dropped first): verify fails at record 3."""
    chamber, _, path = env
    write(chamber, 5)
    tamper(path, "UPDATE audit_records SET outcome = 403 WHERE seq = 3")
    verdict = verify(chamber.read())
    assert (verdict.ok, verdict.broken_at) == (False, 3)
    assert "record 3 was changed" in verdict.reason


def test_an_edit_with_a_recomputed_hash_breaks_the_next_link(env):
    """Changing record 2 and recomputing its hash makes record 3 not follow: verify stops at 3, naming 2."""
    chamber, _, path = env
    write(chamber, 4)
    row = chamber.read().audit_record(2)
    forged = row.__class__(**{**row.__dict__, "platform": "other"})
    new_hash = chain_hash(chamber.read().audit_record(1).hash, forged)
    tamper(path, f"UPDATE audit_records SET platform = 'other', hash = '{new_hash}' WHERE seq = 2")
    verdict = verify(chamber.read())
    assert verdict.broken_at == 3 and "record 2 was changed together with its hash" in verdict.reason


def test_a_deleted_record_leaves_a_gap_that_is_named(env):
    chamber, _, path = env
    write(chamber, 5)
    tamper(path, "DELETE FROM audit_records WHERE seq = 2")
    verdict = verify(chamber.read())
    assert (verdict.ok, verdict.broken_at) == (False, 2)
    assert "record 2 is missing" in verdict.reason


def test_deleting_the_last_records_is_seen_from_the_head(env):
    chamber, _, path = env
    write(chamber, 5)
    tamper(path, "DELETE FROM audit_records WHERE seq >= 4")
    verdict = verify(chamber.read())
    assert (verdict.ok, verdict.broken_at) == (False, 4)
    assert "4-5 are missing" in verdict.reason


def test_prune_removes_old_records_keeps_an_anchor_and_the_rest_still_verifies(env):
    """Records older than the cutoff go (oldest first, no gaps), the last one removed becomes the anchor,
    the prune is itself recorded, and the chain still verifies; deleting the first kept one is still seen."""
    chamber, clock, path = env
    write(chamber, 3)
    clock.advance(200 * 86400)
    write(chamber, 2)
    cutoff = clock.seconds() - 180 * 86400
    assert prunable(chamber.read(), cutoff) == 3
    removed, anchor = chamber.transact_now(lambda tx: prune(tx, cutoff, "operator test"))
    assert (removed, anchor) == (3, 3)
    rows = list(chamber.read().audit_records())
    assert [r.seq for r in rows] == [4, 5, 6]
    assert rows[-1].action == "audit.prune" and "removed records 1-3" in rows[-1].detail
    assert verify(chamber.read()).ok
    assert chamber.transact_now(lambda tx: prune(tx, cutoff, "operator test")) == (0, 3)  # nothing older left
    tamper(path, "DELETE FROM audit_records WHERE seq = 4")
    verdict = verify(chamber.read())
    assert (verdict.ok, verdict.broken_at) == (False, 4)


def test_export_gives_valid_r4b_audit_events_without_patient_data(env):
    chamber, _, _ = env
    write(chamber, 1)
    AuditTrail(chamber).record(AuditEntry(action="access", outcome=403, subject="CN=stranger", serial="AB",
                                          source="10.0.0.9", detail="security"))
    lines = list(audit.export(chamber.read().audit_records(), TZ))
    events = [json.loads(line) for line in lines]
    for event in events:
        AuditEvent.model_validate(event)
    read, refused = events
    assert read["entity"][0]["what"] == {"reference": "Appointment/a0"}
    assert read["agent"][0]["who"]["identifier"]["value"] == "demo"
    assert read["agent"][0]["network"] == {"address": "127.0.0.1", "type": "2"}
    assert read["outcome"] == "0" and read["subtype"][0]["code"] == "read"
    assert refused["outcome"] == "4" and refused["agent"][0]["altId"] == "CN=stranger"
    assert read["extension"][0]["valueString"] == chamber.read().audit_record(1).hash


# -- records written with the change they describe ----------------------------------------------------------

PATIENT = Patient((PatientIdentifier("urn:id-card", "11010519491231002X", "NI"),), "欧阳", "娜娜", "13912345678")
SCHEDULE = ScheduleInfo("D001", "Dr", "D001", "张伟", "CARD", "心内科")
START = datetime(2030, 1, 7, 8, 0)


@pytest.fixture
def booking(env):
    chamber, clock, _ = env
    header = Hl7Header("GATEWAYD", "FRONT", "HIS", "HOSPITAL", "2.5", "utf-8")
    service = BookingService(chamber, HisLinkInfo("his", "utf-8", "S04", functools.partial(build_srm, header=header)),
                             tz=TZ, hold_seconds=60, clock=clock,
                             quotas=Quotas({"demo": [QuotaRule("*", None, 1, None)]}, TZ))
    chamber.transact_now(lambda tx: SlotBook(TZ).apply(tx, [
        SlotNotice("open", SCHEDULE, START, 15, "card", "x"),
        SlotNotice("open", SCHEDULE, START.replace(hour=9), 15, "card", "x")]))
    yield service
    service.stop()


WHO = AuditEntry(action="book", outcome=0, platform="demo", subject="CN=platform-demo", serial="1F",
                 source="127.0.0.1")


def test_a_booking_and_its_record_commit_together_and_the_his_answer_is_recorded(env, booking):
    """The hold writes 'book' (202) in its own transaction; the HIS's AA writes 'book.settled' (201); a
    refusal by quota writes nothing in the booking's transaction (it is rolled back with it)."""
    chamber, _, _ = env
    appointment_id, how = successResultOf(
        booking.book("demo", BookingRequest(slot_id("D001", START), PATIENT), who=WHO))
    assert how == "new"
    [record] = chamber.read().audit_records()
    assert (record.action, record.outcome, record.resource_id, record.subject, record.source) == \
        ("book", 202, appointment_id, "CN=platform-demo", "127.0.0.1")
    failureResultOf(booking.book("demo", BookingRequest(slot_id("D001", START.replace(hour=9)), PATIENT), who=WHO),
                    QuotaExhausted)
    assert len(list(chamber.read().audit_records())) == 1
    srm = chamber.read().messages(direction="outbound")[0]
    chamber.transact_now(lambda tx: booking.on_answer(tx, tx.message(srm.id), HisAnswer("AA", "", "H1")))
    settled = list(chamber.read().audit_records())[-1]
    assert (settled.action, settled.outcome, settled.platform, settled.source) == \
        ("book.settled", 201, "demo", "his:his")
    assert successResultOf(booking.cancel("demo", appointment_id, who=WHO)) == "sent"
    cancel = list(chamber.read().audit_records())[-1]
    assert (cancel.action, cancel.outcome) == ("cancel", 202)
    assert verify(chamber.read()).ok


def test_audit_records_carry_no_patient_data(env, booking):
    """Names, the ID card number and the phone number of the patient appear in no audit column."""
    chamber, clock, path = env
    appointment_id, _ = successResultOf(
        booking.book("demo", BookingRequest(slot_id("D001", START), PATIENT), who=WHO))
    clock.advance(61)  # the hold expires: book.settled by the gateway
    rows = list(chamber.read().audit_records())
    assert [r.action for r in rows] == ["book", "book.settled"]
    text = json.dumps([r.__dict__ for r in rows], ensure_ascii=False)
    for secret in ("欧阳", "娜娜", "11010519491231002X", "13912345678"):
        assert secret not in text


# -- the commands ---------------------------------------------------------------------------------------------

def config_file(tmp_path, retention="180d"):
    from gateway.ops.devca import init_dev_ca

    init_dev_ca(tmp_path / "certs")
    path = tmp_path / "gateway.yaml"
    path.write_text(f"""
inner: {{his: {{host: 127.0.0.1, port: 2576}}}}
outer: {{tls: {{certificate: certs/server.pem, private_key: certs/server.key, client_ca: certs/ca.pem}}}}
platforms: [{{name: demo, certificate_subject: CN=platform-demo}}]
chamber: {{path: cli.sqlite3}}
audit: {{retention: {retention}}}
""", encoding="utf-8")
    return path


@pytest.fixture(autouse=False)
def quiet_cli(monkeypatch):
    """The commands configure logging globally (to this test's captured stderr): keep that to the test."""
    from gateway.ops import logs

    monkeypatch.setattr(logs, "configure", lambda *a, **kw: None)


def test_prune_command_removes_only_what_is_past_retention_and_verify_still_passes(tmp_path, capsys, quiet_cli):
    """`gatewayd audit prune --yes` removes the records older than audit.retention (written here with a
    clock 200 days back), keeps the newer ones, and `gatewayd audit verify` still says ok; `export --since`
    writes AuditEvents for what is left."""
    import time

    from gateway.cli import main

    config = config_file(tmp_path)
    old = Chamber(tmp_path / "cli.sqlite3", clock=lambda: time.time() - 200 * 86400)
    old.open()
    write(old, 4)
    old.close()
    new = Chamber(tmp_path / "cli.sqlite3", clock=time.time)
    new.open()
    write(new, 2)
    new.close()
    assert main(["audit", "prune", "--yes", "--config", str(config)]) == 0
    assert "removed 4 audit record(s)" in capsys.readouterr().out
    assert main(["audit", "verify", "--config", str(config)]) == 0
    out = capsys.readouterr().out  # (with logging left unconfigured, log lines land here too)
    assert "\nok: 3 record(s) verified, records 5-7 (anchor: record 4)" in "\n" + out
    assert main(["audit", "prune", "--yes", "--config", str(config)]) == 0
    assert "nothing to remove" in capsys.readouterr().out
    since = datetime.fromtimestamp(time.time() - 86400, TZ).date().isoformat()
    assert main(["audit", "export", "--since", since, "--config", str(config)]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [e["id"] for e in events] == ["audit-5", "audit-6", "audit-7"]
    assert events[-1]["type"]["code"] == "110101"  # the prune itself


def test_prune_refuses_to_touch_a_broken_chain(tmp_path, capsys, quiet_cli):
    from gateway.cli import main

    config = config_file(tmp_path)
    chamber = Chamber(tmp_path / "cli.sqlite3", clock=lambda: T0)
    chamber.open()
    write(chamber, 3)
    chamber.close()
    tamper(tmp_path / "cli.sqlite3", "DELETE FROM audit_records WHERE seq = 2")
    assert main(["audit", "prune", "--yes", "--config", str(config)]) == 1
    assert "broken at record 2" in capsys.readouterr().err
    assert main(["audit", "verify", "--config", str(config)]) == 1
    assert "audit chain BROKEN at record 2: record 2 is missing" in capsys.readouterr().out


def test_find_answers_was_this_id_asked_for_by_its_keyed_name(tmp_path, capsys, quiet_cli):
    """`gatewayd audit find ID ...` computes the names the audit gives the ids (under this chamber's key;
    percent-escapes undone, as in a URL) and prints the records naming them; exit 1 when none does."""
    from gateway.cli import main

    config = config_file(tmp_path)
    chamber = Chamber(tmp_path / "cli.sqlite3", clock=lambda: T0)
    chamber.open()
    key = chamber.read().audit_key()
    trail = AuditTrail(chamber)
    for rid in (audit.keyed_name(key, "x13655550002"), "a0123456789abcdef0123", audit.keyed_name(key, "空1365")):
        trail.record(AuditEntry(action="read", outcome=404, platform="demo", resource_type="Appointment",
                                resource_id=rid, detail="not-found"))
    chamber.close()
    assert main(["audit", "find", "x13655550002", "%E7%A9%BA1365", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"x13655550002: recorded as {audit.keyed_name(key, 'x13655550002')}" in out
    assert f"空1365: recorded as {audit.keyed_name(key, '空1365')}" in out
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["seq"] for r in records] == [1, 3] and "13655550002" not in json.dumps(records)
    assert main(["audit", "find", "a0123456789abcdef0123", "--config", str(config)]) == 0
    assert [json.loads(line)["seq"] for line in capsys.readouterr().out.splitlines() if line.startswith("{")] == [2]
    assert main(["audit", "find", "13655550009", "--config", str(config)]) == 1
    assert "no record names it" in capsys.readouterr().out


def test_a_keyed_name_is_exported_as_what_was_asked_for_not_a_resource(env):
    chamber, _, _ = env
    name = audit.keyed_name(chamber.read().audit_key(), "x13655550002")
    AuditTrail(chamber).record(AuditEntry(action="read", outcome=404, platform="demo", resource_type="Appointment",
                                          resource_id=name, detail="not-found"))
    [event] = [json.loads(line) for line in audit.export(chamber.read().audit_records(), TZ)]
    AuditEvent.model_validate(event)
    assert event["entity"][0]["what"] == {"identifier": {"system": "urn:gatewayd:audit:keyed-name", "value": name}}
