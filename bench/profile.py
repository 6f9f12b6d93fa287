#!/usr/bin/env python3
"""Where gatewayd's CPU goes on the booking path and on the MLLP ingest path (py-spy, sampling).

    python bench/profile.py [--seconds 12] [--what booking,ingest] [--rate 0] [--mode fifo] [--hz 200]

py-spy (``pip install py-spy``) attaches to the running gateway process (and to the HIS simulator during the
booking run) while the load runs, samples its Python stacks ``--hz`` times a second (only while a thread
is on the CPU, not while the reactor waits in epoll), and writes collapsed stacks. This script folds them
into: CPU by component (what the sampled leaf frames belong to), the functions with the most inclusive
and self time, and the share of samples under chosen entry points. Time in C (SQLite, OpenSSL, json) is
charged to the Python frame that called it: a sample in ``Txn.add_message`` includes its SQLite INSERT.

Booking: ``--rate`` bookings/s offered (0 = saturation, 32 threads), ``--mode`` fifo or patient:N.
Ingest: the shared driver at 16 connections against a fresh gateway (``--log-level``, default info).
Search: GET /Slot?status=free&_count=20 from 4 keep-alive mTLS clients (bench/search.py) on 2,000 free slots.
Results: bench/results/profile.json (and the raw stacks in bench/results/profile-*.txt).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import rig  # noqa: E402

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

#: (component, test on the sampled leaf frame's file (module-relative, as py-spy prints it) and function)
COMPONENTS = [
    ("SQLite statements and COMMIT (gateway/chamber/)", lambda f, fn: f.startswith("gateway/chamber/")),
    ("dataclass row objects (__init__ of rows)", lambda f, fn: f == "<string>"),
    ("structlog (logging)", lambda f, fn: f.startswith("structlog/") or f == "gateway/ops/logs.py"),
    ("TLS (pyOpenSSL, twisted.protocols.tls)", lambda f, fn: f.startswith("OpenSSL/")
     or f in ("twisted/protocols/tls.py", "twisted/internet/_sslverify.py")),
    ("twisted.web (HTTP)", lambda f, fn: f.startswith("twisted/web/")),
    ("Twisted: socket writes (untilConcludes)", lambda f, fn: f == "twisted/python/util.py"),
    ("Twisted: epoll (doPoll)", lambda f, fn: f == "twisted/internet/epollreactor.py"),
    ("Twisted: reactor, Deferreds, TCP", lambda f, fn: f.startswith("twisted/")),
    ("fhir.resources / pydantic (Appointment validation)", lambda f, fn: f.startswith(("fhir/", "fhir_core/",
                                                                                       "pydantic"))),
    ("json (stdlib)", lambda f, fn: f.startswith("json/")),
    ("hl7apy", lambda f, fn: f.startswith("hl7apy/")),
    ("gateway: FHIR adapter and mapping", lambda f, fn: f.startswith("adapters/outer/")
     or f == "adapters/maps/fhir_scheduling.py"),
    ("gateway: HL7 (er7, ack, SRM/SIU mapping)", lambda f, fn: f.startswith(("adapters/hl7/", "adapters/maps/"))),
    ("gateway: MLLP adapters, inner gate", lambda f, fn: f.startswith("adapters/inner/")),
    ("gateway: audit trail", lambda f, fn: f == "gateway/domain/audit.py"),
    ("gateway: booking, relay, inbound, other", lambda f, fn: f.startswith("gateway/")),
    ("hissim", lambda f, fn: f.startswith("hissim/")),
    ("Python stdlib (datetime, threading, ...)", lambda f, fn: "/" not in f or f.startswith(("sqlite3/", "asyncio/",
                                                                                             "http/", "email/"))),
    ("other", lambda f, fn: True),
]

#: entry points whose inclusive share is reported: (label, file, function name or its last part)
ENTRY_POINTS = [
    ("outer gate: one FHIR request (FhirApi.render + _dispatch)", "adapters/outer/site.py", "_dispatch"),
    ("  Appointment JSON -> booking request (booking_from_appointment)", "adapters/maps/fhir_scheduling.py",
     "booking_from_appointment"),
    ("  answer written (FhirApi._respond)", "adapters/outer/site.py", "_respond"),
    ("TLS: OpenSSL calls (pyOpenSSL)", "OpenSSL/SSL.py", "*"),
    ("chamber: batches run (Chamber._run_batch)", "gateway/chamber/engine.py", "_run_batch"),
    ("chamber: units answered after COMMIT (Chamber._finish)", "gateway/chamber/engine.py", "_finish"),
    ("  booking: hold + SRM (BookingService.book work)", "gateway/domain/booking.py", "book.<locals>.work"),
    ("    SRM^S01 built (build_srm)", "adapters/maps/srm_booking.py", "build_srm"),
    ("  relay: answer recorded (Relay._deliver record)", "gateway/relay.py", "_deliver.<locals>.record"),
    ("  inbound SIU recorded (InboundService._record work)", "gateway/domain/inbound.py", "_record.<locals>.work"),
    ("  audit records (gateway/domain/audit.py)", "gateway/domain/audit.py", "*"),
    ("chamber: observers after each commit (Chamber._notify)", "gateway/chamber/engine.py", "_notify"),
    ("  booking: re-read every waiting appointment (SettlementWaiters.recheck)", "gateway/domain/settle.py",
     "recheck"),
    ("relay: pick the next message (Relay._pick)", "gateway/relay.py", "_pick"),
    ("relay: one delivery, end to end (Relay._deliver)", "gateway/relay.py", "_deliver"),
    ("MLLP server: a frame (MLLPServerProtocol._handle_frame)", "adapters/inner/listener.py", "_handle_frame"),
    ("  ER7 parse (er7.parse)", "adapters/hl7/er7.py", "parse"),
    ("  inner gate handler (InnerGateHandler.handle)", "adapters/inner/receiver.py", "handle"),
    ("  ACKs built (build_answers)", "adapters/hl7/ack.py", "build_answers"),
    ("MLLP client: answers from the HIS (adapters/inner/client.py)", "adapters/inner/client.py", "*"),
    ("structlog: every log call, filtered or not", "structlog/_native.py", "*"),
    ("socket writes (untilConcludes)", "twisted/python/util.py", "untilConcludes"),
]


def parse_frame(text: str) -> tuple[str, str, int]:
    m = FRAME.match(text)
    if not m:
        return text, "", 0
    return m.group("func"), m.group("file"), int(m.group("line") or 0)


def fold(raw: Path) -> dict:
    """Aggregate py-spy's collapsed stacks (``frame;frame;... count``)."""
    total = 0
    by_component: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    self_time: collections.Counter = collections.Counter()
    entry: collections.Counter = collections.Counter()
    commit_lines = 0
    other_threads = 0
    commit_thread = 0
    for line in raw.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [parse_frame(f) for f in stack.split(";") if f]
        if not frames:
            continue
        if frames[0][0] == "Thread._bootstrap" or frames[0][1] == "threading.py":
            other_threads += n  # thread-pool threads (mostly parked in Condition.wait): not the reactor
            if any(f_func == "commit" and f_file == "gateway/chamber/threads.py" for f_func, f_file, _ in frames):
                commit_thread += n  # the chamber's writer thread in COMMIT (WAL write + fsync)
            continue
        total += n
        func, file, lineno = frames[-1]
        self_time[f"{func} ({file})"] += n
        for name, test in COMPONENTS:
            if test(file, func):
                by_component[name] += n
                break
        seen = set()
        for f_func, f_file, _ in frames:
            k = f"{f_func} ({f_file})"
            if k not in seen:
                seen.add(k)
                inclusive[k] += n
        for label, e_file, e_func in ENTRY_POINTS:
            if any(f_file == e_file and (e_func == "*" or f_func == e_func or f_func.endswith("." + e_func))
                   for f_func, f_file, _ in frames):
                entry[label] += n
        # the COMMIT statement itself (SQLite's WAL write + fsync), charged to the line that runs it
        if (file == "gateway/chamber/threads.py" and func == "commit") or (
                file == "gateway/chamber/engine.py" and func.endswith("_run_batch") and _is_commit_line(file, lineno)):
            commit_lines += n

    def top(counter, k=25):
        return [{"function": f, "samples": n, "pct": round(100 * n / total, 1)} for f, n in counter.most_common(k)]

    return {
        "samples": total,
        "other_thread_samples": other_threads,
        "commit_thread_samples": commit_thread,  # COMMIT in the writer thread (not in "samples")
        "components": [{"component": c, "samples": n, "pct": round(100 * n / total, 1)}
                       for c, n in by_component.most_common()],
        "entry_points": [{"entry": e, "samples": entry[e], "pct": round(100 * entry[e] / total, 1)}
                         for e, _, _ in ENTRY_POINTS if entry[e]],
        "commit_statement_pct": round(100 * commit_lines / total, 1) if total else 0,
        "top_inclusive": top(inclusive, 40),
        "top_self": top(self_time, 30),
    }


