"""Real database servers for the end-to-end tests of HIS endpoints of kind database: PostgreSQL and MariaDB from
their Debian packages (postgresql, mariadb-server: .ci/run installs them), each started as a process of its own
in a fresh data directory on a free loopback port, killed (``kill -9``) and restarted by the tests that need it.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.e2e.harness import eventually, free_port


def _binary(*candidates: str) -> str | None:
    for pattern in candidates:
        found = sorted(glob.glob(pattern)) or ([shutil.which(pattern)] if shutil.which(pattern) else [])
        if found:
            return found[-1]
    return None


class Server:
    """One database server process; ``url`` is its SQLAlchemy URL (database ``his``)."""

    name = "database"
    user = "root"

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix=f"gw-{self.name}-"))
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self._as = None
        if os.geteuid() == 0:  # the servers refuse to run as root (postgres) or should not (mariadbd)
            account = pwd.getpwnam(self.user)
            os.chown(self.dir, account.pw_uid, account.pw_gid)
            self._as = self.user
        self.log = open(self.dir / "server.log", "ab")

    def run(self, args: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(args, user=self._as, cwd=self.dir, stdout=self.log, stderr=subprocess.STDOUT,
                              check=True, **kw)

    def start(self) -> "Server":
        self.proc = subprocess.Popen(self.command(), user=self._as, cwd=self.dir, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        eventually(self.ready, timeout=60, what=f"{self.name} to accept connections")
        return self

    def kill(self) -> None:
        """kill -9: the server dies with whatever it was doing."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def close(self) -> None:
        self.stop()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def ready(self) -> bool:
        import sqlalchemy as sa

        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited: {(self.dir / 'server.log').read_text(errors='replace')[-2000:]}")
        engine = sa.create_engine(self.admin_url, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            return True
        except sa.exc.OperationalError:
            return False
        finally:
            engine.dispose()


class Postgres(Server):
    name, user = "postgresql", "postgres"
    bin = _binary("/usr/lib/postgresql/*/bin/postgres", "postgres")

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://gw@127.0.0.1:{self.port}/postgres"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://gw@127.0.0.1:{self.port}/his"

    def init(self) -> "Postgres":
        initdb = str(Path(self.bin).with_name("initdb"))
        self.run([initdb, "-D", str(self.dir / "data"), "-U", "gw", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8",
                  "--no-sync"])
        self.start()
        import sqlalchemy as sa

        engine = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
        with engine.connect() as conn:
            conn.exec_driver_sql("CREATE DATABASE his")
        engine.dispose()
        return self

    def command(self) -> list[str]:
        return [self.bin, "-D", str(self.dir / "data"), "-p", str(self.port), "-k", str(self.dir),
                "-c", "listen_addresses=127.0.0.1"]


class Mariadb(Server):
    name, user = "mariadb", "mysql"
    bin = _binary("/usr/sbin/mariadbd", "mariadbd", "mysqld")

    @property
    def admin_url(self) -> str:
        return f"mysql+pymysql://root@127.0.0.1:{self.port}/mysql?charset=utf8mb4"

    @property
    def url(self) -> str:
        return f"mysql+pymysql://root@127.0.0.1:{self.port}/his?charset=utf8mb4"

    def init(self) -> "Mariadb":
        install = _binary("/usr/bin/mariadb-install-db", "mariadb-install-db", "mysql_install_db")
        self.run([install, "--no-defaults", f"--datadir={self.dir / 'data'}", "--auth-root-authentication-method=normal",
                  "--skip-test-db", "--skip-name-resolve"] + ([f"--user={self.user}"] if self._as else []))
        self.start()
        import sqlalchemy as sa

        engine = sa.create_engine(self.admin_url, poolclass=sa.pool.NullPool)
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE DATABASE his CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
        engine.dispose()
        return self

    def command(self) -> list[str]:
        return [self.bin, "--no-defaults", f"--datadir={self.dir / 'data'}", f"--port={self.port}",
                "--bind-address=127.0.0.1", f"--socket={self.dir / 'mysqld.sock'}", f"--pid-file={self.dir / 'pid'}",
                "--skip-name-resolve", "--skip-grant-tables", "--innodb-buffer-pool-size=16M",
                "--innodb-log-file-size=8M", "--performance-schema=OFF"]


SERVERS = {"postgresql": Postgres, "mariadb": Mariadb}


def server(kind: str) -> Server:
    """A fresh server of ``kind`` with an empty database ``his``; skips when its package is not installed."""
    cls = SERVERS[kind]
    if cls.bin is None:
        pytest.skip(f"{kind} is not installed (Debian package {'postgresql' if kind == 'postgresql' else 'mariadb-server'})")
    started = cls()
    try:
        return started.init()
    except BaseException:
        started.close()
        raise


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
