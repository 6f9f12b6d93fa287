"""``gatewayd status --config PATH``: the lock at a glance, for hospital IT, beside a running gateway or not.

What it shows (:func:`gather`; ``--json`` prints it as is, else :func:`render` writes a summary, in colour on a
terminal):

- **the gateway**: which process runs each gate of the chamber (pid, gate, config, since when: from the claims,
  gateway/ops/claim.py, touched by nothing here), its version and the last config reload (what it applied, or
  why it refused it) — asked of the running process's admin listener (``/status``). When nothing answers there
  (the gateway is down, or ``admin`` is not configured) it says so, and the rest comes from the claims, the
  chamber and the config alone.
- **each HIS endpoint**: up or down and since when (the running probe's, else the chamber's ``his_links``, as
  the probe last recorded it: marked as such), messages in and out in the last minute and hour, the queue
  waiting for it and the age of its oldest message, dead letters.
- **certificates**: the server's, the client CA's, the MLLP TLS ones, the prescription signers' CAs and the
  release chain — each file's earliest expiry, with days left (``warn`` within 30 days, ``expired``).
- **the chamber**: its size on disk, the room left on its file system, its schema version.

The chamber is opened read-only (``mode=ro``): nothing is written, no schema is upgraded, and a running
gateway is not disturbed (SQLite's WAL lets readers in beside the writer).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from cryptography import x509

from gateway.chamber.reader import Reader
from gateway.ops.claim import ClaimError, holder as claim_holder

#: certificates expiring within this many days are shown as a warning
WARN_DAYS = 30


def admin_url(config) -> str | None:
    """``http://host:port`` of the admin listener ``config`` names, or None without one."""
    if config.admin is None:
        return None
    parts = dict(p.split("=", 1) for p in config.admin.listen.split(":")[2:] if "=" in p)
    host = parts.get("interface", "127.0.0.1").replace("\\", "")
    port = config.admin.listen.split(":")[1]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def ask_admin(url: str, timeout: float = 3.0) -> dict:
    """The running gateway's ``/status``; raises OSError when nothing answers."""
    try:
        with urllib.request.urlopen(f"{url}/status", timeout=timeout) as answer:  # noqa: S310 - loopback http
            return json.loads(answer.read())
    except (urllib.error.URLError, ValueError) as e:
        raise OSError(str(e)) from None


def certificate_files(config) -> list[tuple[str, Path]]:
    """(what it is, file) for every certificate file the config names."""
    found: list[tuple[str, Path]] = []
    if config.outer is not None:
        found += [("outer server", config.outer.tls.certificate), ("outer client CA", config.outer.tls.client_ca)]
    if config.inner is not None:
        if config.inner.tls is not None:
            found += [("MLLP listener", config.inner.tls.certificate),
                      ("MLLP client CA", config.inner.tls.client_ca)]
        for his in (config.inner.his, *config.inner.endpoints):
            if his.tls is not None:
                found.append((f"MLLP to {his.name}: CA", his.tls.ca))
                if his.tls.certificate is not None:
                    found.append((f"MLLP to {his.name}: client", his.tls.certificate))
    rx = config.prescriptions
    if rx is not None:
        found += [("prescriber CA", p) for p in rx.prescriber_cas]
        if rx.release_chain is not None:
            found.append(("prescription release signer", rx.release_chain))
    return [(name, Path(path)) for name, path in found]


def certificate_expiry(name: str, path: Path, now: float) -> dict:
    """The earliest expiry among the certificates in ``path`` (PEM), with days left, or what is wrong."""
    entry: dict = {"name": name, "path": str(path)}
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as e:
        return {**entry, "error": str(e), "state": "error"}
    first = min(certs, key=lambda c: c.not_valid_after_utc)
    not_after = first.not_valid_after_utc.timestamp()
    days = (not_after - now) / 86400
    return {**entry, "subject": first.subject.rfc4514_string(), "not_after": not_after,
            "days_left": round(days, 1), "state": "expired" if days < 0 else "warn" if days < WARN_DAYS else "ok"}


def read_only_reader(path: str, now: float) -> tuple[Reader, sqlite3.Connection]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    conn.row_factory = sqlite3.Row
    return Reader(conn, now), conn


