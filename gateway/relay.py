"""The relay: takes committed outbound messages out of the chamber and delivers them to the HIS.

Per destination the queue is strict FIFO with one message in flight: send, wait for the ACK whose MSA-2
matches, record the answer, next.  A message that could not be delivered (no connection, no ACK in time)
stays at the head of the queue and is resent with the *same* control id after an exponential backoff
with jitter, so the HIS can drop a duplicate; nothing behind it overtakes it.  Every state change is
committed (``messages`` + ``message_events``), so after a crash the relay starts again from the chamber:
a message that was ``sending`` when the process died is simply sent again with its original MSH-10.

The relay wakes when the chamber commits (same process) and on a timer (``poll_interval``), so a chamber
written by another process is also picked up.
"""

from __future__ import annotations

import random
from typing import Callable, Protocol

import structlog
from twisted.application import service
from twisted.internet import defer

from gateway.scheduling import HisAnswer

log = structlog.get_logger("gateway.relay")


class DeliveryFailed(Exception):
    """The message did not reach the HIS (or no matching answer came back); it will be resent."""


class Destination(Protocol):
    """Where the relay delivers.  ``deliver`` fires with the HIS's answer, or fails with DeliveryFailed."""

    def deliver(self, body: bytes, control_id: str, timeout: float) -> defer.Deferred: ...

    def close(self) -> defer.Deferred: ...


class Relay(service.Service):
    """Delivers one destination's outbound queue."""

    def __init__(
        self,
        chamber,
        peer: str,
        destination: Destination,
        on_answer: Callable,
        *,
        clock,
        ack_timeout: float,
        retry_initial: float,
        retry_max: float,
        poll_interval: float = 1.0,
        rng: random.Random | None = None,
    ):
        self.setName(f"relay:{peer}")
        self.chamber = chamber
        self.peer = peer
        self.destination = destination
        self.on_answer = on_answer
        self.clock = clock
        self.ack_timeout = ack_timeout
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.poll_interval = poll_interval
        self.rng = rng or random.Random()
        self._running_loop: defer.Deferred | None = None
        self._busy = False  # set before the loop starts: a commit inside it must not start a second loop
        self._again = False
        self._timer = None
        self._stop_observing = None
        self.delivered = 0

    # -- lifecycle -------------------------------------------------------------------------------------------
    def startService(self):
        super().startService()
        self._stop_observing = self.chamber.observe(self.wake)
        self.wake()

    def stopService(self):
        super().stopService()
        if self._stop_observing:
            self._stop_observing()
            self._stop_observing = None
        self._cancel_timer()
        # Closing the link fails a delivery in flight (recorded as 'retrying': it is resent, with the
        # same control id, after the restart); then wait for the loop to record that.
        closed = self.destination.close()
        loop = self._running_loop
        if loop is None:
            return closed
        done: defer.Deferred = defer.Deferred()
        loop.addBoth(lambda _: done.callback(None))
        return done

    # -- the loop --------------------------------------------------------------------------------------------
    def wake(self) -> None:
        """Something may be waiting: run the loop (or make the running loop look again)."""
        if not self.running:
            return
        if self._busy:
            self._again = True
            return
        self._busy = True
        self._cancel_timer()
        self._running_loop = defer.ensureDeferred(self._drain())
        self._running_loop.addErrback(lambda f: log.error("relay.loop.failed", peer=self.peer,
                                                          error=f.getErrorMessage()))
        self._running_loop.addBoth(self._loop_done)

    def _loop_done(self, _):
        self._running_loop = None
        self._busy = False
        if self._again and self.running:
            self._again = False
            self.wake()

    async def _drain(self) -> None:
        while self.running:
            self._again = False
            head = self.chamber.read().next_outbound(self.peer)
            if head is None:
                self._arm(self.poll_interval)
                return
            now = self.clock.seconds()
            if head.next_attempt is not None and head.next_attempt > now and head.state == "retrying":
                self._arm(head.next_attempt - now)
                return
            delivered = await self._deliver(head)
            if not delivered:
                return

    async def _deliver(self, msg) -> bool:
        attempts = msg.attempts + 1
        await self.chamber.transact(
            lambda tx: tx.set_message_state(msg.id, "sending", attempts=attempts, detail=f"attempt {attempts}")
        )
        log.info("relay.sending", peer=self.peer, message=msg.id, control_id=msg.control_id, type=msg.type,
                 attempt=attempts)
        try:
            answer: HisAnswer = await self.destination.deliver(msg.body, msg.control_id, self.ack_timeout)
        except DeliveryFailed as e:
            reason = str(e)
            delay = self._backoff(attempts)
            await self.chamber.transact(
                lambda tx: tx.set_message_state(msg.id, "retrying", next_attempt=tx.now + delay,
                                                detail=f"{reason}; next attempt in {delay:.1f}s")
            )
            log.warning("relay.retrying", peer=self.peer, message=msg.id, control_id=msg.control_id,
                        attempt=attempts, delay=round(delay, 3), reason=reason)
            self._arm(delay)
            return False

        state = "delivered" if answer.accepted else "refused"

        def record(tx):
            tx.set_message_state(msg.id, state, answer_code=answer.code, answer_text=answer.text or None,
                                 detail=f"{answer.code} {answer.text}".strip())
            self.on_answer(tx, tx.message(msg.id), answer)

        await self.chamber.transact(record)
        self.delivered += 1
        log.info("relay.answered", peer=self.peer, message=msg.id, control_id=msg.control_id, type=msg.type,
                 state=state, ack=answer.code)
        return True

    def _backoff(self, attempts: int) -> float:
        base = min(self.retry_max, self.retry_initial * (2 ** (attempts - 1)))
        return base * (0.5 + self.rng.random() / 2)  # "equal jitter": between half and all of the step

    def _arm(self, delay: float) -> None:
        self._cancel_timer()
        if self.running:
            self._timer = self.clock.callLater(max(0.0, delay), self.wake)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
