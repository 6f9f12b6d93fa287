"""The nightly backup units (deploy/systemd/gatewayd-backup.{service,timer}): systemd accepts them, the timer
starts the service every night, and the service's command line, run as systemd would run it, writes the
weekday's checked copy of a real chamber."""

import configparser
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gateway.chamber.engine import Chamber
from gateway.ops.devca import init_dev_ca

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str
    parser.read_string((UNITS / name).read_text())
    return parser


def test_the_timer_starts_the_backup_nightly_and_makes_up_a_missed_night():
    timer = _unit("gatewayd-backup.timer")
    assert re.fullmatch(r"\*-\*-\* \d\d:\d\d:00", timer["Timer"]["OnCalendar"])
    assert timer["Timer"]["Persistent"] == "true" and timer["Install"]["WantedBy"] == "timers.target"
    assert timer["Timer"].get("Unit", "gatewayd-backup.service") == "gatewayd-backup.service"
    service = _unit("gatewayd-backup.service")
    assert service["Service"]["Type"] == "oneshot" and "Install" not in service  # started by the timer only
    assert "d /var/lib/gatewayd/backup 0700 gatewayd gatewayd" in (UNITS / "gatewayd.tmpfiles").read_text()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_accepts_the_units():
    done = subprocess.run(["systemd-analyze", "verify", UNITS / "gatewayd-backup.service",
                           UNITS / "gatewayd-backup.timer"], capture_output=True, text=True)
    problems = [line for line in done.stderr.splitlines() if "gatewayd-backup" in line
                and "/opt/gatewayd/bin/gatewayd" not in line]  # (not installed on this machine)
    assert not problems, done.stderr


def test_the_service_command_writes_the_weekdays_checked_copy(tmp_path):
    chamber = Chamber(tmp_path / "chamber.sqlite3", clock=time.time)
    chamber.open()
    chamber.close()
    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "config" / "gateway.example.yaml").read_text())
    config["chamber"]["path"] = str(tmp_path / "chamber.sqlite3")
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(config))
    init_dev_ca(tmp_path / "certs", platforms=("demo",))  # (the files the example config names)
    (tmp_path / "backup").mkdir()
    service = _unit("gatewayd-backup.service")["Service"]
    exec_start = service["ExecStart"].replace("%%", "%")  # (systemd's escape of a %)
    exec_start = exec_start.replace("/opt/gatewayd/bin/gatewayd", f"{sys.executable} -m gateway")
    exec_start = exec_start.replace("/var/lib/gatewayd/backup", str(tmp_path / "backup"))
    assert exec_start.startswith("/bin/sh -c '") and exec_start.endswith("'")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
           "GATEWAYD_CONFIG": str(tmp_path / "gateway.yaml")}
    assert service["Environment"] == "GATEWAYD_CONFIG=/etc/gatewayd/gateway.yaml"
    done = subprocess.run(["/bin/sh", "-c", exec_start[len("/bin/sh -c '"):-1]], env=env, capture_output=True,
                          text=True, cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    weekday = time.strftime("%u")
    assert done.stdout.startswith(f"backed up to {tmp_path / 'backup' / f'chamber-{weekday}.sqlite3'}")
    assert [p.name for p in (tmp_path / "backup").iterdir()] == [f"chamber-{weekday}.sqlite3"]