_COMMIT_LINES: dict[str, set[int]] = {}


def _is_commit_line(file: str, lineno: int) -> bool:
    lines = _COMMIT_LINES.get(file)
    if lines is None:
        try:
            text = (rig.REPO / file).read_text(encoding="utf-8").splitlines()
        except OSError:
            text = []
        lines = {i + 1 for i, t in enumerate(text) if 'execute("COMMIT")' in t}
        _COMMIT_LINES[file] = lines
    return lineno in lines


def py_spy(pid: int, seconds: float, hz: int, out: Path) -> subprocess.Popen:
    exe = shutil.which("py-spy")
    if exe is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    return subprocess.Popen([exe, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", str(hz), "-f", "raw",
                             "-o", str(out)], stdout=subprocess.DEVNULL)


def profile_booking(workdir: Path, args) -> dict:
    from bench import booking

    certs = rig.Certs(workdir / "certs")
    rate = args.rate or None
    slots = int(rate * (args.seconds + 4) * 1.1) + 100 if rate else 8000
    ordering, window, split = booking.parse_mode(args.mode)
    if split:
        raise SystemExit("profile the one-process gateway (--mode fifo or patient:N)")
    lock = booking.BookingLock(workdir, certs, slots=slots, ordering=ordering, window=window,
                               reference_builders=args.reference_builders)
    try:
        lock.start()
        free = lock.free_slots()
        booking.warm_up(lock, free[-booking.WARM_UP:])
        free = free[:-booking.WARM_UP]
        gw_raw = rig.RESULTS / f"profile-booking-gateway{args.suffix}.txt"
        sim_raw = rig.RESULTS / f"profile-booking-sim{args.suffix}.txt"
        spies = []

        def attach():
            spies.append(py_spy(lock.gateway.pid, args.seconds, args.hz, gw_raw))
            spies.append(py_spy(lock.sim.pid, args.seconds, args.hz, sim_raw))

        start_in = 3.0
        timer = threading.Timer(start_in + 1.0, attach)  # one second into the run: steady state
        timer.start()
        meter = rig.CpuMeter({"gateway": lock.gateway, "sim": lock.sim})
        threading.Timer(start_in, meter.start).start()
        outs, t0 = booking.run_workers(port=lock.fhir_port, certs=certs.dir, slots=free, procs=2,
                                       threads=16 if rate else 16, rate=rate, seconds=args.seconds + 2,
                                       start_in=start_in)
        cpu = meter.stop()
        for spy in spies:
            spy.wait()
        summary = booking.summarise_requests(outs, t0, rate, args.seconds + 2)
    finally:
        lock.stop()
    return {"what": "booking", "mode": args.mode, "rate": rate, "load": summary, "cpu": cpu,
            "gateway": fold(gw_raw), "sim": fold(sim_raw)}


