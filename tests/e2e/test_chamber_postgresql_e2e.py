"""The lock with its chamber on PostgreSQL (chamber.backend: postgresql, docs/chamber.md): a real gateway process
and the HIS simulator over real sockets, the chamber in a real PostgreSQL server (tests/databases.py, the
session's ``chamber_postgres``). The SIU the HIS pushes reach the FHIR API, a platform's booking reaches the HIS
and is answered 201 after the HIS's AA was committed, and what was committed is there after a restart; the
operator's commands read the same chamber, and backup is refused with the tool that does it."""

import subprocess
import sys
import time
import uuid

import psycopg
import pytest

from tests.e2e.harness import Lock, appointment_for
from tests.e2e.test_split_e2e import SplitLock


def _on_postgresql(kind, tmp_path, postgres, schema):
    """A lock of ``kind`` whose chamber is a new schema of the session's PostgreSQL (one per test)."""
    schema = f"{schema}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres.dsn("chamber"), autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    return kind(tmp_path, gateway={"chamber": {"backend": "postgresql", "postgresql": {
        "dsn": postgres.dsn("chamber", options=f"-csearch_path={schema}"), "sslmode": "disable"}}})


@pytest.fixture
def pg_lock(tmp_path, chamber_postgres):
    with _on_postgresql(Lock, tmp_path, chamber_postgres, "e2e_lock") as lock:
        yield lock


@pytest.fixture
def pg_split(tmp_path, chamber_postgres):
    with _on_postgresql(SplitLock, tmp_path, chamber_postgres, "e2e_split") as lock:
        yield lock


def gatewayd(lock, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args, "--config", "gateway.yaml"], cwd=lock.workdir,
                          capture_output=True, text=True, timeout=60)


def test_siu_in_and_a_booking_out_through_a_chamber_on_postgresql(pg_lock):
    lock = pg_lock
    # the HIS's SIU crossed into PostgreSQL (Lock.start waited for every slot on the FHIR API)
    inbound = lock.chamber_rows("SELECT count(*) FROM messages WHERE direction = 'inbound' AND state = 'delivered'")
    assert inbound[0][0] >= lock.slot_count
    assert not (lock.workdir / "chamber.sqlite3").exists()  # no SQLite file on the side

    slot = lock.search_slots(status="free")[0]
    r = lock.session().post(f"{lock.base}/Appointment", json=appointment_for(slot["id"]),
                            headers={"Content-Type": "application/fhir+json"}, timeout=15)
    assert r.status_code == 201, r.text
    booked = r.json()
    assert booked["status"] == "booked"
    srm = [m for m in lock.received() if m["type"] == "SRM^S01" and m["placer"] == booked["id"]]
    assert len(srm) == 1 and srm[0]["ack"] == "AA"
    assert lock.chamber_rows("SELECT status, pending_change FROM appointments WHERE id = ?", booked["id"]) == [
        ("booked", None)]
    assert lock.chamber_rows("SELECT type, state, control_id FROM messages WHERE direction = 'outbound'") == [
        ("SRM^S01", "delivered", srm[0]["control_id"])]

    # the operator's commands on the same chamber, while the gateway runs
    listing = gatewayd(lock, "queue", "show")
    assert listing.returncode == 0 and "SRM^S01" in listing.stdout, listing.stderr
    status = gatewayd(lock, "status", "--json")
    assert status.returncode in (0, 1) and '"backend": "postgresql"' in status.stdout, status.stderr
    refused = gatewayd(lock, "backup", str(lock.workdir / "copy.sqlite3"))
    assert refused.returncode == 1 and "pg_dump" in refused.stderr
    assert not (lock.workdir / "copy.sqlite3").exists()

    # what was committed is there after a restart, and the gateway answers from it
    lock.gateway.stop()
    lock.start_gateway()
    again = lock.session().get(f"{lock.base}/Appointment/{booked['id']}", timeout=10)
    assert again.status_code == 200 and again.json()["status"] == "booked"
    assert slot["id"] not in {s["id"] for s in lock.search_slots(status="free")}


def test_the_split_lock_on_postgresql_wakes_each_process_by_notify(pg_split):
    """The two gates as two processes on one chamber in PostgreSQL: the inner process's slots reach the outer
    one's FHIR API, and a booking made at the outer gate is delivered by the inner one and answered 201 — each
    process woken by the other's commits (LISTEN/NOTIFY): without that the outer gate would answer 202 when
    outer.answer_within (5 s) has passed."""
    slot_id = pg_split.search_slots(status="free")[0]["id"]
    started = time.monotonic()
    r = pg_split.session().post(f"{pg_split.base}/Appointment", json=appointment_for(slot_id),
                                headers={"Content-Type": "application/fhir+json"}, timeout=15)
    elapsed = time.monotonic() - started
    assert r.status_code == 201, r.text
    print(f"\nsplit-mode booking round trip on PostgreSQL: {elapsed * 1000:.1f} ms")
    assert [m["placer"] for m in pg_split.received() if m["type"] == "SRM^S01"] == [r.json()["id"]]


def test_a_second_gateway_on_the_same_postgresql_chamber_is_refused_from_another_directory(pg_lock, tmp_path):
    """One chamber serves one gateway (issue 24), on PostgreSQL too — and there the claim files beside
    chamber.path do not reach another host: the gate's claim is also held in the database. A second gateway with
    the same database but its own directory (its own claim files, as on another host) is refused, exit 3,
    naming the holder; the first goes on serving."""
    import shutil

    import yaml

    other = tmp_path / "other-host"
    shutil.copytree(pg_lock.workdir / "certs", other / "certs")
    config = yaml.safe_load((pg_lock.workdir / "gateway.yaml").read_text(encoding="utf-8"))
    config["outer"]["port"] = config["outer"]["port"] + 1 if config["outer"]["port"] < 65000 else 20000
    config["inner"]["listen"] = "tcp:0:interface=127.0.0.1"
    (other / "gateway.yaml").write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    second = subprocess.run([sys.executable, "-m", "gateway", "run", "--config", "gateway.yaml"], cwd=other,
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 3, second.stderr
    assert "gate of the chamber postgresql://" in second.stderr and f"pid {pg_lock.gateway.popen.pid}" in second.stderr
    assert lock_still_serves(pg_lock)


def lock_still_serves(lock) -> bool:
    return lock.session().get(f"{lock.base}/metadata", timeout=5).status_code == 200
