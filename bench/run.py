#!/usr/bin/env python3
"""gatewayd's benchmarks in one command: every contender on loopback in one run, a table on stdout, and
the figures written into docs/benchmarks.md (with the machine's description).

    python bench/run.py                      # ingest, booking, search, rush, before/after, costs (~50 min)
    python bench/run.py --quick              # one repetition, shorter runs (~12 min): a smoke run
    python bench/run.py --with-soak 10 --with-profile
    python bench/run.py --render-only        # rewrite docs/benchmarks.md from bench/results/*.json

Flags:
  --reps N            repetitions of the MLLP ingest runs (default 3; medians reported, ranges shown)
  --booking-reps N    repetitions of the booking runs (default 3)
  --seconds S         length of each booking run (default 10)
  --rates LIST        offered booking rates (default 50,200,500; saturation always runs)
  --modes LIST        relay modes for bookings (default fifo,patient:16,split-fifo,split-patient:16;
                      split- = the split lock, `gatewayd run --gate outer` + `--gate inner`)
  --search-seconds S  length of each slot-search run (default 10)
  --rush-slots N      slots the HIS releases at once in the rush (default 2000)
  --rush-patients C   would-be patients in the rush (default 2000)
  --skip LIST         any of ingest, booking, search, rush, before-after, costs
  --with-soak MIN     also run bench/soak.py for MIN minutes
  --with-profile      also run bench/profile.py (py-spy) on the booking and ingest paths
  --baseline DIR      also run the gatewayd of the checkout copied to DIR, interleaved (before/after)
  --render-only       run nothing; render docs/benchmarks.md from the saved results
  --no-docs           do not touch docs/benchmarks.md

The parts also run alone: bench/ingest.py, bench/booking.py, bench/search.py, bench/rush.py, bench/soak.py,
bench/profile.py, bench/costs.py (each with --help); search and rush repeat --booking-reps times. Needs: gcc, and `pip install hl7 txHL7 hl7apy py-spy` (py-spy only for
the profile). Nothing here is a test; pytest never collects bench/.
"""

from __future__ import annotations

import argparse
import re
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import rig  # noqa: E402

DOC = rig.REPO / "docs" / "benchmarks.md"
PEERS = ("python-hl7", "txHL7", "hl7apy")


# ------------------------------------------------------------------------------------------------- running


def run_ingest(args) -> None:
    from bench import ingest

    ns = types.SimpleNamespace(reps=args.reps, conns="1,4,16", scale=args.scale, only="",
                               gateway_log_level="warning", baseline=args.baseline)
    with rig.workspace(prefix="gatewayd-ingest-") as workdir:
        result = ingest.run(ns, workdir)
    rig.save_result("ingest", result)


def run_booking(args) -> None:
    from bench import booking

    modes = args.modes
    if args.baseline:  # every mode also as the baseline checkout has it, interleaved
        modes = ",".join(f"{m},{m}@base" for m in args.modes.split(",") if m)
    ns = types.SimpleNamespace(rates=args.rates, saturation=True, seconds=args.seconds, modes=modes,
                               reps=args.booking_reps, procs=2, threads=16, concurrency=32, max_slots=6000,
                               reference_builders=False, gateway_log_level="warning", baseline=args.baseline)
    with rig.workspace(prefix="gatewayd-booking-") as workdir:
        result = booking.run(ns, workdir)
    rig.save_result("booking", result)


def run_search(args) -> None:
    from bench import search

    ns = types.SimpleNamespace(clients=4, seconds=args.search_seconds, slots=2000, reps=args.booking_reps,
                               queries=",".join(search.QUERIES), gateway_log_level="warning")
    with rig.workspace(prefix="gatewayd-search-") as workdir:
        rig.save_result("search", search.run(ns, workdir))


def run_rush(args) -> None:
    from bench import rush

    ap = argparse.ArgumentParser()
    rush.add_arguments(ap)
    ns = ap.parse_args(["--slots", str(args.rush_slots), "--patients", str(args.rush_patients),
                        "--reps", str(args.booking_reps)])
    with rig.workspace(prefix="gatewayd-rush-") as workdir:
        rig.save_result("rush", rush.run(ns, workdir))


