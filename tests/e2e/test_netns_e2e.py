"""The ship lock, proven apart by the kernel: three network namespaces (internet, front, intranet), two veth
pairs, no IP forwarding on the front server.

The outer gate runs in "front" bound to its internet-side address, the inner gate in "front" bound to its
intranet-side address (two processes, sharing only the chamber file), the HIS simulator (with its pharmacy,
a second HIS endpoint) in "intranet", a FHIR client in "internet". A booking and a signed prescription go
through, and the pharmacy's dispensing comes back out; a TCP connection from "internet" to the HIS, its
pharmacy or the inner gate does not. Each gate listens with ``bind_device`` on its own NIC: without it Linux's weak host model
delivers a packet for the inner gate's (intranet) address arriving on the internet NIC to the inner gate —
this test failed exactly so before ``bind_device`` existed. Needs root (CI runs as root); skipped with the
reason where namespaces cannot be created.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

from gateway.ops.devca import init_dev_ca
from tests.e2e.harness import REPO, Lock, eventually, read_jsonl
from tests.e2e.rxpki import PRESCRIBER_SCOPES, RxPki, golden_bundle, signed_bundle

INTERNET_NET, INTRANET_NET = "10.250.1", "10.250.2"
OUTER_ADDR, INNER_ADDR, HIS_ADDR, CLIENT_ADDR = (f"{INTERNET_NET}.2", f"{INTRANET_NET}.2", f"{INTRANET_NET}.1",
                                                 f"{INTERNET_NET}.1")


def unavailable(reason: str) -> None:
    """Skip on a developer's machine without the means; in CI (root, packages installed by .ci/run) the
    isolation must be proven, so it fails instead."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the isolation tests: {reason}")
    pytest.skip(reason)


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check)


class Namespaces:
    def __init__(self):
        tag = str(os.getpid() % 100000)
        self.inet, self.front, self.intra = f"gwi{tag}", f"gwf{tag}", f"gwn{tag}"
        self.tag = tag

    def __enter__(self):
        try:
            for ns in (self.inet, self.front, self.intra):
                sh("ip", "netns", "add", ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            t = self.tag
            sh("ip", "link", "add", f"vi{t}", "type", "veth", "peer", "name", f"vf{t}")
            sh("ip", "link", "add", f"vn{t}", "type", "veth", "peer", "name", f"vg{t}")
            for dev, ns, addr in ((f"vi{t}", self.inet, CLIENT_ADDR), (f"vf{t}", self.front, OUTER_ADDR),
                                  (f"vg{t}", self.front, INNER_ADDR), (f"vn{t}", self.intra, HIS_ADDR)):
                sh("ip", "link", "set", dev, "netns", ns)
                sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                sh("ip", "-n", ns, "link", "set", dev, "up")
            # The front server forwards nothing; the outside even gets a route towards the intranet through
            # it, so only the missing forwarding stops a packet.
            sh("ip", "netns", "exec", self.front, "sysctl", "-qw", "net.ipv4.ip_forward=0")
            sh("ip", "-n", self.inet, "route", "add", f"{INTRANET_NET}.0/24", "via", OUTER_ADDR)
        except (subprocess.CalledProcessError, FileNotFoundError) as e:
            self.__exit__()
            detail = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) else str(e)
            unavailable(f"network namespaces cannot be created here (needs root and iproute2): {detail}")
        return self

    def __exit__(self, *exc):
        for ns in (self.inet, self.front, self.intra):
            sh("ip", "netns", "del", ns, check=False)  # its veth ends go with it

    def popen(self, ns: str, args: list[str], cwd, log_name: str) -> subprocess.Popen:
        log = open(cwd / log_name, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
        return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, *args], cwd=cwd, env=env,
                                stdout=log, stderr=subprocess.STDOUT)

    def wait_for_port(self, ns: str, host: str, port: int, cwd, seconds: float = 60) -> None:
        """Until something in namespace ``ns`` accepts TCP on host:port (a gate that listens is up)."""
        code = textwrap.dedent(f'''
            import json, socket, time
            deadline = time.monotonic() + {seconds}
            while True:
                try:
                    socket.create_connection(({host!r}, {port}), timeout=1).close()
                    print(json.dumps(True)); break
                except OSError:
                    if time.monotonic() > deadline:
                        print(json.dumps(False)); break
                    time.sleep(0.05)
        ''')
        assert self.run_python(ns, code, cwd), f"nothing listens on {host}:{port} in {ns} after {seconds} s"

    def run_python(self, ns: str, code: str, cwd) -> dict:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], cwd=cwd, env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])


