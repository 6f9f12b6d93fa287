"""The chamber's promises over real processes: idempotent POSTs, backpressure, dead letters and the
operator's queue commands against a running gateway."""

import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.e2e.harness import REPO, Lock, appointment_for, eventually

JSON = {"Content-Type": "application/fhir+json"}


def queue_cmd(lock, *args, input_text=None):
    return subprocess.run([sys.executable, "-m", "gateway", "queue", *args, "--config", "gateway.yaml"],
                          cwd=lock.workdir, capture_output=True, text=True, input=input_text,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def test_idempotency_key_books_once(lock):
    """The same POST sent twice with one Idempotency-Key (a retry after a lost answer) books once and
    returns the first appointment; the key with a different body is refused."""
    slot_id = lock.search_slots(status="free")[0]["id"]
    s = lock.session()
    headers = {**JSON, "Idempotency-Key": "retry-after-timeout-1"}
    first = s.post(f"{lock.base}/Appointment", json=appointment_for(slot_id), headers=headers)
    again = s.post(f"{lock.base}/Appointment", json=appointment_for(slot_id), headers=headers)
    assert (first.status_code, again.status_code) == (201, 201)
    assert first.json()["id"] == again.json()["id"]
    placer = first.json()["id"]
    assert len([m for m in lock.received() if m["type"] == "SRM^S01" and m["placer"] == placer]) == 1
    other = s.post(f"{lock.base}/Appointment", json=appointment_for(slot_id, mrn="someone else"), headers=headers)
    assert other.status_code == 422 and other.json()["resourceType"] == "OperationOutcome"


def test_if_none_exist_returns_the_existing_appointment(lock):
    """FHIR conditional create on the platform's own identifier: the second POST gets 200 and the first
    appointment; the identifier is given back on the Appointment."""
    free = lock.search_slots(status="free")
    body = appointment_for(free[0]["id"])
    body["identifier"] = [{"system": "urn:platform:demo:order", "value": "ORDER-7"}]
    s = lock.session()
    headers = {**JSON, "If-None-Exist": "identifier=urn:platform:demo:order|ORDER-7"}
    first = s.post(f"{lock.base}/Appointment", json=body, headers=headers)
    assert first.status_code == 201
    assert {"system": "urn:platform:demo:order", "value": "ORDER-7"} in first.json()["identifier"]
    body["slot"] = [{"reference": f"Slot/{free[1]['id']}"}]
    second = s.post(f"{lock.base}/Appointment", json=body, headers=headers)
    assert second.status_code == 200 and second.json()["id"] == first.json()["id"]


@pytest.fixture
def silent_his(tmp_path):
    """A gateway with small limits, whose HIS can be silenced with SIGSTOP."""
    lock = Lock(tmp_path)
    lock.gateway_config["inner"]["his"].update(ack_timeout="500ms", retry_initial="100ms", retry_max="200ms",
                                               max_attempts=3)
    lock.gateway_config["outer"].update(answer_within="1s", max_backlog=1)
    lock.write_configs()
    with lock:
        yield lock
        lock.sim.popen.send_signal(signal.SIGCONT)


def test_backlog_limit_gives_503_with_retry_after(silent_his):
    lock = silent_his
    free = lock.search_slots(status="free")
    lock.sim.popen.send_signal(signal.SIGSTOP)
    s = lock.session()
    first = s.post(f"{lock.base}/Appointment", json=appointment_for(free[0]["id"]), headers=JSON)
    assert first.status_code == 202
    second = s.post(f"{lock.base}/Appointment", json=appointment_for(free[1]["id"]), headers=JSON)
    assert second.status_code == 503
    assert int(second.headers["Retry-After"]) > 0
    assert second.json()["issue"][0]["code"] == "transient"
    assert s.get(f"{lock.base}/Slot/{free[1]['id']}").json()["status"] == "free"  # nothing was held


def test_silent_his_dead_letters_and_the_operator_sees_why(silent_his):
    """A HIS that never answers: the SRM is tried max_attempts times, dead-lettered with the reason, the
    booking is refused with it (not stuck pending), a compensating cancel follows, and `queue
    list/show/retry/purge` tell and act."""
    lock = silent_his
    slot_id = lock.search_slots(status="free")[0]["id"]
    lock.sim.popen.send_signal(signal.SIGSTOP)
    r = lock.session().post(f"{lock.base}/Appointment", json=appointment_for(slot_id), headers=JSON)
    assert r.status_code == 202
    appt = eventually(lambda: (a := lock.session().get(r.headers["Location"]).json())["status"] != "pending" and a,
                      timeout=20, what="the booking to leave 'pending'")
    assert appt["status"] == "cancelled"
    assert "no answer after 3 attempts" in appt["cancelationReason"]["text"]
    assert lock.session().get(f"{lock.base}/Slot/{slot_id}").json()["status"] == "free"

    # The SRM^S01 may have reached the HIS, so a compensating SRM^S04 follows it; the HIS being silent,
    # that one dead-letters too.
    def dead_messages():
        rows = [line.split() for line in queue_cmd(lock, "list", "--state", "dead").stdout.splitlines()[1:]]
        return len(rows) == 2 and {r[3]: r for r in rows}

    dead = eventually(dead_messages, timeout=20, what="the booking and its compensating cancel to dead-letter")
    assert set(dead) == {"SRM^S01", "SRM^S04"}
    dead = [dead["SRM^S01"]]
    story = queue_cmd(lock, "show", dead[0][0])
    assert "last error: no answer after 3 attempts" in story.stdout
    story_lines = [line.split(None, 2)[1:] for line in story.stdout.splitlines() if line.startswith("  ")]
    assert [state for state, _ in story_lines] == [
        "committed", "committed", "sending", "retrying", "sending", "retrying", "sending", "dead"]
    assert story_lines[1][1].startswith("encoded as SRM^S01")  # the inner gate wrote the HL7, once
    refused = queue_cmd(lock, "retry", dead[0][0])
    assert refused.returncode == 1 and "not sent again" in refused.stderr
    assert queue_cmd(lock, "purge", "--dead", "--older-than", "0s", input_text="n\n").returncode == 1
    purged = queue_cmd(lock, "purge", "--dead", "--older-than", "0s", "--yes")
    assert "deleted 2" in purged.stdout
    assert queue_cmd(lock, "list", "--state", "dead").stdout.count("\n") == 1  # the header only


def test_window_of_three_with_ordering_by_patient(tmp_path):
    """ordering: patient, window: 3: concurrent bookings for different patients go out on three MLLP
    connections at once and every one is booked, each sent once."""
    lock = Lock(tmp_path)
    lock.gateway_config["inner"]["his"].update(ordering="patient", window=3)
    lock.write_configs()
    with lock:
        slots = [s["id"] for s in lock.search_slots(status="free")][:12]
        results = {}

        def book(i, slot_id):
            results[slot_id] = lock.session().post(f"{lock.base}/Appointment",
                                                   json=appointment_for(slot_id, mrn=f"MRN-{i}"), headers=JSON)

        threads = [threading.Thread(target=book, args=(i, sid)) for i, sid in enumerate(slots)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(r.status_code for r in results.values()) == [201] * 12
        srms = [m for m in lock.received() if m["type"] == "SRM^S01"]
        assert len(srms) == 12 and len({m["control_id"] for m in srms}) == 12


def test_the_platforms_request_is_kept_byte_for_byte(lock):
    """What a platform sent is kept with the appointment it created, exactly as received."""
    from gateway.chamber.engine import Chamber

    slot_id = lock.search_slots(status="free")[0]["id"]
    raw = (b'{"resourceType": "Appointment",\n  "status": "proposed", "slot": [{"reference": "Slot/'
                        + slot_id.encode() + b'"}], "contained": [{"resourceType": "Patient", "id": "p", '
                        b'"identifier": [{"system": "urn:x", "value": "KEEP-1"}]}], '
                        b'"participant": [{"actor": {"reference": "#p"}, "status": "needs-action"}]}')
    r = lock.session().post(f"{lock.base}/Appointment", data=raw, headers=JSON)
    assert r.status_code == 201
    chamber = Chamber(lock.workdir / "chamber.sqlite3", clock=time.time)
    chamber.open()
    try:
        assert chamber.read().platform_request(r.json()["id"]) == raw
    finally:
        chamber.close()
