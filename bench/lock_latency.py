#!/usr/bin/env python3
"""How long does a crossing of the lock take?  Prints figures; asserts nothing (benchmarks are not tests).

1. Booking round trip: POST /Appointment over HTTPS (mTLS, keep-alive) -> chamber commit -> SRM^S01 over
   MLLP to the bundled HIS simulator -> its SRR -> chamber commit -> 201; then the cancel (SRM^S04).
2. MLLP ingest: the shared independent driver (../shared/tools/mllp_load.py) sends SIU^S12 to the inner
   gate, each ACKed only after the chamber commit.

    python bench/lock_latency.py [--bookings 200] [--messages 2000]

Both run against real processes on loopback (the same harness as the end-to-end tests).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e.harness import Lock, appointment_for  # noqa: E402

LOAD_DRIVER = REPO.parent / "shared" / "tools" / "mllp_load.py"


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))] * 1000


def bookings(lock: Lock, n: int) -> dict:
    s = lock.session()
    free = [x["id"] for x in lock.search_slots(status="free")]
    book, cancel = [], []
    for slot_id in (free * ((n // len(free)) + 1))[:n]:
        t0 = time.perf_counter()
        r = s.post(f"{lock.base}/Appointment", json=appointment_for(slot_id),
                   headers={"Content-Type": "application/fhir+json"})
        t1 = time.perf_counter()
        assert r.status_code == 201, r.text
        c = s.patch(r.headers["Location"].split("/_history")[0], json=[{"op": "replace", "path": "/status", "value": "cancelled"}],
                    headers={"Content-Type": "application/json-patch+json"})
        t2 = time.perf_counter()
        assert c.status_code == 200, c.text
        book.append(t1 - t0)
        cancel.append(t2 - t1)
    return {"bookings": n,
            "book_p50_ms": round(pct(book, .5), 2), "book_p99_ms": round(pct(book, .99), 2),
            "cancel_p50_ms": round(pct(cancel, .5), 2), "cancel_p99_ms": round(pct(cancel, .99), 2),
            "mean_ms": round(statistics.mean(book) * 1000, 2)}


def ingest(workdir: Path, n: int, conns: int) -> dict:
    """A fresh gateway per run: the driver's control ids repeat between runs (same content, a new MSH-7), and
    the gateway would take them for resends, answered again and applied nothing."""
    lock = Lock(workdir)
    lock.gateway_config["logging"]["level"] = "warning"
    lock.write_configs()
    lock.start_gateway()
    try:
        out = subprocess.run([sys.executable, str(LOAD_DRIVER), "--port", str(lock.mllp_port),
                              "-n", str(n // conns), "--conns", str(conns)], capture_output=True, text=True,
                             check=True)
    finally:
        lock.stop()
    return {"conns": conns, **json.loads(out.stdout)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bookings", type=int, default=200)
    ap.add_argument("--messages", type=int, default=2000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lock = Lock(Path(tmp), doctors=4, days=7)
        lock.gateway_config["logging"]["level"] = "warning"
        lock.write_configs()
        with lock:
            booking = bookings(lock, args.bookings)
        runs = []
        if LOAD_DRIVER.exists():
            for conns in (1, 4, 16):
                workdir = Path(tmp) / f"ingest-{conns}"
                workdir.mkdir()
                runs.append(ingest(workdir, args.messages, conns))
        result = {"machine": f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}",
                  "booking_round_trip": booking,
                  "mllp_ingest": runs or "shared/tools/mllp_load.py not found"}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
