"""What the simulated HIS answers to each message it receives over MLLP.

The MLLP server (``adapters.inner.listener``) frames, parses (NAKing what it cannot parse) and calls
:meth:`HisHandler.handle`; the answer returned here is written back as-is.

Answers (always MSA-2 = the received MSH-10):
- SRM^S01 -> SRR^S01: AA with SCH (SCH-1 placer id, SCH-2 the new HIS appointment id, SCH-25 Booked)
  and the slot's RGS/AIS/AIL/AIP; AR when the slot is unknown (ERR 204 'no such slot'), booked
  ('slot already booked') or blocked ('slot blocked'), or when ARQ is incomplete (101/102).
  The same placer id asking again for the slot it already holds gets AA with its booking (no second
  booking); asking for another slot while holding one gets AR 205.
  ARQ-8 `Tentative` (HL7 table 0277) holds the slot for the placer (SCH-25 Pending, no SIU): the placer's
  ordinary SRM^S01 for that slot confirms it (S12 then), SRM^S04 releases it (no SIU either).
- SRM^S04 and SRM^S03 name a booking as a HIS does: by the sender's placer appointment id (ARQ-1, required:
  AR 101 without it), checked against the filler id (ARQ-2) when one is given. No live booking with that
  placer id: AR 204 at ARQ-1; the filler id names another booking (a stale or crossed id): AR 204 at ARQ-2,
  and nothing changes. (Matching by ARQ-2 alone once let a late cancel cancel whatever booking held that id.)
- SRM^S04 -> SRR^S04: AA (SCH-25 Cancelled) and the slot opens again.
- SRM^S03 -> SRR^S03: the booking moves to the slot in ARQ-5/ARQ-11 (same HIS appointment id and placer id):
  AA (SCH-25 Booked) and an SIU^S13 for the new slot; the same slot, AA and nothing changes; AR 204 unknown
  slot (ARQ-5), 207 slot not open. (S03 as a cancellation is not modelled.)
- SQM^S25 -> SQR^S25: MSA, the QRD echoed, one SCH/RGS/AIS/AIL/AIP group per slot starting within
  QRF-2..QRF-3 (all slots when empty), then an empty DSC.
- any other message -> ACK AR with ERR 200 (unknown message code) or 201 (unsupported event).
- a resend (an MSH-10 already answered, same content; MSH-7 may differ) gets the very same answer
  bytes and changes nothing (a resent SQM^S25 is answered afresh: queries change nothing, and an SQR
  can be too large to keep); the same MSH-10 with other content gets AR 205 'control id reused with
  different content' (and is not remembered).
Bookings and cancellations queue an SIU^S12 / SIU^S15 (push mode) through ``notify``.

Durability: each message is processed in one transaction of the store (`hissim.store`): the inventory's
changes, the answer (remembered for resends, after a restart too) and the SIU it queues are committed before
the answer is returned to the MLLP listener. If the commit fails, the inventory is put back as it was and the
listener answers AE (ERR 207): the sender tries again.

Every received message is journalled (control id, type, the ACK code, placer id, schedule, start):
never a patient's name or identifier.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import structlog

from adapters.hl7.er7 import Hl7Error, Message, Segment, escape, parse_dtm
from hissim.clocks import HospitalClock
from hissim.inventory import Inventory, NotTheSameBooking, SlotNotOpen, UnknownBooking, UnknownSlot
from hissim.journal import Journal
from hissim.messages import Header, Notification, Refusal, build_answer, slot_group
from hissim.store import Store

log = structlog.get_logger("hissim.handler")

#: how many answered control ids are remembered for resends
REMEMBERED_ANSWERS = 20_000


#: the answer to a control id already answered for other content
REUSED_CONTROL_ID = Refusal(205, "control id reused with different content", "MSH", 10)


@dataclass(frozen=True)
class Answered:
    fingerprint: str
    code: str
    answer: bytes | None  # None for queries: they change nothing, a resend is answered afresh


@dataclass(frozen=True)
class Recall:
    """What `AnswerMemory` knows of a received message's control id."""

    fingerprint: str
    earlier: Answered | None

    @property
    def resend(self) -> Answered | None:
        """The earlier answer, when this is a resend (same content, MSH-7 aside) whose answer was kept."""
        earlier = self.earlier
        if earlier is not None and earlier.fingerprint == self.fingerprint and earlier.answer is not None:
            return earlier
        return None

    @property
    def reused(self) -> bool:
        """The control id was answered before, for other content."""
        return self.earlier is not None and self.earlier.fingerprint != self.fingerprint


