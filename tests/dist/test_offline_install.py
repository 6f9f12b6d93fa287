"""The offline wheelhouse (issue 19): unpacked on a host with Python but no network, its install.sh makes a
fresh virtual environment from wheels/ alone (pip --no-index, the network namespace has nothing but loopback,
no pip configuration of this machine counts), and the installed gatewayd runs the demo: the gateway and the HIS
simulator start and a booking made with the demo's printed commands crosses the lock.

Once with each of Python 3.11 and 3.12 this machine has (``python3.X`` on PATH, or a pyenv build); the aarch64
wheels are checked for presence only.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.dist.conftest import one
from tests.e2e.demo_commands import book_first_free_slot, printed_commands

pytestmark = [pytest.mark.dist,
              pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"),
                                 reason="needs root, unshare and nsenter")]


class CutNetwork:
    """A network namespace with loopback only, held by a process; commands enter it with nsenter."""

    def __init__(self):
        self.holder = subprocess.Popen(["unshare", "--net", "sh", "-c", "ip link set lo up && echo ready && "
                                        "exec sleep 7200"], stdout=subprocess.PIPE, text=True)
        assert self.holder.stdout.readline().strip() == "ready"

    def args(self, *cmd: str) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-n", *cmd]

    def close(self):
        self.holder.kill()
        self.holder.wait(10)


@pytest.fixture()
def cut():
    net = CutNetwork()
    yield net
    net.close()


def interpreter(version: str) -> str | None:
    found = shutil.which(f"python{version}")
    if found and subprocess.run([found, "-c", "import venv"], capture_output=True).returncode == 0:
        return found
    builds = sorted(Path.home().glob(f".pyenv/versions/{version}.*/bin/python{version}"))
    return str(builds[-1]) if builds else None


@pytest.mark.parametrize("version", ["3.11", "3.12"])
def test_wheelhouse_installs_offline_and_runs_the_demo(release, tmp_path, cut, version):
    python = interpreter(version)
    if python is None:
        pytest.skip(f"no Python {version} on this machine")
    tarball = one(release, "gatewayd-*-offline.tar.gz")
    with tarfile.open(tarball) as tar:
        tar.extractall(tmp_path, filter="data")
    top = one(tmp_path, "gatewayd-*-offline")
    wheels = {p.name for p in (top / "wheels").iterdir()}
    for tag in ("cp311", "cp312"):
        for arch in ("x86_64", "aarch64"):
            assert any(tag in w and arch in w and w.startswith("pydantic_core") for w in wheels), (tag, arch)

    # no route out: the namespace has loopback only
    routes = subprocess.run(cut.args("ip", "route", "get", "1.1.1.1"), capture_output=True, text=True)
    assert routes.returncode != 0

    venv = tmp_path / "venv"
    installed = subprocess.run(cut.args(str(top / "install.sh"), "--venv", str(venv)), capture_output=True,
                               text=True, timeout=600, env={**os.environ, "PYTHON": python})
    assert installed.returncode == 0, installed.stdout + installed.stderr
    release_version = (top / "VERSION").read_text().strip()
    assert installed.stdout.startswith(f"gatewayd {release_version} (commit ")
    assert (venv / "lib" / f"python{version}" / "site-packages" / "gateway").is_dir()
    # the drivers of HIS endpoints of kind database and webservice came with it (an air-gapped site has no pip)
    drivers = subprocess.run([str(venv / "bin" / "python"), "-c", "import sqlalchemy, psycopg, pymysql, zeep, requests"],
                             capture_output=True, text=True)
    assert drivers.returncode == 0, drivers.stderr

    workdir = tmp_path / "demo"
    demo = subprocess.Popen(cut.args(str(venv / "bin" / "gatewayd"), "demo", "--workdir", str(workdir)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    try:
        _out, search, book = printed_commands(demo.stdout, timeout=90)
        book_first_free_slot(lambda command: subprocess.run(cut.args("bash", "-c", command), capture_output=True,
                                                            text=True, timeout=60), search, book, timeout=90)
        assert (workdir / "his-received.jsonl").read_text().count('"SRM^S01"') == 1
    finally:
        demo.send_signal(signal.SIGINT)
        rc = demo.wait(30)
    assert rc == 0
    # the demo ran the venv's own interpreter and packages, not this checkout
    assert str(venv) in subprocess.run([str(venv / "bin" / "python"), "-c", "import gateway; print(gateway.__file__)"],
                                       capture_output=True, text=True, cwd=tmp_path).stdout
