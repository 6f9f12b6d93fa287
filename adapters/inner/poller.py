"""``slot_source: poll``: the inner gate asks a HIS endpoint for its slot book (:class:`SlotPoller`).

Every ``poll_interval`` an SQM^S25 goes out on the poller's own MLLP client; the SQR^S25 answer is read into
slot notices and handed to :class:`gateway.domain.inbound.InboundService`, like an SIU the HIS pushed.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import structlog
from twisted.application import service
from twisted.internet import defer

from adapters.hl7.ack import read_ack
from adapters.hl7.er7 import Hl7Error
from adapters.hl7.identity import sender
from adapters.maps.siu_slot import notices_from_sqr
from adapters.inner.client import AckTimeout, PeerUnavailable
from gateway.domain.booking import new_control_id
from gateway.domain.inbound import Received

log = structlog.get_logger("gateway.inner")


class SlotPoller(service.Service):
    """``slot_source: poll``: query the HIS's slot book with SQM^S25 every ``interval`` seconds.

    A poll that fails (HIS unreachable, no answer, refused) is tried again after ``retry_initial``,
    doubling up to ``retry_max`` (never later than the next regular poll)."""

    def __init__(self, client, inbound, *, peer: str, build_query, interval: float, days: int,
                 tz: ZoneInfo, ack_timeout: float, retry_initial: float, retry_max: float, clock):
        self.setName(f"poller:{peer}")
        self.client = client
        self.inbound = inbound
        self.peer = peer
        self.build_query = build_query
        self.interval = interval
        self.days = days
        self.tz = tz
        self.ack_timeout = ack_timeout
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.clock = clock
        self._call = None
        self._failures = 0
        self.polls = 0

    def startService(self):
        super().startService()
        self._schedule(0)

    def stopService(self):
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        return self.client.close()

    def _schedule(self, delay: float) -> None:
        if self.running:
            self._call = self.clock.callLater(delay, self._run)

    def _run(self) -> None:
        d = self.poll()
        d.addErrback(lambda f: (log.error("poller.error", peer=self.peer, error=f.getErrorMessage()), False)[1])
        d.addCallback(self._next)

    def _next(self, ok: bool) -> None:
        if ok:
            self._failures = 0
            self._schedule(self.interval)
        else:
            self._failures += 1
            delay = min(self.retry_initial * 2 ** (self._failures - 1), self.retry_max, self.interval)
            self._schedule(delay)

    @defer.inlineCallbacks
    def poll(self):
        """One SQM^S25 -> SQR^S25 exchange, applied to the slot book; fires True when it was applied."""
        now = datetime.fromtimestamp(self.clock.seconds(), self.tz).replace(tzinfo=None)
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        control_id = new_control_id()
        body = self.build_query(control_id=control_id, query_id=control_id, start=start,
                                end=start + timedelta(days=self.days), now=now)
        try:
            answer = yield self.client.send(body, control_id, self.ack_timeout)
            code, _, text = read_ack(answer)
            if code not in ("AA", "CA"):
                log.warning("poller.refused", peer=self.peer, control_id=control_id, ack=code)
                return False
            notices = notices_from_sqr(answer)
        except (AckTimeout, PeerUnavailable, Hl7Error) as e:
            log.warning("poller.failed", peer=self.peer, control_id=control_id, error=str(e))
            return False
        received = Received(peer=self.peer, control_id=answer.control_id or control_id, type=answer.type_name,
                            body=answer.raw, charset=answer.charset, sender=sender(answer))
        yield self.inbound.accept(received, notices)
        self.polls += 1
        log.info("poller.applied", peer=self.peer, control_id=control_id, slots=len(notices))
        return True
