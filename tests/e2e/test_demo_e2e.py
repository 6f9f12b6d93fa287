"""`gatewayd demo`, the README's first command: it starts the HIS simulator and the gateway on the
documented ports, prints the FHIR base and a curl command, a booking made the way it says succeeds, and
Ctrl-C stops everything."""

import signal
import socket
import subprocess
import sys
import time

import requests

from tests.e2e.harness import REPO, appointment_for, eventually


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as listeners do: TIME_WAIT is no obstacle
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_demo_runs_books_and_stops(tmp_path):
    assert all(port_free(p) for p in (8443, 2575, 2576)), "the demo's ports 8443/2575/2576 must be free"
    workdir = tmp_path / "demo-run"
    proc = subprocess.Popen([sys.executable, str(REPO / "gatewayd.py"), "demo", "--workdir", str(workdir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("curl") and "POST" in line:
                break
        out = "".join(lines)
        assert "https://127.0.0.1:8443/fhir" in out, out
        for name in ("ca.pem", "server.pem", "server.key", "platform-demo.pem", "platform-demo.key"):
            assert (workdir / "certs" / name).exists()

        s = requests.Session()
        s.trust_env = False
        s.cert = (str(workdir / "certs" / "platform-demo.pem"), str(workdir / "certs" / "platform-demo.key"))
        s.verify = str(workdir / "certs" / "ca.pem")
        base = "https://127.0.0.1:8443/fhir"
        tomorrow = time.strftime("%Y-%m-%d", time.localtime(time.time() + 2 * 86400))
        slots = eventually(lambda: s.get(f"{base}/Slot", params={"status": "free", "start": f"ge{tomorrow}",
                                                                 "_count": 1}).json().get("entry"),
                           timeout=60, what="the demo HIS's slots")
        r = s.post(f"{base}/Appointment", json=appointment_for(slots[0]["resource"]["id"]),
                   headers={"Content-Type": "application/fhir+json"})
        assert r.status_code == 201, r.text
        assert (workdir / "his-received.jsonl").read_text().count('"SRM^S01"') == 1
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(30)
    assert rc == 0
    assert eventually(lambda: all(port_free(p) for p in (8443, 2575, 2576)), timeout=10,
                      what="the demo's processes to release their ports")
