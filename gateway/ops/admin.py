"""The admin listener (loopback only, one per process): ``/healthz``, Prometheus ``/metrics`` and ``/status``.

- ``/healthz``: 200 with ``{"status": "ok", ...}`` when the chamber takes a write lock and every HIS this
  process delivers to is reachable and answering; otherwise 503 with what is wrong (``chamber``, ``his``:
  per endpoint ``reachable``, ``unreachable_since``/``unreachable_seconds`` during an outage, ``answering``
  and ``last_error``, and ``probe``: what the active probe last found, adapters/inner/probe.py), so a monitor
  (or systemd's watchdog's human) sees why. The split lock's outer gate, which has no relay, adds
  ``his_recorded``: what the inner gate's probe recorded in the chamber (for information: it does not make the
  outer gate unhealthy).
- ``/console/``: the web console for operators (gateway/ops/console.py), when ``admin.operators`` names any.
- ``/status``: /healthz's body (under ``health``, always 200) and what only the running process knows: its gate,
  start time, version and the last config reload's outcome — what `gatewayd status` asks for.
- ``/metrics``: messages per direction, peer and state, and the undelivered queue per destination, read
  from the chamber at scrape time (so both processes of a split lock report the same truth); delivery
  latency (commit to the HIS's answer) and the HIS's answer codes, observed by this process's relay; how
  long each HIS endpoint has been unreachable (``gatewayd_his_unreachable_seconds{peer}``, 0 while it is
  reached: the outage alert) and the sends that never reached it (``gatewayd_his_unreachable_total{peer}``,
  retried without counting as attempts); HL7
  answers the inner gate gave; HTTP answers of the outer gate; TLS handshakes that failed, per gate
  (``gatewayd_tls_handshake_failures_total{gate="outer"|"inner"}``: no certificate, one from another CA,
  a revoked-at-the-handshake or unusable one, no common protocol version); connections each gate holds and
  those it refused at accept, per reason (``gatewayd_connections_open{gate}``,
  ``gatewayd_connections_refused_total{gate,reason}``), and those it cut at a deadline
  (``gatewayd_connection_timeouts_total{gate,deadline}``); the chamber's size on disk and
  the room left on its file system (``gatewayd_chamber_bytes``, ``gatewayd_chamber_disk_free_bytes``) and
  what retention deleted (``gatewayd_chamber_pruned_total{kind}``).

What the alerting rules (deploy/prometheus/gatewayd.rules.yml) and the Grafana dashboard (deploy/grafana/) need
besides: ``gatewayd_build_info{version,commit}``; the ``process_*`` collectors (CPU, memory, open files, start
time); per HIS endpoint the queue (``gatewayd_queue_depth{peer}``), the age of its oldest waiting message
(``gatewayd_queue_oldest_seconds{peer}``) and its dead letters (``gatewayd_dead_letters{peer}``), each 0 rather than
absent for every endpoint the config names; each certificate file's earliest expiry
(``gatewayd_certificate_expiry_timestamp_seconds{certificate,path}``, Unix time: the server's, the client CA's, the
MLLP TLS ones, the prescription signers'), read at scrape time so a renewed file shows at once; the chamber file
system's size (``gatewayd_chamber_disk_size_bytes``, beside the free bytes); whether the audit chain verifies
(``gatewayd_audit_chain_ok``, 1 or 0, walked every ``AUDIT_VERIFY_EVERY`` seconds in a thread by
:class:`AuditChainWatch`, and ``gatewayd_audit_chain_verified_timestamp_seconds``); and the outer gate's answers by status class
(``gatewayd_http_responses_total{class="2xx"|"3xx"|"4xx"|"5xx"}``, each present from the start so a rate is
defined before the first error).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector,
                               generate_latest)
import structlog
from prometheus_client.core import GaugeMetricFamily
from twisted.application.internet import TimerService
from twisted.internet import defer, threads
from twisted.web import resource

from gateway.chamber.errors import ChamberError

log = structlog.get_logger("gateway.ops.admin")

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


#: a notification's states (the chamber's notifications.state), each reported per platform, 0 rather than absent
NOTIFICATION_STATES = ("pending", "delivered", "dead")


class ChamberCollector:
    """Gauges computed from the chamber when Prometheus scrapes."""

    def __init__(self, chamber, peers=(), platforms: Callable[[], Iterable[str]] = tuple):
        self.chamber = chamber
        self.peers = tuple(peers)  # the HIS endpoints the config names: their queue is 0, not absent
        self.platforms = platforms  # the platforms the config names now: their notifications are 0, not absent

    def collect(self):
        messages = GaugeMetricFamily("gatewayd_messages", "Messages in the chamber by direction, peer and state",
                                     labels=["direction", "peer", "state"])
        queue = GaugeMetricFamily("gatewayd_queue_depth", "Outbound messages not yet answered, per destination",
                                  labels=["peer"])
        oldest_age = GaugeMetricFamily("gatewayd_queue_oldest_seconds", "Age of the oldest outbound message still "
                                       "waiting for the HIS endpoint (0 when none waits)", labels=["peer"])
        dead = GaugeMetricFamily("gatewayd_dead_letters", "Outbound messages given up on (dead letters), per "
                                 "destination", labels=["peer"])
        try:
            reader = self.chamber.read()
            counts, oldest, now = reader.state_counts(), reader.oldest_waiting(), reader.now
        except Exception:  # a chamber that cannot be read is reported by /healthz, not by a scrape error
            counts, oldest, now = {}, {}, 0.0
        depth: dict[str, int] = dict.fromkeys(self.peers, 0)
        dead_letters: dict[str, int] = dict.fromkeys(self.peers, 0)
        for (direction, peer, state), n in sorted(counts.items()):
            messages.add_metric([direction, peer, state], n)
            if direction == "outbound" and state in ("committed", "sending", "retrying"):
                depth[peer] = depth.get(peer, 0) + n
            if direction == "outbound" and state == "dead":
                dead_letters[peer] = dead_letters.get(peer, 0) + n
        for peer, n in sorted(depth.items()):
            queue.add_metric([peer], n)
            oldest_age.add_metric([peer], max(0.0, now - oldest[peer]) if peer in oldest else 0.0)
        for peer, n in sorted(dead_letters.items()):
            dead.add_metric([peer], n)
        yield messages
        yield queue
        yield oldest_age
        yield dead
        yield self._notifications()
        yield from self._storage()

    def _notifications(self):
        """Platforms' notifications by state: ``dead`` ones are the dead letters an operator looks at (the
        chamber's notifications table says which, with last_error); ``pending`` ones wait for an endpoint."""
        family = GaugeMetricFamily("gatewayd_notifications", "Notifications to platforms in the chamber by platform "
                                   "and state (pending, delivered, dead)", labels=["platform", "state"])
        try:
            counts = self.chamber.read().notification_counts()
        except Exception:
            counts = {}
        for platform in self.platforms():
            for state in NOTIFICATION_STATES:
                counts.setdefault((platform, state), 0)
        for (platform, state), n in sorted(counts.items()):
            family.add_metric([platform, state], n)
        return family

    def _storage(self):
        """The chamber's size on disk (database, WAL and shared-memory files) and the room left on its file
        system: what a monitor alerts on before new work is refused for a full disk."""
        path = self.chamber.path
        if path == ":memory:" or self.chamber.backend.kind != "sqlite":  # (PostgreSQL's own monitoring tells)
            return
        size = sum(os.stat(f).st_size for f in (path, path + "-wal", path + "-shm") if os.path.exists(f))
        yield GaugeMetricFamily("gatewayd_chamber_bytes", "Size of the chamber's files (database, WAL, shm)",
                                value=size)
        try:
            fs = os.statvfs(os.path.dirname(os.path.abspath(path)))
        except OSError:
            return
        yield GaugeMetricFamily("gatewayd_chamber_disk_free_bytes", "Room left for the chamber on its file system "
                                "(for an unprivileged user)", value=fs.f_bavail * fs.f_frsize)
        yield GaugeMetricFamily("gatewayd_chamber_disk_size_bytes", "Size of the chamber's file system",
                                value=fs.f_blocks * fs.f_frsize)


