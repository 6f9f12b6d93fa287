"""Retention: the chamber keeps what crossed the lock as long as the hospital says, not forever.

Without it the chamber grows with every message (~10 GB a day at ~100 SIU/s, docs/benchmarks.md) and keeps
patient data long after anyone needs it.  Every ``chamber.prune_every`` (and once at start) this deletes:

- messages that ended (delivered, refused, withdrawn) more than ``chamber.keep_messages`` ago, with their
  stories — never a dead letter (an operator decides: ``gatewayd queue purge``), never the order of a
  prescription (it stays with the prescription); notifications delivered to platforms as long ago (never a
  pending or dead one);
- settled appointments whose slot ended more than ``chamber.keep_appointments`` ago, with the platform's
  request as sent, idempotency keys and identifiers, and slots that ended as long ago with no appointment;
- OAuth2 client assertions past their expiry, and access tokens ``keep_expired_tokens`` after it (the
  outer gate's choice, passed in by the wiring: until then a request with one is told that it expired).

The audit trail is not touched (``audit.retention``, ``gatewayd audit prune``).  Work is done in
transactions of at most ``BATCH`` rows each, so the other gate (and this one) never wait long for the write
lock; each kind of row is pruned until a transaction finds fewer than ``BATCH``.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from twisted.application import service
from twisted.internet import defer, task

log = structlog.get_logger("gateway.chamber.retention")

BATCH = 500


@dataclass(frozen=True)
class Retention:
    keep_messages: float | None  # seconds; None: keep
    keep_appointments: float | None
    keep_expired_tokens: float  # seconds an access token is kept after its expiry

    def steps(self, now: float) -> list:
        """The pruning steps due at ``now``: (name, unit of work taking a Txn and returning rows deleted)."""
        out = [("credentials", lambda tx: sum(tx.prune_oauth(tx.now, self.keep_expired_tokens)))]
        if self.keep_messages is not None:
            before = now - self.keep_messages
            out.append(("messages", lambda tx: tx.prune_messages(before, BATCH)))
            out.append(("notifications", lambda tx: tx.prune_notifications(before, BATCH)))
        if self.keep_appointments is not None:
            before = now - self.keep_appointments
            out.append(("appointments", lambda tx: tx.prune_appointments(before, BATCH)))
            out.append(("slots", lambda tx: tx.prune_slots(before, BATCH)))
        return out


@defer.inlineCallbacks
def prune(chamber, retention: Retention, now: float):
    """Run every pruning step to the end; fires with {step: rows deleted}."""
    deleted: dict[str, int] = {}
    for name, work in retention.steps(now):
        total = 0
        while True:
            n = yield chamber.transact(work)
            total += n
            if name == "credentials" or n < BATCH:
                break
        deleted[name] = total
    return deleted


class RetentionService(service.Service):
    """Prunes the chamber every ``every`` seconds (and at start); a failed run is logged and tried again at
    the next one."""

    name = "retention"

    def __init__(self, chamber, retention: Retention, clock, every: float, metrics=None):
        self.chamber, self.retention, self.clock, self.every = chamber, retention, clock, every
        self.metrics = metrics  # gateway.ops.admin.Metrics (gatewayd_chamber_pruned_total), or None
        self._loop: task.LoopingCall | None = None
        self.last: dict[str, int] | None = None  # what the last run deleted (tests, metrics)

    def startService(self):
        super().startService()
        self._loop = task.LoopingCall(self.run_once)
        self._loop.clock = self.clock
        self._loop.start(self.every, now=True)

    def stopService(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return super().stopService()

    def run_once(self) -> defer.Deferred:
        d = prune(self.chamber, self.retention, self.clock.seconds())

        def done(deleted):
            self.last = deleted
            if any(deleted.values()):
                log.info("chamber.pruned", **deleted)
            if self.metrics is not None:
                for kind, n in deleted.items():
                    self.metrics.pruned.labels(kind).inc(n)

        def failed(failure):
            log.error("chamber.prune_failed", error=failure.getErrorMessage())

        return d.addCallbacks(done, failed)
