"""The relay: takes committed outbound messages out of the chamber and delivers them to the HIS.

Per destination the queue is strict FIFO with one message in flight: send, wait for the ACK whose MSA-2
matches, record the answer, next.  AA/CA: delivered.  AR/CR: refused, never resent.  AE/CE: dead-lettered
with the HIS's error text.  A message not answered after ``max_attempts`` tries, or older than
``max_age``, is dead-lettered with the reason; an operator can resubmit it (``gatewayd queue retry``).  A message that could not be delivered (no connection, no ACK in time)
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
        max_attempts: int = 20,
        max_age: float = 3600.0,
        on_dead: Callable | None = None,
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
        self.max_attempts = max_attempts
        self.max_age = max_age
        self.on_dead = on_dead or (lambda tx, msg, reason: None)
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
        if self.clock.seconds() - msg.created > self.max_age:
            await self._dead(msg, f"not delivered within {self.max_age:.0f}s"
                                  f"{'; last error: ' + msg.last_error if msg.last_error else ''}")
            return True
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
            if attempts >= self.max_attempts:
                await self._dead(msg, f"no answer after {attempts} attempts; last error: {reason}",
                                 attempts=attempts)
                return True
            delay = self._backoff(attempts)
            await self.chamber.transact(
                lambda tx: tx.set_message_state(msg.id, "retrying", next_attempt=tx.now + delay, last_error=reason,
                                                detail=f"{reason}; next attempt in {delay:.1f}s")
            )
            log.warning("relay.retrying", peer=self.peer, message=msg.id, control_id=msg.control_id,
                        attempt=attempts, delay=round(delay, 3), reason=reason)
            self._arm(delay)
            return False

        # HL7 rules: AA/CA accepted; AR/CR rejected (the message itself is unacceptable: never resent);
        # AE/CE an application error at the HIS: dead-lettered with its text for an operator to look at.
        state = {"AA": "delivered", "CA": "delivered", "AR": "refused", "CR": "refused"}.get(answer.code, "dead")

        def record(tx):
            error = f"{answer.code}: {answer.text or 'no reason given'}" if state == "dead" else None
            tx.set_message_state(msg.id, state, answer_code=answer.code, answer_text=answer.text or None,
                                 last_error=error, detail=f"{answer.code} {answer.text}".strip())
            self.on_answer(tx, tx.message(msg.id), answer)

        await self.chamber.transact(record)
        self.delivered += 1
        log.info("relay.answered", peer=self.peer, message=msg.id, control_id=msg.control_id, type=msg.type,
                 state=state, ack=answer.code)
        return True

    async def _dead(self, msg, reason: str, attempts: int | None = None) -> None:
        def record(tx):
            tx.set_message_state(msg.id, "dead", attempts=attempts, last_error=reason, detail=reason)
            self.on_dead(tx, tx.message(msg.id), reason)

        await self.chamber.transact(record)
        log.error("relay.dead_letter", peer=self.peer, message=msg.id, control_id=msg.control_id, type=msg.type,
                  reason=reason)

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
