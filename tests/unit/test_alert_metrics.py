"""The metrics the alerting rules (deploy/prometheus/gatewayd.rules.yml) need, read from the admin listener's
/metrics text as Prometheus would (prometheus-client's parser): build_info, process_*, the queue and its oldest
message (0, not absent), dead letters, certificate expiry, the chamber's file system, the audit chain's verdict,
the outer gate's answers by status class. The same names are read from a running gateway in
tests/e2e/test_alert_metrics_e2e.py."""

from __future__ import annotations

import datetime as dt
import sqlite3

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs
from twisted.internet import defer, task

from gateway.chamber.engine import Chamber
from gateway.domain.audit import AuditEntry, AuditTrail
from gateway.ops.admin import AuditChainWatch, Metrics

NOW = 1_900_000_000.0


def samples(metrics: Metrics) -> dict:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def chamber(tmp_path):
    chamber = Chamber(tmp_path / "c.sqlite3", clock=lambda: NOW)
    chamber.open()
    yield chamber
    chamber.close()


def add(chamber, peer, control_id, state, created):
    chamber.transact_now(lambda tx: tx.add_message(direction="outbound", peer=peer, control_id=control_id,
                                                   type="SRM^S01", state=state, body=b"MSH|", charset="utf-8"))
    chamber._conn.execute("UPDATE messages SET created = ? WHERE control_id = ?", (created, control_id))
    chamber._conn.commit()


def test_queue_oldest_and_dead_letters_are_zero_for_every_endpoint_before_any_message(chamber):
    m = samples(Metrics(chamber, peers=["his", "pharmacy"]))
    for peer in ("his", "pharmacy"):
        assert m[("gatewayd_queue_depth", (("peer", peer),))] == 0
        assert m[("gatewayd_queue_oldest_seconds", (("peer", peer),))] == 0
        assert m[("gatewayd_dead_letters", (("peer", peer),))] == 0


def test_queue_oldest_waiting_message_and_dead_letters_per_endpoint(chamber):
    add(chamber, "his", "G1", "retrying", NOW - 600)
    add(chamber, "his", "G2", "committed", NOW - 20)
    add(chamber, "his", "G3", "dead", NOW - 7200)
    add(chamber, "his", "G4", "delivered", NOW - 9000)  # answered: neither waiting nor dead
    add(chamber, "lab", "G5", "dead", NOW - 60)  # an endpoint the config no longer names is still reported
    m = samples(Metrics(chamber, peers=["his", "pharmacy"]))
    assert m[("gatewayd_queue_depth", (("peer", "his"),))] == 2
    assert m[("gatewayd_queue_oldest_seconds", (("peer", "his"),))] == 600
    assert m[("gatewayd_dead_letters", (("peer", "his"),))] == 1
    assert m[("gatewayd_dead_letters", (("peer", "lab"),))] == 1
    assert m[("gatewayd_queue_depth", (("peer", "pharmacy"),))] == 0
    assert m[("gatewayd_queue_oldest_seconds", (("peer", "pharmacy"),))] == 0


def test_notifications_are_zero_for_every_platform_and_state_before_any(chamber):
    names = ["demo", "other"]
    metrics = Metrics(chamber, platforms=lambda: names)
    m = samples(metrics)
    assert {(dict(k[1])["platform"], dict(k[1])["state"]): v for k, v in m.items()
            if k[0] == "gatewayd_notifications"} == {(p, s): 0 for p in names for s in ("pending", "delivered", "dead")}
    names.append("third")  # a platform a reload added is reported from the next scrape
    assert samples(metrics)[("gatewayd_notifications", (("platform", "third"), ("state", "dead")))] == 0


def test_build_info_process_and_disk(chamber):
    m = samples(Metrics(chamber))
    [(version, commit)] = [(dict(k[1])["version"], dict(k[1])["commit"]) for k in m if k[0] == "gatewayd_build_info"]
    assert version and commit and m[("gatewayd_build_info", (("commit", commit), ("version", version)))] == 1
    assert m[("process_resident_memory_bytes", ())] > 0
    assert m[("process_start_time_seconds", ())] > 0
    assert any(k[0] == "python_info" for k in m)
    size, free = m[("gatewayd_chamber_disk_size_bytes", ())], m[("gatewayd_chamber_disk_free_bytes", ())]
    assert 0 < free <= size


def cert_pem(days_left: float) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
    end = dt.datetime.fromtimestamp(NOW, dt.timezone.utc) + dt.timedelta(days=days_left)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(end - dt.timedelta(days=400)).not_valid_after(end)
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


