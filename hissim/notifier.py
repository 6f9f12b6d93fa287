"""The HIS's outgoing messages to the gateway: a FIFO queue with one message in flight.

Used for the SIU notifications and, in a second instance with its own connection, for the pharmacy's
RDS^O13 dispenses and released RDE^O11 prescriptions (`hissim.pharmacy`). A queued item is anything with
a ``type_name`` and ``facts()`` (what its sent-journal line says besides time, control id and type).

Each notification is built when it is queued (its MSH-10 and MSH-7 given then) and committed to the store's
outbox (`hissim.store`, one outbox per ``role``) in the transaction of the change it announces; it is sent
as those very bytes on every attempt, after a restart too, so the gateway can drop duplicates. It leaves the
outbox when the gateway takes it (one in flight at a kill -9 is sent again by the next run).
Failure paths, all chosen on purpose:
- the gateway is not reachable (connect refused, connection lost) -> resend after a backoff;
- no ACK with our MSA-2 within ``ack_timeout``                      -> resend after a backoff;
- an ACK AE / AR / CE / CR                                          -> resend after a backoff
  (the gateway refusing is a problem to fix there; later notifications wait, in order).
The backoff starts at ``retry_initial``, doubles up to ``retry_max`` and resets after an AA / CA.
Each notification is journalled once, when first sent (not on resends); one still in the outbox from an earlier
run is journalled again when first sent in this one, marked ``restored``.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import structlog
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from adapters.hl7.ack import read_ack
from adapters.hl7.er7 import Message
from hissim.clocks import HospitalClock
from hissim.journal import Journal
from hissim.store import Queued, Store

log = structlog.get_logger("hissim.notifier")


class Outgoing(Protocol):
    """What the notifier queues: a `hissim.messages.Notification`, a `hissim.pharmacy.Dispatch`."""

    @property
    def type_name(self) -> str: ...

    def facts(self) -> dict[str, Any]: ...


#: send(payload, control_id) -> Deferred firing with the gateway's answer (MSA-2 already matched)
Sender = Callable[[bytes, str], "Deferred[Message]"]
#: build(item, control_id, now) -> payload bytes
Builder = Callable[[Any, str, datetime], bytes]

ACCEPTED = frozenset({"AA", "CA"})


@dataclass
class _Pending:
    queued: Queued
    restored: bool = False  # queued by an earlier run
    payload: bytes | None = None  # read from the outbox when first sent in this run
    attempts: int = 0


class Notifier:
    def __init__(
        self,
        *,
        send: Sender,
        build: Builder,
        clock: HospitalClock,
        control_ids: Iterator[str],
        journal: Journal,
        store: Store,
        role: str,
        retry_initial: float = 0.5,
        retry_max: float = 10.0,
    ) -> None:
        self._send = send
        self._build = build
        self._clock = clock
        self._reactor: IReactorTime = clock.clock
        self._control_ids = control_ids
        self._journal = journal
        self._store = store
        self._role = role
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._delay = retry_initial
        self._queue = collections.deque(_Pending(queued, restored=True) for queued in store.queued(role))
        self._in_flight = False
        self._wakeup: IDelayedCall | None = None
        self._running = False
        self.delivered = 0

    @property
    def pending(self) -> int:
        """Notifications not yet acknowledged (the one in flight included)."""
        return len(self._queue)

    def start(self) -> None:
        self._running = True
        self._schedule(0)

    def stop(self) -> None:
        self._running = False
        if self._wakeup is not None and self._wakeup.active():
            self._wakeup.cancel()
        self._wakeup = None

    def enqueue(self, note: Outgoing) -> None:
        """Build ``note`` and put it in the outbox, in the current transaction (or one of its own); it joins
        the queue once that transaction has committed."""
        control_id = next(self._control_ids)
        payload = self._build(note, control_id, self._clock.local())
        with self._store.transaction():
            queued = self._store.queue(self._role, control_id, note.type_name, note.facts(), payload)
            self._store.after_commit(lambda: self._queued(_Pending(queued)))

    def _queued(self, item: _Pending) -> None:
        self._queue.append(item)
        if not self._in_flight:
            # A call for "now" would run before the reactor's next I/O pass, ahead of the SRR just written;
            # a millisecond lets the answer go out first. (Building the SIU takes ~30 us since it is
            # formatted directly, hissim.messages.build_siu; through hl7apy it took ~10 ms.)
            self._schedule(0.001)

    # -- the pump -------------------------------------------------------------------------------

    def _schedule(self, delay: float) -> None:
        if not self._running:
            return
        if self._wakeup is not None and self._wakeup.active():
            return
        self._wakeup = self._reactor.callLater(delay, self._pump)

    def _pump(self) -> None:
        self._wakeup = None
        if not self._running or self._in_flight or not self._queue:
            return
        item = self._queue[0]
        queued = item.queued
        if item.payload is None:
            item.payload = self._store.payload(queued.seq)
            entry = {"time": self._clock.iso(), "control_id": queued.control_id, "type": queued.type_name,
                     **queued.facts}
            if item.restored:
                entry["restored"] = True
            self._journal.write(entry)
        item.attempts += 1
        self._in_flight = True
        try:
            d = self._send(item.payload, queued.control_id)
        except Exception:  # a sender that fails synchronously is treated like a lost connection
            d = Deferred()
            d.errback(Failure())
        d.addCallbacks(self._answered, self._failed, callbackArgs=(item,), errbackArgs=(item,))

    def _answered(self, answer: Message, item: _Pending) -> None:
        self._in_flight = False
        code, _control_id, text = read_ack(answer)
        queued = item.queued
        if code in ACCEPTED:
            self._queue.popleft()
            self._store.delivered(queued.seq)
            self.delivered += 1
            self._delay = self._retry_initial
            log.debug("his-sim.notification-acked", control_id=queued.control_id, type=queued.type_name)
            self._schedule(0)
            return
        log.warning("his-sim.notification-refused", control_id=queued.control_id, type=queued.type_name,
                    ack=code, text=text, attempts=item.attempts)
        self._retry()

    def _failed(self, failure: Failure, item: _Pending) -> None:
        self._in_flight = False
        log.info("his-sim.notification-failed", control_id=item.queued.control_id, type=item.queued.type_name,
                 error=failure.getErrorMessage() or failure.type.__name__, attempts=item.attempts)
        self._retry()

    def _retry(self) -> None:
        delay = self._delay
        self._delay = min(self._delay * 2, self._retry_max)
        self._schedule(delay)
