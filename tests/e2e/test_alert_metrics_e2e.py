"""What the alerting rules and the Grafana dashboard (deploy/) query, read from a running gateway's /metrics:
every metric either uses exists there, every alert's metric is on the dashboard, and the metrics added for the
alerts (build_info, process_*, the queue and its oldest message as 0 rather than absent, dead letters,
certificate expiry, the chamber's file system, the audit chain, answers by status class) carry the running
gateway's truth."""

import json
from importlib import metadata
import re
import time
from pathlib import Path

import requests
import yaml
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.harness import Lock, appointment_for, free_port

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "gatewayd.rules.yml"
DASHBOARD = DEPLOY / "grafana" / "gatewayd.json"
JSON = {"Content-Type": "application/fhir+json"}
METRIC = re.compile(r"\b((?:gatewayd|process|python)_[a-zA-Z0-9_]+)\b")


def rule_metrics() -> set[str]:
    return {name for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
            for name in METRIC.findall(rule["expr"])}


def dashboard_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return {name for expr in exprs for name in METRIC.findall(expr)}


def scrape(port: int) -> dict:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_rules_and_the_dashboard_query_what_the_gateway_exports(tmp_path):
    lock = Lock(tmp_path)
    port = free_port()
    lock.gateway_config["admin"] = {"listen": f"tcp:{port}:interface=127.0.0.1"}
    lock.write_configs()
    with lock:
        m = scrape(port)
        # before any booking: the queue, its oldest message and the dead letters are 0, not absent
        assert m[("gatewayd_queue_depth", (("peer", "his"),))] == 0
        assert m[("gatewayd_queue_oldest_seconds", (("peer", "his"),))] == 0
        assert m[("gatewayd_dead_letters", (("peer", "his"),))] == 0
        assert m[("gatewayd_http_responses_total", (("class", "5xx"),))] == 0
        slots = [s["id"] for s in lock.search_slots(status="free")]
        assert lock.session().post(f"{lock.base}/Appointment", json=appointment_for(slots[0]),
                                   headers=JSON).status_code == 201
        assert lock.session().get(f"{lock.base}/Appointment/no-such-thing").status_code == 404
        m = scrape(port)
        exported = {name for name, _labels in m}

        [build] = [dict(labels) for name, labels in m if name == "gatewayd_build_info"]
        assert build["version"] == metadata.version("gatewayd") and build["commit"]
        assert m[("process_start_time_seconds", ())] > time.time() - 600
        assert m[("process_resident_memory_bytes", ())] > 1e6
        assert m[("gatewayd_http_responses_total", (("class", "2xx"),))] >= 2  # the search and the booking
        assert m[("gatewayd_http_responses_total", (("class", "4xx"),))] == 1
        assert m[("gatewayd_audit_chain_ok", ())] == 1
        assert 0 < m[("gatewayd_chamber_disk_free_bytes", ())] <= m[("gatewayd_chamber_disk_size_bytes", ())]
        server = x509.load_pem_x509_certificate((tmp_path / "certs" / "server.pem").read_bytes())
        expiry = {dict(labels)["certificate"]: value for (name, labels), value in m.items()
                  if name == "gatewayd_certificate_expiry_timestamp_seconds"}
        assert expiry["outer server"] == server.not_valid_after_utc.timestamp()
        assert "outer client CA" in expiry

    rules, dashboard = rule_metrics(), dashboard_metrics()
    assert "gatewayd_queue_oldest_seconds" in rules and "process_resident_memory_bytes" in dashboard
    assert rules - exported == set(), "the rules query metrics the gateway does not export"
    assert dashboard - exported == set(), "the dashboard queries metrics the gateway does not export"
    assert rules - dashboard == set(), "an alert's metric is not on the dashboard"