class AnswerMemory:
    """The answers ``role`` gave, by MSH-10, so a resend gets the very same bytes, after a restart too (they
    are kept in the store); beyond ``limit`` the oldest are forgotten."""

    def __init__(self, store: Store, role: str, limit: int = REMEMBERED_ANSWERS) -> None:
        self._store = store
        self._role = role
        self._limit = limit
        self._answered: collections.OrderedDict[str, Answered] = collections.OrderedDict(
            (control_id, Answered(fingerprint, code, answer))
            for control_id, fingerprint, code, answer in store.answers(role, limit))

    def recall(self, message: Message) -> Recall:
        return Recall(_fingerprint(message), self._answered.get(message.control_id))

    def remember(self, control_id: str, answered: Answered) -> None:
        """Keep an answer, in the store's current transaction; it is recalled once that has committed."""
        forget = None
        if control_id not in self._answered and len(self._answered) >= self._limit:
            forget = next(iter(self._answered))
        self._store.remember_answer(self._role, control_id, answered.fingerprint, answered.code, answered.answer,
                                    forget)
        self._store.after_commit(lambda: self._keep(control_id, answered))

    def _keep(self, control_id: str, answered: Answered) -> None:
        self._answered[control_id] = answered
        while len(self._answered) > self._limit:
            self._answered.popitem(last=False)


@dataclass
class _Outcome:
    answer_type: str
    refusal: Refusal | None = None
    body: list[list[str]] | None = None
    trailer: list[list[str]] | None = None
    notification: Notification | None = None