class CertificateCollector:
    """Each certificate file's earliest expiry (``gateway.ops.status.certificate_files``), read at scrape time."""

    def __init__(self, files: Callable[[], list[tuple[str, Path]]]):
        self.files = files

    def collect(self):
        from gateway.ops.status import certificate_expiry

        expiry = GaugeMetricFamily("gatewayd_certificate_expiry_timestamp_seconds", "When the earliest certificate "
                                   "in the file expires (Unix time)", labels=["certificate", "path"])
        now = time.time()
        for name, path in self.files():
            found = certificate_expiry(name, path, now)
            if "not_after" in found:  # a file that cannot be read stops the gateway at start; not a scrape error
                expiry.add_metric([name, str(path)], found["not_after"])
        yield expiry


#: the audit chain is walked this often (seconds): a walk reads every record
AUDIT_VERIFY_EVERY = 300.0


class AuditChainCollector:
    """Whether the audit chain verified at its last walk (:class:`AuditChainWatch` walks it): absent before the
    first walk has finished."""

    def __init__(self):
        self.last: tuple[float, bool] | None = None  # (when, ok)

    def collect(self):
        if self.last is None:
            return
        yield GaugeMetricFamily("gatewayd_audit_chain_ok", "1 when the audit chain verified at its last walk, 0 "
                                "when a record was changed, removed or added", value=1 if self.last[1] else 0)
        yield GaugeMetricFamily("gatewayd_audit_chain_verified_timestamp_seconds", "When the audit chain was last "
                                "walked (Unix time)", value=self.last[0])


