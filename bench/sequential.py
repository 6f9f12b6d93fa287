#!/usr/bin/env python3
"""One booking at a time: what a single booking costs the gateway (CPU, from /proc) and how long it takes
(HTTPS POST -> chamber -> SRM^S01 to the HIS simulator -> its AA -> 201), with no queueing to blur either.
Prints figures; asserts nothing (benchmarks are not tests).

    python bench/sequential.py [--bookings 150] [--ordering fifo|patient] [--runs 3] [--baseline DIR]

``--baseline DIR`` (a copy of another checkout, e.g. ``git worktree add /tmp/base HEAD~1``) alternates runs of
that checkout's gateway with this one's, each a fresh gateway and simulator, so both see the same machine.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.rig import process_cpu_seconds as cpu_seconds  # noqa: E402  (this checkout's, before a --child path)


def one_run(bookings: int, ordering: str) -> dict:
    """Run in the checkout whose tests/e2e/harness.py is first on sys.path (this one, or a baseline)."""
    from tests.e2e.harness import Lock, appointment_for

    with tempfile.TemporaryDirectory() as d:
        lock = Lock(Path(d), doctors=max(2, bookings // 8 + 1), days=2)
        if ordering == "patient":
            lock.gateway_config["inner"]["his"].update(ordering="patient", window=16)
            lock.write_configs()
        with lock:
            time.sleep(1)
            slots = [s["id"] for s in lock.search_slots(status="free", _count=1000)][:bookings]
            session = lock.session()
            session.get(f"{lock.base}/metadata")  # the TLS handshake is not part of a booking
            pid = lock.gateway.popen.pid
            before, latencies = cpu_seconds(pid), []
            for i, slot in enumerate(slots):
                start = time.perf_counter()
                r = session.post(f"{lock.base}/Appointment", json=appointment_for(slot, mrn=f"MRN-S{i}"),
                                 headers={"Content-Type": "application/fhir+json"})
                latencies.append((time.perf_counter() - start) * 1000)
                if r.status_code != 201:
                    raise SystemExit(f"booking {i} answered {r.status_code}: {r.text[:200]}")
            time.sleep(0.3)
            cpu = cpu_seconds(pid) - before
    latencies.sort()
    return {"bookings": len(latencies), "cpu_ms_per_booking": round(cpu / len(latencies) * 1000, 2),
            "p50_ms": round(latencies[len(latencies) // 2], 2), "p90_ms": round(latencies[int(len(latencies) * .9)], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bookings", type=int, default=150)
    ap.add_argument("--ordering", choices=("fifo", "patient"), default="fifo")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--baseline", type=Path, help="another checkout, run alternately with this one")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:  # one run, in the checkout given
        sys.path.insert(0, str(args.child))
        import json

        print(json.dumps(one_run(args.bookings, args.ordering)))
        return
    import json

    checkouts = [("this", REPO)] + ([("baseline", args.baseline.resolve())] if args.baseline else [])
    results: dict[str, list[dict]] = {name: [] for name, _ in checkouts}
    for run in range(args.runs):
        for name, checkout in (checkouts if run % 2 == 0 else checkouts[::-1]):
            out = subprocess.run([sys.executable, __file__, "--child", str(checkout), "--bookings",
                                  str(args.bookings), "--ordering", args.ordering],
                                 capture_output=True, text=True, check=True)
            figures = json.loads(out.stdout.strip().splitlines()[-1])
            results[name].append(figures)
            print(f"run {run + 1} {name:8} {args.ordering}: {figures}", flush=True)
    for name, runs in results.items():
        print(f"{name:8} medians over {len(runs)} runs: cpu {statistics.median(r['cpu_ms_per_booking'] for r in runs)}"
              f" ms/booking, p50 {statistics.median(r['p50_ms'] for r in runs)} ms, "
              f"p90 {statistics.median(r['p90_ms'] for r in runs)} ms")


if __name__ == "__main__":
    main()
