"""The inner gate's receiver: turns the HL7 messages the HIS sends into service calls and answers into ACKs.

- :class:`InnerGateHandler` is the MLLP listener's handler (HIS -> gateway).  It maps SIU to slot
  notices, hands them to :class:`gateway.domain.inbound.InboundService`, and builds the answers from the verdict
  only after the chamber has committed.  The sender's MSH-15/MSH-16 choose the acknowledgement mode
  (`adapters.hl7.ack.answer_codes`): original mode gets one AA/AE/AR; enhanced mode gets CA/CE/CR as
  MSH-15 asks and then, for a message the gate accepted, AA/AE as MSH-16 asks, both on the same
  connection (docs/hl7-gate.md says why).  Failure paths, chosen on purpose:

  ======================================  ========  ===============  ===========================  =======
  what                                    original  enhanced         ERR                          stored
  ======================================  ========  ===============  ===========================  =======
  committed and applied                   AA        CA, AA           --                           yes
  a resend of a committed message (same   its first answer again, nothing applied twice           yes
  MSH-3/4 and MSH-10, same content but
  for MSH-7's time)
  message type or event we do not take    AR        CR               200 / 201 at MSH-9           yes
  SIU whose fields the slot book needs    AE        CA, AE           the segment and field        yes
  are missing or malformed                                           (101/102/103)
  the sender's control id reused with     AR        CR               205 at MSH-10                no
  other content
  the chamber could not commit            AE        CE               207 "not stored; send again" no
  an ACK (MSH-9 = ACK) sent to us         nothing: an acknowledgement is never acknowledged       no
  ======================================  ========  ===============  ===========================  =======

  With ``validation="strict"`` each message is first validated by hl7apy (`adapters.hl7.validation`);
  what it refuses is answered like a field the slot book cannot read (AE; CA, AE), or AR/CR for an
  unsupported version (203), and stored as refused.

  "stored" is what MLLP release 2 reports with its commit block (0x06 yes, 0x15 no).  Frames that do not
  parse at all are NAKed (AR, or CR in enhanced mode) by the MLLP server before they reach the handler.

- :func:`make_reprocessor` reads a refused inbound SIU again for ``gatewayd queue retry``.

The inner gate's other parts: the way to the HIS (adapters/inner/his.py), the slot poller
(adapters/inner/poller.py), the MLLP listener and client (adapters/inner/listener.py, client.py).
"""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import structlog
from twisted.internet import defer

from adapters.hl7.ack import build_answers
from adapters.hl7.er7 import Hl7Error, Message, parse
from adapters.hl7.identity import sender
from adapters.hl7.validation import VALIDATION_MODES, strict_problem
from adapters.maps.siu_slot import notices_from_siu
from adapters.inner.listener import Answer
from gateway.domain.ids import new_control_id
from gateway.domain.routes import type_allowed
from gateway.chamber.errors import ChamberWriteError
from gateway.domain.inbound import Received, z_segments_kept

log = structlog.get_logger("gateway.inner")


