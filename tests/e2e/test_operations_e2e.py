"""What hospital IT sees: logs without patient data, the chamber's story of a message, a clear refusal
to start."""

import json
import socket
import subprocess
import sys
import time

from tests.e2e.harness import REPO, Proc, appointment_for, eventually


def test_logs_carry_ids_and_states_but_no_patient_data(lock):
    """After a booking with a Chinese name, a phone and an MRN, the gateway's log has the crossing events
    with their control ids, and none of the patient's data."""
    slot_id = lock.search_slots(status="free")[0]["id"]
    body = appointment_for(slot_id, mrn="MRN-SECRET-77")
    body["contained"][0]["name"] = [{"family": "欧阳", "given": ["娜娜"]}]
    body["contained"][0]["telecom"] = [{"system": "phone", "value": "13912345678"}]
    r = lock.session().post(f"{lock.base}/Appointment", json=body, headers={"Content-Type": "application/fhir+json"})
    assert r.status_code == 201
    log_text = eventually(lambda: (t := lock.gateway.log_path.read_text(encoding="utf-8"))
                          and "relay.answered" in t and t, what="the relay's log event")
    for secret in ("MRN-SECRET-77", "欧阳", "娜娜", "13912345678"):
        assert secret not in log_text
    events = [json.loads(line) for line in log_text.splitlines() if line.startswith("{")]
    answered = [e for e in events if e["event"] == "relay.answered"]
    assert answered and answered[-1]["ack"] == "AA" and answered[-1]["control_id"].startswith("G")
    assert any(e["event"] == "inner.message" and e["type"] == "SIU^S24" for e in events)
    for secret in ("MRN-SECRET-77", "13912345678"):  # nor in what the simulator logs
        assert secret not in (lock.workdir / "his-received.jsonl").read_text(encoding="utf-8")


def test_queue_show_tells_a_messages_story(lock):
    """`gatewayd queue show` lists the chamber's messages; with an id it prints every state it went through."""
    listing = subprocess.run([sys.executable, "-m", "gateway", "queue", "show", "--config", "gateway.yaml"],
                             cwd=lock.workdir, capture_output=True, text=True, env={"PYTHONPATH": str(REPO)})
    assert listing.returncode == 0, listing.stderr
    srm = next(line for line in listing.stdout.splitlines() if "SRM^S01" in line)
    message_id = srm.split()[0]
    story = subprocess.run([sys.executable, "-m", "gateway", "queue", "show", message_id, "--config",
                            "gateway.yaml"], cwd=lock.workdir, capture_output=True, text=True,
                           env={"PYTHONPATH": str(REPO)})
    states = [line.split()[1] for line in story.stdout.splitlines() if line.startswith("  ")]
    assert states == ["committed", "committed", "sending", "delivered"]  # the second: encoded as HL7
    assert "answer AA" in story.stdout


def test_gateway_refuses_to_start_on_a_busy_port(tmp_path):
    """If its MLLP port is taken, gatewayd exits 1 saying so, instead of running half a lock."""
    from tests.e2e.harness import Lock

    lock = Lock(tmp_path)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", lock.mllp_port))
        squatter.listen()
        proc = Proc("gateway", ["run", "--config", "gateway.yaml"], tmp_path)
        assert proc.popen.wait(30) == 1
    out = proc.log_path.read_text()
    assert "cannot start" in out and "gateway.start_failed" in out
    assert "Unhandled error" not in out and "twisted.error" not in out, out  # a clean refusal, nothing else
    proc.stop()


def test_gateway_refuses_a_chamber_of_another_schema_version_cleanly(tmp_path):
    """A chamber it cannot use stops the start before any listener opens: exit 1, the reason, no noise."""
    import sqlite3

    from tests.e2e.harness import Lock

    lock = Lock(tmp_path)
    conn = sqlite3.connect(tmp_path / "chamber.sqlite3")
    conn.execute("CREATE TABLE chamber_meta (key TEXT PRIMARY KEY, value TEXT)")
    conn.execute("INSERT INTO chamber_meta VALUES ('schema_version', '99')")
    conn.commit()
    conn.close()
    proc = Proc("gateway", ["run", "--config", "gateway.yaml"], lock.workdir)
    assert proc.popen.wait(30) == 1
    out = proc.log_path.read_text()
    assert "schema version 99" in out and "gateway.start_failed" in out
    assert "Unhandled error" not in out and "twisted.error" not in out, out
    proc.stop()