class HisHandler:
    """The HIS's application: books, cancels and answers queries against the inventory."""

    def __init__(
        self,
        *,
        inventory: Inventory,
        store: Store,
        header: Header,
        clock: HospitalClock,
        control_ids: Iterator[str],
        journal: Journal,
        notify: Callable[[Notification], None] | None = None,
    ) -> None:
        self.inventory = inventory
        self.store = store
        self.header = header
        self.clock = clock
        self.control_ids = control_ids
        self.journal = journal
        self.notify = notify
        self.answers = AnswerMemory(store, "his")

    # -- the MLLP handler interface -------------------------------------------------------------

    def handle(self, message: Message, peer: Any = None) -> bytes:
        control_id = message.control_id
        facts = _facts(message)
        recall = self.answers.recall(message)
        duplicate = recall.resend is not None
        if recall.resend is not None:
            code, answer = recall.resend.code, recall.resend.answer
        elif recall.reused:
            code, answer = "AR", self._answer(message, _Outcome(_answer_type(message), REUSED_CONTROL_ID))
        else:
            with self.store.changing(self.inventory):
                outcome = self._process(message)
                code = "AA" if outcome.refusal is None else "AR"
                answer = self._answer(message, outcome)
                kept = None if message.message_code == "SQM" else answer  # an SQR can be large
                self.answers.remember(control_id, Answered(recall.fingerprint, code, kept))
                if outcome.notification is not None and self.notify is not None:
                    self.notify(outcome.notification)
        entry = {
            "time": self.clock.iso(),
            "control_id": control_id,
            "type": message.type_name,
            "ack": code,
            **facts,
        }
        if duplicate:
            entry["duplicate"] = True
        self.journal.write(entry)
        log.info("his-sim.received", control_id=control_id, type=message.type_name, ack=code,
                 duplicate=duplicate, schedule=facts["schedule"], start=facts["start"])
        return answer

    # -- processing -----------------------------------------------------------------------------

    def _process(self, message: Message) -> _Outcome:
        kind = (message.message_code, message.trigger)
        try:
            if kind == ("SRM", "S01"):
                return self._book(message)
            if kind == ("SRM", "S04"):
                return self._cancel(message)
            if kind == ("SRM", "S03"):
                return self._move(message)
            if kind == ("SQM", "S25"):
                return self._query(message)
        except Hl7Error as exc:
            return _Outcome(_answer_type(message),
                            Refusal(exc.code, exc.text, exc.segment or "", exc.field))
        if message.message_code in ("SRM", "SQM"):
            return _Outcome(_answer_type(message),
                            Refusal(201, f"unsupported event {message.trigger}", "MSH", 9))
        return _Outcome(_answer_type(message), Refusal(200, "unsupported message type", "MSH", 9))

    def _book(self, message: Message) -> _Outcome:
        answer_type = "SRR^S01^SRR_S01"
        arq = _required_segment(message, "ARQ")
        placer = arq.get(1)
        if not placer:
            raise Hl7Error(101, "placer appointment id (ARQ-1) is required", segment="ARQ", field=1)
        schedule_id, start = self._requested_slot(message, arq)
        tentative = _tentative(arq)
        try:
            held = self.inventory.booking(placer_id=placer)
        except UnknownBooking:
            held = None
        if held is not None:
            if (held.schedule_id, held.start) == (schedule_id, start):
                if held.tentative and not tentative:  # the hold confirmed
                    booking = self.inventory.confirm(held)
                    slot = self.inventory.slot(schedule_id, start)
                    return _Outcome(answer_type, body=slot_group(slot, "S12^booked"),
                                    notification=Notification("S12", slot, "Booked", "gateway", booking))
                slot = self.inventory.slot(schedule_id, start)
                return _Outcome(answer_type, body=_pending(slot_group(slot, "S12^booked"), held.tentative))
            return _Outcome(answer_type, Refusal(205, "placer appointment id already booked on another slot",
                                                 "ARQ", 1))
        try:
            booking = self.inventory.book(schedule_id, start, by=placer, placer_id=placer, tentative=tentative)
        except UnknownSlot as exc:
            return _Outcome(answer_type, Refusal(204, str(exc), "ARQ", 5))
        except SlotNotOpen as exc:
            return _Outcome(answer_type, Refusal(207, str(exc), "ARQ", 11))
        slot = self.inventory.slot(schedule_id, start)
        if tentative:  # held for the placer: nothing to tell the world yet
            return _Outcome(answer_type, body=_pending(slot_group(slot, "S12^booked"), True))
        return _Outcome(
            answer_type,
            body=slot_group(slot, "S12^booked"),
            notification=Notification("S12", slot, "Booked", "gateway", booking),
        )

    def _cancel(self, message: Message) -> _Outcome:
        answer_type = "SRR^S04^SRR_S01"
        _arq, placer, filler = _naming_a_booking(message)
        try:
            booking = self.inventory.cancel(placer_id=placer, appointment_id=filler or None)
        except UnknownBooking as exc:
            return _Outcome(answer_type, _unknown_booking(exc))
        slot = self.inventory.slot(booking.schedule_id, booking.start)
        group = slot_group(replace(slot, booking=booking), "S15^cancelled")
        group[0][25] = "Cancelled"
        return _Outcome(
            answer_type,
            body=group,
            notification=None if booking.tentative else Notification("S15", slot, "Cancelled", "gateway", booking),
        )

    def _move(self, message: Message) -> _Outcome:
        answer_type = "SRR^S03^SRR_S01"
        arq, placer, filler = _naming_a_booking(message)
        schedule_id, start = self._requested_slot(message, arq)
        try:
            before = self.inventory.booking(placer_id=placer, appointment_id=filler or None)
            booking = self.inventory.move(schedule_id, start, placer_id=placer)
        except UnknownBooking as exc:
            return _Outcome(answer_type, _unknown_booking(exc))
        except UnknownSlot as exc:
            return _Outcome(answer_type, Refusal(204, str(exc), "ARQ", 5))
        except SlotNotOpen as exc:
            return _Outcome(answer_type, Refusal(207, str(exc), "ARQ", 11))
        slot = self.inventory.slot(schedule_id, start)
        return _Outcome(answer_type, body=slot_group(slot, "S13^rescheduled"),
                        notification=None if booking == before else Notification("S13", slot, "Booked", "gateway",
                                                                                 booking))

    def _query(self, message: Message) -> _Outcome:
        qrd = _required_segment(message, "QRD")
        qrf = message.segment("QRF")
        start_from = until = None
        if qrf is not None:
            start_from = self._dtm(qrf, "QRF", 2)
            until = self._dtm(qrf, "QRF", 3)
        body = [_echo(qrd)]
        for slot in self.inventory.slots(start_from, until):
            body.extend(slot_group(slot, "S25^query"))
        return _Outcome("SQR^S25^SQR_S25", body=body, trailer=[["DSC"]])

    def _requested_slot(self, message: Message, arq: Segment) -> tuple[str, datetime]:
        schedule_id = arq.get(5)
        if not schedule_id:
            raise Hl7Error(101, "schedule id (ARQ-5) is required", segment="ARQ", field=5)
        start = self._dtm(arq, "ARQ", 11)
        if start is None:
            ais = message.segment("AIS")
            if ais is not None:
                start = self._dtm(ais, "AIS", 4)
        if start is None:
            raise Hl7Error(101, "requested start (ARQ-11.1 or AIS-4) is required", segment="ARQ", field=11)
        return schedule_id, start

    def _dtm(self, segment: Segment, name: str, field: int) -> datetime | None:
        text = segment.get(field)
        if not text:
            return None
        try:
            return self.clock.to_local(parse_dtm(text))
        except (Hl7Error, ValueError):
            raise Hl7Error(102, f"{name}-{field} is not a date/time", segment=name, field=field) from None

    # -- answers --------------------------------------------------------------------------------

    def _answer(self, message: Message, outcome: _Outcome) -> bytes:
        msh = message.msh
        return build_answer(
            self.header,
            type_name=outcome.answer_type,
            answered_control_id=message.msh.raw(10),
            control_id=next(self.control_ids),
            now=self.clock.local(),
            to_application=msh.raw(3),
            to_facility=msh.raw(4),
            refusal=outcome.refusal,
            body=outcome.body or (),
            trailer=outcome.trailer or (),
        )


