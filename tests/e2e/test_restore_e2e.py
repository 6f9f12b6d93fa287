"""`gatewayd restore FILE --config PATH` on a real gateway's chamber: refused while the gateway runs (naming it),
a corrupt or tampered backup refused with nothing changed, and a good backup put back with the replaced chamber
kept aside — the gateway starts on it and serves its data."""

import shutil
import sqlite3
import subprocess
import sys

from tests.e2e.harness import REPO, Lock, appointment_for


def gatewayd(workdir, *args, timeout=60):
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=workdir, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO)}, timeout=timeout)


def test_restore_refused_while_running_refuses_a_bad_file_and_puts_a_good_backup_back(tmp_path):
    lock = Lock(tmp_path, doctors=2, days=2)
    chamber = tmp_path / "chamber.sqlite3"
    with lock:
        slots = [s["id"] for s in lock.search_slots(status="free")]
        s = lock.session()
        fhir = {"Content-Type": "application/fhir+json"}
        before = s.post(f"{lock.base}/Appointment", json=appointment_for(slots[0]), headers=fhir)
        assert before.status_code == 201
        backup = gatewayd(tmp_path, "backup", "good.sqlite3", "--config", "gateway.yaml")
        assert backup.returncode == 0, backup.stderr
        after = s.post(f"{lock.base}/Appointment", json=appointment_for(slots[1], mrn="MRN-AFTER"), headers=fhir)
        assert after.status_code == 201

        running = gatewayd(tmp_path, "restore", "good.sqlite3", "--config", "gateway.yaml")
        assert running.returncode == 1
        assert "refused, nothing was changed" in running.stderr
        assert f"pid {lock.gateway.popen.pid}" in running.stderr and "stop the gateway first" in running.stderr
        assert s.get(f"{lock.base}/Appointment/{after.json()['id']}").status_code == 200  # still serving
        lock.gateway.stop()
    assert lock.gateway.popen.returncode == 0

    # the bad ones, with the gateway stopped: each refused, the chamber untouched
    untouched = chamber.read_bytes()
    (tmp_path / "notes.txt").write_text("not a chamber\n")
    damaged = bytearray((tmp_path / "good.sqlite3").read_bytes())
    page = 4096 * 3  # a table's page: garbage over its cells
    damaged[page + 8:page + 2000] = bytes(range(256)) * 7 + bytes(200)
    (tmp_path / "damaged.sqlite3").write_bytes(bytes(damaged))
    shutil.copy(tmp_path / "good.sqlite3", tmp_path / "tampered.sqlite3")
    with sqlite3.connect(tmp_path / "tampered.sqlite3") as conn:
        assert conn.execute("SELECT count(*) FROM audit_records").fetchone()[0] >= 2
        conn.execute("DROP TRIGGER audit_records_are_not_changed")  # (as an intruder would)
        conn.execute("UPDATE audit_records SET outcome = 4 WHERE seq = (SELECT min(seq) FROM audit_records)")
    conn.close()
    shutil.copy(tmp_path / "good.sqlite3", tmp_path / "future.sqlite3")
    with sqlite3.connect(tmp_path / "future.sqlite3") as conn:
        conn.execute("UPDATE chamber_meta SET value = '999' WHERE key = 'schema_version'")
    conn.close()
    for name, why in (("notes.txt", "is not an SQLite database"), ("damaged.sqlite3", "integrity_check"),
                      ("tampered.sqlite3", "audit chain is broken at record"),
                      ("future.sqlite3", "schema version is 999"), ("missing.sqlite3", "is not a file")):
        refused = gatewayd(tmp_path, "restore", name, "--config", "gateway.yaml")
        assert refused.returncode == 1 and why in refused.stderr, (name, refused.stderr)
        assert "nothing was changed" in refused.stderr
        assert chamber.read_bytes() == untouched
        assert not list(tmp_path.glob("chamber.sqlite3.re*")), name  # no copy left, nothing set aside

    done = gatewayd(tmp_path, "restore", "good.sqlite3", "--config", "gateway.yaml")
    assert done.returncode == 0, done.stderr
    aside = list(tmp_path.glob("chamber.sqlite3.replaced-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == untouched
    assert f"kept the replaced chamber aside: {aside[0]}" in done.stdout
    assert "integrity_check ok" in done.stdout and "audit chain ok" in done.stdout
    assert done.stdout.rstrip().endswith("start the gateway")
    assert not list(tmp_path.glob("chamber.sqlite3.restoring*"))

    lock.start_gateway()  # on the restored chamber: what was booked before the backup, and not what came after
    try:
        s = lock.session()
        got = s.get(f"{lock.base}/Appointment/{before.json()['id']}")
        assert got.status_code == 200 and got.json()["status"] == "booked"
        assert s.get(f"{lock.base}/Appointment/{after.json()['id']}").status_code == 404
        verify = gatewayd(tmp_path, "audit", "verify", "--config", "gateway.yaml")
        assert verify.returncode == 0 and verify.stdout.startswith("ok"), verify.stdout
    finally:
        lock.stop()
