"""One SQLite chamber serves one gateway (issue 24): a second gateway started on a running gateway's chamber —
the mistake of a `gatewayd run` by hand beside the systemd service, with other ports and the same
chamber.path — is refused before it opens anything, naming the process that runs the chamber; the running
gateway's bookings go on unaffected (two gateways on one chamber undid bookings the HIS had accepted); the
operator's tools keep working beside it; kill -9 of the gateway frees the chamber for a new one at once.

Real processes throughout: the HIS simulator and the gateways started as a person starts them, platforms'
bookings over HTTPS with mutual TLS, the HIS's answers over MLLP.
"""

from __future__ import annotations

import copy
import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import yaml

from gateway.ops.claim import CLAIM_HELD_EXIT
from tests.e2e.harness import REPO, Lock, Proc, appointment_for, eventually, free_port
from tests.faults.process import kill9

JSON = {"Content-Type": "application/fhir+json"}


def gatewayd(workdir, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=workdir, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO)}, timeout=timeout)


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def book(lock, slot_id: str):
    r = lock.session().post(f"{lock.base}/Appointment", json=appointment_for(slot_id), headers=JSON, timeout=30)
    return r.status_code, r.json().get("id")


def test_a_second_gateway_on_a_running_gateways_chamber_is_refused_and_kill_9_frees_it(tmp_path):
    lock = Lock(tmp_path, doctors=2, days=2)
    with lock:
        first = lock.gateway.popen.pid
        config = str((tmp_path / "gateway.yaml").resolve())
        # Hospital IT's mistake: the same config with other ports (so nothing but the chamber is shared) ...
        second = copy.deepcopy(lock.gateway_config)
        second_fhir, second_mllp = free_port(), free_port()
        second["outer"]["port"] = second_fhir
        second["inner"]["listen"] = f"tcp:{second_mllp}:interface=127.0.0.1"
        # ... and the split lock's outer and inner gate configs, each on the running gateway's chamber
        outer = copy.deepcopy(second)
        outer.pop("inner")
        inner = copy.deepcopy(second)
        for key in ("outer", "platforms", "audit"):
            inner.pop(key, None)
        for name, data in (("second.yaml", second), ("second-outer.yaml", outer), ("second-inner.yaml", inner)):
            (tmp_path / name).write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")

        # The operator's tools work beside the running gateway and take no claim; status names who runs it.
        for args in (["backup", "copy.sqlite3"], ["queue", "list"], ["audit", "verify"], ["status"]):
            done = gatewayd(tmp_path, *args, "--config", "gateway.yaml")
            assert done.returncode == 0, (args, done.stderr)
        for role in ("outer", "inner"):
            assert f"{role} gate: run by pid {first} (gate both, config {config}, running since " in done.stdout

        slots = [s["id"] for s in lock.search_slots(status="free")]
        assert len(slots) == lock.slot_count == 16
        # Platforms book while the second gateways try to start: a booking in flight, refused starts beside it.
        with ThreadPoolExecutor(max_workers=4) as pool:
            bookings = [pool.submit(book, lock, slot_id) for slot_id in slots[:8]]
            refused = {gate: gatewayd(tmp_path, "run", "--gate", gate, "--config", name)
                       for gate, name in (("both", "second.yaml"), ("outer", "second-outer.yaml"),
                                          ("inner", "second-inner.yaml"))}
            booked = [b.result() for b in bookings]
        for gate, run in refused.items():
            role = "inner" if gate == "inner" else "outer"  # (a full gateway asks for the outer gate first)
            assert run.returncode == CLAIM_HELD_EXIT, (gate, run.returncode, run.stderr)
            assert (f"gatewayd: cannot start: the {role} gate of the chamber {tmp_path / 'chamber.sqlite3'} is "
                    f"already run by pid {first} (gate both, config {config}, running since ") in run.stderr, run.stderr
            assert "one outer and one inner process of the split lock" in run.stderr
            logged = [json.loads(line) for line in run.stderr.splitlines() if line.startswith("{")]
            held = [e for e in logged if e["event"] == "gateway.claim_held"]
            assert held and held[0]["holder_pid"] == first and held[0]["role"] == role, run.stderr
            assert not any(e["event"] in ("chamber.opened", "gateway.ready") for e in logged), run.stderr
        assert not listening(second_fhir) and not listening(second_mllp)  # nothing of theirs ever listened

        # A reload (SIGHUP) keeps the claim: still refused afterwards.
        lock.gateway.popen.send_signal(signal.SIGHUP)
        eventually(lambda: "gateway.reloaded" in lock.gateway.log_path.read_text(), timeout=10,
                   what="the running gateway's reload")
        assert gatewayd(tmp_path, "run", "--gate", "outer", "--config", "second-outer.yaml").returncode \
            == CLAIM_HELD_EXIT

        # The running gateway's bookings are unaffected: every one 201 booked, each SRM^S01 once, none undone.
        booked += [book(lock, slot_id) for slot_id in slots[8:10]]
        assert [status for status, _ in booked] == [201] * 10, booked
        ids = sorted(appointment for _, appointment in booked)
        states = lock.chamber_rows("SELECT id, status FROM appointments ORDER BY id")
        assert states == [(i, "booked") for i in ids]
        received = lock.received()
        assert sorted(m["placer"] for m in received if m["type"] == "SRM^S01") == ids
        assert [m["type"] for m in received if m["type"] != "SRM^S01"] == []  # no cancellation, no second SRM
        assert all(lock.session().get(f"{lock.base}/Appointment/{i}").json()["status"] == "booked" for i in ids)

        # kill -9 of the running gateway: no stale claim, a new gateway on the chamber starts at once.
        kill9(lock.gateway)
        stopped = gatewayd(tmp_path, "status", "--config", "gateway.yaml")
        assert stopped.returncode == 1 and "outer gate: not running" in stopped.stdout, stopped.stdout
        started = time.monotonic()
        lock.gateway = Proc("gateway", ["run", "--config", "gateway.yaml"], tmp_path)
        eventually(lambda: lock.session().get(f"{lock.base}/metadata", timeout=2).status_code == 200, timeout=30,
                   what="a new gateway on the chamber after kill -9 of the first")
        print(f"\nnew gateway answering {time.monotonic() - started:.2f} s after kill -9 of the first")
        assert "gateway.claim_held" not in lock.gateway.log_path.read_text()
        status, appointment = book(lock, slots[10])
        assert status == 201
        assert lock.chamber_rows("SELECT status FROM appointments WHERE id = ?", appointment) == [("booked",)]
        assert len(lock.chamber_rows("SELECT id FROM appointments WHERE status = 'booked'")) == 11
        now = gatewayd(tmp_path, "status", "--config", "gateway.yaml")
        assert now.returncode == 0 and f"outer gate: run by pid {lock.gateway.popen.pid} " in now.stdout