def _naming_a_booking(message: Message) -> tuple[Segment, str, str]:
    """The ARQ of a request about an existing booking, its placer (ARQ-1, required) and filler (ARQ-2) ids."""
    arq = _required_segment(message, "ARQ")
    placer, filler = arq.get(1), arq.get(2)
    if not placer:
        raise Hl7Error(101, "placer appointment id (ARQ-1) is required", segment="ARQ", field=1)
    return arq, placer, filler


def _unknown_booking(exc: UnknownBooking) -> Refusal:
    """AR 204 at the id that names no booking: ARQ-2 when it names another booking than ARQ-1, else ARQ-1."""
    return Refusal(204, str(exc), "ARQ", 2 if isinstance(exc, NotTheSameBooking) else 1)


def _tentative(arq: Segment) -> bool:
    """ARQ-8 (appointment type, HL7 table 0277) Tentative: a hold, not a booking."""
    return arq.get(8).upper() == "TENTATIVE"


def _pending(group: list[list[str]], tentative: bool) -> list[list[str]]:
    """A slot group whose SCH-25 says Pending when the booking is only a hold."""
    if tentative:
        group[0][25] = "Pending"
    return group


def _answer_type(message: Message) -> str:
    if message.message_code == "SRM":
        return f"SRR^{message.trigger}^SRR_S01"
    if message.message_code == "SQM" and message.trigger == "S25":
        return "SQR^S25^SQR_S25"
    return f"ACK^{escape(message.trigger or '')}^ACK"


def _required_segment(message: Message, name: str) -> Segment:
    segment = message.segment(name)
    if segment is None:
        raise Hl7Error(100, f"{name} segment is required", segment=name, field=None)
    return segment


def _echo(segment: Segment) -> list[str]:
    """The segment's fields as received (still escaped), for format_message (not for MSH)."""
    return [segment.name] + [segment.raw(n) for n in range(1, segment.field_count + 1)]


def _fingerprint(message: Message) -> str:
    """The message's content, MSH-7 (time of message) left out: a resend may be stamped anew."""
    digest = hashlib.sha256()
    for segment in message.segments:
        fields = _echo(segment)
        if segment.name == "MSH":
            fields = fields[:7] + fields[8:]  # fields[n] is MSH-n: leave out MSH-7
        digest.update("|".join(fields).encode("utf-8", "surrogatepass"))
        digest.update(b"\r")
    return digest.hexdigest()


def _facts(message: Message) -> dict[str, Any]:
    """What the journal may say about a request: the gateway's placer id, schedule and start, the facility it
    was addressed to (MSH-6.1) and the names of its Z-segments (never their contents)."""
    arq = message.segment("ARQ")
    placer = schedule = start = None
    tentative = False
    if arq is not None:
        tentative = _tentative(arq)
        placer = arq.get(1) or None
        schedule = arq.get(5) or None
        start_text = arq.get(11)
        if not start_text:
            ais = message.segment("AIS")
            start_text = ais.get(4) if ais is not None else ""
        start = start_text[:12] or None
    facts = {"placer": placer, "schedule": schedule, "start": start, "facility": message.receiving_facility,
             "z_segments": [seg.name for seg in message.segments if seg.name.startswith("Z")]}
    if tentative:
        facts["tentative"] = True
    return facts
