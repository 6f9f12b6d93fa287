"""Real database servers for the tests: PostgreSQL and MariaDB from their Debian packages (postgresql,
mariadb-server: .ci/run installs them), each started as a process of its own in a fresh data directory on a free
loopback port (as the user the package made, when the tests run as root), killed (``kill -9``) and restarted by
the tests that need it, removed at the end.  Used by the HIS-database end-to-end tests (tests/e2e/databases.py)
and by the chamber on PostgreSQL (tests/conftest.py: ``chamber_postgres``).

Without the package the tests that need a server are skipped, saying which package is missing — except in CI
(``CI=true``), where .ci/run installs them: there a missing server fails the test.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
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

    #: more settings for the server (``-c name=value``): the chamber's test server has room for many chambers
    settings: tuple[str, ...] = ()

    def dsn(self, dbname: str, **options: str) -> str:
        """A libpq connection string to database ``dbname`` on this server."""
        return " ".join([f"host=127.0.0.1 port={self.port} user=gw dbname={dbname}",
                         *(f"{k}='{v}'" for k, v in options.items())])

    def command(self) -> list[str]:
        return [self.bin, "-D", str(self.dir / "data"), "-p", str(self.port), "-k", str(self.dir),
                "-c", "listen_addresses=127.0.0.1", *(a for s in self.settings for a in ("-c", s))]


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


def server(kind: str, **attributes) -> Server:
    """A fresh server of ``kind`` with an empty database ``his``; skips when its package is not installed (fails
    in CI).  ``attributes``: set on the server before it starts (``settings``)."""
    cls = SERVERS[kind]
    if cls.bin is None:
        package = "postgresql" if kind == "postgresql" else "mariadb-server"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{kind} is not installed (Debian package {package}), and CI must run these tests")
        pytest.skip(f"{kind} is not installed (Debian package {package})")
    started = cls()
    for name, value in attributes.items():
        setattr(started, name, value)
    try:
        return started.init()
    except BaseException:
        started.close()
        raise
