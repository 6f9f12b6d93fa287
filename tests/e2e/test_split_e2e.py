"""The ship lock for real, first part: the two gates as two processes that share nothing but the chamber.

The outer process's config has no 'inner' section (it does not know where the HIS is), the inner one's has
no 'outer' section; a booking crosses anyway — through the chamber file only — and the outer gate keeps
answering while the inner process is down.
"""

import copy
import subprocess
import sys
import time

import pytest
import yaml

from tests.e2e.harness import REPO, Lock, Proc, appointment_for, eventually
from tests.faults.process import kill9

JSON = {"Content-Type": "application/fhir+json"}


class SplitLock(Lock):
    def write_configs(self) -> None:
        super().write_configs()
        outer = copy.deepcopy(self.gateway_config)
        outer.pop("inner")
        inner = copy.deepcopy(self.gateway_config)
        for key in ("outer", "platforms", "audit"):
            inner.pop(key, None)
        for name, data in (("gateway-outer.yaml", outer), ("gateway-inner.yaml", inner)):
            (self.workdir / name).write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")

    def start_gateway(self) -> None:
        self.inner = Proc("gateway-inner", ["run", "--gate", "inner", "--config", "gateway-inner.yaml"],
                          self.workdir)
        self.gateway = Proc("gateway-outer", ["run", "--gate", "outer", "--config", "gateway-outer.yaml"],
                            self.workdir)
        eventually(lambda: self.session().get(f"{self.base}/metadata", timeout=2).status_code == 200,
                   timeout=20, what="the outer gate")

    def stop(self) -> None:
        super().stop()
        if getattr(self, "inner", None) is not None:
            self.inner.stop()


@pytest.fixture
def split(tmp_path):
    lock = SplitLock(tmp_path)
    with lock:
        yield lock


def test_a_booking_crosses_between_two_processes_through_the_chamber_only(split):
    """Slots published to the inner process are served by the outer one; a booking made at the outer one is
    encoded and delivered by the inner one; the platform gets 201 — the processes share only the file."""
    outer_cfg = yaml.safe_load((split.workdir / "gateway-outer.yaml").read_text())
    assert "inner" not in outer_cfg and str(split.his_port) not in (split.workdir / "gateway-outer.yaml").read_text()
    slot_id = split.search_slots(status="free")[0]["id"]
    started = time.monotonic()
    r = split.session().post(f"{split.base}/Appointment", json=appointment_for(slot_id), headers=JSON)
    elapsed = time.monotonic() - started
    assert r.status_code == 201, r.text
    print(f"\nsplit-mode booking round trip: {elapsed * 1000:.1f} ms")
    srm = [m for m in split.received() if m["type"] == "SRM^S01"]
    assert [m["placer"] for m in srm] == [r.json()["id"]]


def test_outer_gate_keeps_answering_while_the_inner_process_is_down(split):
    """SIGKILL the inner process: slot searches still work and a booking is answered 202 pending; once the
    inner process is back, the chamber drains and the booking completes."""
    slots = [s["id"] for s in split.search_slots(status="free")]
    kill9(split.inner.popen)
    assert len(split.search_slots(status="free")) == len(slots)
    r = split.session().post(f"{split.base}/Appointment", json=appointment_for(slots[0]), headers=JSON)
    assert r.status_code == 202 and r.json()["status"] == "pending"
    split.inner = Proc("gateway-inner", ["run", "--gate", "inner", "--config", "gateway-inner.yaml"], split.workdir)
    eventually(lambda: split.session().get(r.headers["Location"]).json()["status"] == "booked", timeout=20,
               what="the booking to complete once the inner gate is back")


def test_each_gate_refuses_a_config_that_reaches_the_other_side(tmp_path):
    """The outer (internet) process refuses a config naming the HIS; the inner one refuses an internet
    listener."""
    lock = Lock(tmp_path)  # writes one config with both sections
    for gate, words in (("outer", "must not contain the 'inner' section"),
                        ("inner", "must not contain 'outer' or 'platforms'")):
        run = subprocess.run([sys.executable, "-m", "gateway", "run", "--gate", gate, "--config", "gateway.yaml"],
                             cwd=lock.workdir, capture_output=True, text=True, env={"PYTHONPATH": str(REPO)},
                             timeout=30)
        assert run.returncode == 1 and words in run.stderr, (gate, run.stderr)
