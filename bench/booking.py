#!/usr/bin/env python3
"""Booking end to end: HTTPS POST /Appointment (mutual TLS, keep-alive) -> chamber -> SRM^S01 over MLLP to
the bundled HIS simulator -> its AA -> chamber -> 201. Bookings/s and latency at fixed offered rates and at
saturation, for strict FIFO delivery (one SRM in flight) and for ``ordering: patient`` with a window.

    python bench/booking.py [--rates 50,200,500] [--seconds 10] [--modes fifo,patient:16] [--reps 1]
                            [--procs 2] [--threads 16] [--concurrency 32] [--reference-builders]

The load client is Python (this file, ``worker`` mode): ``--procs`` processes, each with threads that own
one ``http.client.HTTPSConnection`` each (TLS session set up once, then keep-alive), presenting the
platform's client certificate. wrk is not used: it cannot present a client certificate, and every booking
needs its own free slot in the body.

- Offered rate R (open loop): request k is due at t0 + k/R; a thread takes the next due request, waits for
  its time and sends it; latency is measured from the *due* time (so a late start counts: no coordinated
  omission). ``--threads`` per process bounds the requests in flight. When the gateway cannot keep up, a
  request more than a run's length (``--seconds``) behind its due time is not sent but counted as "not
  sent, overloaded" (so an overloaded run ends in bounded time; its percentiles are then lower bounds).
- Saturation (closed loop): ``--concurrency`` threads in all send back to back; latency from the send.

Every request books a different free slot for a different patient (so ``ordering: patient`` can spread);
slots come from a fresh simulator with enough 5-minute slots for the run (one gateway and simulator per
run, so runs do not share a chamber or a backlog). The simulator pushes SIU^S12 back for every booking, as
a HIS would; that traffic is part of the load. Results: bench/results/booking.json.

Before/after in one run: ``--baseline DIR`` (a copy of an earlier checkout) and a mode with the suffix
``@base`` (``--modes fifo,fifo@base``) runs that mode's gateway from DIR (the simulator and the client stay
this checkout's), interleaved with the others.  The suffixes ``@inline`` (COMMIT always on the reactor
thread), ``@pipeline`` (always in the writer thread) and ``@nothread`` (no writer thread at all) run the
gateway with that chamber variant (bench/launch.py), to see what the writer thread buys.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import ssl
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import rig  # noqa: E402

SLOTS_PER_DOCTOR_DAY = 287  # 5-minute slots in a 00:00-23:55 session
TZ = ZoneInfo("Asia/Shanghai")


def appointment(slot_id: str, mrn: str) -> bytes:
    """A platform's booking request: the slot and a contained Patient (the e2e tests' shape)."""
    return json.dumps({
        "resourceType": "Appointment",
        "status": "proposed",
        "slot": [{"reference": f"Slot/{slot_id}"}],
        "contained": [{"resourceType": "Patient", "id": "p",
                       "identifier": [{"system": "urn:oid:2.16.840.1.113883.2.4.6.3", "value": mrn,
                                       "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                                            "code": "MR"}]}}],
                       "name": [{"family": "王", "given": ["芳"]}],
                       "telecom": [{"system": "phone", "value": "13800000000"}]}],
        "participant": [{"actor": {"reference": "#p"}, "status": "needs-action"}],
    }, ensure_ascii=False).encode("utf-8")


CANCEL = json.dumps([{"op": "replace", "path": "/status", "value": "cancelled"}]).encode()


def tls_context(certs_dir: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs_dir / "ca.pem"))
    ctx.load_cert_chain(str(certs_dir / "platform-bench.pem"), str(certs_dir / "platform-bench.key"))
    return ctx


class Client:
    """One keep-alive HTTPS connection (reconnects if the server closed it)."""

    def __init__(self, host: str, port: int, ctx: ssl.SSLContext, base_path: str = "/fhir"):
        self.host, self.port, self.ctx, self.base = host, port, ctx, base_path
        self.conn = None
        self.connects = 0

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/fhir+json") -> tuple[int, bytes, dict]:
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=60)
                self.connects += 1
            try:
                headers = {"Content-Type": content_type} if body is not None else {}
                self.conn.request(method, self.base + path, body=body, headers=headers)
                resp = self.conn.getresponse()
                data = resp.read()
                return resp.status, data, dict(resp.getheaders())
            except (http.client.HTTPException, ConnectionError, ssl.SSLError, OSError):
                self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------- the worker


def worker(spec: dict) -> dict:
    """One load process: threads with keep-alive connections, open or closed loop (see the module doc)."""
    ctx = tls_context(Path(spec["certs"]))
    slots: list[str] = spec["slots"]
    threads, rate, t0, t_end = spec["threads"], spec["rate"], spec["t0"], spec["t0"] + spec["seconds"]
    nprocs, index = spec["nprocs"], spec["index"]
    cycle = spec.get("cycle", False)  # book then cancel (soak): slots are reused
    give_up = spec["seconds"]  # an open-loop request more than this late is not sent (see below)
    lock = threading.Lock()
    state = {"next": 0}
    out: list[list] = []

    def take():
        with lock:
            j = state["next"]
            state["next"] += 1
        return j

    def run_thread(tid: int):
        client = Client("127.0.0.1", spec["port"], ctx)
        client.request("GET", "/metadata")  # TLS handshake and keep-alive before t0
        mine = []
        time.sleep(max(0.0, t0 - time.time()))
        while True:
            j = take()
            if not cycle and j >= len(slots):
                break
            if rate:
                due = t0 + (j * nprocs + index) / rate
                if due > t_end:
                    break
                delay = due - time.time()
                if delay > 0:
                    time.sleep(delay)
                elif -delay > give_up and not cycle:
                    # Overloaded: the client is more than a run's length behind. Not sent, but counted (as
                    # status -1), so the run ends in bounded time and the row says it was overloaded.
                    mine.append(["book", round(due - t0, 6), None, None, -1])
                    continue
            else:
                due = time.time()
                if due > t_end:
                    break
            slot = slots[j % len(slots)]
            sent = time.time()
            try:
                status, body, headers = client.request("POST", "/Appointment",
                                                       appointment(slot, f"MRN-{index}-{j}"))
            except Exception as e:  # noqa: BLE001 - a failed request is a result, reported by status 0
                status, body, headers = 0, str(e).encode(), {}
            done = time.time()
            mine.append(["book", round(due - t0, 6), round(done - due, 6), round(done - sent, 6), status])
            if cycle and status in (200, 201, 202):
                location = headers.get("Location", "")
                path = location[location.find("/Appointment/"):] if "/Appointment/" in location else ""
                if path:
                    c0 = time.time()
                    try:
                        cstatus, _, _ = client.request("PATCH", path, CANCEL, "application/json-patch+json")
                    except Exception:  # noqa: BLE001
                        cstatus = 0
                    c1 = time.time()
                    mine.append(["cancel", round(c0 - t0, 6), round(c1 - c0, 6), round(c1 - c0, 6), cstatus])
        with lock:
            out.extend(mine)
            state.setdefault("connects", 0)
            state["connects"] += client.connects

    ts = [threading.Thread(target=run_thread, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    time.sleep(max(0.0, t0 - time.time()))
    cpu0 = time.process_time()  # the load client's own CPU while it sends (handshakes before t0 left out)
    for t in ts:
        t.join()
    return {"index": index, "results": out, "connects": state.get("connects", 0),
            "cpu_s": round(time.process_time() - cpu0, 3)}


def run_workers(*, port: int, certs: Path, slots: list[str], procs: int, threads: int, rate: float | None,
                seconds: float, cycle: bool = False, start_in: float = 3.0) -> tuple[list[dict], float]:
    """Start ``procs`` worker processes on disjoint slot lists; returns their results and t0."""
    t0 = time.time() + start_in
    shares = [slots[i::procs] for i in range(procs)]
    children = []
    for i in range(procs):
        spec = {"certs": str(certs), "port": port, "slots": shares[i], "threads": threads, "rate": rate,
                "t0": t0, "seconds": seconds, "nprocs": procs, "index": i, "cycle": cycle}
        p = subprocess.Popen([rig.PY, __file__, "worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env=dict(os.environ, PYTHONPATH=str(rig.REPO)))
        p.stdin.write(json.dumps(spec).encode())
        p.stdin.close()
        children.append(p)
    return rig.worker_results(children), t0


# ---------------------------------------------------------------------------------------- the lock


class BookingLock:
    """A HIS simulator with ``slots`` free 5-minute slots and a gateway, on loopback, in ``workdir``."""

    def __init__(self, workdir: Path, certs: rig.Certs, *, slots: int, ordering: str = "fifo", window: int = 1,
                 reference_builders: bool = False, log_level: str = "warning", counter_per_minute: float = 0.0,
                 days: int = 1, split: bool = False, gateway_repo: Path | None = None,
                 commit: str | None = None):
        self.workdir, self.certs = workdir, certs
        self.mllp_port, self.his_port, self.fhir_port = rig.free_port(), rig.free_port(), rig.free_port()
        self.doctors = max(1, math.ceil(slots / (SLOTS_PER_DOCTOR_DAY * days)))
        self.days = days
        self.first_day = (datetime.now(TZ) + timedelta(days=1)).date()
        rig.sim_config(workdir, his_port=self.his_port, mllp_port=self.mllp_port, doctors=self.doctors, days=days,
                       start_date=self.first_day.isoformat(), counter_per_minute=counter_per_minute)
        rig.gateway_config(workdir, certs, mllp_port=self.mllp_port, his_port=self.his_port,
                           fhir_port=self.fhir_port, ordering=ordering, window=window, log_level=log_level)
        self.reference_builders = reference_builders
        self.split = split
        self.gateway_repo = gateway_repo  # None: this checkout's gatewayd
        self.commit = commit  # a rig.COMMIT_VARIANTS name, or None
        self.gateway = self.sim = self.inner = None  # gateway: the (outer) process; inner: split mode only
        self.client = Client("127.0.0.1", self.fhir_port, tls_context(certs.dir))

    def start(self, timeout: float = 600) -> "BookingLock":
        t = time.monotonic()
        repo, env = self.gateway_repo, rig.repo_env(self.gateway_repo)
        if self.split:  # the split lock: two processes sharing only the chamber
            self.inner = rig.Proc("gateway-inner", rig.launch_args(
                ["run", "--gate", "inner", "--config", "gateway-inner.yaml"],
                reference_builders=self.reference_builders, repo=repo, commit=self.commit),
                self.workdir, env=env)
            rig.wait_port(self.mllp_port, 60, self.inner)
            self.gateway = rig.Proc("gateway-outer", rig.launch_args(
                ["run", "--gate", "outer", "--config", "gateway-outer.yaml"], repo=repo,
                commit=self.commit), self.workdir, env=env)
        else:
            self.gateway = rig.Proc("gateway", rig.launch_args(["run", "--config", "gateway.yaml"],
                                                               reference_builders=self.reference_builders,
                                                               repo=repo, commit=self.commit),
                                    self.workdir, env=env)
        rig.wait_port(self.fhir_port, 60, self.gateway)
        self.sim = rig.Proc("his-sim", rig.launch_args(["his-sim", "--config", "his-sim.yaml"],
                                                       reference_builders=self.reference_builders), self.workdir)
        rig.wait_port(self.his_port, 60, self.sim)
        last_day = self.first_day + timedelta(days=self.days - 1)
        last = f"D{self.doctors:03d}-{last_day:%Y%m%d}2350"  # the simulator pushes in start order: last is last
        deadline = time.monotonic() + timeout
        while self.client.request("GET", f"/Slot/{last}")[0] != 200:
            if time.monotonic() > deadline or not self.gateway.alive() or not self.sim.alive() or (
                    self.inner is not None and not self.inner.alive()):
                raise RuntimeError(f"slots did not arrive:\n{self.gateway.log_tail()}\n{self.sim.log_tail()}")
            time.sleep(0.2)
        self.startup_s = round(time.monotonic() - t, 1)
        return self

    def free_slots(self) -> list[str]:
        out, path = [], "/Slot?status=free&_count=1000"
        while path:
            status, body, _ = self.client.request("GET", path)
            if status != 200:
                raise RuntimeError(f"slot search: {status} {body[:300]!r}")
            bundle = json.loads(body)
            out += [e["resource"]["id"] for e in bundle.get("entry", [])]
            nxt = [link["url"] for link in bundle.get("link", []) if link["relation"] == "next"]
            path = nxt[0][nxt[0].find("/fhir/") + 5:] if nxt else None
        return out

    def stop(self) -> None:
        if self.client.conn is not None:
            self.client.conn.close()
        for proc in (self.sim, self.gateway, self.inner):
            if proc is not None:
                proc.stop()


# ------------------------------------------------------------------------------------------------- runs


def summarise_requests(outs: list[dict], t0: float, rate: float | None, seconds: float) -> dict:
    books = [r for o in outs for r in o["results"] if r[0] == "book"]
    not_sent = sum(1 for r in books if r[4] == -1)
    books = [r for r in books if r[4] != -1]
    statuses: dict[str, int] = {}
    for r in books:
        statuses[str(r[4])] = statuses.get(str(r[4]), 0) + 1
    ok = sorted(r for r in books if r[4] == 201)
    lat = sorted(r[2] for r in ok)  # from the due time (open loop) / the send (closed loop: due == send)
    svc = sorted(r[3] for r in ok)  # from the send
    if ok:
        span = max(r[1] + r[2] for r in ok)  # t0 -> the last 201 arrived
        first = min(r[1] for r in books)
    else:
        span, first = seconds, 0.0
    achieved = len(ok) / span if span > 0 else 0.0
    return {
        "offered_per_s": rate, "requests": len(books), "booked_201": len(ok), "statuses": statuses,
        "not_sent_overloaded": not_sent,
        "bookings_per_s": round(achieved, 1), "span_s": round(span, 2), "first_due_s": round(first, 3),
        "p50_ms": round(1000 * rig.percentile(lat, .5), 2) if lat else None,
        "p99_ms": round(1000 * rig.percentile(lat, .99), 2) if lat else None,
        "max_ms": round(1000 * lat[-1], 2) if lat else None,
        "service_p50_ms": round(1000 * rig.percentile(svc, .5), 2) if svc else None,
        "service_p99_ms": round(1000 * rig.percentile(svc, .99), 2) if svc else None,
        "connections": sum(o.get("connects", 0) for o in outs),
        # the load client's CPU (all its processes, from t0) as % of one core over the run
        "client_cpu_pct": round(100 * sum(o.get("cpu_s", 0.0) for o in outs) / span, 1) if span > 0 else None,
    }


WARM_UP = 20


def warm_up(lock: BookingLock, slots: list[str]) -> None:
    """Book and cancel a few slots through the whole path before measuring."""
    for i, slot in enumerate(slots):
        status, _, headers = lock.client.request("POST", "/Appointment", appointment(slot, f"MRN-warm-{i}"))
        location = headers.get("Location", "")
        if status == 201 and "/Appointment/" in location:
            lock.client.request("PATCH", location[location.find("/Appointment/"):], CANCEL,
                                "application/json-patch+json")


def parse_mode(text: str) -> tuple[str, int, bool]:
    """'fifo' -> ('fifo', 1, False); 'patient:16' -> ('patient', 16, False); 'split-fifo' -> the split lock
    (``gatewayd run --gate outer`` and ``--gate inner``, two processes) with strict FIFO. A suffix ``@base``
    (the baseline checkout's gateway) or another ``@variant`` is ignored here."""
    text = text.split("@", 1)[0]
    split = text.startswith("split-")
    text = text.removeprefix("split-")
    if text == "fifo":
        return "fifo", 1, split
    ordering, _, window = text.partition(":")
    return ordering, int(window or 8), split


def run_one(workdir: Path, certs: rig.Certs, *, mode: str, rate: float | None, seconds: float, procs: int,
            threads: int, concurrency: int, reference_builders: bool = False, max_slots: int = 6000,
            log_level: str = "warning", baseline: Path | None = None) -> dict:
    ordering, window, split = parse_mode(mode)
    if mode.endswith("@base") and baseline is None:
        raise ValueError(f"mode {mode}: give the baseline checkout with --baseline DIR")
    if rate:
        slots_needed = int(rate * seconds * 1.05) + 50 + WARM_UP
    else:
        slots_needed = max_slots
    lock = BookingLock(workdir, certs, slots=slots_needed, ordering=ordering, window=window,
                       reference_builders=reference_builders, log_level=log_level, split=split,
                       gateway_repo=baseline if mode.endswith("@base") else None,
                       commit=mode.split("@", 1)[1] if "@" in mode and not mode.endswith("@base") else None)
    try:
        lock.start()
        slots = lock.free_slots()
        warm_up(lock, slots[-WARM_UP:])  # first requests pay for lazy imports and caches: not measured
        slots = slots[:-WARM_UP]
        procs_measured = {"gateway": lock.gateway, "sim": lock.sim}
        if lock.inner is not None:
            procs_measured["inner"] = lock.inner
        meter = rig.CpuMeter(procs_measured)
        load = rig.load_average()
        if rate:
            n_threads = threads
        else:
            n_threads = max(1, concurrency // procs)
        start_in = 3.0
        timer = threading.Timer(start_in - 0.05, meter.start)
        timer.start()
        outs, t0 = run_workers(port=lock.fhir_port, certs=certs.dir, slots=slots, procs=procs, threads=n_threads,
                               rate=rate, seconds=seconds, start_in=start_in)
        cpu = meter.stop()
        if "inner_cpu_pct" in cpu:  # the split lock: the gateway is both processes
            cpu["outer_cpu_pct"] = cpu["gateway_cpu_pct"]
            cpu["gateway_cpu_pct"] = round(cpu["gateway_cpu_pct"] + cpu["inner_cpu_pct"], 1)
        summary = summarise_requests(outs, t0, rate, seconds)
        rss = {"gateway_rss_mb": round(lock.gateway.rss_mb(), 1), "sim_rss_mb": round(lock.sim.rss_mb(), 1)}
    finally:
        lock.stop()
    return {"mode": mode, "rate": rate, "slots": len(slots), "startup_s": lock.startup_s,
            "reference_builders": reference_builders, "load_average": load,
            "client": f"{procs} processes x {n_threads} threads, keep-alive", **summary, **cpu, **rss}


def run(args, workdir: Path) -> dict:
    certs = rig.Certs(workdir / "certs")
    machine = rig.machine()  # as the run starts (load average, checkout)
    rates: list[float | None] = [float(r) for r in args.rates.split(",") if r] + ([None] if args.saturation else [])
    modes = [m for m in args.modes.split(",") if m]
    runs = []
    serial = 0
    for rep in range(args.reps):
        for rate in rates:
            order = modes[rep % len(modes):] + modes[:rep % len(modes)]
            for mode in order:
                serial += 1
                run_dir = workdir / f"run-{serial}"
                run_dir.mkdir()
                label = f"{rate:.0f}/s" if rate else "saturation"
                try:
                    r = run_one(run_dir, certs, mode=mode, rate=rate, seconds=args.seconds, procs=args.procs,
                                threads=args.threads, concurrency=args.concurrency,
                                reference_builders=args.reference_builders, max_slots=args.max_slots,
                                log_level=args.gateway_log_level,
                                baseline=Path(args.baseline).resolve() if getattr(args, "baseline", "") else None)
                except Exception as e:  # reported, and the other runs go on
                    r = {"mode": mode, "rate": rate, "error": f"{type(e).__name__}: {e}"[:3000]}
                    rig.log(f"booking rep {rep + 1} {mode:11} {label:>10} FAILED {r['error'][:500]}")
                else:
                    rig.log(f"booking rep {rep + 1} {mode:11} {label:>10} {r['bookings_per_s']:>7} bookings/s "
                            f"p50 {r['p50_ms']} p99 {r['p99_ms']} ms statuses {r['statuses']} "
                            f"gw cpu {r['gateway_cpu_pct']}% sim cpu {r['sim_cpu_pct']}% "
                            f"client cpu {r.get('client_cpu_pct')}% (start-up {r['startup_s']} s, {r['slots']} slots, load {r['load_average'][0]})")
                r["rep"] = rep + 1
                runs.append(r)
    summary = []
    for rate in rates:
        for mode in modes:
            mine = [r for r in runs if r["mode"] == mode and r["rate"] == rate and "error" not in r]
            if not mine:
                continue
            summary.append({
                "mode": mode, "rate": rate, "runs": len(mine),
                "bookings_per_s": rig.median([r["bookings_per_s"] for r in mine]),
                "bookings_per_s_range": rig.spread([r["bookings_per_s"] for r in mine]),
                "p50_ms": rig.median([r["p50_ms"] for r in mine]),
                "p99_ms": rig.median([r["p99_ms"] for r in mine]),
                "p99_ms_range": rig.spread([r["p99_ms"] for r in mine]),
                "service_p99_ms": rig.median([r["service_p99_ms"] for r in mine]),
                "gateway_cpu_pct": rig.median([r["gateway_cpu_pct"] for r in mine]),
                "sim_cpu_pct": rig.median([r["sim_cpu_pct"] for r in mine]),
                "client_cpu_pct": rig.median([r.get("client_cpu_pct") for r in mine]),
                "non_201": sum(r["requests"] - r["booked_201"] for r in mine),
                "not_sent_overloaded": sum(r.get("not_sent_overloaded", 0) for r in mine),
                "statuses": {k: sum(r["statuses"].get(k, 0) for r in mine) for k in
                             sorted({k for r in mine for k in r["statuses"]})},
            })
    return {"machine": machine, "reps": args.reps, "seconds": args.seconds,
            "client": f"Python http.client over TLS 1.3 with the platform's client certificate, keep-alive; "
                      f"{args.procs} processes; offered rates: {args.threads} threads per process, "
                      f"saturation: {args.concurrency} threads in all",
            "reference_builders": args.reference_builders, "gateway_log_level": args.gateway_log_level,
            "summary": summary, "runs": runs}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--rates", default="50,200,500", help="offered rates per second, comma separated")
    ap.add_argument("--no-saturation", dest="saturation", action="store_false", help="skip the closed-loop run")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each run")
    ap.add_argument("--modes", default="fifo,patient:16",
                    help="relay modes: fifo (one SRM in flight) and/or patient:N (ordering: patient, window N); "
                         "prefix split- for the split lock (two gateway processes), e.g. split-patient:16")
    ap.add_argument("--reps", type=int, default=1, help="repetitions (medians are reported)")
    ap.add_argument("--procs", type=int, default=2, help="load client processes")
    ap.add_argument("--threads", type=int, default=16, help="threads per process at offered rates")
    ap.add_argument("--concurrency", type=int, default=32, help="threads in all at saturation")
    ap.add_argument("--max-slots", type=int, default=6000, help="slots offered to a saturation run")
    ap.add_argument("--reference-builders", action="store_true",
                    help="run gateway and simulator with the hl7apy SRM/SIU builders (the 'before')")
    ap.add_argument("--gateway-log-level", default="warning", choices=("debug", "info", "warning", "error"))
    ap.add_argument("--baseline", default="", metavar="DIR",
                    help="the checkout (a copy) whose gateway runs the modes suffixed @base, e.g. fifo@base")


def print_table(result: dict) -> None:
    print(f"{'mode':12} {'offered':>10} {'bookings/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'gw cpu%':>8} "
          f"{'sim cpu%':>8} {'client%':>8}  non-201")
    for row in result["summary"]:
        offered = f"{row['rate']:.0f}/s" if row["rate"] else "saturation"
        print(f"{row['mode']:12} {offered:>10} {rig.fmt(row['bookings_per_s']):>10} {rig.fmt(row['p50_ms']):>8} "
              f"{rig.fmt(row['p99_ms']):>8} {rig.fmt(row['gateway_cpu_pct']):>8} {rig.fmt(row['sim_cpu_pct']):>8}"
              f" {rig.fmt(row.get('client_cpu_pct')):>8}  {row['non_201']} {row['statuses']}")


def main() -> None:
    if sys.argv[1:2] == ["worker"]:
        spec = json.loads(sys.stdin.read())
        sys.stdout.write(json.dumps(worker(spec)))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    ap.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    ap.add_argument("--save-as", default="booking", help="name of the results file in bench/results/")
    args = ap.parse_args()
    with rig.workspace(args.keep) as workdir:
        result = run(args, workdir)
    rig.save_result(args.save_as, result)
    print_table(result)


if __name__ == "__main__":
    main()