def verify_chamber_file(path: str, now: float, backend=None):
    """gateway.domain.audit.verify over a read-only connection of its own to the chamber file (so it can run in
    a thread beside the reactor's connection) — or, with a ``backend`` other than SQLite's, to its database."""
    from gateway.chamber.reader import Reader
    from gateway.domain.audit import verify
    from gateway.ops.status import read_only_reader

    if backend is not None and backend.kind != "sqlite":
        conn = backend.connect_reader()
        reader = Reader(conn, now)
    else:
        reader, conn = read_only_reader(path, now)
    try:
        return verify(reader)
    finally:
        conn.close()


class AuditChainWatch(TimerService):
    """Walks the audit chain every ``every`` seconds (and at start) in a thread — a walk reads and hashes every
    record, which must not hold up the gates — and hands the verdict to the metrics; logs
    ``audit.chain_broken`` (error) and ``audit.chain_verifies`` once per change."""

    name = "audit-chain-watch"

    def __init__(self, chamber, clock, collector: AuditChainCollector, every: float = AUDIT_VERIFY_EVERY,
                 in_thread: Callable | None = None):
        super().__init__(every, self.run_once)
        self.clock = clock  # TimerService's LoopingCall runs on it
        self.chamber, self.collector = chamber, collector
        self.in_thread = in_thread if in_thread is not None else threads.deferToThread

    def run_once(self) -> defer.Deferred:
        now = self.clock.seconds()
        if self.chamber.path == ":memory:":  # no file another connection could open (tests)
            from gateway.domain.audit import verify

            d = defer.maybeDeferred(lambda: verify(self.chamber.read()))
        else:
            d = self.in_thread(verify_chamber_file, self.chamber.path, now, self.chamber.backend)

        def done(verdict):
            was = self.collector.last
            self.collector.last = (now, verdict.ok)
            if not verdict.ok and (was is None or was[1]):
                log.error("audit.chain_broken", broken_at=verdict.broken_at, reason=verdict.reason)
            elif verdict.ok and was is not None and not was[1]:
                log.info("audit.chain_verifies", head_seq=verdict.head_seq)

        def failed(failure):  # a chamber that cannot be read is reported by /healthz; tried again next time
            log.warning("audit.chain_not_walked", error=failure.getErrorMessage())

        return d.addCallbacks(done, failed)


def build() -> tuple[str, str]:
    """(version, commit): the installed package's version and the commit ``gateway/BUILD`` (written by ``make
    dist``) names, "unknown" in a source checkout."""
    from importlib import metadata

    try:
        version = metadata.version("gatewayd")
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    try:
        commit = Path(__file__).parent.parent.joinpath("BUILD").read_text(encoding="utf-8").split()[1]
    except (OSError, IndexError):
        commit = "unknown"
    return version, commit