def chamber_facts_of(settings, now: float) -> dict:
    """:func:`chamber_facts` of the config's ``chamber`` section, whichever its backend."""
    if settings.backend == "sqlite":
        return chamber_facts(str(settings.path), now)
    from gateway.chamber.backends import backend_for
    from gateway.chamber.errors import ChamberError

    try:
        backend = backend_for(settings)
        facts: dict = {"backend": backend.kind, "path": backend.target}
        conn = backend.connect_reader()
    except ChamberError as e:
        return {"backend": settings.backend, "error": f"cannot be read: {e}"}
    try:
        facts["bytes"] = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    except backend.Error as e:
        conn.close()
        return {**facts, "error": f"cannot be read: {e}"}
    return _facts_read(facts, Reader(conn, now), conn, now, backend.Error)


def chamber_facts(path: str, now: float) -> dict:
    """The chamber's size, free disk and schema version, and what it records of each HIS endpoint."""
    facts: dict = {"path": path}
    if not os.path.exists(path):
        return {**facts, "error": "no chamber file (the gateway never ran with this config)"}
    facts["bytes"] = sum(os.stat(f).st_size for f in (path, path + "-wal", path + "-shm") if os.path.exists(f))
    try:
        fs = os.statvfs(os.path.dirname(os.path.abspath(path)))
        facts["disk_free_bytes"] = fs.f_bavail * fs.f_frsize
    except OSError:
        pass
    try:
        reader, conn = read_only_reader(path, now)
    except sqlite3.Error as e:
        return {**facts, "error": f"cannot be read: {e}"}
    return _facts_read(facts, reader, conn, now, sqlite3.Error)


def _facts_read(facts: dict, reader: Reader, conn, now: float, errors) -> dict:
    """The schema version and what the chamber records of each HIS endpoint, read with ``reader`` on ``conn``
    (closed here); ``errors``: what its statements raise."""
    try:
        row = conn.execute("SELECT value FROM chamber_meta WHERE key = 'schema_version'").fetchone()
        facts["schema_version"] = int(row[0]) if row else None
        states = reader.state_counts()
        minute, hour = reader.counts_since(now - 60), reader.counts_since(now - 3600)
        oldest = reader.oldest_waiting()
        try:
            links = reader.his_links()
        except errors:  # a chamber from before the probe (schema < 7)
            links = {}
    except errors as e:
        return {**facts, "error": f"cannot be read: {e}"}
    finally:
        conn.close()
    peers: dict[str, dict] = {}

    def peer(name: str) -> dict:
        return peers.setdefault(name, {"in_last_minute": 0, "in_last_hour": 0, "out_last_minute": 0,
                                       "out_last_hour": 0, "queue": 0, "oldest_waiting_seconds": None,
                                       "dead": 0})

    for (direction, name), n in minute.items():
        peer(name)["in_last_minute" if direction == "inbound" else "out_last_minute"] = n
    for (direction, name), n in hour.items():
        peer(name)["in_last_hour" if direction == "inbound" else "out_last_hour"] = n
    for (direction, name, state), n in states.items():
        if direction == "outbound" and state in ("committed", "sending", "retrying"):
            peer(name)["queue"] += n
        if direction == "outbound" and state == "dead":
            peer(name)["dead"] += n
        peer(name)
    for name, created in oldest.items():
        peer(name)["oldest_waiting_seconds"] = round(now - created, 1)
    for name, link in links.items():
        peer(name)["recorded"] = {"up": link.up, "since": link.since, "detail": link.detail}
    facts["peers"] = peers
    return facts