def run_before_after(args) -> None:
    """The same booking runs with the hl7apy builders (before) and the light writers (after), alternating."""
    from bench import booking

    runs = []
    with rig.workspace(prefix="gatewayd-before-after-") as workdir:
        certs = rig.Certs(workdir / "certs")
        serial = 0
        for rate in (200.0, None):
            for mode in [m for m in args.modes.split(",") if not m.startswith("split-")]:
                for reference in (True, False):
                    serial += 1
                    run_dir = workdir / f"run-{serial}"
                    run_dir.mkdir()
                    label = "before (hl7apy builders)" if reference else "after (light writers)"
                    try:
                        r = booking.run_one(run_dir, certs, mode=mode, rate=rate, seconds=args.seconds, procs=2,
                                            threads=16, concurrency=32, reference_builders=reference,
                                            max_slots=1500 if reference else 6000)
                    except Exception as e:  # noqa: BLE001
                        r = {"mode": mode, "rate": rate, "reference_builders": reference,
                             "error": f"{type(e).__name__}: {e}"[:2000]}
                        rig.log(f"before/after {mode} {rate} {label} FAILED {r['error'][:300]}")
                    else:
                        rig.log(f"before/after {mode:11} {('%.0f/s' % rate) if rate else 'saturation':>10} "
                                f"{label:26} {r['bookings_per_s']} bookings/s p50 {r['p50_ms']} p99 {r['p99_ms']}"
                                f" gw cpu {r['gateway_cpu_pct']}% sim cpu {r['sim_cpu_pct']}% start-up "
                                f"{r['startup_s']} s")
                    runs.append(r)
    rig.save_result("before_after", {"machine": rig.machine(), "seconds": args.seconds, "runs": runs})


def run_costs(args) -> None:
    from bench import costs

    rig.save_result("costs", costs.run())


def run_soak(args) -> None:
    from bench import soak

    ns = types.SimpleNamespace(minutes=args.with_soak, book_rate=20.0, ingest_rate=50.0, search_rate=5.0,
                               counter_per_minute=30.0, slots=2000, sample_every=10.0, warm_up=None,
                               gateway_log_level="warning")
    with rig.workspace(prefix="gatewayd-soak-") as workdir:
        rig.save_result("soak", soak.run(ns, workdir))


def run_profile(args) -> None:
    from bench import profile

    ns = types.SimpleNamespace(what="booking,ingest", seconds=12.0, hz=200, rate=0, mode="fifo",
                               reference_builders=False, suffix="")
    out = {"machine": rig.machine(), "hz": ns.hz, "seconds": ns.seconds}
    with rig.workspace(prefix="gatewayd-profile-") as workdir:
        for what in ("booking", "ingest"):
            sub = workdir / what
            sub.mkdir()
            try:
                out[what] = profile.profile_booking(sub, ns) if what == "booking" else profile.profile_ingest(sub, ns)
            except Exception as e:  # noqa: BLE001 - reported in the results, the rest goes on
                rig.log(f"profile {what} FAILED {type(e).__name__}: {e}"[:500])
    rig.save_result("profile", out)


# ----------------------------------------------------------------------------------------------- rendering


def md_machine(m: dict) -> str:
    v = m.get("versions", {})
    return "\n".join([
        "| | |", "|---|---|",
        f"| date | {m['date']} |",
        f"| CPUs (nproc) | {m['nproc']} |",
        f"| CPU model | {m['cpu']} |",
        f"| memory | {m['memory_gb']} GB |",
        f"| OS | {m['os']} |",
        f"| Python | {m['python']} (SQLite {m['sqlite']}) |",
        f"| C compiler | {m['gcc']} |",
        f"| libraries | " + ", ".join(f"{k} {val}" for k, val in v.items()) + " |",
        f"| checkout | {m['commit']} |",
        f"| load average when the run started | {' / '.join(str(x) for x in m['load_average_at_start'])} "
        f"(1 / 5 / 15 min) |",
    ])


def ingest_rows(result: dict) -> dict:
    rows = {}
    for row in result["summary"]:
        rows.setdefault(row["contender"], {"label": row["label"], "durable": row["durable"], "by_conns": {}})
        rows[row["contender"]]["by_conns"][row["conns"]] = row
    return rows