class HisLinkCollector:
    """Gauges of the HIS links this process's relays deliver to and its probes check, read from their status at
    scrape time."""

    def __init__(self):
        self.links: dict[str, Callable[[], dict]] = {}  # endpoint name -> its relay's status()
        self.probes: dict[str, Callable[[], dict]] = {}  # endpoint name -> its probe's status()

    def collect(self):
        outage = GaugeMetricFamily("gatewayd_his_unreachable_seconds", "How long the HIS endpoint has been "
                                   "unreachable (no connection, found by a send or by the probe: the outage "
                                   "alert); 0 while it is reached", labels=["peer"])
        up = GaugeMetricFamily("gatewayd_his_up", "What the probe last found of the HIS endpoint: 1 up, 0 down "
                               "(absent before its first check)", labels=["peer"])
        checked = GaugeMetricFamily("gatewayd_his_probe_checked_timestamp_seconds", "When the probe last "
                                    "checked the HIS endpoint (Unix time)", labels=["peer"])
        for peer in sorted(set(self.links) | set(self.probes)):
            seconds = self.links[peer]()["unreachable_seconds"] if peer in self.links else 0.0
            probe = self.probes[peer]() if peer in self.probes else None
            if probe is not None and probe["up"] is False:
                seconds = max(seconds, probe["for_seconds"])
            outage.add_metric([peer], seconds)
            if probe is not None and probe["up"] is not None:
                up.add_metric([peer], 1 if probe["up"] else 0)
            if probe is not None and probe["checked"] is not None:
                checked.add_metric([peer], probe["checked"])
        yield outage
        yield up
        yield checked


class Metrics:
    """This process's metrics registry and the instruments the gates feed."""

    def __init__(self, chamber, peers=(), certificates: Callable[[], list[tuple[str, Path]]] = list,
                 platforms: Callable[[], Iterable[str]] = tuple):
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.build_info = Gauge("gatewayd_build_info", "The running gatewayd's version and commit (always 1)",
                                ["version", "commit"], registry=self.registry)
        self.build_info.labels(*build()).set(1)
        self.registry.register(ChamberCollector(chamber, peers, platforms))
        self.registry.register(CertificateCollector(certificates))
        self.audit_chain = AuditChainCollector()  # fed by AuditChainWatch
        self.registry.register(self.audit_chain)
        self._his_links = HisLinkCollector()
        self.registry.register(self._his_links)
        self.delivery = Histogram(
            "gatewayd_delivery_seconds", "From commit to the HIS's answer, per destination", ["peer"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300), registry=self.registry)
        self.his_answers = Counter("gatewayd_his_answers_total", "Answers the HIS gave to our messages",
                                   ["peer", "code"], registry=self.registry)
        self.hl7_answers = Counter("gatewayd_hl7_answers_total", "Messages the inner gate answered, by outcome "
                                   "(accepted, rejected, not_stored)", ["outcome"], registry=self.registry)
        self.http_answers = Counter("gatewayd_http_answers_total", "HTTP answers of the outer gate", ["status"],
                                    registry=self.registry)
        self.http_responses = Counter("gatewayd_http_responses_total", "HTTP answers of the outer gate by status "
                                      "class", ["class"], registry=self.registry)
        for status_class in ("2xx", "3xx", "4xx", "5xx"):
            self.http_responses.labels(status_class)
        self.pruned = Counter("gatewayd_chamber_pruned_total", "Rows deleted by retention (chamber.keep_messages, "
                              "keep_appointments; expired credentials), by kind", ["kind"], registry=self.registry)
        self.his_unreachable = Counter("gatewayd_his_unreachable_total", "Sends that never reached the HIS "
                                       "endpoint (connect refused or timed out, TLS handshake not completed), "
                                       "retried without counting as attempts", ["peer"], registry=self.registry)
        self.tls_handshake_failures = Counter(
            "gatewayd_tls_handshake_failures_total", "TLS handshakes that failed, per gate (outer: HTTPS, inner: "
            "MLLP)", ["gate"], registry=self.registry)
        self.connections_open = Gauge("gatewayd_connections_open", "Connections a gate holds now", ["gate"],
                                      registry=self.registry)
        self.connections_refused = Counter(
            "gatewayd_connections_refused_total", "Connections closed at accept, per gate and why (total: every "
            "connection the gate may hold is taken; per_address: every one its source address may hold)",
            ["gate", "reason"], registry=self.registry)
        self.connection_timeouts = Counter(
            "gatewayd_connection_timeouts_total", "Connections cut at a deadline, per gate and deadline "
            "(tls_handshake, header, body, idle)", ["gate", "deadline"], registry=self.registry)

    def http_answered(self, status: int) -> None:
        """Count an answer of the outer gate, by status and by status class."""
        self.http_answers.labels(str(status)).inc()
        self.http_responses.labels(f"{int(status) // 100}xx").inc()

    def watch_his(self, peer: str, status: Callable[[], dict]) -> None:
        """Report the HIS endpoint ``peer``'s link from ``status`` (its relay's) at every scrape."""
        self._his_links.links[peer] = status

    def watch_probe(self, peer: str, status: Callable[[], dict]) -> None:
        """Report the HIS endpoint ``peer``'s probe (``HisProbe.status``) at every scrape."""
        self._his_links.probes[peer] = status

    def delivered(self, peer: str, code: str, seconds: float) -> None:
        self.delivery.labels(peer).observe(max(0.0, seconds))
        self.his_answers.labels(peer, code).inc()


