#!/usr/bin/env python3
"""The slot-release rush: the HIS releases N slots at once and C would-be patients of three platforms with
quotas search and book them the moment they appear; some cancel and book again.

    python bench/rush.py [--slots 2000] [--patients 2000] [--shares 5,50,45] [--reps 1] [--procs 2]
                         [--connections 32] [--cancel-share 0.1] [--mode fifo] [--gateway-log-level warning]

The lock: a fresh HIS simulator and gateway per repetition, on loopback. The simulator's rush doctors
(``R001``..., 1-minute slots, a day three days ahead, so no slot is within the quotas' ``release_before``)
are ``held: true``: nothing of them is published until the bench sends the simulator SIGHUP (the
*release*), which opens all N slots in one transaction and pushes one SIU^S24 each, in start order, over
its one MLLP connection (one notification in flight, each ACKed after the gateway's COMMIT). A warm-up
doctor (``W001``, 20 slots, published at start) takes one booking and cancellation per platform first, so
lazy imports and caches are not in the figures.

Three platforms (``p1``, ``p2``, ``p3``) have quotas ``share: <s>%`` on every schedule (``'*'``) with
``release_before: 24h``; the patients are divided between them in proportion to their shares (so there are
about as many patients as slots a platform may hold: every quota is used up only if every patient is
served). Rate limits and the per-address connection limit are lifted (as in bench/booking.py).

The load client: ``--procs`` processes, each an asyncio loop with aiohttp; every platform has
``--connections`` keep-alive mutual-TLS connections per process (its certificate; handshakes done before
the rush), shared by its patients, as a platform's back end shares its pool among its users. A patient
from one second before the release: searches ``GET /Slot?status=free&schedule=R001,...&start=ge<a random
minute of the day>&_count=20`` (then without ``start`` if that page is empty), books a random slot of the
page (``POST /Appointment``), and on 409 searches again at once; an empty page before anything was seen:
tries again after ``--poll`` seconds (jittered), so everyone is polling when the slots appear. A patient
who got a booking is done, except ``--cancel-share`` of them, who cancel it (PATCH status cancelled) and
book again. A patient gives up after ``--patience`` seconds of empty pages once slots were seen (the
platform's quota is used up), or at ``--deadline`` seconds after the release.

Printed (and in bench/results/rush.json): bookings by platform against each quota (as the clients saw them
and as the gateway lists them afterwards); double bookings (a slot with two live appointments in the
gateway, or two un-cancelled 201s in the clients' records: both must be 0); slots the HIS and the gateway
disagree on afterwards (the simulator's store, read after it stopped, against the gateway's Slots and
Appointments: must be 0); time from the release to the last slot taken, and per slot from its S24 leaving
the simulator (its sent journal) to its booking; p50/p99 of successful bookings and of refusals; search
pages/s during the rush; the CPU of the gateway, the simulator and the load client over the rush (a
client near 100% of a core per process would be the bottleneck). With ``--reps`` the table gives medians
and (min-max) ranges, as bench/siege.py does. Nothing here is a test; nothing asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import ssl
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import quote
from zoneinfo import ZoneInfo

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import rig  # noqa: E402
from bench.booking import CANCEL, Client, appointment, parse_mode  # noqa: E402

TZ = ZoneInfo("Asia/Shanghai")
PLATFORMS = ("p1", "p2", "p3")
OBSERVER = "ops"  # a fourth platform, without quota and only Slot.read: sees every slot, for the checks
RUSH_PREFIX = "R"
WARM = "W001"
SLOTS_PER_DOCTOR = 1000  # 1-minute slots from 00:00: at most 16 h 40 min of one day per doctor
#: a request's record: what, whose, when the patient wanted it, when its headers went out on a pool connection,
#: when its answer was read, the status, and the slot (book, cancel) or the page's length (search)
KIND, PLATFORM, WANTED, SENT, DONE, STATUS, DETAIL = range(7)


# ------------------------------------------------------------------------------------------------ the plan


def plan(slots: int, patients: int, shares: list[float]) -> dict:
    """The rush doctors (id -> slot count), each platform's quota (sum over doctors of floor(share x count),
    the gateway's rule) and its patients (in proportion to the shares, largest remainder)."""
    doctors = max(1, math.ceil(slots / SLOTS_PER_DOCTOR))
    counts = {f"{RUSH_PREFIX}{i + 1:03d}": slots // doctors + (1 if i < slots % doctors else 0)
              for i in range(doctors)}
    quotas = {p: sum(round(s * 10_000) * n // 1_000_000 for n in counts.values())
              for p, s in zip(PLATFORMS, shares)}
    exact = [patients * s / sum(shares) for s in shares]
    people = [int(x) for x in exact]
    for i in sorted(range(len(shares)), key=lambda i: exact[i] - people[i], reverse=True)[:patients - sum(people)]:
        people[i] += 1
    return {"doctors": counts, "quotas": quotas, "patients": dict(zip(PLATFORMS, people)),
            "shares": dict(zip(PLATFORMS, shares))}


def session_for(count: int) -> str:
    """'00:00-HH:MM' holding exactly ``count`` 1-minute slots."""
    return f"00:00-{count // 60:02d}:{count % 60:02d}"


class RushLock:
    """The simulator (rush doctors held, a warm-up doctor open) and the gateway with three platforms."""

    def __init__(self, workdir: Path, certs: rig.Certs, the_plan: dict, *, log_level: str, connections: int,
                 procs: int, mode: str = "fifo"):
        self.workdir, self.certs_dir, self.plan = workdir, certs.dir, the_plan
        self.mllp_port, self.his_port, self.fhir_port = rig.free_port(), rig.free_port(), rig.free_port()
        self.day = (datetime.now(TZ) + timedelta(days=3)).date()
        warm_day = self.day  # the same day: the warm-up doctor's quota is its own schedule's
        doctor = {"family": "华", "given": "佗", "service": {"code": "famous-consult", "text": "名医门诊"},
                  "slot_minutes": 1}
        sim = {
            "listen": f"tcp:{self.his_port}:interface=127.0.0.1",
            "gateway": {"host": "127.0.0.1", "port": self.mllp_port},
            "publish": "push", "received_log": "his-received.jsonl", "sent_log": "his-sent.jsonl",
            "store": "his-sim.sqlite3", "days": 1, "start_date": warm_day.isoformat(),
            "counter_bookings_per_minute": 0, "seed": 7, "max_connections": 256,
            "departments": [{"code": "FAME", "name": "名医", "doctors": [
                {"id": WARM, **doctor, "sessions": [session_for(20)]},
                *({"id": d, **doctor, "sessions": [session_for(n)], "held": True}
                  for d, n in the_plan["doctors"].items())]}],
        }
        (workdir / "his-sim.yaml").write_text(yaml.safe_dump(sim, allow_unicode=True), encoding="utf-8")
        ordering, window, _ = parse_mode(mode)
        path = rig.gateway_config(workdir, certs, mllp_port=self.mllp_port, his_port=self.his_port,
                                  fhir_port=self.fhir_port, log_level=log_level, ordering=ordering, window=window)
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        wanted = connections * procs * len(PLATFORMS) + 64
        config["outer"]["max_connections_per_address"] = max(64, wanted)  # the load client's pools: all from 127.0.0.1
        config["outer"]["max_connections"] = max(2048, wanted)
        config["platforms"] = [{
            "name": p, "certificate_subject": f"CN=platform-{p}", "rate_limit": None,
            "quotas": [{"schedule": "*", "share": f"{share:g}%", "release_before": "24h"}],
        } for p, share in the_plan["shares"].items()] + [
            {"name": OBSERVER, "certificate_subject": f"CN=platform-{OBSERVER}", "rate_limit": None,
             "scopes": ["Slot.read", "Schedule.read"]}]
        path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
        self.gateway = self.sim = None

    def start(self) -> "RushLock":
        t = time.monotonic()
        self.gateway = rig.Proc("gateway", rig.launch_args(["run", "--config", "gateway.yaml"]), self.workdir)
        rig.wait_port(self.fhir_port, 60, self.gateway)
        self.sim = rig.Proc("his-sim", rig.launch_args(["his-sim", "--config", "his-sim.yaml"]), self.workdir)
        rig.wait_port(self.his_port, 60, self.sim)
        client = self.client("p1")
        last = f"{WARM}-{self.day:%Y%m%d}0019"
        deadline = time.monotonic() + 120
        while client.request("GET", f"/Slot/{last}")[0] != 200:
            if time.monotonic() > deadline or not self.gateway.alive() or not self.sim.alive():
                raise RuntimeError(f"the warm-up slots did not arrive:\n{self.gateway.log_tail()}\n"
                                   f"{self.sim.log_tail()}")
            time.sleep(0.1)
        self.startup_s = round(time.monotonic() - t, 1)
        return self

    def client(self, platform: str) -> Client:
        return Client("127.0.0.1", self.fhir_port, tls_context(self.certs_dir, platform))

    def warm_up(self) -> None:
        """Each platform books one warm-up slot and cancels it (lazy imports, caches, the SRM path)."""
        for i, p in enumerate(PLATFORMS):
            client = self.client(p)
            slot = f"{WARM}-{self.day:%Y%m%d}{i // 60:02d}{i % 60:02d}"
            status, _, headers = client.request("POST", "/Appointment", appointment(slot, f"MRN-warm-{p}"))
            location = headers.get("Location", "")
            if status in (201, 202) and "/Appointment/" in location:
                client.request("PATCH", location[location.find("/Appointment/"):], CANCEL,
                               "application/json-patch+json")
            client.request("GET", "/Slot?status=free&_count=20")

    def stop(self) -> None:
        for proc in (self.sim, self.gateway):
            if proc is not None:
                proc.stop()


def tls_context(certs_dir: Path, platform: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs_dir / "ca.pem"))
    ctx.load_cert_chain(str(certs_dir / f"platform-{platform}.pem"), str(certs_dir / f"platform-{platform}.key"))
    return ctx


