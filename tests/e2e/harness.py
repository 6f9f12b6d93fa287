"""Run the real thing for end-to-end tests: the HIS simulator and gatewayd as processes on loopback.

Nothing here stands in for the gateway or the HIS: both are started with the same commands a person
uses (``python -m gateway his-sim`` / ``python -m gateway run``), and tests talk to them over TCP (MLLP)
and TLS (FHIR) with real clients.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import date, datetime, timedelta
from pathlib import Path

import requests
import yaml

REPO = Path(__file__).resolve().parents[2]


HOSPITAL_TZ = "Asia/Shanghai"


def hospital_today(tz: str = HOSPITAL_TZ) -> date:
    """Today on the hospital's calendar (the gateway's dates are the hospital's, not this machine's: from 16:00
    UTC on, Shanghai is already a day ahead)."""
    from zoneinfo import ZoneInfo

    return datetime.now(ZoneInfo(tz)).date()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eventually(check, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (OSError, requests.RequestException, ValueError, KeyError) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class Proc:
    def __init__(self, name: str, args: list[str], workdir: Path, descriptor_limit: tuple[int, int] | None = None):
        """``descriptor_limit``: the process's RLIMIT_NOFILE (soft, hard), as a unit's LimitNOFILE sets it."""
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
        limit = None
        if descriptor_limit is not None:
            import resource

            limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, descriptor_limit)  # noqa: E731
        self.popen = subprocess.Popen([sys.executable, "-m", "gateway", *args], cwd=workdir, env=env,
                                      stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=limit)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 40) -> str:
        lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def stop(self, sig=signal.SIGTERM, timeout: float = 15) -> int:
        if self.alive():
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()
        return self.popen.returncode


class ChamberUnreadable(Exception):
    """Lock.chamber_rows could not read a PostgreSQL chamber (no schema yet, ...)."""


class Lock:
    """A HIS simulator and a gateway, wired together on free loopback ports, in ``workdir``."""

    def __init__(self, workdir: Path, *, platforms=("demo", "other"), sim: dict | None = None,
                 gateway: dict | None = None, his: dict | None = None, doctors: int = 2, days: int = 2,
                 descriptor_limit: tuple[int, int] | None = None):
        from gateway.ops.devca import init_dev_ca

        self.workdir = workdir
        self.descriptor_limit = descriptor_limit  # the gateway process's RLIMIT_NOFILE (soft, hard)
        self.certs = workdir / "certs"
        init_dev_ca(self.certs, platforms=tuple(platforms))
        self.mllp_port, self.his_port, self.fhir_port = free_port(), free_port(), free_port()
        self.base = f"https://127.0.0.1:{self.fhir_port}/fhir"
        self.first_day = hospital_today() + timedelta(days=1)
        self.sim_config = {
            "listen": f"tcp:{self.his_port}:interface=127.0.0.1",
            "gateway": {"host": "127.0.0.1", "port": self.mllp_port},
            "publish": "push",
            "received_log": "his-received.jsonl",
            "sent_log": "his-sent.jsonl",
            "days": days,
            "start_date": self.first_day.isoformat(),
            "counter_bookings_per_minute": 0,
            "seed": 7,
            "departments": [{
                "code": "CARD", "name": "心内科",
                "doctors": [{"id": f"D00{i + 1}", "family": "张", "given": f"医生{i + 1}",
                             "service": {"code": "cardiology-consult", "text": "心内科门诊"},
                             "sessions": ["08:00-09:00"], "slot_minutes": 15} for i in range(doctors)],
            }],
            **(sim or {}),
        }
        self.slot_count = doctors * days * 4
        self.gateway_config = {
            "hospital": {"name": "Test Hospital", "timezone": HOSPITAL_TZ},
            "chamber": {"path": "chamber.sqlite3"},
            "inner": {
                "listen": f"tcp:{self.mllp_port}:interface=127.0.0.1",
                "his": {"host": "127.0.0.1", "port": self.his_port, "ack_timeout": "3s",
                        "retry_initial": "200ms", "retry_max": "2s", **(his or {})},
            },
            "outer": {
                "host": "127.0.0.1", "port": self.fhir_port, "answer_within": "5s",
                "tls": {"certificate": "certs/server.pem", "private_key": "certs/server.key",
                        "client_ca": "certs/ca.pem"},
            },
            "platforms": [{"name": p, "certificate_subject": f"CN=platform-{p}"} for p in platforms],
            "logging": {"level": "info", "format": "json"},
            **(gateway or {}),
        }
        self.write_configs()
        self.gateway: Proc | None = None
        self.sim: Proc | None = None

    def write_configs(self) -> None:
        """(Re)write both YAML files from ``sim_config`` and ``gateway_config`` (edit those, then call)."""
        for name, data in (("his-sim.yaml", self.sim_config), ("gateway.yaml", self.gateway_config)):
            (self.workdir / name).write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")

    # -- processes -------------------------------------------------------------------------------------
    def start(self, wait_for_slots: bool = True) -> "Lock":
        self.start_gateway()
        self.start_sim()
        if wait_for_slots:
            try:
                eventually(lambda: len(self.search_slots()) >= self.slot_count, timeout=30,
                           what=f"{self.slot_count} slots published by the HIS to reach the FHIR API")
            except AssertionError as e:  # say what each side saw: a bare timeout cannot be diagnosed from CI
                raise AssertionError(f"{e}\n{self.diagnosis()}") from None
        return self

    def diagnosis(self) -> str:
        """The tails of both processes' logs and what the simulator recorded sending, for a failure message."""
        sent = read_jsonl(self.workdir / self.sim_config.get("sent_log", "his-sent.jsonl"))
        parts = [f"the HIS simulator recorded {len(sent)} messages sent"]
        for proc in (self.gateway, self.sim):
            if proc is not None:
                parts.append(f"--- {proc.name} (exit {proc.popen.poll()}), last lines:\n{proc.log_tail(60)}")
        return "\n".join(parts)

    def start_gateway(self) -> None:
        self.gateway = Proc("gateway", ["run", "--config", "gateway.yaml"], self.workdir, self.descriptor_limit)
        try:
            eventually(lambda: self.session().get(f"{self.base}/metadata", timeout=2).status_code == 200,
                       timeout=20, what="the gateway's FHIR API")
        except AssertionError:
            raise AssertionError(f"gateway did not start:\n{self.gateway.log_tail()}") from None

    def start_sim(self) -> None:
        self.sim = Proc("his-sim", ["his-sim", "--config", "his-sim.yaml"], self.workdir)

        def listening():
            with socket.create_connection(("127.0.0.1", self.his_port), timeout=1):
                return True

        try:
            eventually(listening, timeout=20, what="the HIS simulator's MLLP port")
        except AssertionError:
            raise AssertionError(f"HIS simulator did not start:\n{self.sim.log_tail()}") from None
        if self.gateway is not None and self.gateway.popen.poll() is None:
            self.wait_his_up()

    def wait_his_up(self, *peers: str, timeout: float = 30) -> None:
        """Until the running gateway's HIS probe has seen these HIS endpoints up (the gateway starts first, so its
        probe found them down: a booking or prescription made before would be answered 202 at once, the HIS
        being known down). Positively: at the first look the probe may not have recorded its first, failed check
        yet, so "no endpoint recorded down" proves nothing. Without ``peers``: the endpoints this simulator serves
        (the HIS, and its pharmacy if the gateway sends there); none when the probe is off."""
        import sqlite3

        from gateway.config.fields import parse_duration

        inner = self.gateway_config.get("inner", {})
        his = {"name": "his", **inner.get("his", {})}
        endpoints = [his, *inner.get("endpoints", [])]
        if not peers:
            pharmacy = self.sim_config.get("pharmacy", {}).get("listen", "")
            ports = {self.his_port} | ({int(pharmacy.split(":")[1])} if pharmacy else set())
            peers = tuple(e["name"] for e in endpoints if e is his or e.get("port") in ports)
        # an endpoint without a probe (probe_interval 0) is never recorded, up or down
        unprobed = {e["name"] for e in endpoints if parse_duration(str(e.get("probe_interval", "30s"))) == 0}
        peers = tuple(p for p in peers if p not in unprobed)
        if not peers:
            return

        def known_up():
            try:
                return len(self.chamber_rows(f"SELECT peer FROM his_links WHERE up = 1 AND peer IN "
                                             f"({', '.join('?' * len(peers))})", *peers)) == len(set(peers))
            except (sqlite3.Error, ChamberUnreadable):  # no chamber (yet), or the table not made yet
                return False

        eventually(known_up, timeout=timeout, what=f"the gateway's HIS probe to see {', '.join(peers)} up")

    def stop(self) -> None:
        for proc in (self.sim, self.gateway):
            if proc is not None:
                proc.stop()

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()  # never leave a process behind when start-up fails
            raise

    def __exit__(self, *exc):
        self.stop()

    # -- clients ---------------------------------------------------------------------------------------
    def cert(self, platform: str = "demo") -> tuple[str, str]:
        return str(self.certs / f"platform-{platform}.pem"), str(self.certs / f"platform-{platform}.key")

    def chamber_rows(self, sql: str, *args) -> list[tuple]:
        """Rows of a query on the running gateway's chamber, read-only (as an auditor would read it); ``?``
        placeholders on either backend (a PostgreSQL chamber's errors are ChamberUnreadable)."""
        import sqlite3

        chamber = self.gateway_config["chamber"]
        if chamber.get("backend") == "postgresql":
            import psycopg

            try:
                with psycopg.connect(chamber["postgresql"]["dsn"], autocommit=True) as conn:
                    conn.execute("SET default_transaction_read_only = on")
                    return [tuple(r) for r in conn.execute(sql.replace("?", "%s"), args).fetchall()]
            except psycopg.Error as e:
                raise ChamberUnreadable(str(e)) from e

        conn = sqlite3.connect(f"file:{self.workdir / self.gateway_config['chamber']['path']}?mode=ro", uri=True)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def renew_server_certificate(self) -> int:
        """Replace certs/server.pem and server.key with a new certificate from the same dev CA (as an operator
        renewing it would), send the gateway SIGHUP, and return the new certificate's serial number."""
        import shutil

        from cryptography import x509

        from gateway.ops.devca import init_dev_ca

        renewed = self.workdir / "renewed"
        shutil.rmtree(renewed, ignore_errors=True)
        shutil.copytree(self.certs, renewed)
        for name in ("server.pem", "server.key"):
            (renewed / name).unlink()
        init_dev_ca(renewed)  # same CA, a new server certificate
        for name in ("server.pem", "server.key"):
            shutil.copy(renewed / name, self.certs / name)
        self.gateway.popen.send_signal(signal.SIGHUP)
        return x509.load_pem_x509_certificate((self.certs / "server.pem").read_bytes()).serial_number

    def session(self, platform: str = "demo") -> requests.Session:
        s = requests.Session()
        s.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would override Session.verify
        s.cert = self.cert(platform)
        s.verify = str(self.certs / "ca.pem")
        return s

    def fhirpy(self, platform: str = "demo"):
        from fhirpy import SyncFHIRClient

        return SyncFHIRClient(self.base, requests_config={"cert": self.cert(platform),
                                                          "verify": str(self.certs / "ca.pem")})

    def search_slots(self, platform: str = "demo", **params) -> list[dict]:
        """All matching slots, following the searchset's ``next`` links."""
        session = self.session(platform)
        r = session.get(f"{self.base}/Slot", params={"_count": 100, **params}, timeout=5)
        out = []
        while True:
            r.raise_for_status()
            bundle = r.json()
            out += [e["resource"] for e in bundle.get("entry", [])]
            nxt = [link["url"] for link in bundle.get("link", []) if link["relation"] == "next"]
            if not nxt:
                return out
            r = session.get(nxt[0], timeout=5)

    def received(self) -> list[dict]:
        return read_jsonl(self.workdir / "his-received.jsonl")

    def sent(self) -> list[dict]:
        return read_jsonl(self.workdir / "his-sent.jsonl")


def mllp_exchange(port: int, payload: bytes) -> bytes:
    """Send one framed HL7 message to an MLLP port and return the first answer frame."""
    from adapters.inner.framing import MLLPFramer, frame

    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(frame(payload))
        framer = MLLPFramer()
        while True:
            data = s.recv(65536)
            assert data, "the gateway closed the connection without an answer"
            frames = framer.feed(data)
            if frames:
                return frames[0]


def appointment_for(slot_id: str, mrn: str = "MRN-0001") -> dict:
    """A platform's booking request: the slot and a contained Patient the HIS can identify."""
    return {
        "resourceType": "Appointment",
        "status": "proposed",
        "slot": [{"reference": f"Slot/{slot_id}"}],
        "contained": [{"resourceType": "Patient", "id": "p",
                       "identifier": [{"system": "urn:oid:2.16.840.1.113883.2.4.6.3", "value": mrn,
                                       "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                                            "code": "MR"}]}}],
                       "name": [{"family": "王", "given": ["芳"]}],
                       "telecom": [{"system": "phone", "value": "13800000000"}]}],
        "participant": [{"actor": {"reference": "#p"}, "status": "needs-action"}],
    }