def test_certificate_expiry_is_read_at_each_scrape(chamber, tmp_path):
    server, ca = tmp_path / "server.pem", tmp_path / "ca.pem"
    server.write_bytes(cert_pem(400) + cert_pem(12))  # the earliest expiry in the file counts
    ca.write_bytes(cert_pem(100))
    files = [("outer server", server), ("outer client CA", ca), ("MLLP to his: CA", tmp_path / "missing.pem")]
    metrics = Metrics(chamber, certificates=lambda: files)
    m = samples(metrics)
    key = ("gatewayd_certificate_expiry_timestamp_seconds", (("certificate", "outer server"), ("path", str(server))))
    assert m[key] == pytest.approx(NOW + 12 * 86400, abs=1)
    assert m[("gatewayd_certificate_expiry_timestamp_seconds", (("certificate", "outer client CA"),
                                                                ("path", str(ca))))] == pytest.approx(NOW + 100 * 86400, abs=1)
    assert not any(k[0] == "gatewayd_certificate_expiry_timestamp_seconds" and ("certificate", "MLLP to his: CA")
                   in k[1] for k in m)
    server.write_bytes(cert_pem(300))  # renewed: the next scrape shows it
    assert samples(metrics)[key] == pytest.approx(NOW + 300 * 86400, abs=1)


def test_http_answers_by_status_class_are_there_from_the_start(chamber):
    metrics = Metrics(chamber)
    m = samples(metrics)
    for status_class in ("2xx", "3xx", "4xx", "5xx"):
        assert m[("gatewayd_http_responses_total", (("class", status_class),))] == 0
    for status in (201, 200, 404, 503, 503):
        metrics.http_answered(status)
    m = samples(metrics)
    assert [m[("gatewayd_http_responses_total", (("class", c),))] for c in ("2xx", "3xx", "4xx", "5xx")] == [2, 0, 1, 2]
    assert m[("gatewayd_http_answers_total", (("status", "503"),))] == 2


def in_thread_here(f, *args):
    """deferToThread's contract, run at once in this thread (the e2e test runs the real thread)."""
    return defer.maybeDeferred(f, *args)


def test_audit_chain_status_turns_zero_when_a_record_is_changed(chamber, tmp_path):
    trail = AuditTrail(chamber)
    for i in range(3):
        trail.record(AuditEntry(action="read", outcome=200, platform="demo", subject="CN=platform-demo",
                                serial="1F", source="127.0.0.1", resource_type="Appointment", resource_id=f"a{i}"))
    clock, metrics = task.Clock(), Metrics(chamber)
    clock.advance(1000)
    watch = AuditChainWatch(chamber, clock, metrics.audit_chain, every=300, in_thread=in_thread_here)
    assert ("gatewayd_audit_chain_ok", ()) not in samples(metrics)  # not walked yet: absent, not a guess
    with capture_logs() as logs:
        watch.startService()  # the first walk at start
        m = samples(metrics)
        assert (m[("gatewayd_audit_chain_ok", ())], m[("gatewayd_audit_chain_verified_timestamp_seconds", ())]) == (1, 1000)
        conn = sqlite3.connect(tmp_path / "c.sqlite3")  # an intruder with the file
        conn.execute("DROP TRIGGER audit_records_are_not_changed")
        conn.execute("UPDATE audit_records SET outcome = 403 WHERE seq = 2")
        conn.commit()
        conn.close()
        clock.advance(299)  # not walked again yet: the last verdict stands
        assert samples(metrics)[("gatewayd_audit_chain_ok", ())] == 1
        clock.advance(1)
        m = samples(metrics)
        assert (m[("gatewayd_audit_chain_ok", ())], m[("gatewayd_audit_chain_verified_timestamp_seconds", ())]) == (0, 1300)
        clock.advance(300)  # still broken: logged once
        watch.stopService()
    broken = [e for e in logs if e["event"] == "audit.chain_broken"]
    assert len(broken) == 1 and broken[0]["broken_at"] == 2 and broken[0]["log_level"] == "error"


def test_an_empty_audit_trail_verifies(chamber):
    metrics = Metrics(chamber)
    AuditChainWatch(chamber, task.Clock(), metrics.audit_chain, in_thread=in_thread_here).run_once()
    assert samples(metrics)[("gatewayd_audit_chain_ok", ())] == 1


def test_a_chamber_that_cannot_be_read_leaves_the_verdict_absent(tmp_path):
    chamber = Chamber(tmp_path / "c.sqlite3", clock=lambda: NOW)
    chamber.open()
    chamber.close()
    (tmp_path / "c.sqlite3").unlink()
    metrics = Metrics(chamber)
    with capture_logs() as logs:
        AuditChainWatch(chamber, task.Clock(), metrics.audit_chain, in_thread=in_thread_here).run_once()
    assert ("gatewayd_audit_chain_ok", ()) not in samples(metrics)
    assert [e["event"] for e in logs] == ["audit.chain_not_walked"]