# ------------------------------------------------------------------------------------------- the patients


def worker(spec: dict) -> None:
    """One load process (``rush.py worker``): spec on stdin's first line; prints 'ready' once its connections
    are up, waits for the line 'go <t_start> <deadline>', runs its patients, prints its records as JSON."""
    import aiohttp

    async def main() -> dict:
        base = f"https://127.0.0.1:{spec['port']}/fhir"
        trace = aiohttp.TraceConfig()  # when a request got a connection of the pool and went out

        async def headers_sent(session, context, params) -> None:
            if context.trace_request_ctx is not None:
                context.trace_request_ctx[SENT] = round(time.time(), 6)

        trace.on_request_headers_sent.append(headers_sent)
        sessions = {}
        for p in PLATFORMS:
            connector = aiohttp.TCPConnector(limit=spec["connections"], ssl=tls_context(Path(spec["certs"]), p),
                                             keepalive_timeout=300)
            sessions[p] = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60),
                                                trace_configs=[trace])

        async def fetch(p, method, path, body=None, content_type="application/fhir+json", record=None):
            headers = {"Content-Type": content_type} if body is not None else None
            async with sessions[p].request(method, base + path, data=body, headers=headers,
                                           trace_request_ctx=record) as resp:
                return resp.status, await resp.read(), resp.headers.get("Location", "")

        # every connection of every pool opened (TLS handshake) before the rush
        await asyncio.gather(*(fetch(p, "GET", "/metadata") for p in PLATFORMS for _ in range(spec["connections"])))
        print("ready", flush=True)
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        _, t_start, deadline = line.split()
        t_start, deadline = float(t_start), float(deadline)
        state = {"complete": None}  # when the bench saw every released slot at the gateway

        async def await_complete() -> None:
            if (await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)).strip() == "released":
                state["complete"] = time.time()

        listener = asyncio.ensure_future(await_complete())
        records: list[list] = []  # see KIND...DETAIL
        schedules = ",".join(spec["doctors"])
        day, minutes = spec["day"], max(spec["doctors"].values())

        async def timed(kind, p, method, path, body=None, content_type="application/fhir+json"):
            wanted = round(time.time(), 6)
            record = [kind, p, wanted, wanted, None, None, None]
            try:
                status, data, location = await fetch(p, method, path, body, content_type, record)
            except Exception as e:  # noqa: BLE001 - a failed request is a result (status 0)
                status, data, location = 0, str(e).encode(), ""
            record[DONE], record[STATUS] = round(time.time(), 6), status
            records.append(record)
            return status, data, location, record

        async def search(p, start):
            path = f"/Slot?status=free&schedule={schedules}&_count=20" + (f"&start={quote(start)}" if start else "")
            status, data, _, record = await timed("search", p, "GET", path)
            if status != 200:
                return None
            entries = [e["resource"]["id"] for e in json.loads(data).get("entry", [])]
            record[DETAIL] = len(entries)
            return entries

        async def patient(index: int, p: str) -> None:
            prng = random.Random(spec["seed"] * 100_003 + index)
            rebook = prng.random() < spec["cancel_share"]
            seen_at = None
            await asyncio.sleep(max(0.0, t_start - time.time()) + prng.random() * spec["poll"])
            while time.time() < deadline:
                minute = prng.randrange(minutes)
                page = await search(p, f"ge{day}T{minute // 60:02d}:{minute % 60:02d}:00")
                if page == []:
                    page = await search(p, None)
                if not page:
                    complete = state["complete"]
                    if page is not None and complete is not None and \
                            time.time() - max(complete, seen_at or 0.0) > spec["patience"]:
                        return  # every slot is out and the platform shows none: its quota is used up
                    await asyncio.sleep(spec["poll"] * prng.uniform(0.5, 1.5) if page is not None else 0.05)
                    continue
                seen_at = time.time()
                slot = prng.choice(page)
                status, _, location, record = await timed(
                    "book", p, "POST", "/Appointment", appointment(slot, f"MRN-{spec['index']}-{index}"))
                record[DETAIL] = slot
                if status in (201, 202):
                    if not rebook:
                        return
                    rebook = False
                    path = location[location.find("/Appointment/"):]
                    _, _, _, crecord = await timed("cancel", p, "PATCH", path, CANCEL, "application/json-patch+json")
                    crecord[DETAIL] = slot
                elif status not in (409,):
                    await asyncio.sleep(0.05)  # 429, 503, a lost connection: try again a little later

        cpu0 = time.process_time()
        await asyncio.gather(*(patient(i, p) for i, p in enumerate(spec["patients"])))
        cpu = time.process_time() - cpu0
        listener.cancel()
        for s in sessions.values():
            await s.close()
        return {"index": spec["index"], "records": records, "cpu_s": round(cpu, 3)}

    print(json.dumps(asyncio.run(main())), flush=True)


