#!/usr/bin/env python3
"""Slot search: pages per second and latency of ``GET /Slot?status=free&_count=20``, ``_count=100`` and
``GET /metadata``, from 4 keep-alive mutual-TLS clients with the rate limits lifted.

    python bench/search.py [--clients 4] [--seconds 10] [--slots 2000] [--reps 1]
                           [--queries count20,count100,metadata]

A fresh HIS simulator and gateway (bench/booking.py's lock: ``--slots`` free 5-minute slots, pushed as
SIU^S24 and all in the chamber before the first request; the platform has no quota), then for each query in
turn (the order rotated per repetition): ``--clients`` load processes, each one ``http.client`` connection
(TLS set up before t0, then keep-alive) sending that request back to back for ``--seconds`` (closed loop:
one request in flight per client). A process per client, so the client's GIL is not what is measured; its
CPU is reported (a client near 100% of a core would be the bottleneck). Printed and written to
bench/results/search.json: pages/s, p50/p99 latency, bytes and slots per page, the gateway's CPU (% of one
core, and µs per page) and the client's. Nothing here is a test; nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import rig  # noqa: E402
from bench.booking import BookingLock, Client, tls_context  # noqa: E402

QUERIES = {
    "count20": "/Slot?status=free&_count=20",
    "count100": "/Slot?status=free&_count=100",
    "metadata": "/metadata",
}


def worker(spec: dict) -> dict:
    """One client process: one keep-alive connection, the same request back to back from t0 to t0 + seconds."""
    client = Client("127.0.0.1", spec["port"], tls_context(Path(spec["certs"])))
    status, body, _ = client.request("GET", spec["path"])  # TLS handshake and first answer before t0
    entries = len(json.loads(body).get("entry", [])) if spec["path"].startswith("/Slot") and status == 200 else None
    time.sleep(max(0.0, spec["t0"] - time.time()))
    cpu0 = time.process_time()
    t_end = spec["t0"] + spec["seconds"]
    lat, statuses, size = [], {}, len(body)
    while True:
        t = time.perf_counter()
        if time.time() >= t_end:
            break
        try:
            status, body, _ = client.request("GET", spec["path"])
        except Exception:  # noqa: BLE001 - a failed request is a result (status 0)
            status = 0
        lat.append(time.perf_counter() - t)
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {"lat": lat, "statuses": statuses, "bytes": size, "entries": entries, "connects": client.connects,
            "cpu_s": round(time.process_time() - cpu0, 3)}


def run_query(lock: BookingLock, certs: rig.Certs, path: str, clients: int, seconds: float) -> dict:
    t0 = time.time() + 2.0
    children = []
    for _ in range(clients):
        spec = {"port": lock.fhir_port, "certs": str(certs.dir), "path": path, "t0": t0, "seconds": seconds}
        p = subprocess.Popen([rig.PY, __file__, "worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env=dict(os.environ, PYTHONPATH=str(rig.REPO)))
        p.stdin.write(json.dumps(spec).encode())
        p.stdin.close()
        children.append(p)
    time.sleep(max(0.0, t0 - time.time()))
    meter = rig.CpuMeter({"gateway": lock.gateway}).start()
    outs = rig.worker_results(children)
    cpu = meter.stop()
    lat = sorted(x for o in outs for x in o["lat"])
    statuses: dict[str, int] = {}
    for o in outs:
        for k, v in o["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    ok = statuses.get("200", 0)
    wall = cpu["wall_s"]
    return {
        "path": path, "requests": len(lat), "statuses": statuses,
        "pages_per_s": round(ok / seconds, 1),
        "p50_ms": round(1000 * rig.percentile(lat, .5), 2) if lat else None,
        "p99_ms": round(1000 * rig.percentile(lat, .99), 2) if lat else None,
        "bytes_per_page": outs[0]["bytes"], "slots_per_page": outs[0]["entries"],
        "gateway_cpu_pct": cpu["gateway_cpu_pct"],
        "gateway_cpu_us_per_page": round(1e6 * cpu["gateway_cpu_s"] / ok, 1) if ok else None,
        "client_cpu_pct": round(100 * sum(o["cpu_s"] for o in outs) / wall, 1) if wall else None,
        "connections": sum(o["connects"] for o in outs),
    }


def run(args, workdir: Path) -> dict:
    certs = rig.Certs(workdir / "certs")
    machine = rig.machine()
    names = [q for q in args.queries.split(",") if q]
    runs = []
    for rep in range(args.reps):
        run_dir = workdir / f"run-{rep + 1}"
        run_dir.mkdir()
        lock = BookingLock(run_dir, certs, slots=args.slots, log_level=args.gateway_log_level)
        try:
            lock.start()
            lock.free_slots()  # every page rendered once before measuring (lazy imports, caches)
            load = rig.load_average()
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                try:
                    r = run_query(lock, certs, QUERIES[name], args.clients, args.seconds)
                except Exception as e:  # noqa: BLE001 - reported, the other queries go on
                    r = {"error": f"{type(e).__name__}: {e}"[:2000]}
                    rig.log(f"search rep {rep + 1} {name} FAILED {r['error'][:300]}")
                else:
                    rig.log(f"search rep {rep + 1} {name:9} {r['pages_per_s']:>8} pages/s p50 {r['p50_ms']} "
                            f"p99 {r['p99_ms']} ms gw cpu {r['gateway_cpu_pct']}% ({r['gateway_cpu_us_per_page']} "
                            f"µs/page) client cpu {r['client_cpu_pct']}% statuses {r['statuses']} (load {load[0]})")
                r.update({"query": name, "rep": rep + 1, "load_average": load})
                runs.append(r)
        finally:
            lock.stop()
    summary = []
    for name in names:
        mine = [r for r in runs if r["query"] == name and "error" not in r]
        if not mine:
            continue
        row = {"query": name, "path": QUERIES[name], "runs": len(mine),
               "slots_per_page": mine[0]["slots_per_page"], "bytes_per_page": mine[0]["bytes_per_page"],
               "non_200": sum(r["requests"] - r["statuses"].get("200", 0) for r in mine)}
        for k in ("pages_per_s", "p50_ms", "p99_ms", "gateway_cpu_pct", "gateway_cpu_us_per_page", "client_cpu_pct"):
            row[k] = rig.median([r[k] for r in mine])
            row[f"{k}_range"] = rig.spread([r[k] for r in mine])
        summary.append(row)
    return {"machine": machine, "reps": args.reps, "seconds": args.seconds, "clients": args.clients,
            "slots": args.slots, "gateway_log_level": args.gateway_log_level,
            "client": f"{args.clients} processes, one keep-alive mutual-TLS http.client connection each, closed loop",
            "summary": summary, "runs": runs}


def print_table(result: dict) -> None:
    print(f"{'query':34} {'pages/s':>16} {'p50 ms':>7} {'p99 ms':>16} {'gw cpu%':>8} {'µs/page':>8} "
          f"{'client%':>8} slots/page")
    for row in result["summary"]:
        print(f"{row['path']:34} {rig.fmt(row['pages_per_s']):>7} ({row['pages_per_s_range']:>7}) "
              f"{rig.fmt(row['p50_ms']):>7} {rig.fmt(row['p99_ms']):>7} ({row['p99_ms_range']:>7}) "
              f"{rig.fmt(row['gateway_cpu_pct']):>8} {rig.fmt(row['gateway_cpu_us_per_page']):>8} "
              f"{rig.fmt(row['client_cpu_pct']):>8} {row['slots_per_page']}")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--clients", type=int, default=4, help="client processes, one keep-alive connection each")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each query's run")
    ap.add_argument("--slots", type=int, default=2000, help="free slots in the chamber")
    ap.add_argument("--reps", type=int, default=1, help="repetitions (medians and ranges are reported)")
    ap.add_argument("--queries", default=",".join(QUERIES), help=f"any of {', '.join(QUERIES)}")
    ap.add_argument("--gateway-log-level", default="warning", choices=("debug", "info", "warning", "error"))


def main() -> None:
    if sys.argv[1:2] == ["worker"]:
        sys.stdout.write(json.dumps(worker(json.loads(sys.stdin.read()))))
        return
    rig.bench_main(__doc__, add_arguments, run, print_table, "search")


if __name__ == "__main__":
    main()
