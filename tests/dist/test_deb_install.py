"""The .deb on a front server without network (issue 19): installed with dpkg into a throwaway Debian root
(this machine's root under an overlay, network cut, no Python but the package's), the units pass
``systemd-analyze verify``, the installed config checks once the site has certificates, the gateway (as the
``gatewayd`` user, on the chamber in /var/lib/gatewayd) and the HIS simulator start and a booking crosses the
lock, and so does one in ``gatewayd demo``; the next version upgrades it with the chamber's data and the operator's config kept; a release that fails
``check-config`` is rolled back to the one before; ``dpkg --purge`` leaves nothing behind.

Slow (it builds the next version's .deb): marked ``dist``, run by .ci/dist, not by the normal suite.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
from datetime import datetime, timezone

import pytest

from tests.dist.conftest import make_dist, one
from tests.dist.throwaway_root import ThrowawayRoot
from tests.e2e.demo_commands import book_first_free_slot, printed_commands
from tests.e2e.harness import eventually

pytestmark = [pytest.mark.dist,
              pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("dpkg"),
                                 reason="needs root, unshare and dpkg")]

CERTS = "/etc/gatewayd/certs"
CURL = f"curl -s --cacert {CERTS}/ca.pem --cert {CERTS}/platform-demo.pem --key {CERTS}/platform-demo.key"
BASE = "https://127.0.0.1:8443/fhir"
AS_GATEWAYD = "setpriv --reuid=gatewayd --regid=gatewayd --init-groups"
# What dpkg and useradd/userdel write for any package: their databases and logs, and the user files they rewrite;
# and man-db's cache, which its dpkg trigger rebuilds when any package installs a man page.
BOOKKEEPING = re.compile(r"^/(var/lib/dpkg|var/log|var/cache/debconf|var/backups|var/cache/man)(/|$)|"
                         r"^/etc/(passwd|group|shadow|gshadow|subuid|subgid)-?$|^/etc/\.pwd\.lock$")


def version_of(deb) -> str:
    return deb.name.split("_")[1]


@pytest.fixture(scope="module")
def debs(release, tmp_path_factory):
    """(this release's .deb, the next version's .deb built from the same tree with the same wheels)."""
    first = one(release, "gatewayd_*_amd64.deb")
    major, minor, patch = version_of(first).split(".")[:3]
    following = f"{major}.{minor}.{int(re.match(r'[0-9]+', patch).group()) + 1}"
    out = tmp_path_factory.mktemp("next")
    with tarfile.open(one(release, "gatewayd-*-offline.tar.gz")) as tar:
        tar.extractall(out / "offline", filter="data")
    wheels = next((out / "offline").glob("*/wheels"))
    make_dist(out, "--version", following, "--only", "deb", "--wheels", str(wheels))
    return first, one(out, f"gatewayd_{following}_amd64.deb")


@pytest.fixture()
def root():
    r = ThrowawayRoot()
    yield r
    r.close()


def broken_release(good, directory) -> object:
    """``good`` repacked as the version after it, with a runtime whose gatewayd fails every command (as a
    release with a broken dependency would): its check-config fails."""
    unpacked = directory / "unpacked"
    subprocess.run(["dpkg-deb", "-R", str(good), str(unpacked)], check=True)
    control = (unpacked / "DEBIAN" / "control").read_text()
    version = version_of(good) + ".1"
    (unpacked / "DEBIAN" / "control").write_text(re.sub(r"(?m)^Version: .*$", f"Version: {version}", control))
    main = next(unpacked.glob("opt/gatewayd/runtime/python/lib/python3*/site-packages/gateway/__main__.py"))
    main.write_text('raise SystemExit("this release is broken")\n')
    for cached in main.parent.glob("__pycache__/__main__.*"):
        cached.unlink()
    target = directory / f"gatewayd_{version}_amd64.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-b", str(unpacked), str(target)], check=True,
                   stdout=subprocess.DEVNULL)
    return target


def start_lock(root: ThrowawayRoot) -> list[subprocess.Popen]:
    """The HIS simulator (root, in /tmp/sim) and the installed gateway (as gatewayd, /etc/gatewayd/gateway.yaml)."""
    root.sh("mkdir -p /tmp/sim && cp /usr/share/doc/gatewayd/examples/his-sim.example.yaml /tmp/sim/his-sim.yaml")
    gateway = root.spawn(AS_GATEWAYD.split() + ["gatewayd", "run", "--config", "/etc/gatewayd/gateway.yaml"],
                         "/tmp/gateway.log")
    sim = root.spawn(["gatewayd", "his-sim", "--config", "/tmp/sim/his-sim.yaml"], "/tmp/sim/his-sim.log")
    return [gateway, sim]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        assert p.wait(30) == 0


def fhir(root: ThrowawayRoot, args: str) -> tuple[int, dict | None]:
    done = root.sh(f"{CURL} -w '\\n%{{http_code}}' {args}", check=False)
    body, _, status = done.stdout.rpartition("\n")
    return int(status or 0), json.loads(body) if body.strip().startswith("{") else None


def book(root: ThrowawayRoot) -> str:
    """Book the first free slot through the outer gate; returns the Appointment's id."""
    def free_slots():
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        status, bundle = fhir(root, f"'{BASE}/Slot?status=free&_count=3&start=ge{now}'")
        return status == 200 and bundle.get("entry")

    slot = eventually(free_slots, timeout=90, interval=0.5, what="free slots from the HIS simulator through the installed gateway")[0]
    appointment = json.dumps({
        "resourceType": "Appointment", "status": "proposed", "slot": [{"reference": f"Slot/{slot['resource']['id']}"}],
        "contained": [{"resourceType": "Patient", "id": "p", "identifier": [{"system": "urn:demo:mrn",
                                                                             "value": "MRN-0001"}],
                       "name": [{"family": "Wang", "given": ["Fang"]}]}],
        "participant": [{"actor": {"reference": "#p"}, "status": "needs-action"}]})
    status, booked = fhir(root, f"-H 'Content-Type: application/fhir+json' -X POST {BASE}/Appointment "
                                f"-d '{appointment}'")
    assert status == 201 and booked["status"] == "booked", (status, booked)
    assert root.sh("cat /tmp/sim/his-received.jsonl").stdout.count('"SRM^S01"') == 1
    return booked["id"]


