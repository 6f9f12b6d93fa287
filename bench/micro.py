#!/usr/bin/env python3
"""Per-operation costs behind issue 9 (make gatewayd faster), this checkout against a baseline checkout.

    python bench/micro.py --baseline DIR [--repeat 3]

Each figure is measured in a fresh process running the code of one checkout (this one, or the copy in DIR),
alternating, ``--repeat`` times; the median is reported. Nothing is asserted (benchmarks are not tests).

- ``siu_us``: CPU µs to take one SIU^S12 of the shared driver through the inner gate in one process, no
  network: ER7 parse, InnerGateHandler (SIU mapping, chamber transaction, ACK built), one message per
  transaction, with fsync off (so the figure is the CPU of the path, not the disk's);
- ``siu_statements``: SQL statements the chamber runs per such SIU (sqlite3 trace callback; BEGIN and
  COMMIT included);
- ``log_info_us`` / ``log_warning_us``: one ``inner.message`` log call with logging at info / warning;
- ``appointment_us``: booking_from_appointment on the benchmark's Appointment (``strict`` = the model);
- ``watch_ms``: the split lock's watch: ms from another process's COMMIT starting to this process's
  observers running (p50 of 150 commits 13 ms apart);
- ``handoff_us``: CPU µs per transaction, one at a time, with COMMIT on the reactor thread and with COMMIT
  handed to the writer thread (``pipeline``), fsync on.

Results: bench/results/micro.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import rig  # noqa: E402

CHILD = r'''
import importlib.util, json, os, sqlite3, subprocess, sys, tempfile, time, timeit
what, repo = sys.argv[1], sys.argv[2]
sys.path.insert(0, repo)
out = {}
tmp = tempfile.mkdtemp(prefix="gatewayd-micro-")

def driver():
    spec = importlib.util.spec_from_file_location("mllp_load", sys.argv[3])
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
    return module

if what in ("siu", "siu-info"):
    from zoneinfo import ZoneInfo
    from twisted.internet import task
    from adapters.hl7.er7 import parse
    from adapters.inner.receiver import InnerGateHandler
    from gateway.domain.slot_book import SlotBook
    from gateway.chamber.engine import Chamber
    from gateway.domain.inbound import InboundService
    from gateway.ops import logs
    logs.configure("info" if what == "siu-info" else "warning", "json", stream=open(os.devnull, "w"))
    tz = ZoneInfo("Asia/Shanghai")
    clock = task.Clock(); clock.advance(time.time())
    ch = Chamber(os.path.join(tmp, "c.sqlite3"), clock=clock.seconds); ch.open()
    conn = getattr(ch, "_writer", None) or ch._conn
    conn.execute("PRAGMA synchronous = OFF")
    handler = InnerGateHandler(InboundService(ch, SlotBook(tz)), peer="his", sending_application="GW",
                               sending_facility="F", tz=tz, clock=clock)
    drv = driver()
    msgs = [drv.make_msg(i, i % 16) for i in range(5500)]
    for m in msgs[:500]:
        handler.handle(parse(m), "peer")
    count = [0]
    conn.set_trace_callback(lambda s: count.__setitem__(0, count[0] + 1))
    handler.handle(parse(msgs[500]), "peer")
    out["siu_statements"] = count[0]
    conn.set_trace_callback(None)
    t0 = time.process_time()
    for m in msgs[501:]:
        handler.handle(parse(m), "peer")
    out["siu_info_us" if what == "siu-info" else "siu_us"] = 1e6 * (time.process_time() - t0) / (len(msgs) - 501)
    ch.close()
elif what == "log":
    import structlog
    from gateway.ops import logs
    for level in ("info", "warning"):
        logs.configure(level, "json", stream=open(os.devnull, "w"))
        log = structlog.get_logger("gateway.domain.inbound")
        f = lambda: log.info("inner.message", peer="his", control_id="L12-345", type="SIU^S12", ack="AA",
                             duplicate=False)
        out[f"log_{level}_us"] = 1e6 * min(timeit.repeat(f, number=5000, repeat=5)) / 5000
elif what == "appointment":
    from adapters.maps.fhir_scheduling import booking_from_appointment
    import inspect
    body = json.loads(sys.argv[4])
    out["appointment_us"] = 1e6 * min(timeit.repeat(lambda: booking_from_appointment(body), number=2000,
                                                     repeat=5)) / 2000
    if "strict" in inspect.signature(booking_from_appointment).parameters:
        out["appointment_strict_us"] = 1e6 * min(timeit.repeat(
            lambda: booking_from_appointment(body, strict=True), number=500, repeat=5)) / 500
elif what == "watch":
    path = os.path.join(tmp, "w.sqlite3")
    if len(sys.argv) > 4 and sys.argv[4] == "writer":
        from gateway.chamber.engine import Chamber
        from gateway.chamber.rows import ScheduleRow
        ch = Chamber(sys.argv[5], clock=time.time); ch.open()
        for i in range(150):
            time.sleep(0.013)
            ch.transact_now(lambda tx: tx.upsert_schedule(ScheduleRow(f"S{i}", str(time.time()), "", "", "", "", 0)))
        ch.close(); sys.exit()
    from twisted.internet import reactor
    from gateway.chamber.engine import Chamber
    ch = Chamber(path, reactor=reactor, clock=reactor.seconds); ch.open()
    lat, seen = [], set()
    def observed():
        now = time.time()
        for s in ch.read().schedules():
            if s.id not in seen:
                seen.add(s.id); lat.append(now - float(s.display))
    ch.observe(observed)
    ch.watch(reactor, 0.01)
    p = subprocess.Popen([sys.executable, "-c", "CODE = " + repr(CODE) + "\n" + CODE,
                          "watch", repo, sys.argv[3], "writer", path])
    def done():
        if p.poll() is None:
            reactor.callLater(0.1, done); return
        reactor.callLater(0.1, reactor.stop)
    reactor.callLater(0.5, done)
    reactor.run()
    lat.sort()
    out["watch_ms"] = 1000 * lat[len(lat) // 2]
elif what == "handoff":
    from twisted.internet import reactor, defer
    from gateway.chamber.engine import Chamber
    import inspect
    results = {}
    variants = [("inline", {"commit_in_thread": False})]
    if "pipeline" in inspect.signature(Chamber.__init__).parameters:
        variants.append(("pipeline", {"commit_in_thread": True, "pipeline": True}))
    async def run():
        for name, kw in variants:
            ch = Chamber(os.path.join(tmp, f"h-{name}.sqlite3"), reactor=reactor, clock=reactor.seconds, **kw)
            ch.open()
            c0 = time.process_time()
            for i in range(2000):
                await ch.transact(lambda tx, i=i: tx.add_message(direction="inbound", peer="his",
                                  control_id=f"c{i}", type="SIU", state="delivered", body=b"x" * 300,
                                  charset="utf-8"))
            results[f"handoff_{name}_us"] = 1e6 * (time.process_time() - c0) / 2000
            ch.close()
        reactor.stop()
    reactor.callWhenRunning(lambda: defer.ensureDeferred(run()))
    reactor.run()
    out.update(results)
print(json.dumps(out))
'''


def measure(what: str, repo: Path) -> dict:
    from bench.booking import appointment

    code = "CODE = " + repr(CHILD) + "\n" + CHILD
    body = appointment("D001-202611230900", "MRN-1").decode("utf-8")
    proc = subprocess.run([rig.PY, "-c", code, what, str(repo), str(rig.DRIVER), body],
                          capture_output=True, text=True, timeout=600,
                          env=dict(rig.os.environ, PYTHONPATH=str(repo)), cwd=rig.tempfile.gettempdir())
    if proc.returncode != 0:
        return {"error": proc.stderr[-800:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, metavar="DIR", help="a copy of the checkout before")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", default="siu,siu-info,log,appointment,watch,handoff")
    args = ap.parse_args()
    repos = {"before": Path(args.baseline).resolve(), "after": rig.REPO}
    samples: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    for _ in range(args.repeat):
        for what in args.only.split(","):
            for side, repo in repos.items():
                got = measure(what, repo)
                if "error" in got:
                    rig.log(f"{what} {side} FAILED {got['error'][-300:]}")
                    continue
                for k, v in got.items():
                    samples[side].setdefault(k, []).append(v)
    result = {"machine": rig.machine(), "baseline": str(repos["before"]), "repeat": args.repeat,
              "median": {side: {k: round(statistics.median(v), 2) for k, v in d.items()} for side, d in samples.items()},
              "samples": samples}
    rig.save_result("micro", result)
    keys = sorted(set(result["median"]["before"]) | set(result["median"]["after"]))
    print(f"{'figure':24} {'before':>10} {'after':>10}")
    for k in keys:
        print(f"{k:24} {rig.fmt(result['median']['before'].get(k)):>10} {rig.fmt(result['median']['after'].get(k)):>10}")


if __name__ == "__main__":
    main()
