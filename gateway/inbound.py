"""What the inner gate does with a message from the HIS, once it has been framed and read.

The decision (accept, refuse, already have it) is made here; the adapter turns it into an ACK.  The ACK
is only built after the chamber transaction that recorded the message has committed.

- A message with a control id already committed from this HIS, with the same bytes: the first answer is
  given again and nothing is processed twice.
- The same control id with different bytes: refused (AR) — a sender reusing control ids would otherwise
  lose a message silently.
- Anything the mapping could not read: refused with the HL7 error it raised (segment and field), and the
  refusal is recorded in the chamber (state ``refused``, raw bytes kept) so nothing is lost silently and an
  operator can reprocess it (``gatewayd queue retry ID``) once the cause is fixed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass

import structlog
from twisted.internet import defer

from gateway import logs
from gateway.booking import SlotBook

log = structlog.get_logger("gateway.inbound")


@dataclass(frozen=True)
class Received:
    """A message as the inner gate read it."""

    peer: str
    control_id: str
    type: str
    body: bytes
    charset: str


@dataclass(frozen=True)
class Verdict:
    code: str  # AA | AE | AR
    text: str = ""
    duplicate: bool = False  # the same bytes were committed before: answered again, not applied again
    reused: bool = False  # the control id was committed before with other bytes: refused, nothing stored


def z_segments_kept(notices, passed: bool) -> list:
    """The notices as the slot book takes them: with their Z-segments when the HIS endpoint passes them
    (``pass_z_segments``), else without (they stay in the message's raw copy)."""
    if passed or not any(n.z_segments for n in notices):
        return notices
    return [dataclasses.replace(n, z_segments=()) for n in notices]


class InboundService:
    def __init__(self, chamber, slot_book: SlotBook, z_segment_peers=frozenset()):
        self.chamber = chamber
        self.slot_book = slot_book
        self.z_segment_peers = frozenset(z_segment_peers)  # HIS endpoints whose Z-segments are passed on

    def accept(self, received: Received, notices) -> defer.Deferred:
        """Commit the message and apply its slot notices; fires with a Verdict after COMMIT."""
        notices = z_segments_kept(notices, received.peer in self.z_segment_peers)
        verdict = Verdict("AA", f"{len(notices)} slot(s) updated")  # (each notice touches one slot)

        def apply(tx) -> Verdict:
            self.slot_book.apply(tx, notices)
            return verdict

        return self._record(received, "delivered", apply, verdict)

    def accept_with(self, received: Received, decide) -> defer.Deferred:
        """Commit the message and apply ``decide(tx) -> Verdict`` in the same transaction (pharmacy
        messages: `gateway.prescribing`); fires with the Verdict after COMMIT."""
        return self._record(received, "delivered", decide)

    def refuse(self, received: Received, code: str, text: str) -> defer.Deferred:
        """Record a message we refuse (so it can be looked at and replayed); fires with the Verdict."""
        verdict = Verdict(code, text)
        return self._record(received, "refused", lambda tx: verdict, verdict)

    def _record(self, received: Received, state: str, decide, verdict: Verdict | None = None) -> defer.Deferred:
        """``decide(tx) -> Verdict`` applies the message.  When the verdict is known beforehand (``verdict``),
        the message goes in directly in its final state with both story lines, and the unique index on
        control ids finds a resend (no lookup before the insert)."""
        def work(tx):
            if verdict is not None:
                message_id = tx.add_message(
                    direction="inbound", peer=received.peer, control_id=received.control_id, type=received.type,
                    state=state, body=received.body, charset=received.charset, answer_code=verdict.code,
                    answer_text=verdict.text, if_new=True,
                    story=(("committed", "received from the HIS"),
                           (state, f"{verdict.code} {verdict.text}".strip())))
                if message_id is None:
                    return self._resent(tx, received)
                decide(tx)
                return verdict
            known = tx.message_by_control_id("inbound", received.peer, received.control_id)
            if known is not None:
                return self._resent(tx, received, known)
            message_id = tx.add_message(direction="inbound", peer=received.peer, control_id=received.control_id,
                                        type=received.type, state="committed", body=received.body,
                                        charset=received.charset, detail="received from the HIS")
            decided = decide(tx)
            tx.set_message_state(message_id, state, answer_code=decided.code, answer_text=decided.text,
                                 detail=f"{decided.code} {decided.text}".strip())
            return decided

        return self.chamber.transact(work).addCallback(self._logged, received)

    def _resent(self, tx, received: Received, known=None) -> Verdict:
        """A control id already committed from this HIS: the first answer again, or AR for other bytes."""
        if known is None:
            known = tx.message_by_control_id("inbound", received.peer, received.control_id)
        verdict = self._known(known, received)
        if verdict.reused:  # kept in the original's story, with a fingerprint of the newcomer
            digest = hashlib.sha256(received.body).hexdigest()[:16]
            tx.note(known.id, f"refused (AR) a different message with this control id, sha256 {digest}")
        return verdict

    @staticmethod
    def _known(known, received: Received) -> Verdict:
        if known.body != received.body:
            return Verdict("AR", f"control id {received.control_id} was already used for a different message",
                           reused=True)
        return Verdict(known.answer_code or "AA", known.answer_text or "", duplicate=True)

    @staticmethod
    def _logged(verdict: Verdict, received: Received) -> Verdict:
        if not logs.enabled(logging.INFO):  # (one line per message: skipped cheaply at warning)
            return verdict
        log.info("inner.message", peer=received.peer, control_id=received.control_id, type=received.type,
                 ack=verdict.code, duplicate=verdict.duplicate)
        return verdict