CLIENT = textwrap.dedent('''
    import json, socket, time, requests
    from tests.e2e.harness import appointment_for
    base, certs = {base!r}, {certs!r}
    s = requests.Session(); s.trust_env = False
    s.cert = (certs + "/platform-demo.pem", certs + "/platform-demo.key"); s.verify = certs + "/ca.pem"
    slots, deadline = [], time.monotonic() + 60
    while not slots and time.monotonic() < deadline:
        try:
            slots = s.get(base + "/Slot", params={{"status": "free", "_count": 5}}, timeout=3).json().get("entry", [])
        except requests.RequestException:
            pass
        if not slots:
            time.sleep(0.1)
    if not slots:
        print(json.dumps({{"slots": 0}}))
        raise SystemExit(0)
    fhir_json = {{"Content-Type": "application/fhir+json"}}
    r = s.post(base + "/Appointment", json=appointment_for(slots[0]["resource"]["id"]), headers=fhir_json,
               timeout=15)
    with open({prescription!r}, encoding="utf-8") as f:
        rx = s.post(base, data=f.read().encode(), headers=fhir_json, timeout=15)
    items = [e["resource"]["id"] for e in rx.json().get("entry", [])] if rx.status_code == 200 else []
    dispensed, deadline = [], time.monotonic() + 30
    while items and not dispensed and time.monotonic() < deadline:
        dispensed = s.get(base + "/MedicationDispense", params={{"prescription": items[0]}},
                          timeout=5).json().get("entry", [])
        if not dispensed:
            time.sleep(0.1)
    reach = {{}}
    for name, addr in (("his", ({his!r}, 2576)), ("pharmacy", ({his!r}, 2577)), ("inner_gate", ({inner!r}, 2575))):
        try:
            socket.create_connection(addr, timeout=3).close()
            reach[name] = "connected"
        except OSError as e:
            reach[name] = type(e).__name__ + ": " + str(e)
    print(json.dumps({{"slots": len(slots), "status": r.status_code, "appointment": r.json().get("id"),
                      "prescription": rx.status_code, "items": items, "dispensed": len(dispensed),
                      "reach": reach}}))
''')


def test_the_lock_holds_across_network_namespaces(tmp_path):
    with Namespaces() as ns:
        init_dev_ca(tmp_path / "certs", platforms=("demo",), server_names=("localhost", OUTER_ADDR))
        pki = RxPki(tmp_path / "rx")
        lock = Lock(tmp_path, platforms=("demo",), doctors=1, days=1)  # only for its configs
        sim = dict(lock.sim_config, retry_initial="200ms", retry_max="1s", listen=f"tcp:2576:interface={HIS_ADDR}",
                   gateway={"host": INNER_ADDR, "port": 2575},
                   pharmacy={"listen": f"tcp:2577:interface={HIS_ADDR}", "dispense_delay": "200ms"})
        both = copy.deepcopy(lock.gateway_config)  # what both gates share: routes and the pharmacy profile
        both["routes"] = [{"types": ["RDE^O11", "OMP^O09"], "to": "pharmacy"}]
        both["pharmacy"] = {"drug_codes": [{"system": "http://www.whocc.no/atc", "code": "M01AE01",
                                            "his_code": "Y0002"}]}
        outer = copy.deepcopy(both)
        outer.pop("inner")
        outer["outer"].update(host=OUTER_ADDR, port=8443, bind_device=f"vf{ns.tag}")
        outer["platforms"][0]["scopes"] = ["Schedule.read", "Appointment.read", "Appointment.write",
                                           *PRESCRIBER_SCOPES]
        outer["prescriptions"] = {"prescriber_cas": [str(tmp_path / "rx" / "prescriber-ca.pem")],
                                  "release_key": str(tmp_path / "rx" / "release.key"),
                                  "release_chain": str(tmp_path / "rx" / "release.pem")}
        inner = copy.deepcopy(both)
        for key in ("outer", "platforms", "audit"):
            inner.pop(key, None)
        inner["inner"].update(listen=f"tcp:2575:interface={INNER_ADDR}", bind_device=f"vg{ns.tag}",
                              accept_types=["SIU^*", "RDS^O13", "RDE^O11"])
        inner["inner"]["his"].update(host=HIS_ADDR, port=2576)
        inner["inner"]["endpoints"] = [{"name": "pharmacy", "host": HIS_ADDR, "port": 2577,
                                        "receiving_application": "HIS-PHARMACY",
                                        "send_types": ["RDE^O11", "OMP^O09"], "ack_timeout": "3s",
                                        "retry_initial": "200ms", "retry_max": "2s"}]
        prescription = tmp_path / "prescription.json"
        prescription.write_text(json.dumps(signed_bundle(golden_bundle(), pki.key, pki.chain), ensure_ascii=False),
                                encoding="utf-8")
        for name, data in (("his-sim.yaml", sim), ("outer.yaml", outer), ("inner.yaml", inner)):
            (tmp_path / name).write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
        procs = [
            ns.popen(ns.front, ["-m", "gateway", "run", "--gate", "inner", "--config", "inner.yaml"], tmp_path,
                     "inner.log"),
            ns.popen(ns.front, ["-m", "gateway", "run", "--gate", "outer", "--config", "outer.yaml"], tmp_path,
                     "outer.log"),
        ]
        # The simulator pushes its slot book as soon as it starts, backing off while the gate is not yet up;
        # start it once the inner gate listens, so a slow start (CI) does not stretch the backoff.
        ns.wait_for_port(ns.front, INNER_ADDR, 2575, tmp_path)
        procs.append(ns.popen(ns.intra, ["-m", "gateway", "his-sim", "--config", "his-sim.yaml"], tmp_path,
                              "his-sim.log"))
        # the inner gate's HIS probe found the HIS down at its start (the HIS comes after it here): until it sees
        # both endpoints up, a booking would be answered 202 at once (the chamber's his_links tells the outer gate)
        lock.wait_his_up(inner["inner"]["his"].get("name", "his"), "pharmacy")
        try:
            result = ns.run_python(ns.inet, CLIENT.format(base=f"https://{OUTER_ADDR}:8443/fhir",
                                                          certs=str(tmp_path / "certs"), his=HIS_ADDR,
                                                          inner=INNER_ADDR, prescription=str(prescription)),
                                 tmp_path)
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
        assert result["slots"] > 0, "\n".join(f"--- {name}\n" + (tmp_path / name).read_text()[-1500:]
                                               for name in ("outer.log", "inner.log", "his-sim.log"))
        assert result["status"] == 201, result
        received = read_jsonl(tmp_path / "his-received.jsonl")
        assert [m["placer"] for m in received if m["type"] == "SRM^S01"] == [result["appointment"]]
        assert result["prescription"] == 200 and len(result["items"]) == 3, result
        assert [m["placers"] for m in received if m["type"].startswith("RDE")] == [result["items"]]
        assert result["dispensed"] >= 1, result  # the pharmacy's RDS^O13 came back out through the lock
        for target in ("his", "pharmacy", "inner_gate"):
            assert result["reach"][target] != "connected", result["reach"]