def profile_ingest(workdir: Path, args) -> dict:
    from bench.ingest import CONTENDERS, Ingest

    ingest = Ingest(workdir, gateway_log_level=args.log_level)
    gatewayd = next(c for c in CONTENDERS if c.key == "gatewayd")
    port = rig.free_port()
    proc = ingest.start(gatewayd, port)
    raw = rig.RESULTS / f"profile-ingest-gateway{args.suffix}.txt"
    try:
        time.sleep(0.5)
        n_per_conn = int(4000 * (args.seconds + 3) / 16)  # ~4,000 msg/s expected: outlast the sampling
        spy_box = []
        threading.Timer(1.0, lambda: spy_box.append(py_spy(proc.pid, args.seconds, args.hz, raw))).start()
        meter = rig.CpuMeter({"gateway": proc}).start()
        result = rig.run_driver(port, n_per_conn, 16)
        cpu = meter.stop()
        for spy in spy_box:
            spy.wait()
    finally:
        proc.stop()
    return {"what": "ingest", "conns": 16, "load": result, "cpu": cpu, "gateway": fold(raw)}


def profile_search(workdir: Path, args) -> dict:
    """GET /Slot?status=free&_count=20 from 4 keep-alive mTLS client processes (bench/search.py's run)."""
    from bench import search
    from bench.booking import BookingLock

    certs = rig.Certs(workdir / "certs")
    lock = BookingLock(workdir, certs, slots=2000, log_level=args.log_level)
    raw = rig.RESULTS / f"profile-search-gateway{args.suffix}.txt"
    try:
        lock.start()
        lock.free_slots()
        spy_box = []
        threading.Timer(3.0, lambda: spy_box.append(py_spy(lock.gateway.pid, args.seconds, args.hz, raw))).start()
        result = search.run_query(lock, certs, search.QUERIES["count20"], 4, args.seconds + 3)
        for spy in spy_box:
            spy.wait()
    finally:
        lock.stop()
    return {"what": "search", "load": result, "cpu": {k: result[k] for k in ("gateway_cpu_pct",
                                                                              "gateway_cpu_us_per_page")},
            "gateway": fold(raw)}


