"""The active HIS probe (issue 18): an idle HIS outage is known before a booking needs the HIS.

Real processes and sockets: the gateway (probe_interval 2s, an NMQ^N01 heartbeat) and the HIS simulator. The
simulator is stopped while nothing is sent; within the probe interval /healthz, the metrics and `gatewayd
status` say the HIS is down; a booking made then is answered 202 at once (answer_within is 10 s); when the
simulator is back the probe sees it and the booking completes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import requests

from tests.e2e.harness import Lock, appointment_for, eventually, free_port

JSON = {"Content-Type": "application/fhir+json"}
PROBE = 2.0


def metric(admin: int, name: str, peer: str = "his") -> float | None:
    text = requests.get(f"http://127.0.0.1:{admin}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(f'{name}{{peer="{peer}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return None


def status(lock: Lock, *flags: str) -> tuple[int, str]:
    """`gatewayd status --config gateway.yaml` as an operator runs it beside the gateway: (exit code, stdout)."""
    done = subprocess.run([sys.executable, "-m", "gateway", "status", "--config", "gateway.yaml", *flags],
                          cwd=lock.workdir, capture_output=True, text=True, timeout=30)
    return done.returncode, done.stdout


def test_the_his_stopped_while_idle_is_known_down_within_the_probe_interval(tmp_path):
    admin = free_port()
    lock = Lock(tmp_path, doctors=1, days=1,
                his={"probe_interval": f"{PROBE:g}s", "heartbeat": "NMQ^N01",
                     "send_types": ["SRM^*", "SQM^S25", "NMQ^N01"]},
                gateway={"admin": {"listen": f"tcp:{admin}:interface=127.0.0.1"}})
    lock.gateway_config["outer"]["answer_within"] = "10s"
    lock.write_configs()
    with lock:
        health = requests.get(f"http://127.0.0.1:{admin}/healthz", timeout=5)
        assert health.status_code == 200, health.text
        assert health.json()["his"]["his"]["probe"]["up"] is True
        assert metric(admin, "gatewayd_his_up") == 1
        # the heartbeat reached the HIS's application (the simulator answers an NMQ^N01 with AR: still an answer)
        eventually(lambda: any(m["type"] == "NMQ^N01" for m in lock.received()), timeout=PROBE * 3,
                   what="a heartbeat at the HIS")
        assert not lock.chamber_rows("SELECT 1 FROM messages WHERE type = 'NMQ^N01'")  # never stored
        slot = lock.search_slots(status="free")[0]["id"]

        lock.sim.stop()
        stopped = time.monotonic()
        eventually(lambda: requests.get(f"http://127.0.0.1:{admin}/healthz", timeout=5).status_code == 503,
                   timeout=PROBE + 3, what="/healthz to say the HIS is down")
        assert time.monotonic() - stopped <= PROBE + 1.5  # within the probe interval (and the check's time)
        body = requests.get(f"http://127.0.0.1:{admin}/healthz", timeout=5).json()["his"]["his"]
        assert body["reachable"] is False and body["probe"]["up"] is False and body["probe"]["last_error"]
        assert metric(admin, "gatewayd_his_up") == 0
        assert metric(admin, "gatewayd_his_unreachable_seconds") > 0
        assert lock.chamber_rows("SELECT up FROM his_links WHERE peer = 'his'") == [(0,)]
        code, out = status(lock, "--json")
        seen = json.loads(out)
        assert code == 1 and seen["gateway"]["running"] is True and seen["gateway"]["gate"] == "both"
        assert seen["his"]["his"]["link"]["up"] is False and seen["his"]["his"]["link"]["source"] == "live"
        code, out = status(lock)
        assert "HIS his          DOWN since" in out and "\x1b[" not in out  # no colour when not on a terminal

        began = time.monotonic()
        booking = lock.session().post(f"{lock.base}/Appointment", json=appointment_for(slot), headers=JSON,
                                      timeout=15)
        took = time.monotonic() - began
        assert booking.status_code == 202, booking.text
        assert took < 3, f"a booking for a HIS known down took {took:.1f}s (answer_within is 10s)"

        lock.start_sim()  # waits until the gateway's probe has seen the HIS again
        eventually(lambda: requests.get(f"http://127.0.0.1:{admin}/healthz", timeout=5).status_code == 200,
                   timeout=PROBE + 3, what="/healthz to recover")
        assert metric(admin, "gatewayd_his_up") == 1
        eventually(lambda: lock.session().get(booking.headers["Location"], timeout=5).json()["status"] == "booked",
                   timeout=15, what="the booking made during the outage to complete")
        code, out = status(lock, "--json")
        assert code == 0 and json.loads(out)["his"]["his"]["link"]["up"] is True, out
        assert json.loads(out)["his"]["his"]["out_last_minute"] >= 1
    # the gateway stopped: status says so, and shows what the probe last recorded
    code, out = status(lock, "--json")
    seen = json.loads(out)
    assert code == 1 and seen["gateway"]["running"] is False
    assert seen["his"]["his"]["link"]["up"] is True and "may be stale" in seen["his"]["his"]["link"]["source"]
