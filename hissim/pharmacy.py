"""The hospital pharmacy system the simulator also plays (config ``pharmacy:``, docs/prescriptions.md section 6).

It has a listener of its own (``pharmacy.listen``: in a hospital the pharmacy system is often another
machine) and a second `Notifier`, with its own MLLP connection, towards the gateway's inner listener. What
it reads and writes is in `hissim.pharmacy_messages`.

Answers (MSA-2 = the received MSH-10):
- RDE^O11 -> RRE^O12, OMP^O09 -> ORP^O10: MSA AA and, per ORC group, ORC-1 OK with a new filler number in
  ORC-3; an item whose drug code is in ``out_of_stock`` gets ORC-1 UA and no filler number, and the answer MSA
  AE with an ERR 207 naming the drug. An order that cannot be read (no PID, no drug, no route... the gateway's
  own `prescription_from_rde` checks an RDE): MSA AR with the `Hl7Error`'s code, location and text.
- any other message -> ACK AR with ERR 200 (unsupported message type) or 201 (an RDE/OMP event other than
  O11/O09).
- a resend (an MSH-10 already answered, same content, MSH-7 aside) gets the very same answer bytes: no new
  filler number, no second dispense. The same MSH-10 with other content: AR 205.
Dispensing: ``dispense_delay`` after an order answered AA, one RDS^O13 with a group per item. An order
answered AE is not filled: the gateway refuses a whole prescription when one item is refused.
Durability (`hissim.store`): an order's answer (remembered for resends) and, when accepted, the order itself
with its filler numbers and due time are committed before the answer goes back; an order not dispensed yet
when the simulator stops is dispensed by the next run when it is due (at once if that time has passed). The
RDS and the released RDE go through the store's outbox (role ``pharmacy``).
Releasing: every ``release_every`` (0: never) and on `Pharmacy.release_now` (SIGUSR2), an RDE^O11 releasing a
random prescription to outside pharmacies.

Journals: the received log gets one line per message (control id, type, ack, prescription number, placer
ids, filler numbers read back from our answer, the refusal reason); the sent log one line per RDS / RDE when
first sent (control id, type, reason ``dispense`` / ``release``, prescription number, placer ids, filler
numbers; for a dispense the order's control id). Never a patient's name or identifier.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from twisted.internet import task
from twisted.internet.interfaces import IDelayedCall

from adapters.hl7.er7 import Hl7Error, Message, escape, parse
from adapters.maps.rde_order import read_order_answer
from hissim.clocks import HospitalClock
from hissim.config import PharmacyConfig
from hissim.handler import REUSED_CONTROL_ID, Answered, AnswerMemory
from hissim.journal import Journal
from hissim.messages import Header, Refusal, build_answer
from hissim.messages import control_ids as numbered
from hissim.notifier import Notifier, Sender
from hissim.pharmacy_messages import (
    ORDER_KINDS,
    Order,
    Release,
    build_order_answer,
    build_rds,
    build_release,
    random_release,
    read_order,
)
from hissim.store import Store

log = structlog.get_logger("hissim.pharmacy")


@dataclass(frozen=True)
class Dispatch:
    """A pharmacy message for the notifier, built when first sent (its control id and time known then)."""

    type_name: str
    journal: dict[str, Any]  # the sent journal's facts
    build: Callable[[str, datetime], bytes]  # (control id, now) -> payload

    def facts(self) -> dict[str, Any]:
        return dict(self.journal)


class PharmacyHandler:
    """The pharmacy's MLLP handler: answers orders; ``accepted(message, order, fillers)`` for each order
    answered AA, in the transaction that records the answer."""

    def __init__(self, *, store: Store, header: Header, clock: HospitalClock, control_ids: Iterator[str],
                 fillers: Iterator[str], out_of_stock: frozenset[str], journal: Journal,
                 accepted: Callable[[Message, Order, list[str]], None]) -> None:
        self.store = store
        self.header = header
        self.clock = clock
        self.control_ids = control_ids
        self.fillers = fillers
        self.out_of_stock = out_of_stock
        self.journal = journal
        self.accepted = accepted
        self.answers = AnswerMemory(store, "pharmacy")

    def handle(self, message: Message, peer: Any = None) -> bytes:
        recall = self.answers.recall(message)
        if recall.resend is not None:
            code, answer = recall.resend.code, recall.resend.answer
        elif recall.reused:
            code, answer = "AR", self._refuse(message, REUSED_CONTROL_ID)
        else:
            with self.store.transaction():
                code, answer = self._process(message)
                self.answers.remember(message.control_id, Answered(recall.fingerprint, code, answer))
        facts = _facts(message, parse(answer, default_charset=self.header.codec))
        entry = {"time": self.clock.iso(), "control_id": message.control_id, "type": message.type_name,
                 "ack": code, **facts}
        if recall.resend is not None:
            entry["duplicate"] = True
        self.journal.write(entry)
        log.info("his-sim.pharmacy.received", control_id=message.control_id, type=message.type_name, ack=code,
                 duplicate=recall.resend is not None, items=len(facts["placers"]))
        return answer

    def _process(self, message: Message) -> tuple[str, bytes]:
        kind = ORDER_KINDS.get((message.message_code, message.trigger))
        if kind is None:
            if message.message_code in ("RDE", "OMP"):
                return "AR", self._refuse(message, Refusal(201, f"unsupported event {message.trigger}", "MSH", 9))
            return "AR", self._refuse(message, Refusal(200, "unsupported message type", "MSH", 9))
        try:
            order = read_order(message)
        except Hl7Error as exc:
            refusal = Refusal(exc.code, exc.text, exc.segment or "", exc.field, exc.sequence)
            return "AR", self._refuse(message, refusal, kind.answer_type)
        fillers = [None if item.drug.code in self.out_of_stock else next(self.fillers) for item in order.items]
        answer = build_order_answer(order, fillers, header=self.header, control_id=next(self.control_ids),
                                    now=self.clock.local())
        if None in fillers:
            return "AE", answer
        self.accepted(message, order, fillers)
        return "AA", answer

    def _refuse(self, message: Message, refusal: Refusal, answer_type: str | None = None) -> bytes:
        msh = message.msh
        return build_answer(
            self.header,
            type_name=answer_type or f"ACK^{escape(message.trigger or '')}^ACK",
            answered_control_id=msh.raw(10),
            control_id=next(self.control_ids),
            now=self.clock.local(),
            to_application=msh.raw(3),
            to_facility=msh.raw(4),
            refusal=refusal,
        )


def _facts(message: Message, answer: Message) -> dict[str, Any]:
    """The received journal's facts: ids and codes from the order and from our answer, no patient data."""
    first_orc = message.segment("ORC")
    read = read_order_answer(answer)
    return {
        "prescription": (first_orc.get(4) if first_orc is not None else "") or None,
        "placers": [orc.get(2) for orc in message.all("ORC")],
        "fillers": [item.filler_id or None for item in read.items],
        "reason": read.reason or None,
    }


