#!/usr/bin/env python3
"""Siege: legitimate traffic through the lock while anonymous attackers on loopback try to knock it over.

    python bench/siege.py [--reps 3] [--before 20] [--attack 60] [--after 90] [--book-rate 20] [--siu-rate 50]
                          [--idle 3000] [--slow-headers 200] [--slow-bodies 50] [--uploads 10] [--upload-mb 100]
                          [--mllp-slowloris 100] [--half-handshakes 1000] [--attack-addresses 16]
                          [--set KEY=YAML] [--gateway-repo DIR] [--keep]

One HIS simulator and one gateway with the example config's limits and the default logging level (info).
For the whole run:

- a platform books at ``--book-rate``/s and cancels each booking (book-then-cancel cycles, keep-alive mutual
  TLS, one load process, bench/booking.py's open-loop client: latency counted from each request's due time);
- the HIS sends ``--siu-rate`` SIU^S12/S15 per second on one MLLP connection from 127.0.0.1, the address the
  gateway reserves for the HIS (``inner.his_addresses``); each ACK's latency is recorded;
- the gateway's own link to the HIS simulator carries every booking's SRM.

During the attack phase (after ``--before`` seconds, for ``--attack`` seconds), an attacker process (asyncio,
its own descriptors) spreads its connections over ``--attack-addresses`` loopback addresses (127.0.0.2 ...)
and keeps re-opening what the gateway closes (after 1 s):

====================  ==========================================================================================
idle                  plain TCP connections to the FHIR port that send nothing
half-handshakes       TCP connections that send the first bytes of a TLS ClientHello and stop
slow-headers          TLS with a CA-signed certificate of a subject no platform has ('eve'), then a request's
                      headers one byte every 2 s
slow-bodies           TLS as platform 'mallory' (registered: a compromised platform), a POST with
                      Content-Length 100,000, then one body byte every 2 s
uploads               as 'mallory': half with ``Content-Length: <upload-mb> MiB``, half chunked, sent as fast
                      as the gateway reads; the bytes the gateway took before it answered are counted
mllp-slowloris        MLLP connections that send a start block and ``MSH|`` and then one byte per second
====================  ==========================================================================================

It prints, per phase (before / attack / after): bookings and SIU that succeeded and their p50/p99, the
gateway's RSS (start, peak, end), whether the HIS link ever dropped (the HIS sender's connection, and the
gateway's connections to the HIS simulator: ``mllp.client.connection_lost`` in its log), and per attack
what the attacker got (connections opened, how long the gateway let them hold on, answers, bytes taken).
Targets (issue 15): every legitimate booking and SIU succeeds, their p99 under 250 ms on 2 cores, RSS
growth under 50 MB and back within 10 MB of the start after the attack (the median of the after phase's last
20 s), the HIS link never dropped. With ``--reps N`` each figure is given as the median and range of N runs,
and whether every run met every target. Results: bench/results/siege.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import booking, rig, soak  # noqa: E402

ATTACKS = ("idle", "half_handshakes", "slow_headers", "slow_bodies", "uploads", "mllp_slowloris")
REOPEN_AFTER = 1.0


# ------------------------------------------------------------------------------------------------ attacker


class AttackStats:
    """What one kind of attack got: connections opened, failed to open, closed by the gateway (and after how
    long), answers by status line, body bytes the gateway took."""

    def __init__(self):
        self.opened = self.connect_failed = self.closed_by_gateway = 0
        self.held: list[float] = []
        self.answers: dict[str, int] = {}
        self.bytes_taken: list[int] = []

    def summary(self) -> dict:
        held = sorted(self.held)
        return {"opened": self.opened, "connect_failed": self.connect_failed,
                "closed_by_gateway": self.closed_by_gateway,
                "held_p50_s": round(rig.percentile(held, .5), 2) if held else None,
                "held_max_s": round(held[-1], 2) if held else None,
                "answers": self.answers,
                "bytes_taken_max": max(self.bytes_taken) if self.bytes_taken else None}


class Attacker:
    """The attacks of one run, in one asyncio loop (see the module docstring)."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.addresses = [f"127.0.0.{2 + i}" for i in range(spec["addresses"])]
        self.stats = {name: AttackStats() for name in ATTACKS}
        self.stop_at = time.time() + spec["seconds"]
        certs = Path(spec["certs"])
        self.eve = self._tls(certs, "eve")
        self.mallory = self._tls(certs, "mallory")
        self.client_hello = self._client_hello()

    @staticmethod
    def _tls(certs: Path, name: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        ctx.load_cert_chain(str(certs / f"platform-{name}.pem"), str(certs / f"platform-{name}.key"))
        return ctx

    @staticmethod
    def _client_hello() -> bytes:
        """The first bytes a real TLS client sends (its ClientHello), from an in-memory handshake."""
        ctx = ssl.create_default_context()
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        return outgoing.read()

    def _address(self, i: int) -> str:
        return self.addresses[i % len(self.addresses)]

    def _left(self) -> float:
        return self.stop_at - time.time()

    async def _open(self, kind: str, i: int, port: int, tls: ssl.SSLContext | None = None):
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                "127.0.0.1", port, local_addr=(self._address(i), 0), ssl=tls,
                server_hostname="localhost" if tls else None), timeout=max(0.1, min(15, self._left())))
        except (OSError, asyncio.TimeoutError, ssl.SSLError):
            self.stats[kind].connect_failed += 1
            return None
        self.stats[kind].opened += 1
        return reader, writer

    async def _hold(self, kind: str, reader, writer, dribble: bytes = b"", every: float = 0.0,
                    head: bytes = b"") -> None:
        """Send ``head``, then one byte of ``dribble`` every ``every`` seconds, until the gateway closes the
        connection (counted, with how long it held) or the attack ends."""
        stats, t0 = self.stats[kind], time.monotonic()
        answer = bytearray()

        async def read_until_closed():
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                if len(answer) < 4096:
                    answer.extend(chunk)

        closed = asyncio.ensure_future(read_until_closed())
        try:
            if head:
                writer.write(head)
            position = 0
            while not closed.done() and self._left() > 0:
                wait = every if dribble else self._left()
                done, _ = await asyncio.wait([closed], timeout=max(0.01, min(wait, self._left())))
                if done:
                    break
                if dribble:
                    writer.write(dribble[position % len(dribble):position % len(dribble) + 1])
                    position += 1
            if closed.done():
                stats.closed_by_gateway += 1
                stats.held.append(time.monotonic() - t0)
                status = bytes(answer[:64]).split(b"\r\n", 1)[0].decode("latin-1") if answer else "(nothing)"
                if status.startswith("HTTP/"):
                    status = " ".join(status.split(" ", 2)[:2])
                elif answer[:1] == b"\x0b":
                    status = "MLLP answer"
                elif answer:
                    status = "(other bytes)"
                stats.answers[status] = stats.answers.get(status, 0) + 1
        except (OSError, ssl.SSLError):
            stats.closed_by_gateway += 1
            stats.held.append(time.monotonic() - t0)
        finally:
            closed.cancel()
            writer.transport.abort()

    async def _loop(self, kind: str, i: int, attack) -> None:
        """Run one attacker slot until the end: attack, wait a second, attack again."""
        await asyncio.sleep((i % 100) / 100)  # spread the first wave over a second
        while self._left() > 0:
            await attack(i)
            await asyncio.sleep(REOPEN_AFTER)

    async def idle(self, i: int) -> None:
        conn = await self._open("idle", i, self.spec["fhir_port"])
        if conn:
            await self._hold("idle", *conn)

    async def half_handshake(self, i: int) -> None:
        conn = await self._open("half_handshakes", i, self.spec["fhir_port"])
        if conn:
            await self._hold("half_handshakes", *conn, head=self.client_hello[: len(self.client_hello) // 2])

    async def slow_headers(self, i: int) -> None:
        conn = await self._open("slow_headers", i, self.spec["fhir_port"], self.eve)
        if conn:
            await self._hold("slow_headers", *conn, head=b"GET /fhir/Slot?status=free HTTP/1.1\r\n",
                             dribble=b"Host: localhost\r\nX-Padding: " + b"a" * 10_000, every=2.0)

    async def slow_body(self, i: int) -> None:
        conn = await self._open("slow_bodies", i, self.spec["fhir_port"], self.mallory)
        if conn:
            head = (b"POST /fhir/Appointment HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/fhir+json\r\n"
                    b"Content-Length: 100000\r\n\r\n")
            await self._hold("slow_bodies", *conn, head=head, dribble=b"{" + b" " * 99_999, every=2.0)

    async def upload(self, i: int) -> None:
        """As fast as the gateway reads: 100 MiB declared (odd slots) or chunked (even slots)."""
        stats = self.stats["uploads"]
        conn = await self._open("uploads", i, self.spec["fhir_port"], self.mallory)
        if not conn:
            return
        reader, writer = conn
        size = self.spec["upload_mb"] << 20
        chunked = i % 2 == 0
        head = (b"POST /fhir/Appointment HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/fhir+json\r\n"
                + (b"Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {size}\r\n\r\n".encode()))
        block = b"x" * 65536
        sent, t0 = 0, time.monotonic()
        answer = asyncio.ensure_future(reader.read(4096))
        try:
            writer.write(head)
            while sent < size and not answer.done() and self._left() > 0:
                writer.write(b"10000\r\n" + block + b"\r\n" if chunked else block)
                await writer.drain()
                sent += len(block)
            if chunked and not answer.done():
                writer.write(b"0\r\n\r\n")
            data = await asyncio.wait_for(answer, timeout=max(0.1, min(30, self._left())))
            status = data.split(b"\r\n", 1)[0].decode("latin-1") if data else "(closed)"
            status = " ".join(status.split(" ", 2)[:2])
        except (OSError, ssl.SSLError, asyncio.TimeoutError):
            status = "(reset)" if not answer.done() else "(closed)"
        finally:
            answer.cancel()
            writer.transport.abort()
        stats.closed_by_gateway += 1
        stats.held.append(time.monotonic() - t0)
        stats.answers[status] = stats.answers.get(status, 0) + 1
        stats.bytes_taken.append(sent)

    async def mllp_slowloris(self, i: int) -> None:
        conn = await self._open("mllp_slowloris", i, self.spec["mllp_port"])
        if conn:
            await self._hold("mllp_slowloris", *conn, head=b"\x0bMSH|", dribble=b"^~\\&|ATTACK|X|" * 1000,
                             every=1.0)

    async def run(self) -> dict:
        s = self.spec
        plan = [("idle", s["idle"], self.idle), ("half_handshakes", s["half_handshakes"], self.half_handshake),
                ("slow_headers", s["slow_headers"], self.slow_headers),
                ("slow_bodies", s["slow_bodies"], self.slow_body), ("uploads", s["uploads"], self.upload),
                ("mllp_slowloris", s["mllp_slowloris"], self.mllp_slowloris)]
        tasks = [asyncio.ensure_future(self._loop(kind, i, attack)) for kind, n, attack in plan for i in range(n)]
        await asyncio.sleep(max(0.0, self._left()))
        await asyncio.sleep(0.5)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return {kind: stats.summary() for kind, stats in self.stats.items()}


def attacker_main() -> None:
    """``siege.py attack`` (a child process): the spec on stdin, the attack stats as JSON on stdout."""
    spec = json.loads(sys.stdin.read())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    time.sleep(max(0.0, spec["start_at"] - time.time()))
    spec["seconds"] = spec["start_at"] + spec["seconds"] - time.time()
    print(json.dumps(asyncio.run(Attacker(spec).run())))


# ------------------------------------------------------------------------------------------- legitimate side


class HisSender(soak.InnerSender):
    """The HIS: SIU^S12/S15 at a steady rate on one MLLP connection from 127.0.0.1; each ACK's latency
    (from the message's due time) and every time the connection dropped."""

    def __init__(self, port: int, rate: float, stop: threading.Event):
        super().__init__(port, rate, stop)
        self.samples: list[tuple[float, float, str]] = []  # (due time, latency s, MSA-1)
        self.drops: list[float] = []

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
                    sock = socket.create_connection(("127.0.0.1", self.port), timeout=30,
                                                    source_address=("127.0.0.1", 0))
                    soak_nodelay(sock)
                sock.sendall(b"\x0b" + self.message(n) + b"\x1c\x0d")
                buf = b""
                while b"\x1c\x0d" not in buf:
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise ConnectionError("closed by the gateway")
                    buf += chunk
                text = buf.decode("utf-8", "replace")
                code = text.split("MSA|", 1)[1][:2] if "MSA|" in text else "??"
                self.samples.append((due, time.time() - due, code))
            except OSError:
                self.samples.append((due, time.time() - due, "dropped"))
                self.drops.append(time.time())
                if sock is not None:
                    sock.close()
                sock = None
                time.sleep(0.2)
            n += 1
        if sock is not None:
            sock.close()


def soak_nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def phase_of(t: float, t_attack: float, t_after: float) -> str:
    return "before" if t < t_attack else ("attack" if t < t_after else "after")


def latency_summary(rows: list[tuple[str, float, bool]]) -> dict:
    """rows: (phase, latency s, ok) -> per phase: count, ok, p50/p99/max of the ok ones (ms)."""
    out = {}
    for phase in ("before", "attack", "after"):
        mine = [r for r in rows if r[0] == phase]
        lat = sorted(r[1] for r in mine if r[2])
        out[phase] = {"sent": len(mine), "ok": sum(1 for r in mine if r[2]),
                      "p50_ms": round(1000 * rig.percentile(lat, .5), 1) if lat else None,
                      "p99_ms": round(1000 * rig.percentile(lat, .99), 1) if lat else None,
                      "max_ms": round(1000 * lat[-1], 1) if lat else None}
    return out


def configure(lock: booking.BookingLock, overrides: dict) -> None:
    """The siege's gateway: the rig's config with the example config's limits and logging level restored
    (the rig lifts rate limits and raises inner.max_connections for load tests), the attackers' platform
    'mallory' registered, and ``overrides`` (dotted keys) applied."""
    path = lock.workdir / "gateway.yaml"
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    example = yaml.safe_load((rig.REPO / "config" / "gateway.example.yaml").read_text(encoding="utf-8"))
    config["inner"].pop("max_connections", None)
    config["outer"]["rate_limit"] = example["outer"].get("rate_limit")
    platform = example["platforms"][0]
    config["platforms"] = [dict(p, rate_limit=platform.get("rate_limit")) for p in config["platforms"]]
    config["platforms"].append({"name": "mallory", "certificate_subject": "CN=platform-mallory",
                                "rate_limit": platform.get("rate_limit")})
    config["logging"]["level"] = "info"
    for key, value in overrides.items():
        *path_keys, last = key.split(".")
        section = config
        for k in path_keys:
            section = section.setdefault(k, {})
        section[last] = value
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")


def cpu_by_phase(samples: list[dict], args) -> dict:
    """CPU of the gateway, the HIS simulator and the attacker process in each phase, in % of one core."""
    bounds = {"before": (0.0, args.before), "attack": (args.before, args.before + args.attack),
              "after": (args.before + args.attack, args.before + args.attack + args.after)}
    out = {}
    for phase, (t0, t1) in bounds.items():
        inside = [s for s in samples if t0 <= s["t"] <= t1]
        if len(inside) < 2:
            continue
        span = inside[-1]["t"] - inside[0]["t"]
        out[phase] = {who: round(100 * (inside[-1]["cpu_s"][who] - inside[0]["cpu_s"][who]) / span, 1)
                      for who in inside[0]["cpu_s"]} if span > 0 else {}
    return out


def his_link_drops(log_path: Path, since: float, until: float) -> list[dict]:
    """The gateway's connections to the HIS simulator lost or not made between ``since`` and ``until`` (its JSON
    log; before the traffic starts the simulator may not be listening yet, after it the run is stopped)."""
    from datetime import datetime

    drops = []
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        if '"mllp.client.connection_lost"' not in line and '"mllp.client.connect_failed"' not in line:
            continue
        try:
            event = json.loads(line)
            at = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
        except (ValueError, KeyError):
            continue
        if since <= at <= until:
            drops.append({"t": round(at - since, 1), "event": event.get("event"), "reason": event.get("reason")})
    return drops


def run(args, workdir: Path) -> dict:
    certs = rig.Certs(workdir / "certs")
    from gateway.ops.devca import init_dev_ca

    init_dev_ca(certs.dir, platforms=("bench", "mallory", "eve"))
    total = args.before + args.attack + args.after
    lock = booking.BookingLock(workdir, certs, slots=max(200, int(args.book_rate * 10)), log_level="info",
                               gateway_repo=args.gateway_repo)
    overrides = dict(kv.split("=", 1) for kv in args.set)
    overrides = {k: yaml.safe_load(v) for k, v in overrides.items()}
    if rig._config_has("InnerConfig", "his_addresses", args.gateway_repo):
        overrides.setdefault("inner.his_addresses", ["127.0.0.1"])
    configure(lock, overrides)
    stop = threading.Event()
    samples: list[dict] = []
    attacker = None
    try:
        lock.start()
        slots = lock.free_slots()
        booking.warm_up(lock, slots[:10])
        his = HisSender(lock.mllp_port, args.siu_rate, stop)
        t_start = time.time() + 2.0
        t_attack, t_after = t_start + args.before, t_start + args.before + args.attack

        def sampler():
            while not stop.is_set():
                samples.append({"t": round(time.time() - t_start, 1), "rss_mb": round(lock.gateway.rss_mb(), 1),
                                "fds": len(os.listdir(f"/proc/{lock.gateway.pid}/fd"))
                                if lock.gateway.alive() else None,
                                "cpu_s": {"gateway": lock.gateway.cpu_seconds(), "his_sim": lock.sim.cpu_seconds(),
                                          "attacker": rig.process_cpu_seconds(attacker.pid) if attacker else 0.0}})
                stop.wait(1.0)

        spec = {"certs": str(certs.dir), "fhir_port": lock.fhir_port, "mllp_port": lock.mllp_port,
                "start_at": t_attack, "seconds": args.attack, "addresses": args.attack_addresses,
                "idle": args.idle, "half_handshakes": args.half_handshakes, "slow_headers": args.slow_headers,
                "slow_bodies": args.slow_bodies, "uploads": args.uploads, "upload_mb": args.upload_mb,
                "mllp_slowloris": args.mllp_slowloris}
        attacker = subprocess.Popen([rig.PY, __file__, "attack"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    env=dict(os.environ, PYTHONPATH=str(rig.REPO)))
        attacker.stdin.write(json.dumps(spec).encode())
        attacker.stdin.close()
        threading.Thread(target=sampler, daemon=True).start()
        time.sleep(max(0.0, t_start - time.time()))
        his.start()
        outs, t0 = booking.run_workers(port=lock.fhir_port, certs=certs.dir, slots=slots[10:], procs=1,
                                       threads=4, rate=args.book_rate, seconds=total, cycle=True, start_in=0.0)
        stop.set()
        his.join(10)
        attack = json.loads(attacker.stdout.read() or b"{}")
        attacker.wait(60)
        alive = lock.gateway.alive()
    finally:
        stop.set()
        if attacker is not None and attacker.poll() is None:
            attacker.kill()
        lock.stop()
    books = [(phase_of(t0 + r[1], t_attack, t_after), r[2] if r[2] is not None else 0.0, r[4] == 201)
             for o in outs for r in o["results"] if r[0] == "book"]
    statuses: dict[str, int] = {}
    for o in outs:
        for r in o["results"]:
            key = f"{r[0]} {r[4]}"
            statuses[key] = statuses.get(key, 0) + 1
    siu = [(phase_of(due, t_attack, t_after), lat, code == "AA") for due, lat, code in his.samples]
    rel = lambda t: t - (t_start)  # noqa: E731
    start = [s["rss_mb"] for s in samples if s["t"] < args.before]
    during = [s["rss_mb"] for s in samples if args.before <= s["t"] < args.before + args.attack]
    end = [s["rss_mb"] for s in samples if s["t"] >= args.before + args.attack + args.after - 20.0]  # its last 20 s
    rss_start = rig.median(start)
    return {
        "machine": rig.machine(),
        "phases_s": {"before": args.before, "attack": args.attack, "after": args.after},
        "legitimate": {"bookings": latency_summary(books), "siu": latency_summary(siu), "requests": statuses},
        "his_link": {"his_sender_drops": [round(rel(t), 1) for t in his.drops],
                     "gateway_to_his_drops": his_link_drops(lock.gateway.log_path, t_start, t_start + total)},
        "cpu_pct": cpu_by_phase(samples, args),
        "slow_siu": [(round(rel(due), 1), round(1000 * lat)) for due, lat, _ in his.samples if lat > 0.1],
        "slow_bookings": [(round(t0 + r[1] - t_start, 1), round(1000 * r[2])) for o in outs for r in o["results"]
                          if r[0] == "book" and r[2] is not None and r[2] > 0.1],
        "rss_mb": {"start": rss_start, "attack_peak": max(during) if during else None,
                   "after": rig.median(end),
                   "growth_peak": round(max(during) - rss_start, 1) if during and rss_start else None,
                   "after_minus_start": round(rig.median(end) - rss_start, 1) if end and rss_start else None},
        "fds_peak": max((s["fds"] or 0) for s in samples) if samples else None,
        "gateway_alive_at_end": alive,
        "attack": attack,
        "samples": samples,
    }


def print_summary(result: dict) -> None:
    leg = result["legitimate"]
    print(f"{'phase':8} {'bookings ok/sent':>17} {'p50 ms':>8} {'p99 ms':>8} {'SIU ok/sent':>12} {'p50 ms':>8} "
          f"{'p99 ms':>8}")
    for phase in ("before", "attack", "after"):
        b, s = leg["bookings"][phase], leg["siu"][phase]
        print(f"{phase:8} {b['ok']:>8}/{b['sent']:<8} {rig.fmt(b['p50_ms']):>8} {rig.fmt(b['p99_ms']):>8} "
              f"{s['ok']:>5}/{s['sent']:<6} {rig.fmt(s['p50_ms']):>8} {rig.fmt(s['p99_ms']):>8}")
    print("HIS link drops:", result["his_link"], " RSS MB:", result["rss_mb"], " fds peak:", result["fds_peak"])
    print("CPU % of one core:", result["cpu_pct"])
    for kind, stats in result["attack"].items():
        print(f"  {kind:16} {json.dumps(stats)}")


def main() -> None:
    if sys.argv[1:2] == ["attack"]:
        attacker_main()
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=float, default=20.0, help="seconds of legitimate traffic before the attack")
    ap.add_argument("--attack", type=float, default=60.0)
    ap.add_argument("--after", type=float, default=90.0, help="seconds after the attack (the gateway trims freed memory every minute)")
    ap.add_argument("--book-rate", type=float, default=20.0)
    ap.add_argument("--siu-rate", type=float, default=50.0)
    ap.add_argument("--idle", type=int, default=3000)
    ap.add_argument("--half-handshakes", type=int, default=1000)
    ap.add_argument("--slow-headers", type=int, default=200)
    ap.add_argument("--slow-bodies", type=int, default=50)
    ap.add_argument("--uploads", type=int, default=10)
    ap.add_argument("--upload-mb", type=int, default=100)
    ap.add_argument("--mllp-slowloris", type=int, default=100)
    ap.add_argument("--attack-addresses", type=int, default=16, help="loopback source addresses (127.0.0.2...)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=YAML",
                    help="a gateway config override, e.g. --set outer.max_connections=512")
    ap.add_argument("--gateway-repo", type=Path, default=None,
                    help="run the gateway of another checkout (an earlier tree: the 'before')")
    ap.add_argument("--reps", type=int, default=1, help="runs, each with a fresh gateway; medians and ranges")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    results = []
    for rep in range(args.reps):
        with rig.workspace(args.keep, prefix="gatewayd-siege-") as workdir:
            results.append(run(args, workdir))
        rig.log(f"siege run {rep + 1}/{args.reps} done")
        print_summary(results[-1])
    summary = targets(results)
    rig.save_result("siege", {"runs": results, "targets": summary})
    print(json.dumps(summary, indent=1))


def targets(results: list[dict]) -> dict:
    """Issue 15's targets over the runs: the median and range of each figure, and whether every run met it."""
    def figure(get):
        values = [get(r) for r in results]
        return {"median": rig.median(values), "range": rig.spread(values), "runs": values}

    def worst_p99(r):
        return max(r["legitimate"][kind][phase]["p99_ms"] or 0.0 for kind in ("bookings", "siu")
                   for phase in ("before", "attack", "after"))

    def failed(r):
        return sum(r["legitimate"][kind][phase]["sent"] - r["legitimate"][kind][phase]["ok"]
                   for kind in ("bookings", "siu") for phase in ("before", "attack", "after"))

    drops = [len(r["his_link"]["his_sender_drops"]) + len(r["his_link"]["gateway_to_his_drops"]) for r in results]
    return {
        "legitimate requests that failed (target 0)": figure(failed),
        "worst p99 of bookings and SIU, ms (target < 250)": figure(worst_p99),
        "RSS growth at the attack's peak, MB (target < 50)": figure(lambda r: r["rss_mb"]["growth_peak"]),
        "RSS after the attack minus before, MB (target within 10)": figure(lambda r: r["rss_mb"]["after_minus_start"]),
        "HIS link drops (target none)": {"runs": drops},
        "gateway CPU during the attack, % of a core": figure(lambda r: r["cpu_pct"].get("attack", {}).get("gateway")),
        "all targets met in every run": all(failed(r) == 0 and worst_p99(r) < 250 and r["rss_mb"]["growth_peak"] < 50
                                            and abs(r["rss_mb"]["after_minus_start"]) <= 10 for r in results)
        and not any(drops),
    }


if __name__ == "__main__":
    main()
