"""Only the message types the config allows cross the lock, in each direction; the rest is refused at the
gate and recorded."""

import subprocess
import sys
import time

from adapters.hl7.er7 import parse
from gateway.chamber.engine import Chamber
from tests.e2e.harness import REPO, Lock, appointment_for, eventually
from tests.e2e.harness import mllp_exchange

JSON = {"Content-Type": "application/fhir+json"}


def test_whitelists_in_both_directions(tmp_path):
    """accept_types without S26: an SIU^S26 gets AR (ERR 201) and is kept as refused; send_types without
    SRM^S04: a cancellation is dead-lettered with the reason and never reaches the HIS."""
    lock = Lock(tmp_path)
    lock.gateway_config["inner"]["accept_types"] = ["SIU^S12", "SIU^S13", "SIU^S14", "SIU^S15", "SIU^S17",
                                                    "SIU^S23", "SIU^S24"]
    lock.gateway_config["inner"]["his"]["send_types"] = ["SRM^S01"]
    lock.write_configs()
    with lock:
        siu = ("MSH|^~\\&|HIS|HOSPITAL|GATEWAYD|FRONT|20301010120000||SIU^S26^SIU_S12|NOSHOW-1|P|2.5\r"
               "SCH|||||D001^x||||15|MIN|^^15^203010100800^203010100815|||||||||||||Noshow\r"
               "RGS|1\rAIS|1||x^y|203010100800|||15|MIN\r").encode()
        ack = parse(mllp_exchange(lock.mllp_port, siu))
        assert (ack.segment("MSA").get(1), ack.segment("ERR").get(3)) == ("AR", "201")
        chamber = Chamber(lock.workdir / "chamber.sqlite3", clock=time.time)
        chamber.open()
        try:
            refused = chamber.read().message_by_control_id("inbound", "his", "NOSHOW-1", "HIS|HOSPITAL")
            assert refused.state == "refused"
        finally:
            chamber.close()

        slot_id = lock.search_slots(status="free")[0]["id"]
        s = lock.session()
        booked = s.post(f"{lock.base}/Appointment", json=appointment_for(slot_id), headers=JSON)
        assert booked.status_code == 201
        url = f"{lock.base}/Appointment/{booked.json()['id']}"  # (Location names the version booked)
        cancel = s.patch(url, json=[{"op": "replace", "path": "/status", "value": "cancelled"}],
                         headers={"Content-Type": "application/json-patch+json"})
        assert cancel.status_code in (202, 409)
        appt = eventually(lambda: (a := s.get(url).json()).get("comment") and a,
                          what="the cancellation to settle")
        assert appt["status"] == "booked" and "may not cross" in appt["comment"]
        assert not any(m["type"].startswith("SRM^S04") for m in lock.received())
        dead = subprocess.run([sys.executable, "-m", "gateway", "queue", "list", "--state", "dead", "--config",
                               "gateway.yaml"], cwd=lock.workdir, capture_output=True, text=True,
                              env={"PYTHONPATH": str(REPO)})
        assert "SRM^S04" in dead.stdout