def test_systemd_readiness_and_stop_notifications(tmp_path):
    """Under systemd (NOTIFY_SOCKET set) gatewayd says READY=1 once its gates listen — its FHIR port
    answers by then — and STOPPING=1 on SIGTERM, then exits 0."""
    import os
    import signal
    import socket as socket_mod

    from tests.e2e.harness import Lock

    lock = Lock(tmp_path)
    notify = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(20)
    env = dict(os.environ, PYTHONPATH=str(REPO), NOTIFY_SOCKET=str(tmp_path / "notify.sock"))
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config", "gateway.yaml"], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ready = notify.recv(1000).decode()
        assert ready.startswith("READY=1") and "FHIR 127.0.0.1" in ready and "MLLP tcp:" in ready
        assert lock.session().get(f"{lock.base}/metadata", timeout=5).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert notify.recv(1000) == b"STOPPING=1"
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        notify.close()


def test_retention_deletes_ended_messages_of_a_running_gateway(tmp_path):
    """With chamber.keep_messages 2s (pruned every second), a booking's delivered SRM^S01 and the SIUs the HIS
    sent leave the chamber by themselves, while the appointment (keep_appointments: null) is still read as
    booked; the gateway logs what it deleted, in counts only."""
    from tests.e2e.harness import Lock

    lock = Lock(tmp_path, doctors=1, days=1)
    lock.gateway_config["chamber"].update(keep_messages="2s", keep_appointments=None, prune_every="1s")
    lock.write_configs()
    with lock:
        slot = lock.search_slots(status="free")[0]["id"]
        booked = lock.session().post(f"{lock.base}/Appointment", json=appointment_for(slot),
                                     headers={"Content-Type": "application/fhir+json"})
        assert booked.status_code == 201, booked.text

        def messages_left() -> int:
            return lock.chamber_rows("SELECT count(*) FROM messages")[0][0]

        assert messages_left() > 0
        eventually(lambda: messages_left() == 0, timeout=15, what="the ended messages to be pruned")
        again = lock.session().get(f"{lock.base}/Appointment/{booked.json()['id']}")
        assert again.status_code == 200 and again.json()["status"] == "booked"
        pruned = [e for e in map(json.loads, (line for line in lock.gateway.log_path.read_text().splitlines()
                                               if line.startswith("{")))
                  if e.get("event") == "chamber.pruned"]
        assert pruned and sum(e.get("messages", 0) for e in pruned) >= 2


def test_backup_while_the_gateway_books(tmp_path):
    """`gatewayd backup` copies the chamber of a running gateway while platforms book: it exits 0 naming the
    rows it copied, and the copy opens as a chamber (integrity checked) holding the bookings made before."""
    import threading

    from gateway.chamber.engine import Chamber
    from tests.e2e.harness import Lock

    lock = Lock(tmp_path, doctors=2, days=2)
    with lock:
        slots = [s["id"] for s in lock.search_slots(status="free")]
        first = lock.session().post(f"{lock.base}/Appointment", json=appointment_for(slots[0]),
                                    headers={"Content-Type": "application/fhir+json"})
        assert first.status_code == 201
        stop = threading.Event()

        def keep_booking():
            s = lock.session()
            for i, slot in enumerate(slots[1:]):
                if stop.is_set():
                    return
                s.post(f"{lock.base}/Appointment", json=appointment_for(slot, mrn=f"MRN-B{i}"),
                       headers={"Content-Type": "application/fhir+json"})

        traffic = threading.Thread(target=keep_booking)
        traffic.start()
        try:
            done = subprocess.run([sys.executable, "-m", "gateway", "backup", "copy.sqlite3", "--config",
                                   "gateway.yaml"], cwd=tmp_path, capture_output=True, text=True,
                                  env={"PYTHONPATH": str(REPO)}, timeout=60)
        finally:
            stop.set()
            traffic.join()
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"backed up to {tmp_path / 'copy.sqlite3'}") and "appointments" in done.stdout
    copy = Chamber(tmp_path / "copy.sqlite3", clock=time.time)
    copy.open()
    try:
        assert copy.read().appointment(first.json()["id"]).status == "booked"
    finally:
        copy.close()
