"""What every benchmark here needs: the machine's description, processes on loopback ports, the shared
load driver, per-process CPU and memory from /proc, configs for gatewayd and the HIS simulator.

Benchmarks are not tests: nothing here asserts; figures are printed and written to bench/results/.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import inspect
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
RESULTS = BENCH / "results"
DRIVER = REPO.parent / "shared" / "tools" / "mllp_load.py"
PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# -------------------------------------------------------------------------------------------- the machine


def machine() -> dict:
    """nproc, CPU model, memory, Python, OS, date, load average and the checkout being measured."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    if not model:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
            model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, StopIteration):
        mem_kb = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines()
                          if ln.startswith("MemTotal")).split()[1])
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        if dirty:
            commit += " (with uncommitted changes)"
    versions = {}
    for dist in ("Twisted", "hl7", "hl7apy", "txHL7", "structlog", "fhir.resources"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[dist] = version(dist)
    gcc = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        gcc = subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": model or platform.processor() or "unknown",
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "os": f"{platform.system()} {platform.release()}",
        "sqlite": __import__("sqlite3").sqlite_version,
        "gcc": gcc,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "commit": commit,
        "versions": versions,
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ------------------------------------------------------------------------------------------------ numbers


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def spread(values) -> str:
    """'min-max' of a list of figures, for the noise column."""
    values = [v for v in values if v is not None]
    if not values:
        return ""
    return f"{fmt(min(values))}-{fmt(max(values))}"


def fmt(value, digits: int = 3) -> str:
    """A figure with about ``digits`` significant digits, thousands separated: 1,234 / 12.3 / 0.123."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if value >= 1000:
        return f"{value:,.0f}"
    if value == 0:
        return "0"
    from math import floor, log10

    decimals = max(0, digits - 1 - int(floor(log10(abs(value)))))
    return f"{value:,.{decimals}f}"


def percentile(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of already sorted values (the shared driver's rule)."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))]


# ---------------------------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30.0, proc: "Proc | None" = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}) before listening:\n{proc.log_tail()}")
        with contextlib.suppress(OSError):
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s"
                       + (f":\n{proc.log_tail()}" if proc is not None else ""))


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (its threads included); 0.0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Proc:
    """A process we started (and only we stop, by its own pid), its log, CPU time and resident memory."""

    def __init__(self, name: str, args: list[str], workdir: Path, env: dict | None = None):
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
        full_env.pop("PYTHONDONTWRITEBYTECODE", None)  # bytecode caches make start-up faster, not the run
        full_env.update(env or {})
        self.popen = subprocess.Popen(args, cwd=workdir, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
        return ""

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process so far (its threads included)."""
        return process_cpu_seconds(self.pid)

    def rss_mb(self) -> float:
        try:
            pages = int(Path(f"/proc/{self.pid}/statm").read_text().split()[1])
        except (OSError, ValueError, IndexError):
            return 0.0
        return pages * PAGE / 1024 / 1024

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()
        return self.popen.returncode


class CpuMeter:
    """CPU seconds used by some processes between start() and stop()."""

    def __init__(self, procs: dict[str, Proc]):
        self.procs = procs

    def start(self):
        self.t0 = time.perf_counter()
        self.c0 = {k: p.cpu_seconds() for k, p in self.procs.items()}
        return self

    def stop(self) -> dict:
        wall = time.perf_counter() - self.t0
        used = {k: p.cpu_seconds() - self.c0[k] for k, p in self.procs.items()}
        return {"wall_s": round(wall, 3), **{f"{k}_cpu_s": round(v, 3) for k, v in used.items()},
                **{f"{k}_cpu_pct": round(100 * v / wall, 1) if wall else None for k, v in used.items()}}


# ------------------------------------------------------------------------------------------ the MLLP driver


def run_driver(port: int, n_per_conn: int, conns: int, *, reconnect: bool = False, timeout: float = 600) -> dict:
    """The shared independent driver (../shared/tools/mllp_load.py) against 127.0.0.1:port."""
    args = [PY, str(DRIVER), "--port", str(port), "-n", str(n_per_conn), "--conns", str(conns)]
    if reconnect:
        args.append("--reconnect")
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"driver failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout)


def driver_module():
    """The shared driver as a module (its make_msg builds the very messages it sends)."""
    spec = importlib.util.spec_from_file_location("mllp_load", DRIVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_ack_matching(port: int, count: int = 20, *, reconnect: bool = False, tag: str = "V") -> dict:
    """The shared driver counts ACK codes but does not compare MSA-2 with MSH-10: send ``count`` of its
    messages with fresh control ids (``<tag><n>``) and check that every ACK's MSA-2 is the id we sent."""
    drv = driver_module()
    matched, codes = 0, {}
    sock = None
    try:
        for i in range(count):
            control_id = f"{tag}{os.getpid()}x{time.monotonic_ns() % 10**9}x{i}"
            body = drv.make_msg(i, 0).decode("utf-8").split("\r")
            msh = body[0].split("|")
            msh[9] = control_id
            body[0] = "|".join(msh)
            payload = b"\x0b" + "\r".join(body).encode("utf-8") + b"\x1c\x0d"
            if sock is None or reconnect:
                if sock is not None:
                    sock.close()
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(payload)
            buf = b""
            while b"\x1c\x0d" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("peer closed before answering")
                buf += chunk
            frame = buf.split(b"\x1c\x0d", 1)[0].lstrip(b"\x0b").decode("utf-8", "replace")
            msa = next((s.split("|") for s in frame.replace("\n", "\r").split("\r") if s.startswith("MSA|")), None)
            code = msa[1] if msa and len(msa) > 1 else "??"
            codes[code] = codes.get(code, 0) + 1
            if msa and len(msa) > 2 and msa[2] == control_id:
                matched += 1
    finally:
        if sock is not None:
            sock.close()
    return {"sent": count, "msa2_matched": matched, "codes": codes}


# ----------------------------------------------------------------------------------------------- the lock


class Certs:
    """One development CA for a whole bench run (server certificate + the 'bench' platform's client)."""

    def __init__(self, directory: Path):
        from gateway.ops.devca import init_dev_ca

        self.dir = directory
        init_dev_ca(directory, platforms=("bench",))
        self.ca = directory / "ca.pem"
        self.server, self.server_key = directory / "server.pem", directory / "server.key"
        self.client, self.client_key = directory / "platform-bench.pem", directory / "platform-bench.key"


def gateway_config(workdir: Path, certs: Certs, *, mllp_port: int, his_port: int, fhir_port: int,
                   ordering: str = "fifo", window: int = 1, log_level: str = "warning",
                   answer_within: str = "5s", max_backlog: int = 100000, page_size: int = 1000,
                   chamber: dict | None = None) -> Path:
    his = {"host": "127.0.0.1", "port": his_port, "ack_timeout": "5s", "retry_initial": "200ms",
           "retry_max": "2s", "ordering": ordering, "window": window}
    config = {
        "hospital": {"name": "Bench Hospital", "timezone": "Asia/Shanghai"},
        "chamber": chamber or {"path": "chamber.sqlite3"},  # (chamber: another backend's section, docs/chamber.md)
        "inner": {"listen": f"tcp:{mllp_port}:interface=127.0.0.1", "max_connections": 256, "his": his},
        "outer": {"host": "127.0.0.1", "port": fhir_port, "answer_within": answer_within, "page_size": page_size,
                  "tls": {"certificate": str(certs.server), "private_key": str(certs.server_key),
                          "client_ca": str(certs.ca)}},
        "platforms": [{"name": "bench", "certificate_subject": "CN=platform-bench"}],
        "logging": {"level": log_level, "format": "json"},
    }
    # The backlog limit (503 past it) moved from inner.his to outer; set it where this checkout has it.
    for section, cls_name in ((config["outer"], "OuterConfig"), (his, "HisConfig")):
        if _config_has(cls_name, "max_backlog"):
            section["max_backlog"] = max_backlog
            break
    # Rate limits (outer.rate_limit, platforms[].rate_limit: 1000/s and 100/s by default) would turn a load
    # test into a test of the limiter: lifted here, where this checkout has them.
    for section, key, cls_name in ((config["outer"], "rate_limit", "OuterConfig"),
                                   (config["platforms"][0], "rate_limit", "PlatformConfig")):
        if _config_has(cls_name, key):
            section[key] = None
    path = workdir / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    # For the split lock (`gatewayd run --gate outer|inner`): each process's config names only its side.
    outer = {k: v for k, v in config.items() if k != "inner"}
    inner = {k: v for k, v in config.items() if k not in ("outer", "platforms")}
    (workdir / "gateway-outer.yaml").write_text(yaml.safe_dump(outer, allow_unicode=True), encoding="utf-8")
    (workdir / "gateway-inner.yaml").write_text(yaml.safe_dump(inner, allow_unicode=True), encoding="utf-8")
    return path


#: where a checkout defines its config sections: gateway/config/ by section, or (before issue 16) gateway/config.py
CONFIG_MODULES = ("gateway.config.model", "gateway.config.inner", "gateway.config.outer", "gateway.config")


def _section_keys(class_name: str) -> set[str]:
    """The keys of the config section ``class_name`` in the checkout this Python imports (none if it has none)."""
    import dataclasses
    import importlib

    for name in CONFIG_MODULES:
        try:
            cls = getattr(importlib.import_module(name), class_name, None)
        except ImportError:
            continue
        if dataclasses.is_dataclass(cls):
            return {f.name for f in dataclasses.fields(cls)}
    return set()


def _config_has(class_name: str, key: str, repo: Path | None = None) -> bool:
    """Whether the config section ``class_name`` has ``key`` in this checkout (or in checkout ``repo``)."""
    if repo is not None:
        probe = (f"CONFIG_MODULES = {CONFIG_MODULES!r}\n{inspect.getsource(_section_keys)}\n"
                 f"print({key!r} in _section_keys({class_name!r}))")
        out = subprocess.run([PY, "-c", probe], capture_output=True, text=True, cwd=repo, env=dict(os.environ, PYTHONPATH=str(repo)))
        return out.stdout.strip() == "True"
    return key in _section_keys(class_name)


def sim_config(workdir: Path, *, his_port: int, mllp_port: int, doctors: int, days: int, start_date: str,
               sessions=("00:00-23:55",), slot_minutes: int = 5, counter_per_minute: float = 0.0) -> Path:
    config = {
        "listen": f"tcp:{his_port}:interface=127.0.0.1",
        "gateway": {"host": "127.0.0.1", "port": mllp_port},
        "publish": "push",
        "received_log": "his-received.jsonl",
        "sent_log": "his-sent.jsonl",
        "days": days,
        "start_date": start_date,
        "counter_bookings_per_minute": counter_per_minute,
        "seed": 7,
        "max_connections": 256,
        "departments": [{
            "code": "CARD", "name": "心内科",
            "doctors": [{"id": f"D{i + 1:03d}", "family": "张", "given": f"医生{i + 1}",
                         "service": {"code": "cardiology-consult", "text": "心内科门诊"},
                         "sessions": list(sessions), "slot_minutes": slot_minutes} for i in range(doctors)],
        }],
    }
    path = workdir / "his-sim.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return path


#: bench/launch.py switches for the chamber's COMMIT, by variant name (mode/contender suffix)
COMMIT_VARIANTS = {"inline": ["--commit-inline"], "pipeline": ["--pipeline-always"],
                   "nothread": ["--no-writer-thread"]}


def launch_args(command: list[str], *, reference_builders: bool = False, repo: Path | None = None,
                commit: str | None = None) -> list[str]:
    """``gatewayd <command>`` through bench/launch.py (which can swap in the hl7apy builders); ``repo``: run
    the gatewayd of another checkout (a copy of an earlier tree: the 'before' of a before/after run; start
    the process with :func:`repo_env` too)."""
    args = [PY, str((repo or REPO) / "bench" / "launch.py")]
    if reference_builders:
        args.append("--reference-builders")
    if commit:
        args += COMMIT_VARIANTS[commit]
    return args + ["--", *command]


def repo_env(repo: Path | None) -> dict | None:
    """The environment for a process running the code of checkout ``repo`` (None: this one)."""
    return {"PYTHONPATH": str(repo)} if repo is not None else None


@contextlib.contextmanager
def workspace(keep: bool = False, prefix: str = "gatewayd-bench-"):
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if keep:
            print(f"(kept {path})", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def save_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def load_result(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def worker_results(children: list[subprocess.Popen]) -> list[dict]:
    """Each load worker's JSON answer on its stdout, once it has exited (a failed worker fails the run)."""
    outs = []
    for p in children:
        data = p.stdout.read()
        p.wait()
        if p.returncode != 0:
            raise RuntimeError(f"load worker failed ({p.returncode})")
        outs.append(json.loads(data))
    return outs


def bench_main(doc: str, add_arguments, run, print_table, name: str) -> None:
    """A benchmark's command line: its arguments plus --keep and --save-as, ``run(args, workdir)`` in a fresh
    work directory, the result saved to bench/results/<name>.json and printed."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    ap.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    ap.add_argument("--save-as", default=name, help="name of the results file in bench/results/")
    args = ap.parse_args()
    with workspace(args.keep, prefix=f"gatewayd-{name}-") as workdir:
        result = run(args, workdir)
    save_result(args.save_as, result)
    print_table(result)


def log(*parts) -> None:
    print(time.strftime("%H:%M:%S"), *parts, file=sys.stderr, flush=True)