def gather(config, *, now: float | None = None, ask: Callable[[str], dict] = ask_admin) -> dict:
    """Everything `gatewayd status` shows, as plain data (``--json``)."""
    now = time.time() if now is None else now
    status: dict = {"at": now}
    url = admin_url(config)
    live = None
    if url is None:
        status["gateway"] = {"running": None, "detail": "no admin listener configured: whether the gateway runs, "
                                                        "and its live state, cannot be known"}
    else:
        try:
            live = ask(url)
            status["gateway"] = {"running": True, "admin": url, "gate": live.get("gate"),
                                 "started": live.get("started"), "version": live.get("version"),
                                 "last_reload": live.get("last_reload")}
        except OSError as e:
            status["gateway"] = {"running": False, "admin": url,
                                 "detail": f"nothing answers at {url} ({e}): the gateway is not running (or not "
                                           f"this config's); shown below is what the chamber recorded"}
    chamber = chamber_facts_of(config.chamber, now)
    status["chamber"] = {k: v for k, v in chamber.items() if k != "peers"}
    names = [e.name for e in (config.inner.his, *config.inner.endpoints)] if config.inner is not None else []
    peers = chamber.get("peers", {})
    live_his = (live or {}).get("health", {}).get("his", {})
    status["his"] = {}
    for name in dict.fromkeys([*names, *peers, *live_his]):
        entry = dict(peers.get(name, {}))
        recorded = entry.pop("recorded", None)
        now_live = live_his.get(name)
        if now_live is not None:
            probe = now_live.get("probe") or {}
            up = now_live.get("reachable") and probe.get("up") is not False
            entry["link"] = {"up": bool(up), "source": "live",
                             "since": probe.get("since") if probe else now_live.get("unreachable_since"),
                             "detail": probe.get("last_error") or now_live.get("last_error"),
                             "answering": now_live.get("answering"), "checked": probe.get("checked")}
        elif recorded is not None:
            entry["link"] = {**recorded, "source": "recorded by the probe"
                             + ("" if status["gateway"]["running"] else " (the gateway is not running: may be stale)")}
        else:
            entry["link"] = {"up": None, "source": "unknown", "detail": "not checked (no probe has recorded it)"}
        status["his"][name] = entry
    status["gates"] = {}
    for role in ("outer", "inner"):  # who holds each gate's claim on the chamber (gateway/ops/claim.py)
        gate: dict = {"configured": getattr(config, role) is not None}
        try:
            held = claim_holder(config.chamber.path, role)
            by_live = live is not None and live.get("gate") in ("both", role)
            gate.update(up=held is not None or by_live, run_by=held.describe() if held is not None else None)
        except ClaimError as e:
            gate.update(up=(live.get("gate") in ("both", role)) if live is not None else None, run_by=None,
                        detail=str(e))
        status["gates"][role] = gate
    if status["gateway"]["running"] is not True and any(g["up"] is not None for g in status["gates"].values()):
        running = any(g["up"] for g in status["gates"].values())  # without the admin listener, the claims tell
        if running and status["gateway"]["running"] is None:
            status["gateway"] = {"running": True, "detail": status["gateway"]["detail"]}
        elif not running:
            status["gateway"] = {"running": False, "detail": "no process holds a gate's claim on the chamber: the "
                                                             "gateway is not running; shown below is what the "
                                                             "chamber recorded"}
    status["certificates"] = [certificate_expiry(name, path, now) for name, path in certificate_files(config)]
    return status


# -- the terminal summary ---------------------------------------------------------------------------------------
_COLOURS = {"ok": "32", "warn": "33", "bad": "31", "dim": "2"}


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


