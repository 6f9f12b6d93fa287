"""What the hospital grants platforms, in the YAML: scopes, quotas, rate limits, revoked serials, audit
retention — defaults, and every mistake reported with file:line:key."""

from gateway.config.outer import SCOPES
from tests.unit.config_files import load, problems


def test_defaults_grant_everything_but_limit_the_rate(config_dir):
    """A platform with only a name and a subject has every scope, no quota, 100 req/s (burst 200); the
    gateway as a whole 1000 req/s (burst 2000); audit records are kept 180 days."""
    config = load(config_dir, "platforms: [{name: demo, certificate_subject: CN=platform-demo}]\n")
    p = config.platforms[0]
    assert p.scopes == list(SCOPES) and p.quotas == [] and p.revoked_serials == []
    assert (p.rate_limit.per_second, p.rate_limit.burst) == (100.0, 200)
    assert (config.outer.rate_limit.per_second, config.outer.rate_limit.burst) == (1000.0, 2000)
    assert config.audit.retention == 180 * 86400
    assert (config.outer.max_json_depth, config.outer.max_string_chars) == (32, 65536)


def test_a_full_grant_is_read(config_dir):
    config = load(config_dir, """
platforms:
  - name: regnet
    certificate_subject: CN=regnet
    scopes: [Slot.read, Appointment.write]
    quotas:
      - {schedule: "*", share: 5%}
      - {schedule: D001, per_day: 3, release_before: ~}
    rate_limit: ~
    revoked_serials: ["0x1A2B", "1a:2b:3c"]
audit: {retention: 365d}
""")
    p = config.platforms[0]
    assert p.scopes == ["Slot.read", "Appointment.write"]
    assert [(q.schedule, q.share, q.per_day, q.release_before) for q in p.quotas] == [
        ("*", 0.05, None, 86400.0), ("D001", None, 3, None)]
    assert p.rate_limit is None
    assert p.revoked_serial_numbers() == {0x1A2B, 0x1A2B3C}
    assert config.audit.retention == 365 * 86400


def test_mistakes_are_each_reported_with_line_and_key(config_dir):
    found = problems(config_dir, """platforms:
  - name: regnet
    certificate_subject: CN=regnet
    scopes: [Slot.read, Appointment.writ]
    quotas:
      - {schedule: D001, per_day: 3, share: 5%}
      - {schedule: D002}
      - {schedule: D003, share: 150%}
    revoked_serials: [zz]
    rate_limit: {per_second: 0, burst: 10}
audit: {retention: 2h}
""")
    text = "\n".join(found)
    assert "platforms[0].scopes[1]: expected one of" in text and "did you mean 'Appointment.write'" in text
    assert "platforms[0].quotas[1]: give either share (e.g. 5%) or per_day" in text
    assert "platforms[0].quotas[2].share: must be between 0% and 100%" in text
    assert "platforms[0].revoked_serials[0]: expected a certificate serial number in hexadecimal" in text
    assert "platforms[0].rate_limit.per_second: must be between" in text
    assert "audit.retention: must be at least 1d" in text


def test_a_schedule_with_two_quotas_is_refused(config_dir):
    found = problems(config_dir, """platforms:
  - name: regnet
    certificate_subject: CN=regnet
    quotas: [{schedule: D001, per_day: 1}, {schedule: D001, share: 5%}]
""")
    assert any("platforms[0].quotas[1].schedule: schedule 'D001' has a quota already" in f for f in found)


NOTIFY = """
platforms:
  - name: demo
    certificate_subject: CN=platform-demo
    notify:
      endpoint: {endpoint}
      ca: certs/ca.pem
      client_certificate: certs/platform-demo.pem
      client_key: {key}
      retry_first: {retry_first}
"""


def test_a_platforms_notification_endpoint_is_read(config_dir):
    """platforms[].notify (issue 23): the webhook, its CA, the gateway's client certificate and the retry policy."""
    config = load(config_dir, NOTIFY.format(endpoint="https://hooks.demo.example/h", key="certs/platform-demo.key",
                                            retry_first="2s"))
    n = config.platforms[0].notify
    assert (n.endpoint, n.retry_first, n.retry_max, n.give_up_after, n.max_subscriptions) == (
        "https://hooks.demo.example/h", 2.0, 300.0, 86400.0, 10)


def test_notify_mistakes_are_each_reported_with_line_and_key(config_dir):
    found = problems(config_dir, NOTIFY.format(endpoint="http://hooks.demo.example/h?x=1",
                                               key="certs/platform-demo.key", retry_first="1s"))
    assert found == ["10:platforms[0].notify.endpoint: expected an https:// URL without query or fragment, e.g. "
                     "https://platform.example/fhir-hook, got 'http://hooks.demo.example/h?x=1'"]
    found = problems(config_dir, NOTIFY.format(endpoint="https://hooks.demo.example/h", key="certs/server.key",
                                               retry_first="1h") + "      retry_max: 1m\n")
    assert len(found) == 2, found
    assert found[0].startswith("13:platforms[0].notify.client_key: ") and "does not belong" in found[0], found
    assert found[1].startswith("15:platforms[0].notify.retry_max: must not be shorter"), found
