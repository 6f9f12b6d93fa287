"""The web console (gateway/ops/console.py) on a real gateway's admin listener, driven over HTTP as a browser
would (requests with its cookie jar; no headless browser yet): log in, find a message by control id, see its
raw bytes masked and, audited, unmasked, retry a dead letter and find that in the audit trail, see the HIS go
down and come back on the status page; an anonymous request and cross-site POSTs are refused."""

from __future__ import annotations

import re
import signal

import requests

from gateway.ops.console import hash_password
from tests.e2e.harness import Lock, appointment_for, eventually, free_port

JSON = {"Content-Type": "application/fhir+json"}
PASSWORD = "correct horse battery staple"


def csrf(page: str) -> str:
    return re.search(r"name=csrf value=([0-9a-f]+)", page).group(1)


def dead_letters(lock: Lock) -> tuple[int, str]:
    """A HIS that takes connections and never answers (the simulator stopped with SIGSTOP, max_attempts 3): a
    booking's SRM^S01 and its compensating SRM^S04 dead-letter; the HIS resumes. (id, control id) of the
    cancel, which may be retried (the booking's, settled, may not)."""
    slot = lock.search_slots(status="free")[0]["id"]
    lock.sim.popen.send_signal(signal.SIGSTOP)
    try:
        booking = lock.session().post(f"{lock.base}/Appointment", json=appointment_for(slot), headers=JSON)
        assert booking.status_code == 202
        eventually(lambda: len(lock.chamber_rows("SELECT 1 FROM messages WHERE state = 'dead'")) == 2,
                   timeout=20, what="the SRM^S01 and its cancel to dead-letter")
    finally:
        lock.sim.popen.send_signal(signal.SIGCONT)
    [(cancel_id, control_id)] = lock.chamber_rows(
        "SELECT id, control_id FROM messages WHERE state = 'dead' AND type = 'SRM^S04'")
    return cancel_id, control_id


