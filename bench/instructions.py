#!/usr/bin/env python3
"""Instructions per unit of work (valgrind's callgrind counts them): a CPU figure that other processes on the
machine do not move, for before/after on a busy machine (issue 21: the shared 2-core box ran other engineers'
test suites while the ingest path was made faster; msg/s and even CPU µs/msg varied by ±25% run to run).

    python bench/instructions.py [--baseline DIR] [--what siu,slot-page] [--levels info,warning] [-n 1500]

- ``siu``: one SIU^S12 of the shared driver through the inner gate in one process, no network: ER7 parse, the
  InnerGateHandler (SIU map, the inbound unit of work in its own chamber transaction, fsync off), the ACK built,
  the log line at the level given; the same path as bench/micro.py's ``siu_us``;
- ``slot-page``: GET /Slot?status=free&_count=20 (and 100) answered by SchedulingApi on 2,000 free slots and
  written as JSON (no TLS, no HTTP), with the checkout's page cache if it has one and nothing changes between
  requests, and without it.

Each figure is (instructions of a run doing n units) - (instructions of the same run doing none), divided by n:
start-up and warm-up cancel out.  Needs valgrind.  Nothing is asserted.  Results: bench/results/instructions.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import rig  # noqa: E402

CHILD = r'''
import importlib.util, json, os, sys, tempfile, time
what, repo, level, n, driver_path = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
sys.path.insert(0, repo)
from zoneinfo import ZoneInfo
from twisted.internet import task
from gateway.chamber.engine import Chamber
from gateway.domain.slot_book import SlotBook
from gateway.ops import logs
logs.configure(level, "json", stream=open(os.devnull, "w"))
tz = ZoneInfo("Asia/Shanghai")
clock = task.Clock(); clock.advance(time.time())
ch = Chamber(os.path.join(tempfile.mkdtemp(), "c.sqlite3"), clock=clock.seconds); ch.open()
(getattr(ch, "_writer", None) or ch._conn).execute("PRAGMA synchronous = OFF")
if what == "siu":
    from adapters.hl7.er7 import parse
    from adapters.hl7.identity import same_message
    from adapters.inner.receiver import InnerGateHandler
    from gateway.domain.inbound import InboundService
    spec = importlib.util.spec_from_file_location("mllp_load", driver_path)
    drv = importlib.util.module_from_spec(spec); spec.loader.exec_module(drv)
    handler = InnerGateHandler(InboundService(ch, SlotBook(tz), same_message=same_message), peer="his",
                               sending_application="GW", sending_facility="F", tz=tz, clock=clock)
    msgs = [drv.make_msg(i, i % 16) for i in range(300 + n)]
    for m in msgs:
        handler.handle(parse(m), "peer")
else:
    import inspect
    from datetime import datetime, timedelta
    from gateway.domain.model import ScheduleInfo, SlotNotice
    from adapters.outer.scheduling import SchedulingApi
    start = datetime.now().replace(microsecond=0, second=0) + timedelta(days=1)
    ch.transact_now(lambda tx: SlotBook(tz).apply(tx, [
        SlotNotice("open", ScheduleInfo(f"D{i % 10:03d}", f"Dr {i % 10}", f"P{i % 10}", "", "DEP", "内科"),
                   start + timedelta(minutes=5 * (i // 10)), 5, "GEN", "普通门诊") for i in range(2000)]))
    count, cached = what.split("-")[2], what.endswith("-cached")
    kw = dict(tz=tz, quotas=None, answer_within=5, page_size=100, json_limits=None)
    params = inspect.signature(SchedulingApi.__init__).parameters
    if cached and "slot_pages" in params:
        from adapters.outer.pages import SlotPages
        kw["slot_pages"] = SlotPages.attached(ch, clock.seconds)
    api = SchedulingApi(None, ch.read, **{k: v for k, v in kw.items() if k in params})
    query = {"status": ["free"], "_count": [count]}
    for _ in range(20 + n):
        status, body, _ = api.slot_search("bench", query, "https://gw/fhir")
        data = body.encoded() if hasattr(body, "encoded") else json.dumps(body, ensure_ascii=False).encode()
'''


def instructions(what: str, repo: Path, level: str, n: int) -> int:
    code = "CODE = " + repr(CHILD) + "\n" + CHILD
    proc = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", rig.PY, "-c", code, what, str(repo), level,
         str(n), str(rig.DRIVER)],
        capture_output=True, text=True, timeout=3600, cwd=rig.tempfile.gettempdir(),
        env=dict(os.environ, PYTHONPATH=str(repo), PYTHONHASHSEED="0"))
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if proc.returncode != 0 or not found:
        raise RuntimeError(proc.stderr[-1500:])
    return int(found.group(1))


def per_unit(what: str, repo: Path, level: str, n: int) -> float:
    return (instructions(what, repo, level, n) - instructions(what, repo, level, 0)) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="", metavar="DIR", help="a checkout of the code before (its own tree)")
    ap.add_argument("--what", default="siu,slot-page-20,slot-page-100,slot-page-20-cached,slot-page-100-cached")
    ap.add_argument("--levels", default="info,warning", help="logging levels for siu")
    ap.add_argument("-n", type=int, default=1500, help="units per run (siu; slot pages: n / 10)")
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed")
    repos = {"after": rig.REPO, **({"before": Path(args.baseline).resolve()} if args.baseline else {})}
    rows = []
    for what in args.what.split(","):
        for level in (args.levels.split(",") if what == "siu" else ["warning"]):
            n = args.n if what == "siu" else max(10, args.n // 10)
            row = {"what": what, "level": level, "n": n}
            for side, repo in repos.items():
                row[side] = round(per_unit(what, repo, level, n))
            rows.append(row)
            rig.log(f"{what:22} {level:8} " + "  ".join(f"{k} {row[k]:>12,}" for k in repos))
    rig.save_result("instructions", {"machine": rig.machine(), "rows": rows})
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
