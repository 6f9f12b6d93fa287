"""The end-to-end tests of HIS endpoints of kind database and webservice: the real database servers
(tests/databases.py), the simulator's faces as processes, a prescribing lock with its pharmacy of either kind.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.databases import SERVERS, Mariadb, Postgres, Server, server  # noqa: F401 (the servers, for the tests here)


class SimFace:
    """One of the simulator's faces as a process of its own (``python -m hissim.<module> ARGS``), its output in
    ``workdir/<log>``."""

    def __init__(self, module: str, workdir: Path, log: str, *args: str):
        from tests.e2e.harness import REPO

        self.log_path = workdir / log
        with open(self.log_path, "ab") as out:
            self.popen = subprocess.Popen([sys.executable, "-m", module, *args], cwd=workdir,
                                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, stdout=out,
                                          stderr=subprocess.STDOUT)

    def stop(self, sig=signal.SIGTERM, timeout: float = 15) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        return self.popen.wait(timeout=timeout)


def pharmacy_of_kind(tmp_path: Path, kind: str, settings: dict):
    """tests/e2e/test_prescriptions_e2e.py's prescribing Lock (not started) whose pharmacy endpoint is of ``kind``
    (database, webservice) with ``settings`` (its ``database`` or ``webservice`` section), RDE^O11 routed to it."""
    from tests.e2e.test_prescriptions_e2e import prescribing_lock

    lock = prescribing_lock(tmp_path)
    lock.gateway_config["inner"]["endpoints"] = [{
        "name": "pharmacy", "kind": kind, "receiving_application": "HIS-PHARMACY", "send_types": ["RDE^O11"],
        "ack_timeout": "3s", "retry_initial": "200ms", "retry_max": "1s", kind: settings}]
    lock.gateway_config["routes"] = [{"types": ["RDE^O11"], "to": "pharmacy"}]
    lock.write_configs()
    return lock


def prescribe(lock) -> list[dict]:
    """The golden three-item prescription, signed, posted by platform demo; its entries (all active)."""
    from tests.e2e.rxpki import golden_bundle, signed_bundle
    from tests.e2e.test_prescriptions_e2e import post

    r = post(lock, signed_bundle(golden_bundle(), lock.pki.key, lock.pki.chain))
    assert r.status_code == 200, r.text
    entries = r.json()["entry"]
    assert [e["resource"]["status"] for e in entries] == ["active"] * 3
    return entries


def wait_until_gone(proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