class InnerGateHandler:
    """MLLP handler for messages the HIS sends us."""

    def __init__(self, inbound, *, peer: str, sending_application: str, sending_facility: str, tz: ZoneInfo,
                 clock, validation: str = "tolerant", accept_types=("SIU^*",), on_answer=None, pharmacy=None,
                 peers_by_application: dict[str, str] | None = None, on_message=None):
        if validation not in VALIDATION_MODES:
            raise ValueError(f"validation must be one of {', '.join(VALIDATION_MODES)}, not {validation!r}")
        self.inbound = inbound
        self.peer = peer
        self.sending_application = sending_application
        self.sending_facility = sending_facility
        self.tz = tz
        self.clock = clock
        self.validation = validation
        self.accept_types = tuple(accept_types)
        self.on_answer = on_answer  # called with the outcome of every answer (metrics)
        self._second: int | None = None  # the hospital's wall-clock time of that second (an ACK's MSH-7 has
        self._now: datetime | None = None  # seconds only): computed once a second, not once per message
        self.pharmacy = pharmacy  # adapters.inner.pharmacy.PharmacyInbound: RDS^O13, released RDE^O11
        self.peers_by_application = peers_by_application or {}  # MSH-3 -> HIS endpoint name
        self.on_message = on_message  # called with the HIS endpoint's name for every message it sends (its probe)

    def handle(self, message: Message, peer: str) -> defer.Deferred | Answer:
        if message.message_code == "ACK":
            msa = message.segment("MSA")
            log.info("inner.ack_ignored", control_id=message.control_id,
                     answers=msa.get(2) if msa is not None else "")
            return Answer(())
        peer_name = self.peers_by_application.get(message.sending_application, self.peer) \
            if self.peers_by_application else self.peer
        if self.on_message is not None:
            self.on_message(peer_name)
        received = Received(peer=peer_name, control_id=message.control_id, type=message.type_name,
                            body=message.raw, charset=message.charset, sender=sender(message))
        if not type_allowed(message.type_name, self.accept_types):
            some_event_allowed = any(p.partition("^")[0] == message.message_code for p in self.accept_types)
            code = 201 if some_event_allowed else 200  # unsupported event, or unsupported message type
            refusal = Hl7Error(code, f"{message.type_name} may not cross the lock (allowed: "
                                     f"{', '.join(self.accept_types)})", segment="MSH", field=9)
            return self._refuse(message, received, refusal).addErrback(self._not_stored, message)
        problem = strict_problem(message) if self.validation == "strict" else None
        if problem is not None:
            d = self._refuse(message, received, problem)
            return d.addErrback(self._not_stored, message)
        try:
            if self.pharmacy is not None and message.message_code in ("RDS", "RDE"):
                decide = self.pharmacy.decider(message)
                d = self.inbound.accept_with(received, decide)
            else:
                d = self.inbound.accept(received, slot_notices(message))
        except Hl7Error as e:
            d = self._refuse(message, received, e)
        else:
            d.addCallback(self._accepted, message)
        return d.addErrback(self._not_stored, message)

    def _refuse(self, message: Message, received: Received, err: Hl7Error) -> defer.Deferred:
        code = nak_code(err)
        d = self.inbound.refuse(received, code, str(err))
        return d.addCallback(self._refused, message, code, err)

    def _refused(self, verdict, message: Message, code: str, err: Hl7Error) -> Answer:
        if verdict.reused:
            return self._reused(verdict, message)
        # recorded now, or a resend of the same bytes (which the mapping refuses with the same error)
        if verdict.code == "AR":
            return self._answer(message, "rejected", error=err)
        return self._answer(message, "accepted", app_code=verdict.code, error=err)

    def _accepted(self, verdict, message: Message) -> Answer:
        if verdict.reused:
            return self._reused(verdict, message)
        if verdict.code == "AA":
            return self._answer(message, "accepted")
        error = Hl7Error(207, verdict.text or "refused earlier")  # a resend of a message refused earlier
        if verdict.code == "AR":
            return self._answer(message, "rejected", error=error)
        return self._answer(message, "accepted", app_code=verdict.code, error=error)

    def _reused(self, verdict, message: Message) -> Answer:
        """The control id is already in the chamber with other content: refused, and not stored."""
        err = Hl7Error(205, verdict.text or "control id reused with different content", segment="MSH", field=10)
        return self._answer(message, "rejected", error=err, committed=False)

    def _not_stored(self, failure, message: Message) -> Answer:
        failure.trap(ChamberWriteError)
        log.error("inner.not_stored", control_id=message.control_id, error=failure.getErrorMessage())
        err = Hl7Error(207, "the gateway could not store the message; send it again")
        return self._answer(message, "not_stored", error=err, committed=False)

    def _answer(self, message: Message, outcome: str, *, app_code: str = "AA", error: Hl7Error | None = None,
                committed: bool = True) -> Answer:
        if self.on_answer is not None:
            self.on_answer(outcome)
        second = int(self.clock.seconds())
        if second != self._second:
            self._second, self._now = second, datetime.fromtimestamp(second, self.tz).replace(tzinfo=None)
        now = self._now
        payloads = build_answers(
            message, outcome, app_code=app_code, error=error, sending_application=self.sending_application,
            sending_facility=self.sending_facility, control_id=new_control_id, now=now,
        )
        return Answer(tuple(payloads), committed=committed)


def slot_notices(message: Message):
    """What the inner gate takes from the HIS, as slot notices; Hl7Error (with location) otherwise."""
    if message.message_code != "SIU":
        raise Hl7Error(200, f"this gateway does not take {message.type_name} messages", segment="MSH", field=9)
    return notices_from_siu(message)


def nak_code(err: Hl7Error) -> str:
    """AR for what the HIS must not send again as it is (type, event, version); AE for content errors."""
    return "AR" if err.code in (200, 201, 203) else "AE"


def make_reprocessor(slot_book, default_charset: str, z_segment_peers=frozenset()):
    """For ``gatewayd queue retry`` of a refused inbound SIU: read its raw bytes again with the current code and
    apply them (inside the caller's transaction).  (gateway.ops.queue.retry offers it SIU messages only.)  Returns (ACK code, text) as the gate would.
    ``z_segment_peers``: the HIS endpoints whose Z-segments are passed on (``pass_z_segments``)."""
    def reprocess(tx, message_row) -> tuple[str, str]:
        try:
            notices = z_segments_kept(slot_notices(parse(message_row.body, default_charset=default_charset)),
                                      message_row.peer in z_segment_peers)
        except Hl7Error as e:
            return nak_code(e), str(e)
        touched = slot_book.apply(tx, notices)
        return "AA", f"{len(touched)} slot(s) updated"

    return reprocess
