"""`gatewayd status` (gateway/ops/status.py): what it reads from a chamber (read-only), from the running
gateway's admin listener (here a stand-in answer: the listener itself is tested in tests/e2e/test_his_probe_e2e.py)
and from the certificate files, and how it says what it cannot know."""

from __future__ import annotations

import datetime as dt
import io
import json
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.chamber.engine import Chamber
from gateway.ops.status import gather, render, status_command
from tests.unit.config_files import load

NOW = 1_900_000_000.0


def config_with(config_dir, tmp_path, extra: str = ""):
    head = f"""
chamber: {{path: {tmp_path / 'c.sqlite3'}}}
admin: {{listen: "tcp:19102:interface=127.0.0.1"}}
inner: {{his: {{host: 127.0.0.1, port: 2576}}, endpoints: [{{name: pharmacy, host: 127.0.0.1, port: 2577, receiving_application: PHARMACY}}]}}
outer:
  tls: {{certificate: certs/server.pem, private_key: certs/server.key, client_ca: certs/ca.pem}}
platforms: [{{name: demo, certificate_subject: CN=platform-demo}}]
"""
    return load(config_dir, extra, head=head)


def fill(tmp_path):
    """A chamber with traffic: 2 SIUs in (one a minute ago, one 30 min ago), 3 SRMs out waiting (oldest 10 min),
    one dead; the probe recorded the pharmacy down 5 min ago."""
    chamber = Chamber(tmp_path / "c.sqlite3", clock=lambda: NOW)
    chamber.open()
    rows = [("inbound", "his", "S1", "SIU^S12", "delivered", NOW - 30), ("inbound", "his", "S2", "SIU^S12",
            "delivered", NOW - 1800), ("outbound", "his", "G1", "SRM^S01", "retrying", NOW - 600),
            ("outbound", "his", "G2", "SRM^S01", "committed", NOW - 20), ("outbound", "his", "G3", "SRM^S01",
            "sending", NOW - 10), ("outbound", "his", "G4", "SRM^S01", "dead", NOW - 7200)]
    for direction, peer, control_id, type_, state, created in rows:
        chamber.transact_now(lambda tx, a=(direction, peer, control_id, type_, state): tx.add_message(
            direction=a[0], peer=a[1], control_id=a[2], type=a[3], state=a[4], body=b"MSH|", charset="utf-8"))
        chamber._conn.execute("UPDATE messages SET created = ? WHERE control_id = ?", (created, control_id))
    chamber._conn.commit()
    chamber.transact_now(lambda tx: tx.set_his_link("pharmacy", False, NOW - 300, "no connection: refused"))
    chamber.close()


def test_beside_a_running_gateway_live_state_and_chamber_counts(config_dir, tmp_path):
    config = config_with(config_dir, tmp_path)
    fill(tmp_path)
    before = os.stat(tmp_path / "c.sqlite3").st_mtime_ns
    live = {"gate": "both", "started": NOW - 7200, "version": "1.2", "last_reload": {
        "at": NOW - 60, "outcome": "applied", "applied": ["platforms"]},
        "health": {"his": {"his": {"reachable": True, "answering": True, "probe": {
            "up": True, "since": NOW - 3600, "checked": NOW - 5, "last_error": None}}}}}
    status = gather(config, now=NOW, ask=lambda url: live)
    assert os.stat(tmp_path / "c.sqlite3").st_mtime_ns == before  # read-only
    assert status["gateway"]["running"] is True and status["gateway"]["admin"] == "http://127.0.0.1:19102"
    assert status["gates"] == {"outer": {"configured": True, "up": True, "run_by": None},
                               "inner": {"configured": True, "up": True, "run_by": None}}  # (no claims here)
    his = status["his"]["his"]
    assert (his["in_last_minute"], his["in_last_hour"], his["out_last_minute"], his["out_last_hour"]) == (1, 2, 2, 3)
    assert (his["queue"], his["oldest_waiting_seconds"], his["dead"]) == (3, 600, 1)
    assert his["link"]["up"] is True and his["link"]["source"] == "live"
    pharmacy = status["his"]["pharmacy"]["link"]
    assert (pharmacy["up"], pharmacy["since"], pharmacy["detail"]) == (False, NOW - 300, "no connection: refused")
    assert pharmacy["source"] == "recorded by the probe"
    assert status["chamber"]["schema_version"] >= 7 and status["chamber"]["bytes"] > 0
    assert [c["name"] for c in status["certificates"]] == ["outer server", "outer client CA"]
    text = render(status, colour=False)
    assert "gateway   RUNNING  gate both, up 2.0h" in text
    assert "config: reloaded 1.0m ago: platforms" in text
    assert "HIS his          UP since 1.0h (live)" in text
    assert "in 1/min 2/h, out 2/min 3/h, queue 3, oldest 10.0m, dead letters 1" in text
    assert "HIS pharmacy     DOWN since 5.0m (recorded by the probe): no connection: refused" in text
    assert "\x1b[" not in text
    assert "\x1b[31mDOWN\x1b[0m" in render(status, colour=True)