def queue(root: ThrowawayRoot) -> str:
    return root.sh(f"{AS_GATEWAYD} gatewayd queue list --config /etc/gatewayd/gateway.yaml").stdout


def test_install_book_upgrade_roll_back_purge(root, debs, tmp_path):
    first, following = debs
    before = root.files()
    for deb in debs:
        root.put(deb, f"/tmp/{deb.name}")

    # install: the runtime is the package's own (the host's Python is gone in this root), users and units are there
    root.sh(f"dpkg -i /tmp/{first.name}")
    assert re.fullmatch(rf"gatewayd {re.escape(version_of(first))} \(commit [0-9a-f]{{12}}(-dirty)?\)\n",
                        root.sh("gatewayd --version").stdout)
    assert root.sh("command -v python3 || echo none").stdout.strip() == "none"
    # the drivers of HIS endpoints of kind database and webservice are in the runtime (an air-gapped site has no pip)
    root.sh("/opt/gatewayd/runtime/python/bin/python3 -I -c 'import sqlalchemy, psycopg, pymysql, zeep, requests'")
    # and no package's own test suite (the daemon never imports them)
    assert root.sh("find /opt/gatewayd/runtime -type d \\( -name test -o -name tests \\) -exec test -f {}/../__init__.py "
                   "\\; -print").stdout.strip() == ""
    root.sh("systemd-analyze verify /lib/systemd/system/gatewayd.service /lib/systemd/system/gatewayd-inner.service "
            "/lib/systemd/system/gatewayd-outer.service /lib/systemd/system/gatewayd-backup.service "
            "/lib/systemd/system/gatewayd-backup.timer")
    # 0700 (with the setgid bit /var/lib/gatewayd's 2770 passes to a directory made in it: harmless, same group)
    mode, owner, group = root.sh("stat -c '%a %U %G' /var/lib/gatewayd/backup").stdout.split()
    assert (mode[-3:], owner, group) == ("700", "gatewayd", "gatewayd")
    assert root.sh("zcat /usr/share/man/man8/gatewayd.8.gz | head -1").stdout.startswith(".TH GATEWAYD 8 ")
    assert "complete -o filenames -F _gatewayd gatewayd" in root.sh(
        "cat /usr/share/bash-completion/completions/gatewayd").stdout
    assert "gatewayd" in root.sh("id -nG gatewayd-inner").stdout.split()
    assert "gatewayd" in root.sh("id -nG gatewayd-outer").stdout.split()
    assert root.sh("stat -c '%a %U %G' /var/lib/gatewayd").stdout.split() == ["2770", "root", "gatewayd"]
    assert "/etc/gatewayd/gateway.yaml" in root.sh("dpkg-query -W -f='${Conffiles}' gatewayd").stdout

    # the site's part: certificates, a line of its own in the config; then check-config passes
    root.sh(f"gatewayd certs init {CERTS} >/dev/null && chgrp -R gatewayd {CERTS} && chmod 0640 {CERTS}/*.key "
            "&& echo '# site: ward 3' >> /etc/gatewayd/gateway.yaml")
    assert root.sh("gatewayd check-config /etc/gatewayd/gateway.yaml").stdout == "ok\n"

    # the gateway and the HIS simulator start; a booking crosses the lock and is committed in /var/lib/gatewayd
    procs = start_lock(root)
    try:
        appointment = book(root)
    finally:
        stop(procs)
    committed = queue(root)
    assert "SRM^S01" in committed

    # the demo of the README runs from the package too (its own configs and certificates in /tmp/demo)
    demo = root.spawn(["gatewayd", "demo", "--workdir", "/tmp/demo"])
    try:
        _out, search, booking = printed_commands(demo.stdout, timeout=90)
        book_first_free_slot(lambda command: root.sh(command, check=False), search, booking, timeout=90)
    finally:
        demo.send_signal(signal.SIGINT)
        assert demo.wait(30) == 0

    # the next version upgrades it: same chamber, the operator's config line kept, a pre-upgrade copy made
    upgrade = root.sh(f"dpkg -i /tmp/{following.name}")
    assert f"upgraded from {version_of(first)} to {version_of(following)}" in upgrade.stderr
    assert root.sh("gatewayd --version").stdout.startswith(f"gatewayd {version_of(following)} ")
    assert "# site: ward 3" in root.sh("cat /etc/gatewayd/gateway.yaml").stdout
    root.sh(f"test -s /var/lib/gatewayd/pre-upgrade-{version_of(first)}-gateway.sqlite3")
    assert queue(root) == committed
    procs = start_lock(root)
    try:
        status, read = eventually(lambda: (lambda r: r if r[0] == 200 else None)(
            fhir(root, f"{BASE}/Appointment/{appointment}")), timeout=90, interval=0.5,
            what="the booked Appointment after the upgrade")
        assert read["status"] == "booked"
    finally:
        stop(procs)
    committed = queue(root)  # with what the HIS simulator sent after this start

    # a release whose gatewayd fails check-config: dpkg reports the failure, the previous runtime runs again
    broken = broken_release(following, tmp_path)
    root.put(broken, f"/tmp/{broken.name}")
    failed = root.sh(f"dpkg -i /tmp/{broken.name}", check=False)
    assert failed.returncode != 0
    assert f"Rolling back to {version_of(following)}" in failed.stderr, failed.stderr
    assert root.sh("gatewayd --version").stdout.startswith(f"gatewayd {version_of(following)} ")
    assert queue(root) == committed
    # reinstalling the good release settles dpkg's state
    root.sh(f"dpkg -i /tmp/{following.name}")
    assert root.sh("dpkg-query -W -f='${Status} ${Version}' gatewayd").stdout == \
        f"install ok installed {version_of(following)}"

    # remove keeps the chamber and the config; purge leaves nothing behind
    root.sh("dpkg --remove gatewayd && test -s /var/lib/gatewayd/chamber.sqlite3 && test -f /etc/gatewayd/gateway.yaml"
            " && test ! -e /opt/gatewayd && test ! -e /usr/bin/gatewayd")
    root.sh("dpkg --purge gatewayd")
    # what the upper layer holds now and did not before: neither bookkeeping nor a directory of the host's own
    # (one whose entries changed and came back is copied up, still there)
    left = {path for path in root.files() - before if not BOOKKEEPING.match(path) and not os.path.isdir(path)}
    assert left == set(), sorted(left)
    assert "gatewayd" not in root.sh("cat /etc/passwd /etc/group").stdout
