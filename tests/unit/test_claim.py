"""The claim (gateway/ops/claim.py): each gate role at most once per chamber, an OS lock on a file beside it.

Claims are flock()s on open files: two Claim objects in one process conflict just as two processes do, so most
of these run in-process; the ones about a process's death (kill -9) and another user use real processes.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from gateway.ops.claim import ROLES, Claim, ClaimError, ClaimHeld, Holder, claim_file, holder
from tests.e2e.harness import REPO


def claim(chamber, gate, config="/etc/gatewayd/gateway.yaml", now=1_796_000_000.0) -> Claim:
    return Claim(chamber, gate, Holder.this_process(gate, config, now=now))


@pytest.fixture
def chamber(tmp_path):
    return tmp_path / "var" / "chamber.sqlite3"


@pytest.fixture
def taken():
    claims: list[Claim] = []

    def take(*args, **kw) -> Claim:
        c = claim(*args, **kw)
        c.take()
        claims.append(c)
        return c

    yield take
    for c in claims:
        c.release()


def test_a_full_gateway_claims_both_roles_and_records_who_it_is(chamber, taken):
    first = taken(chamber, "both", config="/etc/gatewayd/gateway.yaml")
    assert first.held == ("outer", "inner")
    for role in ("outer", "inner"):
        recorded = Holder.decode(claim_file(chamber, role).read_bytes())
        assert recorded.pid == os.getpid() and recorded.gate == "both"
        assert recorded.config == "/etc/gatewayd/gateway.yaml" and recorded.since == "2026-11-30T00:53:20Z"


@pytest.mark.parametrize("second", ["both", "outer", "inner"])
def test_a_second_process_on_a_running_gateways_chamber_is_refused_naming_the_holder(chamber, taken, second):
    taken(chamber, "both", config="/etc/gatewayd/gateway.yaml")
    with pytest.raises(ClaimHeld) as refused:
        taken(chamber, second, config="/tmp/look.yaml")
    e = refused.value
    assert e.role == ROLES[second][0] and e.holder.pid == os.getpid()
    text = str(e)
    assert f"the {e.role} gate of the chamber {chamber}" in text
    assert f"pid {os.getpid()} (gate both, config /etc/gatewayd/gateway.yaml, running since 2026-11-30T00:53:20Z" in text
    assert "one outer and one inner process of the split lock" in text and str(claim_file(chamber, e.role)) in text


def test_the_split_pair_shares_a_chamber_but_neither_gate_runs_twice(chamber, taken):
    taken(chamber, "outer")
    taken(chamber, "inner")  # the split lock's other process: allowed
    for gate in ("outer", "inner", "both"):
        with pytest.raises(ClaimHeld):
            taken(chamber, gate)


def test_a_refused_full_gateway_keeps_no_claim(chamber, taken):
    """All or none: a full gateway refused on the inner claim gives back the outer one it had taken."""
    inner = taken(chamber, "inner")
    with pytest.raises(ClaimHeld) as refused:
        taken(chamber, "both")
    assert refused.value.role == "inner"
    taken(chamber, "outer")  # nobody kept the outer claim
    inner.release()


def test_a_released_claim_is_taken_again_and_the_record_replaced(chamber, taken):
    first = taken(chamber, "outer", config="/a.yaml")
    first.release()
    assert first.held == ()
    taken(chamber, "outer", config="/b.yaml")
    assert Holder.decode(claim_file(chamber, "outer").read_bytes()).config == "/b.yaml"
    assert claim_file(chamber, "outer").exists()  # never deleted: a deleted file could have two holders


def test_taking_twice_in_one_claim_is_no_conflict_with_itself(chamber, taken):
    c = taken(chamber, "both")
    c.take()  # (a start that calls both privilegedStartService and startService)
    assert c.held == ("outer", "inner")


def test_a_symlink_to_the_chamber_leads_to_the_same_claim(chamber, taken, tmp_path):
    chamber.parent.mkdir(parents=True)
    chamber.touch()
    link = tmp_path / "other-name.sqlite3"
    link.symlink_to(chamber)
    taken(chamber, "both")
    with pytest.raises(ClaimHeld):
        taken(link, "outer")


def test_a_holder_that_has_not_written_its_record_is_still_a_holder(chamber, taken):
    held = taken(chamber, "outer")
    os.ftruncate(held._held["outer"], 0)
    with pytest.raises(ClaimHeld, match="a process that has not recorded itself yet"):
        taken(chamber, "outer")


def test_the_claim_file_is_shared_with_the_group_as_the_umask_allows(chamber, taken):
    old = os.umask(0o007)  # the split lock's units (UMask=0007)
    try:
        taken(chamber, "outer")
    finally:
        os.umask(old)
    assert stat.S_IMODE(claim_file(chamber, "outer").stat().st_mode) == 0o660


def test_a_claim_file_that_cannot_be_created_is_a_clear_error(tmp_path, taken):
    (tmp_path / "not-a-directory").write_text("")
    with pytest.raises(ClaimError, match="cannot create the claim file .*not-a-directory/chamber.sqlite3.outer.lock"):
        taken(tmp_path / "not-a-directory" / "chamber.sqlite3", "both")


def test_holder_without_the_kernels_table_of_locks_says_so(chamber, taken, tmp_path):
    taken(chamber, "outer")
    with pytest.raises(ClaimError, match="cannot read the kernel's table of locks"):
        holder(chamber, "outer", locks=tmp_path / "no-such-table")


def test_an_in_memory_chamber_has_nothing_to_claim(taken):
    assert taken(":memory:", "both").held == ()


HOLD = textwrap.dedent('''
    import sys, time
    from gateway.ops.claim import Claim, Holder
    Claim(sys.argv[1], sys.argv[2], Holder.this_process(sys.argv[2], "/etc/gatewayd/held.yaml")).take()
    print("held", flush=True)
    time.sleep(120)
''')


def holding_process(chamber, gate: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(chamber), gate], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_kill_9_of_the_holder_releases_its_claim_at_once(chamber, taken):
    proc = holding_process(chamber, "both")
    try:
        with pytest.raises(ClaimHeld) as refused:
            taken(chamber, "outer")
        assert refused.value.holder.pid == proc.pid and refused.value.holder.config == "/etc/gatewayd/held.yaml"
        assert holder(chamber, "inner").pid == proc.pid  # seen without touching the lock
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    started = time.monotonic()
    taken(chamber, "both")  # no stale PID file: the kernel released the lock with the process
    assert time.monotonic() - started < 1.0


def test_holder_looks_without_taking(chamber, taken):
    assert holder(chamber, "outer") is None  # no file yet
    c = taken(chamber, "outer", config="/x.yaml")
    seen = holder(chamber, "outer")
    assert seen.config == "/x.yaml" and seen.pid == os.getpid()
    assert holder(chamber, "inner") is None
    c.release()
    assert holder(chamber, "outer") is None  # the file stays, nobody holds it
    taken(chamber, "outer")  # looking took nothing


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a process as another user (needs root)")
def test_another_users_file_names_its_holder_and_an_unwritable_one_is_a_clear_error(taken):
    """Without write access to a claim file a gate still learns who holds it; with nobody holding it, it is
    refused (it could not record itself) with what to fix, never started unrecorded."""
    import shutil
    import tempfile
    from pathlib import Path

    shared = Path(tempfile.mkdtemp(prefix="gatewayd-claim-"))  # (pytest's tmp_path is root's only)
    os.chmod(shared, 0o755)
    chamber = shared / "chamber.sqlite3"
    try:
        _another_user(chamber, taken)
    finally:
        shutil.rmtree(shared)


def _another_user(chamber, taken):
    held = taken(chamber, "outer", config="/etc/gatewayd/gateway.yaml")
    os.chmod(claim_file(chamber, "outer"), 0o644)
    code = textwrap.dedent('''
        import sys
        from gateway.ops.claim import Claim, ClaimError, ClaimHeld, Holder
        try:
            Claim(sys.argv[1], "outer", Holder.this_process("outer", "/o.yaml")).take()
        except ClaimHeld as e:
            print("held", e.holder.config)
        except ClaimError as e:
            print("error", e)
    ''')

    def as_other_user() -> str:
        out = subprocess.run(["setpriv", "--reuid=64101", "--regid=64101", "--clear-groups", sys.executable, "-c",
                              code, str(chamber)], capture_output=True, text=True, timeout=30, cwd="/",
                             env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    if not os.access(REPO, os.R_OK | os.X_OK, effective_ids=False):
        pytest.skip("the repository is not readable by another user here")
    answer = as_other_user()
    if "No module named" in answer:
        pytest.skip("the repository is not readable by another user here")
    assert answer == "held /etc/gatewayd/gateway.yaml"
    held.release()
    answer = as_other_user()
    assert answer.startswith("error cannot write the claim file") and "mode 644" in answer, answer


def test_a_demo_in_a_running_demos_workdir_says_so_and_starts_nothing(tmp_path, taken, capsys):
    """`gatewayd demo` twice in one workdir: the second would start a gateway that is refused while the first
    demo's ports answer in its place; it says which process runs the chamber instead, and starts nothing."""
    from gateway.ops import demo

    taken(tmp_path / "chamber.sqlite3", "both", config=str(tmp_path / "gateway.yaml"))
    assert demo.run_demo(tmp_path) == 3
    err = capsys.readouterr().err
    assert f"gatewayd demo: the outer gate of the chamber {tmp_path / 'chamber.sqlite3'} is already run by pid " \
           f"{os.getpid()}" in err
    assert not (tmp_path / "gateway.log").exists()  # no process was started
