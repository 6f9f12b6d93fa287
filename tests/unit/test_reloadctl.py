"""`gatewayd reload` (gateway/ops/reloadctl.py) against real claims on a chamber (taken here, as a running
gateway takes them): which process is signalled, and the outcome read from /status — applied (exit 0), refused
(exit 1), unknown without an admin listener or an answer (exit 2)."""

import os
import signal

from gateway.ops.claim import Claim, Holder
from gateway.ops.reloadctl import APPLIED, REFUSED, UNKNOWN, reload_command
from tests.unit.config_files import load


def _config(config_dir, tmp_path, admin=True):
    head = f"""
chamber: {{path: {tmp_path / 'c.sqlite3'}}}
{'admin: {listen: "tcp:19102:interface=127.0.0.1"}' if admin else ''}
inner: {{his: {{host: 127.0.0.1, port: 2576}}}}
outer:
  tls: {{certificate: certs/server.pem, private_key: certs/server.key, client_ca: certs/ca.pem}}
platforms: [{{name: demo, certificate_subject: CN=platform-demo}}]
"""
    return load(config_dir, "", head=head), config_dir / "g.yaml"


class FakeGateway:
    """The admin listener's /status: last_reload changes once SIGHUP is 'received'."""

    def __init__(self, outcome):
        self.outcome, self.signals, self.asked = outcome, [], []

    def kill(self, pid, sig):
        self.signals.append((pid, sig))

    def ask(self, url):
        self.asked.append(url)
        return {"last_reload": self.outcome if self.signals else None}


def _run(config, path, gateway, **kw):
    lines = []
    code = reload_command(config, path, out=lines.append, ask=gateway.ask, kill=gateway.kill, sleep=lambda _: None,
                          **kw)
    return code, lines


def test_signals_the_holder_of_this_config_and_prints_what_it_applied(config_dir, tmp_path):
    config, path = _config(config_dir, tmp_path)
    claim = Claim(config.chamber.path, "both", Holder.this_process("both", path))
    claim.take()
    try:
        applied = FakeGateway({"at": 5.0, "outcome": "applied",
                               "applied": ["platforms (1)", "needs a restart: outer.answer_within"]})
        code, lines = _run(config, path, applied)
        assert code == APPLIED and applied.signals == [(os.getpid(), signal.SIGHUP)]
        assert lines[0].startswith(f"sent SIGHUP to pid {os.getpid()} (gate both, running since ")
        assert lines[1:] == ["reloaded: applied platforms (1)",
                             "changed but not applied until a restart: outer.answer_within"]
        assert applied.asked[0] == "http://127.0.0.1:19102"

        refused = FakeGateway({"at": 6.0, "outcome": "refused", "errors": ["g.yaml:3:1: outer.x: unknown key"]})
        code, lines = _run(config, path, refused)
        assert code == REFUSED and lines[1:] == ["reload REFUSED: the gateway keeps its running config",
                                                 "  g.yaml:3:1: outer.x: unknown key"]

        silent = FakeGateway(None)  # the gateway never reports: the wait ends
        ticks = iter(range(100))
        code, lines = _run(config, path, silent, wait=3, clock=lambda: next(ticks))
        assert code == UNKNOWN and "did not report the reload within 3s" in lines[-1]

        config, path = _config(config_dir, tmp_path, admin=False)  # (the same file, now without admin)
        blind = FakeGateway({"at": 7.0, "outcome": "applied", "applied": []})
        code, lines = _run(config, path, blind)
        assert code == UNKNOWN and blind.signals and not blind.asked
        assert "no admin listener" in lines[-1] and "gateway.reload_refused" in lines[-1]
    finally:
        claim.release()


def test_nothing_is_signalled_without_a_gateway_running_this_config(config_dir, tmp_path):
    config, path = _config(config_dir, tmp_path)
    nobody = FakeGateway(None)
    code, lines = _run(config, path, nobody)
    assert code == REFUSED and not nobody.signals and lines == [
        f"gatewayd reload: no gateway runs with {path} on the chamber {config.chamber.path}"]
    other = Claim(config.chamber.path, "inner", Holder.this_process("inner", tmp_path / "inner.yaml"))
    other.take()
    try:
        code, lines = _run(config, path, nobody)
        assert code == REFUSED and not nobody.signals
        assert f"it is run by pid {os.getpid()} (gate inner, config {tmp_path / 'inner.yaml'}" in lines[0]
    finally:
        other.release()
