"""SIGHUP: a changed config takes effect without a restart (a revoked certificate is refused), and a broken
one is refused with its file:line:key while the running config stays."""

import json
import signal

from cryptography import x509

from tests.e2e.harness import Lock, eventually


def test_sighup_revokes_and_a_broken_config_keeps_the_old_one(tmp_path):
    lock = Lock(tmp_path)
    with lock:
        s_demo, s_other = lock.session("demo"), lock.session("other")
        assert s_demo.get(f"{lock.base}/Slot", params={"_count": 1}).status_code == 200
        pid = lock.gateway.popen.pid

        serial = x509.load_pem_x509_certificate((lock.certs / "platform-demo.pem").read_bytes()).serial_number
        lock.gateway_config["platforms"][0]["revoked_serials"] = [format(serial, "X")]
        lock.write_configs()
        lock.gateway.popen.send_signal(signal.SIGHUP)
        eventually(lambda: s_demo.get(f"{lock.base}/Slot", params={"_count": 1}).status_code == 403,
                   what="the revoked certificate to be refused after SIGHUP")
        assert s_other.get(f"{lock.base}/Slot", params={"_count": 1}).status_code == 200
        assert lock.gateway.popen.pid == pid and lock.gateway.alive()

        def reloads():
            return [e for e in map(json.loads, (line for line in lock.gateway.log_path.read_text().splitlines()
                                                if line.startswith("{"))) if e["event"] == "gateway.reloaded"]

        assert not [a for a in reloads()[-1]["applied"] if "restart" in a]  # a revocation: applied, nothing else
        # what a reload does not apply is named, key by key (it is not silently ignored)
        lock.gateway_config["outer"]["answer_within"] = "7s"
        lock.gateway_config["inner"]["his"]["ack_timeout"] = "4s"
        lock.write_configs()
        lock.gateway.popen.send_signal(signal.SIGHUP)
        applied = eventually(lambda: reloads()[1:], what="the second reload")[0]["applied"]
        assert [a for a in applied if "restart" in a] == ["needs a restart: inner.his.ack_timeout",
                                                          "needs a restart: outer.answer_within"], applied

        config = (lock.workdir / "gateway.yaml").read_text()
        (lock.workdir / "gateway.yaml").write_text(config.replace("answer_within", "answer_witin"))
        lock.gateway.popen.send_signal(signal.SIGHUP)

        def refused():
            events = [json.loads(line) for line in lock.gateway.log_path.read_text().splitlines()
                      if line.startswith("{")]
            return [e for e in events if e["event"] == "gateway.reload_refused"]

        refusal = eventually(refused, what="the broken config to be refused")[0]
        assert any("answer_witin" in err and "gateway.yaml:" in err for err in refusal["errors"])
        assert s_other.get(f"{lock.base}/Slot", params={"_count": 1}).status_code == 200  # still serving
        assert s_demo.get(f"{lock.base}/Slot", params={"_count": 1}).status_code == 403  # the running config


def test_sighup_takes_a_new_server_certificate_for_new_connections(tmp_path):
    """A renewed server certificate (new files, same names) is served to new connections after SIGHUP,
    without a restart."""
    import socket
    import ssl

    lock = Lock(tmp_path)
    with lock:
        def served_serial() -> int:
            ctx = ssl.create_default_context(cafile=str(lock.certs / "ca.pem"))
            ctx.load_cert_chain(*lock.cert("demo"))
            with socket.create_connection(("127.0.0.1", lock.fhir_port), timeout=5) as raw:
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                    return x509.load_der_x509_certificate(s.getpeercert(binary_form=True)).serial_number

        before = served_serial()
        new_serial = lock.renew_server_certificate()
        assert new_serial != before
        eventually(lambda: served_serial() == new_serial, what="the renewed certificate to be served")


def test_gatewayd_reload_prints_what_the_gateway_did(tmp_path):
    """`gatewayd reload --config PATH` finds the gateway through the chamber's claims, sends it SIGHUP and prints
    its outcome (from the admin listener's /status): what it applied and what needs a restart (exit 0), or why it
    refused (exit 1).  A config that does not load is refused with its file:line:key and nothing is signalled;
    a config no running gateway uses is refused, naming the one that runs."""
    import shutil
    import subprocess
    import sys

    from tests.e2e.harness import REPO, free_port

    def gatewayd(*args):
        return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=tmp_path, capture_output=True,
                              text=True, env={"PYTHONPATH": str(REPO)}, timeout=60)

    def reload_events():
        return [e for e in map(json.loads, (line for line in lock.gateway.log_path.read_text().splitlines()
                                            if line.startswith("{")))
                if e["event"] in ("gateway.reloaded", "gateway.reload_refused")]

    lock = Lock(tmp_path)
    lock.gateway_config["admin"] = {"listen": f"tcp:{free_port()}:interface=127.0.0.1"}
    lock.write_configs()
    with lock:
        pid = lock.gateway.popen.pid
        s_demo = lock.session("demo")
        serial = x509.load_pem_x509_certificate((lock.certs / "platform-demo.pem").read_bytes()).serial_number
        lock.gateway_config["platforms"][0]["revoked_serials"] = [format(serial, "X")]
        lock.gateway_config["outer"]["answer_within"] = "7s"
        lock.write_configs()
        done = gatewayd("reload", "--config", "gateway.yaml")
        assert done.returncode == 0, done.stdout + done.stderr
        lines = done.stdout.splitlines()
        assert lines[0].startswith(f"sent SIGHUP to pid {pid} (gate both, running since ")
        assert lines[1].startswith("reloaded: applied logging.level=info, outer.tls, platforms (2)")
        assert lines[2] == "changed but not applied until a restart: outer.answer_within"
        assert s_demo.get(f"{lock.base}/Slot", params={"_count": 1}).status_code == 403  # it was applied
        assert len(reload_events()) == 1

        config = (tmp_path / "gateway.yaml").read_text()
        (tmp_path / "gateway.yaml").write_text(config.replace("answer_within", "answer_witin"))
        broken = gatewayd("reload", "--config", "gateway.yaml")
        assert broken.returncode == 1
        assert "gateway.yaml:" in broken.stderr and "answer_witin" in broken.stderr
        assert "nothing was signalled" in broken.stderr and "sent SIGHUP" not in broken.stdout
        (tmp_path / "gateway.yaml").write_text(config)

        shutil.copy(lock.certs / "server.pem", tmp_path / "server.pem.good")
        (lock.certs / "server.pem").write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n"
                                               "-----END CERTIFICATE-----\n")
        refused = gatewayd("reload", "--config", "gateway.yaml")
        shutil.copy(tmp_path / "server.pem.good", lock.certs / "server.pem")
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert refused.stdout.splitlines()[0].startswith(f"sent SIGHUP to pid {pid}")
        assert "reload REFUSED: the gateway keeps its running config" in refused.stdout
        assert reload_events()[-1]["event"] == "gateway.reload_refused"
        assert refused.stdout.splitlines()[-1].strip() in reload_events()[-1]["errors"]

        shutil.copy(tmp_path / "gateway.yaml", tmp_path / "other.yaml")
        other = gatewayd("reload", "--config", "other.yaml")
        assert other.returncode == 1 and f"it is run by pid {pid}" in other.stdout and "gateway.yaml" in other.stdout
        assert len(reload_events()) == 2 and lock.gateway.alive() and lock.gateway.popen.pid == pid
        assert lock.session("other").get(f"{lock.base}/Slot", params={"_count": 1}).status_code == 200