def render(status: dict, colour: bool) -> str:
    """The human summary of :func:`gather`'s answer."""

    def c(kind: str, text: str) -> str:
        return f"\x1b[{_COLOURS[kind]}m{text}\x1b[0m" if colour else text

    now = status["at"]
    out: list[str] = []
    gw = status["gateway"]
    if gw["running"] and "started" not in gw:
        out.append(f"gateway   {c('ok', 'RUNNING')}  (live state unknown: {gw['detail']})")
    elif gw["running"]:
        out.append(f"gateway   {c('ok', 'RUNNING')}  gate {gw['gate']}, up {_ago(now - gw['started'])}, "
                   f"version {gw['version']}, admin {gw['admin']}")
        reload = gw.get("last_reload")
        if reload is None:
            out.append("          config: not reloaded since the start")
        elif reload["outcome"] == "applied":
            out.append(f"          config: reloaded {_ago(now - reload['at'])} ago: "
                       f"{', '.join(reload.get('applied') or []) or 'nothing changed'}")
        else:
            out.append(c("bad", f"          config: reload REFUSED {_ago(now - reload['at'])} ago: "
                                f"{'; '.join(reload.get('errors') or [])}"))
    elif gw["running"] is False:
        out.append(f"gateway   {c('bad', 'NOT RUNNING')}  {gw['detail']}")
    else:
        out.append(f"gateway   {c('warn', 'UNKNOWN')}  {gw['detail']}")
    for role, g in status["gates"].items():
        if not g["configured"] and not g["up"]:
            continue
        if g["up"] and g.get("run_by"):
            out.append(f"  {role} gate: run by {g['run_by']}")
        elif g["up"]:
            out.append(f"  {role} gate: {c('ok', 'up')}")
        elif g["up"] is False:
            out.append(f"  {role} gate: {c('bad', 'not running')}")
        else:
            out.append(f"  {role} gate: {c('warn', 'unknown')}" + (f" ({g['detail']})" if g.get("detail") else ""))
    out.append("")
    for name, h in status["his"].items():
        link = h["link"]
        if link["up"] is True:
            state = c("ok", "UP")
        elif link["up"] is False:
            state = c("bad", "DOWN")
        else:
            state = c("warn", "UNKNOWN")
        since = f" since {_ago(now - link['since'])}" if link.get("since") else ""
        detail = f": {link['detail']}" if link.get("detail") and link["up"] is not True else ""
        out.append(f"HIS {name:<12} {state}{since} ({link['source']}){detail}")
        oldest = h.get("oldest_waiting_seconds")
        queue = f"queue {h.get('queue', 0)}" + (f", oldest {_ago(oldest)}" if oldest is not None else "")
        if oldest is not None and oldest > 300:
            queue = c("warn", queue)
        dead = f"dead letters {h.get('dead', 0)}"
        out.append(f"    in {h.get('in_last_minute', 0)}/min {h.get('in_last_hour', 0)}/h, "
                   f"out {h.get('out_last_minute', 0)}/min {h.get('out_last_hour', 0)}/h, {queue}, "
                   + (c("bad", dead) if h.get("dead") else dead))
    out.append("")
    for cert in status["certificates"]:
        if cert["state"] == "error":
            out.append(f"cert {cert['name']:<28} {c('bad', 'UNREADABLE')} {cert['path']}: {cert['error']}")
            continue
        kind = {"ok": "ok", "warn": "warn", "expired": "bad"}[cert["state"]]
        left = "EXPIRED" if cert["state"] == "expired" else f"{cert['days_left']:.0f} days left"
        out.append(f"cert {cert['name']:<28} {c(kind, left)}  {cert['subject']}")
    ch = status["chamber"]
    out.append("")
    if "error" in ch:
        out.append(f"chamber   {c('bad', ch['error'])} ({ch['path']})")
    else:
        free = ch.get("disk_free_bytes")
        total = ch.get("bytes", 0) + (free or 0)
        low = free is not None and total and free / total < 0.1
        out.append(f"chamber   {_size(ch.get('bytes'))}, "
                   + (c("bad", f"{_size(free)} free") if low else f"{_size(free)} free")
                   + f", schema v{ch.get('schema_version')}  ({ch['path']})")
    return "\n".join(out)


def status_command(config, *, as_json: bool, colour: bool | None = None, stream=None) -> int:
    """Print the status; exit 0 when everything is up and no certificate has expired, else 1 (for scripts)."""
    import sys

    stream = stream or sys.stdout
    status = gather(config)
    if as_json:
        stream.write(json.dumps(status, indent=2, ensure_ascii=False) + "\n")
    else:
        if colour is None:
            colour = stream.isatty() and os.environ.get("NO_COLOR") is None
        stream.write(render(status, colour) + "\n")
    healthy = (status["gateway"]["running"] is not False
               and all(g["up"] is not False for g in status["gates"].values() if g["configured"])
               and all(h["link"]["up"] is not False for h in status["his"].values())
               and all(cert["state"] not in ("expired", "error") for cert in status["certificates"])
               and "error" not in status["chamber"])
    return 0 if healthy else 1