def md_ingest(result: dict) -> str:
    rows = ingest_rows(result)
    conns = result["conns"]
    head = "| contender | durable |" + "".join(f" {c} conn{'s' if c > 1 else ''}: msg/s · p50 / p99 ms |"
                                             for c in conns) + " CPU µs/msg (16) | every ACK accepted, MSA-2 matched |"
    lines = [head, "|---|---|" + "---|" * len(conns) + "---|---|"]
    for key, row in rows.items():
        cells = []
        for c in conns:
            r = row["by_conns"].get(c)
            if r is None:
                cells.append(" – |")
                continue
            cells.append(f" **{rig.fmt(r['msg_per_s'])}** ({r['msg_per_s_range']}) · {rig.fmt(r['p50_ms'])} / "
                         f"{rig.fmt(r['p99_ms'])} |")
        r16 = row["by_conns"].get(max(conns)) or next(iter(row["by_conns"].values()))
        ok = all(r["all_accepted"] and r["all_matched"] for r in row["by_conns"].values())
        acks = ",".join(sorted({a for r in row["by_conns"].values() for a in r["acks"]}))
        lines.append(f"| {row['label']} | {'yes' if row['durable'] else 'no'} |" + "".join(cells)
                     + f" {rig.fmt(r16['server_cpu_us_per_msg'])} | {'yes' if ok else 'NO'} ({acks}) |")
    failed = [r for r in result["runs"] if "error" in r]
    lines.append("")
    lines.append(f"Medians of {result['reps']} interleaved runs per cell; (min–max) in brackets. "
                 f"Messages per run: {', '.join(sorted({str(r['messages']) for r in result['runs'] if 'messages' in r}, key=int))}. "
                 f"CPU µs/msg is the server process's user+system CPU time per message at 16 connections "
                 f"(from /proc; a figure far less sensitive to the machine's background load than msg/s).")
    if failed:
        lines.append("")
        lines.append(f"**{len(failed)} run(s) failed**: " + "; ".join(
            f"{r['contender']} x{r['conns']}: {r['error'][:160]}" for r in failed))
    return "\n".join(lines)


def mode_label(mode: str) -> str:
    if "@" in mode:
        mode, variant = mode.split("@", 1)
        which = "**before** (the baseline checkout)" if variant == "base" else f"chamber variant {variant}"
        return f"{mode_label(mode)} — {which}"
    split = mode.startswith("split-")
    mode = mode.removeprefix("split-")
    text = "strict FIFO, 1 in flight" if mode == "fifo" else f"ordering: patient, window {mode.split(':')[1]}"
    return ("split lock (2 processes), " if split else "") + text


def _pct(value) -> str:
    return "—" if value is None else f"{rig.fmt(value)}%"


