"""The alerting rules that come with the gateway (deploy/prometheus/gatewayd.rules.yml): valid for Prometheus
(`promtool check rules`) and doing what they say (`promtool test rules` on gatewayd.rules.test.yml beside them).

promtool comes with Debian's ``prometheus`` package, which .ci/run installs; outside CI a machine without it
skips these tests, under CI (``CI=true``) its absence fails them."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "gatewayd.rules.yml"
RULES_TEST = RULES.with_name("gatewayd.rules.test.yml")


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing under CI: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return found


def run(*args: str, cwd: Path = RULES.parent) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_promtool_checks_the_rules():
    result = run("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 9 rules found" in result.stdout


def test_promtool_tests_the_rules():
    result = run("test", "rules", RULES_TEST.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested():
    """An alert without a test of its own could fire on nothing (or never)."""
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    tested = {case["alertname"] for t in yaml.safe_load(RULES_TEST.read_text())["tests"]
              for case in t.get("alert_rule_test", [])}
    assert alerts == {"GatewaydDown", "GatewaydHisDown", "GatewaydQueueStuck", "GatewaydDeadLetters",
                      "GatewaydNotificationsDead", "GatewaydCertificateExpiring", "GatewaydDiskNearlyFull",
                      "GatewaydAuditChainBroken", "GatewaydHttp5xx"}
    assert alerts == tested


def test_a_wrong_expectation_fails(tmp_path):
    """promtool's tests can fail: the same test with the HIS alert expected one evaluation early does not pass."""
    shutil.copy(RULES, tmp_path / RULES.name)
    broken = RULES_TEST.read_text().replace("      - eval_time: 2m\n        alertname: GatewaydHisDown\n"
                                            "        exp_alerts: []\n", "", 1)
    broken = broken.replace("      - eval_time: 4m\n        alertname: GatewaydHisDown",
                            "      - eval_time: 3m\n        alertname: GatewaydHisDown", 1)
    assert broken != RULES_TEST.read_text()
    (tmp_path / RULES_TEST.name).write_text(broken)
    result = run("test", "rules", RULES_TEST.name, cwd=tmp_path)
    assert result.returncode != 0 and "GatewaydHisDown" in result.stdout + result.stderr
