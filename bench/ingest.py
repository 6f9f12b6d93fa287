#!/usr/bin/env python3
"""MLLP ingest (HIS -> gateway): every contender on loopback, driven by the shared independent driver
(../shared/tools/mllp_load.py: K connections, each sends SIU^S12, waits for the ACK, sends the next).

    python bench/ingest.py [--reps 3] [--conns 1,4,16] [--scale 1.0] [--only gatewayd,python-hl7]

Contenders (each started fresh for every run, so control ids never collide with an earlier run's):

- ``gatewayd``: ``gatewayd run`` with a new chamber (SQLite WAL, synchronous=FULL); the ACK (CA: the
  driver's messages ask for enhanced mode with MSH-15 AL) is written only after the chamber's COMMIT;
  logging at warning (the peers log nothing per message either);
- ``gatewayd-info``: the same with ``logging.level: info`` (the default: one JSON line per message);
- ``python-hl7``: python-hl7's asyncio MLLP server (bench/peers/python_hl7_server.py), parse + ACK;
- ``txHL7``: txHL7's Twisted MLLP server (bench/peers/txhl7_server.py), python-hl7 parse + ACK;
- ``hl7apy``: hl7apy's MLLPServer (bench/peers/hl7apy_server.py), hl7apy parse + ACK; it closes the
  connection after each message, so the driver reconnects for every message (``--reconnect``);
- ``bound-c``: a minimal C epoll MLLP ACK server (bench/bounds/mllp_ack.c, compiled here with gcc -O2);
- ``bound-py``: the minimal Python asyncio MLLP ACK server, nothing stored (bench/bounds/durable_server.py
  --store none);
- ``bound-py-durable``: the same, group commit per loop turn to SQLite (WAL, synchronous=FULL), ACK after
  COMMIT (--store group);
- ``bound-py-each``: the same, one commit (one fsync) per message (--store each);
- ``gatewayd-inline``, ``gatewayd-pipeline``, ``gatewayd-nothread`` (only with ``--only``): ``gatewayd``
  with COMMIT always on the reactor thread, always in the writer thread, or no writer thread at all
  (bench/launch.py), to see what pipelined group commit buys;
- ``gatewayd-postgresql`` (only with ``--postgresql DSN``): ``gatewayd`` with its chamber in PostgreSQL
  (``chamber.backend: postgresql``, docs/chamber.md): a new schema of that database for every run;
- ``gatewayd-baseline`` (only with ``--baseline DIR``): ``gatewayd`` as the checkout copied to DIR has it
  (the "before" of a change, measured in the same run, interleaved with the others).

Runs are interleaved: for each repetition and connection count, every contender runs once, in an order
rotated per repetition, so background load from other processes on the machine hits all of them alike.
Before each driver run, 20 messages with fresh control ids check that every ACK's MSA-2 equals the MSH-10
sent (the shared driver counts ACK codes only). Results: bench/results/ingest.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import rig  # noqa: E402


@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    kind: str  # gatewayd | peer | bound
    durable: bool
    base_messages: int  # messages per run at 4 and 16 connections (half at 1), times --scale
    reconnect: bool = False

    def messages(self, conns: int, scale: float) -> int:
        total = self.base_messages * (0.5 if conns == 1 else 1.0) * scale
        return max(conns * 5, int(total // conns) * conns)


CONTENDERS = [
    Contender("gatewayd", "gatewayd (durable chamber, ACK after COMMIT)", "gatewayd", True, 6000),
    Contender("gatewayd-info", "gatewayd, logging.level info (one log line per message)", "gatewayd", True, 6000),
    Contender("python-hl7", "python-hl7 asyncio server (parse + ACK, no storage)", "peer", False, 4000),
    Contender("txHL7", "txHL7 Twisted server (parse + ACK, no storage)", "peer", False, 4000),
    Contender("hl7apy", "hl7apy MLLPServer (parse + ACK, no storage, one message per connection)", "peer",
              False, 160, reconnect=True),
    Contender("bound-c", "bound: C epoll ACK server (no parsing, no storage)", "bound", False, 60000),
    Contender("bound-py", "bound: Python asyncio ACK server (no storage)", "bound", False, 30000),
    Contender("bound-py-durable", "bound: Python asyncio + SQLite group commit, ACK after COMMIT", "bound", True,
              20000),
    Contender("bound-py-each", "bound: Python asyncio + SQLite, one commit per message", "bound", True, 8000),
]
VARIANTS = [Contender(f"gatewayd-{v}", f"gatewayd, chamber variant {v} (bench/launch.py {' '.join(flags)})",
                      "gatewayd", True, 6000) for v, flags in rig.COMMIT_VARIANTS.items()]
POSTGRESQL = Contender("gatewayd-postgresql", "gatewayd, chamber in PostgreSQL (ACK after COMMIT)", "gatewayd",
                       True, 6000)
BASELINE = Contender("gatewayd-baseline", "gatewayd before (the baseline checkout, durable chamber)", "gatewayd",
                     True, 6000)


def build_c_bound(outdir: Path) -> Path:
    exe = outdir / "mllp_ack"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(rig.BENCH / "bounds" / "mllp_ack.c")], check=True)
    return exe


class Ingest:
    def __init__(self, workdir: Path, *, gateway_log_level: str = "warning", reference_builders: bool = False,
                 baseline: Path | None = None, postgresql: str = ""):
        self.workdir = workdir
        self.postgresql = postgresql  # a libpq connection string to a database sorting C (gatewayd-postgresql)
        self.baseline = baseline
        self.certs = rig.Certs(workdir / "certs")
        self.c_exe = build_c_bound(workdir)
        self.gateway_log_level = gateway_log_level
        self.reference_builders = reference_builders
        self.serial = 0

    def start(self, contender: Contender, port: int) -> rig.Proc:
        self.serial += 1
        run_dir = self.workdir / f"{contender.key}-{self.serial}"
        run_dir.mkdir()
        key = contender.key
        env = None
        if key in ("gatewayd", "gatewayd-info", "gatewayd-baseline", "gatewayd-postgresql") or \
                key in {c.key for c in VARIANTS}:
            level = "info" if key == "gatewayd-info" else self.gateway_log_level
            config = rig.gateway_config(run_dir, self.certs, mllp_port=port, his_port=rig.free_port(),
                                        fhir_port=rig.free_port(), log_level=level,
                                        chamber=self.postgresql_chamber() if key == "gatewayd-postgresql" else None)
            repo = self.baseline if key == "gatewayd-baseline" else None
            args = rig.launch_args(["run", "--config", str(config)], reference_builders=self.reference_builders,
                                   repo=repo,
                                   commit=key.removeprefix("gatewayd-") if key in {c.key for c in VARIANTS} else None)
            env = rig.repo_env(repo)
        elif key == "python-hl7":
            args = [rig.PY, str(rig.BENCH / "peers" / "python_hl7_server.py"), "--port", str(port)]
        elif key == "txHL7":
            args = [rig.PY, str(rig.BENCH / "peers" / "txhl7_server.py"), "--port", str(port)]
        elif key == "hl7apy":
            args = [rig.PY, str(rig.BENCH / "peers" / "hl7apy_server.py"), "--port", str(port)]
        elif key == "bound-c":
            args = [str(self.c_exe), str(port)]
        elif key.startswith("bound-py"):
            store = {"bound-py": "none", "bound-py-durable": "group", "bound-py-each": "each"}[key]
            args = [rig.PY, str(rig.BENCH / "bounds" / "durable_server.py"), "--port", str(port), "--store", store,
                    "--db", str(run_dir / "bound.sqlite3")]
        else:
            raise ValueError(key)
        proc = rig.Proc(key, args, run_dir, env=env)
        try:
            rig.wait_port(port, timeout=60, proc=proc)
        except BaseException:
            proc.stop()
            raise
        return proc

    def postgresql_chamber(self) -> dict:
        """A chamber section for a new, empty schema of the --postgresql database."""
        import os

        import psycopg

        schema = f"bench_{os.getpid()}_{self.serial}"
        with psycopg.connect(self.postgresql, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        return {"backend": "postgresql", "postgresql": {"dsn": f"{self.postgresql} options='-csearch_path={schema}'",
                                                        "sslmode": "disable"}}

    def run_one(self, contender: Contender, conns: int, scale: float) -> dict:
        port = rig.free_port()
        proc = self.start(contender, port)
        try:
            time.sleep(0.3)  # let start-up work (imports, chamber checks) settle
            check = rig.check_ack_matching(port, 5 if contender.reconnect else 20, reconnect=contender.reconnect)
            total = contender.messages(conns, scale)
            meter = rig.CpuMeter({"server": proc}).start()
            load = rig.load_average()
            result = rig.run_driver(port, total // conns, conns, reconnect=contender.reconnect)
            cpu = meter.stop()
        finally:
            proc.stop()
        accepted = sum(v for k, v in result["acks"].items() if k in ("AA", "CA"))
        return {
            "contender": contender.key, "conns": conns, **result, "ack_check": check,
            "all_accepted": accepted == result["messages"],
            "all_matched": check["msa2_matched"] == check["sent"],
            "server_cpu_pct": cpu["server_cpu_pct"],
            "server_cpu_us_per_msg": round(1e6 * cpu["server_cpu_s"] / max(1, result["messages"]), 1),
            "load_average": load,
        }


def summarise(runs: list[dict], contenders: list[Contender], conns_list: list[int]) -> list[dict]:
    rows = []
    for c in contenders:
        for conns in conns_list:
            mine = [r for r in runs if r["contender"] == c.key and r["conns"] == conns and "error" not in r]
            if not mine:
                continue
            rows.append({
                "contender": c.key, "label": c.label, "durable": c.durable, "kind": c.kind, "conns": conns,
                "runs": len(mine),
                "msg_per_s": rig.median([r["msg_per_s"] for r in mine]),
                "msg_per_s_range": rig.spread([r["msg_per_s"] for r in mine]),
                "p50_ms": rig.median([r["p50_ms"] for r in mine]),
                "p99_ms": rig.median([r["p99_ms"] for r in mine]),
                "p99_ms_range": rig.spread([r["p99_ms"] for r in mine]),
                "server_cpu_us_per_msg": rig.median([r["server_cpu_us_per_msg"] for r in mine]),
                "server_cpu_pct": rig.median([r["server_cpu_pct"] for r in mine]),
                "all_accepted": all(r["all_accepted"] for r in mine),
                "all_matched": all(r["all_matched"] for r in mine),
                "acks": sorted({k for r in mine for k in r["acks"]}),
            })
    return rows


def run(args, workdir: Path) -> dict:
    baseline = Path(args.baseline).resolve() if getattr(args, "baseline", "") else None
    wanted = [c for c in CONTENDERS if not args.only or c.key in args.only.split(",")]
    wanted += [c for c in VARIANTS if args.only and c.key in args.only.split(",")]
    wanted += [POSTGRESQL] if getattr(args, "postgresql", "") else []
    wanted += [BASELINE] if baseline else []
    conns_list = [int(x) for x in args.conns.split(",")]
    ingest = Ingest(workdir, gateway_log_level=args.gateway_log_level, baseline=baseline,
                    postgresql=getattr(args, "postgresql", ""))
    machine = rig.machine()  # as the run starts (load average, checkout)
    runs = []
    for rep in range(args.reps):
        for conns in conns_list:
            order = wanted[rep % len(wanted):] + wanted[:rep % len(wanted)]
            for c in order:
                try:
                    r = ingest.run_one(c, conns, args.scale)
                except Exception as e:  # a contender that fails is reported, the others still run
                    r = {"contender": c.key, "conns": conns, "error": f"{type(e).__name__}: {e}"[:2000]}
                    rig.log(f"ingest rep {rep + 1} {c.key:18} x{conns:<2} FAILED {r['error'][:300]}")
                else:
                    rig.log(f"ingest rep {rep + 1} {c.key:18} x{conns:<2} {r['msg_per_s']:>9,.0f} msg/s "
                            f"p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f} ms  cpu {r['server_cpu_us_per_msg']} us/msg"
                            f"  acks {r['acks']} msa2 {r['ack_check']['msa2_matched']}/{r['ack_check']['sent']}"
                            f"  load {r['load_average'][0]}")
                r["rep"] = rep + 1
                runs.append(r)
    return {"machine": machine, "reps": args.reps, "scale": args.scale, "conns": conns_list,
            "gateway_log_level": args.gateway_log_level, "baseline": str(baseline) if baseline else None,
            "summary": summarise(runs, wanted, conns_list), "runs": runs}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--reps", type=int, default=3, help="repetitions of every run (medians are reported)")
    ap.add_argument("--conns", default="1,4,16", help="connection counts, comma separated")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every run's message count")
    ap.add_argument("--only", default="", help="comma-separated contender keys: "
                    + ", ".join(c.key for c in CONTENDERS + VARIANTS + [BASELINE]))
    ap.add_argument("--baseline", default="", metavar="DIR",
                    help="also run gatewayd-baseline: the gatewayd of the checkout copied to DIR (before/after)")
    ap.add_argument("--postgresql", default="", metavar="DSN",
                    help="also run gatewayd-postgresql: the chamber in this PostgreSQL database (it must sort text "
                         "bytewise: docs/chamber.md; sslmode disable, a schema per run)")
    ap.add_argument("--gateway-log-level", default="warning", choices=("debug", "info", "warning", "error"),
                    help="gatewayd's logging.level (info logs one line per message)")


def print_table(result: dict) -> None:
    print(f"{'contender':20} {'conns':>5} {'msg/s':>9} {'range':>15} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'cpu us/msg':>10}  ok")
    for row in result["summary"]:
        ok = "yes" if row["all_accepted"] and row["all_matched"] else "NO"
        print(f"{row['contender']:20} {row['conns']:>5} {rig.fmt(row['msg_per_s']):>9} {row['msg_per_s_range']:>15} "
              f"{rig.fmt(row['p50_ms']):>8} {rig.fmt(row['p99_ms']):>8} {rig.fmt(row['server_cpu_us_per_msg']):>10}  {ok}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    ap.add_argument("--keep", action="store_true", help="keep the temporary work directory (logs, chambers)")
    ap.add_argument("--save-as", default="ingest", help="name of the results file in bench/results/ (the "
                    "tables in docs/benchmarks.md are rendered from ingest.json)")
    args = ap.parse_args()
    with rig.workspace(args.keep) as workdir:
        result = run(args, workdir)
    path = rig.save_result(args.save_as, result)
    print_table(result)
    print(json.dumps({"saved": str(path)}))


if __name__ == "__main__":
    main()
