"""Operators and the notifications owed to platforms (issue 23): ``gatewayd queue list --notifications``,
``queue retry --notification SUB/EVENT`` (only to a platform that may still receive it) and
``queue purge --dead --notifications``, on a real chamber through the command itself."""

import time

import pytest
import structlog

from gateway.chamber.engine import Chamber
from gateway.cli import main
from tests.unit.config_files import HEAD, load

PLATFORMS = """
platforms:
  - name: demo
    certificate_subject: CN=platform-demo
    notify: {endpoint: "https://hook.example/h", ca: certs/ca.pem, client_certificate: certs/platform-demo.pem,
             client_key: certs/platform-demo.key}
  - name: other
    certificate_subject: CN=platform-other
    scopes: [Slot.read]
    notify: {endpoint: "https://other.example/h", ca: certs/ca.pem, client_certificate: certs/platform-demo.pem,
             client_key: certs/platform-demo.key}
"""


@pytest.fixture
def logging_kept():
    """The command points the logs at this test's captured stderr: put back what the later tests log to."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def test_dead_notifications_are_listed_resubmitted_and_purged(config_dir, tmp_path, capsys, logging_kept):
    path = tmp_path / "c.sqlite3"
    load(config_dir, PLATFORMS, HEAD + f"chamber: {{path: {path}}}\n")
    config = str(config_dir / "g.yaml")
    week_ago = time.time() - 7 * 86400
    chamber = Chamber(path, clock=lambda: week_ago)
    chamber.open()
    for sub, platform in (("s1", "demo"), ("s2", "other")):
        def work(tx, sub=sub, platform=platform):
            tx.add_subscription(id=sub, platform=platform, topic="appointment-status", payload="id-only")
            tx.add_notification(sub, platform=platform, focus="Appointment/a1", what="cancelled")
            tx.set_notification_state(sub, 1, "dead", attempts=9, next_attempt=tx.now, last_error="answered 503")
        chamber.transact_now(work)
    chamber.close()

    assert main(["queue", "list", "--notifications", "--state", "dead", "--config", config]) == 0
    listed = capsys.readouterr().out
    assert "s1/1" in listed and "s2/1" in listed and "answered 503" in listed

    assert main(["queue", "retry", "--notification", "s1/1", "--config", config]) == 0
    assert "resubmitted" in capsys.readouterr().out
    assert main(["queue", "retry", "--notification", "s2/1", "--config", config]) == 1  # other: no Appointment.read
    assert "may no longer receive it" in capsys.readouterr().err
    assert main(["queue", "retry", "--notification", "s1/x", "--config", config]) == 2

    assert main(["queue", "purge", "--dead", "--notifications", "--older-than", "1d", "--yes",
                 "--config", config]) == 0
    assert "deleted 1 dead-lettered notification(s)" in capsys.readouterr().out
    chamber = Chamber(path, clock=time.time)
    chamber.open()
    try:
        reader = chamber.read()
        assert reader.notification("s1", 1).state == "pending" and reader.notification("s1", 1).attempts == 0
        assert "resubmitted by operator" in reader.notification("s1", 1).last_error
        assert reader.notification("s2", 1) is None
    finally:
        chamber.close()
