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
