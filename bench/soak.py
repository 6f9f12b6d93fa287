#!/usr/bin/env python3
"""Soak: gatewayd under mixed traffic for minutes; its resident memory sampled every 10 s.

    python bench/soak.py [--minutes 10] [--book-rate 20] [--ingest-rate 50] [--search-rate 5]
                         [--counter-per-minute 30] [--sample-every 10] [--warm-up SECONDS]

One HIS simulator and one gateway (strict FIFO relay, logging at warning), and at the same time:

- platforms: book-then-cancel cycles through the FHIR API at ``--book-rate`` cycles/s (2 load processes,
  keep-alive, mutual TLS; each cycle is POST /Appointment -> SRM^S01 -> 201, then PATCH cancelled ->
  SRM^S04 -> 200; slots are reused round-robin);
- the HIS: SIU^S12/S15 notifications from the simulator for every booking and cancellation, plus its
  counter booking random slots (``--counter-per-minute``; those slots then answer 409 to platforms);
- an HIS interface sending SIU^S12/S15 of another schedule straight to the inner gate at
  ``--ingest-rate`` messages/s (one MLLP connection, fresh control ids);
- slot searches (GET /Slot?status=free) at ``--search-rate``/s.

Resident memory (RSS, /proc/<pid>/statm) of the gateway and the simulator, the chamber's size on disk and
the traffic so far are sampled every ``--sample-every`` seconds. Growth is measured from the first sample
after the warm-up (default: 20% of the run, at most 60 s) to the last, and as a least-squares slope.
Results: bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from datetime import date, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import booking, rig  # noqa: E402


class InnerSender(threading.Thread):
    """An HIS interface: SIU^S12 then S15 for the slots of schedule X001, paced, one MLLP connection."""

    def __init__(self, port: int, rate: float, stop: threading.Event):
        super().__init__(daemon=True)
        self.port, self.rate, self.stop_event = port, rate, stop
        self.sent = 0
        self.codes: dict[str, int] = {}
        self.errors = 0

    def message(self, n: int) -> bytes:
        day = date(2030, 1, 1) + timedelta(days=(n // 2 // 96) % 3000)
        minute = (n // 2) % 96 * 15
        start = f"{day:%Y%m%d}{minute // 60:02d}{minute % 60:02d}"
        end_minute = minute + 15
        end = f"{day:%Y%m%d}{end_minute // 60 % 24:02d}{end_minute % 60:02d}"
        trigger, status = ("S12", "Booked") if n % 2 == 0 else ("S15", "Cancelled")
        ts = time.strftime("%Y%m%d%H%M%S")
        segments = [
            f"MSH|^~\\&|HIS|HOSP|GATEWAYD|FRONT|{ts}||SIU^{trigger}^SIU_S12|K{n:09d}|P|2.5||||||UNICODE UTF-8",
            f"SCH|P{n // 2}|H{n // 2}||||{trigger}^x|||15|MIN|^^M15^{start}^{end}||||||||||||||{status}",
            "RGS|1",
            f"AIS|1||cardio^心内科门诊|{start}|||15|MIN",
            "AIL|1||CARD^^^^^^^^心内科",
            "AIP|1||X001^李^四",
        ]
        return ("\r".join(segments) + "\r").encode("utf-8")

    def run(self) -> None:
        sock = None
        t0 = time.time()
        n = 0
        while not self.stop_event.is_set():
            due = t0 + n / self.rate
            delay = due - time.time()
            if delay > 0:
                time.sleep(min(delay, 0.5))
                continue
            try:
                if sock is None:
                    sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
                sock.sendall(b"\x0b" + self.message(n) + b"\x1c\x0d")
                buf = b""
                while b"\x1c\x0d" not in buf:
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise ConnectionError("closed")
                    buf += chunk
                text = buf.decode("utf-8", "replace")
                code = text.split("MSA|", 1)[1][:2] if "MSA|" in text else "??"
                self.codes[code] = self.codes.get(code, 0) + 1
                self.sent += 1
            except OSError:
                self.errors += 1
                if sock is not None:
                    sock.close()
                sock = None
                time.sleep(0.5)
            n += 1
        if sock is not None:
            sock.close()


class Searcher(threading.Thread):
    def __init__(self, lock: booking.BookingLock, rate: float, stop: threading.Event):
        super().__init__(daemon=True)
        self.client = booking.Client("127.0.0.1", lock.fhir_port, booking.tls_context(lock.certs.dir))
        self.rate, self.stop_event = rate, stop
        self.statuses: dict[str, int] = {}

    def run(self) -> None:
        while not self.stop_event.wait(1.0 / self.rate):
            try:
                status = self.client.request("GET", "/Slot?status=free&_count=50")[0]
            except OSError:
                status = 0
            self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1


def slope_per_minute(points: list[tuple[float, float]]) -> float | None:
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    den = sum((t - mx) ** 2 for t, _ in points)
    return round(60 * sum((t - mx) * (v - my) for t, v in points) / den, 3) if den else None


def run(args, workdir: Path) -> dict:
    certs = rig.Certs(workdir / "certs")
    duration = args.minutes * 60
    warm_up = args.warm_up if args.warm_up is not None else min(60.0, 0.2 * duration)
    lock = booking.BookingLock(workdir, certs, slots=args.slots, counter_per_minute=args.counter_per_minute,
                               log_level=args.gateway_log_level)
    samples = []
    stop = threading.Event()
    try:
        lock.start()
        slots = lock.free_slots()
        chamber = workdir / "chamber.sqlite3"
        inner = InnerSender(lock.mllp_port, args.ingest_rate, stop)
        searcher = Searcher(lock, args.search_rate, stop)
        t_start = time.time()

        def sample():
            size = sum(p.stat().st_size for p in workdir.glob("chamber.sqlite3*") if p.exists())
            wal = workdir / "chamber.sqlite3-wal"
            wal_size = wal.stat().st_size if wal.exists() else 0
            samples.append({"t": round(time.time() - t_start, 1), "gateway_rss_mb": round(lock.gateway.rss_mb(), 2),
                            "sim_rss_mb": round(lock.sim.rss_mb(), 2), "chamber_mb": round(size / 2**20, 2),
                            "wal_mb": round(wal_size / 2**20, 2),
                            "gateway_cpu_s": round(lock.gateway.cpu_seconds(), 1),
                            "inner_sent": inner.sent, "load": rig.load_average()[0]})
            rig.log(f"soak t={samples[-1]['t']:>6}s gateway RSS {samples[-1]['gateway_rss_mb']:.1f} MB, "
                    f"sim {samples[-1]['sim_rss_mb']:.1f} MB, chamber {samples[-1]['chamber_mb']:.1f} MB "
                    f"(WAL {samples[-1]['wal_mb']:.1f} MB)")

        def sampler():
            sample()
            while not stop.wait(args.sample_every - ((time.time() - t_start) % args.sample_every)):
                sample()

        sampler_thread = threading.Thread(target=sampler, daemon=True)
        sampler_thread.start()
        inner.start()
        searcher.start()
        outs, _ = booking.run_workers(port=lock.fhir_port, certs=certs.dir, slots=slots, procs=2, threads=8,
                                      rate=args.book_rate, seconds=duration, cycle=True, start_in=0.5)
        sample()
        stop.set()
        inner.join(5)
        searcher.join(5)
        sampler_thread.join(5)
        alive = lock.gateway.alive()
    finally:
        stop.set()
        lock.stop()
    rows = [r for o in outs for r in o["results"]]
    statuses: dict[str, dict[str, int]] = {}
    for kind, *_rest, status in rows:
        statuses.setdefault(kind, {})
        statuses[kind][str(status)] = statuses[kind].get(str(status), 0) + 1
    book_lat = sorted(r[3] for r in rows if r[0] == "book" and r[4] == 201)
    after = [s for s in samples if s["t"] >= warm_up]
    base, last = (after[0], after[-1]) if after else (samples[0], samples[-1])
    growth = 100 * (last["gateway_rss_mb"] - base["gateway_rss_mb"]) / base["gateway_rss_mb"]
    return {
        "machine": rig.machine(), "minutes": args.minutes, "warm_up_s": warm_up, "sample_every_s": args.sample_every,
        "traffic": {"book_cancel_cycles_per_s": args.book_rate, "inner_siu_per_s": args.ingest_rate,
                    "searches_per_s": args.search_rate, "counter_bookings_per_minute": args.counter_per_minute,
                    "slots": len(slots)},
        "requests": statuses, "inner_acks": inner.codes, "inner_errors": inner.errors,
        "searches": searcher.statuses,
        "book_p50_ms": round(1000 * rig.percentile(book_lat, .5), 2) if book_lat else None,
        "book_p99_ms": round(1000 * rig.percentile(book_lat, .99), 2) if book_lat else None,
        "gateway_alive_at_end": alive,
        "rss_after_warm_up_mb": base["gateway_rss_mb"], "rss_last_mb": last["gateway_rss_mb"],
        "rss_max_mb": max(s["gateway_rss_mb"] for s in after or samples),
        "rss_growth_pct": round(growth, 2),
        "rss_slope_mb_per_min": slope_per_minute([(s["t"], s["gateway_rss_mb"]) for s in after]),
        "sim_rss_growth_pct": round(100 * (last["sim_rss_mb"] - base["sim_rss_mb"]) / base["sim_rss_mb"], 2),
        "chamber_growth_mb": round(last["chamber_mb"] - base["chamber_mb"], 2),
        "wal_max_mb": max(s.get("wal_mb", 0) for s in samples),  # the checkpoints keep it bounded
        "samples": samples,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--book-rate", type=float, default=20.0, help="book+cancel cycles per second")
    ap.add_argument("--ingest-rate", type=float, default=50.0, help="SIU per second straight to the inner gate")
    ap.add_argument("--search-rate", type=float, default=5.0, help="slot searches per second")
    ap.add_argument("--counter-per-minute", type=float, default=30.0, help="the HIS counter's own bookings")
    ap.add_argument("--slots", type=int, default=2000)
    ap.add_argument("--sample-every", type=float, default=10.0)
    ap.add_argument("--warm-up", type=float, default=None, help="seconds before growth is measured")
    ap.add_argument("--gateway-log-level", default="warning", choices=("debug", "info", "warning", "error"))
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    with rig.workspace(args.keep) as workdir:
        result = run(args, workdir)
    rig.save_result("soak", result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("samples", "machine")}, indent=1,
                     ensure_ascii=False))


if __name__ == "__main__":
    main()