def start_workers(lock: RushLock, the_plan: dict, args) -> list[subprocess.Popen]:
    """The load processes, each with its share of every platform's patients, connected and ready."""
    everyone = [p for p in PLATFORMS for _ in range(the_plan["patients"][p])]
    random.Random(11).shuffle(everyone)
    children = []
    for i in range(args.procs):
        spec = {"index": i, "port": lock.fhir_port, "certs": str(lock.certs_dir), "patients": everyone[i::args.procs],
                "connections": args.connections, "doctors": the_plan["doctors"], "day": lock.day.isoformat(),
                "poll": args.poll, "patience": args.patience, "cancel_share": args.cancel_share, "seed": 1000 + i}
        p = subprocess.Popen([rig.PY, __file__, "worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env=dict(os.environ, PYTHONPATH=str(rig.REPO)), text=True)
        p.stdin.write(json.dumps(spec) + "\n")
        p.stdin.flush()
        children.append(p)
    for p in children:
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError(f"load worker failed to start ({p.poll()})")
    return children


class ReleaseWatch:
    """In a thread, from the release on: when the last released slot is at the gateway (the observer's search
    finds ``total`` rush slots), tell the load workers ('released'; they let patients give up from then on)
    and close their stdin; at ``deadline`` close it anyway."""

    def __init__(self, lock: RushLock, children: list[subprocess.Popen], total: int, deadline: float):
        self.lock, self.children, self.total, self.deadline = lock, children, total, deadline
        self.complete_at: float | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "ReleaseWatch":
        self._thread.start()
        return self

    def join(self) -> None:
        self._thread.join()

    def _run(self) -> None:
        client = self.lock.client(OBSERVER)
        path = f"/Slot?schedule={','.join(self.lock.plan['doctors'])}&_count=1&_offset={self.total - 1}"
        try:
            while time.time() < self.deadline:
                status, body, _ = client.request("GET", path)
                if status == 200 and json.loads(body).get("entry"):
                    self.complete_at = time.time()
                    break
                time.sleep(0.02)
        finally:
            for c in self.children:
                with contextlib.suppress(OSError, ValueError):
                    c.stdin.write("released\n" if self.complete_at else "not released\n")
                    c.stdin.close()


class CpuSampler:
    """CPU seconds of some processes, sampled every ``every`` s in a thread (windows chosen afterwards)."""

    def __init__(self, pids: dict[str, int], every: float = 0.05):
        self.pids, self.every = pids, every
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        self.samples.append((time.time(), {k: rig.process_cpu_seconds(pid) for k, pid in self.pids.items()}))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every)

    def start(self) -> "CpuSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def pct(self, t0: float, t1: float) -> dict[str, float | None]:
        """Each process's CPU as % of one core between the samples nearest ``t0`` and ``t1``."""
        if not self.samples or t1 <= t0:
            return {k: None for k in self.pids}
        a = min(self.samples, key=lambda s: abs(s[0] - t0))
        b = min(self.samples, key=lambda s: abs(s[0] - t1))
        wall = b[0] - a[0]
        return {k: round(100 * (b[1][k] - a[1][k]) / wall, 1) if wall > 0 else None for k in self.pids}


# ---------------------------------------------------------------------------------- what happened, checked


def gateway_view(lock: RushLock) -> dict:
    """The gateway's answers after the rush: every rush Slot's status and every platform's live Appointments."""
    slots, appointments = {}, []
    client = lock.client(OBSERVER)
    path = f"/Slot?schedule={','.join(lock.plan['doctors'])}&_count=1000"
    while path:
        status, body, _ = client.request("GET", path)
        if status != 200:
            raise RuntimeError(f"slot listing: {status} {body[:300]!r}")
        bundle = json.loads(body)
        slots.update({e["resource"]["id"]: e["resource"]["status"] for e in bundle.get("entry", [])})
        path = next_path(bundle)
    for p in PLATFORMS:
        client = lock.client(p)
        path = "/Appointment?status=booked,pending&_count=1000"
        while path:
            status, body, _ = client.request("GET", path)
            if status != 200:
                raise RuntimeError(f"appointment listing ({p}): {status} {body[:300]!r}")
            bundle = json.loads(body)
            for e in bundle.get("entry", []):
                r = e["resource"]
                slot = r["slot"][0]["reference"].split("/")[-1]
                if slot.startswith(RUSH_PREFIX):
                    appointments.append({"platform": p, "id": r["id"], "slot": slot, "status": r["status"]})
            path = next_path(bundle)
    return {"slots": slots, "appointments": appointments}


def next_path(bundle: dict) -> str | None:
    nxt = [link["url"] for link in bundle.get("link", []) if link["relation"] == "next"]
    return nxt[0][nxt[0].find("/fhir/") + 5:] if nxt else None


def his_view(lock: RushLock) -> dict:
    """The simulator's store, read after it stopped: every rush slot's status and the placer of its booking."""
    from hissim.store import Store

    store = Store(lock.workdir / "his-sim.sqlite3")
    store.open()
    try:
        inventory = store.load_inventory()
    finally:
        store.close()
    out = {}
    for slot in inventory.slots():
        if slot.schedule.id.startswith(RUSH_PREFIX):
            out[f"{slot.schedule.id}-{slot.start:%Y%m%d%H%M}"] = (
                slot.status.value, slot.booking.placer_id or slot.booking.by if slot.booking else None)
    return out


def disagreements(gw: dict, his: dict) -> list[str]:
    """Slots the HIS and the gateway see differently: booked on one side and not the other, or booked for
    another appointment; a slot one side has and the other has not."""
    by_slot: dict[str, list[dict]] = {}
    for a in gw["appointments"]:
        by_slot.setdefault(a["slot"], []).append(a)
    out = []
    for slot in sorted(set(his) | set(gw["slots"])):
        if slot not in his or slot not in gw["slots"]:
            out.append(f"{slot}: only in the {'gateway' if slot not in his else 'HIS'}")
            continue
        status, placer = his[slot]
        live = by_slot.get(slot, [])
        gw_status = gw["slots"][slot]
        if status == "Booked":
            if gw_status == "free" or placer not in {a["id"] for a in live}:
                out.append(f"{slot}: HIS booked for {placer}, gateway {gw_status} with {[a['id'] for a in live]}")
        elif status == "Open" and (gw_status != "free" or live):
            out.append(f"{slot}: HIS open, gateway {gw_status} with {[a['id'] for a in live]}")
    return out


def released_at(lock: RushLock) -> dict[str, float]:
    """Slot id -> when its S24 first left the simulator (its sent journal), for the released slots."""
    out = {}
    with open(lock.workdir / "his-sent.jsonl", encoding="utf-8") as f:
        for line in f:
            e = json.loads(line)
            if e.get("reason") == "release" and e.get("type") == "SIU^S24":
                out[f"{e['schedule']}-{e['start']}"] = datetime.fromisoformat(e["time"]).timestamp()
    return out


def quiet(lock: RushLock, timeout: float = 60.0) -> None:
    """Wait until nothing moves: no appointment pending at the gateway and the simulator's sent journal not
    growing for a second (every S12 of the rush delivered)."""
    deadline = time.monotonic() + timeout
    size, stable_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        pending = sum(1 for p in PLATFORMS for _ in
                      json.loads(lock.client(p).request("GET", "/Appointment?status=pending&_count=1000")[1])
                      .get("entry", []))
        now_size = (lock.workdir / "his-sent.jsonl").stat().st_size
        if now_size != size:
            size, stable_since = now_size, time.monotonic()
        if pending == 0 and time.monotonic() - stable_since > 1.0:
            return
        time.sleep(0.2)


def ms(values: list[float], p: float) -> float | None:
    values = sorted(values)
    return round(1000 * rig.percentile(values, p), 2) if values else None


def run_one(workdir: Path, certs: rig.Certs, args) -> dict:
    the_plan = plan(args.slots, args.patients, [float(s) for s in args.shares.split(",")])
    lock = RushLock(workdir, certs, the_plan, log_level=args.gateway_log_level, connections=args.connections,
                    procs=args.procs, mode=args.mode)
    children: list[subprocess.Popen] = []
    try:
        lock.start()
        lock.warm_up()
        children = start_workers(lock, the_plan, args)
        sampler = CpuSampler({"gateway": lock.gateway.pid, "sim": lock.sim.pid,
                              **{f"client{i}": c.pid for i, c in enumerate(children)}}).start()
        load = rig.load_average()
        t_start = time.time() + 0.5
        t_release = t_start + args.lead
        deadline = t_release + args.deadline
        for c in children:
            c.stdin.write(f"go {t_start} {deadline}\n")
            c.stdin.flush()
        time.sleep(max(0.0, t_release - time.time()))
        t_release = time.time()
        lock.sim.popen.send_signal(signal.SIGHUP)
        watch = ReleaseWatch(lock, children, sum(the_plan["doctors"].values()), deadline).start()
        outs = rig.worker_results(children)
        t_end = time.time()
        sampler.stop()
        watch.join()
        quiet(lock)
        gw = gateway_view(lock)
        published = released_at(lock)
        lock.sim.stop()
        his = his_view(lock)
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
                c.wait()
        lock.stop()
    return summarise(the_plan, outs, gw, his, published, sampler, t_release=t_release, t_end=t_end,
                     t_complete=watch.complete_at, load=load, startup_s=lock.startup_s)


def summarise(the_plan, outs, gw, his, published, sampler, *, t_release, t_end, t_complete, load,
              startup_s) -> dict:
    records = [r for o in outs for r in o["records"]]
    books = [r for r in records if r[KIND] == "book"]
    took = [r for r in books if r[STATUS] in (201, 202)]
    refused = [r for r in books if r[STATUS] == 409]
    cancels = [r for r in records if r[KIND] == "cancel"]
    searches = [r for r in records if r[KIND] == "search"]
    statuses: dict[str, dict[str, int]] = {}
    for r in records:
        statuses.setdefault(r[KIND], {}).setdefault(str(r[STATUS]), 0)
        statuses[r[KIND]][str(r[STATUS])] += 1
    # bookings held at the end, as the clients saw them: 201/202 (pending) minus their cancellations (200, or
    # 202: pending, completed in the background)
    held: dict[tuple[str, str], int] = {}
    for r in took:
        held[(r[PLATFORM], r[DETAIL])] = held.get((r[PLATFORM], r[DETAIL]), 0) + 1
    for r in cancels:
        if r[STATUS] in (200, 202):
            held[(r[PLATFORM], r[DETAIL])] -= 1
    per_slot: dict[str, int] = {}
    for (_, slot), n in held.items():
        per_slot[slot] = per_slot.get(slot, 0) + n
    gw_per_slot: dict[str, int] = {}
    for a in gw["appointments"]:
        gw_per_slot[a["slot"]] = gw_per_slot.get(a["slot"], 0) + 1
    by_platform = {}
    for p in PLATFORMS:
        gw_n = sum(1 for a in gw["appointments"] if a["platform"] == p)
        by_platform[p] = {"share_pct": the_plan["shares"][p], "quota": the_plan["quotas"][p],
                          "patients": the_plan["patients"][p], "booked_gateway": gw_n,
                          "booked_clients": sum(n for (q, _), n in held.items() if q == p),
                          "exact": gw_n == the_plan["quotas"][p]}
    first_taken: dict[str, float] = {}
    for r in sorted(took, key=lambda r: r[DONE]):
        first_taken.setdefault(r[DETAIL], r[DONE])
    last_taken = max(first_taken.values()) if first_taken else None
    waits = sorted(first_taken[s] - published[s] for s in first_taken if s in published)
    rush_end = last_taken or t_end
    in_rush = [r for r in searches if t_release <= r[DONE] <= rush_end]
    cpu = sampler.pct(t_release, rush_end)
    disagree = disagreements(gw, his)

    def latency(rows: list[list], name: str) -> dict:
        """p50/p99 from the send (the gateway's answer time), and p99 from when the patient wanted it (with
        the wait for a free connection of the platform's pool)."""
        return {f"{name}_p50_ms": ms([r[DONE] - r[SENT] for r in rows], .5),
                f"{name}_p99_ms": ms([r[DONE] - r[SENT] for r in rows], .99),
                f"{name}_p99_ms_with_pool_wait": ms([r[DONE] - r[WANTED] for r in rows], .99)}

    def since_release(t: float | None) -> float | None:
        return round(t - t_release, 3) if t else None

    return {
        "slots": sum(the_plan["doctors"].values()), "patients": sum(the_plan["patients"].values()),
        "doctors": the_plan["doctors"], "by_platform": by_platform,
        "quotas_exact": all(v["exact"] for v in by_platform.values()),
        "slots_booked_gateway": len(gw_per_slot),
        "slots_left_free": sum(1 for s in gw["slots"].values() if s == "free"),
        "double_bookings_gateway": sum(1 for n in gw_per_slot.values() if n > 1),
        "double_bookings_clients": sum(1 for n in per_slot.values() if n > 1),
        "his_gateway_disagreements": len(disagree), "disagreement_examples": disagree[:10],
        "release_to_last_s24_s": since_release(max(published.values()) if published else None),
        "release_to_all_at_gateway_s": since_release(t_complete),
        "release_to_first_taken_s": since_release(min(first_taken.values()) if first_taken else None),
        "release_to_last_taken_s": since_release(last_taken),
        "published_to_taken_p50_s": round(rig.percentile(waits, .5), 3) if waits else None,
        "published_to_taken_max_s": round(waits[-1], 3) if waits else None,
        **latency(took, "book_ok"), **latency(refused, "refused"), **latency(in_rush, "search"),
        "searches_in_rush": len(in_rush),
        "search_pages_per_s": round(len(in_rush) / (rush_end - t_release), 1) if rush_end > t_release else None,
        "bookings_201_202": len(took), "refusals_409": len(refused), "cancellations": len(cancels),
        "statuses": statuses,
        "gateway_cpu_pct": cpu["gateway"], "sim_cpu_pct": cpu["sim"],
        "client_cpu_pct": round(sum(v for k, v in cpu.items() if k.startswith("client") and v is not None), 1),
        "client_cpu_pct_per_process": {k: v for k, v in cpu.items() if k.startswith("client")},
        "client_cpu_s_whole_run": round(sum(o["cpu_s"] for o in outs), 2),
        "load_average": load, "startup_s": startup_s,
    }


#: the figures of a row, with the rule that makes them one median (the rest are summed or taken as they are)
MEDIANS = ("release_to_last_s24_s", "release_to_all_at_gateway_s", "release_to_first_taken_s",
           "release_to_last_taken_s", "published_to_taken_p50_s", "published_to_taken_max_s",
           *(f"{name}_{figure}" for name in ("book_ok", "refused", "search")
             for figure in ("p50_ms", "p99_ms", "p99_ms_with_pool_wait")),
           "search_pages_per_s", "gateway_cpu_pct", "sim_cpu_pct", "client_cpu_pct")


def run(args, workdir: Path) -> dict:
    from gateway.ops.devca import init_dev_ca

    certs = rig.Certs(workdir / "certs")
    init_dev_ca(certs.dir, platforms=(*PLATFORMS, OBSERVER))
    machine = rig.machine()
    runs = []
    for rep in range(args.reps):
        run_dir = workdir / f"run-{rep + 1}"
        run_dir.mkdir()
        try:
            r = run_one(run_dir, certs, args)
        except Exception as e:  # noqa: BLE001 - reported, the other repetitions go on
            r = {"error": f"{type(e).__name__}: {e}"[:3000]}
            rig.log(f"rush rep {rep + 1} FAILED {r['error'][:500]}")
        else:
            rig.log(f"rush rep {rep + 1}: last slot taken {r['release_to_last_taken_s']} s after the release "
                    f"(last S24 {r['release_to_last_s24_s']} s), quotas exact {r['quotas_exact']}, double "
                    f"{r['double_bookings_gateway']}/{r['double_bookings_clients']}, disagreements "
                    f"{r['his_gateway_disagreements']}, booked p99 {r['book_ok_p99_ms']} ms, refused p99 "
                    f"{r['refused_p99_ms']} ms, {r['search_pages_per_s']} pages/s, gw cpu {r['gateway_cpu_pct']}% "
                    f"client cpu {r['client_cpu_pct']}% (load {r['load_average'][0]})")
        r["rep"] = rep + 1
        runs.append(r)
    ok = [r for r in runs if "error" not in r]
    summary = None
    if ok:
        summary = {k: rig.median([r[k] for r in ok]) for k in MEDIANS}
        summary.update({f"{k}_range": rig.spread([r[k] for r in ok]) for k in MEDIANS})
        summary.update({
            "runs": len(ok), "quotas_exact_every_run": all(r["quotas_exact"] for r in ok),
            "double_bookings": sum(r["double_bookings_gateway"] + r["double_bookings_clients"] for r in ok),
            "his_gateway_disagreements": sum(r["his_gateway_disagreements"] for r in ok),
            "slots_left_free": [r["slots_left_free"] for r in ok],
            "by_platform": {p: {"quota": ok[0]["by_platform"][p]["quota"],
                                "booked_gateway": [r["by_platform"][p]["booked_gateway"] for r in ok]}
                            for p in PLATFORMS},
        })
    return {"machine": machine, "reps": args.reps, "slots": args.slots, "patients": args.patients,
            "shares": args.shares, "procs": args.procs, "connections_per_platform_per_proc": args.connections,
            "cancel_share": args.cancel_share, "gateway_log_level": args.gateway_log_level, "mode": args.mode,
            "client": f"{args.procs} processes, asyncio + aiohttp, {args.connections} keep-alive mutual-TLS "
                      f"connections per platform per process",
            "summary": summary, "runs": runs}


def print_table(result: dict) -> None:
    s = result.get("summary")
    print(f"rush: {result['slots']} slots, {result['patients']} patients, shares {result['shares']}%, "
          f"{result['reps']} repetition(s); client {result['client']}")
    if not s:
        print("  every repetition failed:", [r.get("error", "")[:200] for r in result["runs"]])
        return
    for p, v in s["by_platform"].items():
        print(f"  {p}: quota {v['quota']}, booked (gateway) {v['booked_gateway']}")
    print(f"  quotas exact in every run: {s['quotas_exact_every_run']}; slots left free {s['slots_left_free']}")
    print(f"  double bookings: {s['double_bookings']}; HIS/gateway disagreements: {s['his_gateway_disagreements']}")
    rows = [("release -> last S24 sent", "release_to_last_s24_s", "s"),
            ("release -> every slot at the gateway", "release_to_all_at_gateway_s", "s"),
            ("release -> first slot taken", "release_to_first_taken_s", "s"),
            ("release -> last slot taken", "release_to_last_taken_s", "s"),
            ("S24 sent -> taken, p50", "published_to_taken_p50_s", "s"),
            ("S24 sent -> taken, max", "published_to_taken_max_s", "s"),
            ("booking 201 p50 / p99 / p99 with pool wait", ("book_ok_p50_ms", "book_ok_p99_ms",
                                                           "book_ok_p99_ms_with_pool_wait"), "ms"),
            ("refusal 409 p50 / p99 / p99 with pool wait", ("refused_p50_ms", "refused_p99_ms",
                                                           "refused_p99_ms_with_pool_wait"), "ms"),
            ("search p50 / p99 / p99 with pool wait", ("search_p50_ms", "search_p99_ms",
                                                      "search_p99_ms_with_pool_wait"), "ms"),
            ("search pages/s in the rush", "search_pages_per_s", ""),
            ("gateway CPU (% of a core)", "gateway_cpu_pct", ""),
            ("simulator CPU", "sim_cpu_pct", ""),
            ("load client CPU (all processes)", "client_cpu_pct", "")]
    for label, key, unit in rows:
        keys = key if isinstance(key, tuple) else (key,)
        text = " / ".join(f"{rig.fmt(s[k])} ({s[k + '_range']})" for k in keys)
        print(f"  {label:44} {text} {unit}")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--slots", type=int, default=2000, help="N: slots released at once")
    ap.add_argument("--patients", type=int, default=2000, help="C: would-be patients, all platforms together")
    ap.add_argument("--shares", default="5,50,45", help="the three platforms' quota shares, %% of every schedule")
    ap.add_argument("--reps", type=int, default=1, help="repetitions (medians and ranges are reported)")
    ap.add_argument("--procs", type=int, default=2, help="load client processes")
    ap.add_argument("--connections", type=int, default=32,
                    help="keep-alive connections per platform per client process")
    ap.add_argument("--cancel-share", type=float, default=0.1,
                    help="share of the patients who cancel their booking and book again")
    ap.add_argument("--poll", type=float, default=0.5, help="seconds between a patient's searches before the release")
    ap.add_argument("--lead", type=float, default=1.0, help="seconds of polling before the release")
    ap.add_argument("--patience", type=float, default=2.0,
                    help="seconds of empty pages (after slots were seen) before a patient gives up")
    ap.add_argument("--deadline", type=float, default=120.0, help="seconds after the release when everyone stops")
    ap.add_argument("--mode", default="fifo",
                    help="the relay towards the HIS: fifo (one SRM in flight) or patient:N (ordering: patient, window N)")
    ap.add_argument("--gateway-log-level", default="warning", choices=("debug", "info", "warning", "error"))


def main() -> None:
    if sys.argv[1:2] == ["worker"]:
        worker(json.loads(sys.stdin.readline()))
        return
    rig.bench_main(__doc__, add_arguments, run, print_table, "rush")


if __name__ == "__main__":
    main()