def chamber_writable(chamber) -> tuple[bool, str]:
    """Can the chamber be written right now?  Asked on its read connection, never the writer's (which may be in a
    batch): SQLite takes the write lock and gives it back; PostgreSQL must be reachable and a primary."""
    conn = chamber._conn
    if conn is None:
        return False, "closed"
    try:
        return chamber.backend.writable(conn)
    except chamber.backend.Error as e:
        return False, str(e)


class AdminResource(resource.Resource):
    isLeaf = True

    def __init__(self, chamber, metrics: Metrics, relays=(), probes=None, live: Callable[[], dict] | None = None,
                 console=None):
        super().__init__()
        self.live = live  # the process's own state (Gateway.live) for /status
        self.console = console  # gateway.ops.console.Console: the pages under /console
        self.chamber = chamber
        self.metrics = metrics
        self.relays = list(relays)
        self.probes = probes if probes is not None else {}  # endpoint name -> HisProbe (filled as the tree is built)

    def render_POST(self, request):
        if self.console is not None and request.path.startswith(b"/console/"):
            return self.console.render(request)
        request.setResponseCode(405)
        return b"method not allowed\n"

    def render_GET(self, request):
        if self.console is not None and (request.path == b"/console" or request.path.startswith(b"/console/")):
            return self.console.render(request)
        if request.path == b"/metrics":
            request.setHeader(b"content-type", CONTENT_TYPE)
            return generate_latest(self.metrics.registry)
        if request.path == b"/healthz":
            return self._health(request)
        if request.path == b"/status":
            return self._status(request)
        request.setResponseCode(404)
        return b"not found\n"

    def _status(self, request) -> bytes:
        """What `gatewayd status` asks the running process: /healthz's answer and the process's own state (gate,
        start time, version, the last config reload)."""
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self.status_body()).encode()

    def status_body(self) -> dict:
        """/status's answer (also what the console's status page shows as live)."""
        return {"health": self._health_body(), **(self.live() if self.live is not None else {})}

    def _health_body(self) -> dict:
        ok, detail = chamber_writable(self.chamber)
        body = {"chamber": detail, "his": {}}
        for relay in self.relays:
            status = relay.status()
            probe = self.probes.get(relay.peer)
            if probe is not None:
                status["probe"] = probe.status()
                if status["probe"]["up"] is False:
                    status["reachable"] = False
            body["his"][relay.peer] = status
            ok = ok and status["reachable"] and status["answering"]
        if not self.relays:  # the split lock's outer gate: what the inner gate's probe recorded (it answers 202 at
            try:             # once for an endpoint recorded down); the inner gate's own /healthz judges the link
                links = self.chamber.read().his_links()
                body["his_recorded"] = {peer: {"up": row.up, "since": row.since, "detail": row.detail}
                                        for peer, row in links.items()}
            except (self.chamber.backend.Error, ChamberError):  # a closed chamber is reported as "chamber" above
                pass
        body["status"] = "ok" if ok else "unhealthy"
        return body

    def _health(self, request) -> bytes:
        body = self._health_body()
        request.setResponseCode(200 if body["status"] == "ok" else 503)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode()