def md_booking(result: dict) -> str:
    lines = ["| relay mode | offered | bookings/s (range) | p50 ms | p99 ms (range) | p99 from send, ms | "
             "gateway CPU | simulator CPU | load client CPU | answers other than 201 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["summary"]:
        offered = f"{row['rate']:.0f}/s" if row["rate"] else "saturation (32 in flight)"
        mode = mode_label(row["mode"])
        others = {k: v for k, v in row["statuses"].items() if k != "201"}
        over = row.get("not_sent_overloaded", 0)
        p99 = f"**{rig.fmt(row['p99_ms'])}** ({row['p99_ms_range']})"
        if over:
            p99 = f"overloaded: {over} requests not sent (> {result['seconds']:.0f} s late); of those sent {p99}"
        lines.append(f"| {mode} | {offered} | **{rig.fmt(row['bookings_per_s'])}** ({row['bookings_per_s_range']}) | "
                     f"{rig.fmt(row['p50_ms'])} | {p99} | "
                     f"{rig.fmt(row['service_p99_ms'])} | {rig.fmt(row['gateway_cpu_pct'])}% | "
                     f"{rig.fmt(row['sim_cpu_pct'])}% | {_pct(row.get('client_cpu_pct'))} | {others or 'none'} |")
    failed = [r for r in result["runs"] if "error" in r]
    lines.append("")
    lines.append(f"Medians of {result['reps']} runs of {result['seconds']:.0f} s each; a fresh simulator and gateway "
                 f"per run. Client: {result['client']}. Latency at an offered rate is measured from the moment the "
                 f"request was due (a request that starts late because the client's threads were all waiting "
                 f"counts its wait); 'from send' excludes that wait. CPU is the share of one core over the run (the split "
                 f"lock: both gateway processes added up; the load client: all its processes, from the first "
                 f"request on). Gateway, simulator and client share the machine's 2 cores (200%).")
    if failed:
        lines.append("")
        lines.append(f"**{len(failed)} run(s) failed**: " + "; ".join(
            f"{r['mode']} {r['rate']}: {r['error'][:200]}" for r in failed))
    return "\n".join(lines)


def md_before_after(result: dict | None, costs: dict | None) -> str:
    lines = []
    if costs:
        c = costs["costs_us"]
        lines += ["Per message, in one process (timeit, best of 5):", "",
                  "| work | µs |", "|---|---|"]
        lines += [f"| {k} | {rig.fmt(v)} |" for k, v in c.items()]
        lines.append("")
    if result:
        lines += ["Booking end to end, the same run alternating the hl7apy builders (before: "
                  "`bench/launch.py --reference-builders`, gateway SRM and simulator SIU) and the light writers "
                  "(after):", "",
                  "| relay mode | offered | builders | bookings/s | p50 ms | p99 ms | gateway CPU | simulator CPU |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in result["runs"]:
            offered = f"{r['rate']:.0f}/s" if r["rate"] else "saturation"
            which = "before: hl7apy" if r["reference_builders"] else "after: light writers"
            if "error" in r:
                lines.append(f"| {r['mode']} | {offered} | {which} | failed: {r['error'][:120]} | | | | |")
                continue
            lines.append(f"| {r['mode']} | {offered} | {which} | **{rig.fmt(r['bookings_per_s'])}** | "
                         f"{rig.fmt(r['p50_ms'])} | {rig.fmt(r['p99_ms'])} | {rig.fmt(r['gateway_cpu_pct'])}% | "
                         f"{rig.fmt(r['sim_cpu_pct'])}% |")
        lines.append("")
        lines.append(f"One run of {result['seconds']:.0f} s per line.")
    return "\n".join(lines) or "_not run yet_"


def md_search(result: dict) -> str:
    lines = ["| request | pages/s (range) | p50 ms | p99 ms (range) | slots / bytes per page | gateway CPU | "
             "gateway µs per page | load client CPU | answers other than 200 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in result["summary"]:
        per_page = f"{row['slots_per_page']} / {rig.fmt(row['bytes_per_page'])}" if row["slots_per_page"] is not None \
            else f"– / {rig.fmt(row['bytes_per_page'])}"
        lines.append(f"| `GET {row['path']}` | **{rig.fmt(row['pages_per_s'])}** ({row['pages_per_s_range']}) | "
                     f"{rig.fmt(row['p50_ms'])} | **{rig.fmt(row['p99_ms'])}** ({row['p99_ms_range']}) | {per_page} | "
                     f"{rig.fmt(row['gateway_cpu_pct'])}% | {rig.fmt(row['gateway_cpu_us_per_page'])} | "
                     f"{rig.fmt(row['client_cpu_pct'])}% | {row['non_200'] or 'none'} |")
    failed = [r for r in result["runs"] if "error" in r]
    lines.append("")
    lines.append(f"Medians of {result['reps']} run(s) of {result['seconds']:.0f} s per request; {result['slots']} free "
                 f"slots in the chamber; client: {result['client']}. CPU as a share of one core over the run.")
    if failed:
        lines.append("")
        lines.append(f"**{len(failed)} run(s) failed**: " + "; ".join(f"{r['query']}: {r['error'][:200]}" for r in failed))
    return "\n".join(lines)


def md_rush(result: dict) -> str:
    s = result.get("summary")
    if not s:
        return "_every repetition failed_: " + "; ".join(r.get("error", "")[:200] for r in result["runs"])

    def cell(key: str, unit: str = "") -> str:
        return f"**{rig.fmt(s[key])}**{unit} ({s[key + '_range']})"

    quotas = ", ".join(f"{p} quota {v['quota']}: booked {'/'.join(str(n) for n in v['booked_gateway'])}"
                       for p, v in s["by_platform"].items())
    lines = ["| | median (range) |", "|---|---|",
             f"| bookings by platform against its quota (per run) | {quotas}; every quota exact in every run: "
             f"**{'yes' if s['quotas_exact_every_run'] else 'no'}**; slots left free {s['slots_left_free']} |",
             f"| double bookings (all runs) | **{s['double_bookings']}** |",
             f"| slots the HIS and the gateway disagree on afterwards (all runs) | **{s['his_gateway_disagreements']}** |",
             f"| release → last SIU^S24 sent / every slot at the gateway | {cell('release_to_last_s24_s', ' s')} / "
             f"{cell('release_to_all_at_gateway_s', ' s')} |",
             f"| release → first / last slot taken | {cell('release_to_first_taken_s', ' s')} / "
             f"{cell('release_to_last_taken_s', ' s')} |",
             f"| a slot's S24 sent → the slot taken: p50 / max | {cell('published_to_taken_p50_s', ' s')} / "
             f"{cell('published_to_taken_max_s', ' s')} |",
             f"| successful bookings (201/202): p50 / p99 from the send; p99 with the wait for a pool connection | "
             f"{cell('book_ok_p50_ms', ' ms')} / {cell('book_ok_p99_ms', ' ms')}; "
             f"{cell('book_ok_p99_ms_with_pool_wait', ' ms')} |",
             f"| refusals (409): p50 / p99 from the send; p99 with the wait for a pool connection | "
             f"{cell('refused_p50_ms', ' ms')} / {cell('refused_p99_ms', ' ms')}; "
             f"{cell('refused_p99_ms_with_pool_wait', ' ms')} |",
             f"| searches during the rush: pages/s, p50 / p99 from the send | {cell('search_pages_per_s')}, "
             f"{cell('search_p50_ms', ' ms')} / {cell('search_p99_ms', ' ms')} |",
             f"| CPU over the rush (% of one core): gateway / simulator / load client | {cell('gateway_cpu_pct', '%')} / "
             f"{cell('sim_cpu_pct', '%')} / {cell('client_cpu_pct', '%')} |",
             "",
             f"N = {result['slots']} slots, C = {result['patients']} patients, shares {result['shares']} %, "
             f"{result['cancel_share']:.0%} of the patients cancel and book again; relay {result.get('mode', 'fifo')}; "
             f"{s['runs']} run(s); client: "
             f"{result['client']}. The rush runs from the release (SIGHUP to the simulator) to the last slot taken."]
    failed = [r for r in result["runs"] if "error" in r]
    if failed:
        lines += ["", f"**{len(failed)} run(s) failed**: " + "; ".join(r["error"][:200] for r in failed)]
    return "\n".join(lines)


def md_soak(result: dict | None) -> str:
    if not result:
        return "_not run yet: `python bench/soak.py --minutes 10`_"
    t = result["traffic"]
    req = result["requests"]
    m = result.get("machine", {})
    lines = [
        f"`python bench/soak.py --minutes {result['minutes']:g}`, finished {m.get('date', '?')} (checkout "
        f"{m.get('commit', '?')}, load average {(m.get('load_average_at_start') or ['?'])[0]} at the end). "
        f"{result['minutes']:g} minutes; warm-up {result['warm_up_s']:.0f} s; RSS sampled every "
        f"{result['sample_every_s']:.0f} s. Traffic: {t['book_cancel_cycles_per_s']:g} book+cancel cycles/s "
        f"through the FHIR API (slots reused), {t['inner_siu_per_s']:g} SIU/s straight to the inner gate, "
        f"{t['searches_per_s']:g} slot searches/s, the simulator's SIU for every change and its counter booking "
        f"{t['counter_bookings_per_minute']:g} slots/minute.", "",
        "| | |", "|---|---|",
        f"| gateway RSS after warm-up → end (max) | {result['rss_after_warm_up_mb']} MB → {result['rss_last_mb']} MB "
        f"({result['rss_max_mb']} MB) |",
        f"| **growth after warm-up** | **{result['rss_growth_pct']:+.2f}%** (slope {result['rss_slope_mb_per_min']} "
        f"MB/min) |",
        f"| simulator RSS growth | {result['sim_rss_growth_pct']:+.2f}% |",
        f"| chamber on disk, growth after warm-up | {result['chamber_growth_mb']} MB |",
        *([f"| WAL file, largest sample | {result['wal_max_mb']} MB |"] if "wal_max_mb" in result else []),
        f"| bookings (POST) | {req.get('book', {})} |",
        f"| cancellations (PATCH) | {req.get('cancel', {})} |",
        f"| booking latency p50 / p99 | {result['book_p50_ms']} / {result['book_p99_ms']} ms |",
        f"| SIU to the inner gate: ACKs | {result['inner_acks']} (connection errors: {result['inner_errors']}) |",
        f"| slot searches | {result['searches']} |",
        f"| gateway still running at the end | {'yes' if result['gateway_alive_at_end'] else 'NO'} |",
        "",
        "RSS samples (s: MB): " + ", ".join(f"{s['t']:.0f}: {s['gateway_rss_mb']:.1f}" for s in result["samples"]),
    ]
    return "\n".join(lines)


def md_profile(result: dict | None) -> str:
    if not result:
        return "_not run yet: `python bench/profile.py`_"
    out = []
    for what, title in (("booking", "Booking path"), ("ingest", "MLLP ingest path")):
        p = result.get(what)
        if not p:
            continue
        g = p["gateway"]
        load = p["load"]
        if what == "booking":
            ctx = (f"{p['mode']}, {'saturation' if not p['rate'] else str(p['rate']) + '/s'}: "
                   f"{load['bookings_per_s']} bookings/s, gateway CPU {p['cpu']['gateway_cpu_pct']}%, simulator "
                   f"{p['cpu']['sim_cpu_pct']}%")
        else:
            ctx = (f"16 connections: {load['msg_per_s']} msg/s, gateway CPU {p['cpu']['gateway_cpu_pct']}% "
                   f"({round(1e6 * p['cpu']['gateway_cpu_s'] / max(1, load['messages']))} µs/msg)")
        out += [f"**{title}** ({ctx}; {g['samples']} samples of the reactor thread at {result['hz']} Hz; "
                f"the SQLite COMMIT statement alone: {g['commit_statement_pct']}%)", "",
                "| where the CPU goes (leaf frame) | share |", "|---|---|"]
        out += [f"| {c['component']} | {c['pct']}% |" for c in g["components"] if c["pct"] >= 0.5]
        out += ["", "| under (inclusive) | share |", "|---|---|"]
        out += [f"| {e['entry']} | {e['pct']}% |" for e in g["entry_points"] if e["pct"] >= 0.5]
        out += ["", "| top functions by self time | share |", "|---|---|"]
        out += [f"| `{f['function']}` | {f['pct']}% |" for f in g["top_self"][:12]]
        out.append("")
    return "\n".join(out)


def targets(ingest: dict | None, booking: dict | None, soak: dict | None, search: dict | None = None,
            rush: dict | None = None) -> tuple[str, list[str]]:
    lines = ["| target | measured | met |", "|---|---|---|"]
    plain = []
    if ingest:
        rows = ingest_rows(ingest)
        top = max(ingest["conns"])
        gw = rows.get("gatewayd", {}).get("by_conns", {}).get(top)
        peers = {k: rows[k]["by_conns"][top]["msg_per_s"] for k in PEERS if k in rows and top in rows[k]["by_conns"]}
        if gw and peers:
            # issue 21: >= 3x at logging level warning (>= 2x at the default, info, with the example config)
            level = ingest.get("gateway_log_level", "warning")
            need = 3 if level == "warning" else 2
            best = max(peers, key=peers.get)
            ratio = gw["msg_per_s"] / peers[best]
            ok = ratio >= need and gw["all_accepted"] and gw["all_matched"]
            text = (f"gatewayd {rig.fmt(gw['msg_per_s'])} msg/s vs {best} {rig.fmt(peers[best])} msg/s: "
                    f"**{ratio:.2f}x** (needs {rig.fmt(need * peers[best])}; every ACK matched: "
                    f"{'yes' if gw['all_matched'] and gw['all_accepted'] else 'NO'})")
            lines.append(f"| MLLP ingest, durable, {top} connections, logging `{level}`: ≥ {need}x the fastest "
                         f"non-durable Python peer | {text} | {'**yes**' if ok else '**no**'} |")
            plain.append(f"ingest x{top}: {ratio:.2f}x the fastest peer ({best}) -> {'met' if ok else 'missed'}")
            cpu = gw.get("server_cpu_us_per_msg")
            if cpu is not None:
                ok = cpu <= 80
                lines.append(f"| MLLP ingest: ≤ 80 µs of gateway CPU per message ({top} connections) | "
                             f"**{rig.fmt(cpu)} µs** | {'**yes**' if ok else '**no**'} |")
                plain.append(f"ingest CPU: {cpu} µs/msg -> {'met' if ok else 'missed'}")
    if booking:
        mine = [row for row in booking["summary"] if "@" not in row["mode"]]  # not the baseline's rows
        for row in mine:
            if row["rate"] == 200.0:
                # issue 21: in every repetition, so the worst repetition's p99 decides
                worst = max((r["p99_ms"] for r in booking["runs"] if r.get("mode") == row["mode"]
                             and r.get("rate") == 200.0 and r.get("p99_ms") is not None), default=None)
                ok = worst is not None and worst < 10
                lines.append(f"| booking p99 < 10 ms at 200 bookings/s in every repetition ({row['mode']}) | p99 "
                             f"**{rig.fmt(row['p99_ms'])} ms** (median; worst repetition {rig.fmt(worst)} ms) at "
                             f"{rig.fmt(row['bookings_per_s'])} bookings/s | {'**yes**' if ok else '**no**'} |")
                plain.append(f"booking p99 at 200/s ({row['mode']}): worst repetition {worst} ms -> "
                             f"{'met' if ok else 'missed'}")
        for row in mine:
            if row["rate"] is None:
                ok = row["bookings_per_s"] >= 1000
                lines.append(f"| ≥ 1,000 bookings/s at saturation ({row['mode']}) | "
                             f"**{rig.fmt(row['bookings_per_s'])}**/s ({row['bookings_per_s'] / 10:.0f}% of the "
                             f"target) | {'**yes**' if ok else '**no**'} |")
                plain.append(f"saturation ({row['mode']}): {row['bookings_per_s']}/s -> {'met' if ok else 'missed'}")
    if search:
        rows = {row["query"]: row for row in search["summary"]}
        for query, need in (("count20", 4000), ("count100", 1500)):
            row = rows.get(query)
            if row is None:
                continue
            ok = row["pages_per_s"] >= need and row["p99_ms"] is not None and row["p99_ms"] < 5
            lines.append(f"| slot search, {row['slots_per_page']} slots a page, {search['clients']} clients: ≥ "
                         f"{need:,} pages/s, p99 < 5 ms | **{rig.fmt(row['pages_per_s'])}** pages/s, p99 "
                         f"**{rig.fmt(row['p99_ms'])} ms** | {'**yes**' if ok else '**no**'} |")
            plain.append(f"search {query}: {row['pages_per_s']} pages/s p99 {row['p99_ms']} ms -> "
                         f"{'met' if ok else 'missed'}")
    if rush and rush.get("summary"):
        s = rush["summary"]
        last = s["release_to_last_taken_s"]
        ok = (last is not None and last <= 5 and s["double_bookings"] == 0 and s["quotas_exact_every_run"]
              and s["his_gateway_disagreements"] == 0 and s["refused_p99_ms"] is not None and s["refused_p99_ms"] < 50)
        lines.append(f"| rush, N = {rush['slots']:,}, C = {rush['patients']:,}: every slot taken within 5 s of its "
                     f"release, 0 double bookings, every quota exact, refusals p99 < 50 ms | last slot taken "
                     f"**{rig.fmt(last)} s** after the release; double bookings **{s['double_bookings']}**; quotas exact "
                     f"**{'yes' if s['quotas_exact_every_run'] else 'no'}**; HIS/gateway disagreements "
                     f"**{s['his_gateway_disagreements']}**; refusals p99 **{rig.fmt(s['refused_p99_ms'])} ms** | "
                     f"{'**yes**' if ok else '**no**'} |")
        plain.append(f"rush N={rush['slots']} C={rush['patients']}: last slot {rig.fmt(last)} s, double "
                     f"{s['double_bookings']}, quotas exact {s['quotas_exact_every_run']}, disagreements "
                     f"{s['his_gateway_disagreements']}, refusals p99 {rig.fmt(s['refused_p99_ms'])} ms -> "
                     f"{'met' if ok else 'missed'}")
    if soak:
        ok = soak["rss_growth_pct"] < 5
        lines.append(f"| soak: RSS growth < 5% after warm-up | **{soak['rss_growth_pct']:+.2f}%** over "
                     f"{soak['minutes']:g} min | {'**yes**' if ok else '**no**'} |")
        plain.append(f"soak RSS growth: {soak['rss_growth_pct']:+.2f}% -> {'met' if ok else 'missed'}")
    return "\n".join(lines), plain


def render() -> None:
    ingest, booking = rig.load_result("ingest"), rig.load_result("booking")
    soak, profile = rig.load_result("soak"), rig.load_result("profile")
    before_after, costs = rig.load_result("before_after"), rig.load_result("costs")
    search, rush = rig.load_result("search"), rig.load_result("rush")
    machine = (ingest or booking or costs or search or rush or {}).get("machine")
    run = rig.load_result("run") or {}
    machine_md = md_machine(machine) if machine else "_no results yet_"
    for inv in run.get("invocations", []):
        machine_md += (f"\n| run: {', '.join(inv['parts'])} | `python bench/run.py {' '.join(inv['argv'])}`, "
                       f"{inv['started']} to {inv['finished']}; checkout {inv['commit_at_start']} at the start, "
                       f"{inv['commit_at_end']} at the end; load average "
                       f"{inv['load_average_at_start'][0]} at the start, {inv['load_average_at_end'][0]} at the end |")
    blocks = {
        "machine": machine_md,
        "ingest": md_ingest(ingest) if ingest else "_not run yet_",
        "booking": md_booking(booking) if booking else "_not run yet_",
        "search": md_search(search) if search else "_not run yet: `python bench/search.py`_",
        "rush": md_rush(rush) if rush else "_not run yet: `python bench/rush.py`_",
        "before-after": md_before_after(before_after, costs),
        "soak": md_soak(soak),
        "profile": md_profile(profile),
        "targets": targets(ingest, booking, soak, search, rush)[0],
    }
    text = DOC.read_text(encoding="utf-8") if DOC.exists() else TEMPLATE
    for name, body in blocks.items():
        pattern = re.compile(rf"<!-- bench:{name} -->.*?<!-- /bench:{name} -->", re.S)
        if not pattern.search(text):
            text += f"\n<!-- bench:{name} -->\n<!-- /bench:{name} -->\n"
        text = pattern.sub(lambda m: f"<!-- bench:{name} -->\n{body}\n<!-- /bench:{name} -->", text)
    DOC.write_text(text, encoding="utf-8")


TEMPLATE = """# Benchmarks

`python bench/run.py` (see its `--help`) regenerates the blocks between `<!-- bench:... -->` markers.

## The machine
<!-- bench:machine -->
<!-- /bench:machine -->

## MLLP ingest
<!-- bench:ingest -->
<!-- /bench:ingest -->

## Booking end to end
<!-- bench:booking -->
<!-- /bench:booking -->

## Slot search
<!-- bench:search -->
<!-- /bench:search -->

## The slot-release rush
<!-- bench:rush -->
<!-- /bench:rush -->

## Before and after the light writers
<!-- bench:before-after -->
<!-- /bench:before-after -->

## Soak
<!-- bench:soak -->
<!-- /bench:soak -->

## Profile
<!-- bench:profile -->
<!-- /bench:profile -->

## Targets
<!-- bench:targets -->
<!-- /bench:targets -->
"""


def print_summary() -> None:
    from bench import booking as booking_mod
    from bench import ingest as ingest_mod
    from bench import rush as rush_mod
    from bench import search as search_mod

    results = {name: rig.load_result(name) for name in ("ingest", "booking", "search", "rush")}
    for name, title, module in (("ingest", "MLLP ingest", ingest_mod), ("booking", "Booking end to end", booking_mod),
                                ("search", "Slot search", search_mod), ("rush", "The slot-release rush", rush_mod)):
        if results[name]:
            print(f"\n{title} (medians)")
            module.print_table(results[name])
    _, plain = targets(results["ingest"], results["booking"], rig.load_result("soak"), results["search"],
                       results["rush"])
    if plain:
        print("\nTargets")
        for p in plain:
            print("  " + p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--booking-reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rates", default="50,200,500")
    ap.add_argument("--modes", default="fifo,patient:16,split-fifo,split-patient:16")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the ingest runs' message counts")
    ap.add_argument("--search-seconds", type=float, default=10.0)
    ap.add_argument("--rush-slots", type=int, default=2000)
    ap.add_argument("--rush-patients", type=int, default=2000)
    ap.add_argument("--skip", default="")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--with-soak", type=float, default=0.0, metavar="MINUTES")
    ap.add_argument("--with-profile", action="store_true")
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--baseline", default="", metavar="DIR",
                    help="a copy of an earlier checkout: its gatewayd runs too, interleaved (ingest: "
                         "gatewayd-baseline; booking: every mode also as MODE@base) — before/after in one run")
    args = ap.parse_args()
    if args.quick:
        args.reps, args.booking_reps, args.seconds, args.scale = 1, 1, 5.0, 0.5
        args.search_seconds, args.rush_slots, args.rush_patients = 5.0, 500, 500
    skip = set(filter(None, args.skip.split(",")))
    if not args.render_only:
        started = rig.machine()
        steps = [("costs", run_costs), ("ingest", run_ingest), ("booking", run_booking), ("search", run_search),
                 ("rush", run_rush), ("before-after", run_before_after)]
        for name, step in steps:
            if name not in skip:
                rig.log(f"== {name}")
                step(args)
        if args.with_soak:
            rig.log("== soak")
            run_soak(args)
        if args.with_profile:
            rig.log("== profile")
            run_profile(args)
        ended = rig.machine()
        done = [name for name, _ in steps if name not in skip] + (["soak"] if args.with_soak else []) + (
            ["profile"] if args.with_profile else [])
        invocation = {"started": started["date"], "finished": ended["date"], "commit_at_start": started["commit"],
                      "commit_at_end": ended["commit"], "load_average_at_start": started["load_average_at_start"],
                      "load_average_at_end": ended["load_average_at_start"], "argv": sys.argv[1:], "parts": done}
        previous = (rig.load_result("run") or {}).get("invocations", [])
        # keep the earlier invocations whose parts were not run again (their results are still shown)
        kept = [p for p in previous if set(p.get("parts", [])) - set(done)]
        rig.save_result("run", {"invocations": kept + [invocation]})
    if not args.no_docs:
        render()
        rig.log(f"wrote {DOC}")
    print_summary()


if __name__ == "__main__":
    main()