class Pharmacy:
    """The pharmacy role: the handler for its listener, dispensing later, releasing; its own notifier."""

    def __init__(self, config: PharmacyConfig, *, store: Store, header: Header, clock: HospitalClock,
                 control_ids: Iterator[str], run: str, rng: random.Random, received: Journal, sent: Journal,
                 send: Sender, retry_initial: float, retry_max: float) -> None:
        self.config = config
        self.store = store
        self.header = header
        self.clock = clock
        self.rng = rng
        # filler and prescription numbers carry the run id: the gateway keeps dispenses by <filler>-<RXD-1>
        self.fillers = numbered(f"F{run}")
        self.numbers = numbered(f"RX{run}")
        self.handler = PharmacyHandler(store=store, header=header, clock=clock, control_ids=control_ids,
                                       fillers=self.fillers, out_of_stock=frozenset(config.out_of_stock),
                                       journal=received, accepted=self.dispense_later)
        self.notifier = Notifier(send=send, build=lambda item, cid, now: item.build(cid, now), clock=clock,
                                 control_ids=control_ids, journal=sent, store=store, role="pharmacy",
                                 retry_initial=retry_initial, retry_max=retry_max)
        self._dispensing: list[IDelayedCall] = []
        self._releases: task.LoopingCall | None = None

    def start(self) -> None:
        """Dispense what earlier runs accepted (when due), send what they queued, start releasing."""
        for pending in self.store.pending_dispenses():
            order = read_order(parse(pending.message, default_charset=pending.charset))
            self._schedule_dispense(pending.seq, pending.due, order, pending.fillers)
        self.notifier.start()
        if self.config.release_every > 0:
            self._releases = task.LoopingCall(self.release_now)
            self._releases.clock = self.clock.clock
            self._releases.start(self.config.release_every, now=False)

    def stop(self) -> None:
        if self._releases is not None and self._releases.running:
            self._releases.stop()
        for call in self._dispensing:
            if call.active():
                call.cancel()
        self._dispensing = []
        self.notifier.stop()

    def dispense_later(self, message: Message, order: Order, fillers: list[str]) -> None:
        """Keep the accepted order (in the current transaction) and, once committed, dispense it when due."""
        due = self.clock.clock.seconds() + self.config.dispense_delay
        seq = self.store.add_dispense(due, message.charset, message.raw, fillers)
        self.store.after_commit(lambda: self._schedule_dispense(seq, due, order, fillers))

    def _schedule_dispense(self, seq: int, due: float, order: Order, fillers: list[str]) -> None:
        self._dispensing = [c for c in self._dispensing if c.active()]
        delay = max(0.0, due - self.clock.clock.seconds())
        self._dispensing.append(self.clock.clock.callLater(delay, self._dispense, seq, order, fillers))

    def _dispense(self, seq: int, order: Order, fillers: list[str]) -> None:
        log.info("his-sim.pharmacy.dispensed", order=order.control_id, items=len(fillers))
        with self.store.transaction():
            self.store.dispensed(seq)
            self.notifier.enqueue(Dispatch(
                "RDS^O13",
                {"reason": "dispense", "order": order.control_id, "prescription": order.number,
                 "placers": [item.placer_id for item in order.items], "fillers": list(fillers)},
                lambda cid, now: build_rds(order, fillers, header=self.header, control_id=cid, now=now),
            ))

    def release_now(self) -> Release:
        """Release a random prescription to outside pharmacies (also what SIGUSR2 does)."""
        release = random_release(self.rng, next(self.numbers), self.fillers)
        log.info("his-sim.pharmacy.released", prescription=release.number, items=len(release.items))
        self.notifier.enqueue(Dispatch(
            "RDE^O11",
            {"reason": "release", "prescription": release.number,
             "placers": [placer for placer, _, _ in release.items],
             "fillers": [filler for _, filler, _ in release.items]},
            lambda cid, now: build_release(release, header=self.header, control_id=cid, now=now),
        ))
        return release

