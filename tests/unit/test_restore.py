"""gatewayd restore (gateway/ops/restore.py) beside a real chamber file: a gate's claim held refuses it with
nothing changed; run as root, the chamber it puts in place keeps the replaced one's owner and mode (the gateway
runs as its own user), and the claim files it creates are the directory owner's."""

import os
import time

import pytest

from gateway.chamber.engine import Chamber
from gateway.ops.claim import Claim, ClaimHeld, Holder, claim_file
from gateway.ops.restore import RestoreError, restore


def _chamber(path):
    chamber = Chamber(path, clock=time.time)
    chamber.open()
    return chamber


def test_refused_while_a_gate_holds_its_claim(tmp_path):
    live = tmp_path / "chamber.sqlite3"
    _chamber(live).close()
    source = _chamber(tmp_path / "other.sqlite3")
    source.backup(tmp_path / "backup.sqlite3")
    source.close()
    before = live.read_bytes()
    inner = Claim(live, "inner", Holder.this_process("inner", tmp_path / "gateway.yaml"))
    inner.take()
    try:
        with pytest.raises(ClaimHeld) as held:
            restore(tmp_path / "backup.sqlite3", live, tmp_path / "gateway.yaml")
        assert held.value.role == "inner" and held.value.holder.pid == os.getpid()
    finally:
        inner.release()
    assert live.read_bytes() == before and not list(tmp_path.glob("chamber.sqlite3.re*"))
    with pytest.raises(RestoreError, match="the backup is the chamber itself"):
        restore(live, live, tmp_path / "gateway.yaml")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to give files away)")
def test_as_root_the_restored_chamber_keeps_the_gateways_owner_and_mode(tmp_path):
    home = tmp_path / "var"
    home.mkdir()
    os.chown(home, 4242, 4343)
    live = home / "chamber.sqlite3"
    _chamber(live).close()
    os.chown(live, 4242, 4343)
    os.chmod(live, 0o640)
    source = _chamber(tmp_path / "other.sqlite3")
    source.backup(tmp_path / "backup.sqlite3")  # (root's, 0600)
    source.close()
    done = restore(tmp_path / "backup.sqlite3", live, tmp_path / "gateway.yaml")
    assert done[-1].startswith("restored ")
    st = os.stat(live)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (4242, 4343, 0o640)
    for role in ("outer", "inner"):  # created by this restore: the gateway's user must be able to lock them
        assert (os.stat(claim_file(live, role)).st_uid, os.stat(claim_file(live, role)).st_gid) == (4242, 4343)
    assert [p.name for p in home.glob("chamber.sqlite3.replaced-*")]