OUTER_UID, INNER_UID = 64101, 64102  # the two gates' users (numeric: no account is needed for the test)

NFT_RULES = f"""
table inet gatewayd {{
  chain output {{
    type filter hook output priority 0; policy accept;
    ip daddr {HIS_ADDR} tcp dport 2576 meta skuid != {INNER_UID} reject with tcp reset
    meta skuid {OUTER_UID} ct state new reject
  }}
}}
"""

CONNECT = textwrap.dedent('''
    import json, socket
    try:
        socket.create_connection(({his!r}, 2576), timeout=3).close()
        print(json.dumps("connected"))
    except OSError as e:
        print(json.dumps(type(e).__name__ + ": " + str(e)))
''')


def test_only_the_inner_gates_user_can_reach_the_his(tmp_path):
    """In "front", nftables rules by socket owner (meta skuid): only the inner gate's user may open
    connections to the HIS, and the outer gate's user may open none at all (it only accepts). Code running as
    the outer user is refused even though the route exists; the same code as the inner user connects."""
    if subprocess.run(["which", "nft"], capture_output=True).returncode != 0:
        unavailable("nftables (nft) is not installed; .ci/run installs it")
    with Namespaces() as ns:
        listener = ns.popen(ns.intra, ["-c", textwrap.dedent(f'''
            import socket, time
            s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("{HIS_ADDR}", 2576)); s.listen(8)
            end = time.time() + 60
            while time.time() < end:
                c, _ = s.accept(); c.close()
        ''')], tmp_path, "his.log")
        try:
            rules = tmp_path / "rules.nft"
            rules.write_text(NFT_RULES)
            sh("ip", "netns", "exec", ns.front, "nft", "-f", str(rules))
            time.sleep(0.3)

            def connect_as(uid: int) -> str:
                out = subprocess.run(["ip", "netns", "exec", ns.front, "setpriv", f"--reuid={uid}",
                                      f"--regid={uid}", "--clear-groups", sys.executable, "-c",
                                      CONNECT.format(his=HIS_ADDR)], capture_output=True, text=True, timeout=30,
                                     cwd="/")
                assert out.returncode == 0, out.stderr
                return json.loads(out.stdout)

            assert connect_as(INNER_UID) == "connected"
            refused = connect_as(OUTER_UID)
            assert refused != "connected" and ("refused" in refused.lower() or "Connection" in refused), refused
            assert connect_as(64999) != "connected"  # nor any other user
        finally:
            listener.kill()
            listener.wait()
