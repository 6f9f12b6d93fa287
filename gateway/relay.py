"""The relay: takes committed outbound messages out of the chamber and delivers them to the HIS.

Per destination the queue is strict FIFO with one message in flight by default: send, wait for the ACK
whose MSA-2 matches, record the answer, next (``ordering: patient`` with a ``window`` above one keeps the
order per patient instead, with that many messages in flight on as many connections).  AA/CA: delivered.
AR/CR: refused, never resent.  AE/CE: dead-lettered with the HIS's error text.

A message that could not be delivered stays at the head of the queue and is resent with the *same* control
id after an exponential backoff with jitter (``retry_initial`` doubling up to ``retry_max``), so the HIS can
drop a duplicate; nothing behind it overtakes it.  The destination tells two failures apart:

* **The HIS is unreachable** (:class:`HisUnreachable`: no connection, connect refused or timed out, a TLS
  handshake that did not complete: the message was never written to the HIS).  Not an attempt: the message
  waits, tried again for as long as the outage lasts (the chamber holds the work; ``outer.max_backlog``
  stops new work first), and is never dead-lettered for it.  The outage is an alert, not a stream of
  retries: ``relay.his_unreachable`` is logged when it begins and then once per ``alert_every``,
  ``relay.his_reachable`` when it ends; :meth:`Relay.status` (/healthz, the metrics) shows it.
* **The HIS did not answer properly** (:class:`DeliveryFailed`: no ACK in time after the message was
  written, the connection lost after it, an answer that does not parse).  An attempt, counted in
  ``attempts`` (which so counts the times a message may have reached the HIS).  After ``max_attempts`` of
  them, or at one of them once the message is older than ``max_age``, it is dead-lettered with the reason;
  an operator can resubmit it (``gatewayd queue retry``).  A message's age counts from its commit, or from
  the end of the last outage this relay saw if that is later: time in which the HIS could not be reached
  never counts, and a message the HIS takes is delivered whatever its age.

Every state change is committed (``messages`` + ``message_events``), so after a crash the relay starts
again from the chamber: a message that was ``sending`` when the process died is simply sent again with its
original MSH-10.

The relay wakes when the chamber commits (same process) and on a timer (``poll_interval``), so a chamber
written by another process is also picked up.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Callable, Protocol

import structlog
from twisted.application import service
from twisted.internet import defer

from gateway.domain.routes import type_allowed
from gateway.domain.model import HisAnswer

log = structlog.get_logger("gateway.relay")


class DeliveryFailed(Exception):
    """The message went to the HIS but no proper answer came back (none in time, the connection lost, an
    unreadable one); it will be resent, and the attempt counts."""


class HisUnreachable(DeliveryFailed):
    """The message never reached the HIS (no connection, connect refused or timed out, TLS handshake not
    completed); it will be resent, and the attempt does not count."""


class Destination(Protocol):
    """Where the relay delivers.  ``deliver`` fires with the HIS's answer, or fails with DeliveryFailed
    (HisUnreachable when the message was never written to the HIS)."""

    def deliver(self, body: bytes, control_id: str, timeout: float) -> defer.Deferred: ...

    def close(self) -> defer.Deferred: ...


class _Lane:
    """One connection to the destination and the delivery loop that uses it."""

    def __init__(self, destination: Destination):
        self.destination = destination
        self.loop: defer.Deferred | None = None  # set while the lane is busy (or claimed: see Relay.claim_soon)
        self.claimed: int | None = None  # the message a claim unit prepared for this lane, until its commit


class Relay(service.Service):
    """Delivers one destination's outbound queue.

    ``ordering='fifo'`` (the default): one lane, strict commit order.  ``ordering='patient'``: one lane per
    destination given (the in-flight window); a message may go when it is the oldest unfinished message of
    its patient (``order_key``) and no other lane is sending for that patient, so one patient's blocked
    message does not hold up the others'."""

    def __init__(
        self,
        chamber,
        peer: str,
        destination: Destination | list[Destination],
        on_answer: Callable,
        *,
        clock,
        ack_timeout: float,
        retry_initial: float,
        retry_max: float,
        max_attempts: int = 20,
        max_age: float = 3600.0,
        on_dead: Callable | None = None,
        encode: Callable | None = None,
        send_types: tuple[str, ...] | None = None,
        metrics=None,
        ordering: str = "fifo",
        poll_interval: float = 1.0,
        rng: random.Random | None = None,
        alert_every: float = 60.0,
    ):
        self.setName(f"relay:{peer}")
        destinations = destination if isinstance(destination, list) else [destination]
        if ordering == "fifo" and len(destinations) != 1:
            raise ValueError("strict FIFO allows one message in flight: give one destination")
        self.chamber = chamber
        self.peer = peer
        self.lanes = [_Lane(d) for d in destinations]
        self.ordering = ordering
        self.on_answer = on_answer
        self.clock = clock
        self.ack_timeout = ack_timeout
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.max_attempts = max_attempts
        self.max_age = max_age
        self.on_dead = on_dead or (lambda tx, msg, reason: None)
        self.encode = encode  # (tx, message) -> (bytes, type, charset), for messages committed without HL7
        self.send_types = send_types  # what may cross to this destination (None: anything)
        self.metrics = metrics  # gateway.ops.admin.Metrics, or None
        self._last_error: str | None = None  # the last failed delivery, cleared by the next answer
        self._last_answer: float | None = None
        self.alert_every = alert_every  # how often an outage is logged while it lasts
        self._unreachable_since: float | None = None  # when the current outage began; None: the HIS was reached
        self._outage_tries = 0  # sends that did not reach the HIS in the current outage (its backoff step)
        self._alerted: float | None = None  # when the current outage was last logged
        self._age_from: float | None = None  # the end of the last outage: max_age counts from there
        self.poll_interval = poll_interval
        self.rng = rng or random.Random()
        self._in_flight: dict[int, str] = {}  # message id -> its ordering key
        self._waking = False
        self._wake_again = False
        self._queue_seen = None  # ordering by patient: the queue as read by the first pick of a wake-up
        self._timer = None
        self._stop_observing = None
        self.delivered = 0
        if metrics is not None:
            metrics.watch_his(peer, self.status)

    # -- lifecycle -------------------------------------------------------------------------------------------
    def startService(self):
        super().startService()
        # (after this process's commits, only those that queued or moved a message: an SIU recorded is
        # nothing to deliver)
        self._stop_observing = self.chamber.observe(self.wake, queue_only=True)
        self.wake()

    def stopService(self):
        super().stopService()
        if self._stop_observing:
            self._stop_observing()
            self._stop_observing = None
        self._cancel_timer()
        # Closing the links fails deliveries in flight (recorded as 'retrying': they are resent, with the
        # same control ids, after the restart); then wait for the loops to record that.
        waits = [lane.destination.close() for lane in self.lanes]
        waits += [self._finished(lane.loop) for lane in self.lanes if lane.loop is not None]
        return defer.DeferredList(waits, consumeErrors=True)

    @staticmethod
    def _finished(loop: defer.Deferred) -> defer.Deferred:
        done: defer.Deferred = defer.Deferred()
        loop.addBoth(lambda _: done.callback(None))
        return done

    def status(self) -> dict:
        """For /healthz and the metrics: ``reachable`` is False during an outage (the last send did not reach
        the HIS), with its start and length; ``answering`` is False from any failed delivery to the next
        answer."""
        since = self._unreachable_since
        return {"reachable": since is None, "unreachable_since": since,
                "unreachable_seconds": 0.0 if since is None else round(self.clock.seconds() - since, 3),
                "answering": self._last_error is None, "last_error": self._last_error,
                "last_answer": self._last_answer, "in_flight": len(self._in_flight)}

    # -- the loops -------------------------------------------------------------------------------------------
    def wake(self) -> None:
        """Something may be waiting: start every idle lane (a busy lane looks again when it is done)."""
        if not self.running:
            return
        self._cancel_timer()
        if self._waking:  # a commit while lanes start (a synchronous chamber): look again after them
            self._wake_again = True
            return
        self._waking = True
        try:
            for lane in self.lanes:
                if lane.loop is None:
                    self._start(lane)
        finally:
            self._waking = False
            self._queue_seen = None
        if self._wake_again:
            self._wake_again = False
            self.wake()

    def _start(self, lane: _Lane, taken=None) -> None:
        if lane.loop is None:
            lane.loop = defer.Deferred()  # set before the loop runs: a commit inside it must not start it twice
        loop = defer.ensureDeferred(self._drain(lane, taken))
        loop.addErrback(lambda f: log.error("relay.loop.failed", peer=self.peer, error=f.getErrorMessage()))
        loop.addBoth(self._lane_done, lane)

    # -- claims: the send prepared in the transaction that queued the message -------------------------------
    def claim_soon(self) -> None:
        """Something is being queued for the HIS in the chamber's batch now forming (the booking service calls
        this right after its ``transact``): join that batch with a unit that prepares the next message for
        an idle lane (encode, mark ``sending``), so the send needs no commit of its own — one commit both
        queues the message and starts its delivery.  Nothing happens when every lane is busy (a lane that
        finishes takes the next message itself), the relay cannot encode (the split lock's outer gate) or it
        orders by patient."""
        if not self.running or self.encode is None or self.ordering != "fifo":
            return  # (ordering by patient: measured no better with claims — more CPU at 200 bookings/s)
        lane = next((candidate for candidate in self.lanes if candidate.loop is None), None)
        if lane is None:
            return
        lane.loop = defer.Deferred()  # claimed: wake() leaves this lane alone until the claim's commit
        d = self.chamber.transact(lambda tx: self._claim(tx, lane))
        d.addCallbacks(lambda row: self._claimed(lane, row), lambda failure: self._claimed(lane, None))

    def _claim(self, tx, lane: _Lane):
        """The claim unit: the next message a lane may send (as :meth:`_next_due` decides, seeing the batch's
        own uncommitted messages), prepared; reserved at once so no other lane takes it.  None if there is
        none, or on any problem (the ordinary path then deals with it)."""
        if not self.running:
            return None
        row = self._prepared_next(tx)
        if row is not None:
            self._in_flight[row.id] = row.order_key or f"#{row.id}"
            lane.claimed = row.id
        return row

    def _claimed(self, lane: _Lane, row) -> None:
        """After the claim's COMMIT (or its failure: then ``row`` is None and the reservation is undone)."""
        if row is None:
            if lane.claimed is not None:
                self._in_flight.pop(lane.claimed, None)
            lane.claimed = None
            marker, lane.loop = lane.loop, None
            marker.callback(None)
            self.wake()
            return
        lane.claimed = None
        self._start(lane, taken=row)

    def _lane_done(self, _, lane: _Lane) -> None:
        marker, lane.loop = lane.loop, None
        marker.callback(None)

    async def _drain(self, lane: _Lane, taken=None) -> None:
        # taken: the next message, already prepared (encoded, marked sending) in the transaction that queued
        # it (a claim) or that recorded the previous answer (strict FIFO)
        while self.running:
            if taken is not None:
                msg, prepared, taken = taken, True, None
            else:
                msg, wait = self._pick()
                if msg is None:
                    self._arm(wait)
                    return
                prepared = False
            self._in_flight[msg.id] = msg.order_key or f"#{msg.id}"
            try:
                taken = await self._deliver(lane.destination, msg, prepared)
            finally:
                del self._in_flight[msg.id]

    def _pick(self):
        """The next message a lane may send now, or (None, seconds until one may be ready)."""
        reader = self.chamber.read()
        now = self.clock.seconds()
        wait = self.poll_interval
        if self.ordering == "fifo":
            msg = reader.next_outbound(self.peer)
            if msg is None or msg.id in self._in_flight:
                return None, wait
            if msg.state == "retrying" and msg.next_attempt is not None and msg.next_attempt > now:
                return None, min(wait, msg.next_attempt - now)
            return msg, 0.0
        # ordering by patient: the queue's order keys and states only (no bodies), read once for all the
        # lanes a wake-up starts (nothing commits between their picks: each takes its message into
        # _in_flight, which the next one's pick sees); the full row of the one picked
        blocked = set(self._in_flight.values())
        queue, seen_before = self._queue_seen, self._queue_seen is not None
        if queue is None:
            queue = reader.unfinished_outbound(self.peer, brief=True)
            if self._waking:
                self._queue_seen = queue
        for message_id, order_key, state, next_attempt in queue:
            key = order_key or f"#{message_id}"
            if message_id in self._in_flight or key in blocked:
                blocked.add(key)
                continue
            msg = None
            if seen_before:  # read by an earlier lane of this wake-up: the message's row now decides
                msg = reader.message(message_id)
                if msg is None or msg.state not in ("committed", "sending", "retrying"):
                    continue
                state, next_attempt = msg.state, msg.next_attempt
            blocked.add(key)  # later messages of this patient wait for this one
            if state == "retrying" and next_attempt is not None and next_attempt > now:
                wait = min(wait, next_attempt - now)
                continue
            msg = msg or reader.message(message_id)
            if msg is not None:
                return msg, 0.0
        return None, wait

    async def _deliver(self, destination: Destination, msg, prepared: bool = False):
        """Send ``msg`` and record the answer (or the failure).  ``prepared``: it was encoded and marked
        ``sending`` (its attempt counted) already.  Returns the next message if the answer's transaction
        took it (strict FIFO: see :meth:`_take_next`), else None."""
        if prepared:
            attempts = msg.attempts
        else:
            attempts = msg.attempts + 1
            try:
                msg, allowed = await self.chamber.transact(lambda tx: self._prepare(tx, msg, attempts))
            except ValueError as e:
                await self._dead(msg, f"cannot be encoded: {e}")
                return None
            if not allowed:
                await self._dead(msg, f"{msg.type} may not cross to this HIS (allowed: {', '.join(self.send_types)})")
                return None
        log.info("relay.sending", peer=self.peer, message=msg.id, control_id=msg.control_id, type=msg.type,
                 attempt=attempts)
        try:
            answer: HisAnswer = await destination.deliver(msg.body, msg.control_id, self.ack_timeout)
        except HisUnreachable as e:
            await self._wait_for_his(msg, attempts - 1, str(e))
            return None
        except DeliveryFailed as e:
            reason = str(e)
            self._reached()
            self._last_error = reason
            if attempts >= self.max_attempts:
                await self._dead(msg, f"no answer after {attempts} attempts; last error: {reason}",
                                 attempts=attempts)
                return None
            if self._age(msg) > self.max_age:
                await self._dead(msg, f"not delivered within {self.max_age:.0f}s (max_age); last error: {reason}",
                                 attempts=attempts)
                return None
            delay = self._backoff(attempts)
            await self.chamber.transact(
                lambda tx: tx.set_message_state(msg.id, "retrying", next_attempt=tx.now + delay, last_error=reason,
                                                detail=f"{reason}; next attempt in {delay:.1f}s")
            )
            log.warning("relay.retrying", peer=self.peer, message=msg.id, control_id=msg.control_id,
                        attempt=attempts, delay=round(delay, 3), reason=reason)
            return None

        # HL7 rules: AA/CA accepted; AR/CR rejected (the message itself is unacceptable: never resent);
        # AE/CE an application error at the HIS: dead-lettered with its text for an operator to look at.
        state = {"AA": "delivered", "CA": "delivered", "AR": "refused", "CR": "refused"}.get(answer.code, "dead")

        def record(tx):
            error = f"{answer.code}: {answer.text or 'no reason given'}" if state == "dead" else None
            tx.set_message_state(msg.id, state, answer_code=answer.code, answer_text=answer.text or None,
                                 last_error=error, detail=f"{answer.code} {answer.text}".strip())
            self.on_answer(tx, tx.message(msg.id), answer)
            return self._take_next(tx)

        taken = await self.chamber.transact(record)
        self.delivered += 1
        self._reached()
        self._last_error, self._last_answer = None, self.clock.seconds()
        if self.metrics is not None:
            self.metrics.delivered(self.peer, answer.code, self.clock.seconds() - msg.created)
        log.info("relay.answered", peer=self.peer, message=msg.id, control_id=msg.control_id, type=msg.type,
                 state=state, ack=answer.code)
        return taken

    def _take_next(self, tx):
        """Strict FIFO: inside the transaction that records an answer, take the next message of the queue
        and prepare it (encode, mark ``sending``), so one commit both ends a delivery and starts the next.
        None (the next loop turn picks as usual) when there is none, it is not due yet, it cannot be encoded
        or may not cross, or the relay is stopping — those cases take the ordinary path.
        (``_prepare`` raises before its first write; a message that may not cross stays encoded, as on the
        ordinary path.)"""
        if self.ordering != "fifo" or not self.running:
            return None
        return self._prepared_next(tx)

    def _next_due(self, tx):
        """Strict FIFO, inside a transaction: the head of the queue if no lane has it and it is due, else
        None."""
        nxt = tx.next_outbound(self.peer)
        if nxt is None or nxt.id in self._in_flight:
            return None
        if nxt.state == "retrying" and nxt.next_attempt is not None and nxt.next_attempt > tx.now:
            return None
        return nxt

    def _prepared_next(self, tx):
        """:meth:`_next_due`, prepared for its send (its row as sent), or None."""
        nxt = self._next_due(tx)
        if nxt is None:
            return None
        if not nxt.body and self.encode is None:
            return None
        attempts = nxt.attempts + 1
        try:
            row, allowed = self._prepare(tx, nxt, attempts)
        except Exception as e:  # noqa: BLE001 - never at the cost of the answer being recorded: the ordinary
            log.warning("relay.take_next.failed", peer=self.peer, message=nxt.id,  # path deals with it
                        error_type=type(e).__name__)
            return None
        if not allowed:
            return None
        return replace(row, state="sending", attempts=attempts)

    def _prepare(self, tx, msg, attempts: int):
        """The one unit (one commit) before a send: a message the outer gate committed as an intent gets its
        HL7 bytes (stored once: every resend carries the same), and the message is marked ``sending``.
        Returns (the message, whether it may cross); raises ValueError if it cannot be encoded (nothing of
        the unit is kept)."""
        if not msg.body:
            row = tx.message(msg.id)
            if not row.body:
                if self.encode is None:
                    raise ValueError("this process has no encoder for the HIS (it is not the inner gate)")
                body, type_, charset = self.encode(tx, row)
                tx.set_encoded(msg.id, body, type_, charset, state=row.state)
                row = replace(row, body=body, type=type_, charset=charset)
            msg = row
        if self.send_types is not None and not type_allowed(msg.type, self.send_types):
            return msg, False  # dead-lettered next (the bytes stay, for an operator to look at)
        tx.set_message_state(msg.id, "sending", attempts=attempts, detail=f"attempt {attempts}")
        return msg, True

    async def _dead(self, msg, reason: str, attempts: int | None = None) -> None:
        def record(tx):
            tx.set_message_state(msg.id, "dead", attempts=attempts, last_error=reason, detail=reason)
            self.on_dead(tx, tx.message(msg.id), reason)

        await self.chamber.transact(record)
        log.error("relay.dead_letter", peer=self.peer, message=msg.id, control_id=msg.control_id, type=msg.type,
                  reason=reason)

    async def _wait_for_his(self, msg, attempts: int, reason: str) -> None:
        """The send never reached the HIS: not an attempt (``attempts``: the count before it).  The message
        waits for the outage's next backoff step; the outage is logged when it begins and once per
        ``alert_every`` while it lasts (a send cut short by our own shutdown is no outage)."""
        now = self.clock.seconds()
        self._last_error = reason
        if self.running:
            if self._unreachable_since is None:
                self._unreachable_since, self._outage_tries, self._alerted = now, 0, None
            self._outage_tries += 1
        delay = self._backoff(max(1, self._outage_tries))
        await self.chamber.transact(
            lambda tx: tx.set_message_state(msg.id, "retrying", attempts=attempts, next_attempt=tx.now + delay,
                                            last_error=reason, detail=f"HIS unreachable (not counted as an "
                                            f"attempt): {reason}; next try in {delay:.1f}s")
        )
        if self.metrics is not None:
            self.metrics.his_unreachable.labels(self.peer).inc()
        log.debug("relay.waiting_for_his", peer=self.peer, message=msg.id, control_id=msg.control_id,
                  delay=round(delay, 3), reason=reason)
        since = self._unreachable_since
        if self.running and since is not None and (self._alerted is None or now - self._alerted >= self.alert_every):
            self._alerted = now
            log.error("relay.his_unreachable", peer=self.peer, outage_seconds=round(now - since, 1),
                      tries=self._outage_tries, waiting=self.chamber.read().outbound_backlog(self.peer),
                      reason=reason)

    def _reached(self) -> None:
        """A send reached the HIS (answered or not): an outage, if there was one, is over, and the age of every
        waiting message (max_age) counts from now."""
        if self._unreachable_since is None:
            return
        now = self.clock.seconds()
        log.info("relay.his_reachable", peer=self.peer, outage_seconds=round(now - self._unreachable_since, 1),
                 tries=self._outage_tries)
        self._unreachable_since, self._age_from = None, now

    def _age(self, msg) -> float:
        """How long ``msg`` has waited for the HIS, for max_age: since its commit or the end of the last outage,
        whichever is later."""
        return self.clock.seconds() - max(msg.created, self._age_from or msg.created)

    def _backoff(self, attempts: int) -> float:
        base = min(self.retry_max, self.retry_initial * (2 ** (attempts - 1)))
        return base * (0.5 + self.rng.random() / 2)  # "equal jitter": between half and all of the step

    def _arm(self, delay: float) -> None:
        """Wake up in ``delay`` seconds (or sooner, if already armed for sooner)."""
        if not self.running:
            return
        when = self.clock.seconds() + max(0.0, delay)
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= when:
                return
            self._timer.cancel()
        self._timer = self.clock.callLater(max(0.0, delay), self.wake)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
