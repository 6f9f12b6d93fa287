"""The admin listener: /metrics parsed with prometheus-client's own parser, /healthz telling why."""

import signal

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from gateway.config.model import AdminConfig
from gateway.config.errors import ConfigError
from gateway.config.schema import load_text
from tests.e2e.harness import Lock, appointment_for, eventually, free_port

JSON = {"Content-Type": "application/fhir+json"}


def scrape(port):
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_and_health(tmp_path):
    lock = Lock(tmp_path)
    port = free_port()
    lock.gateway_config["admin"] = {"listen": f"tcp:{port}:interface=127.0.0.1"}
    lock.gateway_config["inner"]["his"].update(ack_timeout="500ms", retry_initial="200ms", retry_max="500ms")
    lock.gateway_config["outer"]["answer_within"] = "1s"
    lock.write_configs()
    with lock:
        slots = [s["id"] for s in lock.search_slots(status="free")]
        r = lock.session().post(f"{lock.base}/Appointment", json=appointment_for(slots[0]), headers=JSON)
        assert r.status_code == 201
        m = scrape(port)
        assert m[("gatewayd_messages", (("direction", "outbound"), ("peer", "his"), ("state", "delivered")))] == 1
        assert m[("gatewayd_messages", (("direction", "inbound"), ("peer", "his"), ("state", "delivered")))] >= lock.slot_count
        assert m[("gatewayd_his_answers_total", (("code", "AA"), ("peer", "his")))] == 1
        assert m[("gatewayd_delivery_seconds_count", (("peer", "his"),))] == 1
        assert m[("gatewayd_hl7_answers_total", (("outcome", "accepted"),))] >= lock.slot_count
        assert m[("gatewayd_http_answers_total", (("status", "201"),))] == 1
        on_disk = sum(f.stat().st_size for f in tmp_path.glob("chamber.sqlite3*"))
        assert 0 < m[("gatewayd_chamber_bytes", ())] <= on_disk * 2
        import shutil

        free = shutil.disk_usage(tmp_path).free
        assert abs(m[("gatewayd_chamber_disk_free_bytes", ())] - free) < max(free * 0.05, 50e6)
        assert m[("gatewayd_chamber_pruned_total", (("kind", "credentials"),))] == 0  # the run at start
        health = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert health.status_code == 200 and health.json()["status"] == "ok"

        lock.sim.popen.send_signal(signal.SIGSTOP)
        try:
            assert lock.session().post(f"{lock.base}/Appointment", json=appointment_for(slots[1]),
                                       headers=JSON).status_code == 202
            sick = eventually(lambda: (h := requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5))
                              .status_code == 503 and h.json(), what="/healthz to report the silent HIS")
            assert sick["chamber"] == "ok" and "AckTimeout" in sick["his"]["his"]["last_error"]
            assert scrape(port)[("gatewayd_queue_depth", (("peer", "his"),))] == 1
        finally:
            lock.sim.popen.send_signal(signal.SIGCONT)
        eventually(lambda: requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200,
                   timeout=20, what="/healthz to recover once the HIS answers")


def test_admin_listener_must_be_loopback(tmp_path):
    with pytest.raises(ConfigError, match="loopback"):
        load_text("listen: tcp:9102:interface=0.0.0.0\n", AdminConfig, filename="g.yaml", base_dir=tmp_path)