def print_profile(name: str, prof: dict, k: int = 12) -> None:
    print(f"\n== {name}: {prof['samples']} samples of the reactor thread; COMMIT on it "
          f"{prof['commit_statement_pct']}%; COMMIT in the writer thread: {prof.get('commit_thread_samples', 0)} samples")
    for c in prof["components"][:k]:
        print(f"  {c['pct']:5.1f}%  {c['component']}")
    print("  -- entry points (inclusive)")
    for e in prof["entry_points"]:
        print(f"  {e['pct']:5.1f}%  {e['entry']}")
    print("  -- top self")
    for f in prof["top_self"][:k]:
        print(f"  {f['pct']:5.1f}%  {f['function']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", default="booking,ingest", help="any of booking, ingest, search")
    ap.add_argument("--seconds", type=float, default=12.0, help="sampling time per profile")
    ap.add_argument("--hz", type=int, default=200, help="samples per second")
    ap.add_argument("--rate", type=float, default=0, help="booking: offered bookings/s (0 = saturation)")
    ap.add_argument("--mode", default="fifo", help="booking: fifo or patient:N")
    ap.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                    help="ingest: the gateway's logging.level (info, the default, logs one line per message)")
    ap.add_argument("--reference-builders", action="store_true", help="profile with the hl7apy builders")
    ap.add_argument("--suffix", default="", help="suffix for the result files (e.g. -before)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--refold", action="store_true",
                    help="run nothing: fold the saved raw stacks (bench/results/profile-*.txt) again")
    args = ap.parse_args()
    rig.RESULTS.mkdir(parents=True, exist_ok=True)
    if args.refold:
        out = rig.load_result(f"profile{args.suffix}")
        for what in ("booking", "ingest", "search"):
            if what in out:
                out[what]["gateway"] = fold(rig.RESULTS / f"profile-{what}-gateway{args.suffix}.txt")
                if what == "booking":
                    out[what]["sim"] = fold(rig.RESULTS / f"profile-booking-sim{args.suffix}.txt")
                print_profile(f"{what}: gateway", out[what]["gateway"])
        rig.save_result(f"profile{args.suffix}", out)
        return
    out = {"machine": rig.machine(), "hz": args.hz, "seconds": args.seconds}
    with rig.workspace(args.keep) as workdir:
        for what in args.what.split(","):
            sub = workdir / what
            sub.mkdir()
            rig.log(f"profiling {what} ...")
            out[what] = {"booking": profile_booking, "ingest": profile_ingest, "search": profile_search}[what](sub, args)
    rig.save_result(f"profile{args.suffix}", out)
    for what in args.what.split(","):
        print_profile(f"{what}: gateway", out[what]["gateway"])
        if what == "booking":
            print_profile("booking: HIS simulator", out[what]["sim"], k=6)
        print("  load:", {k: v for k, v in out[what]["load"].items() if k in
                          ("bookings_per_s", "msg_per_s", "pages_per_s", "p50_ms", "p99_ms", "statuses", "acks")},
              "cpu:", out[what]["cpu"])


if __name__ == "__main__":
    main()