def test_an_operator_finds_a_message_retries_a_dead_letter_and_sees_the_his_go_down(tmp_path):
    admin = free_port()
    lock = Lock(tmp_path, doctors=1, days=1,
                his={"ack_timeout": "1s", "retry_initial": "100ms", "retry_max": "300ms", "max_attempts": 3,
                     "probe_interval": "2s"},
                gateway={"admin": {"listen": f"tcp:{admin}:interface=127.0.0.1",
                                   "operators": [{"name": "alice", "password_hash": hash_password(PASSWORD)}]}})
    lock.gateway_config["outer"]["answer_within"] = "1s"
    lock.write_configs()
    console = f"http://127.0.0.1:{admin}/console"
    with lock:
        # anonymous: sent to the login page, nothing shown; a cross-site login and a wrong password refused
        anonymous = requests.get(f"{console}/messages", allow_redirects=False, timeout=5)
        assert anonymous.status_code == 303 and anonymous.headers["Location"] == "/console/login"
        assert "<table" not in anonymous.text
        assert requests.post(f"{console}/login", data={"name": "alice", "password": PASSWORD},
                             headers={"Origin": "http://evil.example"}, allow_redirects=False,
                             timeout=5).status_code == 403
        assert requests.post(f"{console}/login", data={"name": "alice", "password": "guess"},
                             allow_redirects=False, timeout=5).status_code == 401
        browser = requests.Session()
        login = browser.post(f"{console}/login", data={"name": "alice", "password": PASSWORD},
                             allow_redirects=False, timeout=10)
        assert login.status_code == 303 and "httponly" in login.headers["Set-Cookie"].lower()
        assert "samesite=strict" in login.headers["Set-Cookie"].lower()
        status = browser.get(f"{console}/", timeout=10)
        assert "every HIS endpoint up" in status.text and "http-equiv=refresh" in status.text

        cancel_id, control_id = dead_letters(lock)

        found = browser.get(f"{console}/messages", params={"control_id": control_id}, timeout=10).text
        assert f"<a href=/console/messages/{cancel_id}>" in found and "1 found" in found
        masked = browser.get(f"{console}/messages/{cancel_id}", timeout=10).text
        assert "PID|||***||***" in masked  # PID-3 (the identifier) and PID-5 (the name) masked
        assert "王" not in masked and "MRN-0001" not in masked and "13800000000" not in masked
        assert not lock.chamber_rows("SELECT 1 FROM audit_records WHERE action = 'console.unmask'")
        unmasked = browser.get(f"{console}/messages/{cancel_id}", params={"unmask": "yes"}, timeout=10).text
        assert "王" in unmasked and "MRN-0001" in unmasked
        assert lock.chamber_rows("SELECT subject, resource_id FROM audit_records WHERE action = 'console.unmask'") \
            == [("console:alice", str(cancel_id))]

        # retrying: a cross-site POST, one without the session's token and one not confirmed change nothing
        dead_page = browser.get(f"{console}/dead", timeout=10).text
        token = csrf(dead_page)
        retry_url = f"{console}/dead/{cancel_id}/retry"
        assert browser.post(retry_url, data={"csrf": token, "confirm": "yes"},
                            headers={"Origin": "http://evil.example"}, timeout=10).status_code == 403
        assert browser.post(retry_url, data={"confirm": "yes"}, timeout=10).status_code == 403
        assert browser.post(retry_url, data={"csrf": token}, timeout=10).status_code == 403
        assert requests.post(retry_url, data={"csrf": token, "confirm": "yes"}, allow_redirects=False,
                             timeout=10).status_code == 303  # no session: to the login page
        assert lock.chamber_rows("SELECT state FROM messages WHERE id = ?", cancel_id) == [("dead",)]
        done = browser.post(retry_url, data={"csrf": token, "confirm": "yes"}, timeout=10)
        assert done.status_code == 200 and "resubmitted" in done.text
        eventually(lambda: lock.chamber_rows("SELECT state FROM messages WHERE id = ?", cancel_id) == [("delivered",)],
                   timeout=15, what="the resubmitted cancel to reach the HIS")
        assert lock.chamber_rows("SELECT subject, resource_id FROM audit_records WHERE action = 'console.retry'") \
            == [("console:alice", str(cancel_id))]
        story = browser.get(f"{console}/messages/{cancel_id}", timeout=10).text
        assert "resubmitted by console:alice" in story

        # purging: unconfirmed, nothing; confirmed, the booking's dead SRM^S01 (settled: never to be resent) goes
        purge_url = f"{console}/dead/purge"
        assert browser.post(purge_url, data={"csrf": token, "older_than": "0s"}, timeout=10).status_code == 403
        assert len(lock.chamber_rows("SELECT 1 FROM messages WHERE state = 'dead'")) == 1
        purged = browser.post(purge_url, data={"csrf": token, "older_than": "0s", "confirm": "yes"}, timeout=10)
        assert purged.status_code == 200 and "deleted 1 dead letters" in purged.text
        assert lock.chamber_rows("SELECT 1 FROM messages WHERE state = 'dead'") == []

        # the HIS stopped while nothing is sent: the status page says so within the probe interval, and back
        lock.sim.stop()
        eventually(lambda: "HIS down: his" in browser.get(f"{console}/", timeout=5).text, timeout=5,
                   what="the console's status page to show the HIS down")
        lock.start_sim()
        eventually(lambda: "every HIS endpoint up" in browser.get(f"{console}/", timeout=5).text, timeout=5,
                   what="the console's status page to show the HIS up again")

        logout = browser.post(f"{console}/logout", data={"csrf": token}, allow_redirects=False, timeout=5)
        assert logout.status_code == 303
        assert browser.get(f"{console}/", allow_redirects=False, timeout=5).status_code == 303
        actions = [a for (a,) in lock.chamber_rows("SELECT action FROM audit_records WHERE action LIKE 'console.%' "
                                                   "ORDER BY seq")]
        assert actions == ["console.login", "console.login", "console.unmask", "console.retry", "console.purge",
                           "console.logout"]