def test_without_a_running_gateway_it_says_so_and_shows_what_the_chamber_recorded(config_dir, tmp_path):
    config = config_with(config_dir, tmp_path)
    fill(tmp_path)

    def nobody(url):
        raise OSError("connection refused")

    status = gather(config, now=NOW, ask=nobody)
    assert status["gateway"]["running"] is False and "not running" in status["gateway"]["detail"]
    assert status["gates"]["outer"]["up"] is False
    assert status["his"]["his"]["link"] == {"up": None, "source": "unknown",
                                            "detail": "not checked (no probe has recorded it)"}
    assert "may be stale" in status["his"]["pharmacy"]["link"]["source"]
    out = io.StringIO()
    assert status_command(config, as_json=True, stream=out) == 1  # not running: not healthy, for scripts
    assert json.loads(out.getvalue())["gateway"]["running"] is False


def test_a_certificate_near_its_end_is_a_warning_and_an_expired_one_fails(config_dir, tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "his-ca")])

    def cert(days_left: float) -> bytes:
        end = dt.datetime.fromtimestamp(NOW, dt.timezone.utc) + dt.timedelta(days=days_left)
        c = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
             .serial_number(1).not_valid_before(end - dt.timedelta(days=400)).not_valid_after(end)
             .sign(key, hashes.SHA256()))
        return c.public_bytes(serialization.Encoding.PEM)

    (config_dir / "certs" / "his-ca.pem").write_bytes(cert(400) + cert(12))  # the earliest expiry counts
    config = load(config_dir, "", head=f"""
chamber: {{path: {tmp_path / 'c.sqlite3'}}}
inner: {{his: {{host: 127.0.0.1, port: 2576, tls: {{ca: certs/his-ca.pem}}}}}}
""")
    status = gather(config, now=NOW, ask=lambda url: {})
    [his_ca] = status["certificates"]
    assert (his_ca["name"], his_ca["days_left"], his_ca["state"]) == ("MLLP to his: CA", 12.0, "warn")
    # no admin listener, and nobody holds a claim on the chamber: not running
    assert status["gateway"]["running"] is False and "no process holds a gate's claim" in status["gateway"]["detail"]
    assert "inner gate: not running" in render(status, colour=False)
    assert "12 days left" in render(status, colour=False)
    (config_dir / "certs" / "his-ca.pem").write_bytes(cert(-1))
    assert gather(config, now=NOW, ask=lambda url: {})["certificates"][0]["state"] == "expired"


def test_without_an_admin_listener_the_claims_say_who_runs_the_gates(config_dir, tmp_path):
    """A gateway without admin.listen: its claim on the chamber (gateway/ops/claim.py) says it runs, and which
    process; the live state is said to be unknown."""
    from gateway.ops.claim import Claim, Holder

    config = load(config_dir, "", head=f"""
chamber: {{path: {tmp_path / 'c.sqlite3'}}}
inner: {{his: {{host: 127.0.0.1, port: 2576}}}}
""")
    claim = Claim(config.chamber.path, "inner", Holder.this_process("inner", tmp_path / "g.yaml"))
    claim.take()
    try:
        status = gather(config, now=NOW, ask=lambda url: {})
        assert status["gateway"]["running"] is True and status["gates"]["inner"]["up"] is True
        text = render(status, colour=False)
        assert f"inner gate: run by pid {os.getpid()} (gate inner" in text
        assert "live state unknown: no admin listener configured" in text
    finally:
        claim.release()
    assert gather(config, now=NOW, ask=lambda url: {})["gateway"]["running"] is False

