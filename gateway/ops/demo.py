"""``gatewayd demo``: the whole lock on loopback, with the bundled HIS simulator as the hospital.

Writes DIR/gateway.yaml and DIR/his-sim.yaml from the examples, a development CA and certificates into
DIR/certs/, starts the HIS simulator and the gateway as two processes (two parties, as in a hospital),
waits until both listen, and prints the FHIR base URL and a curl command that books a slot.  Ctrl-C
stops both.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from gateway.ops.claim import CLAIM_HELD_EXIT, ClaimError, ClaimHeld, claim_file, holder

REPO_CONFIG = Path(__file__).resolve().parents[2] / "config"
FHIR_PORT, MLLP_PORT, HIS_PORT = 8443, 2575, 2576


def example(name: str) -> str:
    """The example config text (from the source tree, or the installed share/ copy)."""
    for base in (REPO_CONFIG, Path(sys.prefix) / "share" / "gatewayd" / "config"):
        path = base / name
        if path.exists():
            return path.read_text(encoding="utf-8")
    raise FileNotFoundError(f"cannot find the example config {name}")


def prepare(workdir: Path) -> dict[str, Path]:
    """Write certificates and both configs into ``workdir``; returns their paths."""
    from gateway.ops.devca import init_dev_ca

    workdir.mkdir(parents=True, exist_ok=True)
    certs = init_dev_ca(workdir / "certs", platforms=("demo",))
    gateway_yaml = workdir / "gateway.yaml"
    if not gateway_yaml.exists():
        gateway_yaml.write_text(example("gateway.example.yaml"), encoding="utf-8")
    sim_yaml = workdir / "his-sim.yaml"
    if not sim_yaml.exists():
        sim_yaml.write_text(example("his-sim.example.yaml"), encoding="utf-8")
    return {"gateway": gateway_yaml, "his_sim": sim_yaml, **certs}


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def curl_command(workdir: Path, base: str) -> str:
    c = workdir / "certs"
    tls = f"--cacert {c / 'ca.pem'} --cert {c / 'platform-demo.pem'} --key {c / 'platform-demo.key'}"
    booking = ('{"resourceType":"Appointment","status":"proposed","slot":[{"reference":"Slot/SLOT_ID"}],'
               '"contained":[{"resourceType":"Patient","id":"p","identifier":[{"system":"urn:demo:mrn",'
               '"value":"MRN-0001"}],"name":[{"family":"Wang","given":["Fang"]}]}],'
               '"participant":[{"actor":{"reference":"#p"},"status":"needs-action"}]}')
    # free slots from now on (the shell fills in the time when the command runs): a free slot that has already
    # started cannot be booked (409)
    return (f"curl -s {tls} '{base}/Slot?status=free&_count=3&start=ge'$(date -u +%Y-%m-%dT%H:%M:%SZ)\n"
            f"curl -s {tls} -H 'Content-Type: application/fhir+json' -X POST {base}/Appointment \\\n"
            f"     -d '{booking}'")


def _chamber_taken(chamber: Path) -> ClaimHeld | None:
    """A demo already running in this workdir (its gateway holds the chamber's claim): said before anything
    starts — the new gateway would be refused, and the old demo's ports would answer in its place."""
    for role in ("outer", "inner"):
        try:
            held = holder(chamber, role)
        except ClaimError:  # (no /proc/locks: the gateway's own claim still refuses it, less clearly)
            held = None
        if held is not None:
            return ClaimHeld(role, str(chamber), claim_file(chamber, role), held)
    return None


def run_demo(workdir: Path) -> int:
    workdir = workdir.resolve()
    paths = prepare(workdir)
    gw_cfg = yaml.safe_load(paths["gateway"].read_text(encoding="utf-8"))
    host, port = gw_cfg["outer"].get("host", "127.0.0.1"), gw_cfg["outer"].get("port", FHIR_PORT)
    base = f"https://{host}:{port}{gw_cfg['outer'].get('base_path', '/fhir')}"
    refused = _chamber_taken(workdir / (gw_cfg.get("chamber") or {}).get("path", "chamber.sqlite3"))
    if refused is not None:
        print(f"gatewayd demo: {refused}", file=sys.stderr)
        return CLAIM_HELD_EXIT
    source_root = str(Path(__file__).resolve().parents[2])  # works from a checkout or an install
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (source_root, os.environ.get("PYTHONPATH")) if p))
    logs = {name: open(workdir / f"{name}.log", "ab") for name in ("his-sim", "gateway")}
    procs: list[subprocess.Popen] = []

    def stop(*_):
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()

    try:
        # the HIS first, as in a hospital: the gateway's HIS probe then finds it up at once (started the other
        # way round, the probe saw it down and a booking in the first second was answered 202, not 201)
        procs.append(subprocess.Popen([sys.executable, "-m", "gateway", "his-sim", "--config",
                                       str(paths["his_sim"])],
                                      cwd=workdir, stdout=logs["his-sim"], stderr=subprocess.STDOUT, env=env))
        if not wait_for_port("127.0.0.1", HIS_PORT, 20, procs[0]):
            print(f"the HIS simulator did not start; see {workdir / 'his-sim.log'}", file=sys.stderr)
            stop()
            return 1
        procs.append(subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config", str(paths["gateway"])],
                                      cwd=workdir, stdout=logs["gateway"], stderr=subprocess.STDOUT, env=env))
        if not wait_for_port(host, port, 20, procs[1]):
            print(f"the gateway did not start; see {workdir / 'gateway.log'}", file=sys.stderr)
            stop()
            return 1
        print(f"""
gatewayd demo is running (Ctrl-C stops it).

  FHIR base (outer gate, mutual TLS):  {base}
  MLLP listener (inner gate):          127.0.0.1:{MLLP_PORT}
  HIS simulator:                       127.0.0.1:{HIS_PORT}, received log {workdir / 'his-received.jsonl'}
  logs:                                {workdir / 'gateway.log'}, {workdir / 'his-sim.log'}

Find free slots, then book one (replace SLOT_ID with an id from the first answer):

{curl_command(workdir, base)}
""", flush=True)
        # Ctrl-C and SIGTERM stop the demo, even when it was started with SIGINT ignored (a background job of
        # a non-interactive shell: Python then installs no KeyboardInterrupt handler of its own).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        print("a demo process exited; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping the demo ...", flush=True)
        return 0
    finally:
        stop()
        for f in logs.values():
            f.close()
