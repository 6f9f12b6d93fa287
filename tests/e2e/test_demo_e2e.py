"""`gatewayd demo`, the README's first command: it starts the HIS simulator and the gateway on the
documented ports, prints the FHIR base and two curl commands; run by a shell as printed (search free slots from now on, book
the first), they book a slot; Ctrl-C stops everything."""

import signal
import socket
import subprocess
import sys

from tests.e2e.demo_commands import book_first_free_slot, printed_commands
from tests.e2e.harness import REPO, eventually


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
        out, search, book = printed_commands(proc.stdout)
        assert "https://127.0.0.1:8443/fhir" in out, out
        for name in ("ca.pem", "server.pem", "server.key", "platform-demo.pem", "platform-demo.key"):
            assert (workdir / "certs" / name).exists()

        # the two printed commands, run by a shell as a person pastes them: search, then book the first slot
        book_first_free_slot(lambda command: subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                                                            timeout=30), search, book)
        assert (workdir / "his-received.jsonl").read_text().count('"SRM^S01"') == 1
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(30)
    assert rc == 0
    assert eventually(lambda: all(port_free(p) for p in (8443, 2575, 2576)), timeout=10,
                      what="the demo's processes to release their ports")
